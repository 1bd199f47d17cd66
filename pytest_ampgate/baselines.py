"""The baseline store: what a test measured last time it was accepted, per environment and mode.

Baselines are JSON files that users commit to git and that a CI gate reads (what a file holds, and
how it is validated, is :mod:`pytest_ampgate.baseline_schema`), so the store is paranoid about
three things, in the spirit of pytest-regressions' check/regenerate workflow:

* **Never half-written.** Every write goes through ``file_safety.write_atomic`` (temp file in the
  same directory, fsync, ``os.replace``, directory fsync): a crash or ``SIGKILL`` at any moment
  leaves either the old or the new complete file, never a mix.
* **Never silently overwritten.** A file that does not parse or validate makes :meth:`lookup`
  raise rather than look "missing", and makes :meth:`BaselineStore.commit` refuse, leaving it
  byte-for-byte unchanged. A bad baseline is a human's decision to fix, not ours to paper over.
* **Never losing entries.** One file holds every test of one test module, and several processes
  (pytest-xdist workers, parallel CI jobs on a shared checkout) may update it at the session's end.
  Every rewrite takes the file's lock, re-reads the file from disk, changes only the entries it was
  asked to, and keeps everything else verbatim, including keys this version does not know about.

At a session's end :meth:`BaselineStore.record` does the whole update in one call: commit what ran,
then find (and, when asked, prune) the entries whose tests the complete collection no longer has.

Layout: the part of a pytest node id before the first ``"::"`` is the test module;
``tests/test_amp.py`` maps to ``<directory>/tests/test_amp.json``. Each path segment is sanitised
(see :func:`module_relpath`) and the result is checked to lie inside the directory, so a test id
can never steer a write elsewhere.

Locking follows the one policy of ``file_safety.py`` (shared with the device lock): a lock per
baseline file, its lock file in the shared lock directory (never in the checkout), the holder
named in a sidecar. Waiting is bounded by ``lock_timeout`` (60 s by default), after which
BaselineError names the lock file and its holder.

This module is pure standard library: the engine can be used from a script without torch or pytest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .baseline_schema import (
    SCHEMA,
    SCHEMA_VERSION,
    Baseline,
    Document,
    ModeBaseline,
    describe,
    display,
    dumps,
    find_non_finite,
    key,
    new_document,
    parse,
    read_bytes,
    validate,
)
from .errors import BaselineError
from .file_safety import Lock, LockError, lock_name, remove_atomic, remove_stale_temps
from .file_safety import write_atomic as _write_atomic
from .verdict import UPDATE_COMMAND

__all__ = [
    "SCHEMA",
    "SCHEMA_VERSION",
    "Baseline",
    "BaselineStore",
    "ModeBaseline",
    "Recorded",
    "module_of",
    "module_relpath",
]

DEFAULT_LOCK_TIMEOUT = 60.0


# --- paths ------------------------------------------------------------------------------------

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
_WINDOWS_RESERVED = frozenset(["CON", "PRN", "AUX", "NUL"] + [f"COM{i}" for i in range(10)] + [f"LPT{i}" for i in range(10)])
_MAX_SEGMENT = 100


def module_of(test_id: str) -> str:
    """The test module of a pytest node id: everything before the first ``"::"``."""
    return test_id.split("::", 1)[0]


def _safe_segment(seg: str) -> str:
    if seg == "..":
        return "_parent_"
    out = _UNSAFE.sub("_", seg)
    if out.endswith("."):  # Windows strips trailing dots: "..." would become ""
        out = out.rstrip(".") + "_"
    if out.split(".", 1)[0].upper() in _WINDOWS_RESERVED:  # "con.json" is a device on Windows
        out = "_" + out
    if len(out) > _MAX_SEGMENT:  # stay under filesystem name limits, keep names distinct
        digest = hashlib.sha1(seg.encode("utf-8", "surrogatepass")).hexdigest()[:10]
        out = out[: _MAX_SEGMENT - 11] + "-" + digest
    return out


def module_relpath(module: str) -> Path:
    """Where a test module's baselines live, relative to the store directory.

    ``tests/test_amp.py`` -> ``tests/test_amp.json``. Backslashes separate too; empty and ``.``
    segments are dropped (so absolute paths become relative), ``..`` becomes ``_parent_``, a drive
    letter's ``:`` becomes ``_``, and any character outside ``[A-Za-z0-9_.-]`` becomes ``_``.
    """
    raw = [s for s in module.replace("\\", "/").split("/") if s not in ("", ".")]
    if raw and raw[-1].endswith(".py") and len(raw[-1]) > 3:
        raw[-1] = raw[-1][:-3]
    segments = [_safe_segment(s) for s in raw] or ["_"]
    segments[-1] += ".json"
    return Path(*segments)


# --- the store ----------------------------------------------------------------------------------


@dataclass
class Recorded:
    """What :meth:`BaselineStore.record` did at a session's end: plain data for the summary and reports."""

    written: list[Path] = field(default_factory=list)
    """Baseline files written with the tests that ran."""
    stale: list[tuple[Path, str]] = field(default_factory=list)
    """``(file, test_id)`` entries whose tests the complete collection no longer has."""
    pruned: list[Path] = field(default_factory=list)
    """Files rewritten or deleted by pruning (empty unless asked to prune)."""
    write_error: BaselineError | None = None
    """Why some baselines were not written (the others were, and ``written`` lists them)."""
    prune_error: BaselineError | None = None
    """Why the stale entries were not pruned."""


class BaselineStore:
    """Baseline JSON files under ``directory``, one per test module.

    Reads are cached per file for the life of the store (a session sees one consistent view plus
    its own commits). Writes are staged during the session and written by :meth:`commit` at its end.
    Staged-but-uncommitted entries are not visible to :meth:`lookup`.
    """

    def __init__(self, directory: str | os.PathLike[str], *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT):
        self.directory = Path(os.path.abspath(os.fspath(directory)))
        self.lock_timeout = float(lock_timeout)
        self._cache: dict[Path, Document | None] = {}
        self._staged: dict[Path, dict[tuple[str, str], dict[str, Any]]] = {}
        self._mutex = threading.RLock()

    def __repr__(self) -> str:
        return f"BaselineStore({str(self.directory)!r})"

    # -- paths ------------------------------------------------------------------------------------

    def path_for(self, test_id: str) -> Path:
        """The file holding ``test_id``'s baselines; always inside the store directory."""
        if not isinstance(test_id, str) or not test_id:
            raise BaselineError(f"a test id must be a non-empty string, got {describe(test_id)}")
        path = self.directory / module_relpath(module_of(test_id))
        self._check_inside(path, f"test id {test_id!r}")
        return path

    def _check_inside(self, path: Path, what: str) -> None:
        root = os.path.realpath(self.directory)
        real = os.path.realpath(path)
        try:
            inside = os.path.commonpath([root, real]) == root and real != root
        except ValueError:  # different drives
            inside = False
        if not inside:
            raise BaselineError(
                f"{what} maps to {real}, which is outside the baseline directory {root} (a symlink "
                f"inside it?); refusing to read or write there. Remove the symlink or choose another "
                f"baseline directory"
            )

    # -- reading ----------------------------------------------------------------------------------

    def _load(self, path: Path) -> Document | None:
        with self._mutex:
            if path not in self._cache:
                data = read_bytes(path)
                self._cache[path] = None if data is None else parse(path, data)
            return self._cache[path]

    def lookup(self, test_id: str, env_key: str) -> Baseline | None:
        """The stored baseline for this test in this environment; None when there is none.
        A file that exists but is unreadable raises BaselineError rather than reading as missing."""
        loaded = self._load(self.path_for(test_id))
        return None if loaded is None else loaded.baselines.get((test_id, env_key))

    def environments(self, test_id: str) -> list[str]:
        """Environment keys with a baseline for ``test_id`` (to say "recorded on X, not on this GPU")."""
        loaded = self._load(self.path_for(test_id))
        if loaded is None:
            return []
        return sorted(env for (tid, env) in loaded.baselines if tid == test_id)

    def entries(self) -> Iterator[tuple[Path, str, str]]:
        """``(file, test_id, env_key)`` for every stored entry, files in sorted order."""
        if not self.directory.is_dir():
            return
        for path in sorted(self.directory.rglob("*.json")):
            if path.name.startswith(".") or not path.is_file():
                continue
            loaded = self._load(path)
            if loaded is None:  # deleted while we walked
                continue
            for test_id, envs in sorted(loaded.doc["tests"].items()):
                for env_key in sorted(envs):
                    yield path, test_id, env_key

    def stale_entries(self, existing_test_ids: Collection[str], modules: Collection[str] | None = None) -> list[tuple[Path, str]]:
        """Stored test ids that are not in ``existing_test_ids``, as ``(file, test_id)``.

        ``modules`` are the test modules (node id parts before ``"::"``) that were collected in
        full; when given, only test ids of those modules are considered, so a ``-k`` or single-file
        run does not call every other module's baselines stale.
        """
        stale: dict[tuple[Path, str], None] = {}  # an ordered set: one item per test, not per environment
        for path, test_id, _env in self.entries():
            if test_id not in existing_test_ids and (modules is None or module_of(test_id) in modules):
                stale[(path, test_id)] = None
        return list(stale)

    def find_stale(self, collected: Collection[str], complete_modules: Collection[str]) -> list[tuple[Path, str]]:
        """The entries a session may call stale: only in the modules it collected in full (none, if
        it collected none in full), and none when a file cannot be read (that is reported elsewhere)."""
        if not complete_modules:
            return []
        try:
            return self.stale_entries(collected, complete_modules)
        except BaselineError:
            return []

    # -- writing ----------------------------------------------------------------------------------

    def stage(self, baseline: Baseline) -> None:
        """Remember ``baseline`` for the next :meth:`commit`; validates it now, writes nothing."""
        if not isinstance(baseline, Baseline):
            raise BaselineError(f"stage() takes a Baseline, got {describe(baseline)}")
        path = self.path_for(baseline.test_id)
        if not isinstance(baseline.env_key, str) or not baseline.env_key:
            raise BaselineError(
                f"baseline for {baseline.test_id!r}: the environment key must be a non-empty string, got {describe(baseline.env_key)}"
            )
        where = f"baseline to be written to {display(path)}: tests{key(baseline.test_id)}{key(baseline.env_key)}"
        entry = baseline.to_entry()
        bad = find_non_finite(entry, where)
        if bad:
            raise BaselineError(
                f"cannot record {bad}: it is not a finite number and baselines must be standard JSON "
                f"(no NaN or Infinity); a non-finite measurement should fail the test, not become "
                f"the baseline: fix the measurement, or leave the field None"
            )
        try:
            # A deep, JSON-only copy: later mutation of the caller's dicts cannot change what we write.
            entry = json.loads(json.dumps(entry, allow_nan=False, ensure_ascii=False))
        except (TypeError, ValueError) as exc:
            raise BaselineError(f"cannot record {where}: it is not JSON-serialisable ({exc})") from None
        Baseline.from_entry(baseline.test_id, baseline.env_key, entry, where)
        with self._mutex:
            self._staged.setdefault(path, {})[(baseline.test_id, baseline.env_key)] = entry

    @property
    def staged(self) -> list[tuple[str, str]]:
        """``(test_id, env_key)`` pairs waiting for :meth:`commit`."""
        with self._mutex:
            return sorted(k for entries in self._staged.values() for k in entries)

    def commit(self) -> list[Path]:
        """Write every staged entry: per file, lock, re-read from disk, replace only the staged
        ``(test_id, env_key)`` entries, write atomically, unlock. Returns the paths written.

        Files are independent: a corrupt file is refused (left byte-for-byte unchanged, its entries
        stay staged) while the others are still written, then BaselineError reports the refusals;
        its ``written`` attribute lists the paths that were written.
        """
        with self._mutex:
            pending = {p: dict(e) for p, e in self._staged.items()}
        written: list[Path] = []
        errors: list[str] = []
        for path in sorted(pending):
            staged = pending[path]

            def put(tests: dict, staged=staged) -> bool:
                for (test_id, env_key), entry in sorted(staged.items()):
                    tests.setdefault(test_id, {})[env_key] = entry
                return True

            try:
                self._rewrite(path, "update baselines", put)
            except BaselineError as exc:
                errors.append(str(exc))
                continue
            except OSError as exc:
                errors.append(
                    f"{display(path)}: could not write baselines ({exc}); the file on disk is "
                    f"unchanged and the entries stay staged. Fix the cause and run {UPDATE_COMMAND} again"
                )
                continue
            with self._mutex:
                left = self._staged.get(path, {})
                for k, entry in staged.items():
                    if left.get(k) is entry:
                        del left[k]
                if not left:
                    self._staged.pop(path, None)
            written.append(path)
        if errors:
            err = BaselineError("\n".join(errors))
            err.written = written  # type: ignore[attr-defined]
            raise err
        return written

    def prune(self, stale: Iterable[tuple[Path, str]]) -> list[Path]:
        """Remove the given ``(file, test_id)`` entries (all their environments); locked and atomic
        like :meth:`commit`. A file left with no tests is deleted, and so are directories it leaves
        empty below the store directory. Returns the paths rewritten or deleted."""
        by_path: dict[Path, set[str]] = {}
        for path, test_id in stale:
            by_path.setdefault(Path(os.path.abspath(path)), set()).add(test_id)
        changed: list[Path] = []
        for path in sorted(by_path):

            def drop(tests: dict, gone=by_path[path]) -> bool:
                hits = [t for t in gone if t in tests]
                for test_id in hits:
                    del tests[test_id]
                return bool(hits)

            if self._rewrite(path, "prune baselines", drop, create=False):
                changed.append(path)
        return changed

    def record(
        self,
        baselines: Iterable[Baseline],
        *,
        collected: Collection[str] = (),
        complete_modules: Collection[str] = (),
        prune: bool = False,
    ) -> Recorded:
        """A session's whole update: commit what ran, then find (and with ``prune``, remove) the
        entries whose tests the complete collection no longer has.

        ``baselines`` are the accepted results of the tests that ran; only they are written.
        ``collected`` are the session's gated test ids and ``complete_modules`` the test modules it
        collected in full: only their entries can be stale, so a ``-k``, ``--lf`` or single-test
        run never deletes what it did not run. A refused write or prune is reported in the result,
        not raised, and the other step still happens; an interrupt (KeyboardInterrupt) propagates
        with every file whole.
        """
        done = Recorded()
        try:
            staged = 0
            for baseline in baselines:
                self.stage(baseline)
                staged += 1
            done.written = self.commit() if staged else []
        except BaselineError as exc:
            done.written = list(getattr(exc, "written", []))
            done.write_error = exc
        done.stale = self.find_stale(collected, complete_modules)
        if prune and done.stale:
            try:
                done.pruned = self.prune(done.stale)
            except BaselineError as exc:  # a file gone bad since it was read, or a lock held too long
                done.prune_error = exc
        return done

    # -- one locked rewrite -----------------------------------------------------------------------

    @contextmanager
    def _locked(self, path: Path) -> Iterator[None]:
        """file_safety's lock on one baseline file, named after its absolute path, so no lock file
        lands in baselines/; a timeout names the holder."""
        lock = Lock(lock_name("baseline", str(path)), timeout=self.lock_timeout, what=f"baseline lock for {display(path)}")
        path.parent.mkdir(parents=True, exist_ok=True)  # the file is written there once locked
        try:
            lock.acquire(f"pytest --ampgate-update writing {display(path)}")
        except LockError as exc:
            raise BaselineError(f"{exc}; another pytest --ampgate-update may still be writing baselines") from None
        try:
            yield
        finally:
            lock.release()

    def _rewrite(self, path: Path, action: str, change: Callable[[dict], bool], create: bool = True) -> bool:
        """Under the file's lock: re-read ``path`` from disk, let ``change`` edit its tests, write it
        atomically (or delete it once no test is left). False when there was nothing to change."""
        self._check_inside(path, display(path))
        with self._locked(path):
            data = read_bytes(path)
            if data is None and not create:
                return False
            try:
                doc = new_document() if data is None else parse(path, data).doc
            except BaselineError as exc:
                raise BaselineError(f"refusing to {action}: {exc}") from None
            remove_stale_temps(path)  # with the lock held, no live writer owns one
            if not change(doc["tests"]):
                return False
            if doc["tests"]:
                _write_atomic(path, dumps(doc))
                loaded: Document | None = validate(path, doc)
            else:
                remove_atomic(path)
                loaded = None
        with self._mutex:
            self._cache[path] = loaded
        if loaded is None:
            self._remove_empty_dirs(path.parent)
        return True

    def _remove_empty_dirs(self, directory: Path) -> None:
        root = self.directory
        while directory != root and root in directory.parents:
            try:
                directory.rmdir()  # fails (and stops us) if anything is left
            except OSError:
                return
            directory = directory.parent
