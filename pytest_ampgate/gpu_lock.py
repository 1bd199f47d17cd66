"""One gated test at a time per device: an inter-process lock held around each gated test.

Two processes timing on one GPU make both timings meaningless (each one's kernels queue behind the
other's), and that is exactly what ``pytest -n 4`` or two CI jobs on one runner would do.  So every
gated test holds an exclusive lock on a file named after its device for its whole run (set-up, the
measurement, teardown), and a second gated test on the same device waits for it.  Tests that are
not gated take no lock and still run in parallel.

The lock is ``flock`` on POSIX (``msvcrt.locking`` on Windows): the kernel drops it when its holder
dies, so a crashed worker cannot wedge the next run, and lock files are never deleted (deleting a
lock file that someone is waiting on lets two holders in at once).  Nothing here imports pytest.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator
from contextlib import contextmanager

from .baselines import try_exclusive_lock

try:
    import fcntl as _fcntl
except ImportError:  # pragma: no cover - Windows
    _fcntl = None
try:
    import msvcrt as _msvcrt
except ImportError:
    _msvcrt = None

LOCK_DIR_ENV = "PYTEST_AMPGATE_LOCK_DIR"
"""Where lock files live; default ``<tempdir>/pytest-ampgate-locks``, shared by every process of the machine."""

WAIT_NOTICE_S = 2.0
"""Say that we are waiting (and for whom) once the wait is longer than this."""


def lock_dir() -> Path:
    return Path(os.environ.get(LOCK_DIR_ENV) or Path(tempfile.gettempdir()) / "pytest-ampgate-locks")


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

        if torch.cuda.is_available():
            i = int(index or torch.cuda.current_device())
            uuid = getattr(torch.cuda.get_device_properties(i), "uuid", None)
            if uuid:
                return f"cuda-{uuid}"
    except Exception:  # an unusable device is reported by the gate itself, not here
        pass
    return f"cuda{index or 0}"


def _safe(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in key)


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
    """False where the platform has no file locks: the test then ran unserialised."""

    @property
    def waited_s(self) -> float:
        return max(0.0, self.acquired_at - self.requested_at)

    def to_dict(self) -> dict:
        return {**asdict(self), "waited_s": self.waited_s}


class DeviceLock:
    """An exclusive lock on one device, shared by every process on this machine."""

    def __init__(self, key: str, directory: str | os.PathLike | None = None):
        self.key = key
        self.path = Path(directory or lock_dir()) / f"{_safe(key)}.lock"
        self._fd: int | None = None

    def holder(self) -> str:
        """Who holds the lock now, as its holder wrote it (best effort, for waiting messages)."""
        try:
            return self.path.read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            return ""

    def acquire(self, holder: str, on_wait: Callable[[str], None] | None = None, poll_s: float = 0.02) -> Hold:
        hold = Hold(self.key, str(self.path), holder, os.getpid(), requested_at=time.time())
        if _fcntl is None and _msvcrt is None:  # pragma: no cover - no file locks at all
            hold.locked = False
            hold.acquired_at = time.time()
            return hold
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o666)
        try:
            noticed = False
            while not try_exclusive_lock(fd):
                if on_wait and not noticed and time.time() - hold.requested_at >= WAIT_NOTICE_S:
                    noticed = True
                    on_wait(f"waiting for the {self.key} lock ({self.path}), held by: {self.holder() or 'unknown'}")
                time.sleep(poll_s)
            hold.acquired_at = time.time()
            if _fcntl is not None:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}: {holder}\n".encode("utf-8", "replace"), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return hold

    def release(self, hold: Hold) -> None:
        fd, self._fd = self._fd, None
        hold.released_at = time.time()
        if fd is None:
            return
        try:
            if _fcntl is None:  # pragma: no cover - Windows
                os.lseek(fd, 0, os.SEEK_SET)
                _msvcrt.locking(fd, _msvcrt.LK_UNLCK, 1)
        finally:
            os.close(fd)  # closing the descriptor drops the flock


@contextmanager
def hold_device(device: str, holder: str, on_wait: Callable[[str], None] | None = None,
                directory: str | os.PathLike | None = None, run_id: str | None = None) -> Iterator[Hold]:
    """Hold ``device`` exclusively for the body; yields the :class:`Hold` (its times fill in as it goes)."""
    lock = DeviceLock(device_key(device, run_id), directory)
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
