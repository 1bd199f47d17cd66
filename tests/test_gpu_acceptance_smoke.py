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
        "identity",
        "strict, only an unsupported mode",
        "common-mode regressions vs each mode's baseline",
    }
    assert (
        "a slowdown and a memory growth common to every mode FAIL each mode's baseline | time: {'fp32': 'fail', 'amp_bf16': 'fail'}; "
        "memory: {'fp32': 'fail', 'amp_bf16': 'fail'} | yes" in summary
    )
    assert "--ampgate-strict with only an unsupported mode fails, naming why | exit 1 | yes" in summary
    assert "NVML tells this process apart (container: host PIDs) | not run: needs CUDA and NVML | reported" in summary
    assert "a plant of 3.0x the step" in summary, "the -n 2 plant says how it was sized"


def _acceptance_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_acceptance", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("clean", [0.8, 1.6, 2.4, 3.5])
def test_the_planted_slowdown_puts_the_speedup_at_half_the_floor_whatever_the_clean_speedup(clean):
    """A fixed 4x plant against a clean 2.4x speedup lands on the 0.6 floor: a coin flip.  Sized, never."""
    acceptance = _acceptance_module()
    fraction, why = acceptance.plant_for(clean)
    assert clean / (1 + fraction) <= acceptance.XDIST_FLOOR / 2 + 1e-9
    assert fraction >= 3.0 and f"clean speedup {clean:.2f}x" in why
    assert acceptance.plant_for(None) == (3.0, "clean speedup not measured: the default plant (3x the step) is used")


def test_steps_load_the_plugin_from_the_checkout_only_where_it_is_not_installed(monkeypatch):
    """An installed package has the pytest11 entry point; a second registration under another name fails in pluggy."""
    import importlib.metadata

    acceptance = _acceptance_module()
    assert acceptance.plugin_environment() == {}, "installed here: the entry point loads the plugin"
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: [])
    assert acceptance.plugin_environment() == {"PYTEST_PLUGINS": "pytest_ampgate.plugin"}


def test_a_step_that_runs_past_its_time_is_killed_with_everything_it_started(tmp_path):
    acceptance = _acceptance_module()
    marker = tmp_path / "grandchild.pid"
    child = (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(marker)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(60)\n"
    )
    step = acceptance.run("hangs", [sys.executable, "-c", child], timeout=5)
    assert step["rc"] == "timeout" and step["wall_s"] < 30
    grandchild = int(marker.read_text())
    import os
    import time

    for _ in range(50):  # the kill is asynchronous; the zombie is reaped by init
        try:
            with open(f"/proc/{grandchild}/stat") as fh:
                if fh.read().rpartition(")")[2].split()[0] == "Z":
                    break
        except FileNotFoundError:
            break
        time.sleep(0.1)
    else:
        os.kill(grandchild, 9)
        raise AssertionError("the step's grandchild survived the timeout")
