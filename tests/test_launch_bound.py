"""Launch-bound steps: the probe's diagnosis, the plain statement that AMP cannot beat the host, and a launch-bound
step never excusing a regression against the same machine's baseline (fake CUDA timing)."""

from __future__ import annotations

import dataclasses

import pytest
from engine_helpers import TINY, tiny_workload
from fakes import FakeTimer, as_if_on_cuda
from session_helpers import CPU, HELPERS
from test_bad_input_and_faults import _assert_clean

from pytest_ampgate.config import build_config
from pytest_ampgate.gate import evaluate
from pytest_ampgate.measurement import measure
from pytest_ampgate.timing import launch_bound
from pytest_ampgate.verdict import FAIL, PASS, SKIPPED

LAUNCH_BOUND = {"fp32": (200e-6, 190e-6, 30e-6), "amp_bf16": (260e-6, 250e-6, 12e-6)}
GPU_BOUND = {"fp32": (2e-3, 0.2e-3, 1.9e-3), "amp_bf16": (2.6e-3, 0.3e-3, 2.5e-3)}


def test_host_and_device_time_are_recorded_per_block():
    m = measure(tiny_workload(), ["amp_bf16"], device="cpu", config=TINY, timer=FakeTimer(LAUNCH_BOUND))
    assert m.reference.step_times_s == [pytest.approx(200e-6)] * 4
    assert m.reference.host_times_s == [pytest.approx(190e-6)] * 4
    assert m.reference.busy_step_s == pytest.approx(30e-6)
    bound = launch_bound(m.reference)
    assert bound.bound and bound.idle_share == pytest.approx(0.85)


def test_launch_bound_reference_is_a_plain_statement_not_a_fail():
    m = as_if_on_cuda(measure(tiny_workload(), ["amp_bf16"], device="cpu", config=TINY, timer=FakeTimer(LAUNCH_BOUND)))
    verdict = evaluate(m, build_config(("test", {"modes": ["amp_bf16"], "missing_baseline": "ignore"})))
    speed = next(c for c in verdict.checks if c.metric == "speedup")
    assert speed.outcome == SKIPPED, speed.why
    assert "launch-bound" in speed.why and "0.03 ms of each 0.2 ms step" in speed.why and "0.19 ms to launch" in speed.why
    assert "larger batch" in speed.why and "CUDA graphs or torch.compile" in speed.why and "check_speed=True" in speed.why
    assert verdict.outcome != FAIL


DECISIVE = dataclasses.replace(TINY, rounds=6)
"""Enough rounds for a decisive speed verdict (stats.MIN_ROUNDS_FOR_CONFIDENCE); fewer are INCONCLUSIVE."""


def test_check_speed_true_forces_the_gate_on_a_launch_bound_step():
    m = as_if_on_cuda(measure(tiny_workload(), ["amp_bf16"], device="cpu", config=DECISIVE, timer=FakeTimer(LAUNCH_BOUND)))
    verdict = evaluate(m, build_config(("test", {"modes": ["amp_bf16"], "check_speed": True, "missing_baseline": "ignore"})))
    speed = next(c for c in verdict.checks if c.metric == "speedup")
    assert speed.outcome == FAIL and "launch-bound" in speed.why


def test_a_gpu_bound_regression_still_fails():
    m = as_if_on_cuda(measure(tiny_workload(), ["amp_bf16"], device="cpu", config=DECISIVE, timer=FakeTimer(GPU_BOUND)))
    assert not launch_bound(m.reference).bound
    verdict = evaluate(m, build_config(("test", {"modes": ["amp_bf16"], "missing_baseline": "ignore"})))
    assert next(c for c in verdict.checks if c.metric == "speedup").outcome == FAIL


def test_a_mode_whose_own_launch_time_rules_out_the_floor_is_stated_not_failed():
    """fp32 mostly busy (10% idle), but amp_bf16's host launch time alone caps it at 0.8x: the 1.2x floor is out of reach."""
    timings = {"fp32": (200e-6, 150e-6, 180e-6), "amp_bf16": (260e-6, 250e-6, 60e-6)}
    m = as_if_on_cuda(measure(tiny_workload(), ["amp_bf16"], device="cpu", config=TINY, timer=FakeTimer(timings)))
    assert not launch_bound(m.reference).bound
    speed = next(c for c in evaluate(m, build_config(("test", {"modes": ["amp_bf16"]}))).checks if c.metric == "speedup")
    assert speed.outcome == SKIPPED and "at most 0.80x faster than fp32's 0.2 ms step" in speed.why, speed.why


# --- launch-bound never excuses a regression against the same machine's baseline (issue 20, point 4) -------

# MNIST-like on an H100: the host launches slower than the device works, AMP slower than fp32 (0.77x).
# (device time per step, host time per step in the timed rounds, device busy time per step, host launch time in the probe)
HEALTHY = {"fp32": (200e-6, 190e-6, 30e-6, 180e-6), "amp_bf16": (260e-6, 250e-6, 12e-6, 240e-6)}
SLOWED = {**HEALTHY, "amp_bf16": (520e-6, 510e-6, 24e-6, 500e-6)}  # the AMP step 2x slower, as a new host sync would


def _launch_bound_verdict(per_mode, baseline_from_run=None, **settings):
    from engine_helpers import tiny_workload
    from fakes import FakeTimer, as_if_on_cuda

    from pytest_ampgate.config import build_config
    from pytest_ampgate.gate import baseline_from, evaluate
    from pytest_ampgate.measurement import measure

    m = as_if_on_cuda(measure(tiny_workload(), ["amp_bf16"], device="cpu", config=DECISIVE, timer=FakeTimer(per_mode)))
    config = build_config(("test", {"modes": ["amp_bf16"], "missing_baseline": "ignore", **settings}))
    baseline = baseline_from(baseline_from_run, "t.py::t", "cuda|H100", {}) if baseline_from_run is not None else None
    verdict = evaluate(m, config, baseline)
    return m, next(c for c in verdict.checks if c.metric == "speedup")


def test_launch_bound_amp_slowed_2x_against_its_stored_baseline_fails():
    from engine_helpers import tiny_workload
    from fakes import FakeTimer, as_if_on_cuda

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
    from engine_helpers import tiny_workload
    from fakes import FakeTimer, as_if_on_cuda

    from pytest_ampgate.measurement import measure

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
