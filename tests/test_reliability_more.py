"""Reliability re-run by an outside tester: new cases of the same root causes, end to end.

4. A leaked (or enclosing) ``torch.autocast`` region kept autocast's weight-cast cache alive across
   optimizer steps, so an AMP mode trained on stale weights and that accuracy was recorded as its
   baseline; data built under a leaked ``torch.inference_mode()`` failed the fp32 reference;
   leaked anomaly detection (which turns the inf/NaN gradients GradScaler skips into errors) was
   neither reset nor named.
6. A model instance given as ``model_factory`` (callable: calling it ran ``forward()``).
7. Output and baseline paths the OS refuses (a name too long, a symlink loop), ``~``, and a
   baseline directory that is a file: usage errors at start-up, not INTERNALERROR or a failure per test.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from test_reliability import (  # noqa: F401  (same set-up)
    CPU,
    HELPERS,
    UPDATE,
    _assert_clean,
    _hashes,
    _output,
    _quiet_and_isolated,
)

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
