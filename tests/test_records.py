"""The one dataclass <-> dict conversion the engine's records share."""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass, field

import pytest

from pytest_ampgate.records import from_dict, json_float, to_dict


class Colour(enum.Enum):
    RED = "red"


@dataclass
class Inner:
    value: float
    tags: tuple[str, ...] = ()


@dataclass
class Outer:
    name: str
    inner: Inner | None = None
    items: list[Inner] = field(default_factory=list)
    by_name: dict[str, Inner] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    colour: Colour = Colour.RED
    loose: dict = field(default_factory=dict)


def test_round_trip_through_strict_json():
    record = Outer(
        "x",
        Inner(1.5, ("a", "b")),
        [Inner(math.inf)],
        {"k": Inner(-1.0)},
        [0.5, math.nan, -math.inf],
        Colour.RED,
        {"free": [1, 2]},
    )
    text = json.dumps(to_dict(record), allow_nan=False)
    back = from_dict(Outer, json.loads(text))
    assert back.inner == Inner(1.5, ("a", "b"))
    assert back.items[0].value == math.inf and back.by_name == {"k": Inner(-1.0)}
    assert back.losses[0] == 0.5 and math.isnan(back.losses[1]) and back.losses[2] == -math.inf
    assert back.colour is Colour.RED and back.loose == {"free": [1, 2]}


def test_unknown_keys_are_ignored_and_missing_ones_default():
    back = from_dict(Outer, {"name": "y", "added_later": 3})
    assert back == Outer("y")


def test_json_float_writes_non_finite_as_strings():
    assert json_float(2.0) == 2.0
    assert [json_float(v) for v in (math.nan, math.inf, -math.inf)] == ["nan", "inf", "-inf"]


@dataclass
class Checked:
    """A record with its own methods: a computed key out, a check on the way in."""

    value: int

    def to_dict(self) -> dict:
        return {**to_dict(self), "double": 2 * self.value}

    @classmethod
    def from_dict(cls, data) -> Checked:
        if data["value"] < 0:
            raise ValueError("negative")
        return from_dict(cls, data)


@dataclass
class Holder:
    one: Checked
    many: list[Checked] = field(default_factory=list)


def test_a_nested_record_keeps_its_own_keys_and_checks():
    data = to_dict(Holder(Checked(1), [Checked(2)]))
    assert data == {"one": {"value": 1, "double": 2}, "many": [{"value": 2, "double": 4}]}
    assert from_dict(Holder, data) == Holder(Checked(1), [Checked(2)])
    with pytest.raises(ValueError, match="negative"):
        from_dict(Holder, {"one": {"value": -1}})
