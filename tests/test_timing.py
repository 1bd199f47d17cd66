"""Timing hygiene: cyclic GC off inside timed blocks only, ABBA orders that balance every mode's position, the
dataset built once per process and device."""

from __future__ import annotations

import gc

import pytest
import torch
from engine_helpers import TINY, tiny_workload
from torch import nn

from pytest_ampgate import measurement as measure_mod
from pytest_ampgate.config import build_config
from pytest_ampgate.gate import decide
from pytest_ampgate.measurement import measure
from pytest_ampgate.stats import abba_order, balance_counts
from pytest_ampgate.workloads import Workload

# --- 8. timing hygiene and the gate's own cost ------------------------------------------------------------


class RecordsGC(nn.Module):
    def __init__(self, seen):
        super().__init__()
        self.layer, self.record = nn.Linear(8, 2), seen.append  # shared by every mode's deep copy

    def forward(self, x):
        self.record(gc.isenabled())
        return self.layer(x)


def test_cyclic_gc_is_off_inside_timed_blocks_only(monkeypatch):
    seen, in_block = [], []
    real = measure_mod.timed_block

    def spy(*args, **kwargs):
        start = len(seen)
        out = real(*args, **kwargs)
        in_block.extend(seen[start:])
        return out

    monkeypatch.setattr(measure_mod, "timed_block", spy)
    assert gc.isenabled()
    measure(tiny_workload(model=lambda: RecordsGC(seen)), ["amp_bf16"], device="cpu", config=TINY)
    assert in_block and not any(in_block)
    assert gc.isenabled()


@pytest.mark.parametrize("n", [3, 4])
def test_three_or_more_modes_are_equally_often_first_last_and_back_to_back(n):
    labels = list("ABCD")[:n]
    counts = balance_counts(abba_order(labels, 2 * n))
    assert len(set(counts.values())) == 1, counts
    assert counts["A"][0] == 2 and counts["A"][1] == 2


def test_the_dataset_is_built_once_per_process_and_device():
    calls = []

    def data(device, **options):
        calls.append(str(device))
        return tiny_workload().dataset(device)

    workload = Workload(
        "tiny_cached",
        lambda: nn.Sequential(nn.Linear(8, 2)),
        data,
        nn.CrossEntropyLoss(),
        lambda p: torch.optim.SGD(p, lr=0.1),
        batch_size=16,
    )
    config = build_config(
        (
            "test",
            {
                "modes": ["amp_bf16"],
                "check_speed": True,
                "min_speedup": 100.0,
                "rounds": 2,
                "steps_per_block": 1,
                "warmup_steps": 0,
                "memory_steps": 0,
                "missing_baseline": "ignore",
            },
        )
    )
    decide(lambda: measure(workload, ["amp_bf16"], device="cpu", config=config.measure_config()), config)  # measures, then confirms
    measure(workload, ["amp_bf16"], device="cpu", config=TINY)
    assert calls == ["cpu"]


def test_the_cpu_clock_is_the_threads_cpu_time_and_the_wall_clock_under_torch_distributed(tmp_path):
    """Other processes delay a CPU step without lengthening its CPU time; waiting for other ranks is a real cost."""
    import time

    import torch.distributed as dist

    from pytest_ampgate.delays import busy_wait
    from pytest_ampgate.timing import CpuTimer, cpu_clock

    assert cpu_clock() is time.thread_time
    timing, _ = CpuTimer().time(None, lambda: time.sleep(0.05) or [])  # off the CPU: costs it nothing
    assert timing.seconds < 0.02, timing
    timing, _ = CpuTimer().time(None, lambda: busy_wait(0.05) or [])  # on the CPU: counted
    assert timing.seconds >= 0.05, timing
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        assert cpu_clock() is time.perf_counter
        timing, _ = CpuTimer().time(None, lambda: time.sleep(0.05) or [])
        assert timing.seconds >= 0.05, timing
    finally:
        dist.destroy_process_group()
    assert cpu_clock() is time.thread_time
