"""Typed records inside, dicts at the edges: one generic conversion for every engine dataclass.

The engine passes dataclasses around; only the JSON boundary (results files, the JSON report,
worker result files) sees dicts.  :func:`to_dict` and :func:`from_dict` walk a dataclass's type
hints, so a record gains a field without a hand-written ``to_dict``/``from_dict`` pair to keep in
step.  Strict JSON has no NaN or infinity, so non-finite floats travel as the strings ``"nan"``,
``"inf"`` and ``"-inf"`` and come back as floats.  Files that people edit by hand (baselines) keep
their own strict validation; this module trusts its input to have been written by :func:`to_dict`.

A record that adds computed keys for readers, or validates what it reads, defines its own
``to_dict``/``from_dict`` (built on these); a record nested in another is converted with its own
methods, so those keys and checks hold wherever it is nested.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import types
import typing
from datetime import datetime, timezone
from typing import Any, TypeVar

T = TypeVar("T")

_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "infinity": math.inf, "-infinity": -math.inf}


def utc_timestamp() -> str:
    """Now, in UTC, to the second, ISO 8601 (``2026-11-23T02:00:00+00:00``): every timestamp we write."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def json_float(value: float) -> float | str:
    """A float strict JSON can hold: non-finite values become the strings 'nan', 'inf', '-inf'."""
    return value if math.isfinite(value) else str(value)


def to_dict(record: Any) -> Any:
    """``record`` as JSON-ready data: dataclasses become dicts of their fields, recursively."""
    if dataclasses.is_dataclass(record) and not isinstance(record, type):
        return {f.name: _to_json(getattr(record, f.name)) for f in dataclasses.fields(record)}
    return _to_json(record)


def _to_json(value: Any) -> Any:
    """A field's value as JSON data; a nested record through its own ``to_dict`` where it has one."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        own = getattr(value, "to_dict", None)
        return own() if own is not None else to_dict(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, float):
        return json_float(value)
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_to_json(v) for v in value]
    return value


def from_dict(cls: type[T], data: typing.Mapping[str, Any]) -> T:
    """Rebuild a ``cls`` record from :func:`to_dict` output.

    Keys the record does not know are ignored and missing ones take their defaults, so results
    written by an older or newer version still read.
    """
    hints = _hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.init and f.name in data:
            values[f.name] = _convert(hints.get(f.name, Any), data[f.name])
    return cls(**values)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(hint: Any, value: Any) -> Any:
    """``value`` (JSON data) as the type ``hint`` names; what it cannot place is returned as is."""
    if value is None or hint is Any:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        return _convert(options[0], value) if len(options) == 1 else value
    if dataclasses.is_dataclass(hint) and isinstance(value, typing.Mapping):
        own = getattr(hint, "from_dict", None)
        return own(value) if own is not None else from_dict(hint, value)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return hint(value)
    if hint is float:
        return _NON_FINITE.get(value.lower(), value) if isinstance(value, str) else float(value)
    if origin in (list, tuple, set, frozenset) or hint in (list, tuple, set, frozenset):
        container = origin or hint
        if container is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v) for v in value)
        if container is tuple and args:
            return tuple(_convert(a, v) for a, v in zip(args, value))
        item = args[0] if args else Any
        return container(_convert(item, v) for v in value)
    if origin is dict or hint is dict:
        item = args[1] if len(args) == 2 else Any
        return {k: _convert(item, v) for k, v in value.items()}
    return value
