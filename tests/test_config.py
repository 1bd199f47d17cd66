"""GateConfig and build_config: every setting's validation, the layer order, and errors that say where."""

import dataclasses

import pytest

from pytest_ampgate.config import MISSING_BASELINE_POLICIES, SETTINGS, GateConfig, build_config
from pytest_ampgate.errors import ConfigError
from pytest_ampgate.session import CPU_PROFILE, GateOptions, GateSession, validate_device

MARKER = "marker amp_regression on tests/test_x.py::test_y"


def only(**values):
    return build_config((MARKER, values))


def test_defaults_and_settings_table_agree():
    config = build_config()
    assert config == GateConfig()
    assert set(SETTINGS) == {f.name for f in dataclasses.fields(GateConfig)}
    assert config.missing_baseline == "warn" and config.missing_baseline in MISSING_BASELINE_POLICIES
    assert all(text for _check, text in SETTINGS.values())


def test_config_is_frozen_and_serialisable():
    config = only(modes=["amp_bf16"], rounds=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.rounds = 4
    d = config.to_dict()
    assert d["modes"] == ["amp_bf16"] and d["rounds"] == 3
    assert build_config(("round trip", d)) == config


# --- numbers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, text, expected",
    [
        ("min_speedup", "1.3", 1.3),
        ("min_speedup", " 2 ", 2.0),
        ("speedup_tolerance", "0.25", 0.25),
        ("max_memory_ratio", "0.8", 0.8),
        ("memory_tolerance", "0", 0.0),
        ("accuracy_tolerance", "0.05", 0.05),
        ("max_skipped_fraction", "1", 1.0),
        ("min_loss_scale", "128", 128.0),
        ("min_low_precision_share", "0.75", 0.75),
        ("confidence", "0.9", 0.9),
        ("noise_threshold", "0.2", 0.2),
    ],
)
def test_numbers_accept_ini_strings(name, text, expected):
    value = getattr(build_config(("ini option ampgate_<name>", {name: text})), name)
    assert value == expected and isinstance(value, float)


@pytest.mark.parametrize(
    "name, value, words",
    [
        ("min_speedup", "fast", "must be a number, got 'fast'"),
        ("min_speedup", 0, "must be > 0"),
        ("min_speedup", -1.5, "must be > 0"),
        ("min_speedup", True, "finite number"),
        ("min_speedup", float("nan"), "finite number"),
        ("min_speedup", float("inf"), "finite number"),
        ("min_speedup", [1.2], "finite number"),
        ("speedup_tolerance", 1.5, "must be <= 1"),
        ("speedup_tolerance", -0.1, "must be >= 0"),
        ("max_memory_ratio", 0.0, "must be > 0"),
        ("memory_tolerance", -0.01, "must be >= 0"),
        ("accuracy_tolerance", 2, "must be <= 1"),
        ("max_skipped_fraction", 1.01, "must be <= 1"),
        ("min_loss_scale", -1, "must be >= 0"),
        ("min_low_precision_share", 1.5, "must be <= 1"),
        ("confidence", 1.0, "must be < 1"),  # a 100% interval is no interval
        ("confidence", 0, "must be > 0"),
        ("noise_threshold", 0, "must be > 0"),
    ],
)
def test_bad_numbers_are_refused_naming_source_and_setting(name, value, words):
    with pytest.raises(ConfigError) as info:
        only(**{name: value})
    text = str(info.value)
    assert text.startswith(f"{MARKER}: {name} ")
    assert words in text


# --- whole numbers ---------------------------------------------------------------------------


@pytest.mark.parametrize("name, low", [("warmup_steps", 0), ("rounds", 1), ("steps_per_block", 1), ("memory_steps", 0)])
def test_whole_numbers(name, low):
    assert getattr(only(**{name: low}), name) == low
    assert getattr(build_config(("ini option ampgate_<name>", {name: str(low + 2)})), name) == low + 2
    for bad in (low - 1, 2.0, "2.5", "many", True, [3]):
        with pytest.raises(ConfigError, match=rf"^{MARKER}: {name} must be a whole number >= {low}, got "):
            only(**{name: bad})


def test_rounds_zero_is_refused():
    with pytest.raises(ConfigError, match=r"rounds must be a whole number >= 1, got 0"):
        only(rounds=0)


# --- flags and choices -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("true", True),
        ("TRUE", True),
        ("yes", True),
        ("1", True),
        ("on", True),
        ("false", False),
        ("no", False),
        ("0", False),
        (" Off ", False),
    ],
)
@pytest.mark.parametrize("name", ["confirm", "strict"])
def test_flags_accept_ini_words(name, text, expected):
    assert getattr(build_config(("ini option ampgate_<name>", {name: text})), name) is expected


@pytest.mark.parametrize("name", ["confirm", "strict", "check_speed", "check_memory"])
def test_flags_refuse_other_values(name):
    takes = "true, false or auto" if name.startswith("check_") else "true or false"
    for bad in ("maybe", 1, 0.0, [True]):
        with pytest.raises(ConfigError, match=rf"^{MARKER}: {name} must be {takes}, got "):
            only(**{name: bad})


@pytest.mark.parametrize("name", ["check_speed", "check_memory"])
def test_auto_flags(name):
    assert getattr(build_config(), name) is None
    assert getattr(only(**{name: "auto"}), name) is None
    assert getattr(only(**{name: True}), name) is True
    assert getattr(only(**{name: "false"}), name) is False


def test_auto_flags_decide_by_device():
    auto = build_config()
    assert auto.timing_applies("cuda") and auto.memory_applies("cuda")
    assert not auto.timing_applies("cpu") and not auto.memory_applies("cpu")
    forced = only(check_speed=True, check_memory=False)
    assert forced.timing_applies("cpu") and not forced.memory_applies("cuda")


def test_missing_baseline_policy():
    for policy in MISSING_BASELINE_POLICIES:
        assert only(missing_baseline=policy.upper()).missing_baseline == policy
    with pytest.raises(ConfigError, match=r"missing_baseline must be one of warn, fail, ignore, got 'error'"):
        only(missing_baseline="error")
    with pytest.raises(ConfigError, match=r"missing_baseline must be one of"):
        only(missing_baseline=False)


# --- modes -----------------------------------------------------------------------------------


def test_modes_from_lists_ini_strings_and_aliases():
    assert only(modes=["amp_fp16"]).modes == ("amp_fp16",)
    assert only(modes=("O1", "amp_bf16")).modes == ("amp_fp16", "amp_bf16")
    ini = build_config(("ini option ampgate_<name>", {"modes": "amp_fp16 amp_bf16"}))
    assert ini.modes == ("amp_fp16", "amp_bf16")
    assert build_config(("ini", {"modes": "amp_bf16, bf16"})).modes == ("amp_bf16", "bf16")


@pytest.mark.parametrize(
    "value, words",
    [
        (["fp8"], "modes: unknown precision mode 'fp8'; valid modes: fp32, tf32, amp_fp16, amp_bf16"),
        (["O4"], "modes: unknown precision mode 'O4'"),
        (["amp_fp16", "O2", "fp16_master"], "modes names a mode twice"),
        ([], "modes must be a non-empty list of precision modes"),
        ("", "modes must be a non-empty list of precision modes"),
        (3, "modes must be a non-empty list of precision modes"),
        (["amp_fp16", "O1"], "modes names a mode twice"),
        ([16], "modes: precision mode must be a name"),
    ],
)
def test_bad_modes(value, words):
    with pytest.raises(ConfigError) as info:
        only(modes=value)
    assert str(info.value).startswith(f"{MARKER}: ")
    assert words in str(info.value)


# --- layers and sources ----------------------------------------------------------------------


def test_later_layers_win_and_none_means_unset():
    config = build_config(
        ("CPU profile", {"rounds": 6, "warmup_steps": 2}),
        ("ini option ampgate_<name>", {"rounds": "4", "accuracy_tolerance": "0.05"}),
        (MARKER, {"rounds": 3, "accuracy_tolerance": None}),
    )
    assert config.rounds == 3  # the marker beats the ini, which beats the profile
    assert config.accuracy_tolerance == 0.05  # None in the marker leaves the ini value
    assert config.warmup_steps == 2  # the profile's, nothing later set it
    assert config.min_speedup == GateConfig().min_speedup  # the default


def test_unknown_setting_names_source_and_lists_valid_ones():
    with pytest.raises(ConfigError) as info:
        only(min_speedp=1.3, tolerance=0.1)
    text = str(info.value)
    assert text.startswith(f"{MARKER}: unknown settings min_speedp, tolerance; valid: ")
    for name in SETTINGS:
        assert name in text.split("valid: ", 1)[1]
    with pytest.raises(ConfigError, match=rf"^{MARKER}: unknown setting min_speedp; valid: modes, min_speedup"):
        only(min_speedp=1.3)


def test_ini_errors_name_the_ini_key():
    with pytest.raises(ConfigError, match=r"^ini option ampgate_accuracy_tolerance: accuracy_tolerance must be <= 1, got 1.5$"):
        build_config(("ini option ampgate_<name>", {"accuracy_tolerance": "1.5"}))


def test_the_first_bad_layer_is_reported():
    with pytest.raises(ConfigError, match=r"^ini option ampgate_rounds: rounds must be"):
        build_config(("ini option ampgate_<name>", {"rounds": "zero"}), (MARKER, {"rounds": 3}))


# --- the session's layers --------------------------------------------------------------------


def test_session_layers_cpu_profile_ini_marker_strict():
    cpu = GateSession(GateOptions(device="cpu", ini_settings={"rounds": "4", "accuracy_tolerance": "0.03"}))
    config = cpu.config_for("t.py::test_a", (), {"accuracy_tolerance": 0.1})
    assert config.rounds == 4 and config.accuracy_tolerance == 0.1
    assert config.steps_per_block == CPU_PROFILE["steps_per_block"] and config.warmup_steps == CPU_PROFILE["warmup_steps"]
    cuda = GateSession(GateOptions(device="cuda"))
    assert cuda.config_for("t.py::test_a").steps_per_block == GateConfig().steps_per_block
    strict = GateSession(GateOptions(device="cpu", strict=True))
    assert strict.config_for("t.py::test_a").strict is True


def test_session_refuses_positional_marker_args_and_names_the_test():
    session = GateSession(GateOptions(device="cpu"))
    with pytest.raises(ConfigError, match=r"^marker amp_regression on t.py::test_a: takes keyword arguments only, got positional \[1.3\]"):
        session.config_for("t.py::test_a", (1.3,), {})
    with pytest.raises(ConfigError, match=r"^marker amp_regression on t.py::test_a: unknown setting speed"):
        session.config_for("t.py::test_a", (), {"speed": 2})
    bad_ini = GateSession(GateOptions(device="cpu", ini_settings={"min_speedup": "fast"}))
    with pytest.raises(ConfigError, match=r"^ini option ampgate_min_speedup: min_speedup must be a number, got 'fast'"):
        bad_ini.config_for("t.py::test_a")


@pytest.mark.parametrize("good", ["cuda", "CUDA", "cuda:1", "cpu", " cpu "])
def test_device_option_accepts(good):
    assert validate_device(good) == good.strip().lower()


@pytest.mark.parametrize("bad", ["gpu", "cpu:0", "cuda:x", "", "tpu"])
def test_device_option_refuses(bad):
    with pytest.raises(ConfigError, match=r"--ampgate-device must be 'cuda', 'cuda:N' or 'cpu'"):
        validate_device(bad)


def test_measure_config_carries_the_protocol_settings():
    config = only(rounds=3, steps_per_block=2, warmup_steps=1, memory_steps=0, confidence=0.9, noise_threshold=0.2)
    mc = config.measure_config()
    assert (mc.rounds, mc.steps_per_block, mc.warmup_steps, mc.memory_steps, mc.confidence, mc.noise_threshold) == (3, 2, 1, 0, 0.9, 0.2)
    assert config.measure_config(seed=5).seed == 5
