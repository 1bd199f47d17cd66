"""The NVML noise window: only processes that used the GPU during the timed rounds count, never this run's own;
throttling read from counters across the window (fake NVML)."""

from __future__ import annotations

from fakes import sample, windowed

from pytest_ampgate.config import build_config
from pytest_ampgate.gate import evaluate
from pytest_ampgate.gpu_noise import GpuProcess, NoiseReport, WindowNoise
from pytest_ampgate.records import from_dict, to_dict
from pytest_ampgate.verdict import FAIL, INCONCLUSIVE


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
