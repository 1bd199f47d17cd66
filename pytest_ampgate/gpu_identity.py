"""Which of NVML's processes is this one, and which belong to this pytest run.

NVML's driver is not PID-namespace aware.  Inside a container ``nvmlDeviceGetComputeRunningProcesses``
and ``nvmlDeviceGetProcessUtilization`` report host PIDs, so this process's own ``os.getpid()`` is
absent and it appears under a PID that means nothing here (NVIDIA/nvidia-docker #179 and #1483;
Project-HAMi/HAMi-core #112 shows the compute-process list and the utilisation samples
disagreeing on driver 560).  Under MPS every client appears as the MPS server's PID.  So the PID
alone cannot say who used the GPU: :func:`identify` matches this process in NVML's terms by its
PID where NVML shows it, else by the PID that appeared when this process created its CUDA context
(:func:`note_context`), else by the GPU memory it holds; where none of these tells, it says so and
the noise window reports "cannot tell who used the GPU" (never "busy", never "quiet").

This run's other processes (:func:`run_processes`): pytest-xdist sets ``PYTEST_XDIST_TESTRUNUID``
and ``PYTEST_XDIST_WORKER`` inside each worker after it started (``xdist/remote.py``), so they are
never in ``/proc/<pid>/environ``; the workers of one run are the children of one controller, so
a worker's siblings are the processes sharing its parent.  A sibling that waits for the device lock
keeps a CUDA context but runs no kernel, so NVML samples it at 0% and it never counts as noise; a
sibling that runs CUDA work meanwhile (a test that took no lock) slows the timed rounds like any
other process and counts, named as this run's worker so the user knows where it came from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from . import nvml

MPS_SERVER = "nvidia-cuda-mps-server"
CONTEXT_SLACK_BYTES = 2 * 2**30
"""What NVML counts for a process beyond torch's reserved memory: its CUDA context, kernels and
library workspaces (a few hundred MiB on current drivers); a memory match must fall within this."""

_context_pids: dict[int, int] = {}
"""NVML's PID for this process, per device index, seen appearing when this process created its context."""


@dataclass(frozen=True)
class Identity:
    """This process in NVML's terms: the PIDs under which NVML shows it, and how they were found.

    ``unknown`` says why it could not be told apart from other processes (then ``pids`` is empty
    and per-process readings cannot be attributed).
    """

    pids: frozenset[int] = frozenset()
    how: str = "pid"
    unknown: str = ""


def _processes(pynvml: Any, handle: Any) -> list[tuple[int, int | None]] | None:
    procs, err = nvml.call(getattr(pynvml, "nvmlDeviceGetComputeRunningProcesses", None), handle)
    if err is not None:
        return None
    out = []
    for p in procs or ():
        mem = getattr(p, "usedGpuMemory", None)
        out.append((int(getattr(p, "pid", -1)), mem if isinstance(mem, int) and not isinstance(mem, bool) else None))
    return out


def _visible(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def identify(pynvml: Any, handle: Any, *, index: int = 0, own_bytes: int | None = None, sample_pids: set[int] = frozenset()) -> Identity:
    """This process among NVML's processes on ``handle`` (see the module docstring for the order of means).

    ``own_bytes`` is the GPU memory this process's allocator holds (``torch.cuda.memory_reserved``);
    ``sample_pids`` the PIDs NVML's utilisation samples named, to spot the MPS server among them.
    """
    me = os.getpid()
    procs = _processes(pynvml, handle)
    listed = {pid for pid, _ in procs or ()}
    if me in listed or me in sample_pids:
        return Identity(frozenset({me}), "pid")
    mps = sorted(pid for pid in listed | set(sample_pids) if nvml.process_name(pynvml, pid) == MPS_SERVER)
    if mps:
        return Identity(
            how="mps",
            unknown=f"under MPS every client appears as the MPS server's PID ({', '.join(map(str, mps))}), "
            "so its samples mix this process with any other client",
        )
    if procs is None:
        return Identity(how="none", unknown="NVML would not list the GPU's compute processes")
    if not listed:
        return Identity(frozenset(), "pid")  # nobody holds a context: nothing to tell apart
    remembered = _context_pids.get(index)
    if remembered is not None and remembered in listed:
        return Identity(frozenset({remembered}), "context")
    where = (
        f"this process (pid {me} here) is not in NVML's list ({', '.join(str(p) for p in sorted(listed))}), "
        "which shows PIDs of another PID namespace (a container: NVIDIA/nvidia-docker #179)"
    )
    if own_bytes is not None:
        fits = [pid for pid, used in procs if used is not None and own_bytes <= used <= own_bytes + CONTEXT_SLACK_BYTES]
        if len(fits) == 1:
            return Identity(frozenset(fits), "memory")
        return Identity(
            how="memory",
            unknown=f"{where}, and {len(fits)} of them hold GPU memory that fits this process's {own_bytes / 2**20:.0f} MiB",
        )
    return Identity(how="none", unknown=f"{where}, and this process's GPU memory is unknown")


def note_context(pynvml: Any, handle: Any, index: int, create) -> None:
    """Create this process's CUDA context with ``create()`` and remember the NVML PID that appeared with it.

    Called only where the context does not exist yet; a PID is remembered only when exactly one
    appeared and it is not visible as another process here (a new neighbour starting in the same
    instant would make the guess ambiguous: then nothing is remembered).
    """
    before = _processes(pynvml, handle)
    create()
    after = _processes(pynvml, handle)
    if before is None or after is None:
        return
    appeared = {pid for pid, _ in after} - {pid for pid, _ in before}
    if len(appeared) == 1:
        pid = appeared.pop()
        if pid == os.getpid() or not _visible(pid):
            _context_pids[index] = pid


def _stat_ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            text = fh.read()
    except OSError:
        return None
    # pid (comm) state ppid ...; comm may hold spaces and parentheses: split after the last ')'.
    fields = text.rpartition(")")[2].split()
    try:
        return int(fields[1])
    except (IndexError, ValueError):
        return None


def run_processes() -> dict[int, str]:
    """This pytest run's processes by PID and role: this one, and in an xdist worker its controller and sibling workers.

    Found from ``/proc/<pid>/stat``: a worker's siblings are the other children of its parent, the
    controller (xdist's popen gateways start every worker as the controller's direct child).
    """
    me = os.getpid()
    roles = {me: "this process"}
    if "PYTEST_XDIST_WORKER" not in os.environ:  # xdist sets it in the worker itself: readable here
        return roles
    controller = os.getppid()
    roles[controller] = "xdist controller of this run"
    try:
        entries = [int(e) for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return roles
    for pid in entries:
        if pid != me and _stat_ppid(pid) == controller:
            roles[pid] = "xdist worker of this run"
    return roles
