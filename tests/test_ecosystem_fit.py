"""Fitting the ecosystem, end to end on the CPU.

A plain run that imports no torch; pytest 9's native TOML table with typed values; misspelt keys
refused; defaults in --help; device and baseline locks on filelock in a shared directory (two OS
users, timeouts naming the holder, a bad lock directory); py-cpuinfo for the CPU name; JUnit XML
valid against the xunit2 schema; xdist grouping; cuda:auto; --benchmark-json into a new folder;
--ampgate-modes / --ampgate-only; pytest-html; the example workflow.
"""

import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from test_ecosystem import CPU, gated, imported_first, project  # noqa: F401  (imported_first: autouse)

from pytest_ampgate import file_safety
from pytest_ampgate.file_safety import Lock, LockError, check_lock_dir
from pytest_ampgate.gpu_lock import DeviceLock, pick_device

ROOT = Path(__file__).resolve().parents[1]
HTML = importlib.util.find_spec("pytest_html") is not None
MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
NATIVE_TOML = tuple(int(p) for p in pytest.__version__.split(".")[:2]) >= (9, 0)


@pytest.fixture(autouse=True)
def private_locks(monkeypatch, tmp_path):
    monkeypatch.setenv("PYTEST_AMPGATE_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


# --- 1. nothing when off ---------------------------------------------------------------------


PROBE = """
import atexit, sys

def _report():
    heavy = [m for m in ("torch", "numpy", "torchvision", "matplotlib", "cpuinfo") if m in sys.modules]
    print("HEAVY-MODULES:", ",".join(heavy) or "-", flush=True)

atexit.register(_report)  # after every hook of the session, the plugin's included
"""


def test_a_plain_run_imports_no_torch(pytester):
    pytester.makeconftest(PROBE)
    pytester.makepyfile(test_plain="def test_trivial():\n    assert 1 + 1 == 2\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    out = result.stdout.str()
    assert "ampgate-" in out  # the plugin was loaded (its entry point: "plugins: ... ampgate-0.1.0")
    assert "HEAVY-MODULES: -" in out, out


# --- 2. typed configuration ------------------------------------------------------------------


SHOW_CONFIG = """
def test_config(ampgate):
    c = ampgate.config
    print("CONFIG", c.min_speedup, c.confirm, list(c.modes), c.rounds, c.check_speed)
"""


@pytest.mark.skipif(not NATIVE_TOML, reason="pytest 9's native [tool.pytest] table")
def test_native_toml_takes_floats_booleans_and_lists(pytester):
    pytester.makepyprojecttoml(
        "[tool.pytest]\n"
        "ampgate_min_speedup = 1.3\n"
        "ampgate_confirm = false\n"
        "ampgate_check_speed = false\n"
        'ampgate_modes = ["amp_bf16", "fp16"]\n'
        "ampgate_rounds = 4\n"
    )
    pytester.makepyfile(test_cfg=SHOW_CONFIG)
    result = pytester.runpytest(*CPU, "-s")
    result.assert_outcomes(passed=1)
    assert "CONFIG 1.3 False ['amp_bf16', 'fp16'] 4 False" in result.stdout.str()
    # -o strings still work, and win over the file
    result = pytester.runpytest(
        *CPU, "-s", "-o", "ampgate_min_speedup=1.5", "-o", "ampgate_confirm=true", "-o", "ampgate_modes=amp_fp16,amp_bf16"
    )
    result.assert_outcomes(passed=1)
    assert "CONFIG 1.5 True ['amp_fp16', 'amp_bf16'] 4 False" in result.stdout.str()


def test_ini_file_strings_still_work(pytester):
    pytester.makeini("[pytest]\nampgate_min_speedup = 1.25\nampgate_confirm = no\nampgate_modes = amp_fp16, amp_bf16\n")
    pytester.makepyfile(test_cfg=SHOW_CONFIG)
    result = pytester.runpytest(*CPU, "-s")
    result.assert_outcomes(passed=1)
    from pytest_ampgate.profiles import CPU_PROFILE

    rounds = CPU_PROFILE["rounds"]  # rounds: the CPU profile's
    assert f"CONFIG 1.25 False ['amp_fp16', 'amp_bf16'] {rounds} None" in result.stdout.str()


@pytest.mark.skipif(not NATIVE_TOML, reason="pytest 9's native [tool.pytest] table")
@pytest.mark.parametrize(
    "line, words",
    [
        ('ampgate_min_speedup = "fast"', ["ini option ampgate_min_speedup", "min_speedup must be a number, got 'fast'"]),
        ("ampgate_rounds = 2.5", ["ini option ampgate_rounds", "rounds must be a whole number >= 1, got 2.5"]),
        ("ampgate_strict = 1", ["ini option ampgate_strict", "strict must be true or false, got 1"]),
        ("ampgate_min_speedup = -1.0", ["ampgate_min_speedup", "min_speedup must be > 0"]),
    ],
)
def test_a_native_toml_value_of_the_wrong_type_is_a_usage_error(pytester, line, words):
    pytester.makepyprojecttoml(f"[tool.pytest]\n{line}\n")
    pytester.makepyfile(test_cfg=SHOW_CONFIG)
    result = pytester.runpytest(*CPU)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert "INTERNALERROR" not in err + result.stdout.str()
    for word in words:
        assert word in err, err


def test_a_misspelt_key_is_a_usage_error_naming_the_nearest_key(pytester):
    pytester.makeini("[pytest]\nampgate_min_speedupp = 1.3\n")
    pytester.makepyfile(test_cfg="def test_x():\n    pass\n")
    result = pytester.runpytest("-p", "no:cacheprovider")  # even without --ampgate: it would silently do nothing
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unknown ini option ampgate_min_speedupp: did you mean ampgate_min_speedup?*"])


def test_help_shows_each_default(pytester):
    result = pytester.runpytest("--help")
    out = " ".join(result.stdout.str().split())
    number = "float" if tuple(int(p) for p in pytest.__version__.split(".")[:2]) >= (8, 4) else "string"  # see options._ini_type
    for text in (
        f"ampgate_min_speedup ({number}):",
        "(default: 1.2)",
        "ampgate_strict (bool):",
        "ampgate_modes (args):",
        "(default: amp_fp16 amp_bf16)",
        "--ampgate-lock-timeout=SECONDS",
        "Default: ini ampgate_lock_timeout, else 3600",
        "--ampgate-modes=MODES",
        "--ampgate-only",
    ):
        assert text in out, text


def test_modes_from_the_command_line_lose_to_the_marker_and_beat_the_ini(pytester):
    pytester.makeini("[pytest]\nampgate_modes = fp16\n")
    pytester.makepyfile(
        test_cfg=SHOW_CONFIG + "\n\n@pytest.mark.amp_regression(modes=['bf16'])\n"
        "def test_marked(ampgate):\n    print('MARKED', list(ampgate.config.modes))\n",
    )
    pytester.makeconftest("import pytest\n")
    (pytester.path / "test_cfg.py").write_text("import pytest\n" + (pytester.path / "test_cfg.py").read_text())
    result = pytester.runpytest(*CPU, "-s", "--ampgate-modes", "amp_bf16,amp_fp16")
    result.assert_outcomes(passed=2)
    out = result.stdout.str()
    assert "CONFIG 1.2 True ['amp_bf16', 'amp_fp16']" in out and "MARKED ['bf16']" in out
    bad = pytester.runpytest(*CPU, "--ampgate-modes", "amp_fp17")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["*--ampgate-modes*amp_fp17*"])


def test_ampgate_only_selects_marked_and_fixture_gated_tests(pytester):
    pytester.makepyfile(
        test_sel=(
            "import pytest\n\n"
            "@pytest.mark.amp_regression\ndef test_marked(ampgate):\n    pass\n\n"
            "def test_by_fixture(ampgate):\n    pass\n\n"
            "def test_plain():\n    pass\n"
        )
    )
    result = pytester.runpytest(*CPU, "--ampgate-only", "-v")
    result.assert_outcomes(passed=2, deselected=1)
    result.stdout.fnmatch_lines(["*test_marked PASSED*", "*test_by_fixture PASSED*"])
    # -m amp_regression misses the fixture-gated test; --ampgate-only alone turns the gate on
    result = pytester.runpytest("-p", "no:cacheprovider", "--ampgate-device", "cpu", "--ampgate-only")
    result.assert_outcomes(passed=2, deselected=1)


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


# --- 4. CPU names ----------------------------------------------------------------------------


def test_cpu_name_comes_from_py_cpuinfo_where_proc_cpuinfo_has_none(monkeypatch):
    import types

    from pytest_ampgate import env

    def no_proc(*args, **kwargs):
        raise OSError("no /proc here (macOS)")

    monkeypatch.setattr(env, "open", no_proc, raising=False)
    monkeypatch.setattr(env, "_CPUINFO_BRAND", [])
    monkeypatch.setitem(sys.modules, "cpuinfo", types.SimpleNamespace(get_cpu_info=lambda: {"brand_raw": "Apple  M2 Pro"}))
    assert env._cpu_model() == "Apple M2 Pro"  # not platform.processor()'s "arm"
    assert env._cpuinfo_brand() == "Apple M2 Pro"  # asked once, cached


def test_cpu_name_keeps_existing_keys_where_proc_cpuinfo_names_the_model():
    """On x86 Linux /proc/cpuinfo's model name is what py-cpuinfo reports too, so keys recorded
    before ('cpu|AMD EPYC|torch2.15' in baselines/) still match."""
    from pytest_ampgate import env

    proc = Path("/proc/cpuinfo")
    if not proc.exists() or "model name" not in proc.read_text(errors="replace"):
        pytest.skip("no model name in /proc/cpuinfo on this machine")
    cpuinfo = pytest.importorskip("cpuinfo")
    assert env._cpu_model() == " ".join(cpuinfo.get_cpu_info()["brand_raw"].split())


# --- 5. JUnit --------------------------------------------------------------------------------


def test_junit_xml_validates_against_the_default_xunit2_schema(pytester):
    xmlschema = pytest.importorskip("xmlschema")
    schema = xmlschema.XMLSchema(str(ROOT / "tests" / "schemas" / "xunit2.xsd"))
    pytester.makepyfile(test_user=project(gated("test_pass"), "def test_plain():\n    pass\n"))
    # One run for three outputs (7 and 9 below read theirs from it): the suite stays quick.
    args = ["--junitxml", "junit.xml", "--benchmark-json", "out/new/bench.json"]
    if HTML:
        args += ["--html", "report.html", "--self-contained-html"]
    result = pytester.runpytest(*CPU, *args)
    result.assert_outcomes(passed=2)
    schema.validate(str(pytester.path / "junit.xml"))  # per-test <properties> would fail here
    text = (pytester.path / "junit.xml").read_text()
    assert 'name="test_user.py::test_pass::ampgate_verdict" value="pass"' in text
    assert 'name="test_user.py::test_pass::ampgate_amp_bf16_speedup"' in text

    # 7. --benchmark-json into a folder that did not exist
    doc = json.loads((pytester.path / "out" / "new" / "bench.json").read_text())
    assert [b["extra_info"]["mode"] for b in doc["benchmarks"] if b["extra_info"].get("ampgate")] == ["fp32", "amp_bf16"]

    # 9. pytest-html: the verdict in the row, the per-mode table and the chart in the extras
    if HTML:
        page = (pytester.path / "report.html").read_text()
        assert "AMP verdict" in page and "col-ampgate" in page
        assert "pytest-ampgate" in page and "speedup [CI]" in page and "amp_bf16" in page
        if MATPLOTLIB:
            assert "ampgate chart" in page and "data:image/png;base64" in page

    # xunit1 allows per-test properties: there they stay on the test case
    result = pytester.runpytest(*CPU, "--junitxml", "junit1.xml", "-o", "junit_family=xunit1")
    result.assert_outcomes(passed=2)
    import xml.etree.ElementTree as ET

    case = next(c for c in ET.parse(pytester.path / "junit1.xml").getroot().iter("testcase") if c.get("name") == "test_pass")
    assert {p.get("name"): p.get("value") for p in case.iter("property")}["ampgate_verdict"] == "pass"


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
    import torch

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


# --- 10. examples ----------------------------------------------------------------------------


WORKFLOW = ROOT / "examples" / "github-actions" / "ampgate.yml"


def test_example_workflow_validates_against_the_github_workflow_schema():
    exe = shutil.which("check-jsonschema")
    if exe is None:
        pytest.skip("check-jsonschema is not installed (pip install -e '.[test]')")
    done = subprocess.run([exe, "--builtin-schema", "vendor.github-workflows", str(WORKFLOW)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_example_workflow_is_safe():
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load(WORKFLOW.read_text())
    assert doc["permissions"] == {"contents": "read"}
    job = doc["jobs"]["ampgate"]
    assert "self-hosted" in job["runs-on"]
    assert "github.event.pull_request.head.repo.full_name == github.repository" in job["if"]  # no fork PRs
    assert "inputs.update" in str(doc["concurrency"]["cancel-in-progress"])  # a baseline run is never cancelled
    assert "update" in doc["concurrency"]["group"]
    steps = {s.get("name", s.get("uses")): s for s in job["steps"]}
    python = next(s for s in job["steps"] if str(s.get("uses", "")).startswith("actions/setup-python"))
    assert tuple(int(p) for p in str(python["with"]["python-version"]).split(".")) >= (3, 10)
    gate = steps["AMP gate"]
    assert "refs/heads/main" in gate["env"]["HISTORY"] and "--benchmark-autosave" in gate["env"]["HISTORY"]
    assert "--benchmark-autosave" not in gate["run"] and " -n " not in gate["run"]
    # a runner whose torch cannot reach the GPU must not go green with every gated test skipped
    assert "--ampgate-strict" in gate["run"] and "torch.cuda.is_available()" in steps["GPU"]["run"]
    # a test waiting for the device lock gives up (naming the holder) before the job is killed
    lock_timeout = int(re.search(r"--ampgate-lock-timeout (\d+)", gate["run"])[1])
    assert 0 < lock_timeout < job["timeout-minutes"] * 60
    install = steps["Install"]["run"]
    assert '"$PYTEST_AMPGATE"' in install and "git+https://" in doc["env"]["PYTEST_AMPGATE"]


def test_example_project_declares_an_installable_pytest_ampgate():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: tomli, which pytest itself requires there
        import tomli as tomllib
    from packaging.requirements import Requirement

    project_toml = tomllib.loads((ROOT / "examples" / "user_project" / "pyproject.toml").read_text())
    assert project_toml["project"]["requires-python"] == ">=3.10"
    reqs = [Requirement(r) for r in project_toml["project"]["optional-dependencies"]["test"]]
    ampgate = next(r for r in reqs if r.name == "pytest-ampgate")
    assert {"plot", "html"} <= ampgate.extras
    own = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(ampgate.extras) <= set(own)
    readme = (ROOT / "examples" / "user_project" / "README.md").read_text()
    assert "git+https://" in readme and 'pip install -e "../..[plot,html]"' in readme
    yaml = pytest.importorskip("yaml")  # the workflow's requirement is a valid PEP 508 direct reference
    direct = Requirement(yaml.safe_load(WORKFLOW.read_text())["env"]["PYTEST_AMPGATE"])
    assert direct.name == "pytest-ampgate" and direct.url.startswith("git+https://") and {"plot", "html"} <= direct.extras
