"""Every mode against its own stored baseline (issue 21, point 2): step time and peak memory.

The ratios to fp32 cannot see a regression that hits every mode alike; these checks can.  Timing
comes from a fake CUDA-like timer (the hardware boundary); memory from real CPU measurements.
"""

from __future__ import annotations

import itertools

from engine_helpers import tiny_workload
from fakes import FakeTimer, as_if_on_cuda
from session_helpers import CPU
from test_bad_input_and_faults import _assert_clean
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


# --- a baseline that knows how noisy it is (issue 21, point 1) ----------------------------------------


def _record(m, **settings):
    config = build_config(("test", {"modes": ["amp_bf16"], "missing_baseline": "ignore", "min_speedup": 0.5, **settings}))
    return evaluate(m, config, None, recording=True)


def test_recording_a_noisy_run_says_the_baseline_is_too_noisy_and_how_to_get_a_better_one():
    noise = _checks(_record(_run(HEALTHY, JitteryTimer)), "baseline_noise")
    assert set(noise) == {"fp32", "amp_bf16"}, noise
    why = noise["amp_bf16"].why
    assert noise["amp_bf16"].outcome == INCONCLUSIVE
    assert "baseline recorded from a noisy run" in why and "speedup interval is too wide" in why and "step time wanders" in why, why
    assert "record it again on a quiet machine" in why and "more rounds" in why, why


def test_recording_a_quiet_run_says_nothing_and_a_plain_run_never_judges_its_own_noise():
    assert not _checks(_record(_run(HEALTHY)), "baseline_noise")
    assert not _checks(_judge(_run(HEALTHY, JitteryTimer), None), "baseline_noise"), "only while recording"


def test_a_run_against_a_noisy_baseline_says_so_in_every_timing_check():
    noisy_baseline = _run(HEALTHY, JitteryTimer)
    verdict = _judge(_run(HEALTHY), noisy_baseline)
    speed = _checks(verdict, "speedup")["amp_bf16"]
    step = _checks(verdict, "step_time")["fp32"]
    for check in (speed, step):
        assert "the stored baseline is itself noisy" in check.why and "record it again on a quiet machine" in check.why, check.why
    assert "itself noisy" not in _checks(_judge(_run(HEALTHY), _run(HEALTHY)), "speedup")["amp_bf16"].why


def test_the_step_time_interval_is_stored_with_the_baseline_and_checked_when_read():
    from pytest_ampgate.baseline_schema import ModeBaseline
    from pytest_ampgate.errors import BaselineError

    stored = baseline_from(_run(HEALTHY, JitteryTimer), "t.py::t", "cuda|H100", {}).modes["fp32"]
    assert stored.step_time_low < stored.step_time_s < stored.step_time_high
    again = ModeBaseline.from_dict(stored.to_dict(), "f.json")
    assert (again.step_time_low, again.step_time_high) == (stored.step_time_low, stored.step_time_high)
    import pytest

    with pytest.raises(BaselineError, match=r"step_time_s 0.002 lies outside its own interval \[0.003, 0.004\]"):
        ModeBaseline.from_dict({"step_time_s": 0.002, "step_time_low": 0.003, "step_time_high": 0.004}, "f.json")


NOISY_PROJECT = """
import itertools
import time

import pytest
import torch
from torch import nn

from pytest_ampgate import Workload
from pytest_ampgate.delays import busy_wait

PAUSES = itertools.cycle([0.0, 0.004, 0.0, 0.0, 0.008, 0.001])


class Stuttering(nn.Module):
    '''A step that does extra CPU work now and then: noise the CPU clock (thread CPU time) sees, as cache and core contention is.'''

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))

    def forward(self, x):
        busy_wait(next(PAUSES))  # CPU work the step does now and then: the CPU clock is CPU time
        return self.net(x)


def workload():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = (x[:, 0] > 0).long()
    return Workload(name="stutter", model_factory=Stuttering, data=(x, y, x[:64], y[:64]), loss_fn=nn.CrossEntropyLoss(),
                    optimizer_factory=lambda p: torch.optim.SGD(p, lr=0.1), batch_size=32)


@pytest.mark.amp_regression(modes=["amp_bf16"], check_speed=True, min_speedup=0.01, rounds=6, steps_per_block=2, warmup_steps=1,
                            memory_steps=0, confirm=False)
def test_model(ampgate):
    ampgate.run(workload())
"""


def test_recording_under_heavy_noise_says_so_end_to_end_and_strict_refuses_to_record_it(pytester):
    pytester.makepyfile(test_noisy=NOISY_PROJECT)
    result = pytester.runpytest(*CPU, "--ampgate-update", "-rA")
    out = _assert_clean(result)
    assert "baseline recorded from a noisy run" in out and "record it again on a quiet machine" in out, out
    assert (pytester.path / "baselines" / "test_noisy.json").exists(), "recorded, with the warning"
    (pytester.path / "baselines" / "test_noisy.json").unlink()
    strict = pytester.runpytest(*CPU, "--ampgate-update", "--ampgate-strict")
    strict.assert_outcomes(failed=1)
    assert not (pytester.path / "baselines" / "test_noisy.json").exists(), "strict records no baseline it calls too noisy"
