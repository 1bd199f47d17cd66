"""SIGTERM keeps what finished, as Ctrl-C does, and never leaves a half-written baseline file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from session_helpers import HELPERS, POSIX, UPDATE, _baseline_doc, _entry
from test_bad_input_and_faults import INTERNAL_FRAME, _assert_clean, _output, _quiet_and_isolated  # noqa: F401

# --------------------------------------------------------------------------------------------------
# 10. SIGTERM.
# --------------------------------------------------------------------------------------------------

SIGTERM_TESTS = (
    HELPERS
    + """

@pytest.mark.amp_regression(**FAST)
def test_one(ampgate):
    ampgate.run(tiny())


@pytest.mark.amp_regression(**FAST)
def test_two(ampgate):
    ampgate.run(tiny())


@pytest.mark.amp_regression(**FAST)
def test_three(ampgate):
    open(os.environ["REACHED"], "w").close()
    time.sleep(300)
    ampgate.run(tiny())
"""
)


def _sigterm_when_reached(tmp_path, env, *args):
    """Run ``pytest --ampgate-update`` in ``tmp_path``, send SIGTERM once it has created ``reached``;
    the finished process and its output (a run SIGTERM did not stop is killed and says so)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", *UPDATE, "-p", "no:xdist", "-p", "no:benchmark", "-p", "no:hypothesispytest", "-q", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    while not (tmp_path / "reached").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    try:
        out = proc.communicate(timeout=120)[0].decode(errors="replace")
    except subprocess.TimeoutExpired:
        proc.kill()
        out = proc.communicate()[0].decode(errors="replace") + "\n[killed: SIGTERM did not stop it]"
    return proc, out


@POSIX
def test_sigterm_keeps_the_finished_tests_results_as_ctrl_c_does(tmp_path):
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_term.py").write_text(SIGTERM_TESTS)
    (tmp_path / "baselines").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_ADDOPTS", "PYTEST_XDIST", "PYTEST_CURRENT"))}
    env.update(OMP_NUM_THREADS="1", REACHED=str(tmp_path / "reached"), PYTHONPATH=os.pathsep.join(sys.path))
    proc, out = _sigterm_when_reached(tmp_path, env)
    assert (tmp_path / "reached").exists(), out
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, out
    assert "the run was interrupted: baselines were recorded for the tests that finished only" in out, out
    assert "SIGTERM received" in out, out
    assert "Traceback" not in out and not INTERNAL_FRAME.search(out), out
    stored = json.loads((tmp_path / "baselines" / "test_term.json").read_text())["tests"]
    assert sorted(stored) == ["test_term.py::test_one", "test_term.py::test_two"], stored
    assert not list((tmp_path / "baselines").glob(".*.tmp"))


@POSIX
def test_sigterm_while_baselines_are_written_leaves_the_old_file_whole(tmp_path):
    """The fault points of test_bad_input_and_faults.py: the writer stalls half-way through its temp file."""
    from test_bad_input_and_faults import FAULT_CONFTEST, RACE_TESTS

    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "conftest.py").write_text(FAULT_CONFTEST)
    (tmp_path / "test_race.py").write_text(RACE_TESTS)
    (tmp_path / "baselines").mkdir()
    old = _baseline_doc({"test_race.py::test_zero": {"cpu|elsewhere|torch2": _entry(0.8)}})
    (tmp_path / "baselines" / "test_race.json").write_bytes(old)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_ADDOPTS", "PYTEST_XDIST", "PYTEST_CURRENT"))}
    env.update(
        OMP_NUM_THREADS="1",
        AMPGATE_FAULT="mid-write",
        AMPGATE_FAULT_MARK=str(tmp_path / "reached"),
        PYTHONPATH=os.pathsep.join(sys.path),
        PYTEST_AMPGATE_LOCK_DIR=str(tmp_path / "locks"),
    )
    proc, out = _sigterm_when_reached(tmp_path, env, "-k", "test_one")
    assert (tmp_path / "reached").exists(), out
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, out
    assert "baselines NOT fully written: interrupted while writing them" in out, out
    assert "Traceback" not in out and not INTERNAL_FRAME.search(out), out
    assert (tmp_path / "baselines" / "test_race.json").read_bytes() == old, "the old file, byte for byte"
    assert not list((tmp_path / "baselines").glob(".*.tmp")), list((tmp_path / "baselines").iterdir())
