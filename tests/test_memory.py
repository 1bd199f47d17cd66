"""Peak memory: what the figure covers, independent of mode order, AMP models dominated by their parameters, and a
memory pass independent of cuDNN autotuning."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from engine_helpers import tiny_workload
from fakes import as_if_on_cuda
from torch import nn

from pytest_ampgate.config import build_config
from pytest_ampgate.gate import evaluate
from pytest_ampgate.measurement import MeasureConfig, measure
from pytest_ampgate.verdict import PASS

# --- 2. peak memory, on the CPU too, independent of order ----------------------------------------------


def adamw_mlp():
    """Parameter- and optimizer-state-dominated: 2 x 512x512 weights, batch 8."""
    return tiny_workload(
        model=lambda: nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 2)),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
        features=64,
        batch=8,
    )


MEMORY = MeasureConfig(warmup_steps=1, rounds=2, steps_per_block=1, memory_steps=1, precision_coverage=False)


def test_cpu_peak_memory_is_measured_with_what_it_covers():
    m = measure(adamw_mlp(), ["amp_bf16"], device="cpu", config=MEMORY)
    for mm in (m.reference, m.modes["amp_bf16"]):
        parts = mm.memory
        params = sum(p.numel() * 4 for p in adamw_mlp().model_factory().parameters())
        assert parts["parameter_bytes"] == params and parts["optimizer_state_bytes"] >= 2 * params  # AdamW: two moments
        assert parts["gradient_bytes"] == params
        assert mm.peak_memory_bytes >= parts["parameter_bytes"] + parts["optimizer_state_bytes"] + parts["gradient_bytes"]
        assert 0 < mm.activation_memory_bytes < mm.peak_memory_bytes
        assert "optimizer state" in parts["covers"] and "activations" in parts["covers"]
    assert m.comparisons["amp_bf16"].memory_ratio is not None


def test_memory_ratio_does_not_depend_on_mode_order():
    forward = measure(adamw_mlp(), ["amp_bf16"], device="cpu", config=MEMORY)
    reversed_ = measure(adamw_mlp(), ["fp32"], device="cpu", config=MEMORY.__class__(**{**MEMORY.to_dict(), "reference_mode": "amp_bf16"}))
    ratio = forward.comparisons["amp_bf16"].memory_ratio
    again = 1 / reversed_.comparisons["fp32"].memory_ratio  # amp_bf16 set up first this time
    assert again == pytest.approx(ratio, rel=0.02)


def test_parameter_dominated_amp_model_passes_the_default_memory_limit():
    """AMP cannot shrink parameters, gradients or AdamW state: such models sit near 1.0x, and must not fail by default."""
    m = as_if_on_cuda(measure(adamw_mlp(), ["amp_bf16"], device="cpu", config=MEMORY))
    ratio = m.comparisons["amp_bf16"].memory_ratio
    assert 0.9 < ratio < 1.2
    memory = next(c for c in evaluate(m, build_config(("test", {"modes": ["amp_bf16"]}))).checks if c.metric == "memory")
    assert memory.outcome == PASS, memory.why
    assert "activations" in memory.why


# --- memory that two processes agree on (issue 20, point 6) ------------------------------------------------


def test_the_memory_pass_picks_convolution_algorithms_by_heuristics_and_restores_the_users_settings():
    """cuDNN's flags are process globals, readable on the CPU: what the step saw is what cuDNN would be told."""

    import torch
    from engine_helpers import TINY, tiny_workload

    from pytest_ampgate.measurement import measure

    seen = []

    class Recording(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))

        def forward(self, x):
            seen.append((torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic))
            return self.net(x)

    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, False
    try:
        measure(tiny_workload(model=Recording), ["amp_bf16"], device="cpu", config=dataclasses.replace(TINY, memory_steps=2))
        after = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, False
    assert (True, False) in seen, "warm-up and timed steps autotune"
    assert (False, True) in seen, "the memory pass must not reuse timed (autotuned) algorithm choices"
    assert after == (False, False), "the user's cuDNN settings are restored"
