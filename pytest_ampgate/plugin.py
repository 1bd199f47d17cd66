"""pytest hooks only: options, marker, fixtures, skips, the failing report, the terminal summary.

The gate's verdict is applied in ``pytest_runtest_makereport`` (as pytest-memray does), so the test
that regressed is the one that fails, even when its body asserts nothing.  Results ride on the
test report as plain dicts, which is how they reach the controller under pytest-xdist; baselines
are written once, at session end, by the process that saw every report.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from pathlib import Path

import pytest

from .config import SETTINGS
from .errors import AmpGateError, BaselineError, ConfigError, WorkloadError

MARKER = "amp_regression"
FIXTURES = ("ampgate", "ampgate_mnist", "ampgate_cifar")
REPORT_ATTR = "ampgate"
SESSION_KEY = pytest.StashKey["object"]()
CONFIG_KEY = pytest.StashKey["object"]()
GATE_KEY = pytest.StashKey["object"]()
STATE_KEY = pytest.StashKey[dict]()
LOCK_KEY = pytest.StashKey["object"]()
LOCK_TIMEOUT_KEY = pytest.StashKey["object"]()
LOCK_OBJECT_KEY = pytest.StashKey["object"]()
RUN_ATTR = "ampgate_run"
XDIST_GROUP = "ampgate"


def _benchmark_json_makes_its_folder(parser) -> None:
    """``--benchmark-json PATH`` into a folder that does not exist yet: pytest-benchmark < 5.3 opens
    the file while the command line is parsed (argparse.FileType), before any hook could create the
    folder, so its option's type is wrapped to create the folder first (as --junitxml does).
    pytest 9 builds the argparse action at once; older pytest keeps the Argument until parsing."""
    targets = [a for a in getattr(getattr(parser, "optparser", None), "_actions", ()) if "--benchmark-json" in a.option_strings]
    for group in getattr(parser, "_groups", ()):
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


_PARSERS: list = []


def pytest_plugin_registered(plugin, manager):
    for parser in _PARSERS:  # pytest-benchmark registered after us: its option exists only now
        _benchmark_json_makes_its_folder(parser)


UNMEASURED_ATTR = "ampgate_unmeasured"
NOT_RECORDED_ATTR = "ampgate_not_recorded"


def pytest_addoption(parser):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # pytest-benchmark says "disabled because xdist" in every process; the controller says it once
        import warnings

        warnings.filterwarnings("ignore", message="Benchmarks are automatically disabled because xdist")
    _PARSERS[:] = [parser]
    _benchmark_json_makes_its_folder(parser)
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
        "loses to modes= in a test's marker. Default: ini ampgate_modes, else amp_fp16 amp_bf16",
    )
    group.addoption(
        "--ampgate-only",
        action="store_true",
        default=False,
        help="run only the gated tests (marked amp_regression or using an ampgate fixture); implies --ampgate. Default: off",
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
            f"ampgate_{name}", f"{text} (default: {_default_text(name)})", type=_ini_type(INI_TYPES.get(name, "float")), default=None
        )


DEFAULT_DEVICE_LOCK_TIMEOUT = 3600.0
"""Seconds a gated test waits for its device before failing with the holder's name: long enough
for another job's whole gated run, short of a CI job's own timeout, so a hung holder is named."""

INI_TYPES = {
    "modes": "args",
    "check_speed": "bool",
    "check_memory": "bool",
    "confirm": "bool",
    "strict": "bool",
    "missing_baseline": "string",
    "warmup_steps": "int",
    "rounds": "int",
    "steps_per_block": "int",
    "memory_steps": "int",
    "world_size": "int",
}
"""pytest ini types of the ``ampgate_<setting>`` keys (the rest are floats), so that pytest 9's native
``[tool.pytest]`` table takes ``1.3``, ``true`` and ``["amp_bf16"]``; INI-file and ``-o`` strings still work."""


def _ini_type(kind: str) -> str:
    """pytest < 8.4 has no "int"/"float" ini types: there the value stays a string, which the
    setting's own check converts (with the same error messages)."""
    if kind in ("int", "float") and tuple(int(p) for p in pytest.__version__.split(".")[:2] if p.isdigit()) < (8, 4):
        return "string"
    return kind


def _default_text(name: str) -> str:
    from .config import GateConfig

    value = getattr(GateConfig, name, None)
    if name in ("check_speed", "check_memory"):
        return "auto: on CUDA only; set true or false to force"
    if isinstance(value, tuple):
        return " ".join(value)
    if value is None:
        return "unset"
    return "true" if value is True else "false" if value is False else str(value)


def _ini_value(config, key: str):
    """``config.getini``, typed by pytest.  Where pytest's own conversion refuses the value (``-o
    ampgate_min_speedup=abc``, a native-TOML ``"1.3"`` string for a float), the raw value goes through
    the setting's own check instead: it is accepted if that check accepts it, else refused with the
    check's message (naming the key, the setting and the allowed range), never an INTERNALERROR."""
    try:
        return config.getini(key)
    except (TypeError, ValueError) as exc:
        pytest_says = f"ini option {key}: {exc}".replace(f"{config.inipath}: ", "")
        raw = _raw_ini(config, key)
        name = key[len("ampgate_") :]
        if raw is None or name not in SETTINGS:
            raise ConfigError(pytest_says) from None
        if name == "modes":
            return [raw] if isinstance(raw, str) else list(raw)
        try:
            return SETTINGS[name][0](name, raw)
        except ConfigError as check:
            raise ConfigError(f"ini option {key}: {check}") from None


def _raw_ini(config, key: str):
    """The value as written in the ini file or ``-o`` (only read once pytest's conversion failed)."""
    store = getattr(config, "_inicfg", None)  # pytest 9: key -> ConfigValue
    if not isinstance(store, dict):
        store = getattr(config, "inicfg", None)  # pytest < 9: key -> str
    if not isinstance(store, dict) or key not in store:
        return None
    value = store[key]
    return getattr(value, "value", value)


def _ini_settings(config) -> dict:
    values = {}
    for name in SETTINGS:
        value = _ini_value(config, f"ampgate_{name}")
        if value not in ("", None, []):
            if name == "modes":  # "amp_fp16,amp_bf16" as well as "amp_fp16 amp_bf16" or a TOML list
                value = [m for v in value for m in str(v).replace(",", " ").split()]
            values[name] = value
    return values


def _check_ini_keys(config) -> None:
    """A misspelt ``ampgate_*`` key would otherwise be a generic warning and silently do nothing."""
    import difflib

    known = {"ampgate_device", "ampgate_baseline_dir", "ampgate_data_root", "ampgate_lock_timeout"}
    known |= {f"ampgate_{name}" for name in SETTINGS}
    getter = getattr(config, "_get_unknown_ini_keys", None)  # pytest's own list of keys nobody declared
    unknown = sorted(k for k in (getter() if getter else ()) if k.startswith("ampgate_"))
    if unknown:
        key = unknown[0]
        near = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
        hint = f"did you mean {near[0]}?" if near else f"valid keys: {', '.join(sorted(known))}"
        raise ConfigError(f"unknown ini option {key}: {hint}")


def _options(config):
    from .session import GateOptions, validate_device

    raw_device = _raw_device(config)
    enabled = bool(config.getoption("ampgate") or config.getoption("ampgate_update") or config.getoption("ampgate_only"))
    device = validate_device(_auto_device(config, raw_device) if enabled else raw_device.replace("auto", "0"))
    base_dir = _path_setting(config, "ampgate_baseline_dir") or Path(config.rootpath) / "baselines"
    data_root = _path_setting(config, "ampgate_data_root")
    data_root = str(data_root) if data_root else None
    ini_settings = _ini_settings(config)
    cli_modes = config.getoption("ampgate_modes")
    if cli_modes:  # the run's choice beats the ini file; a test's own marker still beats both
        from .config import build_config

        ini_settings["modes"] = list(build_config(("--ampgate-modes", {"modes": cli_modes})).modes)
    return GateOptions(
        enabled=enabled,
        update=config.getoption("ampgate_update"),
        prune=config.getoption("ampgate_prune"),
        device=device,
        baseline_dir=base_dir,
        data_root=data_root,
        download=config.getoption("ampgate_download"),
        strict=config.getoption("ampgate_strict"),
        ini_settings=ini_settings,
    )


def _raw_device(config) -> str:
    return config.getoption("ampgate_device") or config.getini("ampgate_device") or "cuda"


def _auto_device(config, device: str) -> str:
    """``cuda:auto``: each xdist worker takes its own GPU (worker N -> GPU N mod count)."""
    if device.strip().lower() != "cuda:auto":
        return device
    from .gpu_lock import pick_device

    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    import torch

    return pick_device(device, int(worker[2:]) if worker[2:].isdigit() else 0, torch.cuda.device_count())


def _lock_timeout(config) -> float | None:
    """Seconds to wait for the device lock; None waits forever (``0`` on the command line or in the ini)."""
    value = config.getoption("ampgate_lock_timeout")
    if value is None:
        value = _ini_value(config, "ampgate_lock_timeout")
    value = DEFAULT_DEVICE_LOCK_TIMEOUT if value in (None, "") else float(value)
    if value < 0 or value != value:
        raise ConfigError(f"--ampgate-lock-timeout / ini option ampgate_lock_timeout must be >= 0 seconds, got {value!r}")
    return value or None


def _path_setting(config, name: str) -> Path | None:
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


def _check_outputs(config, enabled: bool) -> None:
    """What the session end would fail to write is a usage error now, before anything is measured."""
    from .outputs.paths import OUTPUT_OPTIONS, check_output_path, check_step_summary

    try:
        for name, option in OUTPUT_OPTIONS.items():
            value = config.getoption(f"ampgate_{name}")
            if value:
                check_output_path(option, _at_root(config, value))
        if enabled and os.environ.get("GITHUB_STEP_SUMMARY"):
            check_step_summary(os.environ["GITHUB_STEP_SUMMARY"])
        if enabled:
            from .outputs.paths import check_baseline_dir

            options = config.stash[SESSION_KEY].options
            check_baseline_dir(Path(options.baseline_dir), options.update)
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from None


def _stop_on_sigterm(config) -> None:
    """A cancelled CI job sends SIGTERM: stop as after Ctrl-C, so the tests that finished keep their
    results and baselines (written whole, or not at all); restored when the session ends.  A handler
    someone else installed is left alone."""
    import signal
    import threading

    if not hasattr(signal, "SIGTERM") or threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous not in (signal.SIG_DFL, None):
        return

    def on_sigterm(signum, frame):
        __tracebackhide__ = True  # pytest names the frame that was interrupted, not this one
        raise KeyboardInterrupt("SIGTERM received (a cancelled job?): stopping as after Ctrl-C")

    signal.signal(signal.SIGTERM, on_sigterm)
    config.add_cleanup(lambda: signal.signal(signal.SIGTERM, previous))


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        f"{MARKER}(**settings): an AMP regression gate, run with --ampgate. Settings override the ini defaults: {', '.join(SETTINGS)}.",
    )
    try:
        _check_ini_keys(config)
        options = _options(config)
        lock_timeout = _lock_timeout(config)
        if options.enabled:
            from .file_safety import check_lock_dir

            check_lock_dir()  # a lock directory that is a file or not writable: say so now, not per test
    except (ConfigError, AmpGateError) as exc:
        raise pytest.UsageError(str(exc)) from None
    from .session import GateSession

    gate = GateSession(options, progress=_progress_writer(config))
    config.stash[SESSION_KEY] = gate
    config.stash[LOCK_TIMEOUT_KEY] = lock_timeout
    config.pluginmanager.register(ResultCollector(gate, config), "ampgate-results")
    if options.enabled and _dist_mode(config) == "load":
        # xdist: gated tests go to one worker per device (xdist_group), so no worker queues plain
        # tests behind a device lock; "loadgroup" is "load" plus that grouping.  The workers are
        # told in pytest_configure_node (they parse the original command line themselves).
        config.option.dist = "loadgroup"
    workerinput = getattr(config, "workerinput", None)
    if workerinput and workerinput.get("ampgate_loadgroup"):
        config.option.loadgroup = True  # what xdist's worker sets itself for --dist loadgroup
    if not hasattr(config, "workerinput"):  # the process that sees every result writes the CI outputs
        _check_outputs(config, gate.options.enabled)
        if gate.options.enabled:
            _stop_on_sigterm(config)
        if config.getoption("ampgate_plot"):
            from .outputs.chart import PlotUnavailable, require_matplotlib

            try:
                require_matplotlib()
            except PlotUnavailable as exc:
                raise pytest.UsageError(str(exc)) from None
        config.pluginmanager.register(CIOutputs(gate), "ampgate-outputs")
        if gate.options.enabled and config.pluginmanager.hasplugin("benchmark"):
            from .outputs.benchmark import BenchmarkBridge

            config.pluginmanager.register(BenchmarkBridge(config, gate), "ampgate-benchmark")
        if gate.options.enabled and _html_report_requested(config):
            from .outputs.html import HtmlColumns

            config.pluginmanager.register(HtmlColumns(), "ampgate-html")
    config.stash[STATE_KEY] = {"gated_ids": set(), "partial_modules": set(), "modules": set()}


def _html_report_requested(config) -> bool:
    return config.pluginmanager.hasplugin("html") and bool(config.getoption("htmlpath", None))


def _dist_mode(config) -> str:
    return getattr(config.option, "dist", "no") if config.pluginmanager.hasplugin("xdist") else "no"


def _progress_writer(config):
    """Progress lines at -v, written past output capturing; silent at the default verbosity."""
    if config.getoption("verbose") <= 0 or hasattr(config, "workerinput"):
        return None  # xdist workers have no terminal: the controller reports their gated tests instead

    def write(message: str) -> None:
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        capture = config.pluginmanager.get_plugin("capturemanager")
        if reporter is None:
            return
        if capture is not None:
            with capture.global_and_fixture_disabled():
                reporter.write_line(f"[ampgate] {message}")
        else:
            reporter.write_line(f"[ampgate] {message}")

    return write


def _is_gated(item) -> bool:
    return item.get_closest_marker(MARKER) is not None or any(f in getattr(item, "fixturenames", ()) for f in FIXTURES)


def _named_in_part(config, modules: set) -> set:
    """Modules the command line picks tests from by node id (``tests/test_x.py::test_y``).

    Like ``-k``, that collects a module in part, so the entries of its other tests are not stale.
    When such an argument cannot be mapped to a node id, every module counts as picked in part.
    """
    picked = set()
    root = Path(config.rootpath).resolve()
    for arg in config.args:
        path, sep, _rest = str(arg).partition("::")
        if not sep:
            continue
        try:
            picked.add(Path(config.invocation_params.dir, path).resolve().relative_to(root).as_posix())
        except ValueError:
            return set(modules)
    return picked


def _test_id(node_or_id) -> str:
    """The test's own node id: without the ``@<group>`` suffix xdist's loadgroup mode appends to
    grouped tests on its workers (baselines, reports and locks are keyed by the real id)."""
    nodeid = getattr(node_or_id, "nodeid", node_or_id)
    head, sep, tail = nodeid.rpartition("@")
    return head if sep and XDIST_GROUP in tail and "]" not in tail and "::" not in tail else nodeid


@pytest.hookimpl(tryfirst=True)  # before xdist's worker turns the xdist_group mark into a node id suffix
def pytest_collection_modifyitems(session, config, items):
    gate = config.stash[SESSION_KEY]
    state = config.stash[STATE_KEY]
    gated = [item for item in items if _is_gated(item)]
    if config.getoption("ampgate_only"):
        plain = [item for item in items if not _is_gated(item)]
        if plain:
            config.hook.pytest_deselected(items=plain)
            items[:] = gated
    if gate.options.enabled and config.pluginmanager.hasplugin("xdist") and _raw_device(config).strip().lower() != "cuda:auto":
        # One group per device: xdist's loadgroup runs them all on one worker, so no worker queues
        # plain tests behind a device lock (see pytest_configure).  cuda:auto spreads them instead.
        group = pytest.mark.xdist_group(f"{XDIST_GROUP}-{gate.options.device.replace(':', '')}")
        for item in gated:
            item.add_marker(group)
    for item in gated:
        try:
            item.stash[CONFIG_KEY] = gate.config_for(_test_id(item), *_marker_settings(item))
        except ConfigError as exc:
            raise pytest.UsageError(str(exc)) from None
        if item.nodeid.startswith("::") and gate.options.enabled:  # baselines are keyed by node id
            raise pytest.UsageError(
                f"{item.path} lies outside the rootdir {config.rootpath}, so pytest gives its gated test "
                f"the node id {item.nodeid!r} with no file in it, and its baselines would mix with those "
                "of same-named tests in other files; run pytest with a --rootdir that contains it"
            )
        state["gated_ids"].add(item.nodeid)
        state["modules"].add(item.nodeid.split("::", 1)[0])
    state["partial_modules"] |= _named_in_part(config, state["modules"])
    if gated:
        reason = gate.skip_reason()
        if reason:
            for item in gated:
                item.add_marker(pytest.mark.skip(reason=reason))


def _marker_settings(item) -> tuple[tuple, dict]:
    """Every amp_regression marker on the test (module, class, function, stacked): merged, the
    closest one (as pytest's get_closest_marker sees it) winning each setting it names."""
    args, kwargs = (), {}
    for marker in reversed(list(item.iter_markers(MARKER))):
        args += tuple(marker.args)
        kwargs.update(marker.kwargs)
    return args, kwargs


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_make_collect_report(collector):
    """What each collector found before any plugin filtered it (this wrapper is the innermost):
    the reference that tells a module collected in full from one narrowed by --lf, -k, node ids
    or a plugin that drops items without calling pytest_deselected."""
    report = yield
    state = collector.config.stash.get(STATE_KEY, None)
    if state is not None and report.passed:
        state.setdefault("reported", set()).add(collector.nodeid)
        for node in report.result or ():
            kind = "raw_items" if isinstance(node, pytest.Item) else "raw_collectors"
            state.setdefault(kind, set()).add(node.nodeid)
    return report


def pytest_collection_finish(session):
    """A module counts as collected in full only if every item it yielded is still selected and
    every class in it was collected; anything narrower can never make its baselines stale."""
    config = session.config
    state = config.stash.get(STATE_KEY, None)
    if state is None:
        return
    if config.getoption("lf", False):  # --last-failed narrows by design, even where it keeps a whole module
        state["partial_modules"] |= set(state["modules"])
        return
    selected = {_test_id(item) for item in session.items}  # without xdist's "@group" suffix, like raw_items
    reported = state.get("reported", set())
    items, classes = defaultdict(set), defaultdict(set)  # by module, grouped once (not once per module)
    for node_id in state.get("raw_items", ()):
        items[node_id.split("::", 1)[0]].add(node_id)
    for node_id in state.get("raw_collectors", ()):
        module = node_id.split("::", 1)[0]
        if node_id != module:
            classes[module].add(node_id)
    for module in state["modules"]:
        if not items[module] or items[module] - selected or classes[module] - reported:
            state["partial_modules"].add(module)


def pytest_deselected(items):
    for item in items:
        config = item.config
        if STATE_KEY in config.stash:
            config.stash[STATE_KEY]["partial_modules"].add(item.nodeid.split("::", 1)[0])


def _test_gate(request):
    session = request.config.stash[SESSION_KEY]
    node = request.node
    if GATE_KEY not in node.stash:
        reason = session.skip_reason()
        if reason:
            pytest.skip(reason)
        from .session import TestGate

        config = node.stash[CONFIG_KEY] if CONFIG_KEY in node.stash else session.config_for(_test_id(node))
        reason = session.distributed_skip_reason(config)
        if reason:  # like a missing GPU: a skip, or a failure under --ampgate-strict
            if config.strict:
                pytest.fail(f"--ampgate-strict: {reason}", pytrace=False)
            pytest.skip(reason)
        node.stash[GATE_KEY] = TestGate(session, _test_id(node), config)
    return node.stash[GATE_KEY]


@pytest.fixture
def ampgate(request):
    """The gate for this test: ``ampgate.run(workload)`` trains it under each mode and judges it.

    ``workload`` is a built-in name ('mnist_mlp', 'cifar_cnn') or a ``pytest_ampgate.Workload``
    with your own model, data, loss and optimizer.  The verdict fails the test by itself.
    """
    return _test_gate(request)


@pytest.fixture
def ampgate_mnist(request):
    """The MNIST MLP trained under fp32 and each gated mode; the GateResult, already judged."""
    return _test_gate(request).run("mnist_mlp")


@pytest.fixture
def ampgate_cifar(request):
    """The CIFAR-10 CNN trained under fp32 and each gated mode; the GateResult, already judged."""
    return _test_gate(request).run("cifar_cnn")


class GateFailed(Exception):
    """The gate's verdict, raised at the end of the test's call: pytest's own outcome rules (xfail,
    ``strict=True``, ``raises=``) then apply to a gate failure as to any other."""


NOTHING_MEASURED = (
    "AMP GATE MEASURED NOTHING: this test is gated (amp_regression marker or ampgate fixture) but never "
    "called ampgate.run(workload), so nothing was measured or judged; call it, or use the ampgate_mnist / "
    "ampgate_cifar fixture"
)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """Turn the verdict into the call's outcome once the test body has returned."""
    result = yield  # the test's own exception, if any, wins and propagates
    gate = item.config.stash.get(SESSION_KEY, None)
    if gate is None or not gate.options.enabled or not _is_gated(item):
        return result
    results = item.stash[GATE_KEY].results if GATE_KEY in item.stash else []
    if not results:
        config = item.stash.get(CONFIG_KEY, None)
        if config.strict if config is not None else gate.options.strict:
            raise GateFailed(NOTHING_MEASURED + " (--ampgate-strict)")
        item.stash[UNMEASURED_KEY] = True
        return result
    if any(r.failed for r in results):
        raise GateFailed("\n\n".join(r.verdict.explain(strict=r.strict) for r in results))
    if all(r.verdict.no_mode_ran for r in results):
        item.stash[SKIPPED_KEY] = True
        pytest.skip("\n".join(r.verdict.explain(strict=r.strict) for r in results))
    return result


UNMEASURED_KEY = pytest.StashKey[bool]()
SKIPPED_KEY = pytest.StashKey[bool]()


def _outcome_word(report) -> str:
    if hasattr(report, "wasxfail"):
        return "xfailed" if report.skipped else "xpassed"
    return report.outcome


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()  # outermost wrapper: the outcome after xfail and the like were applied
    if call.excinfo is not None and isinstance(call.excinfo.value, AmpGateError):
        report.longrepr = _bad_input_repr(item, call.excinfo)
    if call.excinfo is not None and isinstance(call.excinfo.value, GateFailed) and report.failed:
        report.longrepr = str(call.excinfo.value)  # the verdict alone: replaced below by the full text when there are results
    if call.when == "call" and SKIPPED_KEY in item.stash and report.skipped and isinstance(report.longrepr, tuple):
        path, line, _name = item.reportinfo()  # the skip is the test's, as for a skip marker: point at it
        report.longrepr = (str(path), (line or 0) + 1, report.longrepr[2])
    if call.when == "call" and UNMEASURED_KEY in item.stash:
        report.__dict__[UNMEASURED_ATTR] = True
    if call.when == "teardown" and LOCK_KEY in item.stash:  # the device lock was dropped just now
        hold = item.stash[LOCK_KEY].to_dict()
        report.__dict__[RUN_ATTR] = {
            **hold,
            "released_at": hold.get("released_at") or time.time(),
            "worker": os.environ.get("PYTEST_XDIST_WORKER"),
        }
    if call.when != "call" or GATE_KEY not in item.stash or not item.stash[GATE_KEY].results:
        return
    results = item.stash[GATE_KEY].results
    records = [r.to_dict() for r in results]
    # Only a test whose whole call passed is recorded: not one whose own asserts failed after run(),
    # that skipped itself, or that is marked xfail (its teardown is checked in ResultCollector).
    passed = report.passed and not hasattr(report, "wasxfail")
    update = item.config.stash[SESSION_KEY].options.update
    if not passed and any(d.get("update") for d in records):
        for d in records:
            d["update"] = None
        report.__dict__[NOT_RECORDED_ATTR] = f"the test {_outcome_word(report)}"
    report.__dict__[REPORT_ATTR] = records
    if _junit_family(item.config) in ("xunit1", "legacy"):
        from .outputs.junit import junit_properties

        for r in results:  # per-test <properties>: valid in these families (xunit2: see ResultCollector)
            item.user_properties.extend(junit_properties(r))
    if _html_report_requested(item.config):
        from .outputs.html import extras

        report.extras = list(getattr(report, "extras", [])) + extras(results)
    # No test id in the text: pytest names the test already ("FAILED <id> - AMP REGRESSION").
    text = "\n\n".join(r.verdict.explain(strict=r.strict) for r in results)
    if update and any(r.failed for r in results):
        text += "\n  baseline NOT recorded: fix the failing checks, or relax their margins in the marker"
    elif update and not passed:
        text += f"\n  baseline NOT recorded: {report.__dict__.get(NOT_RECORDED_ATTR, f'the test {_outcome_word(report)}')}"
    if report.failed and call.excinfo is not None and isinstance(call.excinfo.value, GateFailed):
        report.longrepr = text  # the verdict is the failure; a section would repeat it
    else:
        report.sections.append(("ampgate", text))


def _bad_input_repr(item, excinfo):
    """Bad input (an AmpGateError) is its message alone: it names the culprit and the fix, and a
    traceback into the plugin's internals would only bury it.  ``--full-trace`` brings it back."""
    if item.config.getoption("fulltrace", False):
        return excinfo.getrepr(style="long")
    exc = excinfo.value
    if isinstance(exc, GateFailed):
        return str(exc)
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, WorkloadError):
        text += "\n  (the workload this test built is at fault, not pytest-ampgate: fix its model, data or loss)"
    return text


def _junit_family(config) -> str:
    try:
        return config.getini("junit_family") or "xunit2"
    except ValueError:
        return "xunit2"


def _junit_suite_properties(config, results) -> None:
    """Under pytest's default JUnit family, xunit2, a <testcase> may not hold <properties>: the
    figures go to the <testsuite>'s properties instead, as ``<test id>::ampgate_<figure>`` (what
    the ``record_testsuite_property`` fixture writes)."""
    if _junit_family(config) in ("xunit1", "legacy"):
        return
    try:
        from _pytest.junitxml import xml_key  # where record_testsuite_property finds the report, too
    except ImportError:
        return
    xml = config.stash.get(xml_key, None)
    if xml is None:
        return
    from .outputs.junit import suite_properties

    for name, value in suite_properties(results):
        xml.add_global_property(name, value)


class ResultCollector:
    """Gathers every gated result from test reports: in-process, or sent by xdist workers."""

    def __init__(self, session, config=None):
        self.config = config
        self.session = session
        self.runs: dict = {}
        """Device-lock holdings by test id: worker, pid, when acquired and released."""
        self.unmeasured: list[str] = []
        """Gated tests that passed without ever calling ampgate.run()."""
        self.not_recorded: dict[str, str] = {}
        """Under --ampgate-update: test id -> why its measured baseline was not recorded."""
        self._recordable: dict[str, list] = {}
        self.device_skips = 0
        """Gated tests skipped because the device could not run them (in-process, or reported by xdist workers)."""

    def pytest_runtest_logreport(self, report):
        if report.skipped and report.when == "setup" and self.session.options.enabled:
            reason = self.session.skip_reason()
            text = report.longrepr[2] if isinstance(report.longrepr, tuple) and len(report.longrepr) == 3 else ""
            if reason and reason in str(text):
                self.device_skips += 1
        if report.__dict__.get(UNMEASURED_ATTR):
            self.unmeasured.append(_test_id(report.nodeid))
        if report.__dict__.get(NOT_RECORDED_ATTR):
            self.not_recorded[_test_id(report.nodeid)] = report.__dict__[NOT_RECORDED_ATTR]
        if report.when == "teardown" and report.nodeid in self._recordable:
            results = self._recordable.pop(report.nodeid)
            if report.failed:  # the whole test did not pass: its call's update is dropped
                for r in results:
                    r.update = None
                self.not_recorded[_test_id(report.nodeid)] = "its teardown failed"
        records = report.__dict__.get(REPORT_ATTR)
        if records:
            from .gate import GateResult

            results = [GateResult.from_dict(d) for d in records]
            self.session.results.extend(results)
            _junit_suite_properties(self.config, results)
            if any(r.update is not None for r in results):
                self._recordable[report.nodeid] = results
            if self.session.progress and getattr(report, "node", None) is not None:  # sent by an xdist worker
                for r in results:
                    m = r.measurements
                    self.session.progress(
                        f"{getattr(report.node, 'gateway', report.node).id} {r.test_id}: {m.workload}, "
                        f"{m.reference.mode} vs {', '.join(m.modes)}, {m.config.rounds} rounds x {m.config.steps_per_block} "
                        f"steps, {m.wall_time_s:.1f} s: {r.verdict.outcome}"
                    )
        run = report.__dict__.get(RUN_ATTR)
        if run:
            self.runs[_test_id(report.nodeid)] = run


def _needs_device_lock(item) -> bool:
    gate = item.config.stash.get(SESSION_KEY, None)
    return not (gate is None or not gate.options.enabled or not _is_gated(item) or item.get_closest_marker("skip") or gate.skip_reason())


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Gated tests hold their device exclusively (see gpu_lock): xdist workers and other sessions wait.

    Taken before the test's fixtures set up and dropped after they tear down (pytest_runtest_teardown),
    so the whole test runs inside it.  A lock that cannot be had (timed out, naming its holder; a lock
    directory that went bad) is this test's set-up error, not an INTERNALERROR.
    """
    if not _needs_device_lock(item):
        return
    from .gpu_lock import DeviceLock, device_key

    gate = item.config.stash[SESSION_KEY]
    workerinput = getattr(item.config, "workerinput", None)
    run_id = workerinput.get("testrunuid") if workerinput else f"pid{os.getpid()}"
    lock = DeviceLock(device_key(gate.options.device, run_id), timeout=item.config.stash.get(LOCK_TIMEOUT_KEY, None))
    item.stash[LOCK_KEY] = lock.acquire(_test_id(item), gate.progress)
    item.stash[LOCK_OBJECT_KEY] = lock
    if gate.options.device_type != "cuda":  # a per-run lock file: removed at session end
        item.config.stash[STATE_KEY].setdefault("run_locks", set()).add(str(lock.path))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    try:
        return (yield)
    finally:
        lock = item.stash.get(LOCK_OBJECT_KEY, None)
        if lock is not None:
            del item.stash[LOCK_OBJECT_KEY]
            lock.release(item.stash[LOCK_KEY])


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """xdist controller: tell each worker that gated tests are grouped (see pytest_configure)."""
    if getattr(node.config.option, "dist", None) == "loadgroup":
        node.workerinput["ampgate_loadgroup"] = True


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """xdist: the controller collects nothing itself, so stale-baseline detection uses the workers' collection."""
    collected = getattr(node, "workeroutput", {}).get("ampgate_collected")
    config = node.config
    if collected and STATE_KEY in config.stash:
        config.stash[STATE_KEY].setdefault("workers", set()).add(getattr(getattr(node, "gateway", None), "id", "?"))
        for key, values in collected.items():
            config.stash[STATE_KEY].setdefault(key, set()).update(values)


class CIOutputs:
    """Writes the run's CI artefacts at session end, in the process that saw every result, after the baselines."""

    def __init__(self, gate):
        self.gate = gate

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session, exitstatus):
        from .outputs import write_ci_outputs

        config = session.config
        gate, state = self.gate, config.stash[STATE_KEY]
        lines = state.setdefault("summary", [])
        if state.get("run_locks"):
            from .gpu_lock import remove_run_lock

            for path in state["run_locks"]:  # every worker is done with them
                remove_run_lock(path)
        bridge = config.pluginmanager.get_plugin("ampgate-benchmark")
        if bridge is not None:
            lines += bridge.finish()
        paths = {o: config.getoption(f"ampgate_{o}") for o in ("json", "markdown", "plot")}
        run_info = {
            "args": [str(a) for a in config.invocation_params.args],
            "rootdir": config.rootpath,
            "device": gate.options.device,
            "update": gate.options.update,
            "strict": gate.options.strict,
            "baseline_dir": gate.options.baseline_dir,
            "exit_status": int(session.exitstatus),
            "workers": len(state["workers"]) if state.get("workers") else None,
            "baselines_written": [line.split(": ", 1)[1] for line in lines if line.startswith("baseline written: ")],
        }
        lines += write_ci_outputs(
            gate,
            json_path=paths["json"] and _at_root(config, paths["json"]),
            markdown_path=paths["markdown"] and _at_root(config, paths["markdown"]),
            plot_path=paths["plot"] and _at_root(config, paths["plot"]),
            step_summary=os.environ.get("GITHUB_STEP_SUMMARY") if gate.options.enabled else None,
            runs=config.pluginmanager.get_plugin("ampgate-results").runs,
            run_info=run_info,
            stale=lambda: [test_id for _path, test_id in _stale(config)],
        )


def _at_root(config, path) -> Path:
    """Output paths are relative to the invocation directory, like --junitxml."""
    path = Path(path).expanduser()  # "~" as in every other path option (and --junitxml)
    path = path if path.is_absolute() else Path(config.invocation_params.dir) / path
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a symlink loop (RuntimeError before Python 3.13): refused by check_output_path
        return Path(os.path.abspath(path))


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    if hasattr(config, "workerinput"):  # an xdist worker: the controller writes
        state = config.stash[STATE_KEY]
        keys = ("gated_ids", "partial_modules", "modules", "run_locks")
        config.workeroutput["ampgate_collected"] = {k: sorted(state.get(k, ())) for k in keys}
        return
    gate = config.stash[SESSION_KEY]
    state = config.stash[STATE_KEY]
    summary = state.setdefault("summary", [])
    _report_device_skips(session, gate, summary)
    if not gate.options.update:
        return
    from .session import stage_updates

    try:
        count = stage_updates(gate.store, gate.results)
        written = gate.store.commit() if count else []
        summary += [f"baseline written: {p}" for p in written]
        if written and exitstatus == pytest.ExitCode.INTERRUPTED:
            summary.append("the run was interrupted: baselines were recorded for the tests that finished only")
    except BaselineError as exc:
        summary.append(f"baselines NOT fully written: {exc}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    except KeyboardInterrupt:  # Ctrl-C mid-commit: every file is whole (old or new), so say so, not a traceback
        summary.append(
            "baselines NOT fully written: interrupted while writing them; each baseline file is either "
            "unchanged or fully updated. Run pytest --ampgate --ampgate-update again"
        )
        session.exitstatus = pytest.ExitCode.INTERRUPTED


NO_DEVICE_PREFIX = "ampgate: NOTHING GATED"


def _report_device_skips(session, gate, summary: list) -> None:
    """A gate that gated nothing must say so: one summary line, and under strict or update a failed run.

    Without the device every gated test is skipped (the graceful default); a CI job asked to gate
    (``--ampgate-strict``) or to record baselines (``--ampgate-update``) on a runner whose GPU is
    missing would otherwise go green having checked nothing.
    """
    collector = session.config.pluginmanager.get_plugin("ampgate-results")
    count = getattr(collector, "device_skips", 0)
    if not count:
        return
    reason = gate.skip_reason()
    tests = f"{count} gated test{'s' if count != 1 else ''}"
    if gate.options.strict or gate.options.update:
        flag = "--ampgate-update" if gate.options.update else "--ampgate-strict"
        summary.append(
            f"{NO_DEVICE_PREFIX}: {tests} could not run on {gate.options.device}: {reason}; {flag} needs the device, so this run fails"
        )
        if session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
    else:
        summary.append(f"ampgate: {tests} skipped on {gate.options.device}: {reason}")


def _stale(config):
    gate = config.stash[SESSION_KEY]
    state = config.stash[STATE_KEY]
    modules = state["modules"] - state["partial_modules"]
    if not modules:
        return []
    try:
        return gate.store.stale_entries(state["gated_ids"], modules)
    except BaselineError:
        return []


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if SESSION_KEY not in config.stash or hasattr(config, "workerinput"):
        return
    gate = config.stash[SESSION_KEY]
    state = config.stash[STATE_KEY]
    collector = config.pluginmanager.get_plugin("ampgate-results")
    if not gate.results and not state.get("summary") and not (collector and (collector.unmeasured or collector.not_recorded)):
        return  # a plain run: nothing to say, and nothing heavy (torch) imported to say it
    from .gate import FAIL, INCONCLUSIVE
    from .outputs.table import format_table, table_columns, table_rows

    terminalreporter.write_sep("=", "ampgate summary")
    if gate.results:
        terminalreporter.write_line(format_table(table_rows(gate.results), table_columns(gate.results)))
        env = gate.results[0].env_key
        terminalreporter.write_line(f"environment: {env}")
    for r in gate.results:
        for check in r.verdict.of(INCONCLUSIVE):
            terminalreporter.write_line(f"INCONCLUSIVE {r.test_id}: {check.why}", yellow=True)
        if gate.options.update and r.update is None and r.verdict.of(FAIL):
            terminalreporter.write_line(f"baseline NOT recorded for {r.test_id}: it has failing checks", red=True)
        elif gate.options.update and r.update is None and collector and r.test_id in collector.not_recorded:
            terminalreporter.write_line(f"baseline NOT recorded for {r.test_id}: {collector.not_recorded[r.test_id]}", red=True)
        for check in r.verdict.checks:
            if check.metric == "known_state":
                terminalreporter.write_line(f"LEAKED STATE {r.test_id}: {check.why}", yellow=True)
    if collector and collector.unmeasured:
        terminalreporter.write_line(
            f"gated but measured nothing (never called ampgate.run()): {', '.join(collector.unmeasured)}; --ampgate-strict fails them",
            yellow=True,
        )
    stale = _stale(config)
    if stale:
        if gate.options.update and gate.options.prune:
            try:
                gate.store.prune(stale)
            except BaselineError as exc:  # a file gone bad since it was read, or a lock held too long
                terminalreporter.write_line(f"stale baseline entries NOT pruned: {exc}", red=True)
            else:
                terminalreporter.write_line(f"pruned {len(stale)} stale baseline entr{'y' if len(stale) == 1 else 'ies'}")
        else:
            terminalreporter.write_line(
                "stale baseline entries (their tests no longer exist): "
                + ", ".join(test_id for _path, test_id in stale)
                + "; delete them with --ampgate-update --ampgate-prune"
            )
    for line in state.get("summary", []):
        terminalreporter.write_line(line, red=line.startswith(("baselines NOT", NO_DEVICE_PREFIX)) or " NOT written" in line)


def pytest_report_header(config):
    if SESSION_KEY not in config.stash:
        return None
    options = config.stash[SESSION_KEY].options
    if not options.enabled:
        return None
    mode = "update" if options.update else "check"
    return f"ampgate: {mode} baselines in {options.baseline_dir}, device {options.device}"
