"""Whether the GPU was quiet enough to trust a timing, as NVML saw it.

A timing is only as good as the GPU was idle: another process on the same GPU, or clocks held
back by a power or thermal limit, makes a step slower for reasons the code under test did not
cause.  :func:`noise_report` takes a snapshot (before and after a measurement), and a
:class:`NoiseWindow` opened around the timed rounds counts what disturbed them: processes that
used the GPU in that window (never this run's own xdist workers, :func:`own_run_pids`) and the
time limits held the clocks back.  A verdict can then say it was measured on a noisy GPU instead of
blaming the model.  NVML is advisory: every failure degrades to "not available" (see :mod:`.nvml`).

The records are frozen dataclasses; ``records.to_dict`` / ``records.from_dict`` carry them to JSON
and back.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from . import gpu_identity, nvml
from .errors import ConfigError
from .modes import DeviceLike, cuda_index, parse_device

__all__ = [
    "BusyProcess",
    "GpuProcess",
    "NoiseReadings",
    "NoiseReport",
    "NoiseWindow",
    "WindowNoise",
    "noise_report",
    "open_noise_window",
    "own_run_pids",
]

# Clock-event reasons that make a step slower than the code alone would: (name, new constant,
# old constant, the bit NVML documents). Benign reasons (gpu_idle, applications_clocks_setting,
# display_clock_setting, sync_boost, user_defined_clocks) are deliberately absent.
_DISTORTING_REASONS = (
    ("sw_power_cap", "nvmlClocksEventReasonSwPowerCap", "nvmlClocksThrottleReasonSwPowerCap", 0x4),
    ("hw_slowdown", "nvmlClocksEventReasonHwSlowdown", "nvmlClocksThrottleReasonHwSlowdown", 0x8),
    ("sw_thermal_slowdown", "nvmlClocksEventReasonSwThermalSlowdown", "nvmlClocksThrottleReasonSwThermalSlowdown", 0x20),
    ("hw_thermal_slowdown", "nvmlClocksEventReasonHwThermalSlowdown", "nvmlClocksThrottleReasonHwThermalSlowdown", 0x40),
    ("hw_power_brake_slowdown", "nvmlClocksEventReasonHwPowerBrakeSlowdown", "nvmlClocksThrottleReasonHwPowerBrakeSlowdown", 0x80),
)


def _opt_int(value: Any) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


# --- a snapshot: before and after a measurement --------------------------------------------------


@dataclass(frozen=True)
class GpuProcess:
    """Another compute process on the GPU being timed: it competes for SMs and memory bandwidth."""

    pid: int
    used_memory_bytes: int | None = None
    name: str | None = None


@dataclass(frozen=True)
class NoiseReport:
    """How far the GPU was from quiet when it was checked, as NVML saw it.

    ``available`` is False (with ``reason``) when NVML could not be read for this device; the other
    fields are then empty. Individual readings NVML refuses (common on consumer GPUs, in containers,
    under MIG) are None, and the names of refused lists are in ``unreadable``.

    In a container with its own PID namespace NVML reports host PIDs, so this process cannot be
    recognised by PID. When this process holds a CUDA context and its PID is not in NVML's list,
    ``own_process_unidentified`` is True and one of ``other_processes`` is presumed to be this one.
    """

    available: bool
    reason: str = ""
    other_processes: tuple[GpuProcess, ...] = ()
    throttle_reasons: tuple[str, ...] = ()
    sm_clock_mhz: int | None = None
    max_sm_clock_mhz: int | None = None
    temperature_c: int | None = None
    utilization_percent: int | None = None
    own_process_unidentified: bool = False
    unreadable: tuple[str, ...] = ()

    @property
    def other_process_count(self) -> int:
        """Processes that are certainly not this one (see ``own_process_unidentified``)."""
        return max(0, len(self.other_processes) - (1 if self.own_process_unidentified else 0))

    @property
    def noisy(self) -> bool:
        """Other processes share the GPU, or its clocks are held back by power or temperature."""
        return self.available and (self.other_process_count > 0 or bool(self.throttle_reasons))

    def describe(self) -> str:
        """One line for reports: what makes the GPU noisy, ``"quiet"``, or why NVML is unavailable."""
        if not self.available:
            return f"NVML not available: {self.reason}"
        parts = []
        count = self.other_process_count
        if count:
            pids = ", ".join(str(p.pid) for p in self.other_processes)
            noun = "process" if count == 1 else "processes"
            note = "; one of them is presumably this process under a host PID" if self.own_process_unidentified else ""
            parts.append(f"GPU shared with {count} other {noun} (pids {pids}{note})")
        if self.throttle_reasons:
            parts.append("clocks held back by " + ", ".join(self.throttle_reasons))
        return _one_line(parts, "quiet", self.unreadable)


def _one_line(parts: list[str], quiet: str, unreadable: tuple[str, ...]) -> str:
    """The line both readings end in: what disturbed the GPU (or ``quiet``), and what NVML could not read."""
    line = "; ".join(parts) if parts else quiet
    return line + (f" (NVML could not read: {', '.join(unreadable)})" if unreadable else "")


def noise_report(device: DeviceLike = "cuda") -> NoiseReport:
    """Check the GPU that ``device`` names for other processes and held-back clocks.

    Never raises and never warns: a missing pynvml, a failing ``nvmlInit`` or an unmappable device
    gives ``available=False`` with the reason; a single refused reading gives None for that field.
    """
    try:
        own_context = bool(torch.cuda.is_initialized())
    except Exception:
        own_context = False
    pynvml, handle, why = nvml.open_device(device)
    if handle is None:
        return NoiseReport(available=False, reason=why)
    try:
        return _read_noise(pynvml, handle, own_context)
    except Exception as exc:  # a pynvml bug must not take the gate down with it
        return NoiseReport(available=False, reason=f"NVML query failed: {nvml.error_text(exc)}")
    finally:
        nvml.shutdown(pynvml)


def _read_noise(pynvml: Any, handle: Any, own_context: bool) -> NoiseReport:
    unreadable = []

    own_pid = os.getpid()
    processes, err = nvml.call(pynvml.nvmlDeviceGetComputeRunningProcesses, handle)
    others = []
    own_seen = False
    if err is not None:
        unreadable.append("processes")
    else:
        for proc in processes or ():
            pid = int(getattr(proc, "pid", -1))
            if pid == own_pid:
                own_seen = True
                continue
            mem = getattr(proc, "usedGpuMemory", None)
            others.append(GpuProcess(pid=pid, used_memory_bytes=mem if isinstance(mem, int) else None, name=nvml.process_name(pynvml, pid)))
    own_unidentified = bool(own_context and not own_seen and others)

    throttle = ()
    getter = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
        pynvml, "nvmlDeviceGetCurrentClocksThrottleReasons", None
    )
    mask, err = nvml.call(getter, handle) if getter is not None else (None, "missing")
    if err is not None or not isinstance(mask, int):
        unreadable.append("clock event reasons")
    else:
        throttle = _decode_reasons(pynvml, mask)

    sm_const = getattr(pynvml, "NVML_CLOCK_SM", 1)
    sm_clock, _ = nvml.call(getattr(pynvml, "nvmlDeviceGetClockInfo", None), handle, sm_const)
    max_sm, _ = nvml.call(getattr(pynvml, "nvmlDeviceGetMaxClockInfo", None), handle, sm_const)
    temp, _ = nvml.call(getattr(pynvml, "nvmlDeviceGetTemperature", None), handle, getattr(pynvml, "NVML_TEMPERATURE_GPU", 0))
    util, _ = nvml.call(getattr(pynvml, "nvmlDeviceGetUtilizationRates", None), handle)

    return NoiseReport(
        available=True,
        reason="",
        other_processes=tuple(others),
        throttle_reasons=throttle,
        sm_clock_mhz=_opt_int(sm_clock),
        max_sm_clock_mhz=_opt_int(max_sm),
        temperature_c=_opt_int(temp),
        utilization_percent=_opt_int(getattr(util, "gpu", None)),
        own_process_unidentified=own_unidentified,
        unreadable=tuple(unreadable),
    )


def _decode_reasons(pynvml: Any, mask: int) -> tuple[str, ...]:
    names = []
    for name, new_const, old_const, documented in _DISTORTING_REASONS:
        bit = getattr(pynvml, new_const, None)
        if not isinstance(bit, int):
            bit = getattr(pynvml, old_const, None)
        if not isinstance(bit, int):
            bit = documented
        if mask & bit:
            names.append(name)
    return tuple(names)


# --- a window: what disturbed the timed rounds ---------------------------------------------------

# NVML violation counters (cumulative nanoseconds a limit held the clocks back): (name, constant, value).
_VIOLATION_POLICIES = (
    ("power", "NVML_PERF_POLICY_POWER", 0),
    ("thermal", "NVML_PERF_POLICY_THERMAL", 1),
    ("reliability", "NVML_PERF_POLICY_RELIABILITY", 5),
)
THROTTLE_SHARE = 0.01
"""Clocks held back for at least this share of the timed window make its timings untrustworthy."""
BUSY_PERCENT = 1
"""A process whose SM or memory utilisation reached this many percent during the window used the GPU."""


@dataclass(frozen=True)
class BusyProcess:
    """Another process that used the GPU while this one timed it: NVML's per-process utilisation."""

    pid: int
    sm_percent: int
    memory_percent: int
    name: str | None = None
    role: str = ""
    """What it is to this run where known, e.g. "xdist worker of this run" (real noise all the same)."""


@dataclass(frozen=True)
class WindowNoise:
    """What disturbed the GPU during the timed rounds, as NVML counted it over that window.

    Only processes that *used* the GPU during the window count (per-process utilisation samples
    since the window began), never this process, recognised in NVML's terms by
    :func:`pytest_ampgate.gpu_identity.identify` (``identified_by`` says how).  This run's xdist
    workers that wait for the device lock run no kernel and are never sampled busy; one that runs
    CUDA work meanwhile is real noise and counts, named as such.  Where NVML's samples cannot be
    attributed (a container whose PIDs it cannot match, MPS, per-process utilisation unsupported on
    MIG or vGPU), ``cannot_tell`` says why and the window is neither busy nor quiet.  Throttling is read from NVML's cumulative violation counters
    at both ends of the window, so a limit that held the clocks back in the middle is seen even if
    it was gone when the window ended.
    """

    available: bool
    reason: str = ""
    window_s: float = 0.0
    busy_processes: tuple[BusyProcess, ...] = ()
    throttled_s: dict[str, float] = field(default_factory=dict)
    ignored_own_pids: tuple[int, ...] = ()
    unreadable: tuple[str, ...] = ()
    identified_by: str = ""
    """How this process was found among NVML's: "pid", "context", "memory" (see gpu_identity)."""
    cannot_tell: str = ""
    """Why the samples could not be attributed to this process or others; '' when they could."""

    @property
    def throttle(self) -> dict[str, float]:
        """The limits that held the clocks back for a share of the window that spoils its timings."""
        return {k: v for k, v in self.throttled_s.items() if self.window_s > 0 and v / self.window_s >= THROTTLE_SHARE}

    @property
    def noisy(self) -> bool:
        """Another process used the GPU during the window, or a limit held its clocks back (never a guess)."""
        return self.available and ((bool(self.busy_processes) and not self.cannot_tell) or bool(self.throttle))

    def describe(self) -> str:
        """One line for reports, as :meth:`NoiseReport.describe` but over the timed window."""
        if not self.available:
            return f"NVML not available: {self.reason}"
        parts = []
        who = ", ".join(
            f"pid {p.pid}{' ' + p.name if p.name else ''}{', ' + p.role if p.role else ''} (SM {p.sm_percent}%, memory {p.memory_percent}%)"
            for p in self.busy_processes
        )
        if self.cannot_tell:
            seen = f"; NVML sampled {who}" if who else ""
            parts.append(f"{CANNOT_TELL}: {self.cannot_tell}{seen}")
        elif self.busy_processes:
            parts.append(
                f"{len(self.busy_processes)} other process{'es' if len(self.busy_processes) > 1 else ''} used the GPU during the timed rounds: {who}"
            )
        for name, seconds in self.throttle.items():
            parts.append(f"clocks held back by the {name} limit for {seconds:.2f} s of the {self.window_s:.2f} s window")
        return _one_line(parts, "quiet during the timed rounds", self.unreadable)


CANNOT_TELL = "cannot tell who used the GPU during the timed rounds"


def own_run_pids() -> set[int]:
    """This process and the other processes of the same pytest run (its xdist controller and sibling workers)."""
    return set(gpu_identity.run_processes())


def _own_gpu_bytes(index: int) -> int | None:
    """What this process's allocator holds on the GPU (NVML counts it, plus the context), or None."""
    try:
        return int(torch.cuda.memory_reserved(index)) if torch.cuda.is_initialized() else None
    except Exception:
        return None


class NoiseWindow:
    """Open at the start of the timed rounds, :meth:`close` at their end: what disturbed the GPU in between."""

    def __init__(self, pynvml: Any = None, handle: Any = None, reason: str = "", own_pids: set[int] | None = None, index: int = 0):
        self.pynvml, self.handle, self.reason = pynvml, handle, reason
        self.own_pids, self.index = own_pids, index
        self.started = time.perf_counter()
        self.since_us = int(time.time() * 1e6)
        self.counters = _violations(pynvml, handle)[0] if handle is not None else {}

    def close(self) -> WindowNoise:
        if self.handle is None:
            return WindowNoise(available=False, reason=self.reason)
        try:
            return self._read()
        except Exception as exc:  # a pynvml bug must not take the gate down with it
            return WindowNoise(available=False, reason=f"NVML query failed: {nvml.error_text(exc)}")
        finally:
            if self.pynvml is not None:
                nvml.shutdown(self.pynvml)

    def _read(self) -> WindowNoise:
        pynvml, handle = self.pynvml, self.handle
        window_s = time.perf_counter() - self.started
        unreadable = []
        cannot_tell = ""
        samples, err = nvml.call(getattr(pynvml, "nvmlDeviceGetProcessUtilization", None), handle, self.since_us)
        # NVML answers "not found" (pynvml sometimes raises "Success") when no process has a
        # sample since the timestamp: nobody used the GPU.  Any other refusal (NVML_ERROR_NOT_SUPPORTED
        # on a MIG or vGPU handle) means noise could not be observed, which is not "quiet".
        if err is not None and "not found" not in err.lower() and "success" not in err.lower():
            unreadable.append("per-process utilisation")
            cannot_tell = f"NVML gives no per-process utilisation for this GPU ({err}; MIG and vGPU do not support it)"
        sampled = {int(getattr(x, "pid", -1)) for x in samples or ()}
        if self.own_pids is not None:
            identity = gpu_identity.Identity(frozenset(self.own_pids), "pid")
        else:
            identity = gpu_identity.identify(pynvml, handle, index=self.index, own_bytes=_own_gpu_bytes(self.index), sample_pids=sampled)
        own = identity.pids
        roles = gpu_identity.run_processes()
        busy: dict[int, tuple[int, int]] = {}
        ignored = set()
        for sample in samples or ():
            pid = int(getattr(sample, "pid", -1))
            sm, mem = int(getattr(sample, "smUtil", 0) or 0), int(getattr(sample, "memUtil", 0) or 0)
            stamp = int(getattr(sample, "timeStamp", self.since_us + 1) or 0)
            if stamp <= self.since_us or max(sm, mem) < BUSY_PERCENT:
                continue
            if pid in own:
                ignored.add(pid)
                continue
            old = busy.get(pid, (0, 0))
            busy[pid] = (max(old[0], sm), max(old[1], mem))
        if busy and identity.unknown and not cannot_tell:
            cannot_tell = identity.unknown
        after, bad = _violations(pynvml, handle)
        unreadable += bad
        throttled = {name: max(0.0, (after[name] - self.counters[name]) / 1e9) for name in after if name in self.counters}
        return WindowNoise(
            available=True,
            window_s=window_s,
            busy_processes=tuple(
                BusyProcess(pid, sm, mem, nvml.process_name(pynvml, pid), roles.get(pid, "")) for pid, (sm, mem) in sorted(busy.items())
            ),
            throttled_s=throttled,
            ignored_own_pids=tuple(sorted(ignored)),
            unreadable=tuple(unreadable),
            identified_by="" if identity.unknown else identity.how,
            cannot_tell=cannot_tell,
        )


def _violations(pynvml: Any, handle: Any) -> tuple[dict[str, int], list[str]]:
    """NVML's cumulative violation time (ns) per clock-limiting policy; unreadable policies left out."""
    getter = getattr(pynvml, "nvmlDeviceGetViolationStatus", None)
    counters, bad = {}, []
    for name, const, value in _VIOLATION_POLICIES:
        status, err = nvml.call(getter, handle, getattr(pynvml, const, value))
        reading = getattr(status, "violationTime", None) if err is None else None
        if isinstance(reading, int):
            counters[name] = reading
        elif name != "reliability":  # not on every GPU; its absence is normal
            bad.append(f"{name} violation counter")
    return counters, bad


def open_noise_window(device: DeviceLike = "cuda", *, pynvml: Any = None, own_pids: set[int] | None = None) -> NoiseWindow:
    """Start watching the GPU ``device`` names (cuda:N follows N); never raises.

    ``pynvml`` replaces the NVML bindings (tests pass a fake one; the device is then its index).
    """
    if pynvml is not None:
        try:
            index = parse_device(device).index
            return NoiseWindow(pynvml, pynvml.nvmlDeviceGetHandleByIndex(index or 0), own_pids=own_pids, index=index or 0)
        except ConfigError as exc:
            return NoiseWindow(reason=str(exc))
        except Exception as exc:
            return NoiseWindow(reason=f"NVML has no handle for this GPU: {nvml.error_text(exc)}")
    pynvml, handle, why = nvml.open_device(device)
    if handle is None:
        return NoiseWindow(reason=why)
    return NoiseWindow(pynvml, handle, own_pids=own_pids, index=_index(device))


def _index(device: DeviceLike) -> int:
    try:
        return cuda_index(parse_device(device))
    except Exception:
        return 0


def note_own_context(device: DeviceLike) -> None:
    """Create this process's CUDA context on ``device`` if it has none yet, noting the NVML PID that
    appeared with it (:func:`pytest_ampgate.gpu_identity.note_context`): in a container that PID is
    this process's, where its own is absent from NVML's lists.  Does nothing where a context exists
    or NVML cannot be read (the measurement creates the context anyway)."""
    has_context = getattr(torch._C, "_cuda_hasPrimaryContext", None)
    index = _index(device)
    try:
        if has_context is None or has_context(index):
            return
    except Exception:
        return
    pynvml, handle, _why = nvml.open_device(device)
    if handle is None:
        return
    try:
        gpu_identity.note_context(pynvml, handle, index, lambda: torch.empty(1, device=torch.device("cuda", index)))
    except Exception:  # advisory: the measurement creates the context and says what fails
        pass
    finally:
        nvml.shutdown(pynvml)


# --- one measurement's readings, and what they say about its timings -------------------------------


@dataclass(frozen=True)
class NoiseReadings:
    """One measurement's noise readings: NVML snapshots before and after it, and its timed window.

    Written under these three names, so results recorded before this record existed still read.
    """

    before: NoiseReport | None = None
    after: NoiseReport | None = None
    window: WindowNoise | None = None

    def untrusted_reason(self) -> str:
        """Why timing on this GPU could not be trusted (other processes, throttling), or ''.

        Where NVML could watch the timed rounds themselves, only what happened in that window counts:
        processes that used the GPU then (never this run's own xdist workers, which hold a CUDA context
        but wait for the device lock), and clocks held back during it.  The snapshots before and after
        timing count only where no window was read (older results).
        """
        if self.window is not None and self.window.available:
            return f"during timing: {self.window.describe()}" if self.window.noisy else ""
        snapshots = (("before", self.before), ("after", self.after))
        return "; ".join(f"{when} timing: {report.describe()}" for when, report in snapshots if report is not None and report.noisy)

    def unobserved_reason(self) -> str:
        """Why it could not be told who used the GPU while timing (container, MPS, MIG), or ''.

        Said beside the verdict, which stands on the timings alone: a regression still fails.
        """
        window = self.window
        return f"{CANNOT_TELL}: {window.cannot_tell}" if window is not None and window.available and window.cannot_tell else ""
