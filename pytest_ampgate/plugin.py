"""pytest hooks only: options, marker, fixtures, skips, the failing report, the terminal summary.

The gate's verdict is applied in ``pytest_runtest_makereport`` (as pytest-memray does), so the test
that regressed is the one that fails, even when its body asserts nothing.  Results ride on the
test report as plain dicts, which is how they reach the controller under pytest-xdist; baselines
are written once, at session end, by the process that saw every report.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .config import SETTINGS
from .errors import AmpGateError, BaselineError, ConfigError

MARKER = "amp_regression"
FIXTURES = ("ampgate", "ampgate_mnist", "ampgate_cifar")
REPORT_ATTR = "ampgate"
SESSION_KEY = pytest.StashKey["object"]()
CONFIG_KEY = pytest.StashKey["object"]()
GATE_KEY = pytest.StashKey["object"]()
STATE_KEY = pytest.StashKey[dict]()


def pytest_addoption(parser):
    group = parser.getgroup("ampgate", "AMP regression gate (pytest-ampgate)")
    group.addoption("--ampgate", action="store_true", default=False,
                    help="run the tests marked amp_regression (skipped without this flag)")
    group.addoption("--ampgate-update", action="store_true", default=False,
                    help="record the measured results as the new baselines (written at session end)")
    group.addoption("--ampgate-prune", action="store_true", default=False,
                    help="with --ampgate-update: delete baseline entries of tests that no longer exist")
    group.addoption("--ampgate-device", default=None,
                    help="where to train: cuda (default), cuda:N, or cpu (numerical checks only; timing is not gated)")
    group.addoption("--ampgate-baseline-dir", default=None,
                    help="directory of the baseline JSON files (default: baselines/ at the rootdir)")
    group.addoption("--ampgate-data-root", default=None,
                    help="directory holding MNIST/CIFAR-10 files in torchvision's layout (default: synthetic data)")
    group.addoption("--ampgate-download", action="store_true", default=False,
                    help="let torchvision download MNIST/CIFAR-10 into --ampgate-data-root if missing")
    group.addoption("--ampgate-strict", action="store_true", default=False,
                    help="treat INCONCLUSIVE verdicts as failures")
    parser.addini("ampgate_device", "default for --ampgate-device", default="cuda")
    parser.addini("ampgate_baseline_dir", "default for --ampgate-baseline-dir (relative to the rootdir)", default="baselines")
    parser.addini("ampgate_data_root", "default for --ampgate-data-root", default="")
    for name, (_check, text) in SETTINGS.items():
        parser.addini(f"ampgate_{name}", f"default {text}", default="")


def _ini_settings(config) -> dict:
    values = {}
    for name in SETTINGS:
        value = config.getini(f"ampgate_{name}")
        if value not in ("", None, []):
            values[name] = value
    return values


def _options(config):
    from .session import GateOptions, validate_device

    device = validate_device(config.getoption("ampgate_device") or config.getini("ampgate_device") or "cuda")
    base = config.getoption("ampgate_baseline_dir") or config.getini("ampgate_baseline_dir") or "baselines"
    base_dir = Path(base) if Path(base).is_absolute() else Path(config.rootpath) / base
    data_root = config.getoption("ampgate_data_root") or config.getini("ampgate_data_root") or None
    return GateOptions(
        enabled=config.getoption("ampgate") or config.getoption("ampgate_update"),
        update=config.getoption("ampgate_update"),
        prune=config.getoption("ampgate_prune"),
        device=device,
        baseline_dir=base_dir,
        data_root=data_root,
        download=config.getoption("ampgate_download"),
        strict=config.getoption("ampgate_strict"),
        ini_settings=_ini_settings(config),
    )


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        f"{MARKER}(**settings): an AMP regression gate, run with --ampgate. Settings override the ini "
        f"defaults: {', '.join(SETTINGS)}.",
    )
    try:
        options = _options(config)
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from None
    from .session import GateSession

    gate = GateSession(options, progress=_progress_writer(config))
    config.stash[SESSION_KEY] = gate
    config.pluginmanager.register(ResultCollector(gate), "ampgate-results")
    config.stash[STATE_KEY] = {"gated_ids": set(), "partial_modules": set(), "modules": set()}


def _progress_writer(config):
    """Progress lines at -v, written past output capturing; silent at the default verbosity."""
    if config.getoption("verbose") <= 0:
        return None

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


def pytest_collection_modifyitems(session, config, items):
    gate = config.stash[SESSION_KEY]
    state = config.stash[STATE_KEY]
    gated = [item for item in items if _is_gated(item)]
    for item in gated:
        marker = item.get_closest_marker(MARKER)
        try:
            item.stash[CONFIG_KEY] = gate.config_for(item.nodeid, marker.args if marker else (), marker.kwargs if marker else {})
        except ConfigError as exc:
            raise pytest.UsageError(str(exc)) from None
        state["gated_ids"].add(item.nodeid)
        state["modules"].add(item.nodeid.split("::", 1)[0])
    if gated:
        reason = gate.skip_reason()
        if reason:
            for item in gated:
                item.add_marker(pytest.mark.skip(reason=reason))


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

        config = node.stash[CONFIG_KEY] if CONFIG_KEY in node.stash else session.config_for(node.nodeid)
        node.stash[GATE_KEY] = TestGate(session, node.nodeid, config)
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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if call.when != "call" or GATE_KEY not in item.stash or not item.stash[GATE_KEY].results:
        return
    results = item.stash[GATE_KEY].results
    report.__dict__[REPORT_ATTR] = [r.to_dict() for r in results]
    text = "\n\n".join(r.explain() for r in results)
    if item.config.stash[SESSION_KEY].options.update and any(r.failed for r in results):
        text += "\n  baseline NOT recorded: fix the failing checks, or relax their margins in the marker"
    report.sections.append(("ampgate", text))
    if any(r.failed for r in results) and report.passed:
        report.outcome = "failed"
        report.longrepr = text


class ResultCollector:
    """Gathers every gated result from test reports: in-process, or sent by xdist workers."""

    def __init__(self, session):
        self.session = session

    def pytest_runtest_logreport(self, report):
        records = report.__dict__.get(REPORT_ATTR)
        if records:
            from .gate import GateResult

            self.session.results.extend(GateResult.from_dict(d) for d in records)


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    if hasattr(config, "workerinput"):  # an xdist worker: the controller writes
        return
    gate = config.stash[SESSION_KEY]
    state = config.stash[STATE_KEY]
    summary = state.setdefault("summary", [])
    if not gate.options.update:
        return
    from .session import stage_updates

    try:
        count = stage_updates(gate.store, gate.results)
        written = gate.store.commit() if count else []
        summary += [f"baseline written: {p}" for p in written]
    except BaselineError as exc:
        summary.append(f"baselines NOT fully written: {exc}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


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
    from .gate import FAIL, INCONCLUSIVE
    from .report import format_table, table_rows

    gate = config.stash[SESSION_KEY]
    state = config.stash[STATE_KEY]
    if not gate.results and not state.get("summary"):
        return
    terminalreporter.write_sep("=", "ampgate summary")
    if gate.results:
        terminalreporter.write_line(format_table(table_rows(gate.results)))
        env = gate.results[0].env_key
        terminalreporter.write_line(f"environment: {env}")
    for r in gate.results:
        for check in r.verdict.of(INCONCLUSIVE):
            terminalreporter.write_line(f"INCONCLUSIVE {r.test_id}: {check.why}", yellow=True)
        if gate.options.update and r.update is None and r.verdict.of(FAIL):
            terminalreporter.write_line(f"baseline NOT recorded for {r.test_id}: it has failing checks", red=True)
    stale = _stale(config)
    if stale:
        if gate.options.update and gate.options.prune:
            gate.store.prune(stale)
            terminalreporter.write_line(f"pruned {len(stale)} stale baseline entr{'y' if len(stale) == 1 else 'ies'}")
        else:
            terminalreporter.write_line(
                "stale baseline entries (their tests no longer exist): "
                + ", ".join(test_id for _path, test_id in stale)
                + "; delete them with --ampgate-update --ampgate-prune"
            )
    for line in state.get("summary", []):
        terminalreporter.write_line(line)


def pytest_report_header(config):
    if SESSION_KEY not in config.stash:
        return None
    options = config.stash[SESSION_KEY].options
    if not options.enabled:
        return None
    mode = "update" if options.update else "check"
    return f"ampgate: {mode} baselines in {options.baseline_dir}, device {options.device}"


def pytest_internalerror(excrepr, excinfo):
    if isinstance(excinfo.value, AmpGateError):
        return True
    return None
