"""A wrong-type ``ampgate_*`` ini value is a usage error naming the key and what it takes, wherever
it is written: pytest.ini, ``[tool.pytest.ini_options]``, setup.cfg, ``-o``, and pytest 9's native
``[tool.pytest]`` table.  pytest 9.2 refuses such values itself in ``config.getini`` (its #14791)
with a message that names no key; earlier versions leave the conversion to the plugin or raise a
plain ValueError.  Each case is a real pytest run (pytester), so every supported pytest is checked.
"""

from __future__ import annotations

import pytest

from pytest_ampgate.config import SETTINGS
from pytest_ampgate.plugin.options import INI_TYPES

NATIVE_TOML = tuple(int(p) for p in pytest.__version__.split(".")[:2]) >= (9, 0)

WRONG_INI = {"float": "fast", "int": "2.5", "bool": "perhaps"}
"""An INI-file string of the wrong type, by the key's ini type."""
WRONG_TOML = {"float": '"fast"', "int": "2.5", "bool": "1"}
"""A native-TOML value of the wrong type (a TOML string, float, integer), by the key's ini type."""


def _expected(name: str, raw: str) -> str:
    """What the plugin says: the key, then what the setting takes (the fix), then the value."""
    kind = "float" if name == "lock_timeout" else INI_TYPES.get(name, "float")
    takes = {
        "float": "must be a number of seconds >= 0 (0: wait forever)" if name == "lock_timeout" else "must be a number",
        "int": f"must be a whole number >= {1 if name in ('rounds', 'steps_per_block', 'world_size') else 0}",
        "bool": "must be true, false or auto" if name in ("check_speed", "check_memory") else "must be true or false",
    }[kind]
    return f"ini option ampgate_{name}: {name} {takes}, got {raw}"


TYPED = sorted([name for name in SETTINGS if INI_TYPES.get(name, "float") in WRONG_INI] + ["lock_timeout"])


def _kind(name: str) -> str:
    return "float" if name == "lock_timeout" else INI_TYPES.get(name, "float")


def _write(pytester, source: str, values: dict[str, str]) -> tuple[str, ...]:
    """Write ``key = value`` lines where ``source`` says; the command-line arguments it needs."""
    if source == "-o":
        pytester.makeini("[pytest]\n")
        return tuple(arg for key, value in values.items() for arg in ("-o", f"{key}={value}"))
    quote = '"' if source == "ini_options" else ""  # [tool.pytest.ini_options] holds strings
    body = "".join(f"{key} = {quote}{value}{quote}\n" for key, value in values.items())
    if source == "pytest.ini":
        pytester.makeini(f"[pytest]\n{body}")
    elif source == "setup.cfg":
        pytester.makefile(".cfg", setup=f"[tool:pytest]\n{body}")
    elif source == "ini_options":
        pytester.makepyprojecttoml(f"[tool.pytest.ini_options]\n{body}")
    elif source == "native":
        pytester.makepyprojecttoml(f"[tool.pytest]\n{body}")
    return ()


def _usage_error(pytester, extra: tuple[str, ...]) -> str:
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    result = pytester.runpytest("-p", "no:cacheprovider", *extra)  # without --ampgate too: read at start-up
    err, out = result.stderr.str(), result.stdout.str()
    assert result.ret == pytest.ExitCode.USAGE_ERROR, out + err
    assert "INTERNALERROR" not in out + err and "Traceback" not in out + err, out + err
    return err


@pytest.mark.parametrize("source", ["pytest.ini", "ini_options", "setup.cfg", "-o"])
@pytest.mark.parametrize("name", TYPED)
def test_a_wrong_type_ini_value_is_a_usage_error_naming_the_key_and_the_fix(pytester, name, source):
    value = WRONG_INI[_kind(name)]
    err = _usage_error(pytester, _write(pytester, source, {f"ampgate_{name}": value}))
    assert _expected(name, repr(value)) in err, err


@pytest.mark.skipif(not NATIVE_TOML, reason="pytest 9's native [tool.pytest] table")
@pytest.mark.parametrize("name", TYPED)
def test_a_wrong_type_native_toml_value_is_a_usage_error_naming_the_key_and_the_fix(pytester, name):
    value = WRONG_TOML[_kind(name)]
    err = _usage_error(pytester, _write(pytester, "native", {f"ampgate_{name}": value}))
    shown = {'"fast"': "'fast'", "2.5": "2.5", "1": "1"}[value]
    assert _expected(name, shown) in err, err


@pytest.mark.parametrize("source", ["pytest.ini", "ini_options", "setup.cfg", "-o"])
def test_right_values_of_every_type_are_read_from_each_source(pytester, source):
    """The fallback must not refuse what is right: a float, a whole number, a flag and a timeout."""
    values = {"ampgate_min_speedup": "1.25", "ampgate_rounds": "4", "ampgate_confirm": "no", "ampgate_lock_timeout": "12"}
    extra = _write(pytester, source, values)
    pytester.makeconftest(
        "def pytest_sessionstart(session):\n"
        "    plugin = session.config.pluginmanager.get_plugin('ampgate-session')\n"
        "    s = plugin.gate.options.ini_settings\n"
        "    print('READ', s['min_speedup'], s['rounds'], s['confirm'], plugin.settings.lock_timeout)\n"
    )
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    result = pytester.runpytest("-p", "no:cacheprovider", "-s", *extra)
    result.assert_outcomes(passed=1)
    assert "READ 1.25 4 False 12.0" in result.stdout.str(), result.stdout.str()
