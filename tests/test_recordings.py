"""A baseline pooled from several --ampgate-update recordings (issue 21, point 1): each a fresh process.

One process's offset is what the rounds inside it cannot show, so a baseline recorded once can land
high (failing healthy runs) or low (hiding regressions).  Timing comes from a fake CUDA-like timer
(the hardware boundary); the pooling, the file round trip and the plugin's update are real.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from session_helpers import CPU, HELPERS, UPDATE
from test_bad_input_and_faults import _assert_clean, _quiet_and_isolated  # noqa: F401
from test_per_mode_baseline_gates import HEALTHY, _checks, _run

from pytest_ampgate.baseline_checks import recordings_checks
from pytest_ampgate.baseline_schema import Baseline, ModeBaseline, Recording
from pytest_ampgate.config import build_config
from pytest_ampgate.errors import BaselineError
from pytest_ampgate.gate import baseline_from, evaluate
from pytest_ampgate.judging import Judging
from pytest_ampgate.recordings import joined, pooled_baseline, recording_of
from pytest_ampgate.verdict import FAIL, INCONCLUSIVE, PASS

SETTINGS = {"workload": "tiny", "batch_size": 16, "measure": {"rounds": 12}, "config": {"speedup_tolerance": None}}


def _baseline(speedup, step=1e-3, *, spread=0.01, at="2026-01-01T00:00:00+00:00", settings=SETTINGS, memory=1000):
    amp = ModeBaseline(
        speedup=speedup,
        speedup_low=speedup * (1 - spread),
        speedup_high=speedup * (1 + spread),
        step_time_s=step,
        step_time_low=step * 0.99,
        step_time_high=step * 1.01,
        peak_memory_bytes=memory,
    )
    return Baseline("t.py::t", "cuda|H100", {"device_name": "H100"}, at, settings, {"amp_bf16": amp})


def _join(previous, newest, keep=5, **tolerances):
    """As a CUDA update joins it: 10% speedup and 25% step-time tolerance unless given."""
    config = build_config(("test", {"baseline_recordings": keep, "confidence": 0.95, **tolerances}))
    return joined(previous, newest, config, "cuda")


def _record(*speedups, keep=5):
    stored, how = None, ""
    for i, s in enumerate(speedups):
        stored, how = _join(stored, _baseline(s, at=f"2026-01-0{i + 1}T00:00:00+00:00", memory=1000 + i), keep=keep)
    return stored, how


def test_each_update_adds_a_recording_and_the_stored_timing_is_their_median_with_the_spread_as_its_interval():
    stored, how = _record(1.30, 1.42, 1.28)
    amp = stored.modes["amp_bf16"]
    assert amp.speedup == pytest.approx(1.30) and amp.recordings == 3, "the median, not the newest or the mean"
    assert (amp.speedup_low, amp.speedup_high) == pytest.approx((1.28, 1.42)), "three recordings: the median's interval is their range"
    assert amp.peak_memory_bytes == 1002, "what does not move between processes is the newest recording's"
    assert [r.recorded_at[:10] for r in stored.recordings] == ["2026-01-01", "2026-01-02", "2026-01-03"]
    assert "pooled with 2 earlier recording(s), up to 5" in how


def test_only_the_last_baseline_recordings_are_kept_and_one_keeps_the_old_replace_behaviour():
    stored, _ = _record(1.30, 1.31, 1.32, 1.33, keep=3)
    assert [r.modes["amp_bf16"].speedup for r in stored.recordings] == [1.31, 1.32, 1.33]
    assert stored.modes["amp_bf16"].speedup == pytest.approx(1.32)
    alone, how = _record(1.30, 1.35, keep=1)
    assert alone.modes["amp_bf16"].speedup == 1.35 and alone.modes["amp_bf16"].recordings is None and len(alone.recordings) == 1
    assert "replaces" in how


def test_a_recording_beyond_the_tolerance_of_what_the_recordings_span_starts_the_baseline_afresh():
    stored, _ = _record(1.30, 1.32, 1.28)
    accepted, how = _join(stored, _baseline(0.95))  # the user accepts a change: AMP now gains less
    assert accepted.modes["amp_bf16"].speedup == 0.95 and len(accepted.recordings) == 1
    assert "amp_bf16 speedup 0.95x lies beyond the stored 1.30x [1.28-1.32x] by more than its tolerance (10%)" in how, how
    assert "3 earlier recording(s) measured other code or another machine, so this one starts afresh" in how
    faster, how = _join(stored, _baseline(1.60))  # improved beyond tolerance: pooling would hide the next regression
    assert len(faster.recordings) == 1 and "1.60x lies beyond" in how
    within, _ = _join(stored, _baseline(1.17))  # 1.28 * 0.9 = 1.152: within tolerance of the range, so pooled
    assert len(within.recordings) == 4


def test_other_settings_start_afresh_but_a_changed_margin_or_tolerance_does_not():
    stored, _ = _record(1.30, 1.31)
    other_protocol = {**SETTINGS, "measure": {"rounds": 24}}
    restarted, how = _join(stored, _baseline(1.30, settings=other_protocol))
    assert len(restarted.recordings) == 1 and "other settings" in how
    same_measurement = {**SETTINGS, "config": {"speedup_tolerance": 0.2}}
    pooled, _ = _join(stored, _baseline(1.30, settings=same_measurement))
    assert len(pooled.recordings) == 3


def test_a_file_from_before_recordings_were_kept_counts_as_one_recording_and_entries_round_trip():
    old = _baseline(1.30)  # no recordings: as read from an older file
    stored, _ = _join(old, _baseline(1.34))
    assert len(stored.recordings) == 2 and stored.modes["amp_bf16"].speedup == pytest.approx(1.32)
    entry = json.loads(json.dumps(stored.to_entry()))
    assert Baseline.from_entry(stored.test_id, stored.env_key, entry, "here") == stored
    entry["recordings"][1]["modes"] = ["not", "an", "object"]
    with pytest.raises(BaselineError, match=r"here\['recordings'\]\[1\] must be a JSON object with 'recorded_at'"):
        Baseline.from_entry(stored.test_id, stored.env_key, entry, "here")
    entry["recordings"] = {"a": 1}
    with pytest.raises(BaselineError, match=r"here\['recordings'\] must be a JSON array"):
        Baseline.from_entry(stored.test_id, stored.env_key, entry, "here")


def test_a_baseline_whose_one_process_landed_high_fails_a_healthy_run_and_pooled_it_cannot():
    """The false alarm of the peer comparison (BENCHMARKS.md, run 3): a baseline recorded at 0.69x, healthy runs at 0.61x."""
    config = build_config(("test", {"modes": ["amp_bf16"], "missing_baseline": "ignore", "min_speedup": 1.0}))
    fast_process = {**HEALTHY, "amp_bf16": (1.75e-3, 0.2e-3, 1.65e-3)}  # this process drew 1.49x where the machine gives 1.3x
    healthy = _run(HEALTHY)
    one = baseline_from(_run(fast_process), "t.py::t", "cuda|H100", SETTINGS)
    assert _checks(evaluate(healthy, config, one), "speedup")["amp_bf16"].outcome == FAIL, "one recording in a fast process"
    stored = None
    for per_mode in (HEALTHY, fast_process, HEALTHY):
        stored, _ = _join(stored, baseline_from(_run(per_mode), "t.py::t", "cuda|H100", SETTINGS), speedup_tolerance=0.15)
    check = _checks(evaluate(healthy, config, stored), "speedup")["amp_bf16"]
    assert check.outcome == INCONCLUSIVE, "the outlier widens the baseline's own interval: no false alarm, and said"
    assert "baseline 1.30x (median of 3 recordings)" in check.why and "the stored baseline is itself noisy" in check.why, check.why
    agreeing = None
    for _ in range(3):
        agreeing, _how = _join(agreeing, baseline_from(_run(HEALTHY), "t.py::t", "cuda|H100", SETTINGS))
    assert _checks(evaluate(healthy, config, agreeing), "speedup")["amp_bf16"].outcome == PASS
    slowed = _run({**HEALTHY, "amp_bf16": (2.6e-3, 0.2e-3, 2.5e-3)})  # AMP lost its gain: still caught against the pooled one
    assert _checks(evaluate(slowed, config, stored), "speedup")["amp_bf16"].outcome == FAIL


def test_while_recording_the_gate_says_how_many_recordings_it_pools_and_when_they_disagree():
    config = build_config(("test", {"modes": ["amp_bf16"], "check_speed": True}))
    judging = Judging(_run(HEALTHY), config, None, recording=True)
    first, how = _record(1.30)
    (note,) = recordings_checks(judging, first, how)
    assert note.outcome == PASS and "baseline pools 1 recording(s) (first recording for this machine key)" in note.why
    assert "pytest --ampgate --ampgate-update again (a fresh process, ideally minutes apart) until it pools 3" in note.why
    agreeing, how = _record(1.30, 1.31, 1.29)
    assert [c.outcome for c in recordings_checks(judging, agreeing, how)] == [PASS]
    apart = replace(agreeing, modes={"amp_bf16": replace(agreeing.modes["amp_bf16"], speedup_low=1.10, speedup_high=1.42)})
    noisy, note = recordings_checks(judging, apart, how)
    assert noisy.outcome == INCONCLUSIVE and "amp_bf16 baseline's 3 recordings disagree: speedup 1.10-1.42x" in noisy.why
    assert "more than noise_threshold 10%" in noisy.why and "record it again on a quiet machine" in noisy.why


def test_recording_of_keeps_only_the_timing_figures():
    kept = recording_of(_baseline(1.3))
    assert isinstance(kept, Recording) and kept.modes["amp_bf16"].peak_memory_bytes is None
    assert pooled_baseline(_baseline(1.3), [kept], 0.95).modes["amp_bf16"].speedup == 1.3


SPEED_GATED = (
    HELPERS
    + """

@pytest.mark.amp_regression(modes=["amp_bf16"], rounds=6, steps_per_block=2, warmup_steps=1, missing_baseline="ignore",
                            check_speed=True, min_speedup=0.01, speedup_tolerance=0.9, step_time_tolerance=9.0, confirm=False)
def test_tiny(ampgate):
    ampgate.run(tiny())
"""
)


def test_two_updates_in_fresh_processes_pool_into_one_baseline_that_later_runs_name(pytester):
    pytester.makepyfile(test_pool=SPEED_GATED)
    for count in (1, 2):
        update = pytester.runpytest_subprocess(*UPDATE, "-rA")
        update.assert_outcomes(passed=1)
        assert f"baseline pools {count} recording(s)" in _assert_clean(update)
    stored = json.loads((pytester.path / "baselines" / "test_pool.json").read_text())["tests"]["test_pool.py::test_tiny"]
    (entry,) = stored.values()
    assert len(entry["recordings"]) == 2 and entry["modes"]["amp_bf16"]["recordings"] == 2, entry
    result = pytester.runpytest_subprocess(*CPU, "-rA")
    out = _assert_clean(result)
    assert "(median of 2 recordings)" in out, out
