"""The plugin's options: command-line flags, typed ini keys, and the session settings they resolve to.

Every relative path follows one rule (see :func:`path_setting`), every ini key is typed for pytest
9's native TOML table, and a misspelt ``ampgate_*`` key is refused with the nearest valid one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from ..config import SETTINGS
from ..errors import ConfigError

if TYPE_CHECKING:
    from ..session import GateOptions

DEFAULT_DEVICE_LOCK_TIMEOUT = 3600.0
"""Seconds a gated test waits for its device before failing with the holder's name: long enough
for another job's whole gated run, short of a CI job's own timeout, so a hung holder is named."""

INI_TYPES = {
    "compile": "string",
    "max_graph_breaks": "string",
    "max_compile_time_ratio": "string",
    "also_eager": "bool",
    "modes": "args",
    "check_speed": "bool",
    "check_memory": "bool",
    "confirm": "bool",
    "strict": "bool",
    "check_step_time": "bool",
    "missing_baseline": "string",
    "warmup_steps": "int",
    "rounds": "int",
    "steps_per_block": "int",
    "memory_steps": "int",
    "world_size": "int",
    "baseline_runs": "int",
    "baseline_recordings": "int",
    "confirm_runs": "int",
}
"""pytest ini types of the ``ampgate_<setting>`` keys (the rest are floats), so that pytest 9's native
``[tool.pytest]`` table takes ``1.3``, ``true`` and ``["amp_bf16"]``; INI-file and ``-o`` strings still work."""

SESSION_INI_KEYS = ("ampgate_device", "ampgate_baseline_dir", "ampgate_data_root", "ampgate_lock_timeout")
"""The ini keys of session-wide options; the others (``ampgate_<setting>``) are per-test defaults."""


def add_options(parser) -> None:
    group = parser.getgroup("ampgate", "AMP regression gate (pytest-ampgate)")
    group.addoption(
        "--ampgate",
        action="store_true",
        default=False,
        help="run the tests marked amp_regression (skipped without this flag). Default: off",
    )
    group.addoption(
        "--ampgate-update",
        action="store_true",
        default=False,
        help="record the measured results as the new baselines (written at session end). Default: off",
    )
    group.addoption(
        "--ampgate-prune",
        action="store_true",
        default=False,
        help="with --ampgate-update: delete baseline entries of tests that no longer exist. Default: off",
    )
    group.addoption(
        "--ampgate-device",
        default=None,
        help="where to train: cuda, cuda:N, cuda:auto (xdist workers spread over the GPUs, one lock "
        "each) or cpu (numerical checks only; timing is not gated). Default: ini ampgate_device, else cuda",
    )
    group.addoption(
        "--ampgate-baseline-dir",
        default=None,
        help="directory of the baseline JSON files. Default: ini ampgate_baseline_dir, else baselines/ at the rootdir",
    )
    group.addoption(
        "--ampgate-data-root",
        default=None,
        help="directory holding MNIST/CIFAR-10 files in torchvision's layout. Default: ini ampgate_data_root, else synthetic data",
    )
    group.addoption(
        "--ampgate-download",
        action="store_true",
        default=False,
        help="let torchvision download MNIST/CIFAR-10 into --ampgate-data-root if missing. Default: off",
    )
    group.addoption(
        "--ampgate-compile",
        default=None,
        metavar="SPEC",
        help="run every mode (fp32 too) under torch.compile: true (Inductor), BACKEND or BACKEND:MODE "
        "(e.g. inductor:reduce-overhead). Default: ini ampgate_compile, else eager",
    )
    group.addoption("--ampgate-strict", action="store_true", default=False, help="treat INCONCLUSIVE verdicts as failures. Default: off")
    group.addoption(
        "--ampgate-json",
        default=None,
        metavar="PATH",
        help="write a JSON report of the gated run to PATH (schema: docs/json-report.md). Default: none",
    )
    group.addoption(
        "--ampgate-markdown",
        default=None,
        metavar="PATH",
        help="write the summary table as Markdown to PATH (also appended to $GITHUB_STEP_SUMMARY when set). Default: none",
    )
    group.addoption(
        "--ampgate-plot",
        default=None,
        metavar="PATH",
        help="write a PNG chart of speedups and memory ratios against their limits (needs matplotlib). Default: none",
    )
    group.addoption(
        "--ampgate-modes",
        default=None,
        metavar="MODES",
        help="precision modes for this run, e.g. amp_bf16,amp_fp16; wins over ini ampgate_modes, "
        f"loses to modes= in a test's marker. Default: ini ampgate_modes, else {default_text('modes')}",
    )
    group.addoption(
        "--ampgate-only",
        action="store_true",
        default=False,
        help="run only the gated tests (marked amp_regression or using an ampgate fixture); implies --ampgate. Default: off",
    )
    group.addoption(
        "--ampgate-bisect",
        action="store_true",
        default=False,
        help="for git bisect run: only the gated tests (implies --ampgate-only), and the exit status says 0 every gated "
        "test passed, 1 one failed its gate, 125 nothing could be judged here (INCONCLUSIVE, skipped, errored, measured "
        "nothing), 128 the run broke off (interrupted, usage error). Default: off",
    )
    group.addoption(
        "--ampgate-lock-timeout",
        default=None,
        type=float,
        metavar="SECONDS",
        help="give up waiting for the device lock after SECONDS, naming its holder (0: wait forever). "
        f"Default: ini ampgate_lock_timeout, else {DEFAULT_DEVICE_LOCK_TIMEOUT:g}",
    )
    parser.addini("ampgate_device", "default for --ampgate-device (default: cuda)", default="cuda")
    parser.addini(
        "ampgate_baseline_dir", "default for --ampgate-baseline-dir, relative to the rootdir (default: baselines)", default="baselines"
    )
    parser.addini("ampgate_data_root", "default for --ampgate-data-root (default: synthetic data)", default="")
    parser.addini(
        "ampgate_lock_timeout",
        f"default for --ampgate-lock-timeout in seconds (default: {DEFAULT_DEVICE_LOCK_TIMEOUT:g})",
        type=_ini_type("float"),
        default=None,
    )
    for name, (_check, text) in SETTINGS.items():
        parser.addini(
            f"ampgate_{name}", f"{text} (default: {default_text(name)})", type=_ini_type(INI_TYPES.get(name, "float")), default=None
        )


class BenchmarkJsonFolder:
    """``--benchmark-json PATH`` into a folder that does not exist yet: pytest-benchmark < 5.3 opens
    the file while the command line is parsed (argparse.FileType), before any hook could create the
    folder, so its option's type is wrapped to create the folder first (as --junitxml does).

    Registered with the parser it wraps, because pytest-benchmark may register after us: its
    option exists only once its plugin is registered."""

    def __init__(self, parser):
        self.parser = parser
        self.pytest_plugin_registered()

    def pytest_plugin_registered(self) -> None:
        parser = self.parser
        targets = [a for a in getattr(getattr(parser, "optparser", None), "_actions", ()) if "--benchmark-json" in a.option_strings]
        for group in getattr(parser, "_groups", ()):  # pytest < 9 keeps the Argument until parsing
            targets += [o for o in getattr(group, "options", ()) if "--benchmark-json" in o.names()]
        for target in targets:
            opener = getattr(target, "type", None) or str
            if getattr(opener, "ampgate_makes_folder", False):
                continue

            def make_folder_then_open(value, opener=opener):
                if value and value != "-":
                    try:
                        Path(value).parent.mkdir(parents=True, exist_ok=True)
                    except OSError:
                        pass  # the opener then says why it cannot write there
                return opener(value)

            make_folder_then_open.ampgate_makes_folder = True
            target.type = make_folder_then_open
            if isinstance(getattr(target, "_attrs", None), dict):
                target._attrs["type"] = make_folder_then_open


def _ini_type(kind: str) -> str:
    """pytest < 8.4 has no "int"/"float" ini types: there the value stays a string, which the
    setting's own check converts (with the same error messages)."""
    if kind in ("int", "float") and tuple(int(p) for p in pytest.__version__.split(".")[:2] if p.isdigit()) < (8, 4):
        return "string"
    return kind


def default_text(name: str) -> str:
    from ..config import GateConfig

    value = getattr(GateConfig, name, None)
    if name in ("check_speed", "check_memory"):
        return "auto: on CUDA only; set true or false to force"
    if isinstance(value, tuple):
        return " ".join(value)
    if value is None:
        return "unset"
    return "true" if value is True else "false" if value is False else str(value)


def ini_value(config, key: str, check=None):
    """``config.getini``, typed by pytest.  Where pytest's own conversion refuses the value (``-o
    ampgate_min_speedup=abc``, a native-TOML ``"1.3"`` string for a float; pytest 9.2 says so with a
    UsageError that names no key, earlier versions with a ValueError), the raw value goes through
    the setting's own check instead: it is accepted if that check accepts it, else refused with the
    check's message (naming the key, the setting and the allowed range), never an INTERNALERROR."""
    try:
        return config.getini(key)
    except (TypeError, ValueError, pytest.UsageError) as exc:  # pytest >= 9.2 raises UsageError (its #14791)
        pytest_says = f"ini option {key}: {exc}".replace(f"{config.inipath}: ", "")
        raw = _raw_ini(config, key)
        name = key[len("ampgate_") :]
        check = check or (SETTINGS[name][0] if name in SETTINGS else None)
        if raw is None or check is None:
            raise ConfigError(pytest_says) from None
        if name == "modes":
            return [raw] if isinstance(raw, str) else list(raw)
        try:
            return check(name, raw)
        except ConfigError as refused:
            raise ConfigError(f"ini option {key}: {refused}") from None


def _raw_ini(config, key: str):
    """The value as written in the ini file or ``-o`` (only read once pytest's conversion failed)."""
    override = getattr(config, "_get_override_ini_value", None)  # pytest < 9 keeps -o apart from the file
    if override is not None and override(key) is not None:
        return override(key)
    store = getattr(config, "_inicfg", None)  # pytest 9: key -> ConfigValue (-o included)
    if not isinstance(store, dict):
        store = getattr(config, "inicfg", None)  # pytest < 9: key -> str
    if not isinstance(store, dict) or key not in store:
        return None
    value = store[key]
    return getattr(value, "value", value)


def _ini_settings(config) -> dict:
    """Every ``ampgate_<setting>`` the ini file sets, checked now (with or without ``--ampgate``): on
    pytest < 8.4 numbers arrive as the strings written, which only the setting's own check converts."""
    values = {}
    for name in SETTINGS:
        value = ini_value(config, f"ampgate_{name}")
        if value not in ("", None, []):
            if name == "modes":  # "amp_fp16,amp_bf16" as well as "amp_fp16 amp_bf16" or a TOML list
                value = [m for v in value for m in str(v).replace(",", " ").split()]
            else:  # (modes are checked once a gated test runs: naming them imports torch)
                try:
                    SETTINGS[name][0](name, value)
                except ConfigError as refused:
                    raise ConfigError(f"ini option ampgate_{name}: {refused}") from None
            values[name] = value
    return values


def check_ini_keys(config) -> None:
    """A misspelt ``ampgate_*`` key would otherwise be a generic warning and silently do nothing."""
    import difflib

    known = set(SESSION_INI_KEYS) | {f"ampgate_{name}" for name in SETTINGS}
    getter = getattr(config, "_get_unknown_ini_keys", None)  # pytest's own list of keys nobody declared
    unknown = sorted(k for k in (getter() if getter else ()) if k.startswith("ampgate_"))
    if unknown:
        key = unknown[0]
        near = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
        hint = f"did you mean {near[0]}?" if near else f"valid keys: {', '.join(sorted(known))}"
        raise ConfigError(f"unknown ini option {key}: {hint}")


@dataclass(frozen=True)
class PluginSettings:
    """What the command line and the ini file decide for the whole session, resolved once."""

    gate: GateOptions
    """What the engine's session needs."""
    lock_timeout: float | None
    """Seconds to wait for the device lock; None waits forever."""
    raw_device: str
    """``--ampgate-device`` as given (``cuda:auto`` spreads gated tests instead of grouping them)."""
    json: Path | None = None
    markdown: Path | None = None
    plot: Path | None = None


def resolve(config) -> PluginSettings:
    """Every session-wide setting, checked; a bad one is a :class:`ConfigError` naming the option."""
    from ..session import GateOptions, validate_device

    check_ini_keys(config)
    raw_device = config.getoption("ampgate_device") or config.getini("ampgate_device") or "cuda"
    enabled = bool(
        config.getoption("ampgate")
        or config.getoption("ampgate_update")
        or config.getoption("ampgate_only")
        or config.getoption("ampgate_bisect")
    )
    device = validate_device(auto_device(config, raw_device) if enabled else raw_device.replace("auto", "0"))
    base_dir = path_setting(config, "ampgate_baseline_dir") or Path(config.rootpath) / "baselines"
    data_root = path_setting(config, "ampgate_data_root")
    ini_settings = _ini_settings(config)
    cli_modes = config.getoption("ampgate_modes")
    if cli_modes:  # the run's choice beats the ini file; a test's own marker still beats both
        from ..config import build_config

        ini_settings["modes"] = list(build_config(("--ampgate-modes", {"modes": cli_modes})).modes)
    cli_compile = config.getoption("ampgate_compile")
    if cli_compile is not None:  # like --ampgate-modes: beats the ini file, a test's marker beats both
        from ..compiled import parse_compile

        ini_settings["compile"] = parse_compile("--ampgate-compile", cli_compile)
    gate = GateOptions(
        enabled=enabled,
        update=config.getoption("ampgate_update"),
        prune=config.getoption("ampgate_prune"),
        device=device,
        baseline_dir=base_dir,
        data_root=str(data_root) if data_root else None,
        download=config.getoption("ampgate_download"),
        strict=config.getoption("ampgate_strict"),
        ini_settings=ini_settings,
        rerun_args=rerun_args(config),
        rootdir_from_cwd=_relative(config.rootpath, config.invocation_params.dir),
    )
    outputs = {name: config.getoption(f"ampgate_{name}") for name in ("json", "markdown", "plot")}
    return PluginSettings(
        gate=gate,
        lock_timeout=_lock_timeout(config),
        raw_device=raw_device,
        **{name: at_root(config, value) if value else None for name, value in outputs.items()},
    )


RERUN_OPTIONS = ("ampgate_device", "ampgate_baseline_dir", "ampgate_data_root", "ampgate_download", "ampgate_modes")
"""Command-line options that a printed command must repeat (each chooses what is measured or where
baselines live); ini values need no repeating, the same ini file is read again."""


def rerun_args(config) -> tuple[str, ...]:
    """This run's options that a printed command needs, as typed: those above, ``-o ampgate_*``
    overrides, and an explicit ini file or rootdir."""
    args: list[str] = []
    for dest in RERUN_OPTIONS:
        value, flag = config.getoption(dest), f"--{dest.replace('_', '-')}"
        if value is True:
            args.append(flag)
        elif value:
            args += [flag, str(value)]
    args += [a for o in config.getoption("override_ini") or () if o.startswith("ampgate_") for a in ("-o", o)]
    inifile = config.getoption("inifilename", None)
    if inifile:
        args += ["-c", str(inifile)]
    rootdir = config.getoption("rootdir", None)
    if rootdir:
        args += ["--rootdir", str(rootdir)]
    return tuple(args)


def _relative(path, start) -> str:
    relative = os.path.relpath(path, start)
    return "" if relative == "." else Path(relative).as_posix()


def auto_device(config, device: str) -> str:
    """``cuda:auto``: each xdist worker takes its own GPU (worker N -> GPU N mod count)."""
    if device.strip().lower() != "cuda:auto":
        return device
    from ..gpu_lock import pick_device

    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    import torch

    return pick_device(device, int(worker[2:]) if worker[2:].isdigit() else 0, torch.cuda.device_count())


def _lock_timeout(config) -> float | None:
    """Seconds to wait for the device lock; None waits forever (``0`` on the command line or in the ini)."""
    value = config.getoption("ampgate_lock_timeout")
    if value is None:
        value = ini_value(config, "ampgate_lock_timeout", check=_seconds)
        value = value.strip() if isinstance(value, str) else value
        if isinstance(value, str) and value:  # pytest < 8.4 has no "float" ini type: the string as written
            try:
                value = _seconds("lock_timeout", value)
            except ConfigError as refused:
                raise ConfigError(f"ini option ampgate_lock_timeout: {refused}") from None
    value = DEFAULT_DEVICE_LOCK_TIMEOUT if value in (None, "") else float(value)
    if value < 0 or value != value:
        raise ConfigError(f"--ampgate-lock-timeout / ini option ampgate_lock_timeout must be >= 0 seconds, got {value!r}")
    return value or None


def _seconds(name: str, value) -> float:
    """A number of seconds, from an ini string or a TOML number (not a TOML bool)."""
    try:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number of seconds >= 0 (0: wait forever), got {value!r}") from None


def path_setting(config, name: str) -> Path | None:
    """One rule for every relative path: on the command line it is relative to the directory pytest
    was started in (as --junitxml and shell completion assume); in an ini file, to the rootdir (so
    the file means the same wherever pytest is started)."""
    value, base = config.getoption(name), config.invocation_params.dir
    if not value:
        value, base = config.getini(name), config.rootpath
    if not value:
        return None
    path = Path(str(value)).expanduser()
    return path if path.is_absolute() else Path(base) / path


def at_root(config, path) -> Path:
    """Output paths are relative to the invocation directory, like --junitxml."""
    path = Path(path).expanduser()  # "~" as in every other path option (and --junitxml)
    path = path if path.is_absolute() else Path(config.invocation_params.dir) / path
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a symlink loop (RuntimeError before Python 3.13): refused by check_output_path
        return Path(os.path.abspath(path))


def check_outputs(settings: PluginSettings) -> None:
    """What the session end would fail to write is a usage error now, before anything is measured."""
    from ..outputs.paths import OUTPUT_OPTIONS, check_baseline_dir, check_output_path, check_step_summary

    for name, option in OUTPUT_OPTIONS.items():
        path = getattr(settings, name)
        if path:
            check_output_path(option, path)
    if settings.gate.enabled:
        if os.environ.get("GITHUB_STEP_SUMMARY"):
            check_step_summary(os.environ["GITHUB_STEP_SUMMARY"])
        check_baseline_dir(Path(settings.gate.baseline_dir), settings.gate.update)
