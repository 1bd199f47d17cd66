"""benchmarks/gpu_acceptance.py in miniature on the CPU, so the one-command GPU run never rots."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_acceptance.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke run is the CPU's; a GPU runs the full version")
def test_smoke_run_on_the_cpu_passes_and_writes_its_summary(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--device", "cpu", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=1500,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "acceptance.json").read_text())
    assert all(result["passed"][name] for name, _value, required in result["checks"] if required), result["passed"]
    summary = (tmp_path / "acceptance.md").read_text()
    assert summary.startswith("# GPU acceptance (smoke, device cpu)") and "memory ratio spread" in summary
    assert "-n 2 planted slowdown FAILs (not INCONCLUSIVE) | fail | yes" in summary
    gate = result["own_gate"]
    assert gate["memory_order_ok"] and gate["device_s"] > 0 and gate["wall_over_device"] > 0
    assert {s["step"] for s in result["steps"]} >= {
        "cuda_tests",
        "own_gate forward",
        "own_gate reversed",
        "engine defaults",
        "engine sweep",
        "gate_quality reduced",
        "xdist -n 2 planted slowdown",
    }
