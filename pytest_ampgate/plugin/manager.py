"""The plugin object: every hook that needs the session's state, and that state as named fields.

One :class:`AmpGatePlugin` is registered per pytest session (as pytest-memray's ``Manager`` and
pytest-codspeed's plugin are).  The gate's verdict is applied in ``pytest_runtest_makereport``, so
the test that regressed is the one that fails, even when its body asserts nothing.  Results ride
on the test report as plain dicts, which is how they reach the controller under pytest-xdist;
baselines are written once, at session end, by the process that saw every report.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from ..errors import AmpGateError, ConfigError
from . import reporting
from .collection import NOT_RECORDED_ATTR, CollectionState, is_gated, marker_settings, module_of, named_in_part, test_id
from .options import PluginSettings

WORKERINPUT_KEY = "ampgate_gated_ids_dir"
"""The xdist ``workerinput`` key naming the folder the workers write their gated ids to."""

if TYPE_CHECKING:
    from ..config import GateConfig
    from ..gate import GateResult
    from ..gpu_lock import DeviceLock, DeviceLocks, Hold
    from ..session import GateSession, TestGate

REPORT_ATTR = "ampgate"
"""The test report's attribute with the gated results (dicts): what xdist workers send."""
RUN_ATTR = "ampgate_run"
UNMEASURED_ATTR = "ampgate_unmeasured"


@dataclass
class ItemState:
    """One gated test's part of the session: its settings, its gate, its device-lock holding."""

    config: GateConfig | None = None
    """Defaults, ini and marker settings, worked out at collection."""
    gate: TestGate | None = None
    """What its fixture handed out, once it did."""
    lock: DeviceLock | DeviceLocks | None = None
    hold: Hold | None = None
    unmeasured: bool = False
    skipped: bool = False


ITEM_KEY = pytest.StashKey[ItemState]()


@dataclass
class SessionState:
    """What the plugin learns in one session: typed, in the process that sees every report."""

    collection: CollectionState = field(default_factory=CollectionState)
    runs: dict[str, dict] = field(default_factory=dict)
    """Device-lock holdings by test id: worker, pid, when acquired and released."""
    unmeasured: list[str] = field(default_factory=list)
    """Gated tests that passed without ever calling ampgate.run()."""
    not_recorded: dict[str, str] = field(default_factory=dict)
    """Under --ampgate-update: test id -> why its measured baseline was not recorded."""
    recordable: dict[str, list[GateResult]] = field(default_factory=dict)
    """Node id -> results whose baselines wait for the test's teardown to pass."""
    device_skips: int = 0
    """Gated tests skipped because the device could not run them (in-process, or reported by xdist workers)."""
    workers: set[str] = field(default_factory=set)
    run_locks: set[str] = field(default_factory=set)
    """Per-run lock files (the CPU's), removed at session end once every worker is done."""
    baselines_written: list[Path] = field(default_factory=list)
    """Baseline files written with the entries of the tests that ran (the JSON report lists them)."""
    baselines_pruned: list[Path] = field(default_factory=list)
    """Baseline files rewritten or deleted to drop stale entries (--ampgate-prune)."""
    outputs_written: list[Path] = field(default_factory=list)
    """CI report files written at session end (JSON report, Markdown summary, chart)."""
    summary: list[str] = field(default_factory=list)
    """Lines for the end of the terminal summary."""
    unjudged: list[str] = field(default_factory=list)
    """Gated tests that failed or skipped without a gate failure of their own (for --ampgate-bisect)."""
    prune_line: tuple[str, bool] | None = None
    """What pruning stale entries did (text, whether it failed), said where the stale entries are."""
    stale: list[tuple[Path, str]] | None = None
    """Stale ``(file, test id)`` entries, looked up once when first needed."""


class AmpGatePlugin:
    """pytest's hooks for one session, over a :class:`~pytest_ampgate.session.GateSession`."""

    def __init__(self, config: pytest.Config, settings: PluginSettings, gate: GateSession):
        self.config = config
        self.settings = settings
        self.gate = gate
        self.state = SessionState()
        self.worker = hasattr(config, "workerinput")
        self.gated_ids_dir: str | None = None
        """xdist controller: where the workers write their gated tests' ids (see xdist_schedule)."""

    # --- collection ------------------------------------------------------------------------

    def pytest_collection_modifyitems(self, session, config, items):
        gate, collection = self.gate, self.state.collection
        gated = [item for item in items if is_gated(item)]
        if config.getoption("ampgate_only") or config.getoption("ampgate_bisect"):
            plain = [item for item in items if not is_gated(item)]
            if plain:
                config.hook.pytest_deselected(items=plain)
                items[:] = gated
        for item in gated:
            try:
                item.stash[ITEM_KEY] = ItemState(config=gate.config_for(test_id(item), *marker_settings(item)))
            except ConfigError as exc:
                raise pytest.UsageError(str(exc)) from None
            if item.nodeid.startswith("::") and gate.options.enabled:  # baselines are keyed by node id
                raise pytest.UsageError(
                    f"{item.path} lies outside the rootdir {config.rootpath}, so pytest gives its gated test "
                    f"the node id {item.nodeid!r} with no file in it, and its baselines would mix with those "
                    "of same-named tests in other files; run pytest with a --rootdir that contains it"
                )
            collection.add_gated(item.nodeid)
        collection.partial_modules |= named_in_part(config, collection.modules)
        if gated:
            reason = gate.skip_reason()
            if reason:
                for item in gated:
                    item.add_marker(pytest.mark.skip(reason=reason))

    @pytest.hookimpl(wrapper=True, trylast=True)
    def pytest_make_collect_report(self, collector):
        """What each collector found before any plugin filtered it (this wrapper is the innermost):
        the reference that tells a module collected in full from one narrowed by --lf, -k, node ids
        or a plugin that drops items without calling pytest_deselected."""
        report = yield
        if report.passed:
            self.state.collection.collected(collector.nodeid, report.result or (), lambda node: isinstance(node, pytest.Item))
        return report

    @pytest.hookimpl(tryfirst=True)  # an xdist worker: before it sends its collection to the controller
    def pytest_collection_finish(self, session):
        selected = {test_id(item) for item in session.items}  # without xdist's "@group" suffix, like raw_items
        self.state.collection.finish(selected, last_failed=bool(self.config.getoption("lf", False)))
        folder = getattr(self.config, "workerinput", {}).get(WORKERINPUT_KEY)
        if folder:
            from .xdist_schedule import write_gated_ids

            write_gated_ids(folder, self.config.workerinput["workerid"], [item.nodeid for item in session.items if is_gated(item)])

    def pytest_deselected(self, items):
        for item in items:
            self.state.collection.partial_modules.add(module_of(item.nodeid))

    # --- xdist -----------------------------------------------------------------------------

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node):
        """xdist controller: tell each worker where to write its gated tests' ids (see xdist_schedule)."""
        if self.gated_ids_dir:
            node.workerinput[WORKERINPUT_KEY] = self.gated_ids_dir

    @pytest.hookimpl(optionalhook=True, tryfirst=True)
    def pytest_xdist_make_scheduler(self, config, log):
        """xdist controller: ``load`` scheduling with every gated test on one worker (see xdist_schedule)."""
        if self.gated_ids_dir and config.getvalue("dist") == "load":
            from .xdist_schedule import GatedLoadScheduling

            return GatedLoadScheduling(config, log, folder=self.gated_ids_dir)
        return None

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node, error):
        """xdist: the controller collects nothing itself, so stale-baseline detection uses the workers' collection."""
        collected = getattr(node, "workeroutput", {}).get("ampgate_collected")
        if collected:
            self.state.workers.add(getattr(getattr(node, "gateway", None), "id", "?"))
            self.state.collection.merge_worker_output(collected)
            self.state.run_locks.update(collected.get("run_locks", ()))

    # --- running a gated test --------------------------------------------------------------

    def _needs_device_lock(self, item) -> bool:
        gate = self.gate
        return gate.options.enabled and is_gated(item) and not item.get_closest_marker("skip") and not gate.skip_reason()

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item):
        """Gated tests hold their device exclusively (see gpu_lock): xdist workers and other sessions wait.

        Taken before the test's fixtures set up and dropped after they tear down (pytest_runtest_teardown),
        so the whole test runs inside it.  A lock that cannot be had (timed out, naming its holder; a lock
        directory that went bad) is this test's set-up error, not an INTERNALERROR.
        """
        if not self._needs_device_lock(item):
            return
        from ..distributed.in_job import gpus_for
        from ..gpu_lock import DeviceLocks, lock_keys

        workerinput = getattr(item.config, "workerinput", None)
        run_id = workerinput.get("testrunuid") if workerinput else f"pid{os.getpid()}"
        world_size, local_rank = gpus_for(self.gate, test_id(item), item_state(item).config)  # every GPU the test's ranks use
        lock = DeviceLocks(lock_keys(self.gate.options.device, world_size, run_id, local_rank), timeout=self.settings.lock_timeout)
        state = item_state(item)
        state.hold = lock.acquire(test_id(item), self.gate.progress)
        state.lock = lock
        if self.gate.options.device_type != "cuda":  # a per-run lock file: removed at session end
            self.state.run_locks.add(str(lock.path))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_teardown(self, item, nextitem):
        try:
            return (yield)
        finally:
            state = item.stash.get(ITEM_KEY, None)
            if state is not None and state.lock is not None:
                lock, state.lock = state.lock, None
                lock.release(state.hold)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item):
        """Turn the verdict into the call's outcome once the test body has returned."""
        result = yield  # the test's own exception, if any, wins and propagates
        if not self.gate.options.enabled or not is_gated(item):
            return result
        state = item_state(item)
        results = state.gate.results if state.gate is not None else []
        if not results:
            if state.config.strict if state.config is not None else self.gate.options.strict:
                raise reporting.GateFailed(reporting.NOTHING_MEASURED + " (--ampgate-strict)")
            state.unmeasured = True
            return result
        if any(r.failed for r in results):
            raise reporting.GateFailed(reporting.explain(results))
        if all(r.verdict.no_mode_ran for r in results):
            state.skipped = True
            pytest.skip(self.gate.options.with_commands(reporting.explain(results, sep="\n"), test_id(item)))
        return result

    @pytest.hookimpl(hookwrapper=True, tryfirst=True)
    def pytest_runtest_makereport(self, item, call):
        outcome = yield
        report = outcome.get_result()  # outermost wrapper: the outcome after xfail and the like were applied
        before = report.longrepr
        self._amend_report(item, call, report)
        if report.failed and isinstance(report.longrepr, str) and report.longrepr is not before:
            report.longrepr = FailureText(report.longrepr)

    def _amend_report(self, item, call, report) -> None:
        excinfo = call.excinfo
        if excinfo is not None and isinstance(excinfo.value, AmpGateError):
            report.longrepr = reporting.bad_input_repr(item, excinfo, self.gate.options)
        if excinfo is not None and isinstance(excinfo.value, reporting.GateFailed) and report.failed:
            report.longrepr = str(excinfo.value)  # the verdict alone: replaced below by the full text when there are results
        state = item.stash.get(ITEM_KEY, None)
        if state is None:
            return
        if call.when == "call" and state.skipped and report.skipped and isinstance(report.longrepr, tuple):
            path, line, _name = item.reportinfo()  # the skip is the test's, as for a skip marker: point at it
            report.longrepr = (str(path), (line or 0) + 1, report.longrepr[2])
        if call.when == "call" and state.unmeasured:
            report.__dict__[UNMEASURED_ATTR] = True
        if call.when == "teardown" and state.hold is not None:  # the device lock was dropped just now
            report.__dict__[RUN_ATTR] = {**state.hold.to_dict(), "worker": os.environ.get("PYTEST_XDIST_WORKER")}
        if call.when != "call" or state.gate is None or not state.gate.results:
            return
        results = state.gate.results
        records = [r.to_dict() for r in results]
        # Only a test whose whole call passed is recorded: not one whose own asserts failed after run(),
        # that skipped itself, or that is marked xfail (its teardown is checked in pytest_runtest_logreport).
        passed = report.passed and not hasattr(report, "wasxfail")
        if not passed and any(d.get("update") for d in records):
            for d in records:
                d["update"] = None
            report.__dict__[NOT_RECORDED_ATTR] = f"the test {reporting.outcome_word(report)}"
        report.__dict__[REPORT_ATTR] = records
        reporting.attach(item, report, results, excinfo, options=self.gate.options, passed=passed)

    def pytest_runtest_logreport(self, report):
        """Every gated result, from this process or sent by an xdist worker."""
        state, gate = self.state, self.gate
        if report.skipped and report.when == "setup" and gate.options.enabled:
            reason = gate.skip_reason()
            text = report.longrepr[2] if isinstance(report.longrepr, tuple) and len(report.longrepr) == 3 else ""
            if reason and reason in str(text):
                state.device_skips += 1
        if report.__dict__.get(UNMEASURED_ATTR):
            state.unmeasured.append(test_id(report.nodeid))
        if report.__dict__.get(NOT_RECORDED_ATTR):
            state.not_recorded[test_id(report.nodeid)] = report.__dict__[NOT_RECORDED_ATTR]
        if report.nodeid in state.recordable and (report.when == "teardown" or report.failed):
            # its teardown's report, or xdist's report of a worker that died before the teardown ended
            results = state.recordable.pop(report.nodeid)
            if report.failed:  # the whole test did not pass: its call's update is dropped
                for r in results:
                    r.update = None
                state.not_recorded[test_id(report.nodeid)] = (
                    "its teardown failed" if report.when == "teardown" else "its xdist worker crashed before its teardown ended"
                )
        records = report.__dict__.get(REPORT_ATTR)
        if (report.failed or report.skipped) and self.config.getoption("ampgate_bisect"):
            from ..gate import GateResult
            from ..verdict import FAIL

            if not any(GateResult.from_dict(d).verdict.outcome == FAIL for d in records or ()):
                state.unjudged.append(test_id(report.nodeid))
        if records:
            from ..gate import GateResult

            results = [GateResult.from_dict(d) for d in records]
            gate.results.extend(results)
            reporting.junit_suite_properties(self.config, results)
            if any(r.update is not None for r in results):
                state.recordable[report.nodeid] = results
            if gate.progress and getattr(report, "node", None) is not None:  # sent by an xdist worker
                worker = getattr(report.node, "gateway", report.node).id
                for r in results:
                    gate.progress(f"{worker} {reporting.progress_line(r)}")
        run = report.__dict__.get(RUN_ATTR)
        if run:
            state.runs[test_id(report.nodeid)] = run

    # --- session end -----------------------------------------------------------------------

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session, exitstatus):
        """Baselines first, then the CI outputs, in the process that saw every result."""
        state = self.state
        if self.worker:  # an xdist worker: the controller writes
            collected = {**state.collection.to_worker_output(), "run_locks": sorted(state.run_locks)}
            self.config.workeroutput["ampgate_collected"] = collected
            return
        from ..distributed.in_job import writes_outputs

        if not writes_outputs():  # one rank of a torch.distributed job: global rank 0 writes for the job
            return
        self._report_device_skips(session)
        if self.gate.options.update:
            self._write_baselines(session, exitstatus)
        if state.run_locks:
            from ..file_safety import remove_run_lock

            for path in state.run_locks:  # every worker is done with them
                remove_run_lock(path)
        self._write_ci_outputs(session)
        if self.config.getoption("ampgate_bisect"):
            from .bisect import bisect_status

            status, why = bisect_status(session.exitstatus, self.gate.results, state.unjudged + state.unmeasured)
            state.summary.append(f"ampgate bisect: exit {status}: {why}")
            session.exitstatus = status

    def _report_device_skips(self, session) -> None:
        """A gate that gated nothing must say so: one summary line, and under strict or update a failed run.

        Without the device every gated test is skipped (the graceful default); a CI job asked to gate
        (``--ampgate-strict``) or to record baselines (``--ampgate-update``) on a runner whose GPU is
        missing would otherwise go green having checked nothing.
        """
        line, fails = reporting.device_skips_line(self.state.device_skips, self.gate)
        if line:
            self.state.summary.append(line)
        if fails and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def _write_baselines(self, session, exitstatus) -> None:
        """The store commits what ran and passed, then finds (and on request prunes) what the
        complete collection no longer has; this says what it did."""
        from ..session import baseline_updates
        from ..verdict import UPDATE_COMMAND

        state, collection = self.state, self.state.collection
        try:
            done = self.gate.store.record(
                baseline_updates(self.gate.results),
                collected=collection.gated_ids,
                complete_modules=collection.complete_modules(),
                prune=self.gate.options.prune,
            )
        except KeyboardInterrupt:  # Ctrl-C mid-commit: every file is whole (old or new), so say so, not a traceback
            state.summary.append(
                "baselines NOT fully written: interrupted while writing them; each baseline file is either "
                f"unchanged or fully updated. Run {UPDATE_COMMAND} again"
            )
            session.exitstatus = pytest.ExitCode.INTERRUPTED
            return
        state.stale = done.stale
        if done.write_error is not None:
            state.summary.append(f"baselines NOT fully written: {done.write_error}")
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
        else:
            state.baselines_written += done.written
            state.summary += [f"baseline written: {p}" for p in done.written]
            if done.written and exitstatus == pytest.ExitCode.INTERRUPTED:
                state.summary.append("the run was interrupted: baselines were recorded for the tests that finished only")
        if self.gate.options.prune and done.stale:
            if done.prune_error is not None:  # a file gone bad since it was read, or a lock held too long
                state.prune_line = (f"stale baseline entries NOT pruned: {done.prune_error}", True)
            else:
                state.baselines_pruned += done.pruned
                count = len(done.stale)
                state.prune_line = (f"pruned {count} stale baseline entr{'y' if count == 1 else 'ies'}", False)

    def stale(self) -> list[tuple[Path, str]]:
        """Stored entries of tests that no longer exist, in the modules collected in full."""
        if self.state.stale is None:
            collection = self.state.collection
            self.state.stale = self.gate.store.find_stale(collection.gated_ids, collection.complete_modules())
        return self.state.stale

    def _write_ci_outputs(self, session) -> None:
        from ..outputs import write_ci_outputs

        config, gate, state, settings = self.config, self.gate, self.state, self.settings
        bridge = config.pluginmanager.get_plugin("ampgate-benchmark")
        if bridge is not None:
            state.summary += bridge.finish()
        run_info = {
            "args": [str(a) for a in config.invocation_params.args],
            "rootdir": config.rootpath,
            "device": gate.options.device,
            "update": gate.options.update,
            "strict": gate.options.strict,
            "baseline_dir": gate.options.baseline_dir,
            "exit_status": int(session.exitstatus),
            "workers": len(state.workers) if state.workers else None,
            "baselines_written": list(state.baselines_written),
        }
        state.summary += write_ci_outputs(
            gate,
            json_path=settings.json,
            markdown_path=settings.markdown,
            plot_path=settings.plot,
            step_summary=os.environ.get("GITHUB_STEP_SUMMARY") if gate.options.enabled else None,
            runs=state.runs,
            run_info=run_info,
            stale=lambda: [test for _path, test in self.stale()],
            written=state.outputs_written,
        )

    def pytest_terminal_summary(self, terminalreporter, exitstatus, config):
        if not self.worker:
            reporting.terminal_summary(terminalreporter.write_sep, terminalreporter.write_line, self)

    def pytest_report_header(self, config):
        options = self.gate.options
        if not options.enabled:
            return None
        mode = "update" if options.update else "check"
        return f"ampgate: {mode} baselines in {options.baseline_dir}, device {options.device}"


class FailureText:
    """The text the plugin makes a test's failure (a verdict, bad input), as pytest's reports hold
    it: pytest 8.0's short summary shows a failure's reason only through ``longrepr.reprcrash``
    (later versions also show a plain string), so ``FAILED <test> - AMP REGRESSION`` is said on every
    supported version.  Sent to the xdist controller as the plain text."""

    def __init__(self, text: str):
        self.text = text
        self.reprcrash = _CrashLine(text)

    def __str__(self) -> str:
        return self.text

    def toterminal(self, tw) -> None:
        for line in self.text.split("\n"):
            tw.line(line)


@dataclass
class _CrashLine:
    """What pytest reads of a failure's "crash": its message (``--tb=line`` prints its first line)."""

    message: str
    path: str = ""
    lineno: int = 0

    def __str__(self) -> str:
        return self.message.split("\n", 1)[0]


def item_state(item) -> ItemState:
    """The test's state, made on first use (a test gated only through ``request.getfixturevalue``)."""
    if ITEM_KEY not in item.stash:
        item.stash[ITEM_KEY] = ItemState()
    return item.stash[ITEM_KEY]
