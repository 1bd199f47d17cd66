"""Every mode against its own stored baseline (issue 21, point 2): step time and peak memory.

The ratios to fp32 cannot see a regression that hits every mode alike; these checks can.  Timing
comes from a fake CUDA-like timer (the hardware boundary); memory from real CPU measurements.
"""

from __future__ import annotations

import itertools

from engine_helpers import tiny_workload
from fakes import FakeTimer, as_if_on_cuda
from session_helpers import CPU
from test_faults import _assert_clean
from test_launch_bound import DECISIVE

from pytest_ampgate.config import build_config
from pytest_ampgate.gate import baseline_from, decide, evaluate
from pytest_ampgate.measurement import measure
from pytest_ampgate.verdict import FAIL, INCONCLUSIVE, PASS

# (device time per step, host time per step, busy time per step): GPU-bound, AMP 1.3x faster
HEALTHY = {"fp32": (2.6e-3, 0.2e-3, 2.5e-3), "amp_bf16": (2.0e-3, 0.2e-3, 1.9e-3)}
COMMON_SLOWDOWN = {mode: (step * 2, host, busy * 2) for mode, (step, host, busy) in HEALTHY.items()}
"""Every mode twice as slow (a new sync in the shared loop): the speedup does not move."""


def _run(per_mode, timer_class=FakeTimer):
    return as_if_on_cuda(measure(tiny_workload(), ["amp_bf16"], device="cpu", config=DECISIVE, timer=timer_class(per_mode)))


def _judge(m, baseline_run, **settings):
    config = build_config(("test", {"modes": ["amp_bf16"], "missing_baseline": "ignore", "min_speedup": 1.0, **settings}))
    baseline = baseline_from(baseline_run, "t.py::t", "cuda|H100", {}) if baseline_run is not None else None
    return evaluate(m, config, baseline)


def _checks(verdict, metric):
    return {c.mode: c for c in verdict.checks if c.metric == metric}


def test_a_slowdown_common_to_every_mode_fails_against_each_modes_baseline_while_the_speedup_passes():
    verdict = _judge(_run(COMMON_SLOWDOWN), _run(HEALTHY))
    assert _checks(verdict, "speedup")["amp_bf16"].outcome == PASS, "the ratio cannot see it"
    step = _checks(verdict, "step_time")
    assert step["fp32"].outcome == FAIL and step["amp_bf16"].outcome == FAIL, verdict.explain()
    why = step["fp32"].why
    assert "fp32 step time 5.2 ms" in why and "limit 3.25 ms" in why and "baseline 2.6 ms" in why and "tol +25%" in why, why
    assert "pytest --ampgate --ampgate-update" in verdict.explain()


def test_a_healthy_run_passes_against_its_own_baseline():
    step = _checks(_judge(_run(HEALTHY), _run(HEALTHY)), "step_time")
    assert {m: c.outcome for m, c in step.items()} == {"fp32": PASS, "amp_bf16": PASS}


def test_the_step_time_gate_can_be_turned_off_for_shared_runners():
    verdict = _judge(_run(COMMON_SLOWDOWN), _run(HEALTHY), check_step_time=False)
    assert not _checks(verdict, "step_time")
    assert verdict.outcome != FAIL


def test_no_baseline_no_step_time_check_and_the_tolerance_is_a_setting():
    assert not _checks(_judge(_run(COMMON_SLOWDOWN), None), "step_time")
    relaxed = _checks(_judge(_run(COMMON_SLOWDOWN), _run(HEALTHY), step_time_tolerance=1.5), "step_time")
    assert relaxed["fp32"].outcome == PASS


class JitteryTimer(FakeTimer):
    """Block times that swing +-35% round to round: a shared machine.  The interval straddles any limit near the median."""

    swings = itertools.cycle([0.65, 1.35, 1.0, 0.7, 1.3, 1.0])

    def time(self, runner, run):
        timing, losses = super().time(runner, run)
        factor = next(self.swings)
        return type(timing)(timing.seconds * factor, timing.host_s), losses


def test_where_noise_decides_the_step_time_check_is_inconclusive_and_says_how_to_turn_it_off():
    slightly_slow = {mode: (step * 1.3, host, busy * 1.3) for mode, (step, host, busy) in HEALTHY.items()}
    step = _checks(_judge(_run(slightly_slow, JitteryTimer), _run(HEALTHY)), "step_time")
    assert step["fp32"].outcome == INCONCLUSIVE, step["fp32"].why
    assert "straddles limit" in step["fp32"].why and "check_step_time=False" in step["fp32"].why


def test_a_step_time_failure_is_confirmed_by_a_fresh_run_before_it_stands():
    config = build_config(("test", {"modes": ["amp_bf16"], "missing_baseline": "ignore", "min_speedup": 1.0}))
    baseline = baseline_from(_run(HEALTHY), "t.py::t", "cuda|H100", {})
    runs = iter([COMMON_SLOWDOWN, COMMON_SLOWDOWN, COMMON_SLOWDOWN, HEALTHY])
    _m, verdict = decide(lambda: _run(next(runs)), config, baseline)
    fp32 = _checks(verdict, "step_time")["fp32"]
    assert fp32.outcome == FAIL and "confirmed by a fresh run: 5.2 ms" in fp32.why, fp32.why
    _m, verdict = decide(lambda: _run(next(runs)), config, baseline)
    fp32 = _checks(verdict, "step_time")["fp32"]
    assert fp32.outcome == INCONCLUSIVE and "but a fresh run gave 2.6 ms (pass)" in fp32.why, fp32.why


GROWS_EVERY_MODE = """
import os

import pytest
import torch
from torch import nn

from pytest_ampgate import Workload

KEEP = os.environ.get("KEEP_ACTIVATION") == "1"


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(32, 2048), nn.Linear(2048, 2)
        self.kept = None

    def forward(self, x):
        h = torch.relu(self.up(x))
        if KEEP:  # the change under test: the hidden activation kept for logging (half the bytes under bf16)
            self.kept = h.detach().clone()
        return self.down(h)


def workload():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 32, generator=g)
    y = (x[:, 0] > 0).long()
    return Workload(name="grows", model_factory=Model, data=(x, y, x[:128], y[:128]),
                    loss_fn=nn.CrossEntropyLoss(), optimizer_factory=lambda p: torch.optim.SGD(p, lr=0.1), batch_size=64)


@pytest.mark.amp_regression(modes=["amp_bf16"], check_memory=True, max_memory_ratio=5.0, warmup_steps=1, rounds=2,
                            steps_per_block=2, memory_steps=1)
def test_model(ampgate):
    ampgate.run(workload())
"""


def test_a_memory_regression_that_raises_fp32s_peak_fails_against_the_baseline_though_the_ratio_improves(pytester, monkeypatch):
    pytester.makepyfile(test_grows=GROWS_EVERY_MODE)
    monkeypatch.setenv("KEEP_ACTIVATION", "0")
    pytester.runpytest(*CPU, "--ampgate-update").assert_outcomes(passed=1)
    monkeypatch.setenv("KEEP_ACTIVATION", "1")
    result = pytester.runpytest(*CPU, "-rf")
    result.assert_outcomes(failed=1)
    out = _assert_clean(result)
    assert "fp32 peak memory" in out and "limit" in out and "baseline" in out and "tol +5%" in out, out
    line = next(text for text in out.splitlines() if "fp32 peak memory" in text and "FAIL" in text.upper())
    assert "(+" in line, line
    ratio_line = next(text for text in out.splitlines() if "amp_bf16 peak memory" in text and "x fp32" in text)
    assert "<=" in ratio_line, "the ratio to fp32 passes: only the per-mode gate sees it"
