"""Planted regressions through the whole gate: each fails its own check, with a message that explains it.

Everything here runs on the CPU (tiny MNIST MLP, one thread's worth of steps); the memory plant and
the GPU slowdown have CUDA tests that skip without a GPU.  The A/A control runs the real timing
path (``check_speed=True``) on CPU wall-clock time and must never FAIL.
"""

import copy
import statistics
import time

import pytest
import torch

from pytest_ampgate import delays, testing
from pytest_ampgate.config import GateConfig
from pytest_ampgate.errors import ConfigError, WorkloadError
from pytest_ampgate.gate import baseline_from, decide
from pytest_ampgate.measurement import measure
from pytest_ampgate.mode_runner import prepare
from pytest_ampgate.profiles import cpu_threads
from pytest_ampgate.verdict import FAIL, INCONCLUSIVE, PASS
from pytest_ampgate.workloads import cifar_cnn, mnist_mlp

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

QUICK = {"warmup_steps": 1, "rounds": 2, "steps_per_block": 3, "memory_steps": 0}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """CPU timing on one thread: on a shared 2-core machine a parallel region can stall for tens of
    milliseconds waiting for a descheduled sibling thread, which is noise no gate should judge."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mnist():
    return mnist_mlp().with_options(batch_size=32, data_options={"n_train": 512, "n_test": 128})


@pytest.fixture(scope="module")
def dataset(mnist):
    return mnist.dataset("cpu")


def gate(workload, dataset, *, baseline=None, device="cpu", **settings):
    """One gated run, as a gated test makes it: measure, judge, confirm a timing FAIL."""
    config = GateConfig(**{"modes": ("amp_fp16", "amp_bf16"), "missing_baseline": "ignore", **QUICK, **settings})

    def once():
        return measure(workload, config.modes, device=device, config=config.measure_config(), dataset=dataset)

    return decide(once, config, baseline)


def checks(verdict, metric):
    return {c.mode: c for c in verdict.checks if c.metric == metric}


def failures(verdict):
    return {(c.mode, c.metric) for c in verdict.of(FAIL)}


def test_unchanged_model_passes_every_check(mnist, dataset):
    _m, verdict = gate(mnist, dataset)
    assert failures(verdict) == set(), verdict.explain()
    coverage = checks(verdict, "precision_coverage")
    assert set(coverage) == {"amp_fp16", "amp_bf16"}
    assert all(c.outcome == PASS and c.measured == 1.0 for c in coverage.values())
    assert all(c.outcome == PASS for c in checks(verdict, "finite_loss").values())


def test_largest_layer_is_found_by_parameter_count(mnist):
    assert testing.largest_layer(mnist) == "1"  # Linear(784, 128)
    assert testing.largest_layer(cifar_cnn()) == "7"  # Linear(4096, 512)


def test_forced_fp32_layer_fails_coverage_and_names_the_layer(mnist, dataset):
    m, verdict = gate(testing.force_fp32_layer(mnist), dataset)
    assert failures(verdict) == {("amp_fp16", "precision_coverage"), ("amp_bf16", "precision_coverage")}, verdict.explain()
    for mode, check in checks(verdict, "precision_coverage").items():
        assert check.measured < 0.2 and check.threshold == 0.9
        assert check.why.endswith("< 90%; still fp32: 1.layer (88.3%)"), check.why
        hot = m.modes[mode].precision_coverage.fp32_hotspots()
        assert hot[0][0] == "1.layer"
    assert "AMP REGRESSION" in verdict.explain() and "1.layer" in verdict.explain()
    # the planted copy starts from the same weights: fp32 is untouched by the plant
    clean, _ = gate(mnist, dataset)
    assert m.reference.losses == clean.reference.losses


def test_forced_fp32_small_layer_is_gated_against_the_configured_minimum(mnist, dataset):
    planted = testing.force_fp32_layer(mnist, layer="3")  # Linear(128, 64): 10.8% of the step's FLOPs
    _m, strict = gate(planted, dataset, modes=("amp_bf16",))
    check = checks(strict, "precision_coverage")["amp_bf16"]
    assert check.outcome == FAIL and "fp32: 3.layer (10.8%)" in check.why
    _m, lenient = gate(planted, dataset, modes=("amp_bf16",), min_low_precision_share=0.85)
    assert checks(lenient, "precision_coverage")["amp_bf16"].outcome == PASS


def test_forced_fp32_layer_fails_coverage_on_a_cnn():
    workload = cifar_cnn().with_options(batch_size=8, data_options={"n_train": 64, "n_test": 16})
    config = {"warmup_steps": 0, "rounds": 1, "steps_per_block": 1}
    _m, verdict = gate(testing.force_fp32_layer(workload), workload.dataset("cpu"), modes=("amp_bf16",), **config)
    check = checks(verdict, "precision_coverage")["amp_bf16"]
    assert check.outcome == FAIL and "fp32: 7.layer" in check.why, check.why


def test_unknown_layer_is_refused_with_the_layers_there_are(mnist):
    with pytest.raises(WorkloadError, match=r"no layer 'fc9'.*Linear/Conv layers: 1, 3, 5"):
        testing.force_fp32_layer(mnist, layer="fc9")


def test_fp16_overflow_fails_finite_loss_in_amp_fp16_only(mnist, dataset):
    _m, verdict = gate(testing.overflow_in_fp16(mnist), dataset)
    assert failures(verdict) == {("amp_fp16", "finite_loss")}, verdict.explain()
    finite = checks(verdict, "finite_loss")
    assert "amp_fp16 loss non-finite (inf) first at step 0" in finite["amp_fp16"].why
    assert finite["fp32"].outcome == PASS and finite["amp_bf16"].outcome == PASS
    # gradients stay finite: the scaler is not what fires
    assert checks(verdict, "skipped_steps")["amp_fp16"].outcome == PASS
    assert checks(verdict, "loss_scale")["amp_fp16"].outcome == PASS


def test_overflow_value_must_overflow_fp16(mnist):
    with pytest.raises(ConfigError, match="square past 65504"):
        testing.overflow_in_fp16(mnist, value=100.0)


def test_loss_scale_collapse_fails_the_scaler_checks_with_a_finite_loss(mnist, dataset):
    # 1 coverage + 2 warm-up + 10 balance + 2 x 10 timed steps = 33 halvings: 65536 / 2**33 < 1
    _m, verdict = gate(testing.collapse_loss_scale(mnist), dataset, warmup_steps=2, rounds=2, steps_per_block=10)
    # A scaler that skips every step never lets the mode learn: the same-run check may say so too.
    consequences = {("amp_fp16", c) for c in testing.PLANTS["collapse_loss_scale"].consequences}
    assert failures(verdict) - consequences == {("amp_fp16", "loss_scale"), ("amp_fp16", "skipped_steps")}, verdict.explain()
    scale = checks(verdict, "loss_scale")["amp_fp16"]
    assert scale.measured == 65536 / 2**33
    assert "collapse limit 1" in scale.why and "start 65536" in scale.why
    assert "skipped 33 of 33 steps (100.0%)" in checks(verdict, "skipped_steps")["amp_fp16"].why
    assert all(c.outcome == PASS for c in checks(verdict, "finite_loss").values())


def test_running_mode_tells_the_modes_apart():
    x = torch.ones(2, 2)
    assert testing.running_mode(x) == "fp32"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert testing.running_mode(x) == "amp_bf16"
    with torch.autocast("cpu", dtype=torch.float16):
        assert testing.running_mode(x) == "amp_fp16"
    assert testing.running_mode(x.half()) == "fp16"
    assert testing.running_mode(x.bfloat16()) == "bf16"
    layer = torch.nn.Embedding(4, 2).half()
    assert testing.running_mode(torch.zeros(2, dtype=torch.long), layer) == "fp16"


def test_slowdown_acts_only_in_the_named_modes(mnist, monkeypatch):
    waits = []
    monkeypatch.setattr(delays, "cpu_work", waits.append)
    model = testing.slow_down(mnist, 0.5, modes=("amp_bf16",), step_time_s=0.004, device="cpu").model_factory()
    x = torch.randn(3, 784)
    model(x)
    with torch.autocast("cpu", dtype=torch.float16):
        model(x)
    assert waits == []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    assert waits == [pytest.approx(0.002)]


def _cpu_seconds_per_step(runner, dataset, steps=12):
    times = []
    for _ in range(steps):
        begin = time.thread_time()
        runner.step(*dataset.batch(runner.steps_taken, 32))
        times.append(time.thread_time() - begin)
    return statistics.median(times[2:])


def _interleaved_step_ratio(planted, clean, dataset, pairs=12, steps=4):
    """Median of per-pair ratios, the two runners alternating block by block (as the gate's ABBA
    rounds do), so a busy machine slows both sides of each pair alike."""
    ratios = []
    with cpu_threads("cpu"):  # as the gate measures, and as the spin was calibrated
        for i in range(pairs + 1):
            first, second = (planted, clean) if i % 2 == 0 else (clean, planted)
            a, b = _cpu_seconds_per_step(first, dataset, steps + 2), _cpu_seconds_per_step(second, dataset, steps + 2)
            if i:  # the first pair warms both up
                ratios.append(a / b if first is planted else b / a)
    return statistics.median(ratios)


def test_cpu_slowdown_adds_its_fraction_of_the_step(mnist, dataset):
    """Calibrated against the gate's own timed blocks, so with fraction 1.0 a step costs about twice as much."""
    clean = prepare("amp_bf16", mnist.model_factory(), mnist.optimizer_factory, mnist.loss_fn, "cpu")
    planted_workload = testing.slow_down(mnist, 1.0, modes=("amp_bf16",), device="cpu")
    planted = prepare("amp_bf16", planted_workload.model_factory(), mnist.optimizer_factory, mnist.loss_fn, "cpu")
    ratio = _interleaved_step_ratio(planted, clean, dataset)
    assert 1.5 < ratio < 3.0, ratio  # about 2; calibrated with short measurements on a machine that may be loaded


def test_cpu_plant_is_real_work_that_coverage_and_memory_do_not_see():
    """Elementwise passes into a preallocated output: CPU time of about the length asked, no matmul
    FLOPs (the precision-coverage count would blame the model for them) and no allocation."""
    from torch.utils.flop_counter import FlopCounterMode

    delays.cpu_work(0.001)  # measures its unit once
    begin = time.thread_time()
    with (
        FlopCounterMode(display=False) as flops,
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        delays.cpu_work(0.002)
    spent = time.thread_time() - begin
    assert flops.get_total_flops() == 0
    assert not [e for e in prof.events() if getattr(e, "cpu_memory_usage", 0) > 0]
    assert 0.001 < spent < 0.2, spent  # profiled, so slower than asked; never nothing


def test_cpu_plant_measures_its_work_unit_when_planted_not_in_a_profiled_step(mnist, monkeypatch):
    """The first planted step may run under the memory pass's profiler, where every op costs
    several times as much: a unit measured there made the plant a third of its size (the peer
    comparison's +25% plant landed at +9%).  So the unit is measured when the plant is made."""
    monkeypatch.setattr(delays, "_WORK_UNIT", {})
    testing.slow_down(mnist, 0.5, modes=("amp_bf16",), step_time_s=0.004, device="cpu")
    assert delays._WORK_UNIT["seconds"] == delays.cpu_work_unit_s() > 0
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True):
        unit = delays.cpu_work_unit_s()
    assert unit == delays._WORK_UNIT["seconds"]  # measured once per process, never again under a profiler


def test_calibration_sizes_each_mode_against_an_unplanted_one_in_the_same_run(monkeypatch):
    """The machine's speed alternates by 30% between measurements (as a shared CPU VM's does);
    sized by its step time relative to an unplanted mode's in the same run (fp32 for amp_bf16,
    amp_bf16 for fp32 itself), each delay is still exact.  The plant costs 1.5x its length (cold
    caches after it), which the secant steps take out."""
    calls = iter(range(1000))
    clean = {"fp32": 0.001, "amp_bf16": 0.002}

    def fake_measure(workload, modes, device, config):
        drift = 1.3 if next(calls) % 2 else 1.0
        delays = workload[1] if isinstance(workload, tuple) else {}
        return {m: (clean[m] + 1.5 * delays.get(m, 0.0)) * drift for m in {"fp32", *modes}}

    monkeypatch.setattr(delays, "measure_step_times", fake_measure)
    found = delays.calibrate_measured_delay("clean", 0.2, ["fp32", "amp_bf16"], "cpu", planted=lambda d: ("planted", dict(d)))
    assert found == {m: pytest.approx(0.2 * clean[m] / 1.5) for m in clean}


def test_slowdown_size_against_the_tolerance():
    assert testing.slowdown_for_drop(0.1) == pytest.approx(1 / 0.9 - 1)
    assert testing.slowdown_for_drop(0.0) == 0.0
    speedup = 1.5
    assert speedup / (1 + testing.slowdown_for_drop(0.2)) == pytest.approx(speedup * 0.8)
    with pytest.raises(ConfigError):
        testing.slowdown_for_drop(1.0)
    with pytest.raises(ConfigError, match="no step time given for amp_fp16"):
        testing.slow_down(mnist_mlp(), 0.1, step_time_s={"amp_bf16": 0.01})


def test_retained_activation_is_kept_per_model_copy_in_amp_modes_only(mnist):
    model = testing.retain_activation(mnist, 4096).model_factory()
    hook = next(iter(model._forward_pre_hooks.values()))
    model(torch.randn(2, 784))
    assert hook.kept is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 784))
    assert hook.kept.numel() == 4096 and hook.kept.dtype == torch.uint8
    twin = copy.deepcopy(model)
    assert next(iter(twin._forward_pre_hooks.values())).kept is None


def test_aa_control_never_fails_with_cpu_timing(mnist, dataset):
    """fp32 against fp32, 20 times, timing gated: PASS or INCONCLUSIVE, never FAIL.

    The A/A floor is 1 - speedup_tolerance (0.9): the question an A/A asks is "did the mode get
    slower than itself by more than the tolerance", and the truthful answer is no.
    """
    config = {"modes": ("fp32",), "min_speedup": 0.9, "check_speed": True, "warmup_steps": 1, "rounds": 6, "steps_per_block": 3}
    outcomes = []
    for _ in range(20):
        _m, verdict = gate(mnist, dataset, **config)
        speedup = checks(verdict, "speedup")["fp32"]
        assert speedup.outcome in (PASS, INCONCLUSIVE), verdict.explain()
        assert failures(verdict) == set(), verdict.explain()
        outcomes.append(speedup.outcome)
    assert len(outcomes) == 20


@cuda
def test_gpu_memory_plant_fails_the_memory_check():
    workload = mnist_mlp().with_options(batch_size=1024, data_options={"n_train": 8192, "n_test": 1024})
    dataset = workload.dataset("cuda")
    settings = {"modes": ("amp_bf16",), "check_memory": True, "max_memory_ratio": 100.0, "memory_steps": 2}
    clean, _ = gate(workload, dataset, device="cuda", **settings)
    baseline = baseline_from(clean, "test", "cuda", {})
    extra = int(2 * 0.05 * clean.reference.peak_memory_bytes) + 2**20
    m, verdict = gate(testing.retain_activation(workload, extra), dataset, device="cuda", baseline=baseline, **settings)
    grown = m.modes["amp_bf16"].peak_memory_bytes - clean.modes["amp_bf16"].peak_memory_bytes
    assert abs(grown - extra) <= 2**20
    check = checks(verdict, "memory")["amp_bf16"]
    assert check.outcome == FAIL and "baseline" in check.why, verdict.explain()


@cuda
def test_gpu_slowdown_fails_the_speedup_check():
    workload = mnist_mlp()
    dataset = workload.dataset("cuda")
    settings = {"modes": ("amp_bf16",), "check_speed": True, "min_speedup": 0.01, "rounds": 10, "steps_per_block": 10, "warmup_steps": 3}
    clean, _ = gate(workload, dataset, device="cuda", **settings)
    baseline = baseline_from(clean, "test", "cuda", {})
    planted = testing.slow_down(workload, 1.0, modes=("amp_bf16",), step_time_s=clean.modes["amp_bf16"].step_time_s)
    m, verdict = gate(planted, dataset, device="cuda", baseline=baseline, **settings)
    assert m.modes["amp_bf16"].step_time_s > 1.5 * clean.modes["amp_bf16"].step_time_s
    assert checks(verdict, "speedup")["amp_bf16"].outcome == FAIL, verdict.explain()


@cuda
def test_gpu_forced_fp32_layer_fails_coverage_and_names_the_layer():
    workload = mnist_mlp().with_options(batch_size=256, data_options={"n_train": 2048, "n_test": 512})
    _m, verdict = gate(testing.force_fp32_layer(workload), workload.dataset("cuda"), device="cuda")
    for mode in ("amp_fp16", "amp_bf16"):
        check = checks(verdict, "precision_coverage")[mode]
        assert check.outcome == FAIL and "fp32: 1.layer" in check.why, verdict.explain()


# --- 7. the slowdown plant shows in a launch-bound step ---------------------------------------------------


def test_calibration_scales_the_delay_to_the_measured_drop():
    """A step that hides 60% of the planted delay (launch-bound slack): calibrated, the drop is the one named."""
    clean = 1e-3

    def achieved(delay):
        return 0.4 * delay / clean

    delay = delays.calibrate_delay(achieved, 0.25, 0.25 * clean)
    assert achieved(delay) == pytest.approx(0.25, rel=0.01)


def test_calibration_fits_every_point_so_one_noisy_measurement_moves_it_by_its_share_only():
    """The true slope is 0.4 per ms; the second measurement lands 50% high (a busy moment).  Scaled
    by the last point alone, the delay would come out 1.5x too short; fitted through every point,
    it lands within 10%."""
    clean, noise = 1e-3, iter([1.0, 1.5, 1.0, 1.0])

    def achieved(delay):
        return 0.4 * delay / clean * next(noise)

    delay = delays.calibrate_delay(achieved, 0.25, 0.25 * clean, iterations=4)
    assert 0.4 * delay / clean == pytest.approx(0.25, rel=0.10)
