"""What the engine-level tests share: a tiny workload and a short protocol that run in a fraction of a second on the CPU."""

from __future__ import annotations

import torch
from torch import nn

from pytest_ampgate.measurement import MeasureConfig
from pytest_ampgate.workloads import Workload

TINY = MeasureConfig(warmup_steps=2, rounds=4, steps_per_block=2, memory_steps=0, precision_coverage=False)


def tiny_workload(model=None, optimizer=None, n=128, features=8, batch=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, features, generator=g)
    y = (x[:, 0] > 0).long()
    return Workload(
        name="tiny",
        model_factory=model or (lambda: nn.Sequential(nn.Linear(features, 16), nn.ReLU(), nn.Linear(16, 2))),
        data=(x, y, x[:32], y[:32]),
        loss_fn=nn.CrossEntropyLoss(),
        optimizer_factory=optimizer or (lambda p: torch.optim.SGD(p, lr=0.1)),
        batch_size=batch,
    )
