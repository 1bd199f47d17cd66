"""The ranks agree after every phase, and leave step records for a hang's diagnosis.

Each mode trains on a process group of its own, and after each phase of each mode
(:meth:`measurement._Slot.settle`) the ranks exchange one small object on a separate control group:
None, or how this rank failed.  A rank that failed first drops its group for the mode, which ends
the peers' pending collective of that mode at once (gloo: "Connection closed by peer"; NCCL:
``abort``), so every rank arrives at the agreement, every rank fails the mode with one message that
names the rank that raised, the phase and the exception's frame, and all go on to the next mode in
step: no collective of one mode ever pairs with another mode's.

A rank that stops making progress (a deadlock, a stuck data loader) never reaches the agreement;
that is still a hang, diagnosed by the launcher from :class:`StepRecord`: every rank counts the
training steps it entered and finished in a small memory-mapped file, so the rank whose count
stopped first is named even while it sits in C code that no Python signal handler can interrupt.
"""

from __future__ import annotations

import gc
import mmap
import re
import struct
import time
from collections.abc import Callable
from pathlib import Path

_RECORD = struct.Struct("<qqd")
"""Steps entered, steps finished (over all modes of the run), ``time.time()`` of the last change."""

PEER_LOSS = re.compile(r"Connection closed by peer|Connection reset|Broken pipe|NCCL communicator was aborted|DistNetworkError", re.I)
"""Errors a rank sees because another rank went away: the rank that raised first is named instead."""


class StepRecord:
    """This rank's step counters in ``rank<N>.steps``; writing one is a memory store, cheap inside a timed block."""

    def __init__(self, path: Path):
        path.write_bytes(b"\0" * _RECORD.size)
        self._file = open(path, "r+b")  # noqa: SIM115 - mapped for the rank's whole life
        self._map = mmap.mmap(self._file.fileno(), _RECORD.size)
        self.entered = 0
        self.finished = 0

    def _write(self) -> None:
        self._map[:] = _RECORD.pack(self.entered, self.finished, time.time())

    def counted(self, step: Callable) -> Callable:
        """``step`` counted: entered before it runs, finished after it returns."""

        def counted_step(x, y):
            self.entered += 1
            self._write()
            out = step(x, y)
            self.finished += 1
            self._write()
            return out

        return counted_step


def read_step_record(path: Path) -> tuple[int, int, float] | None:
    """(entered, finished, time) from a rank's record, or None where there is none."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return _RECORD.unpack(data[: _RECORD.size]) if len(data) >= _RECORD.size else None


def stopped_first(records: dict[int, tuple[int, int, float]]) -> int | None:
    """The rank whose steps stopped first: fewest steps entered, then finished, then the oldest change; None on a tie."""
    if len(records) < 2:
        return None
    ordered = sorted(records, key=lambda r: (records[r][0], records[r][1], records[r][2]))
    a, b = records[ordered[0]], records[ordered[1]]
    return ordered[0] if (a[0], a[1]) != (b[0], b[1]) else None


def describe_failure(mode: str, failures: dict[int, dict]) -> str:
    """One message for every rank: the rank that failed first (not merely from losing a peer), where and how."""
    own = {r: f for r, f in failures.items() if not PEER_LOSS.search(f"{f['type']}: {f['message']}")}
    pool = own or failures
    first = min(pool, key=lambda r: (pool[r]["time"], r))
    f = failures[first]
    where = f" at {f['where']}" if f.get("where") else ""
    text = f"rank {first} raised {f['type']}: {f['message']}{where}, in {mode}'s {f['phase']}"
    others = sorted(r for r in failures if r != first)
    if others:
        text += f" (then rank {', '.join(map(str, others))}: {failures[others[0]]['type']}: {failures[others[0]]['message'][:120]})"
    return text + f"; every rank stopped {mode} there and went on with the other modes"


class Agreement:
    """A process group per mode, a control group for the agreement, and the agreement itself
    (``measure(after_phase=...)``).  Every rank makes the groups in the same order, before training."""

    def __init__(self, modes: list[str], backend: str, timeout, release: Callable[[str], None]):
        import torch.distributed as dist

        self._dist = dist
        self.backend = backend
        self.control = dist.new_group(backend="gloo", timeout=timeout)
        self.groups = {name: dist.new_group(backend=backend, timeout=timeout) for name in modes}
        self._release = release
        self.failed: dict[str, str] = {}

    def group(self, mode: str):
        return self.groups[mode]

    def drop(self, mode: str) -> None:
        """Let go of a mode: its model and optimizer (``release``), then its process group, which ends any
        peer's pending collective of this mode instead of leaving it to pair with the next mode's."""
        self._release(mode)
        group = self.groups.pop(mode, None)
        if group is None:
            return
        gc.collect()  # the model, its DDP reducer and hooks hold the group through reference cycles
        try:
            if self.backend == "nccl" and hasattr(group, "abort"):
                group.abort()  # NCCL: the documented way to end the peers' pending collectives
            self._dist.destroy_process_group(group)
        except Exception:  # a group already broken by the failure is gone either way
            pass

    def __call__(self, mode: str, phase: str, failure: dict | None) -> str | None:
        if failure is not None:
            self.drop(mode)  # first, so the others' pending collective ends and they reach the agreement
        gathered: list = [None] * self._dist.get_world_size()
        self._dist.all_gather_object(gathered, failure, group=self.control)
        failures = {r: f for r, f in enumerate(gathered) if f}
        if not failures:
            return None
        if failure is None:
            self.drop(mode)
        self.failed[mode] = describe_failure(mode, failures)
        return self.failed[mode]

    def close(self) -> None:
        """Every group this run made, destroyed (a pytest that is one rank of a job runs many tests on one job)."""
        for mode in list(self.groups):
            self.drop(mode)
        self._dist.destroy_process_group(self.control)
