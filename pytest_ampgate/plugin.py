"""pytest hooks only: options, marker, fixtures, skips, the failing report, the terminal summary.

The gate's verdict is applied in ``pytest_runtest_makereport`` (as pytest-memray does), so the test
that regressed is the one that fails, even when its body asserts nothing.  Results ride on the
test report as plain dicts, which is how they reach the controller under pytest-xdist; baselines
are written once, at session end, by the process that saw every report.
"""

from __future__ import annotations

import os
import time
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
RUN_ATTR = "ampgate_run"


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
    group.addoption("--ampgate-json", default=None, metavar="PATH",
                    help="write a JSON report of the gated run to PATH (schema: docs/json-report.md)")
    group.addoption("--ampgate-markdown", default=None, metavar="PATH",
                    help="write the summary table as Markdown to PATH (also appended to $GITHUB_STEP_SUMMARY when set)")
    group.addoption("--ampgate-plot", default=None, metavar="PATH",
                    help="write a PNG chart of speedups and memory ratios against their limits (needs matplotlib)")
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
    if not hasattr(config, "workerinput"):  # the process that sees every result writes the CI outputs
        if config.getoption("ampgate_plot"):
            from .plot import PlotUnavailable, require_matplotlib

            try:
                require_matplotlib()
            except PlotUnavailable as exc:
                raise pytest.UsageError(str(exc)) from None
        config.pluginmanager.register(CIOutputs(gate), "ampgate-outputs")
        if gate.options.enabled and config.pluginmanager.hasplugin("benchmark"):
            from .benchmark_compat import BenchmarkBridge

            config.pluginmanager.register(BenchmarkBridge(config, gate), "ampgate-benchmark")
    config.stash[STATE_KEY] = {"gated_ids": set(), "partial_modules": set(), "modules": set()}


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
        reason = session.distributed_skip_reason(config)
        if reason:  # like a missing GPU: a skip, or a failure under --ampgate-strict
            if config.strict:
                pytest.fail(f"--ampgate-strict: {reason}", pytrace=False)
            pytest.skip(reason)
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
    if call.excinfo is not None and isinstance(call.excinfo.value, AmpGateError):
        report.longrepr = _bad_input_repr(item, call.excinfo)
    if call.when == "teardown" and LOCK_KEY in item.stash:  # still inside the device lock
        hold = item.stash[LOCK_KEY].to_dict()
        report.__dict__[RUN_ATTR] = {**hold, "released_at": time.time(), "worker": os.environ.get("PYTEST_XDIST_WORKER")}
    if call.when != "call" or GATE_KEY not in item.stash or not item.stash[GATE_KEY].results:
        return
    results = item.stash[GATE_KEY].results
    report.__dict__[REPORT_ATTR] = [r.to_dict() for r in results]
    from .report import junit_properties

    for r in results:  # read by --junitxml from the teardown report, in the controller too
        item.user_properties.extend(junit_properties(r))
    # No test id in the text: pytest names the test already ("FAILED <id> - AMP REGRESSION").
    text = "\n\n".join(r.verdict.explain(strict=r.strict) for r in results)
    if item.config.stash[SESSION_KEY].options.update and any(r.failed for r in results):
        text += "\n  baseline NOT recorded: fix the failing checks, or relax their margins in the marker"
    if any(r.failed for r in results) and report.passed:
        report.outcome = "failed"
        report.longrepr = text  # the verdict is the failure; a section would repeat it
    else:
        report.sections.append(("ampgate", text))


def _bad_input_repr(item, excinfo):
    """Bad input (an AmpGateError) is its message alone: it names the culprit and the fix, and a
    traceback into the plugin's internals would only bury it.  ``--full-trace`` brings it back."""
    if item.config.getoption("fulltrace", False):
        return excinfo.getrepr(style="long")
    exc = excinfo.value
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, WorkloadError):
        text += "\n  (the workload this test built is at fault, not pytest-ampgate: fix its model, data or loss)"
    return text


class ResultCollector:
    """Gathers every gated result from test reports: in-process, or sent by xdist workers."""

    def __init__(self, session):
        self.session = session
        self.runs: dict = {}
        """Device-lock holdings by test id: worker, pid, when acquired and released."""
        self.device_skips = 0
        """Gated tests skipped because the device could not run them (in-process, or reported by xdist workers)."""

    def pytest_runtest_logreport(self, report):
        if report.skipped and report.when == "setup" and self.session.options.enabled:
            reason = self.session.skip_reason()
            text = report.longrepr[2] if isinstance(report.longrepr, tuple) and len(report.longrepr) == 3 else ""
            if reason and reason in str(text):
                self.device_skips += 1
        records = report.__dict__.get(REPORT_ATTR)
        if records:
            from .gate import GateResult

            results = [GateResult.from_dict(d) for d in records]
            self.session.results.extend(results)
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
            self.runs[report.nodeid] = run


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Gated tests hold their device exclusively (see gpu_lock): xdist workers and other sessions wait."""
    gate = item.config.stash[SESSION_KEY] if SESSION_KEY in item.config.stash else None
    if gate is None or not gate.options.enabled or not _is_gated(item) or item.get_closest_marker("skip") or gate.skip_reason():
        return (yield)
    from .gpu_lock import hold_device

    workerinput = getattr(item.config, "workerinput", None)
    run_id = workerinput.get("testrunuid") if workerinput else f"pid{os.getpid()}"
    with hold_device(gate.options.device, holder=item.nodeid, on_wait=gate.progress, run_id=run_id) as hold:
        item.stash[LOCK_KEY] = hold
        if gate.options.device_type != "cuda":  # a per-run lock file: removed at session end
            item.config.stash[STATE_KEY].setdefault("run_locks", set()).add(hold.path)
        return (yield)


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
        for path in state.get("run_locks", ()):  # every worker is done with them
            Path(path).unlink(missing_ok=True)
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
    path = Path(path)
    return (path if path.is_absolute() else Path(config.invocation_params.dir) / path).resolve()


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
        summary.append(f"{NO_DEVICE_PREFIX}: {tests} could not run on {gate.options.device}: {reason}; {flag} needs the device, so this run fails")
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
        terminalreporter.write_line(line, red=line.startswith(("baselines NOT", NO_DEVICE_PREFIX)))


def pytest_report_header(config):
    if SESSION_KEY not in config.stash:
        return None
    options = config.stash[SESSION_KEY].options
    if not options.enabled:
        return None
    mode = "update" if options.update else "check"
    return f"ampgate: {mode} baselines in {options.baseline_dir}, device {options.device}"
