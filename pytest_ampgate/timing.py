"""Timing a block of training steps: CUDA events on the GPU, the measuring thread's CPU time on the CPU.

Each block is bracketed by two events and synchronised once, at its end; the losses stay on the
device meanwhile and are read back after it.  Beside the device time the host's enqueue time is
kept, and a probe with every kernel queued in advance gives the device's own work per step: the
two together say whether a step is bound by kernel launches (:class:`LaunchBound`), where AMP
cannot pay off.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .data import DeviceDataset
from .mode_runner import ModeRunner
from .precision_policy import numerics_policy
from .results import ModeMeasurement
from .stats import median

LAUNCH_BOUND_IDLE = 0.25
"""A step is launch-bound when its device idles at least this share of it.  A GPU-bound step keeps
the launch queue full and its device idle close to 0%; any sizeable idle share means the device
waits for the host, so the step cannot get shorter than the host's launch time, which AMP only
lengthens (casts, scaler ops).  A quarter leaves room for the probe's noise either way."""


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_context(device: torch.device):
    """The CUDA device context for ``device`` (so events, ``_sleep`` and streams follow cuda:N), or nothing."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.device(device if device.index is not None else torch.cuda.current_device())
    return contextlib.nullcontext()


@contextlib.contextmanager
def no_cyclic_gc() -> Iterator[None]:
    """Cyclic garbage collection off inside a timed block: a collection would land in one mode's time."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@dataclass(frozen=True)
class BlockTiming:
    """One block of steps: its elapsed time (device time on CUDA) and the host's time to enqueue it."""

    seconds: float
    host_s: float


@dataclass(frozen=True)
class Probe:
    """What the device-idle probe measured per step: the device's own work, and the host's launch cost."""

    busy_s: float
    """Device time per step with every kernel queued in advance."""
    host_s: float
    """Host time to enqueue one step while the device was held busy: launching alone, never waiting on the device."""


def cpu_clock() -> Callable[[], float]:
    """The CPU's clock: the measuring thread's CPU time, or wall-clock under torch.distributed.

    The CPU profile measures on one intra-op thread (``profiles.CPU_THREADS``), and autograd runs a
    CPU backward in the calling thread, so that thread's CPU time (``time.thread_time``) is the
    step's whole work; other processes on a shared machine delay it but do not lengthen it (on the
    2-core CI VM under load the widest speedup interval fell from 53% to 14%, BENCHMARKS.md).  The
    planted slowdowns' CPU work counts on the same clock (``delays.cpu_work``).  Under torch.distributed a
    step also waits for the other ranks (gloo's own threads move the gradients), a real cost that
    CPU time would leave out, so there it is ``perf_counter``.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return time.perf_counter
    return time.thread_time


class CpuTimer:
    """The CPU: the host does the work, so elapsed and host time are one reading of :func:`cpu_clock`."""

    def __init__(self, clock: Callable[[], float] | None = None):
        self.clock = clock or cpu_clock()

    def time(self, runner: ModeRunner, run: Callable[[], list]) -> tuple[BlockTiming, list]:
        begin = self.clock()
        losses = run()
        seconds = self.clock() - begin
        return BlockTiming(seconds, seconds), losses

    def busy(self, runner: ModeRunner, run: Callable[[], list], steps: int, host_step_s: float) -> tuple[Probe | None, list]:
        """No launch queue on the CPU: nothing to probe."""
        return None, run()


class CudaTimer:
    """CUDA events around the block, one synchronisation at its end; the host's enqueue time beside it."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)

    def time(self, runner: ModeRunner, run: Callable[[], list]) -> tuple[BlockTiming, list]:
        with device_context(self.device):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            begin = time.perf_counter()
            losses = run()
            end.record()
            host = time.perf_counter() - begin
            end.synchronize()
            return BlockTiming(start.elapsed_time(end) / 1000.0, host), losses

    def busy(self, runner: ModeRunner, run: Callable[[], list], steps: int, host_step_s: float) -> tuple[Probe | None, list]:
        """Device time of ``steps`` steps with every kernel queued before the device starts them.

        A ``torch.cuda._sleep`` kernel keeps the device busy while the host enqueues the steps; the
        time from an event after the sleep to one after the steps is then the device's own work,
        without the gaps where it waited for the host, and the host's time to enqueue them is its
        launch cost alone (it never blocked on the device).  If the sleep ended before the host
        finished (a host sync in the step, a full launch queue), the probe says nothing: None.
        """
        from .modes import gpu_cycles_per_second

        with device_context(self.device):
            index = torch.cuda.current_device()
            torch.cuda.synchronize()
            sleep_s = min(max(4 * host_step_s * steps, 2e-3), 0.2)
            after_sleep, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(max(1, int(sleep_s * gpu_cycles_per_second(index))))
            after_sleep.record()
            begin = time.perf_counter()
            losses = run()
            host = time.perf_counter() - begin
            end.record()
            covered = not after_sleep.query()
            end.synchronize()
            if not covered:
                return None, losses
            return Probe(after_sleep.elapsed_time(end) / 1000.0 / steps, host / steps), losses


def default_timer(device: torch.device):
    return CudaTimer(device) if torch.device(device).type == "cuda" else CpuTimer()


def timed_block(runner: ModeRunner, dataset: DeviceDataset, batch_size: int, steps: int, timer=None) -> tuple[BlockTiming, list[float]]:
    """Run ``steps`` training steps under the mode's numerics, cyclic GC off; return (timing, losses).

    On CUDA the block is bracketed by two events and synchronised once at its end; the losses,
    kept on the device meanwhile, are read back only after that.
    """
    timer = timer or default_timer(runner.device)

    def run() -> list:
        return [runner.step(*dataset.batch(runner.steps_taken, batch_size)) for _ in range(steps)]

    with numerics_policy(runner.mode), no_cyclic_gc():
        timing, losses = timer.time(runner, run)
    return timing, read_losses(losses)


def time_block(runner: ModeRunner, dataset: DeviceDataset, batch_size: int, steps: int, timer=None) -> tuple[float, list[float]]:
    """Run ``steps`` training steps; return (seconds, losses).  See :func:`timed_block`."""
    timing, losses = timed_block(runner, dataset, batch_size, steps, timer)
    return timing.seconds, losses


def read_losses(losses: list[torch.Tensor]) -> list[float]:
    return torch.stack(losses).float().cpu().tolist() if losses else []


@dataclass(frozen=True)
class LaunchBound:
    """Whether a mode's step is bound by the host launching kernels, with the numbers that say so."""

    mode: str
    step_s: float
    """Device time per step in the timed rounds (median)."""
    host_s: float
    """Host time to launch one step: the probe's where it measured one, else the timed rounds' median."""
    busy_s: float
    """Device time per step when its kernels were all queued in advance (the device's own work)."""

    @property
    def idle_share(self) -> float:
        return max(0.0, 1.0 - self.busy_s / self.step_s) if self.step_s > 0 else 0.0

    @property
    def bound(self) -> bool:
        return self.idle_share >= LAUNCH_BOUND_IDLE

    def describe(self) -> str:
        return (
            f"{self.mode} is launch-bound: its GPU works {self.busy_s * 1e3:.3g} ms of each {self.step_s * 1e3:.3g} ms step "
            f"(idle {self.idle_share:.0%}) while the host takes {self.host_s * 1e3:.3g} ms to launch it"
        )


def launch_bound(mm: ModeMeasurement) -> LaunchBound | None:
    """The launch-bound diagnosis of one measured mode, or None where it could not be probed (CPU, host syncs)."""
    if mm.busy_step_s is None or not mm.step_times_s or not mm.host_times_s:
        return None
    host = mm.probe_host_step_s if mm.probe_host_step_s is not None else median(mm.host_times_s)
    return LaunchBound(mm.mode, median(mm.step_times_s), host, mm.busy_step_s)


def launch_diagnosis(reference: ModeMeasurement, mm: ModeMeasurement, device: str, floor: float) -> str:
    """Why a speedup ``floor`` against the reference is out of reach for ``mm`` on this device at this size, or ''.

    Two ways to know, both from the device-idle probe: the reference leaves the device idle a
    large share of each step (it is waiting for the host, so no mode can beat the host's launch
    time, and AMP launches more); or the mode's own launch cost, as the probe measured it with the
    device held busy, already exceeds what the floor allows (a block cannot end before its last
    kernel is launched).  Never from the timed blocks' host time: that grows with any host-side
    regression (an extra cast, a new ``.item()``) and with the host blocking on a full launch queue,
    exactly what the gate exists to catch.  Only the floor against the reference may be excused so;
    the stored baseline is gated whatever this says (see :func:`pytest_ampgate.checks.speedup_check`).
    """
    bound = launch_bound(reference)
    if bound is not None and bound.bound:
        return bound.describe()
    if not device.startswith("cuda") or mm.busy_step_s is None or mm.probe_host_step_s is None or not reference.step_times_s:
        return ""
    ref_step, host = median(reference.step_times_s), mm.probe_host_step_s
    ceiling = ref_step / host if host > 0 else float("inf")
    if ceiling >= floor:
        return ""
    return (
        f"{mm.mode} is launch-bound: the host takes {host * 1e3:.3g} ms to launch its step, so it can be at most "
        f"{ceiling:.2f}x faster than {reference.mode}'s {ref_step * 1e3:.3g} ms step, below the floor"
    )
