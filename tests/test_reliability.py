"""Reliability, end to end: each root cause driven through a real pytest session.

1. only a test whose whole call passed is recorded, and xfail is honoured;
2. no selection narrower than the whole module (--lf, a filtering plugin, -k, node ids) makes a
   living test's baseline stale or pruned;
3. a gated test that measured nothing says so, and fails under --ampgate-strict;
4. measurements start from a known global state and name what a test leaked;
5. the workload's own fault is headlined as such, not as an AMP regression;
6. bad user objects are a WorkloadError before training;
7. output paths: usage errors at start-up, one line at the end, the other outputs still written;
8. baseline files that are not plain JSON documents (FIFO, BOM, huge numbers, deep nesting, ranges);
9. markers merged, too few rounds never decisive, nothing gated never "PASSED", one path rule;
10. SIGTERM keeps what finished, like Ctrl-C.

Every refused input leaves the baseline files byte for byte as they were (hashes compared).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

# Shared with the fault catalogue: its early imports (run on import), its autouse fixture (one
# intra-op thread, a private device-lock directory), its output helper and internal-frame pattern.
from test_faults import INTERNAL_FRAME, _assert_clean, _output, _quiet_and_isolated  # noqa: F401

from pytest_ampgate.baselines import SCHEMA, SCHEMA_VERSION

CPU = ("--ampgate", "--ampgate-device", "cpu", "-p", "no:cacheprovider")
UPDATE = (*CPU, "--ampgate-update")
POSIX = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and FIFOs")

HELPERS = '''
import os
import time

import pytest
import torch
from torch import nn

from pytest_ampgate import Workload

FAST = dict(modes=["amp_bf16"], rounds=2, steps_per_block=2, warmup_steps=1, missing_baseline="ignore",
            check_speed=False, check_memory=False)


def in_bf16(device_type):
    return torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.bfloat16


class Faulty(nn.Module):
    """Linear(8, 2) that misbehaves under bfloat16 autocast only (NaN output or a slow step)."""

    def __init__(self, fault=""):
        super().__init__()
        self.lin = nn.Linear(8, 2)
        self.fault = fault

    def forward(self, x):
        out = self.lin(x)
        if self.fault == "nan_everywhere":
            return out * float("nan")
        if in_bf16(x.device.type):
            if self.fault == "nan":
                return out * float("nan")
            if self.fault == "slow":
                time.sleep(0.02)
        return out


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = (x[:, 0] > 0).long()
    return x, y, x[:32], y[:32]


def tiny(name="tiny", model=None, loss=None, optimizer=None, **changes):
    w = Workload(
        name=name,
        model_factory=model or (lambda: nn.Linear(8, 2)),
        data=data(),
        loss_fn=loss or nn.CrossEntropyLoss(),
        optimizer_factory=optimizer or (lambda p: torch.optim.SGD(p, lr=0.1)),
        batch_size=16,
    )
    return w.with_options(**changes) if changes else w
'''


def _hashes(root: Path) -> dict:
    """sha256 of every file under ``root`` (the baseline directory), by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _env_key() -> str:
    from pytest_ampgate.env import fingerprint

    return fingerprint("cpu").key()


def _entry(accuracy=0.5, **mode) -> dict:
    return {
        "environment": {"device_name": "somewhere"},
        "recorded_at": "2026-01-01T00:00:00+00:00",
        "settings": {},
        "modes": {"fp32": {"accuracy": accuracy}, "amp_bf16": {"accuracy": accuracy, **mode}},
    }


def _baseline_doc(tests: dict) -> bytes:
    return json.dumps({"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "tests": tests}, indent=2).encode()


def _write_baseline(pytester, module: str, tests: dict) -> Path:
    path = pytester.path / "baselines" / f"{module}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_baseline_doc(tests))
    return path


# --------------------------------------------------------------------------------------------------
# 1. Recording only what passed; xfail honoured.
# --------------------------------------------------------------------------------------------------

OUTCOMES_TEST = (
    HELPERS
    + """

@pytest.fixture
def breaks_on_teardown():
    yield
    raise RuntimeError("teardown broke")


@pytest.mark.amp_regression(**FAST)
def test_ok(ampgate):
    ampgate.run(tiny())


@pytest.mark.amp_regression(**FAST)
def test_own_assert_fails(ampgate):
    result = ampgate.run(tiny())
    assert result.mode("fp32").accuracy > 2, "the test's own check after run()"


@pytest.mark.amp_regression(**FAST)
def test_skips_after_run(ampgate):
    ampgate.run(tiny())
    pytest.skip("decided to skip after measuring")


@pytest.mark.amp_regression(**FAST)
def test_teardown_fails(ampgate, breaks_on_teardown):
    ampgate.run(tiny())


@pytest.mark.xfail(reason="known bf16 NaN")
@pytest.mark.amp_regression(**FAST)
def test_known_gate_failure(ampgate):
    ampgate.run(tiny(model=lambda: Faulty("nan")))


@pytest.mark.xfail(reason="expected to fail", strict=True)
@pytest.mark.amp_regression(**FAST)
def test_strict_xpass(ampgate):
    ampgate.run(tiny())


@pytest.mark.xfail(reason="expected to fail")
@pytest.mark.amp_regression(**FAST)
def test_xpass(ampgate):
    ampgate.run(tiny())
"""
)

NOT_PASSED = {
    "test_own_assert_fails": "the test failed",
    "test_skips_after_run": "the test skipped",
    "test_teardown_fails": "its teardown failed",
    "test_known_gate_failure": "it has failing checks",
    "test_strict_xpass": "the test failed",
    "test_xpass": "the test xpassed",
}


def test_update_records_only_tests_whose_whole_call_passed_and_honours_xfail(pytester):
    pytester.makepyfile(test_outcomes=OUTCOMES_TEST)
    env = _env_key()
    old = {f"test_outcomes.py::{name}": {env: _entry(0.123)} for name in NOT_PASSED}
    path = _write_baseline(pytester, "test_outcomes", old)
    result = pytester.runpytest(*UPDATE, "-rA")
    result.assert_outcomes(passed=2, failed=2, skipped=1, errors=1, xfailed=1, xpassed=1)
    out = _assert_clean(result)
    assert "XFAIL test_outcomes.py::test_known_gate_failure - known bf16 NaN" in out, out
    assert "[XPASS(strict)] expected to fail" in out, out
    for name, why in NOT_PASSED.items():
        assert f"baseline NOT recorded for test_outcomes.py::{name}: {why}" in out, (name, out)
    stored = json.loads(path.read_text())["tests"]
    for name in NOT_PASSED:  # the entries of tests that did not pass are exactly as they were
        assert stored[f"test_outcomes.py::{name}"] == old[f"test_outcomes.py::{name}"], name
    assert env in stored["test_outcomes.py::test_ok"], "the passing test is recorded"


def test_under_xdist_only_passed_calls_reach_the_store(pytester):
    """The decision travels on the workers' reports: the controller stages only what passed."""
    pytester.makepyfile(test_outcomes=OUTCOMES_TEST)
    result = pytester.runpytest_subprocess(*UPDATE, "-n", "2", "-k", "test_ok or own_assert or teardown or known_gate")
    result.assert_outcomes(passed=2, failed=1, errors=1, xfailed=1)
    out = _assert_clean(result)
    assert "baseline NOT recorded for test_outcomes.py::test_teardown_fails: its teardown failed" in out, out
    stored = json.loads((pytester.path / "baselines" / "test_outcomes.json").read_text())["tests"]
    assert sorted(stored) == ["test_outcomes.py::test_ok"], stored


def test_known_gate_failure_under_xfail_is_xfailed_in_check_mode(pytester):
    pytester.makepyfile(test_outcomes=OUTCOMES_TEST)
    result = pytester.runpytest(*CPU, "-k", "known_gate_failure or strict_xpass")
    result.assert_outcomes(xfailed=1, failed=1, deselected=5)
    _assert_clean(result)


# --------------------------------------------------------------------------------------------------
# 2. Narrower selections never make a living test's baseline stale.
# --------------------------------------------------------------------------------------------------

SELECTION_TEST = (
    HELPERS
    + """

@pytest.mark.amp_regression(**FAST)
def test_a(ampgate):
    ampgate.run(tiny())


@pytest.mark.amp_regression(**FAST)
def test_b(ampgate):
    ampgate.run(tiny())
    assert os.environ.get("B_PASSES"), "test_b fails until B_PASSES is set"
"""
)


def _selection_files(pytester) -> Path:
    pytester.makepyfile(test_sel=SELECTION_TEST)
    env = _env_key()
    tests = {"test_sel.py::test_a": {env: _entry(0.5)}, "test_sel.py::test_b": {env: _entry(0.5)}}
    return _write_baseline(pytester, "test_sel", tests)


def test_last_failed_never_prunes_or_calls_stale_a_test_that_was_not_rerun(pytester):
    path = _selection_files(pytester)
    first = pytester.runpytest("--ampgate", "--ampgate-device", "cpu")  # with the cache: test_b fails
    first.assert_outcomes(passed=1, failed=1)
    before = _hashes(pytester.path / "baselines")
    listed = pytester.runpytest("--ampgate", "--ampgate-device", "cpu", "--lf")
    listed.assert_outcomes(failed=1)
    assert "stale baseline entries" not in _output(listed), _output(listed)
    pruned = pytester.runpytest("--ampgate", "--ampgate-device", "cpu", "--lf", "--ampgate-update", "--ampgate-prune")
    pruned.assert_outcomes(failed=1)
    out = _assert_clean(pruned)
    assert "pruned" not in out and path.exists(), out
    assert _hashes(pytester.path / "baselines") == before, "nothing pruned, nothing written"


@pytest.mark.parametrize(
    "args",
    [("-k", "test_b"), ("test_sel.py::test_b",), ("--deselect", "test_sel.py::test_a"), ("-p", "dropper"), ("-p", "uncollector")],
    ids=["k", "node_id", "deselect", "plugin_drops_items_silently", "plugin_does_not_collect_them"],
)
def test_narrower_selection_never_prunes(pytester, monkeypatch, args):
    monkeypatch.setenv("B_PASSES", "1")
    _selection_files(pytester)
    # Plugins that narrow the run without calling pytest_deselected: one drops items before anyone
    # else sees them, one (as --lf does) filters what a module's collection returns.
    pytester.makepyfile(
        dropper="import pytest\n\n@pytest.hookimpl(tryfirst=True)\ndef pytest_collection_modifyitems(items):\n"
        "    items[:] = [i for i in items if i.name != 'test_a']\n",
        uncollector="import pytest\n\n@pytest.hookimpl(wrapper=True)\ndef pytest_make_collect_report(collector):\n"
        "    report = yield\n    if report.result:\n"
        "        report.result[:] = [x for x in report.result if x.name != 'test_a']\n    return report\n",
    )
    pytester.syspathinsert()
    before = _hashes(pytester.path / "baselines")
    result = pytester.runpytest(*CPU, "--ampgate-update", "--ampgate-prune", *args)
    result.assert_outcomes(passed=1)
    out = _assert_clean(result)
    assert "pruned" not in out and "stale baseline" not in out, out
    stored = json.loads((pytester.path / "baselines" / "test_sel.json").read_text())["tests"]
    assert stored["test_sel.py::test_a"] == {_env_key(): _entry(0.5)}, "test_a's entry untouched"
    assert before, "the store existed"


def test_a_full_run_still_finds_and_prunes_the_entry_of_a_test_that_is_gone(pytester, monkeypatch):
    monkeypatch.setenv("B_PASSES", "1")
    path = _selection_files(pytester)
    doc = json.loads(path.read_text())
    doc["tests"]["test_sel.py::test_gone"] = {_env_key(): _entry(0.5)}
    path.write_text(json.dumps(doc))
    listed = pytester.runpytest(*CPU)
    assert "stale baseline entries (their tests no longer exist): test_sel.py::test_gone" in _output(listed)
    pruned = pytester.runpytest(*CPU, "--ampgate-update", "--ampgate-prune")
    assert "pruned 1 stale baseline entry" in _output(pruned)
    assert sorted(json.loads(path.read_text())["tests"]) == ["test_sel.py::test_a", "test_sel.py::test_b"]


# --------------------------------------------------------------------------------------------------
# 3. A gate that measured nothing.
# --------------------------------------------------------------------------------------------------

NOTHING_TEST = """
import pytest


@pytest.mark.amp_regression(modes=["amp_bf16"])
def test_marker_only():
    pass  # gated, but never calls ampgate.run()


def test_fixture_unused(ampgate):
    assert ampgate is not None
"""


def test_gated_test_that_never_runs_is_named_and_fails_under_strict(pytester):
    pytester.makepyfile(test_nothing=NOTHING_TEST)
    result = pytester.runpytest(*CPU)
    result.assert_outcomes(passed=2)
    out = _assert_clean(result)
    assert re.search(
        r"gated but measured nothing \(never called ampgate.run\(\)\): test_nothing.py::test_marker_only, "
        r"test_nothing.py::test_fixture_unused",
        out,
    ), out
    strict = pytester.runpytest(*CPU, "--ampgate-strict")
    strict.assert_outcomes(failed=2)
    out = _assert_clean(strict)
    assert out.count("AMP GATE MEASURED NOTHING") >= 2, out


# --------------------------------------------------------------------------------------------------
# 4. Known global state.
# --------------------------------------------------------------------------------------------------

LEAKS = {
    # name: (code run by an earlier, ungated test and left in place; the phrase that names it)
    "autocast": ("torch.autocast('cpu', dtype=torch.bfloat16).__enter__()", "torch.autocast('cpu', bfloat16) left enabled"),
    "no_grad": ("torch.set_grad_enabled(False)", "gradients disabled"),
    "default_dtype": ("torch.set_default_dtype(torch.float64)", "torch.set_default_dtype(float64) left set"),
}

LEAK_TEST = (
    HELPERS
    + """

def test_1_leaks():
    {leak}


@pytest.mark.amp_regression(**FAST)
def test_2_gated(ampgate):
    before = (torch.is_autocast_enabled("cpu"), torch.is_grad_enabled(), torch.get_default_dtype())
    ampgate.run(tiny())
    assert (torch.is_autocast_enabled("cpu"), torch.is_grad_enabled(), torch.get_default_dtype()) == before, "restored"


def test_3_cleans_up():
    torch.set_autocast_enabled("cpu", False)
    torch.set_grad_enabled(True)
    torch.set_default_dtype(torch.float32)
"""
)


def test_leaked_global_state_is_reset_for_measuring_and_named(pytester):
    """Each module leaks one kind of state in an ungated test; the gated test after it is measured
    from the known state, names the leak, and finds the leak still in place after run()."""
    for name, (leak, _phrase) in LEAKS.items():
        pytester.makepyfile(**{f"test_leak_{name}": LEAK_TEST.replace("{leak}", leak)})
    try:
        result = pytester.runpytest(*UPDATE, "-p", "no:randomly")
    finally:  # an in-process run: never let a leak reach this session
        torch.set_autocast_enabled("cpu", False)
        torch.set_grad_enabled(True)
        torch.set_default_dtype(torch.float32)
    result.assert_outcomes(passed=3 * len(LEAKS))
    out = _assert_clean(result)
    for name, (_leak, phrase) in LEAKS.items():
        line = next((x for x in out.splitlines() if x.startswith(f"LEAKED STATE test_leak_{name}.py::test_2_gated: ")), "")
        assert phrase in line and "global torch state was leaked" in line, (name, out)
        stored = json.loads((pytester.path / "baselines" / f"test_leak_{name}.json").read_text())["tests"]
        (entry,) = stored[f"test_leak_{name}.py::test_2_gated"].values()
        assert entry["modes"]["fp32"].get("low_precision_share", 0.0) == 0.0, "the fp32 reference ran in fp32"
        assert entry["modes"]["amp_bf16"]["low_precision_share"] == 1.0
        assert "leaked_state" not in entry["environment"]


def test_run_wrapped_in_autocast_by_the_test_body_measures_fp32_as_fp32(pytester):
    pytester.makepyfile(
        test_body=HELPERS
        + """

@pytest.mark.amp_regression(**FAST)
def test_gated(ampgate):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = ampgate.run(tiny())
    assert result.mode("fp32").precision_coverage.share == 0.0
"""
    )
    result = pytester.runpytest(*CPU)
    result.assert_outcomes(passed=1)
    assert "torch.autocast('cpu', bfloat16) left enabled" in _assert_clean(result)


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


# --------------------------------------------------------------------------------------------------
# 7. Output paths.
# --------------------------------------------------------------------------------------------------

PASSING_TEST = (
    HELPERS
    + """

@pytest.mark.amp_regression(**FAST)
def test_gated(ampgate):
    ampgate.run(tiny())
    marker = os.environ.get("TURN_INTO_DIRECTORY")
    if marker:
        os.makedirs(marker)
"""
)


def _bad_output(tmp: Path, name: str):
    (tmp / "afile").write_text("x")
    (tmp / "adir").mkdir()
    return {
        "json_is_directory": (("--ampgate-json", str(tmp / "adir")), {}, "--ampgate-json"),
        "markdown_under_a_file": (("--ampgate-markdown", str(tmp / "afile" / "summary.md")), {}, "is a file, not a directory"),
        "plot_is_directory": (("--ampgate-plot", str(tmp / "adir")), {}, "is a directory; give the path of a file"),
        "step_summary_missing_directory": ((), {"GITHUB_STEP_SUMMARY": str(tmp / "missing" / "summary.md")}, "$GITHUB_STEP_SUMMARY="),
    }[name]


@pytest.mark.parametrize("name", ["json_is_directory", "markdown_under_a_file", "plot_is_directory", "step_summary_missing_directory"])
def test_unwritable_output_path_is_a_usage_error_before_measuring(pytester, tmp_path, monkeypatch, name):
    args, env, message = _bad_output(tmp_path, name)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    pytester.makepyfile(test_out=PASSING_TEST)
    result = pytester.runpytest_subprocess(*CPU, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR, _output(result)
    out = _assert_clean(result)
    assert message in out and "ERROR:" in out, out
    assert "ampgate summary" not in out and not (pytester.path / "baselines").exists()


def test_output_that_fails_at_the_end_is_one_line_and_the_others_are_written(pytester, tmp_path):
    report = tmp_path / "out" / "report.json"
    markdown = tmp_path / "out" / "summary.md"
    pytester.makepyfile(test_out=PASSING_TEST)
    os.environ["TURN_INTO_DIRECTORY"] = str(report)  # the test body turns the JSON path into a directory
    try:
        result = pytester.runpytest_subprocess(*CPU, "--ampgate-json", str(report), "--ampgate-markdown", str(markdown))
    finally:
        del os.environ["TURN_INTO_DIRECTORY"]
    assert result.ret == pytest.ExitCode.OK, _output(result)
    out = _assert_clean(result)
    assert re.search(rf"ampgate JSON report NOT written to {re.escape(str(report))}: Is a directory", out), out
    assert markdown.read_text().strip(), "the Markdown summary is still written"
    assert not [p for p in report.parent.iterdir() if p.name.endswith(".tmp")], "no temp file left"


# --------------------------------------------------------------------------------------------------
# 8. Baseline files that are not plain JSON documents.
# --------------------------------------------------------------------------------------------------

GATED_TEST = (
    HELPERS
    + """

@pytest.mark.amp_regression(**FAST)
def test_gated(ampgate):
    ampgate.run(tiny())
"""
)
GATED_ID = "test_gated.py::test_gated"


def _bad_files():
    env = "cpu|elsewhere|torch2"

    def doc(**mode) -> bytes:
        return _baseline_doc({GATED_ID: {env: _entry(0.5, **mode)}})

    where = f"tests['{GATED_ID}']['{env}']['modes']['amp_bf16']"
    return {
        "400_digit_number": (doc(speedup=10**399), f"{where}['speedup'] is a 400-digit number, too large"),
        "400_digit_bytes": (
            doc(peak_memory_bytes=10**399),
            f"{where}['peak_memory_bytes'] is a 400-digit number, but it is a number of bytes",
        ),
        "deep_nesting": (
            b'{"schema": "pytest-ampgate-baselines", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            "nests JSON arrays or objects more than 64 levels deep",
        ),
        "deep_but_parseable": (
            json.dumps({"schema": SCHEMA, "schema_version": 1, "tests": {}, "x": json.loads("[" * 500 + "]" * 500)}).encode(),
            "nests JSON arrays or objects more than 64 levels deep",
        ),
        "negative_accuracy": (
            _baseline_doc({GATED_ID: {env: _entry(-0.3)}}),
            f"tests['{GATED_ID}']['{env}']['modes']['fp32']['accuracy'] is -0.3, but it is a share of correct predictions and must be >= 0 and <= 1",
        ),
        "accuracy_above_one": (
            _baseline_doc({GATED_ID: {env: _entry(32.6)}}),
            "['accuracy'] is 32.6, but it is a share of correct predictions",
        ),
        "negative_speedup": (doc(speedup=-1.5), f"{where}['speedup'] is -1.5, but it is a ratio of step times and must be > 0"),
        "zero_memory_ratio": (doc(memory_ratio=0), f"{where}['memory_ratio'] is 0.0, but it is a ratio of peak memories and must be > 0"),
        "speedup_outside_interval": (
            doc(speedup=1.5, speedup_low=1.6, speedup_high=1.8),
            "the speedup 1.5 lies outside its own interval [1.6, 1.8]",
        ),
    }


def test_bad_baseline_files_are_refused_with_file_key_and_fix(pytester):
    """One module (and one baseline file) per bad input, all in one session: check, then update."""
    cases = _bad_files()
    (pytester.path / "baselines").mkdir()
    for i, (_name, (content, _message)) in enumerate(cases.items()):
        module = f"test_bad{i}"
        pytester.makepyfile(**{module: GATED_TEST})
        (pytester.path / "baselines" / f"{module}.json").write_bytes(
            content.replace(b"test_gated.py::test_gated", f"{module}.py::test_gated".encode())
        )
    before = _hashes(pytester.path / "baselines")
    for args in (CPU, UPDATE):
        result = pytester.runpytest(*args)
        result.assert_outcomes(failed=len(cases))
        out = _assert_clean(result)
        for i, (name, (_content, message)) in enumerate(cases.items()):
            assert re.search(rf"BaselineError: (refusing to update baselines: )?baselines/test_bad{i}.json: ", out), (name, out)
            assert message.replace("test_gated.py::test_gated", f"test_bad{i}.py::test_gated") in out, (name, args, out)
        assert out.count("re-record with pytest --ampgate --ampgate-update") >= len(cases), out
        assert _hashes(pytester.path / "baselines") == before, "every refused file is byte for byte as it was"


def test_utf8_byte_order_mark_is_read_past(pytester):
    pytester.makepyfile(test_gated=GATED_TEST)
    path = pytester.path / "baselines" / "test_gated.json"
    path.parent.mkdir()
    path.write_bytes(b"\xef\xbb\xbf" + _baseline_doc({GATED_ID: {_env_key(): _entry(0.0)}}))
    before = _hashes(path.parent)
    result = pytester.runpytest(*CPU, "-rP")
    result.assert_outcomes(passed=1)
    out = _assert_clean(result)
    assert "fp32 accuracy" in out and "vs baseline 0.000" in out, out  # the stored figures were read
    assert _hashes(path.parent) == before
    updated = pytester.runpytest(*UPDATE)
    updated.assert_outcomes(passed=1)
    assert json.loads(path.read_bytes())["tests"][GATED_ID], "an update rewrites it as plain UTF-8 JSON"


@POSIX
def test_fifo_in_place_of_a_baseline_file_is_refused_without_hanging(pytester):
    pytester.makepyfile(test_gated=GATED_TEST)
    path = pytester.path / "baselines" / "test_gated.json"
    path.parent.mkdir()
    os.mkfifo(path)
    for args in (UPDATE,):  # reads it (lookup) and would write it (commit): both must refuse, not hang
        result = pytester.runpytest_subprocess(*args, timeout=120)
        result.assert_outcomes(failed=1)
        out = _assert_clean(result)
        assert "baselines/test_gated.json: is a FIFO (named pipe), not a regular file; refusing to read it" in out, out
        assert path.is_fifo()


# --------------------------------------------------------------------------------------------------
# 9. Markers and settings.
# --------------------------------------------------------------------------------------------------


def test_class_and_method_markers_merge_closest_wins(pytester):
    pytester.makepyfile(
        test_markers="""
import pytest

pytestmark = pytest.mark.amp_regression(accuracy_tolerance=0.3, rounds=7)


@pytest.mark.amp_regression(min_speedup=3.0, max_memory_ratio=0.5, rounds=8)
class TestBoth:
    @pytest.mark.amp_regression(modes=["amp_bf16"], min_speedup=2.0)
    def test_method(self, ampgate):
        c = ampgate.config
        assert c.modes == ("amp_bf16",) and c.min_speedup == 2.0, "the method's settings"
        assert c.max_memory_ratio == 0.5 and c.rounds == 8, "the class's settings"
        assert c.accuracy_tolerance == 0.3, "the module's settings"


@pytest.mark.amp_regression(min_speedup=1.7)
@pytest.mark.amp_regression(modes=["amp_bf16"], min_speedup=1.9)
def test_twice(ampgate):
    assert ampgate.config.modes == ("amp_bf16",) and ampgate.config.min_speedup == 1.9
"""
    )
    result = pytester.runpytest(*CPU)
    result.assert_outcomes(passed=2)
    _assert_clean(result)


def test_too_few_rounds_never_give_a_decisive_speed_verdict(pytester):
    pytester.makepyfile(
        test_rounds=HELPERS
        + """

@pytest.mark.amp_regression(modes=["amp_bf16"], check_speed=True, min_speedup=1.2, rounds=1, steps_per_block=2,
                            warmup_steps=1, missing_baseline="ignore")
def test_gated(ampgate):
    ampgate.run(tiny("slow", model=lambda: Faulty("slow")))
"""
    )
    result = pytester.runpytest(*CPU, "-rP")
    result.assert_outcomes(passed=1)
    out = _assert_clean(result)
    assert (
        "AMP GATE INCONCLUSIVE" in out and "only 1 round, so the interval covers 0%, not 95%: no verdict; raise rounds to at least 6" in out
    ), out
    strict = pytester.runpytest(*CPU, "--ampgate-strict")
    strict.assert_outcomes(failed=1)


def test_every_requested_mode_unsupported_is_skipped_not_passed(pytester, monkeypatch):
    from pytest_ampgate import modes

    real = modes._cpu_supports
    monkeypatch.setattr(
        modes, "_cpu_supports", lambda dtype, autocast: "no bfloat16 here (simulated)" if dtype == torch.bfloat16 else real(dtype, autocast)
    )
    pytester.makepyfile(test_gated=GATED_TEST)
    result = pytester.runpytest(*UPDATE, "-rs")
    result.assert_outcomes(skipped=1)
    out = _assert_clean(result)
    assert "AMP GATE SKIPPED: no requested precision mode can run here" in out and "no bfloat16 here (simulated)" in out, out
    assert "AMP GATE PASSED" not in out
    assert not (pytester.path / "baselines" / "test_gated.json").exists(), "a skipped gate records nothing"


def test_relative_paths_follow_one_rule_command_line_from_cwd_ini_from_rootdir(pytester, monkeypatch):
    pytester.makeini("[pytest]\nampgate_data_root = ini_data\n")
    pytester.makepyfile(test_gated=GATED_TEST)
    sub = pytester.mkdir("sub")
    monkeypatch.chdir(sub)
    result = pytester.runpytest(
        *UPDATE, "--rootdir", str(pytester.path), "--ampgate-baseline-dir", "cli_baselines", str(pytester.path / "test_gated.py")
    )
    result.assert_outcomes(passed=1)
    assert (sub / "cli_baselines" / "test_gated.json").is_file(), "a command-line path is relative to where pytest was started"
    assert not (pytester.path / "cli_baselines").exists()
    pytester.makeini("[pytest]\nampgate_baseline_dir = ini_baselines\n")
    result = pytester.runpytest(*UPDATE, "--rootdir", str(pytester.path), str(pytester.path / "test_gated.py"))
    result.assert_outcomes(passed=1)
    assert (pytester.path / "ini_baselines" / "test_gated.json").is_file(), "an ini path is relative to the rootdir"


# --------------------------------------------------------------------------------------------------
# 10. SIGTERM.
# --------------------------------------------------------------------------------------------------

SIGTERM_TESTS = (
    HELPERS
    + """

@pytest.mark.amp_regression(**FAST)
def test_one(ampgate):
    ampgate.run(tiny())


@pytest.mark.amp_regression(**FAST)
def test_two(ampgate):
    ampgate.run(tiny())


@pytest.mark.amp_regression(**FAST)
def test_three(ampgate):
    open(os.environ["REACHED"], "w").close()
    time.sleep(300)
    ampgate.run(tiny())
"""
)


def _sigterm_when_reached(tmp_path, env, *args):
    """Run ``pytest --ampgate-update`` in ``tmp_path``, send SIGTERM once it has created ``reached``;
    the finished process and its output (a run SIGTERM did not stop is killed and says so)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", *UPDATE, "-p", "no:xdist", "-p", "no:benchmark", "-p", "no:hypothesispytest", "-q", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    while not (tmp_path / "reached").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    try:
        out = proc.communicate(timeout=120)[0].decode(errors="replace")
    except subprocess.TimeoutExpired:
        proc.kill()
        out = proc.communicate()[0].decode(errors="replace") + "\n[killed: SIGTERM did not stop it]"
    return proc, out


@POSIX
def test_sigterm_keeps_the_finished_tests_results_as_ctrl_c_does(tmp_path):
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_term.py").write_text(SIGTERM_TESTS)
    (tmp_path / "baselines").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_ADDOPTS", "PYTEST_XDIST", "PYTEST_CURRENT"))}
    env.update(OMP_NUM_THREADS="1", REACHED=str(tmp_path / "reached"), PYTHONPATH=os.pathsep.join(sys.path))
    proc, out = _sigterm_when_reached(tmp_path, env)
    assert (tmp_path / "reached").exists(), out
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, out
    assert "the run was interrupted: baselines were recorded for the tests that finished only" in out, out
    assert "SIGTERM received" in out, out
    assert "Traceback" not in out and not INTERNAL_FRAME.search(out), out
    stored = json.loads((tmp_path / "baselines" / "test_term.json").read_text())["tests"]
    assert sorted(stored) == ["test_term.py::test_one", "test_term.py::test_two"], stored
    assert not list((tmp_path / "baselines").glob(".*.tmp"))


@POSIX
def test_sigterm_while_baselines_are_written_leaves_the_old_file_whole(tmp_path):
    """The fault points of test_faults.py: the writer stalls half-way through its temp file."""
    from test_faults import FAULT_CONFTEST, RACE_TESTS

    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "conftest.py").write_text(FAULT_CONFTEST)
    (tmp_path / "test_race.py").write_text(RACE_TESTS)
    (tmp_path / "baselines").mkdir()
    old = _baseline_doc({"test_race.py::test_zero": {"cpu|elsewhere|torch2": _entry(0.8)}})
    (tmp_path / "baselines" / "test_race.json").write_bytes(old)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_ADDOPTS", "PYTEST_XDIST", "PYTEST_CURRENT"))}
    env.update(
        OMP_NUM_THREADS="1",
        AMPGATE_FAULT="mid-write",
        AMPGATE_FAULT_MARK=str(tmp_path / "reached"),
        PYTHONPATH=os.pathsep.join(sys.path),
        PYTEST_AMPGATE_LOCK_DIR=str(tmp_path / "locks"),
    )
    proc, out = _sigterm_when_reached(tmp_path, env, "-k", "test_one")
    assert (tmp_path / "reached").exists(), out
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, out
    assert "baselines NOT fully written: interrupted while writing them" in out, out
    assert "Traceback" not in out and not INTERNAL_FRAME.search(out), out
    assert (tmp_path / "baselines" / "test_race.json").read_bytes() == old, "the old file, byte for byte"
    assert not list((tmp_path / "baselines").glob(".*.tmp")), list((tmp_path / "baselines").iterdir())
