"""Settings from every place a user writes them: ini files, pytest 9's native TOML table (typed), -o, flags and
markers, in that order of precedence; wrong types and misspelt keys are usage errors naming the key."""

from __future__ import annotations

import pytest
from session_helpers import CPU, NATIVE_TOML, gated, imported_first, private_locks, project  # noqa: F401  (autouse fixtures)  # noqa: F401  (imported_first: autouse)

from pytest_ampgate.config import SETTINGS
from pytest_ampgate.plugin.options import INI_TYPES

# --- 2. typed configuration ------------------------------------------------------------------


SHOW_CONFIG = """
def test_config(ampgate):
    c = ampgate.config
    print("CONFIG", c.min_speedup, c.confirm, list(c.modes), c.rounds, c.check_speed)
"""


@pytest.mark.skipif(not NATIVE_TOML, reason="pytest 9's native [tool.pytest] table")
def test_native_toml_takes_floats_booleans_and_lists(pytester):
    pytester.makepyprojecttoml(
        "[tool.pytest]\n"
        "ampgate_min_speedup = 1.3\n"
        "ampgate_confirm = false\n"
        "ampgate_check_speed = false\n"
        'ampgate_modes = ["amp_bf16", "fp16"]\n'
        "ampgate_rounds = 4\n"
    )
    pytester.makepyfile(test_cfg=SHOW_CONFIG)
    result = pytester.runpytest(*CPU, "-s")
    result.assert_outcomes(passed=1)
    assert "CONFIG 1.3 False ['amp_bf16', 'fp16'] 4 False" in result.stdout.str()
    # -o strings still work, and win over the file
    result = pytester.runpytest(
        *CPU, "-s", "-o", "ampgate_min_speedup=1.5", "-o", "ampgate_confirm=true", "-o", "ampgate_modes=amp_fp16,amp_bf16"
    )
    result.assert_outcomes(passed=1)
    assert "CONFIG 1.5 True ['amp_fp16', 'amp_bf16'] 4 False" in result.stdout.str()


def test_ini_file_strings_still_work(pytester):
    pytester.makeini("[pytest]\nampgate_min_speedup = 1.25\nampgate_confirm = no\nampgate_modes = amp_fp16, amp_bf16\n")
    pytester.makepyfile(test_cfg=SHOW_CONFIG)
    result = pytester.runpytest(*CPU, "-s")
    result.assert_outcomes(passed=1)
    from pytest_ampgate.profiles import CPU_PROFILE

    rounds = CPU_PROFILE["rounds"]  # rounds: the CPU profile's
    assert f"CONFIG 1.25 False ['amp_fp16', 'amp_bf16'] {rounds} None" in result.stdout.str()


@pytest.mark.skipif(not NATIVE_TOML, reason="pytest 9's native [tool.pytest] table")
@pytest.mark.parametrize(
    "line, words",
    [
        ('ampgate_min_speedup = "fast"', ["ini option ampgate_min_speedup", "min_speedup must be a number, got 'fast'"]),
        ("ampgate_rounds = 2.5", ["ini option ampgate_rounds", "rounds must be a whole number >= 1, got 2.5"]),
        ("ampgate_strict = 1", ["ini option ampgate_strict", "strict must be true or false, got 1"]),
        ("ampgate_min_speedup = -1.0", ["ampgate_min_speedup", "min_speedup must be > 0"]),
    ],
)
def test_a_native_toml_value_of_the_wrong_type_is_a_usage_error(pytester, line, words):
    pytester.makepyprojecttoml(f"[tool.pytest]\n{line}\n")
    pytester.makepyfile(test_cfg=SHOW_CONFIG)
    result = pytester.runpytest(*CPU)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert "INTERNALERROR" not in err + result.stdout.str()
    for word in words:
        assert word in err, err


def test_a_misspelt_key_is_a_usage_error_naming_the_nearest_key(pytester):
    pytester.makeini("[pytest]\nampgate_min_speedupp = 1.3\n")
    pytester.makepyfile(test_cfg="def test_x():\n    pass\n")
    result = pytester.runpytest("-p", "no:cacheprovider")  # even without --ampgate: it would silently do nothing
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unknown ini option ampgate_min_speedupp: did you mean ampgate_min_speedup?*"])


def test_help_shows_each_default(pytester):
    result = pytester.runpytest("--help")
    out = " ".join(result.stdout.str().split())
    number = "float" if tuple(int(p) for p in pytest.__version__.split(".")[:2]) >= (8, 4) else "string"  # see options._ini_type
    for text in (
        f"ampgate_min_speedup ({number}):",
        "(default: 1.2)",
        "ampgate_strict (bool):",
        "ampgate_modes (args):",
        "(default: amp_fp16 amp_bf16)",
        "--ampgate-lock-timeout=SECONDS",
        "Default: ini ampgate_lock_timeout, else 3600",
        "--ampgate-modes=MODES",
        "--ampgate-only",
    ):
        assert text in out, text


def test_modes_from_the_command_line_lose_to_the_marker_and_beat_the_ini(pytester):
    pytester.makeini("[pytest]\nampgate_modes = fp16\n")
    pytester.makepyfile(
        test_cfg=SHOW_CONFIG + "\n\n@pytest.mark.amp_regression(modes=['bf16'])\n"
        "def test_marked(ampgate):\n    print('MARKED', list(ampgate.config.modes))\n",
    )
    pytester.makeconftest("import pytest\n")
    (pytester.path / "test_cfg.py").write_text("import pytest\n" + (pytester.path / "test_cfg.py").read_text())
    result = pytester.runpytest(*CPU, "-s", "--ampgate-modes", "amp_bf16,amp_fp16")
    result.assert_outcomes(passed=2)
    out = result.stdout.str()
    assert "CONFIG 1.2 True ['amp_bf16', 'amp_fp16']" in out and "MARKED ['bf16']" in out
    bad = pytester.runpytest(*CPU, "--ampgate-modes", "amp_fp17")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["*--ampgate-modes*amp_fp17*"])


def test_ampgate_only_selects_marked_and_fixture_gated_tests(pytester):
    pytester.makepyfile(
        test_sel=(
            "import pytest\n\n"
            "@pytest.mark.amp_regression\ndef test_marked(ampgate):\n    pass\n\n"
            "def test_by_fixture(ampgate):\n    pass\n\n"
            "def test_plain():\n    pass\n"
        )
    )
    result = pytester.runpytest(*CPU, "--ampgate-only", "-v")
    result.assert_outcomes(passed=2, deselected=1)
    result.stdout.fnmatch_lines(["*test_marked PASSED*", "*test_by_fixture PASSED*"])
    # -m amp_regression misses the fixture-gated test; --ampgate-only alone turns the gate on
    result = pytester.runpytest("-p", "no:cacheprovider", "--ampgate-device", "cpu", "--ampgate-only")
    result.assert_outcomes(passed=2, deselected=1)


NATIVE_TOML = tuple(int(p) for p in pytest.__version__.split(".")[:2]) >= (9, 0)

WRONG_INI = {"float": "fast", "int": "2.5", "bool": "perhaps"}
"""An INI-file string of the wrong type, by the key's ini type."""
WRONG_TOML = {"float": '"fast"', "int": "2.5", "bool": "1"}
"""A native-TOML value of the wrong type (a TOML string, float, integer), by the key's ini type."""


LOWEST = {"rounds": 1, "steps_per_block": 1, "world_size": 1, "baseline_runs": 1, "baseline_recordings": 1, "confirm_runs": 2}
"""The least each whole-number setting takes (the rest take 0)."""


def _expected(name: str, raw: str) -> str:
    """What the plugin says: the key, then what the setting takes (the fix), then the value."""
    kind = "float" if name == "lock_timeout" else INI_TYPES.get(name, "float")
    takes = {
        "float": "must be a number of seconds >= 0 (0: wait forever)" if name == "lock_timeout" else "must be a number",
        "int": f"must be a whole number >= {LOWEST.get(name, 0)}",
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
