"""Baselines from several runs, and comparisons that count the baseline's own uncertainty (issue 21, point 1).

Timing comes from the fake CUDA-like timer of test_per_mode_baseline_gates (the hardware boundary);
everything else is a real CPU measurement.
"""

from __future__ import annotations

import dataclasses

from test_launch_bound import DECISIVE
from test_per_mode_baseline_gates import HEALTHY, _checks, _run

from pytest_ampgate.config import build_config
from pytest_ampgate.gate import baseline_from, evaluate, record
from pytest_ampgate.pooling import pooled
from pytest_ampgate.verdict import FAIL, INCONCLUSIVE

AMP_SLOWER = {"fp32": HEALTHY["fp32"], "amp_bf16": tuple(x * 1.15 for x in HEALTHY["amp_bf16"])}
"""amp_bf16 15% slower: its speedup falls from 1.30x to 1.13x, below a 10% tolerance's floor (1.17x)."""
EVERY_MODE_SLOWER = {mode: tuple(x * 1.3 for x in times) for mode, times in HEALTHY.items()}
"""Every mode 30% slower: beyond a 25% step-time tolerance."""


def _config(**settings):
    return build_config(("test", {"modes": ["amp_bf16"], "missing_baseline": "ignore", "min_speedup": 1.0, **settings}))


def test_pooled_joins_every_timed_round_and_keeps_the_first_runs_other_figures():
    a, b = _run(HEALTHY), _run(AMP_SLOWER)
    both = pooled([a, b])
    assert both.reference.step_times_s == a.reference.step_times_s + b.reference.step_times_s
    assert (
        both.comparisons["amp_bf16"].speedup.samples
        == a.comparisons["amp_bf16"].speedup.samples + b.comparisons["amp_bf16"].speedup.samples
    )
    assert both.comparisons["amp_bf16"].speedup.rounds == 2 * DECISIVE.rounds
    assert both.modes["amp_bf16"].losses == a.modes["amp_bf16"].losses  # not timing: the first run's
    assert both.modes["amp_bf16"].peak_memory_bytes == a.modes["amp_bf16"].peak_memory_bytes
    assert pooled([a]) is a


def test_a_mode_that_failed_in_one_run_keeps_the_first_runs_rounds():
    a, b = _run(HEALTHY), _run(HEALTHY)
    b.modes["amp_bf16"] = dataclasses.replace(b.modes["amp_bf16"], error="RuntimeError: boom", step_times_s=[])
    b.comparisons["amp_bf16"] = dataclasses.replace(b.comparisons["amp_bf16"], speedup=None)
    both = pooled([a, b])
    assert both.modes["amp_bf16"].step_times_s == a.modes["amp_bf16"].step_times_s
    assert both.comparisons["amp_bf16"].speedup == a.comparisons["amp_bf16"].speedup


def test_record_pools_baseline_runs_measurements_where_timing_is_gated_and_measures_once_elsewhere():
    calls = []

    def once():
        calls.append(1)
        return _run(HEALTHY)

    recorded = record(once, _config(baseline_runs=3))
    assert len(calls) == 3 and len(recorded.reference.step_times_s) == 3 * DECISIVE.rounds
    calls.clear()
    record(once, _config(baseline_runs=3, check_speed=False))
    assert len(calls) == 1  # nothing timed is gated: more runs would buy nothing


def test_record_stops_after_a_run_in_which_a_mode_failed():
    calls = []

    def once():
        calls.append(1)
        m = _run(HEALTHY)
        m.modes["amp_bf16"] = dataclasses.replace(m.modes["amp_bf16"], error="RuntimeError: boom")
        return m

    record(once, _config(baseline_runs=3))
    assert len(calls) == 1


def _baseline(**intervals):
    """A baseline of the healthy run, with each mode's stored interval replaced where given."""
    base = baseline_from(_run(HEALTHY), "t.py::t", "cuda|H100", {})
    for mode, fields in intervals.items():
        base.modes[mode] = dataclasses.replace(base.modes[mode], **fields)
    return base


def test_a_speedup_below_the_floor_fails_an_exact_baseline_but_not_one_whose_own_interval_reaches_it():
    run = _run(AMP_SLOWER)
    exact = _checks(evaluate(run, _config(), _baseline()), "speedup")["amp_bf16"]
    assert exact.outcome == FAIL, exact.why
    base = _baseline()
    stored = base.modes["amp_bf16"].speedup
    wide = _baseline(amp_bf16={"speedup_low": stored - 0.2, "speedup_high": stored + 0.2})
    check = _checks(evaluate(run, _config(), wide), "speedup")["amp_bf16"]
    assert check.outcome == INCONCLUSIVE, check.why
    assert "with the baseline's own interval" in check.why and "straddles floor" in check.why


def test_a_step_time_beyond_the_limit_fails_an_exact_baseline_but_not_one_whose_own_interval_reaches_it():
    run = _run(EVERY_MODE_SLOWER)
    exact = _checks(evaluate(run, _config(step_time_tolerance=0.25), _baseline()), "step_time")["fp32"]
    assert exact.outcome == FAIL, exact.why
    stored = _baseline().modes["fp32"].step_time_s
    wide = _baseline(fp32={"step_time_low": stored * 0.75, "step_time_high": stored * 1.25})
    check = _checks(evaluate(run, _config(step_time_tolerance=0.25), wide), "step_time")["fp32"]
    assert check.outcome == INCONCLUSIVE and "with the baseline's own interval" in check.why, check.why


def test_the_step_time_tolerance_defaults_by_device_from_the_measured_spread():
    from pytest_ampgate.config import STEP_TIME_TOLERANCE, GateConfig

    assert GateConfig().step_time_tolerance_on("cpu") == STEP_TIME_TOLERANCE["cpu"] > STEP_TIME_TOLERANCE["cuda"]
    assert GateConfig().step_time_tolerance_on("cuda") == STEP_TIME_TOLERANCE["cuda"]
    assert GateConfig(step_time_tolerance=0.1).step_time_tolerance_on("cpu") == 0.1
