"""Delays of a known length on the host and the GPU, and their sizing against a measured step.

Two parts of the project spend time on purpose: the launch-bound probe of the timing protocol keeps
the GPU busy with a ``torch.cuda._sleep`` kernel while the host enqueues the steps, and the slowdown
plant (:func:`pytest_ampgate.testing.slow_down`) lengthens a mode's steps by a fraction of their
time.  Both need the same facts, kept here once: how long one sleep cycle lasts on this GPU, a spin
counted in thread CPU time, a count of CPU work, and (for the plant) the delay whose measured
effect is the one named.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from .errors import WorkloadError
from .modes import gpu_cycles_per_second, unsupported_reason

if TYPE_CHECKING:
    from .workloads import Workload


def busy_wait(cpu_seconds: float) -> None:
    """Spin until the calling thread has used ``cpu_seconds`` of CPU time.

    CPU time, not wall time: on a shared machine the spin is then stretched by other processes
    exactly as the step's own computation is, so a plant sized against the step stays that size.
    """
    end = time.thread_time() + cpu_seconds
    while time.thread_time() < end:
        pass


def delay(device: torch.device, seconds: float) -> None:
    """Delay one step by ``seconds`` wherever the step is bound.

    CUDA: a host spin *and* a ``torch.cuda._sleep`` kernel of that length on ``device`` (under its
    context, so cuda:N sleeps on N).  A launch-bound step (the GPU idles while the host launches
    kernels) hides a GPU sleep in its slack, and a GPU-bound one hides a host spin in the host's
    lead; with both, the step grows by the delay either way (up to twice it in between, which
    :func:`calibrate_delay` corrects against the measured drop).  CPU: :func:`cpu_work`.
    """
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.cuda.device(index):
            torch.cuda._sleep(max(1, int(seconds * gpu_cycles_per_second(index))))
        busy_wait(seconds)
    else:
        cpu_work(seconds)


_WORK_UNIT: dict[str, object] = {}
"""The CPU plant's unit of work (its tensors) and its measured cost, made once per process."""


def cpu_work_unit_s() -> float:
    """CPU seconds of one unit of :func:`cpu_work`, measured once per process: the least of seven batches.

    The least, because a busy moment only ever adds to it: two processes then agree on it, and a
    length calibrated in one process is the same work in another.  Measure it before anything is
    profiled (:func:`pytest_ampgate.testing.slow_down` does, when it plants): under the memory
    pass's profiler every op costs several times as much, and the plant would shrink to a third.
    """
    if not _WORK_UNIT:
        a, out = torch.randn(16384), torch.empty(16384)
        for _ in range(50):
            torch.add(a, a, out=out)
        costs = []
        for _ in range(7):
            begin = time.thread_time()
            for _ in range(200):
                torch.add(a, a, out=out)
            costs.append((time.thread_time() - begin) / 200)
        _WORK_UNIT.update(tensors=(a, out), seconds=min(costs))
    return _WORK_UNIT["seconds"]


def cpu_work(seconds: float) -> None:
    """About ``seconds`` of real CPU work: a whole number of passes of an elementwise fp32 op, as many as cost that long.

    A count of operations, not a time: when the machine slows down (a busy neighbour on a shared
    VM, cold caches) the work slows with it as the step's own operators do, so the plant stays the
    same share of the step; a spin in CPU time does not (its spread between runs was twice the
    step's, BENCHMARKS.md).  Elementwise into a preallocated output: no matmul FLOPs for the
    precision-coverage count, no allocation for the memory pass, the same fp32 work in every mode.
    """
    units = round(seconds / cpu_work_unit_s())
    a, out = _WORK_UNIT["tensors"]
    for _ in range(units):
        torch.add(a, a, out=out)


def fresh_model(workload: Workload) -> nn.Module:
    """One model from the workload's factory without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        return workload.model_factory()


# --- sizing a delay against the step it slows ------------------------------------------------------


def calibrate_delay(achieved: Callable[[float], float], fraction: float, first: float, iterations: int = 2) -> float:
    """The delay whose measured slowdown is ``fraction``: ``fraction`` / the median slope measured.

    ``achieved(delay)`` measures the relative slowdown a delay really causes (planted step time /
    clean step time - 1).  A delay can be hidden in part (launch-bound slack) or counted up to
    twice (host and device), so from the first guess ``first`` each next guess is ``fraction`` /
    the median of achieved / delay over every point measured so far: one noisy measurement (a
    busy moment on a shared machine) cannot carry the answer, where scaling by the last point
    alone carried its whole error (a +25% CPU plant calibrated three times landed at 96, 156
    and 104 units of work).  A delay that shows no effect is returned as is.
    """
    delay_s, slopes = first, []
    for _ in range(iterations):
        if delay_s <= 0 or fraction <= 0:
            break
        slopes.append(achieved(delay_s) / delay_s)
        slope = statistics.median(slopes)
        if slope <= 0:
            break
        delay_s = fraction / slope
    return delay_s


def calibration_config(steps_per_block: int = 10, device_type: str = "cuda"):
    """The short protocol a delay is sized with: a few timed rounds (more on the CPU, whose rounds
    are noisier), no memory pass, no coverage."""
    from .measurement import MeasureConfig

    rounds = 12 if device_type == "cpu" else 4
    return MeasureConfig(warmup_steps=3, rounds=rounds, steps_per_block=steps_per_block, memory_steps=0, precision_coverage=False)


def calibrate_measured_delay(
    workload: Workload,
    fraction: float,
    modes: Sequence[str],
    device,
    calibration=None,
    *,
    planted: Callable[[Mapping[str, float]], Workload],
) -> dict[str, float]:
    """Per mode, the delay that slows a step by ``fraction`` as the gate measures it, on any device.

    Each guess is planted in that mode alone (``planted`` returns the workload with those per-mode
    delays) and measured with the gate's own timed blocks, so the plant is the size it is named
    wherever a delay is partly hidden (launch-bound slack on CUDA) or spills into the next step
    (CPU work that leaves the next step's caches cold).  Each mode is sized by its step time
    *relative to an unplanted mode's in the same run* (the reference's; for the reference itself,
    another of ``modes``), which cancels drift in the machine's speed between the clean and the
    planted measurement (tens of percent on a shared CPU VM); alone, the reference by its step time.
    Modes the device cannot run get no delay (they will not run).
    """
    config = calibration or calibration_config(device_type=torch.device(device).type)
    reference, delays = config.reference_mode, {}
    modes = [x for x in modes if not unsupported_reason(x, device)]
    for mode in modes:
        yardstick = reference if mode != reference else next((x for x in modes if x != reference), None)
        names = [x for x in (mode, yardstick) if x]  # measure_step_times times the reference anyway

        def ratio(times: Mapping[str, float], mode=mode, yardstick=yardstick) -> float:
            return times[mode] / times[yardstick] if yardstick else times[mode]

        measure_step_times(workload, names, device, config)  # the first measurement of a mode runs cold: not a clean figure
        clean = measure_step_times(workload, names, device, config)
        cleans = [ratio(clean)]

        def achieved(delay_s: float, mode=mode, names=names, ratio=ratio, cleans=cleans) -> float:
            slowed = ratio(measure_step_times(planted({mode: delay_s}), names, device, config))
            cleans.append(ratio(measure_step_times(workload, names, device, config)))  # no single clean draw sizes the plant
            return slowed / statistics.median(cleans) - 1.0

        delays[mode] = calibrate_delay(achieved, fraction, fraction * clean[mode], iterations=4)
    return delays


def measure_step_times(workload: Workload, modes, device, config) -> dict[str, float]:
    """Median step time per mode, the reference's included, from one short measurement."""
    from .measurement import measure

    m = measure(workload, [x for x in modes if x != config.reference_mode] or list(modes), device=device, config=config)
    times = {name: mm.step_time_s for name, mm in m.modes.items()}
    times[m.reference.mode] = m.reference.step_time_s
    bad = [x for x in [*modes, m.reference.mode] if not times.get(x)]
    if bad:
        raise WorkloadError(f"slow_down: could not time {', '.join(bad)} on {device} to size the delay")
    return times
