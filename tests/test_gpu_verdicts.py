"""GPU verdicts that hold on a real GPU, tested on the CPU with fakes at the hardware boundary.

A fake timing source stands in for CUDA events and the launch-bound probe, a fake NVML for the
per-process utilisation samples and violation counters, fake ``torch.cuda`` context/event objects
for ``cuda:N``; peak memory is measured for real on the CPU (profiler allocation events).
"""

import dataclasses
import gc
import os
import time
import types

import pytest
import torch
from torch import nn

from pytest_ampgate import delays, modes, testing
from pytest_ampgate import measurement as measure_mod
from pytest_ampgate.config import build_config
from pytest_ampgate.gate import decide, evaluate
from pytest_ampgate.gpu_noise import GpuProcess, NoiseReport, WindowNoise, open_noise_window
from pytest_ampgate.measurement import MeasureConfig, measure
from pytest_ampgate.records import from_dict, to_dict
from pytest_ampgate.stats import abba_order, balance_counts
from pytest_ampgate.timing import BlockTiming, CudaTimer, Probe, launch_bound
from pytest_ampgate.verdict import FAIL, INCONCLUSIVE, PASS, SKIPPED
from pytest_ampgate.workloads import Workload

TINY = MeasureConfig(warmup_steps=2, rounds=4, steps_per_block=2, memory_steps=0, precision_coverage=False)


def tiny_workload(model=None, optimizer=None, n=128, features=8, batch=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, features, generator=g)
    y = (x[:, 0] > 0).long()
    return Workload(
        name="tiny",
        model_factory=model or (lambda: nn.Sequential(nn.Linear(features, 16), nn.ReLU(), nn.Linear(16, 2))),
        data=(x, y, x[:32], y[:32]),
        loss_fn=nn.CrossEntropyLoss(),
        optimizer_factory=optimizer or (lambda p: torch.optim.SGD(p, lr=0.1)),
        batch_size=batch,
    )


# --- 1. launch-bound steps -------------------------------------------------------------------------


class FakeTimer:
    """A CUDA-like timing source: per mode, (device time per step, host enqueue time per step, busy time per step
    [, host launch time per step while the probe held the device busy: the timed host time unless given])."""

    def __init__(self, per_mode):
        self.per_mode = per_mode

    def time(self, runner, run):
        losses = run()
        step, host, *_probe = self.per_mode[runner.mode.name]
        return BlockTiming(step * len(losses), host * len(losses)), losses

    def busy(self, runner, run, steps, host_step_s):
        _step, host, busy, *probe_host = self.per_mode[runner.mode.name]
        return Probe(busy, probe_host[0] if probe_host else host), run()


def as_if_on_cuda(m):
    """The fake timer stands in for CUDA events: judge the result as a CUDA run."""
    m.device = "cuda:0"
    return m


# MNIST at batch 4096 on an H100 as the issue describes it: every mode bound by the host, AMP slower.
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


# --- 2. peak memory, on the CPU too, independent of order ----------------------------------------------


def adamw_mlp():
    """Parameter- and optimizer-state-dominated: 2 x 512x512 weights, batch 8."""
    return tiny_workload(
        model=lambda: nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 2)),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
        features=64,
        batch=8,
    )


MEMORY = MeasureConfig(warmup_steps=1, rounds=2, steps_per_block=1, memory_steps=1, precision_coverage=False)


def test_cpu_peak_memory_is_measured_with_what_it_covers():
    m = measure(adamw_mlp(), ["amp_bf16"], device="cpu", config=MEMORY)
    for mm in (m.reference, m.modes["amp_bf16"]):
        parts = mm.memory
        params = sum(p.numel() * 4 for p in adamw_mlp().model_factory().parameters())
        assert parts["parameter_bytes"] == params and parts["optimizer_state_bytes"] >= 2 * params  # AdamW: two moments
        assert parts["gradient_bytes"] == params
        assert mm.peak_memory_bytes >= parts["parameter_bytes"] + parts["optimizer_state_bytes"] + parts["gradient_bytes"]
        assert 0 < mm.activation_memory_bytes < mm.peak_memory_bytes
        assert "optimizer state" in parts["covers"] and "activations" in parts["covers"]
    assert m.comparisons["amp_bf16"].memory_ratio is not None


def test_memory_ratio_does_not_depend_on_mode_order():
    forward = measure(adamw_mlp(), ["amp_bf16"], device="cpu", config=MEMORY)
    reversed_ = measure(adamw_mlp(), ["fp32"], device="cpu", config=MEMORY.__class__(**{**MEMORY.to_dict(), "reference_mode": "amp_bf16"}))
    ratio = forward.comparisons["amp_bf16"].memory_ratio
    again = 1 / reversed_.comparisons["fp32"].memory_ratio  # amp_bf16 set up first this time
    assert again == pytest.approx(ratio, rel=0.02)


def test_parameter_dominated_amp_model_passes_the_default_memory_limit():
    """AMP cannot shrink parameters, gradients or AdamW state: such models sit near 1.0x, and must not fail by default."""
    m = as_if_on_cuda(measure(adamw_mlp(), ["amp_bf16"], device="cpu", config=MEMORY))
    ratio = m.comparisons["amp_bf16"].memory_ratio
    assert 0.9 < ratio < 1.2
    memory = next(c for c in evaluate(m, build_config(("test", {"modes": ["amp_bf16"]}))).checks if c.metric == "memory")
    assert memory.outcome == PASS, memory.why
    assert "activations" in memory.why


# --- 3. noise: only processes that used the GPU during the window, never the run's own ----------------


class FakeNVML(types.SimpleNamespace):
    """Per-process utilisation samples and cumulative violation counters, as NVML reports them."""

    def __init__(self, samples=(), violation_step_ns=0):
        super().__init__(NVML_PERF_POLICY_POWER=0, NVML_PERF_POLICY_THERMAL=1, NVML_PERF_POLICY_RELIABILITY=5)
        self.samples, self.violation_step_ns, self.reads, self.handles = list(samples), violation_step_ns, 0, []

    def nvmlDeviceGetHandleByIndex(self, index):
        self.handles.append(index)
        return f"gpu{index}"

    def nvmlDeviceGetProcessUtilization(self, handle, since_us):
        return [s for s in self.samples if s.timeStamp > since_us]

    def nvmlDeviceGetViolationStatus(self, handle, policy):
        self.reads += 1
        return types.SimpleNamespace(violationTime=(self.reads // 3) * self.violation_step_ns if policy == 0 else 0)

    def nvmlSystemGetProcessName(self, pid):
        return f"proc{pid}"

    def nvmlShutdown(self):
        pass


def sample(pid, sm, mem=0):
    return types.SimpleNamespace(pid=pid, smUtil=sm, memUtil=mem, timeStamp=int(time.time() * 1e6) + 10_000_000)


def windowed(samples=(), own=(), violation_step_ns=0, device="cuda:0"):
    window = open_noise_window(device, pynvml=FakeNVML(samples, violation_step_ns), own_pids={os.getpid(), *own})
    time.sleep(0.02)
    return window.close()


def failing_measurement(window=None):
    """amp_fp16 far below its floor on a GPU-bound step; NVML's snapshots list an idle xdist sibling."""
    from tests.test_gate import estimate, measured

    sibling = NoiseReport(available=True, other_processes=(GpuProcess(pid=4242, used_memory_bytes=500 << 20),))
    noise = {"before": to_dict(sibling), "after": to_dict(sibling)}
    if window is not None:
        noise["window"] = to_dict(window)
    return measured(speedup={"amp_fp16": estimate(0.7, 0.65, 0.75)}, noise=noise)


def test_idle_processes_and_this_process_under_its_nvml_pid_are_not_noise():
    window = windowed(samples=[sample(4242, sm=0), sample(4343, sm=70)], own={4343})
    assert window.available and not window.noisy and window.ignored_own_pids == (4343,)
    verdict = evaluate(failing_measurement(window), build_config(("test", {"modes": ["amp_fp16"], "missing_baseline": "ignore"})))
    assert next(c for c in verdict.checks if c.metric == "speedup").outcome == FAIL


def test_a_process_that_used_the_gpu_during_the_window_makes_a_fail_inconclusive():
    window = windowed(samples=[sample(5151, sm=40, mem=10)])
    assert window.noisy and window.busy_processes[0].pid == 5151
    speed = next(
        c for c in evaluate(failing_measurement(window), build_config(("test", {"modes": ["amp_fp16"]}))).checks if c.metric == "speedup"
    )
    assert speed.outcome == INCONCLUSIVE and "pid 5151 proc5151 (SM 40%" in speed.why


def test_throttling_is_read_from_counters_across_the_window():
    window = windowed(violation_step_ns=10_000_000)  # 10 ms of power capping accrued while timing
    assert window.throttle and "power limit" in window.describe()
    speed = next(
        c for c in evaluate(failing_measurement(window), build_config(("test", {"modes": ["amp_fp16"]}))).checks if c.metric == "speedup"
    )
    assert speed.outcome == INCONCLUSIVE and "power limit" in speed.why
    assert from_dict(WindowNoise, to_dict(window)) == window


# --- 4. cuda:N ------------------------------------------------------------------------------------


class FakeCuda:
    """torch.cuda's device context, events and _sleep, recording which device each call landed on."""

    def __init__(self, monkeypatch):
        self.current, self.events, self.sleeps = 0, [], []
        fake = self

        class Device:
            def __init__(self, device):
                self.index = device.index if isinstance(device, torch.device) else int(device)

            def __enter__(self):
                self.previous, fake.current = fake.current, self.index

            def __exit__(self, *exc):
                fake.current = self.previous

        class Event:
            def __init__(self, enable_timing=False):
                fake.events.append(fake.current)
                self.t = None

            def record(self):
                self.t = time.perf_counter()

            def synchronize(self):
                pass

            def query(self):
                return False

            def elapsed_time(self, other):
                return (other.t - self.t) * 1000.0

        monkeypatch.setattr(torch.cuda, "device", Device)
        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: fake.current)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
        monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: fake.sleeps.append((fake.current, cycles)))
        monkeypatch.setattr(modes, "gpu_cycles_per_second", lambda index: 1e9)  # the timing probe's
        monkeypatch.setattr(delays, "gpu_cycles_per_second", lambda index: 1e9)  # the planted delay's


def test_events_and_the_probe_run_on_cuda_n(monkeypatch):
    fake = FakeCuda(monkeypatch)
    runner = types.SimpleNamespace(mode=types.SimpleNamespace(name="fp32"))
    timer = CudaTimer(torch.device("cuda:1"))
    timing, losses = timer.time(runner, lambda: [1, 2])
    assert fake.events == [1, 1] and timing.host_s >= 0 and losses == [1, 2]
    probe, _ = timer.busy(runner, lambda: [1], 1, 1e-4)
    assert fake.events[2:] == [1, 1] and fake.sleeps and all(d == 1 for d, _ in fake.sleeps) and probe is not None
    assert probe.busy_s >= 0 and probe.host_s >= 0
    assert fake.current == 0  # left as found


def test_the_slowdown_plant_sleeps_on_cuda_n_and_spins_the_host(monkeypatch):
    fake = FakeCuda(monkeypatch)
    spins = []
    monkeypatch.setattr(delays, "busy_wait", spins.append)
    delays.delay(torch.device("cuda:1"), 0.002)
    assert fake.sleeps == [(1, 2_000_000)] and spins == [0.002]


def test_the_noise_window_follows_cuda_n():
    nvml = FakeNVML()
    open_noise_window("cuda:3", pynvml=nvml, own_pids={os.getpid()}).close()
    assert nvml.handles == [3]


# --- 5. one mode's exception fails that mode only, naming the phase --------------------------------------


class RaisesIn(nn.Module):
    """Raises ``exc`` in ``mode`` once it has run ``after`` forwards in it (training or, with eval=True, evaluation)."""

    def __init__(self, mode, exc, after=0, eval_only=False):
        super().__init__()
        self.layer = nn.Linear(8, 2)
        self.mode, self.exc, self.after, self.eval_only, self.calls = mode, exc, after, eval_only, 0

    def forward(self, x):
        if testing.running_mode(x, self) == self.mode and (self.training != self.eval_only):
            self.calls += 1
            if self.calls > self.after:
                raise self.exc
        return self.layer(x)


@pytest.mark.parametrize(
    "after, eval_only, phase", [(0, False, "set-up"), (2, False, "warm-up"), (3, False, "timed round 1"), (0, True, "evaluation")]
)
def test_a_value_error_in_one_mode_fails_that_mode_and_names_the_phase(after, eval_only, phase):
    exc = ValueError("Attempting to unscale FP16 gradients.")
    config = MeasureConfig(warmup_steps=2, rounds=2, steps_per_block=1, memory_steps=0, precision_coverage=True)
    m = measure(tiny_workload(model=lambda: RaisesIn("amp_bf16", exc, after, eval_only)), ["amp_bf16", "bf16"], device="cpu", config=config)
    bad = m.modes["amp_bf16"]
    assert bad.failed_phase == phase and bad.error == "ValueError: Attempting to unscale FP16 gradients."
    assert m.reference.ok and m.reference.accuracy is not None and m.modes["bf16"].ok
    check = next(c for c in evaluate(m, build_config(("test", {"modes": ["amp_bf16", "bf16"]}))).checks if c.metric == "ran")
    assert check.outcome == FAIL and check.why.startswith(f"amp_bf16 failed in {phase}: ValueError")


def test_keyboard_interrupt_still_stops_the_run():
    model = lambda: RaisesIn("amp_bf16", KeyboardInterrupt(), after=1)  # noqa: E731
    with pytest.raises(KeyboardInterrupt):
        measure(tiny_workload(model=model), ["amp_bf16"], device="cpu", config=TINY)


# --- 6. TF32 switches readable through the legacy API while every mode runs --------------------------


class ReadsLegacyFlags(nn.Module):
    def __init__(self, seen):
        super().__init__()
        self.layer, self.record = nn.Linear(8, 2), seen.append  # a builtin method: every mode's deep copy shares it

    def forward(self, x):
        self.record(
            (
                testing.running_mode(x, self),
                torch.backends.cuda.matmul.allow_tf32,
                torch.backends.cudnn.allow_tf32,
                torch.get_float32_matmul_precision(),
            )
        )
        return self.layer(x)


def test_legacy_tf32_readers_work_while_each_mode_runs_and_matmul_precision_is_restored():
    seen = []
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        m = measure(tiny_workload(model=lambda: ReadsLegacyFlags(seen)), ["amp_bf16", "bf16"], device="cpu", config=TINY)
        assert all(mm.ok for mm, _ in m.each_mode()), [mm.error for mm, _ in m.each_mode()]
        measured = seen[1:]  # seen[0] is the fit check on the user's model, before any mode runs
        assert seen[0][1:] == (True, True, "medium")
        assert {s[0] for s in measured} == {"fp32", "amp_bf16", "bf16"}
        assert all(s[1:] == (False, False, "highest") for s in measured), set(measured)
        assert torch.get_float32_matmul_precision() == "medium"  # "medium" stays "medium"
        assert torch.backends.cuda.matmul.allow_tf32 is True and torch.backends.cudnn.allow_tf32 is True
    finally:
        torch.set_float32_matmul_precision(before)


# --- 7. the slowdown plant shows in a launch-bound step ---------------------------------------------------


def test_calibration_scales_the_delay_to_the_measured_drop():
    """A step that hides 60% of the planted delay (launch-bound slack): calibrated, the drop is the one named."""
    clean = 1e-3

    def achieved(delay):
        return 0.4 * delay / clean

    delay = delays.calibrate_delay(achieved, 0.25, 0.25 * clean)
    assert achieved(delay) == pytest.approx(0.25, rel=0.01)


# --- 8. timing hygiene and the gate's own cost ------------------------------------------------------------


class RecordsGC(nn.Module):
    def __init__(self, seen):
        super().__init__()
        self.layer, self.record = nn.Linear(8, 2), seen.append  # shared by every mode's deep copy

    def forward(self, x):
        self.record(gc.isenabled())
        return self.layer(x)


def test_cyclic_gc_is_off_inside_timed_blocks_only(monkeypatch):
    seen, in_block = [], []
    real = measure_mod.timed_block

    def spy(*args, **kwargs):
        start = len(seen)
        out = real(*args, **kwargs)
        in_block.extend(seen[start:])
        return out

    monkeypatch.setattr(measure_mod, "timed_block", spy)
    assert gc.isenabled()
    measure(tiny_workload(model=lambda: RecordsGC(seen)), ["amp_bf16"], device="cpu", config=TINY)
    assert in_block and not any(in_block)
    assert gc.isenabled()


@pytest.mark.parametrize("n", [3, 4])
def test_three_or_more_modes_are_equally_often_first_last_and_back_to_back(n):
    labels = list("ABCD")[:n]
    counts = balance_counts(abba_order(labels, 2 * n))
    assert len(set(counts.values())) == 1, counts
    assert counts["A"][0] == 2 and counts["A"][1] == 2


def test_the_dataset_is_built_once_per_process_and_device():
    calls = []

    def data(device, **options):
        calls.append(str(device))
        return tiny_workload().dataset(device)

    workload = Workload(
        "tiny_cached",
        lambda: nn.Sequential(nn.Linear(8, 2)),
        data,
        nn.CrossEntropyLoss(),
        lambda p: torch.optim.SGD(p, lr=0.1),
        batch_size=16,
    )
    config = build_config(
        (
            "test",
            {
                "modes": ["amp_bf16"],
                "check_speed": True,
                "min_speedup": 100.0,
                "rounds": 2,
                "steps_per_block": 1,
                "warmup_steps": 0,
                "memory_steps": 0,
                "missing_baseline": "ignore",
            },
        )
    )
    decide(lambda: measure(workload, ["amp_bf16"], device="cpu", config=config.measure_config()), config)  # measures, then confirms
    measure(workload, ["amp_bf16"], device="cpu", config=TINY)
    assert calls == ["cpu"]


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
    import json

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


def test_a_mode_whose_own_launch_time_rules_out_the_floor_is_stated_not_failed():
    """fp32 mostly busy (10% idle), but amp_bf16's host launch time alone caps it at 0.8x: the 1.2x floor is out of reach."""
    timings = {"fp32": (200e-6, 150e-6, 180e-6), "amp_bf16": (260e-6, 250e-6, 60e-6)}
    m = as_if_on_cuda(measure(tiny_workload(), ["amp_bf16"], device="cpu", config=TINY, timer=FakeTimer(timings)))
    assert not launch_bound(m.reference).bound
    speed = next(c for c in evaluate(m, build_config(("test", {"modes": ["amp_bf16"]}))).checks if c.metric == "speedup")
    assert speed.outcome == SKIPPED and "at most 0.80x faster than fp32's 0.2 ms step" in speed.why, speed.why
