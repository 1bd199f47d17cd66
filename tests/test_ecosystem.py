"""The gate in the pytest ecosystem, through ``pytester``: the JSON report and its schema, JUnit
properties, the Markdown summary (and $GITHUB_STEP_SUMMARY), the chart, pytest-benchmark's JSON and
history, and pytest-xdist (gated tests serialised per device, results merged in the controller).

Every gated run trains for real on the CPU, on a tiny user workload.
"""

import json
import re
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch

from pytest_ampgate.gpu_lock import overlaps

CPU = ("--ampgate", "--ampgate-device", "cpu", "-p", "no:cacheprovider")
TINY = 'modes=["amp_bf16"], rounds=3, steps_per_block=3, warmup_steps=1, missing_baseline="ignore"'
FAILING = (
    TINY.replace("rounds=3", "rounds=6") + ", check_speed=True, min_speedup=1000.0, confirm=False"
)  # 6 rounds: enough for a decisive verdict

WORKLOAD = """
import os
import time

import pytest
import torch
from torch import nn

from pytest_ampgate import Workload


def workload():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = (x[:, 0] > 0).long()
    return Workload(
        name="tiny",
        model_factory=lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)),
        data=(x, y, x[:64], y[:64]),
        loss_fn=nn.CrossEntropyLoss(),
        optimizer_factory=lambda params: torch.optim.SGD(params, lr=0.1),
        batch_size=32,
    )
"""


def gated(name, marker=TINY, extra=""):
    return f"@pytest.mark.amp_regression({marker})\ndef {name}(ampgate):\n{extra}    ampgate.run(workload())\n"


def project(*bodies):
    return WORKLOAD + "\n\n" + "\n\n".join(bodies)


@pytest.fixture(scope="module", autouse=True)
def imported_first():
    """Import once, outside the in-process runs, what they import (pytester drops modules first
    imported during a run, and some of torch's and matplotlib's C extensions abort when imported twice)."""
    import importlib
    import pkgutil

    import jsonschema  # noqa: F401
    import matplotlib.backends.backend_agg
    import matplotlib.figure  # noqa: F401
    import pytest_benchmark.logger
    import pytest_benchmark.stats
    import pytest_benchmark.utils  # noqa: F401

    import pytest_ampgate
    from pytest_ampgate.measurement import MeasureConfig, measure
    from pytest_ampgate.workloads import mnist_mlp

    for info in pkgutil.iter_modules(pytest_ampgate.__path__):
        importlib.import_module(f"pytest_ampgate.{info.name}")
    tiny = mnist_mlp().with_options(batch_size=8, data_options={"n_train": 16, "n_test": 8})
    measure(tiny, ["amp_bf16"], device="cpu", config=MeasureConfig(warmup_steps=0, rounds=1, steps_per_block=1, memory_steps=0))


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """One thread (tiny models on a busy machine), private device locks, no real step summary."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # xdist workers
    monkeypatch.setenv("PYTEST_AMPGATE_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def two_tests(pytester):
    """A passing and a failing gated test, and a test that is not gated."""
    pytester.makepyfile(test_user=project(gated("test_pass"), gated("test_fail", FAILING), "def test_plain():\n    pass\n"))
    return pytester


# --- JSON report -----------------------------------------------------------------------------


def test_json_report_follows_its_schema_and_holds_every_test_mode_and_check(two_tests):
    import jsonschema

    from pytest_ampgate.outputs.json_schema import SCHEMA, SCHEMA_VERSION

    result = two_tests.runpytest(*CPU, "--ampgate-json", "out/report.json")
    result.assert_outcomes(passed=2, failed=1)
    report = json.loads((two_tests.path / "out" / "report.json").read_text())
    jsonschema.validate(report, SCHEMA)
    assert report["schema_version"] == SCHEMA_VERSION
    assert report["run"]["device"] == "cpu" and report["run"]["exit_status"] == 1
    assert report["summary"]["tests"] == 2 and report["summary"]["failed"] == 1
    assert report["summary"]["outcomes"]["fail"] == 1
    tests = {t["test_id"]: t for t in report["tests"]}
    assert set(tests) == {"test_user.py::test_pass", "test_user.py::test_fail"}
    env_key = tests["test_user.py::test_pass"]["env_key"]
    assert report["environments"][env_key]["device_type"] == "cpu"

    failing = tests["test_user.py::test_fail"]
    assert failing["outcome"] == "fail" and failing["failed"] and failing["config"]["min_speedup"] == 1000.0
    speed = [c for c in failing["checks"] if c["metric"] == "speedup"]
    assert speed == [dict(speed[0], mode="amp_bf16", outcome="fail", threshold=1000.0)]
    for test in tests.values():
        modes = {m["mode"]: m for m in test["modes"]}
        assert list(modes) == ["fp32", "amp_bf16"] and modes["fp32"]["role"] == "reference"
        rounds = test["config"]["rounds"]  # 3, or 6 for the failing test: enough rounds for a decisive verdict
        for m in modes.values():
            assert m["step_time"]["rounds"] == rounds and len(m["step_time"]["samples_s"]) == rounds
            assert m["step_time"]["min_s"] <= m["step_time"]["median_s"] <= m["step_time"]["max_s"]
            assert (
                m["steps"] == 1 + 1 + 1 + (1 + rounds) * 3 and m["nonfinite_steps"] == 0
            )  # + one profiled memory step and 0 <= m["accuracy"] <= 1
        s = modes["amp_bf16"]["speedup"]
        assert s["low"] <= s["median"] <= s["high"] and len(s["samples"]) == rounds
        assert {(c["mode"], c["metric"]) for c in test["checks"]} >= {("fp32", "finite_loss"), ("amp_bf16", "accuracy")}
        run = test["run"]
        assert run["requested_at"] <= run["acquired_at"] <= run["released_at"] and run["locked"]


def test_json_schema_rejects_a_report_that_breaks_it(two_tests):
    import jsonschema

    from pytest_ampgate.outputs.json_schema import SCHEMA

    two_tests.runpytest(*CPU, "--ampgate-json", "r.json", "-k", "test_pass")
    good = json.loads((two_tests.path / "r.json").read_text())
    jsonschema.validate(good, SCHEMA)
    for breakage in (
        lambda r: r.update(schema_version=99),
        lambda r: r["tests"][0].pop("checks"),
        lambda r: r["tests"][0]["modes"][0].update(outcome="maybe"),
        lambda r: r["tests"][0]["modes"][1]["speedup"].pop("low"),
    ):
        broken = json.loads(json.dumps(good))
        breakage(broken)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, SCHEMA)


def test_json_report_without_gated_results_says_why(pytester):
    pytester.makepyfile(test_user=project(gated("test_pass")))
    result = pytester.runpytest("-p", "no:cacheprovider", "--ampgate-json", "r.json")
    result.assert_outcomes(skipped=1)
    report = json.loads((pytester.path / "r.json").read_text())
    assert report["tests"] == [] and "--ampgate" in report["run"]["skip_reason"]


# --- JUnit XML -------------------------------------------------------------------------------


def test_junit_xml_carries_the_key_figures_as_properties(two_tests):
    result = two_tests.runpytest(*CPU, "--junitxml", "junit.xml", "--ampgate-json", "r.json")
    result.assert_outcomes(passed=2, failed=1)
    report = {t["test_id"]: t for t in json.loads((two_tests.path / "r.json").read_text())["tests"]}
    root = ET.parse(two_tests.path / "junit.xml").getroot()
    cases = {c.get("name"): c for c in root.iter("testcase")}
    assert not [p for case in cases.values() for p in case.iter("property")]  # xunit2 (the default) has no per-test properties
    suite = {p.get("name"): p.get("value") for p in root.find("testsuite").find("properties").iter("property")}
    props = {name: {k.rsplit("::", 1)[1]: v for k, v in suite.items() if k.startswith(f"test_user.py::{name}::")} for name in cases}
    assert props["test_plain"] == {}
    for name, outcome in (("test_pass", "pass"), ("test_fail", "fail")):
        p = props[name]
        modes = {m["mode"]: m for m in report[f"test_user.py::{name}"]["modes"]}
        assert p["ampgate_verdict"] == outcome and p["ampgate_device"] == "cpu" and p["ampgate_workload"] == "tiny"
        assert float(p["ampgate_amp_bf16_speedup"]) == pytest.approx(modes["amp_bf16"]["speedup"]["median"], rel=1e-3)
        assert float(p["ampgate_amp_bf16_speedup_low"]) <= float(p["ampgate_amp_bf16_speedup"]) <= float(p["ampgate_amp_bf16_speedup_high"])
        assert float(p["ampgate_fp32_step_time_ms"]) == pytest.approx(modes["fp32"]["step_time"]["median_s"] * 1e3, rel=1e-3)
        assert float(p["ampgate_amp_bf16_accuracy"]) == pytest.approx(modes["amp_bf16"]["accuracy"], rel=1e-3)
        assert float(p["ampgate_amp_bf16_memory_ratio"]) > 0  # measured on the CPU too (profiler allocation events)
    assert props["test_fail"]["ampgate_amp_bf16_outcome"] == "fail"


# --- Markdown summary ------------------------------------------------------------------------


def _table_rows(markdown):
    return [line for line in markdown.splitlines() if line.startswith("| `")]


def test_markdown_summary_to_a_path_and_to_github_step_summary(two_tests, monkeypatch):
    step = two_tests.path / "step_summary.md"
    step.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step))
    result = two_tests.runpytest(*CPU, "--ampgate-markdown", "summary.md")
    result.assert_outcomes(passed=2, failed=1)
    text = (two_tests.path / "summary.md").read_text()
    assert text.startswith("### AMP gate (pytest-ampgate): 1 fail, 1 pass")
    assert "| test | mode | step time | speedup [CI] |" in text
    rows = _table_rows(text)
    assert [r.split(" | ")[1] for r in rows] == ["fp32", "amp_bf16", "fp32", "amp_bf16"]
    assert [r.split(" | ")[1] for r in rows if "FAIL" in r] == ["amp_bf16"] and "CPU run" in text
    assert "- **FAIL** `test_user.py::test_fail`: amp_bf16 speedup" in text
    assert all(r.count(" | ") == 7 for r in rows)  # the env key's "|" is escaped, not a column
    assert step.read_text() == "earlier step\n" + text + "\n"  # appended, as GitHub expects


def test_markdown_summary_without_github_step_summary(two_tests):
    step = two_tests.path / "step_summary.md"
    result = two_tests.runpytest(*CPU, "--ampgate-markdown", "summary.md", "-k", "test_pass")
    result.assert_outcomes(passed=1, deselected=2)
    assert len(_table_rows((two_tests.path / "summary.md").read_text())) == 2
    assert not step.exists()


def test_github_step_summary_is_left_alone_without_ampgate(pytester, monkeypatch):
    step = pytester.path / "step_summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step))
    pytester.makepyfile(test_user=project(gated("test_pass")))
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(skipped=1)
    assert not step.exists()


# --- the chart -------------------------------------------------------------------------------


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_chart_is_a_png_with_a_row_per_test_and_mode(two_tests):
    import matplotlib.image

    result = two_tests.runpytest(*CPU, "--ampgate-plot", "charts/gate.png", "-k", "test_pass")
    result.assert_outcomes(passed=1, deselected=2)
    result.stdout.fnmatch_lines(["ampgate chart: *gate.png"])
    one = two_tests.path / "charts" / "gate.png"
    width, height_one = _png_size(one)
    pixels = matplotlib.image.imread(one)
    assert pixels.shape[:2] == (height_one, width) and pixels.std() > 0.05  # decodes, and is not blank

    two_tests.runpytest(*CPU, "--ampgate-plot", "charts/gate.png").assert_outcomes(passed=2, failed=1)
    assert _png_size(one)[1] > height_one  # one more row


def test_chart_rows_take_floors_from_the_checks_or_else_the_config():
    from pytest_ampgate.config import build_config
    from pytest_ampgate.gate import GateResult, evaluate
    from pytest_ampgate.measurement import MeasureConfig, measure
    from pytest_ampgate.outputs.chart import chart_rows
    from pytest_ampgate.workloads import mnist_mlp

    tiny = mnist_mlp().with_options(batch_size=16, data_options={"n_train": 64, "n_test": 32})
    m = measure(tiny, ["amp_bf16"], device="cpu", config=MeasureConfig(warmup_steps=1, rounds=6, steps_per_block=2, memory_steps=0))
    for settings, gated in (({"min_speedup": 1.5}, False), ({"min_speedup": 1000, "check_speed": True}, True)):
        config = build_config(("test", settings))
        [row] = chart_rows([GateResult("t.py::x", "env", m, evaluate(m, config), config=config.to_dict())])
        assert (row.floor, row.floor_gated) == ((1000.0, True) if gated else (1.5, False))
        assert row.speed_outcome == ("fail" if gated else "skipped") and row.low <= row.speedup <= row.high
        assert row.memory_ratio is None and row.memory_limit == 1.25 and not row.memory_gated
        assert "memory_steps=0" in row.memory_note


def test_missing_matplotlib_is_a_clear_usage_error(pytester, monkeypatch):
    pytester.makepyfile(test_user=project(gated("test_pass")))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    result = pytester.runpytest(*CPU, "--ampgate-plot", "c.png")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--ampgate-plot needs matplotlib*pip install 'pytest-ampgate[[]plot[]]'*"])
    assert not (pytester.path / "c.png").exists()


# --- pytest-benchmark ------------------------------------------------------------------------


def _ours(doc):
    return {b["fullname"]: b for b in doc["benchmarks"] if b["extra_info"].get("ampgate")}


def test_benchmark_json_holds_our_entries_with_stats_and_extra_info(two_tests):
    result = two_tests.runpytest(*CPU, "--benchmark-json", "bench.json", "--ampgate-json", "r.json")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["pytest-benchmark JSON: 4 AMP entries written to *bench.json"])
    doc = json.loads((two_tests.path / "bench.json").read_text())
    report = {t["test_id"]: t for t in json.loads((two_tests.path / "r.json").read_text())["tests"]}
    ours = _ours(doc)
    assert set(ours) == {f"test_user.py::{t}[{m}]" for t in ("test_pass", "test_fail") for m in ("fp32", "amp_bf16")}
    assert doc["machine_info"]["gpu"] is None and doc["machine_info"]["ampgate"]["device"] == "cpu"
    assert doc["commit_info"] is not None and "python_version" in doc["machine_info"]  # pytest-benchmark's own parts
    entry = ours["test_user.py::test_pass[amp_bf16]"]
    mode = {m["mode"]: m for m in report["test_user.py::test_pass"]["modes"]}["amp_bf16"]
    assert entry["group"] == "ampgate: test_user.py::test_pass" and entry["param"] == "amp_bf16"
    stats = entry["stats"]
    assert stats["rounds"] == 3 and stats["iterations"] == 3 and stats["data"] == mode["step_time"]["samples_s"]
    assert stats["median"] == pytest.approx(mode["step_time"]["median_s"]) and stats["ops"] == pytest.approx(1 / stats["mean"])
    extra = entry["extra_info"]
    assert extra["speedup"] == pytest.approx(mode["speedup"]["median"]) and extra["accuracy"] == mode["accuracy"]
    assert extra["speedup_low"] <= extra["speedup"] <= extra["speedup_high"]
    assert extra["peak_memory_bytes"] > 0 and extra["memory_ratio"] > 0  # the CPU measures memory too
    assert ours["test_user.py::test_fail[amp_bf16]"]["extra_info"]["outcome"] == "fail"


def test_benchmark_json_beside_real_benchmarks(pytester):
    pytester.makepyfile(test_user=project(gated("test_pass"), "def test_bench(benchmark):\n    benchmark(sum, range(10))\n"))
    result = pytester.runpytest(*CPU, "--benchmark-json", "bench.json", "--benchmark-min-rounds", "2", "--benchmark-max-time", "0.01")
    result.assert_outcomes(passed=2)
    doc = json.loads((pytester.path / "bench.json").read_text())
    assert [b["name"] for b in doc["benchmarks"] if not b["extra_info"].get("ampgate")] == ["test_bench"]
    assert set(_ours(doc)) == {"test_user.py::test_pass[fp32]", "test_user.py::test_pass[amp_bf16]"}
    assert doc["machine_info"]["ampgate"]["device"] == "cpu"


def test_benchmark_autosave_history_loads_in_pytest_benchmark_compare(pytester):
    pytester.makepyfile(test_user=project(gated("test_pass")))
    for _ in range(2):
        pytester.runpytest(*CPU, "--benchmark-autosave", "--benchmark-storage", "history").assert_outcomes(passed=1)
    saved = sorted((pytester.path / "history").rglob("*.json"))
    assert [p.name[:5] for p in saved] == ["0001_", "0002_"]
    compare = subprocess.run(
        [sys.executable, "-m", "pytest_benchmark", "--storage", "history", "compare", "--columns", "min,median,rounds,iterations"],
        cwd=pytester.path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert compare.returncode == 0, compare.stderr
    assert compare.stdout.count("test_pass[amp_bf16]") == 2 and compare.stdout.count("test_pass[fp32]") == 2
    assert "benchmark 'ampgate: test_user.py::test_pass': 4 tests" in compare.stdout


# --- progress --------------------------------------------------------------------------------


def test_progress_says_workload_mode_and_round_at_verbose_only(pytester):
    pytester.makepyfile(test_user=project(gated("test_pass")))
    quiet = pytester.runpytest(*CPU)
    quiet.assert_outcomes(passed=1)
    assert "[ampgate]" not in quiet.stdout.str()
    verbose = pytester.runpytest(*CPU, "-v")
    verbose.stdout.fnmatch_lines(
        [
            "*[[]ampgate[]] tiny: fp32: set-up, warm-up and memory pass",
            "*[[]ampgate[]] tiny: amp_bf16: set-up, warm-up and memory pass",
            "*[[]ampgate[]] tiny: timed round 1/3: fp32, amp_bf16",
            "*[[]ampgate[]] tiny: timed round 2/3: amp_bf16, fp32",
            "*[[]ampgate[]] tiny: timed round 3/3: fp32, amp_bf16",
        ]
    )


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


# --- examples/ -------------------------------------------------------------------------------

EXAMPLES = __import__("pathlib").Path(__file__).resolve().parent.parent / "examples"


def test_example_user_project_gates_its_own_model(pytester):
    import shutil

    shutil.copytree(EXAMPLES / "user_project", pytester.path, dirs_exist_ok=True)
    if tuple(int(p) for p in pytest.__version__.split(".")[:2]) < (9, 0):
        _as_ini_options(pytester.path / "pyproject.toml")
    quick = ("-o", "ampgate_rounds=1", "-o", "ampgate_steps_per_block=3", "-o", "ampgate_warmup_steps=3")
    result = pytester.runpytest(*CPU, *quick, "--ampgate-json", "r.json")
    result.assert_outcomes(passed=1)
    [test] = json.loads((pytester.path / "r.json").read_text())["tests"]
    assert test["test_id"] == "tests/test_amp_mymodel.py::test_residual_mlp_amp" and test["workload"] == "residual_mlp"
    assert [m["mode"] for m in test["modes"]] == ["fp32", "amp_fp16", "amp_bf16"]
    assert test["config"]["min_speedup"] == 1.3 and test["config"]["accuracy_tolerance"] == 0.03  # ini, then marker


def _as_ini_options(pyproject) -> None:
    """What the example's pyproject.toml tells a pytest < 9 user to do: its native ``[tool.pytest]``
    table (its last section) as ``[tool.pytest.ini_options]``, the numbers quoted."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: tomli, which pytest itself requires there
        import tomli as tomllib

    text = pyproject.read_text()
    table = tomllib.loads(text)["tool"]["pytest"]
    quoted = {key: value if isinstance(value, list) else str(value) for key, value in table.items()}
    head = text[: text.index("[tool.pytest]")]
    pyproject.write_text(head + "[tool.pytest.ini_options]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in quoted.items()))


def test_example_workflow_runs_the_gate_and_uploads_report_and_chart():
    import yaml

    workflow = yaml.safe_load((EXAMPLES / "github-actions" / "ampgate.yml").read_text())
    job = workflow["jobs"]["ampgate"]
    assert "self-hosted" in job["runs-on"] and "gpu" in job["runs-on"]
    script = "\n".join(step.get("run", "") for step in job["steps"])
    for flag in ("pytest --ampgate", "--ampgate-json ampgate/report.json", "--ampgate-plot ampgate/chart.png", "--junitxml"):
        assert flag in script
    upload = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact"))
    assert upload["with"]["path"] == "ampgate/" and upload["if"] == "always()"
