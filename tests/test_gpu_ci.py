"""The gate where GPU CI really runs (issue 20): a runner lacking every requested mode under --ampgate-strict,
and launch-bound workloads that must never excuse a regression."""

from __future__ import annotations

import pytest
from test_reliability import CPU, HELPERS, _assert_clean

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


# --- launch-bound never excuses a regression against the same machine's baseline (issue 20, point 4) -------

# MNIST-like on an H100: the host launches slower than the device works, AMP slower than fp32 (0.77x).
# (device time per step, host time per step in the timed rounds, device busy time per step, host launch time in the probe)
HEALTHY = {"fp32": (200e-6, 190e-6, 30e-6, 180e-6), "amp_bf16": (260e-6, 250e-6, 12e-6, 240e-6)}
SLOWED = {**HEALTHY, "amp_bf16": (520e-6, 510e-6, 24e-6, 500e-6)}  # the AMP step 2x slower, as a new host sync would


def _launch_bound_verdict(per_mode, baseline_from_run=None, **settings):
    from test_gpu_verdicts import DECISIVE, FakeTimer, as_if_on_cuda, tiny_workload

    from pytest_ampgate.config import build_config
    from pytest_ampgate.gate import baseline_from, evaluate
    from pytest_ampgate.measurement import measure

    m = as_if_on_cuda(measure(tiny_workload(), ["amp_bf16"], device="cpu", config=DECISIVE, timer=FakeTimer(per_mode)))
    config = build_config(("test", {"modes": ["amp_bf16"], "missing_baseline": "ignore", **settings}))
    baseline = baseline_from(baseline_from_run, "t.py::t", "cuda|H100", {}) if baseline_from_run is not None else None
    verdict = evaluate(m, config, baseline)
    return m, next(c for c in verdict.checks if c.metric == "speedup")


def test_launch_bound_amp_slowed_2x_against_its_stored_baseline_fails():
    from test_gpu_verdicts import DECISIVE, FakeTimer, as_if_on_cuda, tiny_workload

    from pytest_ampgate.measurement import measure
    from pytest_ampgate.timing import launch_bound
    from pytest_ampgate.verdict import FAIL

    recorded = as_if_on_cuda(measure(tiny_workload(), ["amp_bf16"], device="cpu", config=DECISIVE, timer=FakeTimer(HEALTHY)))
    m, speed = _launch_bound_verdict(SLOWED, recorded)
    assert launch_bound(m.reference).bound
    assert speed.outcome == FAIL, speed.why
    assert "baseline 0.77x" in speed.why and "< floor 0.69x" in speed.why, speed.why
    assert "margin 1.20x against fp32 not gated" in speed.why and "launch-bound" in speed.why, speed.why


def test_healthy_launch_bound_run_passes_against_its_baseline_with_the_plain_statement():
    from test_gpu_verdicts import DECISIVE, FakeTimer, as_if_on_cuda, tiny_workload

    from pytest_ampgate.measurement import measure
    from pytest_ampgate.verdict import PASS

    recorded = as_if_on_cuda(measure(tiny_workload(), ["amp_bf16"], device="cpu", config=DECISIVE, timer=FakeTimer(HEALTHY)))
    _m, speed = _launch_bound_verdict(HEALTHY, recorded)
    assert speed.outcome == PASS, speed.why
    assert "AMP cannot pay off at this size" in speed.why and "0.18 ms to launch" in speed.why, speed.why
    assert speed.threshold == pytest.approx(0.77 * 0.9, rel=0.01)


def test_launch_bound_without_a_baseline_says_what_it_could_not_gate():
    from pytest_ampgate.verdict import SKIPPED

    _m, speed = _launch_bound_verdict(HEALTHY)
    assert speed.outcome == SKIPPED and "no stored baseline to gate it against" in speed.why, speed.why


def test_launch_diagnosis_uses_the_probe_not_the_timed_host_time():
    """A host-side regression (the host blocking on a full queue, a new .item()) swells the timed rounds'
    host time; the probe, with the device held busy, measures the launch cost alone and excuses nothing."""
    from pytest_ampgate.verdict import FAIL

    gpu_bound = {"fp32": (2e-3, 0.2e-3, 1.9e-3, 0.2e-3), "amp_bf16": (2.6e-3, 2.55e-3, 2.5e-3, 0.3e-3)}
    _m, speed = _launch_bound_verdict(gpu_bound)
    assert speed.outcome == FAIL and "launch-bound" not in speed.why, speed.why


def test_strict_summary_lists_every_skipped_speed_check(pytester):
    pytester.makepyfile(
        test_gated=HELPERS
        + """

@pytest.mark.amp_regression(**FAST)
def test_gated(ampgate):
    ampgate.run(tiny())
"""
    )
    plain = pytester.runpytest(*CPU)
    plain.assert_outcomes(passed=1)
    assert "SKIPPED SPEED CHECK" not in _assert_clean(plain)
    strict = pytester.runpytest(*CPU, "--ampgate-strict")
    strict.assert_outcomes(passed=1)
    out = _assert_clean(strict)
    assert "SKIPPED SPEED CHECK test_gated.py::test_gated: amp_bf16 speedup not gated on cpu" in out, out
