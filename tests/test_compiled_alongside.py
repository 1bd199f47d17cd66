"""Eager and compiled gated in the same test (``also_eager``), and the launch-bound statement saying what
compiling gained (one real tiny run on the CPU with the ``aot_eager`` backend, shared by the tests)."""

from __future__ import annotations

import dataclasses
import json

import pytest

torch = pytest.importorskip("torch")

from engine_helpers import TINY, tiny_workload  # noqa: E402
from fakes import as_if_on_cuda  # noqa: E402

from pytest_ampgate import compiled  # noqa: E402
from pytest_ampgate.config import build_config  # noqa: E402
from pytest_ampgate.errors import ConfigError  # noqa: E402

reason = compiled.unsupported_reason()
pytestmark = pytest.mark.skipif(reason is not None, reason=reason or "")

ROWS = ["fp32", "amp_bf16", "fp32+compiled", "amp_bf16+compiled"]


@pytest.fixture(scope="module")
def both():
    """fp32 and amp_bf16, each eager and compiled (aot_eager), in one measure() call."""
    from pytest_ampgate.measurement import measure

    config = dataclasses.replace(TINY, compile=compiled.CompileSpec("aot_eager"), also_eager=True)
    return measure(tiny_workload(), ["amp_bf16"], device="cpu", config=config, progress=False)


def test_each_mode_is_measured_eager_and_compiled_under_its_own_name(both):
    assert [both.reference.mode, *both.modes] == ROWS
    assert all(m.ok for m in both.modes.values()), {n: m.error for n, m in both.modes.items()}
    assert both.reference.compiled is None and both.modes["amp_bf16"].compiled is None
    for name in ("fp32+compiled", "amp_bf16+compiled"):
        figures = both.modes[name].compiled
        assert figures["backend"] == "aot_eager" and figures["compile_time_s"] > 0, figures
        assert figures["graph_breaks"] == 0 and figures["recompiles"] == 0 and figures["timed_recompiles"] == [], figures
        assert len(both.modes[name].step_times_s) == TINY.rounds
    # like with like: compiled AMP against compiled fp32; compiled fp32 against eager fp32 (what compiling gains)
    assert both.comparisons["amp_bf16"].reference == "fp32"
    assert both.comparisons["amp_bf16+compiled"].reference == "fp32+compiled"
    assert both.comparisons["fp32+compiled"].reference == "fp32"
    from pytest_ampgate.stats import round_ratios

    ref = both.modes["fp32+compiled"]
    against_compiled = round_ratios(ref.step_times_s, both.modes["amp_bf16+compiled"].step_times_s)
    assert sorted(both.comparisons["amp_bf16+compiled"].speedup.samples) == pytest.approx(sorted(against_compiled))
    assert both.reference_of("amp_bf16+compiled") is ref and both.reference_of("amp_bf16") is both.reference


def test_each_row_has_its_own_checks_baseline_entry_and_json_entry(both):
    from pytest_ampgate.gate import GateResult, baseline_from, evaluate
    from pytest_ampgate.outputs.json_report import test_record as json_record

    config = build_config(("test", {"modes": ["amp_bf16"], "compile": "aot_eager", "also_eager": True, "missing_baseline": "ignore"}))
    verdict = evaluate(both, config)
    assert {c.mode for c in verdict.checks if c.metric == "recompiles"} == {"fp32+compiled", "amp_bf16+compiled"}
    assert {c.mode for c in verdict.checks if c.metric == "same_run"} == {"amp_bf16", "fp32+compiled", "amp_bf16+compiled"}
    same_run = next(c for c in verdict.checks if c.metric == "same_run" and c.mode == "amp_bf16+compiled")
    assert "vs fp32+compiled" in same_run.why, same_run.why
    gain = next(c for c in verdict.checks if c.metric == "speedup" and c.mode == "fp32+compiled")
    assert "against eager fp32" in gain.why and "compiling's gain" in gain.why, gain.why

    baseline = baseline_from(both, "t.py::t", "cpu", {})
    assert list(baseline.modes) == ROWS
    assert baseline.modes["amp_bf16+compiled"].extra["compiled"]["graph_breaks"] == 0
    assert "compiled" not in baseline.modes["amp_bf16"].extra

    # the stored baseline gates the next run row by row: a compiled row that broke its graph fails, the eager rows do not
    broken = dataclasses.replace(both, modes=dict(both.modes))
    planted = dict(both.modes["amp_bf16+compiled"].compiled, graph_breaks=1, graph_break_reasons={"planted .item()": 1})
    broken.modes["amp_bf16+compiled"] = dataclasses.replace(both.modes["amp_bf16+compiled"], compiled=planted)
    failed = [c for c in evaluate(broken, config, baseline).checks if c.outcome == "fail"]
    assert [(c.mode, c.metric) for c in failed] == [("amp_bf16+compiled", "graph_breaks")], [c.why for c in failed]

    result = GateResult("t.py::t", "cpu", both, verdict, config=config)
    entry = json_record(result)
    text = json.dumps(entry)
    for name in ROWS:
        assert f'"{name}"' in text
    assert text.count('"compile_time_s"') >= 2


def test_launch_bound_statement_says_what_compiling_gained(both):
    """On CUDA (faked at the timing boundary: the probe's figures) the launch-bound statement names the measured gain."""
    from pytest_ampgate.gate import evaluate

    m = as_if_on_cuda(dataclasses.replace(both, modes=dict(both.modes)))
    step = m.reference.step_time_s
    m.reference = dataclasses.replace(m.reference, busy_step_s=step * 0.1, probe_host_step_s=step * 0.9)  # idle 90%: launch-bound
    config = build_config(("test", {"modes": ["amp_bf16"], "compile": "aot_eager", "also_eager": True, "missing_baseline": "ignore"}))
    speed = next(c for c in evaluate(m, config).checks if c.metric == "speedup" and c.mode == "amp_bf16")
    eager, comp = both.modes["amp_bf16"].step_time_s, both.modes["amp_bf16+compiled"].step_time_s
    assert "launch-bound" in speed.why and "measured: amp_bf16+compiled (aot_eager)" in speed.why, speed.why
    assert f"{eager / comp:.2f}x" in speed.why, speed.why
    assert "reduce-overhead (CUDA graphs) not measured" in speed.why, speed.why


def test_launch_bound_statement_without_a_compiled_run_says_how_to_measure_it(both):
    from pytest_ampgate.checks import remedy_measured

    eager_only = dataclasses.replace(both, modes={"amp_bf16": both.modes["amp_bf16"]})
    assert "set compile and also_eager=True" in remedy_measured(eager_only, "amp_bf16")
    on_cpu = remedy_measured(both, "amp_bf16")  # the same run as measured, on the CPU: no CUDA graphs to try
    assert on_cpu.startswith("measured: amp_bf16+compiled (aot_eager)") and "reduce-overhead needs CUDA graphs" in on_cpu, on_cpu


def test_reduce_overhead_off_cuda_says_it_measured_no_cuda_graphs():
    from pytest_ampgate.gate import evaluate
    from pytest_ampgate.measurement import measure

    config = dataclasses.replace(TINY, compile=compiled.parse_compile("compile", "aot_eager:reduce-overhead"))
    m = measure(tiny_workload(), ["amp_bf16"], device="cpu", config=config, progress=False)
    if "unexpected keyword argument 'mode'" in m.reference.error:  # torch 2.4: AotAutograd refuses a mode
        pytest.skip(f"torch {torch.__version__}'s aot_eager backend takes no compile mode (unexpected keyword argument 'mode')")
    assert "CUDA graphs need CUDA" in m.reference.compiled["note"], m.reference.compiled
    gate = build_config(("test", {"modes": ["amp_bf16"], "compile": "aot_eager:reduce-overhead", "missing_baseline": "ignore"}))
    line = next(c.why for c in evaluate(m, gate).checks if c.metric == "recompiles")
    assert "aot_eager:reduce-overhead: compiled in" in line and "not used on this device" in line, line


def _validate(report: dict) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    from pytest_ampgate.outputs.json_schema import SCHEMA

    jsonschema.validate(report, SCHEMA)


def test_outputs_show_compile_time_graph_breaks_and_recompiles(both):
    """The terminal/Markdown table, the HTML extras, the chart's rows and the JSON report show the compiled figures."""
    from pytest_ampgate.gate import GateResult, evaluate
    from pytest_ampgate.outputs import html
    from pytest_ampgate.outputs.chart import chart_rows
    from pytest_ampgate.outputs.json_report import build_report
    from pytest_ampgate.outputs.markdown import markdown_summary

    config = build_config(("test", {"modes": ["amp_bf16"], "compile": "aot_eager", "also_eager": True, "missing_baseline": "ignore"}))
    result = GateResult("t.py::t", "cpu", both, evaluate(both, config), config=config)
    seconds = f"{both.modes['amp_bf16+compiled'].compiled['compile_time_s']:.2f} s"
    md = markdown_summary([result])
    assert "| compiled | verdict |" in md, md
    row = next(line for line in md.splitlines() if "`t.py::t` | amp_bf16+compiled" in line)
    assert f"aot_eager, compiled in {seconds}, 0 graph breaks, 0 recompiles" in row, row
    assert "| eager |" in next(line for line in md.splitlines() if "`t.py::t` | amp_bf16 |" in line)
    assert "<th>compiled</th>" in html.mode_table([result]) and f"compiled in {seconds}" in html.mode_table([result])
    labels = {r.mode: r.compiled for r in chart_rows([result])}
    assert labels["amp_bf16+compiled"] == f"compile {seconds}, 0 breaks, 0 recompiles" and labels["amp_bf16"] == ""
    report = build_report([result])
    _validate(report)
    assert report["tests"][0]["modes"][3]["compiled"]["compile_time_s"] > 0


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"also_eager": True}, "also_eager=True .* needs compile set"),
        ({"also_eager": True, "compile": True, "world_size": 2}, "also_eager=True is not supported with world_size"),
        ({"also_eager": "sometimes"}, "also_eager"),
    ],
)
def test_bad_also_eager_settings_name_the_setting_and_the_fix(settings, match):
    with pytest.raises(ConfigError, match=match):
        build_config(("marker", settings))


def test_an_aa_control_cannot_be_compiled_alongside():
    from pytest_ampgate.measurement import measure

    config = dataclasses.replace(TINY, compile=compiled.CompileSpec("aot_eager"), also_eager=True)
    with pytest.raises(ConfigError, match="drop 'fp32' from modes or set also_eager=False"):
        measure(tiny_workload(), ["fp32"], device="cpu", config=config, progress=False)


def test_eager_and_compiled_gated_in_one_pytest_test(pytester, monkeypatch):
    """End to end: the ini switch, the verdict lines, the baseline and JSON rows; a planted break fails the compiled rows only."""
    from test_compiled import _PROJECT, CPU

    pytester.makepyfile(test_mlp=_PROJECT)
    args = (*CPU, "-rA", "-o", "ampgate_also_eager=true", "--ampgate-json", "out.json")
    monkeypatch.setenv("PLANT", "")
    clean = pytester.runpytest_subprocess(*args, "--ampgate-update")
    clean.assert_outcomes(passed=1)
    clean.stdout.fnmatch_lines(["*amp_bf16+compiled aot_eager: compiled in * s, 0 recompiles in the timed steps*"])
    stored = json.loads(next((pytester.path / "baselines").rglob("*.json")).read_text())
    assert '"amp_bf16+compiled"' in json.dumps(stored) and '"fp32+compiled"' in json.dumps(stored)
    report = json.loads((pytester.path / "out.json").read_text())
    _validate(report)
    modes = {m["mode"]: m for m in report["tests"][0]["modes"]}
    assert modes["amp_bf16+compiled"]["compared_with"] == "fp32+compiled" and modes["fp32+compiled"]["compared_with"] == "fp32"
    assert modes["amp_bf16+compiled"]["compiled"]["graph_breaks"] == 0 and modes["amp_bf16"]["compiled"] is None

    monkeypatch.setenv("PLANT", "break")
    broken = pytester.runpytest_subprocess(*args)
    broken.assert_outcomes(failed=1)
    broken.stdout.fnmatch_lines(["*amp_bf16+compiled: 1 graph break(s), the baseline had 0*item*"])
    failing = [line for line in broken.stdout.lines if "graph break(s), the baseline had" in line]
    assert failing and all("+compiled" in line for line in failing), failing
