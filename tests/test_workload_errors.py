"""The workload's own faults: a failing fp32 reference is headlined as the workload's fault, and bad user objects
are a WorkloadError naming the object and the fix before anything is trained."""

from __future__ import annotations

import re

from session_helpers import CPU, HELPERS, UPDATE, _entry, _env_key, _hashes, _write_baseline
from test_bad_input_and_faults import INTERNAL_FRAME, _assert_clean, _output, _quiet_and_isolated  # noqa: F401

# --------------------------------------------------------------------------------------------------
# 5. The workload's fault is not an AMP regression.
# --------------------------------------------------------------------------------------------------

WORKLOAD_FAULTS = {
    "loss_without_grad": ("tiny(loss=lambda out, y: torch.tensor(1.0))", "the loss is not connected to the model's parameters"),
    "nan_in_fp32": ("tiny(model=lambda: Faulty('nan_everywhere'))", "fp32 loss non-finite (nan) first at step 0"),
}


def test_reference_failure_is_headlined_as_the_workloads_fault(pytester):
    pytester.makepyfile(
        test_wl=HELPERS
        + "".join(
            f"""

@pytest.mark.amp_regression(**FAST)
def test_{name}(ampgate):
    ampgate.run({workload})
"""
            for name, (workload, _detail) in WORKLOAD_FAULTS.items()
        )
    )
    result = pytester.runpytest(*CPU)
    result.assert_outcomes(failed=len(WORKLOAD_FAULTS))
    out = _assert_clean(result)
    for name, (_workload, detail) in WORKLOAD_FAULTS.items():
        assert f"FAILED test_wl.py::test_{name} - WORKLOAD ERROR" in out and detail in out, (name, out)
    assert out.count("WORKLOAD ERROR: the fp32 reference itself failed, so AMP is not to blame") >= len(WORKLOAD_FAULTS), out
    assert "AMP REGRESSION" not in out and "accept a deliberate change" not in out and "relax" not in out, out


# --------------------------------------------------------------------------------------------------
# 6. The user's objects: WorkloadError before training.
# --------------------------------------------------------------------------------------------------

BAD_OBJECTS = {
    "no_parameters": ("tiny(model=lambda: nn.ReLU())", "the model (ReLU) has no parameters"),
    "frozen": ("tiny(model=lambda: nn.Linear(8, 2).requires_grad_(False))", "every parameter of the model is frozen"),
    "meta_model": ("tiny(model=lambda: nn.Linear(8, 2, device='meta'))", "the model has tensors on the meta device"),
    "not_a_module": ("tiny(model=lambda: nn.Linear)", "model_factory returned the class Linear, not a torch.nn.Module"),
    "tuple_model": ("tiny(model=lambda: (nn.Linear(8, 2),))", "model_factory returned tuple, not a torch.nn.Module"),
    "optimizer_none": ("tiny(optimizer=lambda p: None)", "optimizer_factory returned NoneType, not a torch.optim.Optimizer"),
    "optimizer_list": ("tiny(optimizer=lambda p: [torch.optim.SGD(p, lr=0.1)])", "optimizer_factory returned list"),
    "lbfgs": ("tiny(optimizer=lambda p: torch.optim.LBFGS(p))", "LBFGS.step() needs a closure"),
    "other_parameters": (
        "tiny(optimizer=lambda p: torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1))",
        "over other parameters than the ones it was given",
    ),
    "meta_data": ("tiny(data=tuple(t.to('meta') for t in data()))", "train_x, train_y, test_x, test_y are on the meta device"),
}


def test_bad_user_objects_are_workload_errors_before_training(pytester):
    cases = "".join(
        f"""

@pytest.mark.amp_regression(**FAST)
def test_{name}(ampgate):
    ampgate.run({code})
"""
        for name, (code, _msg) in BAD_OBJECTS.items()
    )
    cases += """

@pytest.mark.amp_regression(**FAST)
def test_dataset_tuple(ampgate):
    ampgate.run(tiny(), dataset=data())
"""
    pytester.makepyfile(test_objects=HELPERS + cases)
    env = _env_key()
    _write_baseline(pytester, "test_objects", {f"test_objects.py::test_{n}": {env: _entry(0.4)} for n in [*BAD_OBJECTS, "dataset_tuple"]})
    before = _hashes(pytester.path / "baselines")
    result = pytester.runpytest(*UPDATE)
    result.assert_outcomes(failed=len(BAD_OBJECTS) + 1)
    out = _assert_clean(result)
    for name, (_code, message) in BAD_OBJECTS.items():
        assert message in out, (name, out)
    assert "run(dataset=...) takes a pytest_ampgate.data.DeviceDataset, got tuple" in out, out
    assert len(re.findall(r"^WorkloadError: ", out, re.M)) == len(BAD_OBJECTS) + 1, out
    assert "ampgate summary" not in out or "fp32" not in out.split("ampgate summary", 1)[1], "nothing was measured"
    assert _hashes(pytester.path / "baselines") == before
