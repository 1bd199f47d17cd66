"""One mode's exception fails that mode only, naming the phase; KeyboardInterrupt still stops the run."""

from __future__ import annotations

import pytest
from engine_helpers import TINY, tiny_workload
from torch import nn

from pytest_ampgate import testing
from pytest_ampgate.config import build_config
from pytest_ampgate.gate import evaluate
from pytest_ampgate.measurement import MeasureConfig, measure
from pytest_ampgate.verdict import FAIL

# --- 5. one mode's exception fails that mode only, naming the phase --------------------------------------


class RaisesIn(nn.Module):
    """Raises ``exc`` in ``mode`` once it has run ``after`` forwards in it (training or, with eval=True, evaluation)."""

    def __init__(self, mode, exc, after=0, eval_only=False):
        super().__init__()
        self.layer = nn.Linear(8, 2)
        self.mode, self.exc, self.after, self.eval_only, self.calls = mode, exc, after, eval_only, 0

    def forward(self, x):
        if testing.running_mode(x, self) == self.mode and (self.training != self.eval_only):
            self.calls += 1
            if self.calls > self.after:
                raise self.exc
        return self.layer(x)


@pytest.mark.parametrize(
    "after, eval_only, phase", [(0, False, "set-up"), (2, False, "warm-up"), (3, False, "timed round 1"), (0, True, "evaluation")]
)
def test_a_value_error_in_one_mode_fails_that_mode_and_names_the_phase(after, eval_only, phase):
    exc = ValueError("Attempting to unscale FP16 gradients.")
    config = MeasureConfig(warmup_steps=2, rounds=2, steps_per_block=1, memory_steps=0, precision_coverage=True)
    m = measure(tiny_workload(model=lambda: RaisesIn("amp_bf16", exc, after, eval_only)), ["amp_bf16", "bf16"], device="cpu", config=config)
    bad = m.modes["amp_bf16"]
    assert bad.failed_phase == phase and bad.error == "ValueError: Attempting to unscale FP16 gradients."
    assert m.reference.ok and m.reference.accuracy is not None and m.modes["bf16"].ok
    check = next(c for c in evaluate(m, build_config(("test", {"modes": ["amp_bf16", "bf16"]}))).checks if c.metric == "ran")
    assert check.outcome == FAIL and check.why.startswith(f"amp_bf16 failed in {phase}: ValueError")


def test_keyboard_interrupt_still_stops_the_run():
    model = lambda: RaisesIn("amp_bf16", KeyboardInterrupt(), after=1)  # noqa: E731
    with pytest.raises(KeyboardInterrupt):
        measure(tiny_workload(model=model), ["amp_bf16"], device="cpu", config=TINY)
