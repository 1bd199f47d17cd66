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
import torch
from session_helpers import CPU, HELPERS, TINY, gated, imported_first, isolated, private_locks, project  # noqa: F401  (autouse fixtures)
from test_bad_input_and_faults import INTERNAL_FRAME

from pytest_ampgate.gpu_lock import overlaps, pick_device

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


# --- xdist -----------------------------------------------------------------------------------


XDIST_PROJECT = project(
    "@pytest.mark.amp_regression(" + TINY + ")\n"
    "@pytest.mark.parametrize('i', range(4))\n"
    "def test_gated(ampgate, i):\n"
    "    time.sleep(0.4)  # long enough that two unserialised gated tests would overlap\n"
    "    ampgate.run(workload())\n",
    "@pytest.mark.parametrize('i', range(4))\ndef test_plain(i):\n    pass\n",
)


@pytest.mark.filterwarnings("ignore:Benchmarks are automatically disabled because xdist")
def test_xdist_serialises_gated_tests_and_merges_their_results(pytester):
    from pytest_ampgate.baselines import BaselineStore

    # A baseline of a test that no longer exists, recorded in-process beforehand.
    pytester.makepyfile(test_user=project(gated("test_gone")))
    pytester.runpytest(*CPU, "--ampgate-update").assert_outcomes(passed=1)

    pytester.makepyfile(test_user=XDIST_PROJECT)
    result = pytester.runpytest(*CPU, "-n", "2", "-v", "--ampgate-update", "--ampgate-json", "r.json")
    result.assert_outcomes(passed=8)
    report = json.loads((pytester.path / "r.json").read_text())
    ids = [f"test_user.py::test_gated[{i}]" for i in range(4)]
    assert sorted(t["test_id"] for t in report["tests"]) == ids
    assert report["run"]["workers"] == 2 and report["summary"]["baselines_written"]

    # Serialised: the gated tests were scheduled onto one worker (plugin/xdist_schedule.py), and no two
    # of them held the device at once.
    runs = [t["run"] for t in report["tests"]]
    assert len({r["worker"] for r in runs}) == 1
    assert overlaps([(r["acquired_at"], r["released_at"]) for r in runs]) == []
    assert all(r["released_at"] - r["acquired_at"] >= 0.4 for r in runs)
    assert len({r["key"] for r in runs}) == 1 and report["run"]["device"] == "cpu"

    # Merged in the controller: the summary, the per-test progress lines and the baselines are complete.
    out = result.stdout.str()
    for test_id in ids:
        assert re.search(rf"^{re.escape(test_id)} +fp32 ", out, re.M) and re.search(rf"^{re.escape(test_id)} +amp_bf16 ", out, re.M)
    result.stdout.fnmatch_lines(["*[[]ampgate[]] gw? test_user.py::test_gated[[]0[]]: tiny, fp32 vs amp_bf16, 3 rounds x 3 steps*"])
    store = BaselineStore(pytester.path / "baselines")
    env_key = report["tests"][0]["env_key"]
    assert all(store.lookup(test_id, env_key) is not None for test_id in [*ids, "test_user.py::test_gone"])
    assert not list((pytester.path / "locks").glob("*.lock"))  # per-run CPU lock files are cleaned up

    # Stale entries are found from the workers' collection (the controller collects nothing).
    result.stdout.fnmatch_lines(["stale baseline entries (their tests no longer exist): test_user.py::test_gone; *"])
    assert report["summary"]["stale_baselines"] == ["test_user.py::test_gone"]


# --- 6. xdist and several GPUs ---------------------------------------------------------------


XDIST_TIMED = """
import json, os, time
import pytest

def _log(name, start):
    with open(os.path.join(os.environ["AMPGATE_LOG"], name), "w") as fh:
        json.dump({"worker": os.environ.get("PYTEST_XDIST_WORKER"), "start": start, "end": time.time()}, fh)

@pytest.mark.parametrize("i", range(3))
def test_gated(ampgate, i):
    start = time.time()
    time.sleep(1.5)  # holding the device
    _log(f"gated{i}", start)

@pytest.mark.parametrize("i", range(8))
def test_plain(i):
    start = time.time()
    time.sleep(0.1)
    _log(f"plain{i}", start)
"""


def test_xdist_plain_tests_run_while_a_gated_test_holds_the_device(pytester, tmp_path, monkeypatch):
    log = tmp_path / "log"
    log.mkdir()
    monkeypatch.setenv("AMPGATE_LOG", str(log))
    pytester.makepyfile(test_par=XDIST_TIMED)
    result = pytester.runpytest_subprocess(*CPU, "-n", "2", "-p", "no:randomly")
    result.assert_outcomes(passed=11)
    runs = {p.name: json.loads(p.read_text()) for p in log.iterdir()}
    gated = [v for k, v in runs.items() if k.startswith("gated")]
    plain = [v for k, v in runs.items() if k.startswith("plain")]
    assert len({g["worker"] for g in gated}) == 1  # grouped onto one worker
    assert {p["worker"] for p in plain} - {gated[0]["worker"]}  # the other worker took plain tests
    # ... while the gated ones ran: the first plain test started before the first gated test ended
    assert min(p["start"] for p in plain) < min(g["end"] for g in gated)
    # every plain test was done before the gated tests were: nothing queued behind the device lock
    assert max(p["end"] for p in plain) < max(g["end"] for g in gated) - 1.0
    # pytest-benchmark's "disabled under xdist" is said once, not once per process
    text = result.stdout.str() + result.stderr.str()
    assert text.count("Benchmarks are automatically disabled because xdist") <= 1


def test_cuda_auto_spreads_workers_over_the_gpus(monkeypatch):
    assert [pick_device("cuda:auto", w, 2) for w in range(4)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert pick_device("cuda:auto", 3, 0) == "cuda" and pick_device("cuda:1", 5, 4) == "cuda:1"

    from pytest_ampgate.plugin import options

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)  # the hardware boundary, faked
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw4")
    assert options.auto_device(None, "cuda:auto") == "cuda:1"
    # one lock per GPU: the keys of different GPUs differ
    from pytest_ampgate.gpu_lock import device_key

    assert device_key("cuda:0") != device_key("cuda:1")


@pytest.mark.filterwarnings("ignore:Benchmarks are automatically disabled because xdist")
def test_gated_tests_are_scheduled_onto_one_worker_except_under_cuda_auto(pytester):
    """The plugin's scheduler (xdist's ``load`` plus grouping, plugin/xdist_schedule.py) only where
    it groups something: not without --ampgate, and not under cuda:auto (each worker its own GPU)."""
    pytester.makepyfile(test_g="def test_gated(ampgate):\n    pass\n\ndef test_plain():\n    pass\n")
    runs = {
        "cpu": (*CPU, "-n", "2", "-v"),
        "off": ("-p", "no:cacheprovider", "-n", "2", "-v"),
        "cuda:auto": ("--ampgate", "--ampgate-device", "cuda:auto", "-p", "no:cacheprovider", "-n", "2", "-v"),
    }
    schedulers = {}
    for name, args in runs.items():
        out = pytester.runpytest(*args).stdout.str()
        schedulers[name] = re.findall(r"scheduling tests via (\w+)", out)
    assert schedulers == {"cpu": ["GatedLoadScheduling"], "off": ["LoadScheduling"], "cuda:auto": ["LoadScheduling"]}
