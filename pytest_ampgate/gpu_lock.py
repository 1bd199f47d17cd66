"""One gated test at a time per device: an inter-process lock held around each gated test.

Two processes timing on one GPU make both timings meaningless (each one's kernels queue behind the
other's), and that is exactly what ``pytest -n 4`` or two CI jobs on one runner would do.  So every
gated test holds an exclusive lock named after its device for its whole run (set-up, the
measurement, teardown), and a second gated test on the same device waits for it.  Tests that are
not gated take no lock and still run in parallel (under xdist the plugin also groups the gated
tests onto one worker per device, so no worker queues plain tests behind the lock).

The lock is file_safety's: ``filelock`` in the shared lock directory (mode 1777, lock files 0666,
so every OS user of a runner shares it), dropped by the OS when its holder dies, with a timeout
whose error names the holder.  Nothing here imports pytest.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .file_safety import Lock, lock_name
from .records import to_dict


def pick_device(spec: str, worker_index: int, device_count: int) -> str:
    """``cuda:auto`` for one process: xdist worker N takes GPU N mod count (one lock per GPU, so
    workers on different GPUs time at once and workers sharing a GPU take turns)."""
    if spec.strip().lower() != "cuda:auto":
        return spec
    if device_count <= 0:
        return "cuda"  # the gate reports "no CUDA device" itself
    return f"cuda:{worker_index % device_count}"


def device_key(device: str, run_id: str | None = None) -> str:
    """A name for the physical device: the GPU's UUID where torch can tell, so that two processes
    with different ``CUDA_VISIBLE_DEVICES`` still agree.

    A GPU is locked machine-wide: any other gated session on it spoils the timing.  The CPU is
    locked per run (``run_id``: the xdist run shared by its workers), because CPU timings are not
    gated and unrelated CPU test sessions on one machine need not queue behind each other.
    """
    kind, _, index = device.partition(":")
    if kind != "cuda":
        return f"{kind}-{run_id}" if run_id else kind
    try:
        import torch

        from .modes import cuda_index, parse_device

        if torch.cuda.is_available():
            i = cuda_index(parse_device(device))
            uuid = getattr(torch.cuda.get_device_properties(i), "uuid", None)
            if uuid:
                return f"cuda-{uuid}"
    except Exception:  # an unusable device is reported by the gate itself, not here
        pass
    return f"cuda{index or 0}"


@dataclass
class Hold:
    """One holding of a device lock: who, and when (``time.time()`` seconds, comparable across processes)."""

    key: str
    path: str
    holder: str
    pid: int
    requested_at: float
    acquired_at: float = 0.0
    released_at: float | None = None
    locked: bool = True

    @property
    def waited_s(self) -> float:
        return max(0.0, self.acquired_at - self.requested_at)

    def to_dict(self) -> dict[str, Any]:
        return {**to_dict(self), "waited_s": self.waited_s}


class DeviceLock:
    """An exclusive lock on one device, shared by every process and user on this machine."""

    def __init__(self, key: str, directory: str | os.PathLike | None = None, timeout: float | None = None):
        self.key = key
        self.lock = Lock(lock_name("device", key), timeout=timeout, directory=directory, what=f"{key} device lock")
        self.path = str(self.lock.path)

    def holder(self) -> str:
        """Who holds the lock now, as its holder wrote it (for waiting messages)."""
        return self.lock.holder()

    def acquire(self, holder: str, on_wait: Callable[[str], None] | None = None) -> Hold:
        hold = Hold(self.key, self.path, holder, os.getpid(), requested_at=time.time())
        self.lock.acquire(holder, on_wait)
        hold.acquired_at = time.time()
        return hold

    def release(self, hold: Hold) -> None:
        hold.released_at = time.time()
        self.lock.release()


def lock_keys(device: str, world_size: int | None = None, run_id: str | None = None, local_rank: int | None = None) -> list[str]:
    """The device locks a gated test needs: one per GPU its ranks use, sorted.

    ``world_size=N`` on CUDA launches N ranks on ``cuda:0`` .. ``cuda:N-1``, so it takes all N locks;
    a process that is itself one rank of a job (``local_rank``) locks only its own GPU.  Sorted, so every
    gate takes them in one order and two gates wanting overlapping GPUs never hold one each and wait.
    """
    kind = device.partition(":")[0]
    if kind == "cuda" and local_rank is not None:
        return [device_key(f"cuda:{local_rank}", run_id)]
    if kind != "cuda" or not world_size or world_size <= 1:
        return [device_key(device, run_id)]
    return sorted({device_key(f"cuda:{i}", run_id) for i in range(world_size)})


class DeviceLocks:
    """Exclusive locks on several devices, taken in the order given (see :func:`lock_keys`), released in reverse."""

    def __init__(self, keys: list[str], directory: str | os.PathLike | None = None, timeout: float | None = None):
        self.locks = [DeviceLock(key, directory, timeout=timeout) for key in keys]
        self.key = "+".join(keys)
        self.path = self.locks[0].path
        self._holds: list[Hold] = []

    def holder(self) -> str:
        return self.locks[0].holder()

    def acquire(self, holder: str, on_wait: Callable[[str], None] | None = None) -> Hold:
        """Every lock, or none (a timeout on one releases those already held); one Hold for them all."""
        requested = time.time()
        try:
            for lock in self.locks:
                self._holds.append(lock.acquire(holder, on_wait))
        except BaseException:
            self._release_held()
            raise
        return Hold(self.key, self.path, holder, os.getpid(), requested_at=requested, acquired_at=time.time())

    def _release_held(self) -> None:
        while self._holds:
            hold = self._holds.pop()
            next(lock for lock in self.locks if lock.key == hold.key).release(hold)

    def release(self, hold: Hold) -> None:
        hold.released_at = time.time()
        self._release_held()


@contextmanager
def hold_device(
    device: str,
    holder: str,
    on_wait: Callable[[str], None] | None = None,
    directory: str | os.PathLike | None = None,
    run_id: str | None = None,
    timeout: float | None = None,
) -> Iterator[Hold]:
    """Hold ``device`` exclusively for the body; yields the :class:`Hold` (its times fill in as it goes)."""
    lock = DeviceLock(device_key(device, run_id), directory, timeout=timeout)
    hold = lock.acquire(holder, on_wait)
    try:
        yield hold
    finally:
        lock.release(hold)


def overlaps(intervals: list[tuple[float, float]]) -> list[tuple[int, int]]:
    """Index pairs of intervals that overlap in time (for checking that gated runs were serialised)."""
    pairs = []
    for i, (a0, a1) in enumerate(intervals):
        for j in range(i + 1, len(intervals)):
            b0, b1 = intervals[j]
            if a0 < b1 and b0 < a1:
                pairs.append((i, j))
    return pairs
