"""A gated test that gated nothing says so: no device, every requested mode unsupported, run() never called;
--ampgate-strict (and --ampgate-update) turn that into a failure naming why."""

from __future__ import annotations

import json
import re

import pytest
import torch
from session_helpers import CPU, HELPERS
from test_bad_input_and_faults import INTERNAL_FRAME, _assert_clean, _output, _quiet_and_isolated  # noqa: F401

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


# --- 9. a gate that gated nothing says so, and fails under strict or update ------------------------------

GATED = """
import pytest
import torch
from torch import nn

from pytest_ampgate import Workload


def workload():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 8, generator=g)
    y = (x[:, 0] > 0).long()
    return Workload("tiny", lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)), (x, y, x[:32], y[:32]),
                    nn.CrossEntropyLoss(), lambda p: torch.optim.SGD(p, lr=0.1), batch_size=16)


@pytest.mark.amp_regression(modes=["amp_bf16"], rounds=2, steps_per_block=2, warmup_steps=1, missing_baseline="ignore")
def test_gated(ampgate):
    ampgate.run(workload())


@pytest.mark.amp_regression
def test_builtin(ampgate_mnist):
    pass


def test_plain():
    pass
"""

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the run without a CUDA device")


@pytest.fixture
def gated_project(pytester, monkeypatch, tmp_path):
    monkeypatch.setenv("PYTEST_AMPGATE_LOCK_DIR", str(tmp_path / "locks"))
    pytester.makepyfile(test_user=GATED)
    return pytester


@no_cuda
def test_without_the_device_the_summary_says_why_gated_tests_were_skipped(gated_project):
    result = gated_project.runpytest("--ampgate", "-p", "no:cacheprovider")
    assert result.ret == 0
    result.assert_outcomes(passed=1, skipped=2)
    result.stdout.fnmatch_lines(["*ampgate: 2 gated tests skipped on cuda: no CUDA device available*"])


@no_cuda
@pytest.mark.parametrize("flag", ["--ampgate-strict", "--ampgate-update"])
def test_strict_or_update_without_the_device_fails_naming_it(gated_project, flag):
    result = gated_project.runpytest("--ampgate", flag, "-p", "no:cacheprovider")
    assert result.ret == 1
    result.stdout.fnmatch_lines([f"*NOTHING GATED: 2 gated tests could not run on cuda: no CUDA device available*{flag} needs the device*"])
    assert not (gated_project.path / "baselines").exists()


def test_plain_run_without_ampgate_says_nothing_about_devices(gated_project):
    result = gated_project.runpytest("-p", "no:cacheprovider")
    assert result.ret == 0 and "NOTHING GATED" not in result.stdout.str() and "skipped on" not in result.stdout.str()


def test_json_report_of_a_cpu_run_carries_peak_memory_its_ratio_and_what_it_covers(gated_project):

    import jsonschema

    from pytest_ampgate.outputs.json_schema import SCHEMA

    result = gated_project.runpytest(
        "--ampgate", "--ampgate-device", "cpu", "-p", "no:cacheprovider", "--ampgate-json", "r.json", "-k", "test_gated"
    )
    result.assert_outcomes(passed=1)
    report = json.loads((gated_project.path / "r.json").read_text())
    jsonschema.validate(report, SCHEMA)
    modes = {m["mode"]: m for m in report["tests"][0]["modes"]}
    for name in ("fp32", "amp_bf16"):
        m = modes[name]
        assert m["peak_memory_bytes"] > 0 and m["memory_ratio"] > 0
        assert 0 < m["activation_memory_bytes"] < m["peak_memory_bytes"] == m["memory"]["peak_bytes"]
        assert m["memory"]["parameter_bytes"] == (8 * 16 + 16 + 16 * 2 + 2) * 4
        assert "parameters" in m["memory"]["covers"] and "optimizer state" in m["memory"]["covers"]
        assert m["launch"]["host_step_s"] > 0 and m["launch"]["launch_bound"] is None  # no launch queue on the CPU
    assert modes["fp32"]["memory_ratio"] == 1.0


UNSUPPORTED_ONLY = (
    HELPERS
    + """

@pytest.mark.amp_regression(**dict(FAST, modes=["tf32"]))
def test_gated(ampgate):
    ampgate.run(tiny())
"""
)


def test_only_unsupported_modes_skip_with_the_reason_and_fail_under_strict(pytester):
    pytester.makepyfile(test_gated=UNSUPPORTED_ONLY)
    plain = pytester.runpytest(*CPU, "-rs")
    plain.assert_outcomes(skipped=1)
    out = _assert_clean(plain)
    assert "no requested precision mode can run here" in out and "tf32 exists only on NVIDIA GPUs" in out, out

    strict = pytester.runpytest(*CPU, "--ampgate-strict")
    strict.assert_outcomes(failed=1)
    assert strict.ret != 0
    out = _assert_clean(strict)
    assert "tf32 exists only on NVIDIA GPUs" in out, out
    assert "--ampgate-strict fails a gated test that gated nothing" in out, out
