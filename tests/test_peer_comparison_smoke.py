"""benchmarks/peer_comparison.py at its smallest size, and the parts its table depends on.

BENCHMARKS.md's side-by-side figures come from this script, so it must keep running end to end
(real pytest runs of both gates) and keep reading each gate's verdict correctly.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from pytest_benchmark.utils import PercentageRegressionCheck

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "peer_comparison.py"


@pytest.fixture(scope="module")
def peer():
    spec = importlib.util.spec_from_file_location("peer_comparison", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["peer_comparison"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("peer_comparison", None)


def test_peer_failure_line_is_read_from_pytest_benchmarks_own_message(peer):
    """The field that failed is parsed from the message pytest-benchmark itself builds."""
    message = PercentageRegressionCheck("median", 10).fails({"median": 1.2}, {"median": 1.0})
    assert message is not None
    assert peer.PEER_FAILED.findall(f"\ttest_peer (0001_base) - {message}") == ["median"]
    assert PercentageRegressionCheck("mean", 10).fails({"mean": 1.05}, {"mean": 1.0}) is None


def test_worst_rates_take_the_worst_baseline(peer):
    rows = [
        {"gate": "ampgate", "baseline": 0, "plant": 0.15, "outcome": "FAIL"},
        {"gate": "ampgate", "baseline": 0, "plant": 0.15, "outcome": "FAIL"},
        {"gate": "ampgate", "baseline": 1, "plant": 0.15, "outcome": "FAIL"},
        {"gate": "ampgate", "baseline": 1, "plant": 0.15, "outcome": "INCONCLUSIVE"},
        {"gate": "ampgate", "baseline": 0, "plant": 0.25, "outcome": "FAIL"},
        {"gate": "ampgate", "baseline": 1, "plant": 0.25, "outcome": "FAIL"},
        {"gate": "ampgate", "baseline": 0, "plant": 0.0, "outcome": "PASS"},
        {"gate": "ampgate", "baseline": 1, "plant": 0.0, "outcome": "FAIL"},
    ]
    rates = peer.worst_rates(rows, "ampgate")
    assert rates["+15% caught"] == "1/2 (all: 3/4)"
    assert rates["+15% INCONCLUSIVE"] == "1/2 (all: 1/4)"
    assert rates["+25% caught"] == "1/1 (all: 2/2)"
    assert rates["unchanged FAIL"] == "1/1 (all: 1/2)"
    # --ampgate-strict makes the same INCONCLUSIVE a failed build: derived from the same rows.
    strict = peer.worst_rates(rows, "ampgate strict")
    assert strict["+15% caught"] == "2/2 (all: 4/4)"
    assert strict["+15% INCONCLUSIVE"] == "0/2 (all: 0/4)"
    assert strict["unchanged FAIL"] == "1/1 (all: 1/2)"


def test_quick_run_judges_every_plant_with_both_gates(tmp_path):
    out = tmp_path / "peer.json"
    command = [sys.executable, str(SCRIPT), "--quick", "--recordings", "2", "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    for name in (
        "pytest-ampgate (check_speed=True)",
        "pytest-ampgate, --ampgate-strict (same runs)",
        "pytest-benchmark mean:10%",
        "pytest-benchmark median:10%",
    ):
        assert f"| {name} |" in done.stdout
    assert "### quiet" in done.stdout
    rows = json.loads(out.read_text())["rows"]
    judged = {(r["gate"], r["plant"]) for r in rows}
    assert judged == {(g, p) for g in ("ampgate", "mean:10%", "median:10%") for p in (0.0, 0.15, 0.25)}
    assert {r["outcome"] for r in rows if r["gate"] == "ampgate"} <= {"PASS", "FAIL", "INCONCLUSIVE"}
    # Two --ampgate-update runs, two processes: the baseline pools both, as read back from its file.
    assert {r["recordings"] for r in rows if r["gate"] == "ampgate"} == {2}
    assert {r["outcome"] for r in rows if r["gate"] != "ampgate"} <= {"PASS", "FAIL"}
