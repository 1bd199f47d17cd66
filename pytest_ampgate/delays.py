"""Delays of a known length on the host and the GPU, and their sizing against a measured step.

Two parts of the project spend time on purpose: the launch-bound probe of the timing protocol keeps
the GPU busy with a ``torch.cuda._sleep`` kernel while the host enqueues the steps, and the slowdown
plant (:func:`pytest_ampgate.testing.slow_down`) lengthens a mode's steps by a fraction of their
time.  Both need the same facts, kept here once: how long one sleep cycle lasts on this GPU, a spin
counted in thread CPU time, and (for the plant) the delay whose measured effect is the one named.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from .errors import WorkloadError
from .modes import gpu_cycles_per_second

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
    :func:`calibrate_delay` corrects against the measured drop).  CPU: a busy-wait.
    """
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.cuda.device(index):
            torch.cuda._sleep(max(1, int(seconds * gpu_cycles_per_second(index))))
    busy_wait(seconds)


def fresh_model(workload: Workload) -> nn.Module:
    """One model from the workload's factory without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        return workload.model_factory()


# --- sizing a delay against the step it slows ------------------------------------------------------


def calibrate_delay(achieved: Callable[[float], float], fraction: float, first: float, iterations: int = 2) -> float:
    """The delay whose measured slowdown is ``fraction``, by secant steps through (0, 0).

    ``achieved(delay)`` measures the relative slowdown a delay really causes (planted step time /
    clean step time - 1).  A delay can be hidden in part (launch-bound slack) or counted up to
    twice (host and device), so the first guess ``first`` is scaled by ``fraction / achieved``
    until the measured drop matches.  A delay that shows no effect at all is returned as is.
    """
    delay_s = first
    for _ in range(iterations):
        if delay_s <= 0 or fraction <= 0:
            break
        got = achieved(delay_s)
        if got <= 0:
            break
        delay_s *= fraction / got
    return delay_s


def calibration_config(steps_per_block: int = 10):
    """The short protocol a delay is sized with: a few timed rounds, no memory pass, no coverage."""
    from .measurement import MeasureConfig

    return MeasureConfig(warmup_steps=3, rounds=4, steps_per_block=steps_per_block, memory_steps=0, precision_coverage=False)


def calibrate_cpu_spin(workload: Workload, fraction: float, modes: Sequence[str], pairs: int = 60) -> dict[str, float]:
    """Per mode, the CPU seconds of spin that make a CPU training step ``1 + fraction`` times as costly.

    Measured in thread CPU time, which other processes do not inflate, with steps alternating
    with and without the spin so that drift in the machine's speed cancels: the ratio of the
    medians gives the spin's real cost, and two secant steps from the first guess
    ``fraction`` x the step size the spin.  Modes the CPU cannot run get no spin.
    """
    from .mode_runner import prepare
    from .modes import unsupported_reason
    from .precision_policy import numerics_policy
    from .profiles import cpu_threads

    dataset = workload.dataset("cpu")
    model = fresh_model(workload)
    spins = {}
    for mode in modes:
        if unsupported_reason(mode, "cpu"):
            continue
        runner = prepare(mode, model, workload.optimizer_factory, workload.loss_fn, "cpu")

        def relative_cost(spin: float, mode=mode, runner=runner) -> tuple[float, float]:
            """(median clean step, median step with the spin, spin included), steps alternating."""
            costs: tuple[list, list] = ([], [])
            with numerics_policy(mode), cpu_threads("cpu"):  # the thread count the gate measures with
                for i in range(2 * pairs + 4):
                    x, y = dataset.batch(runner.steps_taken, workload.batch_size)
                    begin = time.thread_time()
                    busy_wait(spin if i % 2 else 0.0)
                    runner.step(x, y)
                    if i >= 4:
                        costs[i % 2].append(time.thread_time() - begin)
            return statistics.median(costs[0]), statistics.median(costs[1])

        spin = fraction * relative_cost(0.0)[0]
        for _ in range(2):  # secant steps through (0, clean); a spin costs at least itself
            if spin <= 0:
                break
            clean, slowed = relative_cost(spin)
            spin = fraction * clean / max((slowed - clean) / spin, 1.0)
        spins[mode] = spin
    return spins


def calibrate_cuda_delay(
    workload: Workload,
    fraction: float,
    modes: Sequence[str],
    device,
    calibration=None,
    *,
    planted: Callable[[Mapping[str, float]], Workload],
) -> dict[str, float]:
    """Per mode, the delay that slows a CUDA step by ``fraction``, calibrated against the measured drop.

    The clean step times come from one short measurement; each guess is planted (``planted``
    returns the workload with those per-mode delays) and measured the same way
    (:func:`calibrate_delay`), so the plant shows in the timing whether the step is launch-bound
    or GPU-bound.
    """
    clean = measure_step_times(workload, modes, device, calibration)
    delays = {}
    for mode in modes:

        def achieved(delay_s: float, mode=mode) -> float:
            return measure_step_times(planted({mode: delay_s}), [mode], device, calibration)[mode] / clean[mode] - 1.0

        delays[mode] = calibrate_delay(achieved, fraction, fraction * clean[mode])
    return delays


def measure_step_times(workload: Workload, modes, device, calibration=None) -> dict[str, float]:
    """Median step time per mode from one short measurement (CUDA events on a GPU)."""
    from .measurement import measure

    config = calibration or calibration_config()
    m = measure(workload, [x for x in modes if x != config.reference_mode] or list(modes), device=device, config=config)
    times = {name: mm.step_time_s for name, mm in m.modes.items()}
    times[m.reference.mode] = m.reference.step_time_s
    bad = [x for x in modes if not times.get(x)]
    if bad:
        raise WorkloadError(f"slow_down: could not time {', '.join(bad)} on {device} to size the delay")
    return times
