import random

import pytest

from pytest_ampgate import stats


def test_median_odd_even():
    assert stats.median([3, 1, 2]) == 2
    assert stats.median([4, 1, 3, 2]) == 2.5
    with pytest.raises(ValueError):
        stats.median([])


def test_median_interval_order_statistics_ten_rounds():
    # Binomial(10, 1/2): k=2 covers 1 - 2*11/1024 = 97.85%; k=3 would cover only 89.06%.
    low, high, cover = stats.median_interval(list(range(10, 0, -1)), 0.95)
    assert (low, high) == (2, 9)
    assert cover == pytest.approx(1 - 2 * 11 / 1024)


def test_median_interval_too_few_rounds_reports_real_coverage():
    low, high, cover = stats.median_interval([5, 1, 3, 2, 4], 0.95)
    assert (low, high) == (1, 5)
    assert cover == pytest.approx(1 - 2 / 32)
    est = stats.estimate_ratio([1.0, 1.1, 0.9, 1.05, 0.95])
    assert est.noisy and "only 5 rounds" in est.note


def test_a_a_interval_covers_one_at_its_stated_rate():
    rng = random.Random(1)
    trials, covered = 400, 0
    for _ in range(trials):
        ref = [1e-3 * rng.lognormvariate(0, 0.05) for _ in range(12)]
        same = [1e-3 * rng.lognormvariate(0, 0.05) for _ in range(12)]
        est = stats.estimate_ratio(stats.round_ratios(ref, same), noise_threshold=0.5)
        covered += est.low <= 1.0 <= est.high
    assert est.confidence >= 0.95
    assert covered / trials >= 0.93  # 95% nominal, binomial slack for 400 trials


def test_planted_difference_is_resolved():
    rng = random.Random(2)
    ref = [1.5e-3 * rng.lognormvariate(0, 0.03) for _ in range(12)]
    fast = [1.0e-3 * rng.lognormvariate(0, 0.03) for _ in range(12)]
    est = stats.estimate_ratio(stats.round_ratios(ref, fast))
    assert 1.4 < est.low <= est.median <= est.high < 1.6
    assert not est.noisy
    assert est.rounds == 12 and est.confidence >= 0.95


def test_wide_interval_is_flagged_noisy():
    est = stats.estimate_ratio([0.5, 2.0, 1.0, 1.5, 0.7, 1.2, 0.9, 1.8], noise_threshold=0.1)
    assert est.noisy and "interval spans" in est.note


def test_round_ratios_pairs_rounds():
    assert stats.round_ratios([2.0, 3.0], [1.0, 1.5]) == [2.0, 2.0]
    with pytest.raises(ValueError, match="rounds differ"):
        stats.round_ratios([1.0], [1.0, 2.0])


def test_abba_order_alternates():
    assert stats.abba_order(["a", "b"], 4) == [["a", "b"], ["b", "a"], ["a", "b"], ["b", "a"]]
    # three or more modes: each pair of rounds starts from the next rotation (see test_three_modes_are_balanced)
    assert stats.abba_order(["a", "b", "c"], 4) == [["a", "b", "c"], ["c", "b", "a"], ["b", "c", "a"], ["a", "c", "b"]]


def _drifting_times(schedule):
    """Block times with a true 2x speedup plus a drift that grows with wall-clock position."""
    true = {"ref": 2.0, "amp": 1.0}
    clock, times = 0, {"ref": [], "amp": []}
    for order in schedule:
        for label in order:
            clock += 1
            times[label].append(true[label] + 0.05 * clock)
    return stats.median(stats.round_ratios(times["ref"], times["amp"]))


def test_abba_cancels_linear_drift_better_than_a_fixed_order():
    abba = _drifting_times(stats.abba_order(["ref", "amp"], 10))
    fixed = _drifting_times([["ref", "amp"]] * 10)
    assert abs(abba - 2.0) < abs(fixed - 2.0)


def test_summarize_times_uses_pytest_benchmark_fields():
    summary = stats.summarize_times([1.0, 2.0, 3.0, 4.0, 100.0])
    assert summary["median"] == 3.0 and summary["rounds"] == 5
    assert {"iqr", "stddev", "outliers", "min", "max"} <= set(summary)
    assert stats.summarize_times([]) == {}


def test_estimate_round_trip():
    est = stats.estimate_ratio([1.2, 1.3, 1.25, 1.22, 1.27, 1.24, 1.26])
    assert stats.Estimate.from_dict(est.to_dict()) == est
    assert "1.25x" in est.describe()
