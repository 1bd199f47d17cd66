"""Measuring from a known global state: what a test leaked (autocast, grad mode, default dtype, TF32, anomaly
detection, ...) is reset for the measurement and named, never blamed on AMP."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from session_helpers import CPU, HELPERS, UPDATE
from test_bad_input_and_faults import INTERNAL_FRAME, _assert_clean, _output, _quiet_and_isolated  # noqa: F401

# --------------------------------------------------------------------------------------------------
# 4. Known global state.
# --------------------------------------------------------------------------------------------------

LEAKS = {
    # name: (code run by an earlier, ungated test and left in place; the phrase that names it)
    "autocast": (
        "global LEAKED; LEAKED = torch.autocast('cpu', dtype=torch.bfloat16); LEAKED.__enter__()",
        "torch.autocast('cpu', bfloat16) left enabled",
    ),
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
    leaked = globals().get("LEAKED")
    if leaked is not None:  # exit it properly: autocast's nesting count and weight-cast cache are process-wide
        leaked.__exit__(None, None, None)
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


LEAK_TESTS = (
    HELPERS
    + """

KEEP = []
FAST6 = {**FAST, "rounds": 6}


@pytest.mark.amp_regression(**FAST6)
def test_clean(ampgate):
    ampgate.run(tiny())


@pytest.mark.amp_regression(**FAST6)
def test_wrapped_in_bf16_autocast(ampgate):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ampgate.run(tiny())


def test_leaves_fp16_autocast_open():
    region = torch.autocast("cpu", dtype=torch.float16)
    region.__enter__()
    KEEP.append(region)


@pytest.mark.amp_regression(**FAST6)
def test_after_open_autocast(ampgate):
    ampgate.run(tiny())


def test_leaves_inference_mode_on():
    KEEP.pop().__exit__(None, None, None)
    region = torch.inference_mode()
    region.__enter__()
    KEEP.append(region)


@pytest.mark.amp_regression(**FAST6)
def test_data_made_under_leaked_inference_mode(ampgate):
    ampgate.run(tiny())  # tiny() builds its tensors here, in inference mode


def test_closes_inference_mode_and_leaves_anomaly_detection_on():
    KEEP.pop().__exit__(None, None, None)
    torch.autograd.set_detect_anomaly(True)


@pytest.mark.amp_regression(**FAST6)
def test_after_anomaly_detection(ampgate):
    ampgate.run(tiny())
    assert torch.is_anomaly_enabled(), "the caller's state is restored"
    torch.autograd.set_detect_anomaly(False)
"""
)


def test_leaked_autocast_and_inference_mode_do_not_change_what_is_measured_or_recorded(pytester):
    pytester.makepyfile(test_leaks=LEAK_TESTS)
    result = pytester.runpytest(*UPDATE)
    result.assert_outcomes(passed=8)
    out = _assert_clean(result)
    assert "LEAKED STATE test_leaks.py::test_after_open_autocast" in out and "autocast('cpu', float16)" in out, out
    assert "LEAKED STATE test_leaks.py::test_data_made_under_leaked_inference_mode" in out, out
    assert "LEAKED STATE test_leaks.py::test_after_anomaly_detection" in out and "set_detect_anomaly(True)" in out, out
    stored = json.loads((pytester.path / "baselines" / "test_leaks.json").read_text())["tests"]
    clean = next(iter(stored["test_leaks.py::test_clean"].values()))["modes"]
    for name in (
        "test_wrapped_in_bf16_autocast",
        "test_after_open_autocast",
        "test_data_made_under_leaked_inference_mode",
        "test_after_anomaly_detection",
    ):
        modes = next(iter(stored[f"test_leaks.py::{name}"].values()))["modes"]
        for mode in ("fp32", "amp_bf16"):  # same model, data and seed: the same training, whatever was leaked
            assert modes[mode]["accuracy"] == clean[mode]["accuracy"], (name, mode, modes, clean)
            assert modes[mode]["final_loss"] == pytest.approx(clean[mode]["final_loss"], rel=1e-6), (name, mode)
    assert torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")


def test_a_model_instance_as_model_factory_is_named(pytester):
    pytester.makepyfile(
        test_inst=HELPERS
        + """

@pytest.mark.amp_regression(**FAST)
def test_instance(ampgate):
    ampgate.run(tiny(model=nn.Linear(8, 2)))
"""
    )
    result = pytester.runpytest(*CPU)
    result.assert_outcomes(failed=1)
    out = _assert_clean(result)
    assert "model_factory is a model instance (Linear), not a factory" in out, out
    assert "forward()" not in out, out


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX path limits and symlinks")
def test_paths_the_os_refuses_are_usage_errors_before_measuring(pytester, monkeypatch):
    pytester.makepyfile(
        test_paths=HELPERS
        + """

@pytest.mark.amp_regression(**FAST)
def test_gated(ampgate):
    open("measured", "w").close()
    ampgate.run(tiny())
"""
    )
    os.symlink("loop_b", pytester.path / "loop_a")
    os.symlink("loop_a", pytester.path / "loop_b")
    (pytester.path / "a_file").write_text("x")
    long_name = "n" * 300
    cases = {
        ("--ampgate-json", f"{long_name}.json"): "File name too long",
        ("--ampgate-markdown", "loop_a"): "Too many levels of symbolic links",
        ("--ampgate-plot", f"{long_name}/chart.png"): "File name too long",
        ("--ampgate-baseline-dir", "a_file"): "a_file: is a file, not a directory",
        ("--ampgate-baseline-dir", "a_file/sub"): "a_file is a file, not a directory",
        ("--ampgate-baseline-dir", long_name): "File name too long",
    }
    for (option, value), says in cases.items():
        for mode in (CPU, UPDATE):
            result = pytester.runpytest(*mode, option, value)
            assert result.ret == pytest.ExitCode.USAGE_ERROR, (option, value, _output(result))
            out = _assert_clean(result)
            assert option.lstrip("-") in out or "baseline directory" in out, out
            assert says in out, (option, value, out)
            assert not (pytester.path / "measured").exists(), "refused before measuring"
    assert (pytester.path / "a_file").read_text() == "x"

    monkeypatch.setenv("HOME", str(pytester.path / "home"))  # "~" means the home directory, as for --junitxml
    (pytester.path / "home").mkdir()
    result = pytester.runpytest(*CPU, "--ampgate-json", "~/reports/gate.json")
    result.assert_outcomes(passed=1)
    _assert_clean(result)
    assert json.loads((pytester.path / "home" / "reports" / "gate.json").read_text())
    assert not (pytester.path / "~").exists()
