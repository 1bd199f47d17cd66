"""CPU peak memory counts what the profiled window allocated (issue 21, point 3).

Real CPU measurements: torch's profiler reports every CPU allocation and free with its address, so
these run the real thing; only ``window_peak``'s bookkeeping is also checked on hand-made events.
"""

from __future__ import annotations

import dataclasses

import torch
from engine_helpers import TINY, tiny_workload
from torch import nn

from pytest_ampgate import testing
from pytest_ampgate.measurement import measure
from pytest_ampgate.memory import window_peak

MEMORY = dataclasses.replace(TINY, memory_steps=1)
MiB = 2**20


def test_a_free_of_memory_allocated_before_the_window_does_not_lower_the_peak():
    events = [
        (1, -4 * MiB, 0xA),  # last step's tensor, freed now: not the window's
        (2, 1 * MiB, 0xB),
        (3, 2 * MiB, 0xC),
        (4, -1 * MiB, 0xB),  # the window's own: counts
        (5, 1 * MiB, 0xD),
    ]
    peak, _ = window_peak(events)
    assert peak == 3 * MiB
    peak_with_marks, at = window_peak(events, {"start": 2, "end": 4})
    assert peak_with_marks == 3 * MiB and at == {"start": 1 * MiB, "end": 2 * MiB}


def test_a_reused_address_is_the_new_allocation_once_the_old_one_was_freed_in_the_window():
    events = [(1, 2 * MiB, 0xA), (2, -2 * MiB, 0xA), (3, 3 * MiB, 0xA), (4, -3 * MiB, 0xA), (5, -3 * MiB, 0xA)]
    peak, _ = window_peak(events)
    assert peak == 3 * MiB, "the second free of 0xA frees nothing the window still owns"


def _peaks(workload, modes=("amp_bf16",)):
    m = measure(workload, list(modes), device="cpu", config=MEMORY)
    return {m.reference.mode: m.reference.peak_memory_bytes, **{k: v.peak_memory_bytes for k, v in m.modes.items()}}


def test_the_same_workload_measured_twice_gives_the_same_figure():
    assert _peaks(tiny_workload()) == _peaks(tiny_workload())


def test_a_planted_retained_activation_raises_the_peak_by_its_size():
    """The plant drops last step's tensor (allocated before the window) and allocates a new one inside it:
    counting that free as negative made the plant invisible on the CPU."""
    extra = 3 * MiB
    clean = _peaks(tiny_workload())
    planted = _peaks(testing.retain_activation(tiny_workload(), extra, modes=["amp_bf16"]))
    assert planted["fp32"] == clean["fp32"]
    assert extra <= planted["amp_bf16"] - clean["amp_bf16"] <= extra + 4096


class KeepsLastActivation(nn.Module):
    """A model change that keeps the hidden activation of the last forward (for logging, say): every mode grows."""

    def __init__(self, keep: bool):
        super().__init__()
        self.keep = keep
        self.up, self.down = nn.Linear(8, 4096), nn.Linear(4096, 2)
        self.last = None

    def forward(self, x):
        h = torch.relu(self.up(x))
        if self.keep:
            self.last = h.detach().clone()
        return self.down(h)


def test_an_activation_kept_between_steps_is_counted_in_every_mode():
    clean = _peaks(tiny_workload(model=lambda: KeepsLastActivation(False)))
    kept = _peaks(tiny_workload(model=lambda: KeepsLastActivation(True)))
    for mode in ("fp32", "amp_bf16"):
        assert kept[mode] > clean[mode], (mode, clean, kept)


def test_fp16_master_counts_its_float32_master_weights():
    m = measure(tiny_workload(), ["fp16_master"], device="cpu", config=MEMORY)
    fp32, master = m.reference.memory, m.modes["fp16_master"].memory
    assert master["master_weight_bytes"] == fp32["parameter_bytes"], "one float32 master per parameter"
    assert master["parameter_bytes"] == fp32["parameter_bytes"] // 2, "the model itself is float16"
    assert master["state_bytes"] >= master["parameter_bytes"] + master["master_weight_bytes"] + master["optimizer_state_bytes"]
    assert fp32["master_weight_bytes"] == 0
