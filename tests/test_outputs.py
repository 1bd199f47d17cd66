"""The outputs a gated run writes, end to end through pytester: the JSON report and its schema, JUnit properties
(valid xunit2), the Markdown summary and $GITHUB_STEP_SUMMARY, the chart, pytest-benchmark's JSON and history,
progress lines, and output paths (usage errors before measuring, one line for a late failure)."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from session_helpers import CPU, FAILING, HELPERS, HTML, MATPLOTLIB, ROOT, gated, imported_first, isolated, private_locks, project  # noqa: F401  (autouse fixtures)
from test_bad_input_and_faults import INTERNAL_FRAME, _assert_clean, _output, _quiet_and_isolated  # noqa: F401


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
    for settings, is_gated in (({"min_speedup": 1.5}, False), ({"min_speedup": 1000, "check_speed": True}, True)):
        config = build_config(("test", settings))
        [row] = chart_rows([GateResult("t.py::x", "env", m, evaluate(m, config), config=config.to_dict())])
        assert (row.floor, row.floor_gated) == ((1000.0, True) if is_gated else (1.5, False))
        assert row.speed_outcome == ("fail" if is_gated else "skipped") and row.low <= row.speedup <= row.high
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


# --------------------------------------------------------------------------------------------------
# 7. Output paths.
# --------------------------------------------------------------------------------------------------

PASSING_TEST = (
    HELPERS
    + """

@pytest.mark.amp_regression(**FAST)
def test_gated(ampgate):
    ampgate.run(tiny())
    marker = os.environ.get("TURN_INTO_DIRECTORY")
    if marker:
        os.makedirs(marker)
"""
)


def _bad_output(tmp: Path, name: str):
    (tmp / "afile").write_text("x")
    (tmp / "adir").mkdir()
    return {
        "json_is_directory": (("--ampgate-json", str(tmp / "adir")), {}, "--ampgate-json"),
        "markdown_under_a_file": (("--ampgate-markdown", str(tmp / "afile" / "summary.md")), {}, "is a file, not a directory"),
        "plot_is_directory": (("--ampgate-plot", str(tmp / "adir")), {}, "is a directory; give the path of a file"),
        "step_summary_missing_directory": ((), {"GITHUB_STEP_SUMMARY": str(tmp / "missing" / "summary.md")}, "$GITHUB_STEP_SUMMARY="),
    }[name]


@pytest.mark.parametrize("name", ["json_is_directory", "markdown_under_a_file", "plot_is_directory", "step_summary_missing_directory"])
def test_unwritable_output_path_is_a_usage_error_before_measuring(pytester, tmp_path, monkeypatch, name):
    args, env, message = _bad_output(tmp_path, name)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    pytester.makepyfile(test_out=PASSING_TEST)
    result = pytester.runpytest_subprocess(*CPU, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR, _output(result)
    out = _assert_clean(result)
    assert message in out and "ERROR:" in out, out
    assert "ampgate summary" not in out and not (pytester.path / "baselines").exists()


def test_output_that_fails_at_the_end_is_one_line_and_the_others_are_written(pytester, tmp_path):
    report = tmp_path / "out" / "report.json"
    markdown = tmp_path / "out" / "summary.md"
    pytester.makepyfile(test_out=PASSING_TEST)
    os.environ["TURN_INTO_DIRECTORY"] = str(report)  # the test body turns the JSON path into a directory
    try:
        result = pytester.runpytest_subprocess(*CPU, "--ampgate-json", str(report), "--ampgate-markdown", str(markdown))
    finally:
        del os.environ["TURN_INTO_DIRECTORY"]
    assert result.ret == pytest.ExitCode.OK, _output(result)
    out = _assert_clean(result)
    assert re.search(rf"ampgate JSON report NOT written to {re.escape(str(report))}: Is a directory", out), out
    assert markdown.read_text().strip(), "the Markdown summary is still written"
    assert not [p for p in report.parent.iterdir() if p.name.endswith(".tmp")], "no temp file left"
