"""benchmarks/gate_quality.py: it runs on the CPU in its reduced form and reports what it measured."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_ampgate.verdict import FAIL, INCONCLUSIVE, PASS, Check, Verdict

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gate_quality.py"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gate_quality") / "quality.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--quiet", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_quick_cpu_run_prints_the_table(quick_run):
    stdout, _ = quick_run
    assert "gate quality on" in stdout and "(cpu)" in stdout
    header = next(line for line in stdout.splitlines() if line.startswith("workload"))
    for column in ("scenario", "size", "runs", "FAIL", "INCONCL", "detected", "run-to-run cv", "CI width", "wall/run"):
        assert column in header
    rows = [line for line in stdout.splitlines() if line.startswith("mnist_mlp")]
    scenarios = " | ".join(rows)
    for name in (
        "A/A fp32 vs fp32",
        "unchanged vs baseline",
        "slowdown",
        "common slowdown",
        "common memory",
        "forced fp32 layer 1",
        "fp16 loss overflow",
        "loss scale collapse",
    ):
        assert name in scenarios, stdout
    assert "1x tol" in scenarios and "2x tol" in scenarios
    assert "targets (the worst over the baselines):" in stdout
    assert "fresh baseline(s), each pooled from 2 recording(s) in new processes" in stdout
    assert "fp32: 1.layer" in stdout  # the coverage check's message names the forced layer


def test_quick_cpu_run_figures(quick_run):
    _, data = quick_run
    by_name = {(s["scenario"], s["size_x_tolerance"]): s for s in data["scenarios"]}
    assert data["environment"]["device_type"] == "cpu"
    aa = by_name[("A/A fp32 vs fp32", None)]
    assert aa["runs"] == 3 and aa["fail_rate"] == 0.0
    assert aa["speedup_mean"] is not None and aa["ci_relative_width_median"] is not None
    for scenario in ("forced fp32 layer 1", "fp16 loss overflow", "loss scale collapse"):
        plant = by_name[(scenario, None)]
        assert plant["detection_rate"] == 1.0 and plant["other_fail_rate"] == 0.0, plant
    common = by_name[("common memory", 2.0)]  # deterministic on the CPU: every mode's own peak check fails
    assert common["detection_rate"] == 1.0, common
    assert [b["fp32"]["step_time_s"] > 0 for b in data["baselines"]["mnist_mlp"]] == [True], "one fresh baseline in --quick"
    (baseline,) = data["baselines"]["mnist_mlp"]
    assert len(baseline["recordings"]) == 2, "pooled from two recordings, each in a fresh process"
    pooled = baseline["pooled"]
    assert pooled.startswith("pooled with 1 earlier") or pooled.endswith("so this one starts afresh"), pooled  # or why not
    assert "1.layer" in by_name[("forced fp32 layer 1", None)]["example"]
    assert by_name[("slowdown", 2.0)]["runs"] == 2
    assert all(s["wall_s_median"] > 0 for s in data["scenarios"])
    assert any(t["target"].startswith("forced-fp32") and t["met"] for t in data["targets"])


def _load_script():
    module = sys.modules.get("gate_quality")
    if module is None:
        spec = importlib.util.spec_from_file_location("gate_quality", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["gate_quality"] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return module


class _M:
    comparisons: dict = {}


def test_tally_counts_detection_per_mode_and_other_failures():
    gq = _load_script()
    tally = gq.Tally("w", "slowdown", 1.0, [("amp_fp16", "speedup"), ("amp_bf16", "speedup")])
    both = Verdict([Check("amp_fp16", "speedup", FAIL, "a"), Check("amp_bf16", "speedup", FAIL, "b")])
    one = Verdict([Check("amp_fp16", "speedup", FAIL, "a"), Check("amp_bf16", "speedup", INCONCLUSIVE, "b")])
    other = Verdict([Check("fp32", "finite_loss", FAIL, "nan"), Check("amp_bf16", "speedup", PASS, "b")])
    for verdict in (both, one, other):
        tally.add(_M(), verdict, 1.0, ())
    s = tally.summary()
    assert (s["runs"], s["fail_rate"], s["detection_rate"], s["other_fail_rate"]) == (3, 1.0, 0.5, pytest.approx(1 / 3))
    assert s["example"] == "a"

    control = gq.Tally("w", "A/A fp32 vs fp32")
    control.add(_M(), Verdict([Check("fp32", "speedup", INCONCLUSIVE, "x")]), 0.5, ())
    rows = gq.targets([control], None)
    aa_fail = next(r for r in rows if r[0].startswith("A/A and unchanged: FAIL"))
    aa_inconclusive = next(r for r in rows if "INCONCLUSIVE" in r[0])
    assert aa_fail[3] is True and aa_inconclusive[3] is False  # 0 FAILs, but 100% inconclusive
    assert next(r for r in rows if r[0].startswith("default gate"))[3] is None  # not measured on the CPU
