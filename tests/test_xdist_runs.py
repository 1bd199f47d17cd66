"""Real ``pytest -n 2`` runs that must end, and keep what finished: a worker that dies (``os._exit``
in a plain or a gated test, with and without ``--ampgate-update``) and SIGTERM to the controller
(once, or twice as an impatient CI runner sends it).  Each run is a subprocess bounded by a timeout,
so a hang fails the test instead of the suite.

pytest-xdist's loadgroup scheduling hangs for ever once a crashed worker is replaced (its issues
#1323 and #1327); the plugin uses ``load`` scheduling with the gated tests sent to one worker
(plugin/xdist_schedule.py), whose crash handling xdist's own tests cover.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from test_faults import INTERNAL_FRAME
from test_reliability import HELPERS

pytestmark = [
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals"),
    pytest.mark.skipif(__import__("importlib").util.find_spec("xdist") is None, reason="needs pytest-xdist"),
]

XDIST = ("-n", "2", "--ampgate", "--ampgate-device", "cpu", "-p", "no:cacheprovider", "-p", "no:randomly")
RUN_LIMIT_S = 240
"""A generous bound for one run on a loaded 2-core machine; a hang is killed at it and fails."""


def _env(tmp_path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_ADDOPTS", "PYTEST_XDIST", "PYTEST_CURRENT"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path), PYTEST_AMPGATE_LOCK_DIR=str(tmp_path / "locks"), **extra)
    env.pop("GITHUB_STEP_SUMMARY", None)
    return env


def _start(tmp_path, env, *args) -> subprocess.Popen:
    """The run, its output going to out.txt (a file, not a pipe: read while the run goes on)."""
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "baselines").mkdir(exist_ok=True)
    with open(tmp_path / "out.txt", "wb") as log:  # the child writes to its own copy
        return subprocess.Popen(
            [sys.executable, "-m", "pytest", *XDIST, *args],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _finish(proc, tmp_path) -> str:
    try:
        proc.wait(timeout=RUN_LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"the run did not end within {RUN_LIMIT_S} s:\n" + (tmp_path / "out.txt").read_text(errors="replace"))
    return (tmp_path / "out.txt").read_text(errors="replace")


def _stored(tmp_path, module: str) -> list[str]:
    path = tmp_path / "baselines" / f"{module}.json"
    return sorted(json.loads(path.read_text())["tests"]) if path.exists() else []


# --- a worker that dies ----------------------------------------------------------------------

CRASH_TESTS = (
    HELPERS
    + """

def _crash_if(where):
    if os.environ["CRASH"] == where:
        with open(os.environ["CRASHED_AT"], "w") as fh:
            fh.write(repr(time.time()))
        os._exit(3)  # as a segfaulting extension or the OOM killer: no report, no teardown


@pytest.mark.amp_regression(**FAST)
@pytest.mark.parametrize("i", range(3))
def test_gated(ampgate, i):
    if i == 1:
        _crash_if("gated")
    ampgate.run(tiny())


@pytest.mark.parametrize("i", range(4))
def test_plain(i):
    if i == 1:
        _crash_if("plain")
    time.sleep(0.2)
"""
)


@pytest.mark.parametrize("update", [False, True], ids=["check", "update"])
@pytest.mark.parametrize("where", ["plain", "gated"])
def test_a_crashed_worker_ends_the_run_as_a_failed_test_and_keeps_the_other_gated_results(tmp_path, where, update):
    (tmp_path / "test_crash.py").write_text(CRASH_TESTS)
    env = _env(tmp_path, CRASH=where, CRASHED_AT=str(tmp_path / "crashed_at"))
    args = ("--ampgate-json", "r.json", *(("--ampgate-update",) if update else ()))
    proc = _start(tmp_path, env, *args)
    out = _finish(proc, tmp_path)
    ended = time.time()
    crashed = f"test_crash.py::test_{where}[1]"
    assert ended - float((tmp_path / "crashed_at").read_text()) < 60, out  # ends within a minute of the crash
    assert proc.returncode == pytest.ExitCode.TESTS_FAILED, out
    assert re.search(rf"worker 'gw\d+' crashed while running '{re.escape(crashed)}'", out), out
    assert re.search(rf"^FAILED {re.escape(crashed)}", out, re.M), out
    assert "INTERNALERROR" not in out and "Traceback" not in out and not INTERNAL_FRAME.search(out), out
    others = [f"test_crash.py::test_gated[{i}]" for i in range(3) if f"test_crash.py::test_gated[{i}]" != crashed]
    report = json.loads((tmp_path / "r.json").read_text())
    assert sorted(t["test_id"] for t in report["tests"]) == others, out  # measured, and judged
    assert all(t["verdict"]["outcome"] == "pass" for t in report["tests"]), report["tests"]
    assert _stored(tmp_path, "test_crash") == (others if update else []), out


# --- SIGTERM to the controller ---------------------------------------------------------------

SIGTERM_TESTS = (
    HELPERS
    + """

@pytest.mark.amp_regression(**FAST)
def test_one(ampgate):
    ampgate.run(tiny())


@pytest.mark.amp_regression(**FAST)
def test_two(ampgate):
    time.sleep(300)  # still running when SIGTERM comes
    ampgate.run(tiny())


def test_plain():
    pass
"""
)


@pytest.mark.parametrize("signals", [1, 2], ids=["one_sigterm", "second_sigterm_after_0.3s"])
def test_sigterm_to_the_xdist_controller_keeps_the_finished_gated_test(tmp_path, signals):
    (tmp_path / "test_term.py").write_text(SIGTERM_TESTS)
    proc = _start(tmp_path, _env(tmp_path), "--ampgate-update", "-v")
    deadline = time.monotonic() + RUN_LIMIT_S
    finished = re.compile(r"PASSED test_term\.py::test_one\b")  # the controller has test_one's result
    while proc.poll() is None and time.monotonic() < deadline and not finished.search((tmp_path / "out.txt").read_text(errors="replace")):
        time.sleep(0.05)
    for n in range(signals):
        time.sleep(0.3 if n else 0.0)
        proc.send_signal(signal.SIGTERM)
    out = _finish(proc, tmp_path)
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, out
    assert "SIGTERM received" in out, out
    assert "Traceback" not in out and "INTERNALERROR" not in out and not INTERNAL_FRAME.search(out), out
    assert re.search(r"^test_term\.py::test_one +amp_bf16 .* pass$", out, re.M), out  # reported in the summary
    assert "the run was interrupted: baselines were recorded for the tests that finished only" in out, out
    assert _stored(tmp_path, "test_term") == ["test_term.py::test_one"], out
    assert not list((tmp_path / "baselines").glob(".*.tmp"))


# --- the first distribution, step by step ----------------------------------------------------


class FakeWorker:
    """The part of xdist's WorkerController (xdist/workermanage.py) a scheduler talks to: its
    gateway id, ``send_runtest_some(indices)`` (queue these tests on the worker), ``shutdown()``
    (run what is queued, then stop) and ``shutting_down`` (true once shutdown was sent)."""

    def __init__(self, worker_id: str):
        self.gateway = type("Gateway", (), {"id": worker_id})()
        self.sent: list[int] = []
        self.shutting_down = False

    def send_runtest_some(self, indices):
        self.sent += list(indices)

    def shutdown(self):
        self.shutting_down = True


def _scheduler(pytester, tmp_path, collection, gated, write=True):
    from pytest_ampgate.plugin.xdist_schedule import GatedLoadScheduling, write_gated_ids

    sched = GatedLoadScheduling(pytester.parseconfig("--tx", "2*popen"), folder=str(tmp_path))
    workers = [FakeWorker("gw0"), FakeWorker("gw1")]
    for worker in workers:
        sched.add_node(worker)
        if write:
            write_gated_ids(tmp_path, worker.gateway.id, [collection[i] for i in gated])
        sched.add_node_collection(worker, collection)
    sched.schedule()
    return sched, workers


@pytest.mark.parametrize(
    "tests, gated",
    [(13, [0, 5, 12]), (4, [2]), (3, [0, 1]), (40, list(range(0, 40, 3))), (3, [0, 1, 2])],
    ids=["3_of_13", "lone_gated", "few_tests", "many", "all_gated"],
)
def test_gated_tests_all_go_to_one_worker_first_and_every_test_is_sent_once(pytester, tmp_path, tests, gated):
    collection = [f"test_m.py::test_{i}" for i in range(tests)]
    sched, (owner, other) = _scheduler(pytester, tmp_path, collection, gated)
    assert owner.sent[: len(gated)] == gated  # in collection order, before anything else
    assert not set(gated) & set(other.sent)  # the other worker runs plain tests meanwhile (when there are any)
    assert bool(other.sent) == (len(gated) < tests)
    assert len(owner.sent) >= 2 or owner.shutting_down  # a worker starts a test once it holds the next one (or is shut down)
    # whatever was not sent yet is pending; nothing twice, nothing lost
    assert sorted(owner.sent + other.sent + sched.pending) == list(range(tests))
    while sched.pending or any(sched.node2pending.values()):  # the workers finish their tests one by one
        for worker in (owner, other):
            if sched.node2pending[worker]:
                sched.mark_test_complete(worker, sched.node2pending[worker][0])
    assert sorted(owner.sent + other.sent) == list(range(tests)) and owner.shutting_down and other.shutting_down


def test_without_the_workers_gated_ids_it_is_xdists_load_scheduling(pytester, tmp_path):
    """A remote worker (``--tx ssh``) cannot write to the controller's folder: plain ``load`` then."""
    collection = [f"test_m.py::test_{i}" for i in range(3)]
    _, (gw0, gw1) = _scheduler(pytester, tmp_path, collection, [1, 2], write=False)
    assert (gw0.sent, gw1.sent) == ([0, 2], [1])  # xdist's round robin over so few tests


def test_test_id_drops_only_the_suffix_of_xdists_loadgroup():
    from pytest_ampgate.plugin.collection import test_id

    assert test_id("t.py::test_a@serial") == "t.py::test_a"  # --dist loadgroup on a user's own xdist_group
    assert test_id("t.py::test_a[x@y]@g") == "t.py::test_a[x@y]"
    for unchanged in ("t.py::test_a[x@y]", "dir@1/t.py::test_a", "t.py::test_a", "a@b.py::test_x"):
        assert test_id(unchanged) == unchanged
