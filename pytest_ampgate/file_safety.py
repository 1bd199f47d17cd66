"""One lock and one atomic write for everything pytest-ampgate writes or serialises.

The policy, shared by the baseline store (``baselines.py``) and the device lock (``gpu_lock.py``):

* **Locks are** ``filelock.FileLock`` (``flock`` on POSIX, ``LockFileEx`` on Windows; torch
  already depends on filelock): the OS drops a lock when its holder dies, so a crashed job never
  wedges the next one.
* **Lock files live in one shared directory**, ``$PYTEST_AMPGATE_LOCK_DIR`` or
  ``<tempdir>/pytest-ampgate-locks``, created like ``/tmp`` itself (mode ``1777``: every user may
  create files there, only a file's owner may delete it), and each lock file is mode ``0666``, so a
  second OS user on the same CI runner shares the lock instead of failing with PermissionError.
  Lock files are named after what they guard and are never deleted while any process may still
  want them (deleting a lock file someone waits on lets two holders in at once): a lock shared
  across runs (a GPU, a baseline file) keeps its file for good; only a per-run lock (the CPU's, one
  per pytest run) is removed, by :func:`remove_run_lock`, once every process of its run is done.
  None lands in a checkout.
* **Every lock has a timeout**, and its expiry names the holder: the holder writes who it is
  (pid, user, host, since when, what for) into a sidecar ``<name>.holder`` file, because
  filelock may truncate the lock file itself on open.
* **Writes are atomic**: temp file in the target's directory, fsync, ``os.replace``, fsync the
  directory, so readers and crashes see the old or the new file, whole; a deletion fsyncs the
  directory too.  A writer killed mid-write leaves only its temp file, which the next holder of the
  target's lock removes (:func:`remove_stale_temps`).

Nothing here imports pytest or torch.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import secrets
import socket
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from .errors import AmpGateError
from .records import utc_timestamp

LOCK_DIR_ENV = "PYTEST_AMPGATE_LOCK_DIR"
SHARED_DIR_MODE = 0o1777
"""Like /tmp: anyone may create a lock file, only its owner may remove or rename it."""
LOCK_FILE_MODE = 0o666
"""Every user of the machine may open (and so lock) every lock file."""
WAIT_NOTICE_S = 2.0
"""Say that we are waiting, and for whom, once a wait is longer than this."""


class LockError(AmpGateError):
    """A lock could not be had: timed out (naming the holder), or the lock directory is unusable."""


def lock_dir() -> Path:
    return Path(os.environ.get(LOCK_DIR_ENV) or Path(tempfile.gettempdir()) / "pytest-ampgate-locks")


def check_lock_dir(directory: str | os.PathLike | None = None) -> Path:
    """The shared lock directory, created (mode 1777) if missing; LockError if it cannot be used.

    A directory we own but created earlier with a narrower mode (pytest-ampgate 0.1 made it 0755)
    is widened, so other users of the machine can use it from now on.
    """
    path = Path(directory) if directory is not None else lock_dir()
    fix = f"set {LOCK_DIR_ENV} to a directory every user of this machine can write"
    if path.exists() and not path.is_dir():
        raise LockError(f"lock directory {path} is a file, not a directory: remove it, or {fix}")
    if not path.exists():
        try:
            path.mkdir(parents=True, exist_ok=True)
            os.chmod(path, SHARED_DIR_MODE)  # mkdir's mode is cut by the umask; chmod is not
        except OSError as exc:
            raise LockError(f"cannot create the lock directory {path} ({exc.strerror or exc}): {fix}") from None
    else:
        try:
            st = path.stat()
            if hasattr(os, "geteuid") and st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != SHARED_DIR_MODE:
                os.chmod(path, SHARED_DIR_MODE)
        except OSError:
            pass  # not ours to widen: the access check below says whether we can still use it
    if not os.access(path, os.W_OK | os.X_OK):
        owner = ""
        try:
            owner = f" (owned by uid {path.stat().st_uid}, mode {stat.S_IMODE(path.stat().st_mode):o})"
        except OSError:
            pass
        raise LockError(f"lock directory {path} is not writable by this user{owner}: chmod 1777 it, or {fix}")
    return path


def lock_name(kind: str, key: str) -> str:
    """A file name for the lock on ``key``: readable, safe on every filesystem, unique per key."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)[-80:]
    if safe != key or len(key) > 80:  # sanitised or shortened: keep distinct keys distinct
        safe = f"{safe}-{hashlib.sha1(key.encode('utf-8', 'replace')).hexdigest()[:12]}"
    return f"{kind}-{safe}"


def holder_text(holder: str) -> str:
    """Who holds a lock, as written into its sidecar for whoever waits."""
    try:
        user = getpass.getuser()
    except Exception:  # no name for this uid (containers)
        user = f"uid {os.getuid()}" if hasattr(os, "getuid") else "?"
    since = utc_timestamp()
    return f"pid {os.getpid()} (user {user}) on {socket.gethostname()} since {since}: {holder}"


def _open_shared(path: Path) -> int:
    """Open ``path`` for writing, creating it 0666; an existing file is opened without O_CREAT
    (Linux's fs.protected_regular refuses O_CREAT on another user's file in a sticky directory)."""
    flags = os.O_WRONLY | getattr(os, "O_BINARY", 0)
    try:
        return os.open(path, flags)
    except FileNotFoundError:
        pass
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, LOCK_FILE_MODE)
    except FileExistsError:
        return os.open(path, flags)
    try:
        os.fchmod(fd, LOCK_FILE_MODE) if hasattr(os, "fchmod") else None
    except OSError:
        pass
    return fd


class Lock:
    """An exclusive, inter-process, inter-user lock named ``name`` in the shared lock directory."""

    def __init__(self, name: str, *, timeout: float | None, directory: str | os.PathLike | None = None, what: str = "lock"):
        self.directory = Path(directory) if directory is not None else lock_dir()
        self.path = self.directory / f"{name}.lock"
        self.holder_path = self.directory / f"{name}.holder"
        self.timeout = timeout
        """Seconds to wait before LockError; None waits for ever."""
        self.what = what
        self._lock = None

    def holder(self) -> str:
        """Who holds the lock now, as its holder wrote it ('' when unknown)."""
        try:
            return self.holder_path.read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            return ""

    def acquire(self, holder: str, on_wait: Callable[[str], None] | None = None) -> None:
        from filelock import FileLock, Timeout

        check_lock_dir(self.directory)
        lock = FileLock(str(self.path), mode=LOCK_FILE_MODE)
        start = time.monotonic()
        noticed = False
        while True:
            waited = time.monotonic() - start
            remaining = None if self.timeout is None else self.timeout - waited
            step = WAIT_NOTICE_S if remaining is None else max(0.0, min(WAIT_NOTICE_S, remaining))
            try:
                lock.acquire(timeout=step, poll_interval=0.02)
                break
            except Timeout:
                if remaining is not None and remaining <= step:
                    raise LockError(
                        f"timed out after {self.timeout:g}s waiting for the {self.what} {self.path}, held by: "
                        f"{self.holder() or 'unknown (no holder recorded)'}. A dead holder's lock is freed by the "
                        "OS; a live one is still running: wait for it, stop it, or raise the timeout"
                    ) from None
                if on_wait and not noticed:
                    noticed = True
                    on_wait(f"waiting for the {self.what} ({self.path}), held by: {self.holder() or 'unknown'}")
            except PermissionError as exc:
                raise LockError(
                    f"cannot open the {self.what} file {self.path} ({exc.strerror or exc}); it should be mode 0666 "
                    f"in a mode-1777 directory: chmod it, or set {LOCK_DIR_ENV} to a directory every user can write"
                ) from None
        self._lock = lock
        try:
            fd = _open_shared(self.holder_path)
            try:
                os.ftruncate(fd, 0)
                os.write(fd, (holder_text(holder) + "\n").encode("utf-8", "replace"))
            finally:
                os.close(fd)
        except OSError:
            pass  # the holder's name is a courtesy to waiters; the lock itself is held

    def release(self) -> None:
        lock, self._lock = self._lock, None
        if lock is None:
            return
        try:
            fd = os.open(self.holder_path, os.O_WRONLY | getattr(os, "O_BINARY", 0))
            try:
                os.ftruncate(fd, 0)
            finally:
                os.close(fd)
        except OSError:
            pass
        lock.release()

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def remove_run_lock(path: str | os.PathLike) -> None:
    """Delete a per-run lock's files (``<name>.lock`` and its ``.holder``) once every process of the
    run is done with it: the one case where no process can want the lock again."""
    path = Path(path)
    for p in (path, path.with_suffix(".holder")):
        try:
            p.unlink()
        except OSError:
            pass


def _fsync_dir(directory: Path) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync on Windows
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` so that readers and crashes see the old or the new file only."""
    target = Path(target)
    directory = target.parent
    tmp = directory / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    # O_EXCL + 0o666 lets the umask decide permissions, as for any file the user creates.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.chmod(tmp, os.stat(target).st_mode & 0o7777)  # keep the existing file's mode
        except FileNotFoundError:
            pass
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


def remove_atomic(target: Path) -> None:
    """Delete ``target`` so that the deletion, like a write, survives a crash (the directory is fsynced)."""
    os.unlink(target)
    _fsync_dir(Path(target).parent)


def remove_stale_temps(target: Path) -> None:
    """Delete the temp files :func:`write_atomic` left beside ``target`` when killed mid-write.

    Only while holding ``target``'s lock: then no live writer can own one of them.
    """
    target = Path(target)
    for orphan in target.parent.glob(f".{target.name}.*.tmp"):
        try:
            orphan.unlink()
        except OSError:
            pass
