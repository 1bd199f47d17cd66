"""Device and baseline locks on filelock: one holder at a time across processes and OS users, timeouts that name
the holder, per-run CPU locks and per-device GPU locks, and bad lock directories refused in one line."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from session_helpers import CPU, ROOT, gated, imported_first, isolated, private_locks, project  # noqa: F401  (autouse fixtures)  # noqa: F401  (imported_first: autouse)

from pytest_ampgate import file_safety
from pytest_ampgate.file_safety import Lock, LockError, check_lock_dir
from pytest_ampgate.gpu_lock import DeviceLock, overlaps

# --- the device lock itself ------------------------------------------------------------------


HOLD_SCRIPT = """
import json, sys, time
from pytest_ampgate.gpu_lock import DeviceLock
lock = DeviceLock("cpu-test", sys.argv[1])
hold = lock.acquire("child")
print(json.dumps({"acquired": hold.acquired_at}), flush=True)
time.sleep(float(sys.argv[2]))
lock.release(hold)
print(json.dumps({"released": hold.released_at}), flush=True)
"""


def test_device_lock_excludes_another_process_and_dies_with_its_holder(tmp_path):
    from pytest_ampgate.gpu_lock import DeviceLock

    child = subprocess.Popen([sys.executable, "-c", HOLD_SCRIPT, str(tmp_path), "1.0"], stdout=subprocess.PIPE, text=True)
    acquired = json.loads(child.stdout.readline())["acquired"]
    lock = DeviceLock("cpu-test", tmp_path)
    waits = []
    hold = lock.acquire("parent", on_wait=waits.append)
    released = json.loads(child.stdout.readline())["released"]
    child.wait(timeout=60)
    assert acquired <= released <= hold.acquired_at  # we got it only once the child let go
    assert hold.waited_s > 0.5
    lock.release(hold)

    # A holder that dies (a crashed worker) releases the lock with it.
    child = subprocess.Popen([sys.executable, "-c", HOLD_SCRIPT, str(tmp_path), "600"], stdout=subprocess.PIPE, text=True)
    child.stdout.readline()
    assert "child" in lock.holder()
    child.kill()
    child.wait(timeout=60)
    hold = DeviceLock("cpu-test", tmp_path).acquire("after the crash")
    assert hold.waited_s < 5


def test_overlaps_finds_exactly_the_overlapping_pairs():
    assert overlaps([(0, 1), (1, 2), (2.5, 3)]) == []
    assert overlaps([(0, 2), (1, 3), (2.5, 4), (5, 6)]) == [(0, 1), (1, 2)]


def test_cpu_locks_are_per_run_and_gpu_locks_per_device():
    from pytest_ampgate.gpu_lock import device_key

    assert device_key("cpu", "abc") == "cpu-abc" and device_key("cpu") == "cpu"
    key = device_key("cuda:0", "abc")
    assert key.startswith("cuda") and "abc" not in key


# --- 3. locks --------------------------------------------------------------------------------


def test_lock_directory_and_lock_files_are_shared_modes(tmp_path):
    directory = tmp_path / "shared-locks"
    lock = Lock("device-x", timeout=1, directory=directory)
    lock.acquire("test A")
    try:
        assert stat.S_IMODE(directory.stat().st_mode) == 0o1777  # like /tmp, whatever the umask
        assert stat.S_IMODE(lock.path.stat().st_mode) == 0o666
        assert stat.S_IMODE(lock.holder_path.stat().st_mode) == 0o666
        assert "test A" in lock.holder()
    finally:
        lock.release()
    assert lock.holder() == ""


def test_a_timeout_names_the_holder(tmp_path):
    first = DeviceLock("cuda-GPU-1234", tmp_path)
    second = DeviceLock("cuda-GPU-1234", tmp_path, timeout=0.3)
    hold = first.acquire("tests/test_amp.py::test_cifar")
    try:
        start = time.monotonic()
        with pytest.raises(LockError) as err:
            second.acquire("tests/test_amp.py::test_mnist")
        assert 0.25 < time.monotonic() - start < 5
        message = str(err.value)
        assert "timed out after 0.3s waiting for the cuda-GPU-1234 device lock" in message
        assert f"pid {os.getpid()}" in message and "tests/test_amp.py::test_cifar" in message
    finally:
        first.release(hold)
    second.release(second.acquire("now free"))


def test_a_gated_test_that_times_out_on_the_lock_errors_naming_the_holder(pytester, tmp_path):
    from pytest_ampgate.gpu_lock import device_key

    pytester.makepyfile(test_user=project(gated("test_pass"), "def test_plain():\n    pass\n"))
    # the in-process run's own CPU lock (per run: keyed by this pid), held by "another job"
    holder = DeviceLock(device_key("cpu", f"pid{os.getpid()}"), tmp_path / "locks")
    hold = holder.acquire("another job's tests/test_big.py::test_cifar")
    try:
        result = pytester.runpytest(*CPU, "--ampgate-lock-timeout", "0.3")
    finally:
        holder.release(hold)
    result.assert_outcomes(passed=1, errors=1)
    out = result.stdout.str()
    assert "INTERNALERROR" not in out and "Traceback" not in out
    result.stdout.fnmatch_lines(
        ["*LockError: timed out after 0.3s waiting for the cpu-pid* device lock*another job's tests/test_big.py::test_cifar*"]
    )


def test_a_lock_directory_that_is_a_file_is_a_usage_error(pytester, tmp_path, monkeypatch):
    bad = tmp_path / "not-a-dir"
    bad.write_text("")
    monkeypatch.setenv("PYTEST_AMPGATE_LOCK_DIR", str(bad))
    pytester.makepyfile(test_user=project(gated("test_pass")))
    result = pytester.runpytest(*CPU)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    result.stderr.fnmatch_lines([f"*lock directory {bad} is a file, not a directory*PYTEST_AMPGATE_LOCK_DIR*"])


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to act as a second OS user")
def test_two_os_users_share_one_device_lock(tmp_path):
    """root holds the lock; user nobody waits for it (its timeout names root's test), then takes it."""
    base = Path(tempfile.mkdtemp(prefix="ampgate-users-", dir="/tmp"))
    os.chmod(base, 0o755)
    directory = base / "locks"
    try:
        lock = DeviceLock("cuda-GPU-shared", directory)
        hold = lock.acquire("root's tests/test_amp.py::test_cifar")
        # The interpreter lives under /root, which user nobody cannot read: the child starts as
        # root, imports what it needs, then becomes user nobody for everything the lock does.
        child = (
            "import importlib, os, pkgutil, sys\nimport filelock\n"
            "for module in pkgutil.iter_modules(filelock.__path__):  # its parts differ by version\n"
            "    importlib.import_module(f'filelock.{module.name}')\n"
            "from pytest_ampgate.gpu_lock import DeviceLock\nfrom pytest_ampgate.file_safety import LockError, holder_text\n"
            "import getpass, socket, datetime, encodings.ascii, encodings.latin_1, encodings.utf_8  # noqa\n"
            "os.setgid(65534)\nos.setuid(65534)\n"
            f"lock = DeviceLock('cuda-GPU-shared', {str(directory)!r}, timeout=float(sys.argv[1]))\n"
            "try:\n    hold = lock.acquire('nobody test')\nexcept LockError as exc:\n    print('WAITED', exc)\nelse:\n"
            "    print('ACQUIRED', lock.holder())\n    lock.release(hold)\n"
        )

        def as_nobody(timeout):
            env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": "/tmp", "USER": "nobody", "LOGNAME": "nobody"}
            return subprocess.run(
                [sys.executable, "-c", child, str(timeout)], env=env, capture_output=True, text=True, timeout=60, cwd="/tmp"
            )

        try:
            waited = as_nobody(0.5)
        finally:
            lock.release(hold)
        assert "WAITED timed out after 0.5s" in waited.stdout, waited.stdout + waited.stderr
        assert "(user root)" in waited.stdout and "root's tests/test_amp.py::test_cifar" in waited.stdout
        took = as_nobody(5)
        assert took.stdout.startswith("ACQUIRED"), took.stdout + took.stderr
        assert "(user nobody)" in took.stdout and "PermissionError" not in took.stderr
        assert stat.S_IMODE(directory.stat().st_mode) == 0o1777
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_an_unwritable_lock_directory_is_refused_in_one_line(tmp_path, monkeypatch):
    directory = tmp_path / "locked"
    directory.mkdir(mode=0o755)
    monkeypatch.setattr(file_safety.os, "access", lambda path, mode: False)
    with pytest.raises(LockError, match="is not writable by this user.*chmod 1777 it, or set PYTEST_AMPGATE_LOCK_DIR"):
        check_lock_dir(directory)


def test_the_baseline_store_uses_the_shared_lock_policy(tmp_path, monkeypatch):
    from test_baselines import TEST_ID, make_baseline

    from pytest_ampgate.baselines import BaselineStore

    locks = tmp_path / "locks"
    store = BaselineStore(tmp_path / "baselines", lock_timeout=0.3)
    path = store.path_for(TEST_ID)
    store.stage(make_baseline())
    assert store.commit() == [path]
    assert not [p for p in (tmp_path / "baselines").rglob("*") if p.name.endswith((".lock", ".holder", ".tmp"))]
    lock_files = sorted(p.name for p in locks.iterdir())
    assert len(lock_files) == 2 and lock_files[0].startswith("baseline-") and lock_files[0].endswith(".holder")
    # held elsewhere: the timeout names the holder
    name = lock_files[1][: -len(".lock")]
    other = Lock(name, timeout=None, directory=locks)
    other.acquire("the other --ampgate-update")
    try:
        store.stage(make_baseline())
        with pytest.raises(Exception) as err:
            store.commit()
        assert "timed out after 0.3s" in str(err.value) and "the other --ampgate-update" in str(err.value)
    finally:
        other.release()
