"""The baseline store: what a test measured last time it was accepted, per environment and mode.

Baselines are JSON files that users commit to git and that a CI gate reads, so this module is
paranoid about three things, in the spirit of pytest-regressions' check/regenerate workflow:

* **Never half-written.** Every write goes to a temporary file in the same directory, is flushed
  and fsync'ed, and is then ``os.replace``'d over the target (and the directory fsync'ed where the
  platform allows). A crash or ``SIGKILL`` at any moment leaves either the old or the new complete
  file, never a mix.
* **Never silently overwritten.** A file that does not parse or validate makes :meth:`lookup`
  raise rather than look "missing", and makes :meth:`BaselineStore.commit` refuse, leaving it
  byte-for-byte unchanged. A bad baseline is a human's decision to fix, not ours to paper over.
* **Never losing entries.** One file holds every test of one test module, and several processes
  (pytest-xdist workers, parallel CI jobs on a shared checkout) may update it at the session's end.
  :meth:`BaselineStore.commit` takes an exclusive lock, re-reads the file from disk, replaces only
  the ``(test id, environment key)`` entries it was asked to, and keeps everything else verbatim,
  including keys this version does not know about (a newer minor release may add mode fields).

Layout: the part of a pytest node id before the first ``"::"`` is the test module;
``tests/test_amp.py`` maps to ``<directory>/tests/test_amp.json``. Each path segment is sanitised
(see :func:`module_relpath`) and the result is checked to lie inside the directory, so a test id
can never steer a write elsewhere.

Locking and atomic writes follow the one policy of ``file_safety.py`` (shared with the device
lock): a ``filelock`` lock per baseline file, its lock file in the shared lock directory (never in
the checkout), the holder named in a sidecar. Waiting is bounded by ``lock_timeout`` (60 s by
default), after which BaselineError names the lock file and its holder.

This module is pure standard library: the engine can be used from a script without torch or pytest.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import operator
import os
import re
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import BaselineError
from .file_safety import Lock, LockError, lock_name
from .file_safety import fsync_dir as _fsync_dir
from .file_safety import tmp_pattern as _tmp_pattern
from .file_safety import write_atomic as _write_atomic

__all__ = [
    "SCHEMA",
    "SCHEMA_VERSION",
    "Baseline",
    "BaselineStore",
    "ModeBaseline",
    "module_of",
    "module_relpath",
    "utc_timestamp",
]

SCHEMA = "pytest-ampgate-baselines"
SCHEMA_VERSION = 1

DEFAULT_LOCK_TIMEOUT = 60.0

_UPDATE_HINT = "pytest --ampgate --ampgate-update"

#: Mode fields that are floats (any finite number or null) and the one that is an integer.
_FLOAT_FIELDS = (
    "speedup",
    "speedup_low",
    "speedup_high",
    "memory_ratio",
    "step_time_s",
    "accuracy",
    "final_loss",
    "low_precision_share",
)
_INT_FIELDS = ("peak_memory_bytes",)
_REQUIRED_ENTRY_KEYS = ("environment", "recorded_at", "settings", "modes")


def utc_timestamp() -> str:
    """Now, in UTC, to the second, ISO 8601 (``2026-11-23T02:00:00+00:00``): the ``recorded_at`` format."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def _display(path: Path) -> str:
    """A path as a user wants to read it in a message: relative to the cwd when it lies below it."""
    try:
        rel = os.path.relpath(path)
    except (ValueError, OSError):  # another drive on Windows; a deleted cwd
        return str(path)
    return str(path) if rel.startswith("..") else rel


def _key(k: str) -> str:
    return "[" + repr(k) + "]"


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


# --------------------------------------------------------------------------------------------------
# Mode and entry records
# --------------------------------------------------------------------------------------------------


def _check_float(value: Any, where: str, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise BaselineError(
            f"{where}{_key(name)} must be a number or null, got {_describe(value)}; "
            f"correct it, restore the file from version control, or re-record with {_UPDATE_HINT}"
        )
    if not isinstance(value, float):  # ints, numpy / torch scalars: store plain floats
        try:
            value = float(value)
        except OverflowError:  # a 400-digit integer: no float holds it
            raise BaselineError(
                f"{where}{_key(name)} is a {len(str(abs(int(value))))}-digit number, too large for any "
                f"measurement; correct it, restore the file from version control, or re-record with "
                f"{_UPDATE_HINT}"
            ) from None
    if not math.isfinite(value):
        raise BaselineError(
            f"{where}{_key(name)} is {value!r}, but baselines must be finite numbers (standard JSON "
            f"has no NaN or Infinity); correct it, restore the file from version control, or "
            f"re-record with {_UPDATE_HINT}"
        )
    _check_range(value, where, name)
    return value


_RANGES = {
    # field: (lowest, low bound open, highest, what the field is)
    "speedup": (0.0, True, None, "a ratio of step times"),
    "speedup_low": (0.0, True, None, "a ratio of step times"),
    "speedup_high": (0.0, True, None, "a ratio of step times"),
    "memory_ratio": (0.0, True, None, "a ratio of peak memories"),
    "step_time_s": (0.0, True, None, "seconds per training step"),
    "accuracy": (0.0, False, 1.0, "a share of correct predictions"),
    "low_precision_share": (0.0, False, 1.0, "a share of FLOPs"),
    "peak_memory_bytes": (0, False, 2**62, "a number of bytes"),
}
"""What each stored figure can be.  A value outside its range is a hand edit or a corrupt file; it
is refused, because a negative speedup or accuracy would silently disable the check it feeds."""


def _check_range(value: Any, where: str, name: str) -> None:
    if name not in _RANGES:
        return
    low, low_open, high, what = _RANGES[name]
    if (value <= low if low_open else value < low) or (high is not None and value > high):
        allowed = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")
        shown = repr(value) if len(repr(value)) <= 24 else f"a {len(str(abs(int(value))))}-digit number"
        raise BaselineError(
            f"{where}{_key(name)} is {shown}, but it is {what} and must be {allowed}; correct it, "
            f"restore the file from version control, or re-record with {_UPDATE_HINT}"
        )


def _check_int(value: Any, where: str, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool):
        ok = False
    elif isinstance(value, int):
        ok = True
    else:
        try:  # numpy / torch integer scalars
            value = operator.index(value)
            ok = True
        except TypeError:
            ok = False
    if not ok or value < 0:
        raise BaselineError(
            f"{where}{_key(name)} must be a non-negative integer number of bytes or null, got "
            f"{_describe(value)}; correct it, restore the file from version control, or re-record "
            f"with {_UPDATE_HINT}"
        )
    _check_range(value, where, name)
    return value


@dataclass(frozen=True)
class ModeBaseline:
    """What one precision mode measured: ratios against fp32 with their spread, plus raw values.

    Every field is optional: a CPU run has no memory ratio, an fp32 reference has no speedup.
    ``extra`` keeps fields this version does not know, so files written by a newer minor release
    survive a rewrite by an older one.
    """

    speedup: float | None = None
    speedup_low: float | None = None
    speedup_high: float | None = None
    memory_ratio: float | None = None
    step_time_s: float | None = None
    peak_memory_bytes: int | None = None
    accuracy: float | None = None
    final_loss: float | None = None
    low_precision_share: float | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object for this mode; None fields are left out (they read back as None)."""
        out: dict[str, Any] = {k: v for k, v in self.extra.items() if k not in _KNOWN_MODE_FIELDS}
        for name in _FLOAT_FIELDS + _INT_FIELDS:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    @classmethod
    def from_dict(cls, d: Any, where: str) -> ModeBaseline:
        """Validate and build from a JSON object; ``where`` locates ``d`` in error messages,
        e.g. ``"baselines/tests/test_amp.json: tests['...']['cpu|...']['modes']['amp_bf16']"``."""
        if not isinstance(d, dict):
            raise BaselineError(
                f"{where} must be a JSON object of measurements, got {_describe(d)}; correct it, "
                f"restore the file from version control, or re-record with {_UPDATE_HINT}"
            )
        kwargs: dict[str, Any] = {}
        for name in _FLOAT_FIELDS:
            kwargs[name] = _check_float(d.get(name), where, name)
        for name in _INT_FIELDS:
            kwargs[name] = _check_int(d.get(name), where, name)
        low, mid, high = kwargs["speedup_low"], kwargs["speedup"], kwargs["speedup_high"]
        if mid is not None and ((low is not None and low > mid) or (high is not None and high < mid)):
            raise BaselineError(
                f"{where}: the speedup {mid!r} lies outside its own interval [{low!r}, {high!r}] "
                f"(speedup_low <= speedup <= speedup_high); correct it, restore the file from version "
                f"control, or re-record with {_UPDATE_HINT}"
            )
        extra = {k: v for k, v in d.items() if k not in _KNOWN_MODE_FIELDS}
        return cls(**kwargs, extra=extra)


_KNOWN_MODE_FIELDS = frozenset(_FLOAT_FIELDS + _INT_FIELDS)
assert {f.name for f in fields(ModeBaseline)} - {"extra"} == _KNOWN_MODE_FIELDS


@dataclass(frozen=True)
class Baseline:
    """One accepted measurement of one test in one environment, across its modes."""

    test_id: str
    env_key: str
    environment: dict
    recorded_at: str
    settings: dict
    modes: dict[str, ModeBaseline]

    def to_entry(self) -> dict[str, Any]:
        """The JSON object stored at ``tests[test_id][env_key]``."""
        modes: dict[str, Any] = {}
        for name, mode in self.modes.items():
            if not isinstance(mode, ModeBaseline):
                raise BaselineError(f"baseline for {self.test_id!r}: modes[{name!r}] must be a ModeBaseline, got {_describe(mode)}")
            modes[name] = mode.to_dict()
        return {
            "environment": self.environment,
            "recorded_at": self.recorded_at,
            "settings": self.settings,
            "modes": modes,
        }

    @classmethod
    def from_entry(cls, test_id: str, env_key: str, entry: Any, where: str) -> Baseline:
        """Validate and build from the JSON object at ``tests[test_id][env_key]`` (located by ``where``)."""
        fix = f"correct it, restore the file from version control, or re-record with {_UPDATE_HINT}"
        if not isinstance(entry, dict):
            raise BaselineError(f"{where} must be a JSON object, got {_describe(entry)}; {fix}")
        missing = [k for k in _REQUIRED_ENTRY_KEYS if k not in entry]
        if missing:
            raise BaselineError(f"{where} is missing required key(s) {', '.join(repr(k) for k in missing)}; {fix}")
        for name in ("environment", "settings", "modes"):
            if not isinstance(entry[name], dict):
                raise BaselineError(f"{where}{_key(name)} must be a JSON object, got {_describe(entry[name])}; {fix}")
        if not isinstance(entry["recorded_at"], str) or not entry["recorded_at"]:
            raise BaselineError(
                f"{where}['recorded_at'] must be an ISO 8601 timestamp string, got {_describe(entry['recorded_at'])}; {fix}"
            )
        modes = {}
        for name, mode in entry["modes"].items():
            if not name:
                raise BaselineError(f"{where}['modes'] has an empty mode name; {fix}")
            modes[name] = ModeBaseline.from_dict(mode, f"{where}['modes']{_key(name)}")
        return cls(
            test_id=test_id,
            env_key=env_key,
            environment=entry["environment"],
            recorded_at=entry["recorded_at"],
            settings=entry["settings"],
            modes=modes,
        )


# --------------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------------
# Reading and validating files
# --------------------------------------------------------------------------------------------------


def _corrupt(path: Path, problem: str) -> BaselineError:
    shown = _display(path)
    return BaselineError(
        f"{shown}: {problem}. Restore it from version control (git checkout -- {shown}) or delete it and re-record with {_UPDATE_HINT}"
    )


def _unreadable(path: Path, exc: OSError) -> BaselineError:
    return BaselineError(
        f"{_display(path)}: cannot be read ({exc.strerror or exc}); check that it is a regular file "
        f"you may read, or point the baseline directory elsewhere"
    )


def _read_regular(path: Path) -> bytes | None:
    """The bytes of a baseline file; None when it does not exist.

    Opened without blocking and checked with ``fstat`` before reading: a FIFO in its place would
    otherwise hang the session until something writes to it, and a device file could be endless.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise _corrupt(path, "is a directory, not a baseline file") from None
    except OSError as exc:
        raise _unreadable(path, exc) from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise _corrupt(path, "is a directory, not a baseline file")
        if not stat.S_ISREG(mode):
            kind = "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device or other special file"
            raise BaselineError(
                f"{_display(path)}: is {kind}, not a regular file; refusing to read it. Remove it "
                f"(baselines are plain JSON files), restore it from version control, or re-record "
                f"with {_UPDATE_HINT}"
            )
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    except OSError as exc:
        raise _unreadable(path, exc) from None
    finally:
        os.close(fd)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _parse(path: Path, data: bytes) -> _Loaded:
    """Bytes of a baseline file -> its validated document (raises BaselineError naming ``path``)."""
    if not data.strip():
        raise _corrupt(path, "is empty (an interrupted write or a bad merge?)")
    if data.startswith(_BOM):  # Windows editors add one; it is not part of the JSON, so read past it
        data = data[len(_BOM) :]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _corrupt(path, f"is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    if "\n<<<<<<< " in "\n" + text:
        raise _corrupt(path, "contains git merge conflict markers ('<<<<<<<'); resolve the conflict")
    try:
        doc = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        raise _corrupt(path, f"is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno} (truncated?)") from None
    except ValueError as exc:  # NaN/Infinity literals, duplicate keys, numbers of over 4300 digits
        raise _corrupt(path, f"is not valid JSON: {exc}") from None
    except RecursionError:
        raise _corrupt(path, f"nests JSON arrays or objects more than {_MAX_DEPTH} levels deep") from None
    if _depth(doc) > _MAX_DEPTH:
        raise _corrupt(path, f"nests JSON arrays or objects more than {_MAX_DEPTH} levels deep")
    return _Loaded(doc, _validate_document(path, doc))


_BOM = b"\xef\xbb\xbf"
_MAX_DEPTH = 64
"""A baseline document is six levels deep; unknown keys are kept verbatim, so a bound keeps a
pathological file from overflowing the stack when it is validated or written back."""


def _depth(doc: Any) -> int:
    """How deeply ``doc`` nests lists and dicts, counted up to ``_MAX_DEPTH + 1`` (iteratively: it must
    not itself recurse)."""
    deepest, stack = 0, [(doc, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, level)
            if level <= _MAX_DEPTH:
                stack.extend((v, level + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


def _validate_document(path: Path, doc: Any) -> dict[tuple[str, str], Baseline]:
    if not isinstance(doc, dict):
        raise _corrupt(path, f"top level must be a JSON object, got {type(doc).__name__}")
    if doc.get("schema") != SCHEMA:
        if "schema" not in doc:
            problem = f"has no 'schema' key; it is not a {SCHEMA} file"
        else:
            problem = f"has schema {doc['schema']!r}, expected {SCHEMA!r}; it is not a pytest-ampgate baseline file"
        raise _corrupt(path, problem)
    version = doc.get("schema_version")
    if "schema_version" not in doc:
        raise _corrupt(path, "has no 'schema_version' key")
    if isinstance(version, bool) or not isinstance(version, int):
        raise _corrupt(path, f"'schema_version' must be an integer, got {_describe(version)}")
    if version > SCHEMA_VERSION:
        raise BaselineError(
            f"{_display(path)}: written by a newer pytest-ampgate (schema {version}; this version "
            f"reads schema {SCHEMA_VERSION}); upgrade pytest-ampgate or restore the file from git "
            f"(git checkout -- {_display(path)})"
        )
    if version < 1:
        raise _corrupt(path, f"'schema_version' {version} is invalid (the first schema is 1)")
    if "tests" not in doc:
        raise _corrupt(path, "has no 'tests' key")
    tests = doc["tests"]
    if not isinstance(tests, dict):
        raise _corrupt(path, f"'tests' must be a JSON object, got {_describe(tests)}")
    shown = _display(path)
    parsed: dict[tuple[str, str], Baseline] = {}
    for test_id, envs in tests.items():
        where = f"{shown}: tests{_key(test_id)}"
        if not test_id:
            raise _corrupt(path, "'tests' has an empty test id")
        if not isinstance(envs, dict):
            raise BaselineError(
                f"{where} must be a JSON object keyed by environment, got {_describe(envs)}; correct "
                f"it, restore the file from version control, or re-record with {_UPDATE_HINT}"
            )
        for env_key, entry in envs.items():
            if not env_key:
                raise _corrupt(path, f"tests{_key(test_id)} has an empty environment key")
            parsed[(test_id, env_key)] = Baseline.from_entry(test_id, env_key, entry, f"{where}{_key(env_key)}")
    return parsed


def _find_non_finite(value: Any, where: str) -> str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return where
    if isinstance(value, dict):
        for k, v in value.items():
            hit = _find_non_finite(v, f"{where}{_key(k)}")
            if hit:
                return hit
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            hit = _find_non_finite(v, f"{where}[{i}]")
            if hit:
                return hit
    return None


def _dumps(doc: dict[str, Any]) -> bytes:
    """Stable bytes for git: sorted keys, two-space indent, trailing newline, standard JSON only."""
    return (json.dumps(doc, indent=2, sort_keys=True, allow_nan=False, ensure_ascii=False) + "\n").encode("utf-8")


def _new_document() -> dict[str, Any]:
    return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "tests": {}}


# --------------------------------------------------------------------------------------------------
# Locking and atomic writes
# --------------------------------------------------------------------------------------------------


class _Lock:
    """The store's lock on one baseline file: file_safety's lock (shared lock directory, timeout
    naming the holder), named after the file's absolute path, so no lock file lands in baselines/."""

    def __init__(self, target: Path, timeout: float):
        self.target = target
        self.lock = Lock(lock_name("baseline", str(target)), timeout=timeout, what=f"baseline lock for {_display(target)}")
        self.path = self.lock.path
        self.real = True

    def acquire(self) -> None:
        self.target.parent.mkdir(parents=True, exist_ok=True)  # the file is written there once locked
        try:
            self.lock.acquire(f"pytest --ampgate-update writing {_display(self.target)}")
        except LockError as exc:
            raise BaselineError(f"{exc}; another pytest --ampgate-update may still be writing baselines") from None

    def release(self) -> None:
        self.lock.release()


# --------------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------------


class _Loaded:
    __slots__ = ("baselines", "doc")

    def __init__(self, doc: dict[str, Any], baselines: dict[tuple[str, str], Baseline]):
        self.doc = doc
        self.baselines = baselines


class BaselineStore:
    """Baseline JSON files under ``directory``, one per test module.

    Reads are cached per file for the life of the store (a session sees one consistent view plus
    its own commits). Writes are staged during the session and written by :meth:`commit` at its end.
    Staged-but-uncommitted entries are not visible to :meth:`lookup`.
    """

    def __init__(self, directory: str | os.PathLike[str], *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT):
        self.directory = Path(os.path.abspath(os.fspath(directory)))
        self.lock_timeout = float(lock_timeout)
        self._cache: dict[Path, _Loaded | None] = {}
        self._staged: dict[Path, dict[tuple[str, str], dict[str, Any]]] = {}
        self._mutex = threading.RLock()

    def __repr__(self) -> str:
        return f"BaselineStore({str(self.directory)!r})"

    # -- paths ------------------------------------------------------------------------------------

    def path_for(self, test_id: str) -> Path:
        """The file holding ``test_id``'s baselines; always inside the store directory."""
        if not isinstance(test_id, str) or not test_id:
            raise BaselineError(f"a test id must be a non-empty string, got {_describe(test_id)}")
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

    def _load(self, path: Path) -> _Loaded | None:
        with self._mutex:
            if path not in self._cache:
                data = _read_regular(path)
                self._cache[path] = None if data is None else _parse(path, data)
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

    def stale_entries(self, existing_test_ids: set[str], modules: set[str] | None = None) -> list[tuple[Path, str]]:
        """Stored test ids that are not in ``existing_test_ids``, as ``(file, test_id)``.

        ``modules`` are the test modules (node id parts before ``"::"``) that were collected in
        full; when given, only test ids of those modules are considered, so a ``-k`` or single-file
        run does not call every other module's baselines stale.
        """
        stale: list[tuple[Path, str]] = []
        seen: set[tuple[Path, str]] = set()
        for path, test_id, _env in self.entries():
            if (path, test_id) in seen or test_id in existing_test_ids:
                continue
            if modules is not None and module_of(test_id) not in modules:
                continue
            seen.add((path, test_id))
            stale.append((path, test_id))
        return stale

    # -- writing ----------------------------------------------------------------------------------

    def stage(self, baseline: Baseline) -> None:
        """Remember ``baseline`` for the next :meth:`commit`; validates it now, writes nothing."""
        if not isinstance(baseline, Baseline):
            raise BaselineError(f"stage() takes a Baseline, got {_describe(baseline)}")
        path = self.path_for(baseline.test_id)
        if not isinstance(baseline.env_key, str) or not baseline.env_key:
            raise BaselineError(
                f"baseline for {baseline.test_id!r}: the environment key must be a non-empty string, got {_describe(baseline.env_key)}"
            )
        where = f"baseline to be written to {_display(path)}: tests{_key(baseline.test_id)}{_key(baseline.env_key)}"
        entry = baseline.to_entry()
        bad = _find_non_finite(entry, where)
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

    @contextmanager
    def _locked(self, path: Path) -> Iterator[bool]:
        lock = _Lock(path, self.lock_timeout)
        lock.acquire()
        try:
            yield lock.real
        finally:
            lock.release()

    def _read_for_update(self, path: Path, action: str) -> dict[str, Any] | None:
        data = _read_regular(path)
        if data is None:
            return None
        try:
            return _parse(path, data).doc
        except BaselineError as exc:
            raise BaselineError(f"refusing to {action}: {exc}") from None

    @staticmethod
    def _remove_orphans(path: Path) -> None:
        """Delete temp files of writers killed mid-write. Only called while holding the real lock:
        then no live writer can own a temp file of this target."""
        for orphan in path.parent.glob(_tmp_pattern(path)):
            try:
                orphan.unlink()
            except OSError:
                pass

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
            try:
                self._check_inside(path, _display(path))
                with self._locked(path) as really_locked:
                    doc = self._read_for_update(path, "update baselines") or _new_document()
                    if really_locked:
                        self._remove_orphans(path)
                    tests = doc["tests"]
                    for (test_id, env_key), entry in sorted(staged.items()):
                        tests.setdefault(test_id, {})[env_key] = entry
                    data = _dumps(doc)
                    _write_atomic(path, data)
            except BaselineError as exc:
                errors.append(str(exc))
                continue
            except OSError as exc:
                errors.append(
                    f"{_display(path)}: could not write baselines ({exc}); the file on disk is "
                    f"unchanged and the entries stay staged. Fix the cause and run {_UPDATE_HINT} again"
                )
                continue
            with self._mutex:
                self._cache[path] = _Loaded(doc, _validate_document(path, doc))
                left = self._staged.get(path, {})
                for key, entry in staged.items():
                    if left.get(key) is entry:
                        del left[key]
                if not left:
                    self._staged.pop(path, None)
            written.append(path)
        if errors:
            err = BaselineError("\n".join(errors))
            err.written = written  # type: ignore[attr-defined]
            raise err
        return written

    def prune(self, stale: list[tuple[Path, str]]) -> list[Path]:
        """Remove the given ``(file, test_id)`` entries (all their environments); locked and atomic
        like :meth:`commit`. A file left with no tests is deleted, and so are directories it leaves
        empty below the store directory. Returns the paths rewritten or deleted."""
        by_path: dict[Path, set[str]] = {}
        for path, test_id in stale:
            by_path.setdefault(Path(os.path.abspath(path)), set()).add(test_id)
        changed: list[Path] = []
        for path in sorted(by_path):
            self._check_inside(path, _display(path))
            with self._locked(path) as really_locked:
                doc = self._read_for_update(path, "prune baselines")
                if doc is None:
                    continue
                if really_locked:
                    self._remove_orphans(path)
                tests = doc["tests"]
                gone = [t for t in by_path[path] if t in tests]
                if not gone:
                    continue
                for test_id in gone:
                    del tests[test_id]
                if tests:
                    _write_atomic(path, _dumps(doc))
                    loaded: _Loaded | None = _Loaded(doc, _validate_document(path, doc))
                else:
                    os.unlink(path)
                    _fsync_dir(path.parent)
                    loaded = None
            with self._mutex:
                self._cache[path] = loaded
            changed.append(path)
            if loaded is None:
                self._remove_empty_dirs(path.parent)
        return changed

    def _remove_empty_dirs(self, directory: Path) -> None:
        root = self.directory
        while directory != root and root in directory.parents:
            try:
                directory.rmdir()  # fails (and stops us) if anything is left, lock files included
            except OSError:
                return
            directory = directory.parent
