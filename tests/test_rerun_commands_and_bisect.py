"""Commands the plugin prints work as printed, and --ampgate-bisect's exit status for git bisect run."""

import json
import re
import shlex

import pytest
from session_helpers import CPU, TINY, gated, imported_first, project  # noqa: F401  (imported_first: autouse)

from pytest_ampgate.plugin.bisect import BAD, CANNOT_JUDGE, GOOD, STOP, bisect_status
from pytest_ampgate.session import GateOptions

COMMAND = re.compile(
    r"(?:record one with|accept a deliberate change with): (pytest --ampgate --ampgate-update(?: +(?:'[^']*'|[^\s\[;']+))*)"
)
"""The command after a hint, up to what follows it on the line (a check's ``[INCONCLUSIVE]``, a ``;``)."""
RECORDING = TINY.replace('missing_baseline="ignore"', 'missing_baseline="warn"')


def _printed_command(output: str) -> list[str]:
    """The command a hint printed, as the words a shell would pass (without the leading ``pytest``)."""
    found = COMMAND.findall(output)
    assert found, output
    words = shlex.split(found[0].strip())
    assert words[0] == "pytest"
    return words[1:]


def test_update_command_repeats_what_the_run_needs():
    options = GateOptions(rerun_args=("--ampgate-device", "cpu", "--ampgate-baseline-dir", "my baselines"), rootdir_from_cwd="..")
    assert options.update_command() == "pytest --ampgate --ampgate-update --ampgate-device cpu --ampgate-baseline-dir 'my baselines'"
    assert options.update_command("tests/test_a.py::test_b").endswith(" ../tests/test_a.py::test_b")
    text = "re-record with pytest --ampgate --ampgate-update"
    once = options.with_commands(text, "t.py::t")
    assert once == options.with_commands(once, "t.py::t")  # completing twice changes nothing
    assert GateOptions().update_command() == "pytest --ampgate --ampgate-update"


def test_cpu_record_hint_works_as_printed(pytester):
    """No baseline yet: the INCONCLUSIVE hint's command, copied as printed, records one."""
    pytester.makepyfile(test_gated=project(gated("test_gated", RECORDING)))
    other = ("--ampgate-baseline-dir", "stored", "-o", "ampgate_rounds=3")
    result = pytester.runpytest(*CPU, *other, "-rA")
    result.assert_outcomes(passed=1)
    words = _printed_command(result.stdout.str())
    assert words[-1] == "test_gated.py::test_gated"
    assert {"--ampgate-device", "cpu", "--ampgate-baseline-dir", "stored"} <= set(words)
    recorded = pytester.runpytest(*words, "-p", "no:cacheprovider")
    recorded.assert_outcomes(passed=1)
    assert (pytester.path / "stored" / "test_gated.json").exists(), recorded.stdout.str()
    again = pytester.runpytest(*CPU, *other)
    again.assert_outcomes(passed=1)
    assert "record one with" not in again.stdout.str()


def test_cpu_accept_hint_works_as_printed(pytester):
    """A check failed against its baseline: the hint's command accepts the change, and the next run passes."""
    pytester.makepyfile(test_gated=project(gated("test_gated", RECORDING)))
    pytester.runpytest(*CPU, "--ampgate-update").assert_outcomes(passed=1)
    path = pytester.path / "baselines" / "test_gated.json"
    doc = json.loads(path.read_text())
    for env in doc["tests"]["test_gated.py::test_gated"].values():  # a stored accuracy this run cannot reach
        for mode in env["modes"].values():
            mode["accuracy"] = 1.0 if mode.get("accuracy") is not None else None
    path.write_text(json.dumps(doc))
    failed = pytester.runpytest(*CPU)
    failed.assert_outcomes(failed=1)
    words = _printed_command(failed.stdout.str())
    assert "--ampgate-device" in words
    pytester.runpytest(*words, "-p", "no:cacheprovider").assert_outcomes(passed=1)
    pytester.runpytest(*CPU).assert_outcomes(passed=1)


@pytest.mark.parametrize(
    ("marker", "status"),
    [
        (RECORDING.replace('missing_baseline="warn"', 'missing_baseline="ignore"'), GOOD),
        (TINY + ", planted", BAD),  # a layer forced to fp32: the coverage check fails
        (RECORDING, CANNOT_JUDGE),  # no baseline yet: INCONCLUSIVE
        ('modes=["tf32"]', CANNOT_JUDGE),  # a mode the CPU lacks: nothing gated
    ],
    ids=["pass", "regression", "inconclusive", "nothing_gated"],
)
def test_bisect_exit_status(pytester, marker, status):
    body = gated("test_gated", marker.replace(", planted", ""))
    if marker.endswith(", planted"):
        body = body.replace("ampgate.run(workload())", "ampgate.run(force_fp32_layer(workload()))")
        body = "from pytest_ampgate.testing import force_fp32_layer\n\n\n" + body
    pytester.makepyfile(test_gated=project(body, "def test_plain():\n    assert False  # not gated: deselected\n"))
    result = pytester.runpytest("--ampgate-bisect", "--ampgate-device", "cpu", "-p", "no:cacheprovider")
    assert result.ret == status, result.stdout.str()
    result.stdout.fnmatch_lines([f"ampgate bisect: exit {status}: *"])


def test_bisect_status_rules():
    from pytest_ampgate.verdict import FAIL, PASS

    class R:
        def __init__(self, test_id, outcome, workload_at_fault=False):
            self.test_id = test_id
            self.verdict = type("V", (), {"outcome": outcome, "workload_at_fault": workload_at_fault})()

    assert bisect_status(0, [R("a", PASS)], [])[0] == GOOD
    assert bisect_status(1, [R("a", PASS), R("b", FAIL)], [])[0] == BAD
    assert bisect_status(1, [R("a", FAIL, workload_at_fault=True)], [])[0] == CANNOT_JUDGE  # never blame AMP for the workload
    assert bisect_status(0, [R("a", PASS)], ["b"])[0] == CANNOT_JUDGE
    assert bisect_status(5, [], [])[0] == CANNOT_JUDGE
    assert bisect_status(2, [R("a", FAIL)], [])[0] == STOP
