"""What --ampgate-update records: only tests whose whole call passed (xfail honoured, under xdist too), and no
selection narrower than the whole module makes a living test's entry stale or pruned."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from session_helpers import CPU, HELPERS, UPDATE, _entry, _env_key, _hashes, _write_baseline
from test_bad_input_and_faults import INTERNAL_FRAME, _assert_clean, _output, _quiet_and_isolated  # noqa: F401

# --------------------------------------------------------------------------------------------------
# 1. Recording only what passed; xfail honoured.
# --------------------------------------------------------------------------------------------------

OUTCOMES_TEST = (
    HELPERS
    + """

@pytest.fixture
def breaks_on_teardown():
    yield
    raise RuntimeError("teardown broke")


@pytest.mark.amp_regression(**FAST)
def test_ok(ampgate):
    ampgate.run(tiny())


@pytest.mark.amp_regression(**FAST)
def test_own_assert_fails(ampgate):
    result = ampgate.run(tiny())
    assert result.mode("fp32").accuracy > 2, "the test's own check after run()"


@pytest.mark.amp_regression(**FAST)
def test_skips_after_run(ampgate):
    ampgate.run(tiny())
    pytest.skip("decided to skip after measuring")


@pytest.mark.amp_regression(**FAST)
def test_teardown_fails(ampgate, breaks_on_teardown):
    ampgate.run(tiny())


@pytest.mark.xfail(reason="known bf16 NaN")
@pytest.mark.amp_regression(**FAST)
def test_known_gate_failure(ampgate):
    ampgate.run(tiny(model=lambda: Faulty("nan")))


@pytest.mark.xfail(reason="expected to fail", strict=True)
@pytest.mark.amp_regression(**FAST)
def test_strict_xpass(ampgate):
    ampgate.run(tiny())


@pytest.mark.xfail(reason="expected to fail")
@pytest.mark.amp_regression(**FAST)
def test_xpass(ampgate):
    ampgate.run(tiny())
"""
)

NOT_PASSED = {
    "test_own_assert_fails": "the test failed",
    "test_skips_after_run": "the test skipped",
    "test_teardown_fails": "its teardown failed",
    "test_known_gate_failure": "it has failing checks",
    "test_strict_xpass": "the test failed",
    "test_xpass": "the test xpassed",
}


def test_update_records_only_tests_whose_whole_call_passed_and_honours_xfail(pytester):
    pytester.makepyfile(test_outcomes=OUTCOMES_TEST)
    env = _env_key()
    old = {f"test_outcomes.py::{name}": {env: _entry(0.123)} for name in NOT_PASSED}
    path = _write_baseline(pytester, "test_outcomes", old)
    result = pytester.runpytest(*UPDATE, "-rA")
    result.assert_outcomes(passed=2, failed=2, skipped=1, errors=1, xfailed=1, xpassed=1)
    out = _assert_clean(result)
    assert "XFAIL test_outcomes.py::test_known_gate_failure - known bf16 NaN" in out, out
    assert "[XPASS(strict)] expected to fail" in out, out
    for name, why in NOT_PASSED.items():
        assert f"baseline NOT recorded for test_outcomes.py::{name}: {why}" in out, (name, out)
    stored = json.loads(path.read_text())["tests"]
    for name in NOT_PASSED:  # the entries of tests that did not pass are exactly as they were
        assert stored[f"test_outcomes.py::{name}"] == old[f"test_outcomes.py::{name}"], name
    assert env in stored["test_outcomes.py::test_ok"], "the passing test is recorded"


def test_under_xdist_only_passed_calls_reach_the_store(pytester):
    """The decision travels on the workers' reports: the controller stages only what passed."""
    pytester.makepyfile(test_outcomes=OUTCOMES_TEST)
    result = pytester.runpytest_subprocess(*UPDATE, "-n", "2", "-k", "test_ok or own_assert or teardown or known_gate")
    result.assert_outcomes(passed=2, failed=1, errors=1, xfailed=1)
    out = _assert_clean(result)
    assert "baseline NOT recorded for test_outcomes.py::test_teardown_fails: its teardown failed" in out, out
    stored = json.loads((pytester.path / "baselines" / "test_outcomes.json").read_text())["tests"]
    assert sorted(stored) == ["test_outcomes.py::test_ok"], stored


def test_known_gate_failure_under_xfail_is_xfailed_in_check_mode(pytester):
    pytester.makepyfile(test_outcomes=OUTCOMES_TEST)
    result = pytester.runpytest(*CPU, "-k", "known_gate_failure or strict_xpass")
    result.assert_outcomes(xfailed=1, failed=1, deselected=5)
    _assert_clean(result)


# --------------------------------------------------------------------------------------------------
# 2. Narrower selections never make a living test's baseline stale.
# --------------------------------------------------------------------------------------------------

SELECTION_TEST = (
    HELPERS
    + """

@pytest.mark.amp_regression(**FAST)
def test_a(ampgate):
    ampgate.run(tiny())


@pytest.mark.amp_regression(**FAST)
def test_b(ampgate):
    ampgate.run(tiny())
    assert os.environ.get("B_PASSES"), "test_b fails until B_PASSES is set"
"""
)


def _selection_files(pytester) -> Path:
    pytester.makepyfile(test_sel=SELECTION_TEST)
    env = _env_key()
    tests = {"test_sel.py::test_a": {env: _entry(0.5)}, "test_sel.py::test_b": {env: _entry(0.5)}}
    return _write_baseline(pytester, "test_sel", tests)


def test_last_failed_never_prunes_or_calls_stale_a_test_that_was_not_rerun(pytester):
    path = _selection_files(pytester)
    first = pytester.runpytest("--ampgate", "--ampgate-device", "cpu")  # with the cache: test_b fails
    first.assert_outcomes(passed=1, failed=1)
    before = _hashes(pytester.path / "baselines")
    listed = pytester.runpytest("--ampgate", "--ampgate-device", "cpu", "--lf")
    listed.assert_outcomes(failed=1)
    assert "stale baseline entries" not in _output(listed), _output(listed)
    pruned = pytester.runpytest("--ampgate", "--ampgate-device", "cpu", "--lf", "--ampgate-update", "--ampgate-prune")
    pruned.assert_outcomes(failed=1)
    out = _assert_clean(pruned)
    assert "pruned" not in out and path.exists(), out
    assert _hashes(pytester.path / "baselines") == before, "nothing pruned, nothing written"


@pytest.mark.parametrize(
    "args",
    [("-k", "test_b"), ("test_sel.py::test_b",), ("--deselect", "test_sel.py::test_a"), ("-p", "dropper"), ("-p", "uncollector")],
    ids=["k", "node_id", "deselect", "plugin_drops_items_silently", "plugin_does_not_collect_them"],
)
def test_narrower_selection_never_prunes(pytester, monkeypatch, args):
    monkeypatch.setenv("B_PASSES", "1")
    _selection_files(pytester)
    # Plugins that narrow the run without calling pytest_deselected: one drops items before anyone
    # else sees them, one (as --lf does) filters what a module's collection returns.
    pytester.makepyfile(
        dropper="import pytest\n\n@pytest.hookimpl(tryfirst=True)\ndef pytest_collection_modifyitems(items):\n"
        "    items[:] = [i for i in items if i.name != 'test_a']\n",
        uncollector="import pytest\n\n@pytest.hookimpl(wrapper=True)\ndef pytest_make_collect_report(collector):\n"
        "    report = yield\n    if report.result:\n"
        "        report.result[:] = [x for x in report.result if x.name != 'test_a']\n    return report\n",
    )
    pytester.syspathinsert()
    before = _hashes(pytester.path / "baselines")
    result = pytester.runpytest(*CPU, "--ampgate-update", "--ampgate-prune", *args)
    result.assert_outcomes(passed=1)
    out = _assert_clean(result)
    assert "pruned" not in out and "stale baseline" not in out, out
    stored = json.loads((pytester.path / "baselines" / "test_sel.json").read_text())["tests"]
    assert stored["test_sel.py::test_a"] == {_env_key(): _entry(0.5)}, "test_a's entry untouched"
    assert before, "the store existed"


def test_a_full_run_still_finds_and_prunes_the_entry_of_a_test_that_is_gone(pytester, monkeypatch):
    monkeypatch.setenv("B_PASSES", "1")
    path = _selection_files(pytester)
    doc = json.loads(path.read_text())
    doc["tests"]["test_sel.py::test_gone"] = {_env_key(): _entry(0.5)}
    path.write_text(json.dumps(doc))
    listed = pytester.runpytest(*CPU)
    assert "stale baseline entries (their tests no longer exist): test_sel.py::test_gone" in _output(listed)
    pruned = pytester.runpytest(*CPU, "--ampgate-update", "--ampgate-prune")
    assert "pruned 1 stale baseline entry" in _output(pruned)
    assert sorted(json.loads(path.read_text())["tests"]) == ["test_sel.py::test_a", "test_sel.py::test_b"]
