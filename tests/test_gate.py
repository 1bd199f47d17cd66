"""Verdict logic on fixed measurements: every check's pass/fail/inconclusive boundary, decide()'s
confirmation, the failure text and the result's JSON round trip.

Measurements are built by hand (no training), so each test pins one boundary exactly.
"""

import json
import math
import random

import pytest

from pytest_ampgate.baselines import Baseline, ModeBaseline
from pytest_ampgate.config import build_config
from pytest_ampgate.gate import GateResult, baseline_from, decide, evaluate
from pytest_ampgate.gpu_noise import GpuProcess, NoiseReport
from pytest_ampgate.measurement import MeasureConfig
from pytest_ampgate.mode_runner import ScalerStats
from pytest_ampgate.precision_coverage import OpRecord, PrecisionCoverage
from pytest_ampgate.records import to_dict
from pytest_ampgate.results import Comparison, Measurements, ModeMeasurement
from pytest_ampgate.stats import Estimate, estimate_ratio
from pytest_ampgate.verdict import FAIL, INCONCLUSIVE, PASS, SKIPPED, UPDATE_HINT, Check, Verdict

H100 = {"device_type": "cuda", "device_name": "NVIDIA H100", "torch_version": "2.11.0+cu130"}


def config(**kw):
    kw.setdefault("modes", ["amp_fp16"])
    return build_config(("test", kw))


def estimate(median, low, high, noisy=False, note=""):
    """Ten rounds whose median interval is exactly [low, high] (the 2nd and 9th of ten): pooling recomputes from them."""
    return Estimate(median, low, high, 0.95, 10, (low, low, *[median] * 6, high, high), noisy, note)


def mode(name, *, losses=(2.0, 1.5, 1.0), accuracy=0.9, peak=None, scaler=None, coverage=None, **kw):
    m = ModeMeasurement(
        name, step_times_s=[0.01] * 4, peak_memory_bytes=peak, accuracy=accuracy, scaler=scaler, precision_coverage=coverage, **kw
    )
    m.record_losses(list(losses))
    return m


def measured(*modes, speedup=None, memory=None, noise=None, device="cuda:0", reference=None):
    """Measurements of fp32 and ``modes``; ``speedup``/``memory`` map a mode to its Estimate/ratio."""
    reference = reference or mode("fp32", peak=100 * 2**20)
    modes = modes or (mode("amp_fp16", peak=60 * 2**20),)
    speedup, memory = speedup or {}, memory or {}
    comparisons = {m.mode: Comparison(m.mode, "fp32", speedup=speedup.get(m.mode), memory_ratio=memory.get(m.mode)) for m in modes}
    return Measurements(
        workload="toy",
        device=device,
        config=MeasureConfig(rounds=10),
        batch_size=64,
        environment=H100,
        dataset={"source": "synthetic"},
        reference=reference,
        modes={m.mode: m for m in modes},
        comparisons=comparisons,
        noise=noise or {},
    )


def baseline(**modes):
    return Baseline(
        "t.py::test_x",
        "NVIDIA H100|sm90|torch2.11|cuda13",
        H100,
        "2026-01-01T00:00:00+00:00",
        {},
        {name: ModeBaseline(**values) for name, values in modes.items()},
    )


def only_check(verdict, mode_name, metric):
    found = [c for c in verdict.checks if c.mode == mode_name and c.metric == metric]
    assert len(found) == 1, verdict.checks
    return found[0]


# --- speedup ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "interval, outcome, words",
    [
        ((1.5, 1.4, 1.6), PASS, ">= floor 1.20x (margin 1.20x)"),
        ((1.2, 1.2, 1.3), PASS, ">= floor 1.20x"),  # the interval's low end on the floor clears it
        ((1.1, 1.0, 1.19), FAIL, "< floor 1.20x (margin 1.20x)"),
        ((1.2, 1.1, 1.3), INCONCLUSIVE, "straddles floor 1.20x"),
    ],
)
def test_speedup_against_the_margin(interval, outcome, words):
    m = measured(speedup={"amp_fp16": estimate(*interval)})
    check = only_check(evaluate(m, config(min_speedup=1.2)), "amp_fp16", "speedup")
    assert check.outcome == outcome and words in check.why
    assert check.measured == interval[0] and check.threshold == pytest.approx(1.2) and check.baseline is None
    assert check.why.startswith(f"amp_fp16 speedup {interval[0]:.2f}x [95% CI {interval[1]:.2f}-{interval[2]:.2f}]")


def test_speedup_floor_is_the_baseline_less_its_tolerance_when_that_is_higher():
    # Above the 1.2x margin, but a baseline of 1.82x with 10% tolerance puts the floor at 1.638x.
    m = measured(speedup={"amp_fp16": estimate(1.55, 1.5, 1.6)})
    v = evaluate(m, config(min_speedup=1.2, speedup_tolerance=0.1), baseline(amp_fp16={"speedup": 1.82}))
    check = only_check(v, "amp_fp16", "speedup")
    assert check.outcome == FAIL
    assert check.threshold == pytest.approx(1.638) and check.baseline == 1.82
    assert "< floor 1.64x (margin 1.20x; baseline 1.82x on NVIDIA H100, torch 2.11, tol 10%)" in check.why
    # The margin wins when the baseline less its tolerance is lower.
    low_base = evaluate(m, config(min_speedup=1.2), baseline(amp_fp16={"speedup": 1.25}))
    assert only_check(low_base, "amp_fp16", "speedup").outcome == PASS
    assert only_check(low_base, "amp_fp16", "speedup").threshold == pytest.approx(1.2)


def test_speedup_tolerance_defaults_by_device_from_the_measured_spread():
    """Unset, the tolerance is the device's: 10% on CUDA, 25% on the CPU, whose speedup moves by up
    to 9-18% between processes (config.SPEEDUP_TOLERANCE); a setting wins on either."""
    from pytest_ampgate.config import SPEEDUP_TOLERANCE, GateConfig

    assert GateConfig().speedup_tolerance_on("cuda") == SPEEDUP_TOLERANCE["cuda"] == 0.10
    assert GateConfig().speedup_tolerance_on("cpu") == SPEEDUP_TOLERANCE["cpu"] == 0.25
    assert GateConfig().speedup_tolerance_on("mps") == SPEEDUP_TOLERANCE["cuda"]  # an unmeasured device gets the tighter one
    assert GateConfig(speedup_tolerance=0.15).speedup_tolerance_on("cpu") == 0.15
    # 20% below a 1.0x baseline: a regression on CUDA, within the CPU's spread.
    run = {"speedup": {"amp_fp16": estimate(0.80, 0.78, 0.82)}}
    cuda = only_check(
        evaluate(measured(**run), config(min_speedup=0.1, check_speed=True), baseline(amp_fp16={"speedup": 1.0})), "amp_fp16", "speedup"
    )
    cpu = only_check(
        evaluate(measured(**run, device="cpu"), config(min_speedup=0.1, check_speed=True), baseline(amp_fp16={"speedup": 1.0})),
        "amp_fp16",
        "speedup",
    )
    assert cuda.outcome == FAIL and "tol 10%" in cuda.why and cuda.threshold == pytest.approx(0.9)
    assert cpu.outcome == PASS and "tol 25%" in cpu.why and cpu.threshold == pytest.approx(0.75)


def test_noisy_gpu_turns_a_speedup_fail_into_inconclusive():
    busy = NoiseReport(available=True, other_processes=(GpuProcess(4242, 2**30, "python"),))
    hot = NoiseReport(available=True, throttle_reasons=("hw_thermal_slowdown",))
    quiet = NoiseReport(available=True)
    slow = {"amp_fp16": estimate(1.05, 1.0, 1.1)}
    cfg = config(min_speedup=1.3)

    assert (
        only_check(
            evaluate(measured(speedup=slow, noise={"before": to_dict(quiet), "after": to_dict(quiet)}), cfg), "amp_fp16", "speedup"
        ).outcome
        == FAIL
    )
    check = only_check(
        evaluate(measured(speedup=slow, noise={"before": to_dict(busy), "after": to_dict(quiet)}), cfg), "amp_fp16", "speedup"
    )
    assert check.outcome == INCONCLUSIVE
    assert "but the GPU was busy: before timing: GPU shared with 1 other process (pids 4242)" in check.why
    check = only_check(evaluate(measured(speedup=slow, noise={"after": to_dict(hot)}), cfg), "amp_fp16", "speedup")
    assert check.outcome == INCONCLUSIVE and "after timing: clocks held back by hw_thermal_slowdown" in check.why
    # Noise never turns a PASS into anything else.
    fast = {"amp_fp16": estimate(1.6, 1.5, 1.7)}
    assert only_check(evaluate(measured(speedup=fast, noise={"before": to_dict(busy)}), cfg), "amp_fp16", "speedup").outcome == PASS


def test_noisy_estimate_is_said_in_an_inconclusive_line():
    m = measured(speedup={"amp_fp16": estimate(1.25, 0.9, 1.6, noisy=True, note="interval spans 56% of the median")})
    check = only_check(evaluate(m, config(min_speedup=1.2)), "amp_fp16", "speedup")
    assert check.outcome == INCONCLUSIVE and "interval spans 56% of the median" in check.why


def test_speedup_is_not_gated_on_cpu_unless_forced():
    m = measured(speedup={"amp_fp16": estimate(0.5, 0.4, 0.6)}, device="cpu")
    check = only_check(evaluate(m, config()), "amp_fp16", "speedup")
    assert check.outcome == SKIPPED and "not gated on cpu" in check.why
    assert only_check(evaluate(m, config(check_speed=True)), "amp_fp16", "speedup").outcome == FAIL


def test_speedup_without_timed_rounds_is_skipped():
    m = measured(speedup={})
    m.comparisons["amp_fp16"].note = "no timed rounds"
    assert only_check(evaluate(m, config()), "amp_fp16", "speedup").outcome == SKIPPED


# --- decide(): confirmation ------------------------------------------------------------------


def _runs(*estimates):
    calls = []

    def measure_once():
        calls.append(len(calls))
        return measured(speedup={"amp_fp16": estimates[min(len(calls), len(estimates)) - 1]})  # the last one repeats

    return measure_once, calls


def test_decide_failure_then_pass_is_inconclusive():
    measure_once, calls = _runs(estimate(1.0, 0.95, 1.05), estimate(1.5, 1.4, 1.6))
    first, verdict = decide(measure_once, config(min_speedup=1.2, confirm_runs=2))
    assert len(calls) == 2 and verdict.confirmed
    check = only_check(verdict, "amp_fp16", "speedup")
    assert check.outcome == INCONCLUSIVE and "but a fresh run gave 1.50x (pass)" in check.why
    assert check.measured == 1.0  # the reported numbers are the first run's ...
    assert first.comparisons["amp_fp16"].speedup.median == 1.0  # ... and so are the measurements
    assert verdict.outcome == INCONCLUSIVE


def test_decide_both_failing_is_a_confirmed_fail():
    measure_once, calls = _runs(estimate(1.0, 0.95, 1.05), estimate(1.02, 0.97, 1.08))
    _first, verdict = decide(measure_once, config(min_speedup=1.2))
    check = only_check(verdict, "amp_fp16", "speedup")
    assert len(calls) == 2 and check.outcome == FAIL and "confirmed by a fresh run: 1.02x" in check.why
    assert verdict.outcome == FAIL and verdict.confirmed


def test_a_fail_whose_fresh_run_is_undecided_but_below_stands_where_both_runs_rounds_lie_below():
    measure_once, calls = _runs(estimate(1.0, 0.95, 1.05), estimate(1.1, 1.0, 1.25))  # pooled: 0.95-1.1, below 1.20
    _first, verdict = decide(measure_once, config(min_speedup=1.2))
    check = only_check(verdict, "amp_fp16", "speedup")
    assert len(calls) == 2 and check.outcome == FAIL, check.why
    assert "a fresh run gave 1.10x (inconclusive), also below, and the rounds of both together lie wholly below at 99.95%" in check.why
    measure_once, calls = _runs(estimate(1.0, 0.95, 1.05), estimate(1.22, 1.1, 1.3))  # the fresh run's median above the floor
    _first, verdict = decide(measure_once, config(min_speedup=1.2))
    assert only_check(verdict, "amp_fp16", "speedup").outcome == INCONCLUSIVE


def test_an_undecided_speedup_is_judged_again_on_both_runs_rounds():
    """A straddling first run is measured again and judged on twice the rounds: here they clear the floor."""
    measure_once, calls = _runs(estimate(1.25, 1.15, 1.35), estimate(1.3, 1.25, 1.35))
    _first, verdict = decide(measure_once, config(min_speedup=1.2))
    check = only_check(verdict, "amp_fp16", "speedup")
    assert len(calls) == 2 and check.outcome == PASS, check.why
    assert "this run alone: inconclusive" in check.why
    measure_once, calls = _runs(estimate(1.25, 1.15, 1.35), estimate(1.1, 1.05, 1.15))
    _first, verdict = decide(measure_once, config(min_speedup=1.2, confirm_runs=2))
    check = only_check(verdict, "amp_fp16", "speedup")
    assert check.outcome == INCONCLUSIVE and "with a fresh run's rounds added: 1.15x (inconclusive)" in check.why, check.why


def _decided(*estimates, **settings):
    """decide() over runs with these speedups (the last repeating) at a floor of 1.2: its speedup check, and the runs it took."""
    measure_once, calls = _runs(*estimates)
    _first, verdict = decide(measure_once, config(min_speedup=1.2, **settings))
    return only_check(verdict, "amp_fp16", "speedup"), len(calls)


def test_a_speedup_still_undecided_is_measured_up_to_confirm_runs_times_and_judged_on_all_their_rounds():
    """Load that comes and goes: one run straddles a real drop; the rounds of four decide it, either way."""
    check, runs = _decided(estimate(1.25, 1.15, 1.35), estimate(1.1, 1.05, 1.15))
    assert runs == 4 and check.outcome == FAIL, check.why
    assert "judged on the rounds of 4 runs together at 99.95%, most runs' own medians (1.25x, 1.10x, 1.10x, 1.10x)" in check.why
    check, runs = _decided(estimate(1.15, 1.05, 1.25), estimate(1.3, 1.25, 1.35), estimate(1.4, 1.35, 1.45))
    assert runs == 3 and check.outcome == PASS and "judged on the rounds of 3 runs together" in check.why, check.why
    # Still straddling after four: said, with the figure of all their rounds.
    check, runs = _decided(*[estimate(1.19, 1.1, 1.3), estimate(1.21, 1.1, 1.3)] * 2)
    assert runs == 4 and check.outcome == INCONCLUSIVE, check.why
    assert "judged on the rounds of 4 runs together: 1.20x (inconclusive)" in check.why, check.why


def test_a_second_look_fails_an_undecided_speedup_only_where_both_runs_medians_and_their_pooled_rounds_lie_below():
    """Each look is a chance for noise to condemn: the pooled rounds FAIL an undecided speedup only where
    each run's own median agrees (load that comes and goes widens one run's interval past a real drop)."""
    measure_once, calls = _runs(estimate(1.15, 1.05, 1.25), estimate(1.0, 0.95, 1.05))  # pooled: 1.00-1.15, below 1.20
    _first, verdict = decide(measure_once, config(min_speedup=1.2))
    check = only_check(verdict, "amp_fp16", "speedup")
    assert len(calls) == 2 and check.outcome == FAIL, check.why
    assert "each run's own median (1.15x, 1.00x) lies below the floor too (this run alone: inconclusive)" in check.why, check.why
    # The first run's median above the floor: its rounds pooled with a low second run do not condemn it.
    measure_once, calls = _runs(estimate(1.22, 1.05, 1.30), estimate(1.0, 0.95, 1.05))
    _first, verdict = decide(measure_once, config(min_speedup=1.2, confirm_runs=2))
    check = only_check(verdict, "amp_fp16", "speedup")
    assert len(calls) == 2 and check.outcome == INCONCLUSIVE, check.why


def test_too_few_rounds_are_not_measured_again():
    few = Estimate(1.0, 0.9, 1.1, 0.75, 3, (0.9, 1.0, 1.1), True, "only 3 rounds")
    measure_once, calls = _runs(few, few)
    _first, verdict = decide(measure_once, config(min_speedup=1.2, rounds=3))
    assert len(calls) == 1 and only_check(verdict, "amp_fp16", "speedup").outcome == INCONCLUSIVE


def test_decide_measures_once_when_nothing_fails_or_confirm_is_off():
    measure_once, calls = _runs(estimate(1.5, 1.4, 1.6), estimate(0.5, 0.4, 0.6))
    _m, verdict = decide(measure_once, config(min_speedup=1.2, missing_baseline="ignore"))
    assert len(calls) == 1 and verdict.outcome == PASS and not verdict.confirmed
    measure_once, calls = _runs(estimate(1.0, 0.95, 1.05), estimate(1.5, 1.4, 1.6))
    _m, verdict = decide(measure_once, config(min_speedup=1.2, confirm=False))
    assert len(calls) == 1 and verdict.outcome == FAIL


def test_decide_does_not_remeasure_for_non_timing_failures():
    calls = []

    def measure_once():
        calls.append(1)
        return measured(mode("amp_fp16", losses=(1.0, math.nan)), speedup={"amp_fp16": estimate(1.5, 1.4, 1.6)})

    _m, verdict = decide(measure_once, config())
    assert len(calls) == 1 and verdict.outcome == FAIL


# --- A/A: a mode against itself never fails ---------------------------------------------------


def test_identical_ratio_samples_pass_at_a_floor_of_one():
    est = estimate_ratio([1.0] * 10)
    m = measured(speedup={"amp_fp16": est})
    assert only_check(evaluate(m, config(min_speedup=1.0)), "amp_fp16", "speedup").outcome == PASS


@pytest.mark.parametrize("min_speedup", [1.0, 0.95])
def test_simulated_aa_runs_never_fail(min_speedup):
    """500 A/A runs with 5% lognormal jitter: the median's interval covers 1.0, so decide() never FAILs."""
    rng = random.Random(1234)

    def aa_run():
        samples = [math.exp(rng.gauss(0, 0.05)) for _ in range(10)]
        return measured(speedup={"amp_fp16": estimate_ratio(samples, 0.95, 0.10)})

    single_fails = 0
    cfg = config(min_speedup=min_speedup)
    for _ in range(500):
        _m, verdict = decide(aa_run, cfg)
        assert verdict.outcome != FAIL, verdict.explain()
        single_fails += "a fresh run gave" in only_check(verdict, "amp_fp16", "speedup").why
    # Unconfirmed, a floor of exactly 1.0 fails an A/A run at most ~2.5% of the time (the interval's
    # one-sided miss rate); confirmation makes it a second independent miss.
    assert single_fails <= 25 if min_speedup == 1.0 else single_fails == 0


def test_real_cpu_aa_measurement_does_not_fail():
    """fp32 timed against fp32, for real, with the speedup gate forced on at a floor of 1.0."""
    import torch
    from torch import nn

    from pytest_ampgate.measurement import measure
    from pytest_ampgate.workloads import Workload

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 32, generator=g), torch.randint(0, 4, (256,), generator=g)
    workload = Workload(
        "aa",
        lambda: nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4)),
        (x, y, x[:64], y[:64]),
        nn.CrossEntropyLoss(),
        lambda p: torch.optim.SGD(p, lr=0.1),
        batch_size=32,
    )
    cfg = config(modes=["fp32"], min_speedup=1.0, check_speed=True, rounds=8, steps_per_block=5, warmup_steps=1, missing_baseline="ignore")
    m, verdict = decide(lambda: measure(workload, cfg.modes, device="cpu", config=cfg.measure_config()), cfg)
    check = only_check(verdict, "fp32", "speedup")
    assert check.outcome in (PASS, INCONCLUSIVE), verdict.explain()
    assert m.comparisons["fp32"].speedup.rounds == 8
    # the control's fp32 row is timed against the reference's own blocks, never against itself
    expected = [r / t for r, t in zip(m.reference.step_times_s, m.modes["fp32"].step_times_s)]
    assert list(m.comparisons["fp32"].speedup.samples) == pytest.approx(expected)
    assert m.reference is not m.modes["fp32"] and m.reference.step_times_s != m.modes["fp32"].step_times_s


# --- memory ----------------------------------------------------------------------------------


def test_memory_ratio_against_limit_and_baseline():
    m = measured(memory={"amp_fp16": 0.6})
    check = only_check(evaluate(m, config(max_memory_ratio=0.8)), "amp_fp16", "memory")
    assert check.outcome == PASS and check.measured == 0.6 and check.threshold == 0.8
    assert "amp_fp16 peak memory 60.0 MiB = 0.60x fp32 (100.0 MiB) <= 0.80x (limit 0.80x)" in check.why

    check = only_check(evaluate(m, config(max_memory_ratio=0.5)), "amp_fp16", "memory")
    assert check.outcome == FAIL and "> 0.50x" in check.why

    # Within the limit, but more than the tolerance above the stored 0.50x.
    v = evaluate(m, config(max_memory_ratio=0.8, memory_tolerance=0.05), baseline(amp_fp16={"memory_ratio": 0.5}))
    check = only_check(v, "amp_fp16", "memory")
    assert check.outcome == FAIL and check.threshold == pytest.approx(0.55) and check.baseline == 0.5
    assert "baseline 0.50x on NVIDIA H100, torch 2.11, tol +0.05" in check.why
    v = evaluate(m, config(max_memory_ratio=0.8, memory_tolerance=0.15), baseline(amp_fp16={"memory_ratio": 0.5}))
    assert only_check(v, "amp_fp16", "memory").outcome == PASS


def test_memory_not_measured_is_skipped_with_its_reason():
    m = measured(mode("amp_fp16", memory_note="memory pass disabled (memory_steps=0)"), memory={})
    check = only_check(evaluate(m, config()), "amp_fp16", "memory")
    assert check.outcome == SKIPPED and "memory_steps=0" in check.why


# --- numerics --------------------------------------------------------------------------------


def test_finite_loss_names_the_first_bad_step():
    ok = only_check(evaluate(measured(), config()), "amp_fp16", "finite_loss")
    assert ok.outcome == PASS and ok.why == "amp_fp16 loss finite at all 3 steps"
    bad = measured(mode("amp_fp16", losses=(2.0, 1.5, math.inf, math.nan, 1.0)))
    check = only_check(evaluate(bad, config()), "amp_fp16", "finite_loss")
    assert check.outcome == FAIL and check.measured == 2
    assert check.why == "amp_fp16 loss non-finite (inf) first at step 2 of 5 (2 non-finite steps)"
    assert only_check(evaluate(bad, config()), "fp32", "finite_loss").outcome == PASS


def test_grad_scaler_skipped_fraction():
    def with_scaler(skipped, steps=100):
        return measured(mode("amp_fp16", scaler=ScalerStats(65536.0, 32768.0, 16384.0, steps, skipped)))

    ok = only_check(evaluate(with_scaler(5), config(max_skipped_fraction=0.05)), "amp_fp16", "skipped_steps")
    assert ok.outcome == PASS and "skipped 5 of 100 steps (5.0%) <= 5.0%" in ok.why
    bad = only_check(evaluate(with_scaler(6), config(max_skipped_fraction=0.05)), "amp_fp16", "skipped_steps")
    assert bad.outcome == FAIL and bad.measured == pytest.approx(0.06) and "> 5.0%" in bad.why
    # Fused optimizers cannot count skipped steps: no check rather than a made-up number.
    uncountable = evaluate(with_scaler(None), config())
    assert not [c for c in uncountable.checks if c.metric == "skipped_steps"]
    assert only_check(uncountable, "amp_fp16", "loss_scale").outcome == PASS


def test_collapsed_loss_scale_fails():
    m = measured(mode("amp_fp16", scaler=ScalerStats(65536.0, 2.0**-10, 2.0**-12, 100, 3)))
    check = only_check(evaluate(m, config(min_loss_scale=1.0)), "amp_fp16", "loss_scale")
    assert check.outcome == FAIL and "< collapse limit 1" in check.why and "start 65536" in check.why
    assert only_check(evaluate(m, config(min_loss_scale=0.0)), "amp_fp16", "loss_scale").outcome == PASS


# --- accuracy --------------------------------------------------------------------------------


def test_accuracy_against_the_baseline():
    base = baseline(fp32={"accuracy": 0.92}, amp_fp16={"accuracy": 0.915})
    drop = measured(mode("amp_fp16", accuracy=0.85))
    check = only_check(evaluate(drop, config(accuracy_tolerance=0.02), base), "amp_fp16", "accuracy")
    assert check.outcome == FAIL and check.measured == 0.85 and check.baseline == 0.915
    assert check.why == "amp_fp16 accuracy 0.850 vs baseline 0.915 (tol 0.02) dropped below 0.895"
    within = measured(mode("amp_fp16", accuracy=0.9))
    assert only_check(evaluate(within, config(accuracy_tolerance=0.02), base), "amp_fp16", "accuracy").outcome == PASS
    assert only_check(evaluate(drop, config(accuracy_tolerance=0.1), base), "amp_fp16", "accuracy").outcome == PASS


def test_accuracy_rise_passes_with_a_note():
    base = baseline(fp32={"accuracy": 0.9}, amp_fp16={"accuracy": 0.8})
    check = only_check(evaluate(measured(mode("amp_fp16", accuracy=0.95)), config(), base), "amp_fp16", "accuracy")
    assert check.outcome == PASS and "above the baseline by more than the tolerance" in check.why
    assert "--ampgate-update" in check.why


@pytest.mark.parametrize("policy, outcome", [("warn", INCONCLUSIVE), ("fail", FAIL), ("ignore", SKIPPED)])
def test_missing_baseline_policy(policy, outcome):
    v = evaluate(measured(), config(missing_baseline=policy), None, missing_baseline_note="no baseline for X")
    for name in ("fp32", "amp_fp16"):
        check = only_check(v, name, "accuracy")
        assert check.outcome == outcome and check.why.endswith(": no baseline for X")
    result = GateResult("t.py::test_x", "env", measured(), v)
    assert result.failed is (policy == "fail")
    assert GateResult("t.py::test_x", "env", measured(), v, strict=True).failed is (policy in ("fail", "warn"))


def test_missing_baseline_default_note_says_how_to_record_one():
    check = only_check(evaluate(measured(), config()), "amp_fp16", "accuracy")
    assert check.outcome == INCONCLUSIVE and "record one with: pytest --ampgate --ampgate-update" in check.why


def test_baseline_without_this_mode_counts_as_missing():
    v = evaluate(measured(), config(missing_baseline="fail"), baseline(fp32={"accuracy": 0.9}))
    assert only_check(v, "fp32", "accuracy").outcome == PASS
    assert only_check(v, "amp_fp16", "accuracy").outcome == FAIL


# --- precision coverage ----------------------------------------------------------------------


def _coverage(low_flops, fp32_flops):
    return PrecisionCoverage.from_records(
        [
            OpRecord("0", "aten.mm", "float16", "forward", low_flops, 1),
            OpRecord("2", "aten.mm", "float32", "forward", fp32_flops, 1),
        ]
    )


def test_precision_coverage_share():
    good = measured(mode("amp_fp16", coverage=_coverage(95, 5)))
    check = only_check(evaluate(good, config(min_low_precision_share=0.9)), "amp_fp16", "precision_coverage")
    assert check.outcome == PASS and check.measured == pytest.approx(0.95)
    bad = measured(mode("amp_fp16", coverage=_coverage(50, 50)))
    check = only_check(evaluate(bad, config(min_low_precision_share=0.9)), "amp_fp16", "precision_coverage")
    assert check.why == "amp_fp16 ran 50.0% of matmul/conv FLOPs in low precision < 90%; still fp32: 2 (50.0%)"
    assert check.outcome == FAIL and check.baseline is None
    text = Verdict([check]).explain()
    assert "relax min_low_precision_share in @pytest.mark.amp_regression(...)" in text
    assert UPDATE_HINT not in text  # a stored baseline cannot accept a fixed margin's failure
    empty = measured(mode("amp_fp16", coverage=PrecisionCoverage.from_records([])))
    assert only_check(evaluate(empty, config()), "amp_fp16", "precision_coverage").outcome == SKIPPED


def test_fp32_has_no_coverage_check():
    ref = mode("fp32", peak=100 * 2**20, coverage=_coverage(0, 100))
    v = evaluate(measured(reference=ref), config())
    assert not [c for c in v.checks if c.mode == "fp32" and c.metric == "precision_coverage"]


# --- modes that did not run ------------------------------------------------------------------


def test_unsupported_mode_is_skipped_not_failed():
    m = measured(
        ModeMeasurement("amp_bf16", supported=False, unsupported_reason="bfloat16 needs sm80+"),
        mode("amp_fp16"),
        speedup={"amp_fp16": estimate(1.5, 1.4, 1.6)},
    )
    v = evaluate(m, config(modes=["amp_bf16", "amp_fp16"]))
    assert [c.metric for c in v.checks if c.mode == "amp_bf16"] == ["supported"]
    assert only_check(v, "amp_bf16", "supported").outcome == SKIPPED
    assert "amp_bf16 not run: bfloat16 needs sm80+" in only_check(v, "amp_bf16", "supported").why
    assert v.outcome != FAIL


def test_mode_error_fails():
    m = measured(mode("amp_fp16", error="out of memory: CUDA out of memory"))
    v = evaluate(m, config())
    check = only_check(v, "amp_fp16", "ran")
    assert check.outcome == FAIL and check.why == "amp_fp16 failed while running: out of memory: CUDA out of memory"
    assert not [c for c in v.checks if c.mode == "amp_fp16" and c.metric != "ran"]
    assert v.outcome == FAIL


def test_reference_error_fails_and_skips_comparisons():
    m = measured(reference=mode("fp32", error="RuntimeError: boom"), speedup={"amp_fp16": estimate(1.5, 1.4, 1.6)})
    v = evaluate(m, config())
    assert only_check(v, "fp32", "ran").outcome == FAIL
    assert not [c for c in v.checks if c.metric == "speedup"]


# --- the failure text ------------------------------------------------------------------------


def test_explain_reads_like_the_design_example():
    m = measured(speedup={"amp_fp16": estimate(1.08, 1.05, 1.11)}, memory={"amp_fp16": 0.58})
    base = baseline(fp32={"accuracy": 0.92}, amp_fp16={"speedup": 1.82, "accuracy": 0.915, "memory_ratio": 0.6})
    v = evaluate(m, config(min_speedup=1.3, max_memory_ratio=0.8, confirm=False), base)
    lines = v.explain("tests/test_amp.py::test_cifar_cnn").splitlines()
    assert lines[0] == "tests/test_amp.py::test_cifar_cnn - AMP REGRESSION"
    assert lines[1] == (
        "  amp_fp16 speedup 1.08x [95% CI 1.05-1.11] < floor 1.64x (margin 1.30x; "
        "baseline 1.82x on NVIDIA H100, torch 2.11, tol 10%) FAILED"
    )
    assert all(line.startswith("  ") for line in lines[1:])
    assert next(ln for ln in lines if "peak memory" in ln).endswith(" ok")
    assert lines[-1] == "  " + UPDATE_HINT
    # Failures first, then the rest; one line per check.
    assert len(lines) == len(v.checks) + 2
    outcomes = [c.outcome for c in sorted(v.checks, key=lambda c: [FAIL, INCONCLUSIVE, PASS, SKIPPED].index(c.outcome))]
    assert outcomes[0] == FAIL and outcomes == sorted(outcomes, key=[FAIL, INCONCLUSIVE, PASS, SKIPPED].index)


def test_explain_heads():
    assert Verdict([Check("amp_fp16", "accuracy", PASS, "fine")]).explain() == "AMP GATE PASSED\n  fine ok"
    assert Verdict([]).explain("t::x").startswith("t::x - AMP GATE SKIPPED")
    timing = Verdict([Check("amp_fp16", "speedup", INCONCLUSIVE, "straddles")]).explain(strict=True)
    assert timing.splitlines()[0] == "AMP GATE INCONCLUSIVE"
    assert "--ampgate-strict treats this as a failure" in timing and "rerun on a quiet GPU" in timing


def test_explain_of_a_missing_baseline_does_not_blame_the_gpu():
    v = evaluate(measured(), config(), None)
    text = v.explain()
    assert text.startswith("AMP GATE INCONCLUSIVE")
    assert "record one with: pytest --ampgate --ampgate-update" in text
    assert "quiet GPU" not in text


# --- results travel as JSON ------------------------------------------------------------------


def test_gate_result_round_trips_through_json():
    m = measured(
        mode("amp_fp16", scaler=ScalerStats(65536.0, 32768.0, 16384.0, 100, 2), coverage=_coverage(90, 10), losses=(1.0, math.nan, 0.5)),
        speedup={"amp_fp16": estimate(1.5, 1.4, 1.6)},
        memory={"amp_fp16": 0.6},
        noise={"before": to_dict(NoiseReport(available=True))},
    )
    v = evaluate(m, config(), baseline(amp_fp16={"accuracy": 0.9}))
    result = GateResult("t.py::test_x", "env|key", m, v, baseline_accuracy={"amp_fp16": 0.9}, update={"modes": {}}, strict=True)
    text = json.dumps(result.to_dict(), allow_nan=False)
    back = GateResult.from_dict(json.loads(text))
    assert back.to_dict() == result.to_dict()
    assert back.verdict.checks == v.checks and back.verdict.outcome == v.outcome == FAIL
    assert back.mode("amp_fp16").first_nonfinite_step == 1 and math.isnan(back.mode("amp_fp16").losses[1])
    assert back.speedup("amp_fp16") == 1.5 and back.memory_ratio("amp_fp16") == 0.6
    assert back.mode("fp32") is back.measurements.reference
    with pytest.raises(KeyError, match="'bf16' was not measured; measured: fp32, amp_fp16"):
        back.mode("bf16")
    assert back.explain().startswith("t.py::test_x - AMP REGRESSION")


def test_baseline_from_keeps_what_ran_with_its_spread():
    m = measured(
        ModeMeasurement("amp_bf16", supported=False, unsupported_reason="no"),
        mode("amp_fp16", peak=60 * 2**20),
        speedup={"amp_fp16": estimate(1.5, 1.4, 1.6)},
        memory={"amp_fp16": 0.6},
    )
    b = baseline_from(m, "t.py::test_x", "env", {"config": {}})
    assert set(b.modes) == {"fp32", "amp_fp16"}
    amp = b.modes["amp_fp16"]
    assert (amp.speedup, amp.speedup_low, amp.speedup_high, amp.memory_ratio, amp.accuracy) == (1.5, 1.4, 1.6, 0.6, 0.9)
    assert b.modes["fp32"].speedup is None and b.settings["workload"] == "toy"
