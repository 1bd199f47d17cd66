"""The TF32 switches each mode pins: readable through the legacy API while every mode runs, restored afterwards."""

from __future__ import annotations

import torch
from engine_helpers import TINY, tiny_workload
from torch import nn

from pytest_ampgate import testing
from pytest_ampgate.measurement import measure

# --- 6. TF32 switches readable through the legacy API while every mode runs --------------------------


class ReadsLegacyFlags(nn.Module):
    def __init__(self, seen):
        super().__init__()
        self.layer, self.record = nn.Linear(8, 2), seen.append  # a builtin method: every mode's deep copy shares it

    def forward(self, x):
        self.record(
            (
                testing.running_mode(x, self),
                torch.backends.cuda.matmul.allow_tf32,
                torch.backends.cudnn.allow_tf32,
                torch.get_float32_matmul_precision(),
            )
        )
        return self.layer(x)


def test_legacy_tf32_readers_work_while_each_mode_runs_and_matmul_precision_is_restored():
    seen = []
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        m = measure(tiny_workload(model=lambda: ReadsLegacyFlags(seen)), ["amp_bf16", "bf16"], device="cpu", config=TINY)
        assert all(mm.ok for mm, _ in m.each_mode()), [mm.error for mm, _ in m.each_mode()]
        measured = seen[1:]  # seen[0] is the fit check on the user's model, before any mode runs
        assert seen[0][1:] == (True, True, "medium")
        assert {s[0] for s in measured} == {"fp32", "amp_bf16", "bf16"}
        assert all(s[1:] == (False, False, "highest") for s in measured), set(measured)
        assert torch.get_float32_matmul_precision() == "medium"  # "medium" stays "medium"
        assert torch.backends.cuda.matmul.allow_tf32 is True and torch.backends.cudnn.allow_tf32 is True
    finally:
        torch.set_float32_matmul_precision(before)
