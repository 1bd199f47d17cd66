"""What the plugin says: the failing test's report, its JUnit and HTML figures, the terminal summary.

A gate failure is the verdict's own text (pytest already names the test: "FAILED <id> - AMP
REGRESSION"); bad input is its message alone, naming the culprit and the fix.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import WorkloadError

NO_DEVICE_PREFIX = "ampgate: NOTHING GATED"

NOTHING_MEASURED = (
    "AMP GATE MEASURED NOTHING: this test is gated (amp_regression marker or ampgate fixture) but never "
    "called ampgate.run(workload), so nothing was measured or judged; call it, or use the ampgate_mnist / "
    "ampgate_cifar fixture"
)


class GateFailed(Exception):
    """The gate's verdict, raised at the end of the test's call: pytest's own outcome rules (xfail,
    ``strict=True``, ``raises=``) then apply to a gate failure as to any other."""


def explain(results, sep: str = "\n\n") -> str:
    return sep.join(r.verdict.explain(strict=r.strict) for r in results)


def outcome_word(report) -> str:
    if hasattr(report, "wasxfail"):
        return "xfailed" if report.skipped else "xpassed"
    return report.outcome


def progress_line(result) -> str:
    """One line per gated result, for ``-v`` (the xdist controller says it for its workers)."""
    m = result.measurements
    return (
        f"{result.test_id}: {m.workload}, {m.reference.mode} vs {', '.join(m.modes)}, {m.config.rounds} rounds x "
        f"{m.config.steps_per_block} steps, {m.wall_time_s:.1f} s: {result.verdict.outcome}"
    )


def bad_input_repr(item, excinfo, options):
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
    return options.with_commands(text, test_id_of(item))


def test_id_of(item) -> str:
    from .collection import test_id

    return test_id(item)


def attach(item, report, results, excinfo, *, options, passed: bool) -> None:
    """The gated call's report: the verdict as the failure or as an "ampgate" section, plus its
    figures for JUnit (per test where the family allows it) and pytest-html.  Every command in it
    is completed for this run (``GateOptions.with_commands``), so it works as printed."""
    update = options.update
    if junit_family(item.config) in ("xunit1", "legacy"):
        from ..outputs.junit import junit_properties

        for r in results:  # per-test <properties>: valid in these families (xunit2: see junit_suite_properties)
            item.user_properties.extend(junit_properties(r))
    if html_report_requested(item.config):
        from ..outputs.html import extras

        report.extras = list(getattr(report, "extras", [])) + extras(results)
    text = explain(results)
    if update and any(r.failed for r in results):
        text += "\n  baseline NOT recorded: fix the failing checks, or relax their margins in the marker"
    elif update and not passed:
        from .collection import NOT_RECORDED_ATTR

        text += f"\n  baseline NOT recorded: {report.__dict__.get(NOT_RECORDED_ATTR, f'the test {outcome_word(report)}')}"
    text = options.with_commands(text, test_id_of(item))
    if report.failed and excinfo is not None and isinstance(excinfo.value, GateFailed):
        report.longrepr = text  # the verdict is the failure; a section would repeat it
    else:
        report.sections.append(("ampgate", text))


def html_report_requested(config) -> bool:
    return config.pluginmanager.hasplugin("html") and bool(config.getoption("htmlpath", None))


def junit_family(config) -> str:
    try:
        return config.getini("junit_family") or "xunit2"
    except ValueError:
        return "xunit2"


def junit_suite_properties(config, results) -> None:
    """Under pytest's default JUnit family, xunit2, a <testcase> may not hold <properties>: the
    figures go to the <testsuite>'s properties instead, as ``<test id>::ampgate_<figure>`` (what
    the ``record_testsuite_property`` fixture writes)."""
    if junit_family(config) in ("xunit1", "legacy"):
        return
    try:
        from _pytest.junitxml import xml_key  # where record_testsuite_property finds the report, too
    except ImportError:
        return
    xml = config.stash.get(xml_key, None)
    if xml is None:
        return
    from ..outputs.junit import suite_properties

    for name, value in suite_properties(results):
        xml.add_global_property(name, value)


def device_skips_line(count: int, gate) -> tuple[str | None, bool]:
    """The summary line for gated tests the device could not run, and whether the run must fail."""
    if not count:
        return None, False
    reason = gate.skip_reason()
    tests = f"{count} gated test{'s' if count != 1 else ''}"
    options = gate.options
    if options.strict or options.update:
        flag = "--ampgate-update" if options.update else "--ampgate-strict"
        return f"{NO_DEVICE_PREFIX}: {tests} could not run on {options.device}: {reason}; {flag} needs the device, so this run fails", True
    return f"ampgate: {tests} skipped on {options.device}: {reason}", False


def terminal_summary(write_sep: Callable, write_line: Callable, plugin) -> None:
    """The "ampgate summary" section: the table, then every note a reader must not miss."""
    gate, state = plugin.gate, plugin.state
    if not gate.results and not state.summary and not state.unmeasured and not state.not_recorded and not state.prune_line:
        return  # a plain run: nothing to say, and nothing heavy (torch) imported to say it
    from ..outputs.table import format_table, table_columns, table_rows
    from ..verdict import FAIL, INCONCLUSIVE, SKIPPED

    write_sep("=", "ampgate summary")
    if gate.results:
        write_line(format_table(table_rows(gate.results), table_columns(gate.results)))
        write_line(f"environment: {gate.results[0].env_key}")
    update = gate.options.update
    for r in gate.results:
        for check in r.verdict.of(INCONCLUSIVE):
            write_line(gate.options.with_commands(f"INCONCLUSIVE {r.test_id}: {check.why}", r.test_id), yellow=True)
        if update and r.update is None and r.verdict.of(FAIL):
            write_line(f"baseline NOT recorded for {r.test_id}: it has failing checks", red=True)
        elif update and r.update is None and r.test_id in state.not_recorded:
            write_line(f"baseline NOT recorded for {r.test_id}: {state.not_recorded[r.test_id]}", red=True)
        for check in r.verdict.checks:
            if r.strict and check.metric == "speedup" and check.outcome == SKIPPED:  # strict: nothing ungated goes unsaid
                write_line(f"SKIPPED SPEED CHECK {r.test_id}: {check.why}", yellow=True)
            if check.metric == "known_state":
                write_line(f"LEAKED STATE {r.test_id}: {check.why}", yellow=True)
    if state.unmeasured:
        write_line(
            f"gated but measured nothing (never called ampgate.run()): {', '.join(state.unmeasured)}; --ampgate-strict fails them",
            yellow=True,
        )
    if state.prune_line:
        text, failed = state.prune_line
        write_line(text, **({"red": True} if failed else {}))
    else:
        stale = plugin.stale()
        if stale:
            write_line(
                "stale baseline entries (their tests no longer exist): "
                + ", ".join(test for _path, test in stale)
                + "; delete them with --ampgate-update --ampgate-prune"
            )
    for line in map(gate.options.with_commands, state.summary):
        write_line(line, red=line.startswith(("baselines NOT", NO_DEVICE_PREFIX)) or " NOT written" in line)
