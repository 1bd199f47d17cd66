"""What a baseline file holds, and the one validation path every loaded or staged baseline takes.

Baseline files are JSON that people commit, merge and edit by hand, so this module checks them
strictly (typed records elsewhere trust :mod:`pytest_ampgate.records`; these do not): a regular
file (never a FIFO or device) -> bytes -> UTF-8 text -> JSON without NaN, Infinity or duplicate keys -> bounded nesting -> schema and
version -> test ids and environment keys -> each entry's required keys -> each figure's type and
range. Every refusal names the file, the place in it, the problem and the fix, because a bad
baseline is a human's decision to fix, not ours to paper over.

Layout of a file: ``{"schema": SCHEMA, "schema_version": 1, "tests": {test_id: {env_key: entry}}}``
where an entry is ``{"environment", "recorded_at", "settings", "modes": {mode: figures}}``.
Keys this version does not know are kept verbatim (``ModeBaseline.extra``), so a file written by
a newer minor release survives a rewrite by an older one.

Pure standard library: the engine can be used from a script without torch or pytest.
"""

from __future__ import annotations

import json
import math
import numbers
import operator
import os
import stat
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

from .errors import BaselineError
from .verdict import UPDATE_COMMAND

SCHEMA = "pytest-ampgate-baselines"
SCHEMA_VERSION = 1

_FIX = f"correct it, restore the file from version control, or re-record with {UPDATE_COMMAND}"

_FLOAT_FIELDS = (
    "speedup",
    "speedup_low",
    "speedup_high",
    "memory_ratio",
    "step_time_s",
    "step_time_low",
    "step_time_high",
    "accuracy",
    "final_loss",
    "low_precision_share",
)
_INT_FIELDS = ("peak_memory_bytes", "recordings")
_KNOWN_MODE_FIELDS = frozenset(_FLOAT_FIELDS + _INT_FIELDS)
_REQUIRED_ENTRY_KEYS = ("environment", "recorded_at", "settings", "modes")

_RANGES = {
    # field: (lowest, low bound open, highest, what the field is)
    "speedup": (0.0, True, None, "a ratio of step times"),
    "speedup_low": (0.0, True, None, "a ratio of step times"),
    "speedup_high": (0.0, True, None, "a ratio of step times"),
    "memory_ratio": (0.0, True, None, "a ratio of peak memories"),
    "step_time_s": (0.0, True, None, "seconds per training step"),
    "step_time_low": (0.0, True, None, "seconds per training step"),
    "step_time_high": (0.0, True, None, "seconds per training step"),
    "accuracy": (0.0, False, 1.0, "a share of correct predictions"),
    "low_precision_share": (0.0, False, 1.0, "a share of FLOPs"),
    "peak_memory_bytes": (0, False, 2**62, "a number of bytes"),
    "recordings": (1, False, 1000, "a count of --ampgate-update runs"),
}
"""What each stored figure can be.  A value outside its range is a hand edit or a corrupt file; it
is refused, because a negative speedup or accuracy would silently disable the check it feeds."""

_BOM = b"\xef\xbb\xbf"
_MAX_DEPTH = 64
"""A baseline document is six levels deep; unknown keys are kept verbatim, so a bound keeps a
pathological file from overflowing the stack when it is validated or written back."""


def display(path: Path) -> str:
    """A path as a user wants to read it in a message: relative to the cwd when it lies below it."""
    try:
        rel = os.path.relpath(path)
    except (ValueError, OSError):  # another drive on Windows; a deleted cwd
        return str(path)
    return str(path) if rel.startswith("..") else rel


def key(k: str) -> str:
    return "[" + repr(k) + "]"


def describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def corrupt(path: Path, problem: str) -> BaselineError:
    """The file as a whole is unusable: restore it or re-record it."""
    shown = display(path)
    return BaselineError(
        f"{shown}: {problem}. Restore it from version control (git checkout -- {shown}) or delete it and re-record with {UPDATE_COMMAND}"
    )


def _bad(where: str, problem: str) -> BaselineError:
    """One place in the file is wrong: say where, what, and the fix."""
    return BaselineError(f"{where}{problem}; {_FIX}")


def _unreadable(path: Path, exc: OSError) -> BaselineError:
    return BaselineError(
        f"{display(path)}: cannot be read ({exc.strerror or exc}); check that it is a regular file "
        f"you may read, or point the baseline directory elsewhere"
    )


def read_bytes(path: Path) -> bytes | None:
    """The bytes of a baseline file; None when it does not exist.

    Opened without blocking and checked with ``fstat`` before reading: a FIFO in its place would
    otherwise hang the session until something writes to it, and a device file could be endless.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise corrupt(path, "is a directory, not a baseline file") from None
    except OSError as exc:
        raise _unreadable(path, exc) from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise corrupt(path, "is a directory, not a baseline file")
        if not stat.S_ISREG(mode):
            kind = "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device or other special file"
            raise BaselineError(
                f"{display(path)}: is {kind}, not a regular file; refusing to read it. Remove it "
                f"(baselines are plain JSON files), restore it from version control, or re-record "
                f"with {UPDATE_COMMAND}"
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


# --- one figure -------------------------------------------------------------------------------


def _figure(value: Any, where: str, name: str) -> float | int | None:
    """A stored figure: null, or a finite number of the field's kind inside the field's range."""
    if value is None:
        return None
    if name in _INT_FIELDS:  # ints, numpy / torch integer scalars; never bools or floats
        try:
            number = None if isinstance(value, bool) else operator.index(value)
        except TypeError:
            number = None
        if number is None or number < 0:
            raise _bad(f"{where}{key(name)}", f" must be a non-negative integer number of bytes or null, got {describe(value)}")
        value = number
    else:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise _bad(f"{where}{key(name)}", f" must be a number or null, got {describe(value)}")
        try:
            value = float(value)  # ints, numpy / torch scalars: store plain floats
        except OverflowError:  # a 400-digit integer: no float holds it
            raise _bad(f"{where}{key(name)}", f" is a {len(str(abs(int(value))))}-digit number, too large for any measurement") from None
        if not math.isfinite(value):
            raise _bad(f"{where}{key(name)}", f" is {value!r}, but baselines must be finite numbers (standard JSON has no NaN or Infinity)")
    if name in _RANGES:
        low, low_open, high, what = _RANGES[name]
        if (value <= low if low_open else value < low) or (high is not None and value > high):
            allowed = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")
            shown = repr(value) if len(repr(value)) <= 24 else f"a {len(str(abs(int(value))))}-digit number"
            raise _bad(f"{where}{key(name)}", f" is {shown}, but it is {what} and must be {allowed}")
    return value


# --- records ----------------------------------------------------------------------------------


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
    step_time_low: float | None = None
    step_time_high: float | None = None
    """The interval of the recorded run's per-round step times (absent in files recorded before it was kept)."""
    peak_memory_bytes: int | None = None
    recordings: int | None = None
    """How many ``--ampgate-update`` runs (each its own process) the timing figures are the median of;
    None: one (files recorded before recordings were pooled)."""
    accuracy: float | None = None
    final_loss: float | None = None
    low_precision_share: float | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object for this mode; None fields are left out (they read back as None)."""
        out: dict[str, Any] = {k: v for k, v in self.extra.items() if k not in _KNOWN_MODE_FIELDS}
        out.update((name, getattr(self, name)) for name in _FLOAT_FIELDS + _INT_FIELDS if getattr(self, name) is not None)
        return out

    @classmethod
    def from_dict(cls, d: Any, where: str) -> ModeBaseline:
        """Validate and build from a JSON object; ``where`` locates ``d`` in error messages,
        e.g. ``"baselines/tests/test_amp.json: tests['...']['cpu|...']['modes']['amp_bf16']"``."""
        if not isinstance(d, dict):
            raise _bad(where, f" must be a JSON object of measurements, got {describe(d)}")
        kwargs = {name: _figure(d.get(name), where, name) for name in _FLOAT_FIELDS + _INT_FIELDS}
        for figure, low_key, high_key in (("speedup", "speedup_low", "speedup_high"), ("step_time_s", "step_time_low", "step_time_high")):
            low, mid, high = kwargs[low_key], kwargs[figure], kwargs[high_key]
            if mid is not None and ((low is not None and low > mid) or (high is not None and high < mid)):
                raise _bad(
                    where,
                    f": the {figure} {mid!r} lies outside its own interval [{low!r}, {high!r}] ({low_key} <= {figure} <= {high_key})",
                )
        return cls(**kwargs, extra={k: v for k, v in d.items() if k not in _KNOWN_MODE_FIELDS})


assert {f.name for f in fields(ModeBaseline)} - {"extra"} == _KNOWN_MODE_FIELDS


@dataclass(frozen=True)
class Recording:
    """One ``--ampgate-update`` run's timing figures, kept so that later recordings pool with it
    (:mod:`pytest_ampgate.recordings`)."""

    recorded_at: str
    modes: dict[str, ModeBaseline]

    def to_dict(self) -> dict[str, Any]:
        return {"recorded_at": self.recorded_at, "modes": {name: mode.to_dict() for name, mode in self.modes.items()}}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Recording:
        if not isinstance(d, dict) or not isinstance(d.get("recorded_at"), str) or not isinstance(d.get("modes"), dict):
            raise _bad(where, f" must be a JSON object with 'recorded_at' (a timestamp) and 'modes' (an object), got {describe(d)}")
        return cls(d["recorded_at"], {name: ModeBaseline.from_dict(m, f"{where}['modes']{key(name)}") for name, m in d["modes"].items()})


@dataclass(frozen=True)
class Baseline:
    """One test's accepted figures in one environment, across its modes (timing pooled over ``recordings``)."""

    test_id: str
    env_key: str
    environment: dict
    recorded_at: str
    settings: dict
    modes: dict[str, ModeBaseline]
    recordings: tuple[Recording, ...] = ()
    """The recent ``--ampgate-update`` runs whose timing the figures pool, oldest first (empty: only this one)."""

    def to_entry(self) -> dict[str, Any]:
        """The JSON object stored at ``tests[test_id][env_key]``."""
        modes: dict[str, Any] = {}
        for name, mode in self.modes.items():
            if not isinstance(mode, ModeBaseline):
                raise BaselineError(f"baseline for {self.test_id!r}: modes[{name!r}] must be a ModeBaseline, got {describe(mode)}")
            modes[name] = mode.to_dict()
        entry = {"environment": self.environment, "recorded_at": self.recorded_at, "settings": self.settings, "modes": modes}
        if self.recordings:
            entry["recordings"] = [r.to_dict() for r in self.recordings]
        return entry

    @classmethod
    def from_entry(cls, test_id: str, env_key: str, entry: Any, where: str) -> Baseline:
        """Validate and build from the JSON object at ``tests[test_id][env_key]`` (located by ``where``)."""
        if not isinstance(entry, dict):
            raise _bad(where, f" must be a JSON object, got {describe(entry)}")
        missing = [k for k in _REQUIRED_ENTRY_KEYS if k not in entry]
        if missing:
            raise _bad(where, f" is missing required key(s) {', '.join(repr(k) for k in missing)}")
        for name in ("environment", "settings", "modes"):
            if not isinstance(entry[name], dict):
                raise _bad(f"{where}{key(name)}", f" must be a JSON object, got {describe(entry[name])}")
        if not isinstance(entry["recorded_at"], str) or not entry["recorded_at"]:
            raise _bad(f"{where}['recorded_at']", f" must be an ISO 8601 timestamp string, got {describe(entry['recorded_at'])}")
        if "" in entry["modes"]:
            raise _bad(f"{where}['modes']", " has an empty mode name")
        modes = {name: ModeBaseline.from_dict(mode, f"{where}['modes']{key(name)}") for name, mode in entry["modes"].items()}
        recordings = entry.get("recordings", [])
        if not isinstance(recordings, list):
            raise _bad(f"{where}['recordings']", f" must be a JSON array of recordings, got {describe(recordings)}")
        kept = tuple(Recording.from_dict(r, f"{where}['recordings'][{i}]") for i, r in enumerate(recordings))
        return cls(test_id, env_key, entry["environment"], entry["recorded_at"], entry["settings"], modes, kept)


# --- a whole file -----------------------------------------------------------------------------


class Document(NamedTuple):
    """A validated baseline file: its JSON as read (unknown keys and all) and its entries as records."""

    doc: dict[str, Any]
    baselines: dict[tuple[str, str], Baseline]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


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


def parse(path: Path, data: bytes) -> Document:
    """Bytes of a baseline file -> its validated document (raises BaselineError naming ``path``)."""
    if not data.strip():
        raise corrupt(path, "is empty (an interrupted write or a bad merge?)")
    if data.startswith(_BOM):  # Windows editors add one; it is not part of the JSON, so read past it
        data = data[len(_BOM) :]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise corrupt(path, f"is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    if "\n<<<<<<< " in "\n" + text:
        raise corrupt(path, "contains git merge conflict markers ('<<<<<<<'); resolve the conflict")
    try:
        doc = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        raise corrupt(path, f"is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno} (truncated?)") from None
    except ValueError as exc:  # NaN/Infinity literals, duplicate keys, numbers of over 4300 digits
        raise corrupt(path, f"is not valid JSON: {exc}") from None
    except RecursionError:
        raise corrupt(path, f"nests JSON arrays or objects more than {_MAX_DEPTH} levels deep") from None
    if _depth(doc) > _MAX_DEPTH:
        raise corrupt(path, f"nests JSON arrays or objects more than {_MAX_DEPTH} levels deep")
    return validate(path, doc)


def validate(path: Path, doc: Any) -> Document:
    """A parsed baseline file checked top-down: schema, version, test ids, environments, entries."""
    if not isinstance(doc, dict):
        raise corrupt(path, f"top level must be a JSON object, got {type(doc).__name__}")
    if doc.get("schema") != SCHEMA:
        if "schema" not in doc:
            raise corrupt(path, f"has no 'schema' key; it is not a {SCHEMA} file")
        raise corrupt(path, f"has schema {doc['schema']!r}, expected {SCHEMA!r}; it is not a pytest-ampgate baseline file")
    if "schema_version" not in doc:
        raise corrupt(path, "has no 'schema_version' key")
    version = doc["schema_version"]
    if isinstance(version, bool) or not isinstance(version, int):
        raise corrupt(path, f"'schema_version' must be an integer, got {describe(version)}")
    if version > SCHEMA_VERSION:
        raise BaselineError(
            f"{display(path)}: written by a newer pytest-ampgate (schema {version}; this version "
            f"reads schema {SCHEMA_VERSION}); upgrade pytest-ampgate or restore the file from git "
            f"(git checkout -- {display(path)})"
        )
    if version < 1:
        raise corrupt(path, f"'schema_version' {version} is invalid (the first schema is 1)")
    if "tests" not in doc:
        raise corrupt(path, "has no 'tests' key")
    tests = doc["tests"]
    if not isinstance(tests, dict):
        raise corrupt(path, f"'tests' must be a JSON object, got {describe(tests)}")
    baselines: dict[tuple[str, str], Baseline] = {}
    for test_id, envs in tests.items():
        where = f"{display(path)}: tests{key(test_id)}"
        if not test_id:
            raise corrupt(path, "'tests' has an empty test id")
        if not isinstance(envs, dict):
            raise _bad(where, f" must be a JSON object keyed by environment, got {describe(envs)}")
        for env_key, entry in envs.items():
            if not env_key:
                raise corrupt(path, f"tests{key(test_id)} has an empty environment key")
            baselines[(test_id, env_key)] = Baseline.from_entry(test_id, env_key, entry, f"{where}{key(env_key)}")
    return Document(doc, baselines)


def find_non_finite(value: Any, where: str) -> str | None:
    """Where in ``value`` the first NaN or infinity lies, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return where
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(v, (float, dict, list, tuple)) and (hit := find_non_finite(v, f"{where}{key(k)}")):
                return hit
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            if isinstance(v, (float, dict, list, tuple)) and (hit := find_non_finite(v, f"{where}[{i}]")):
                return hit
    return None


def dumps(doc: dict[str, Any]) -> bytes:
    """Stable bytes for git: sorted keys, two-space indent, trailing newline, standard JSON only."""
    return (json.dumps(doc, indent=2, sort_keys=True, allow_nan=False, ensure_ascii=False) + "\n").encode("utf-8")


def new_document() -> dict[str, Any]:
    return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "tests": {}}
