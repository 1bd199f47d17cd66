"""cuda:N: events, the busy probe, the slowdown plant and the noise window follow the requested device (fake
torch.cuda)."""

from __future__ import annotations

import os
import types

import torch
from fakes import FakeCuda, FakeNVML

from pytest_ampgate import delays
from pytest_ampgate.gpu_noise import open_noise_window
from pytest_ampgate.timing import CudaTimer


def test_events_and_the_probe_run_on_cuda_n(monkeypatch):
    fake = FakeCuda(monkeypatch)
    runner = types.SimpleNamespace(mode=types.SimpleNamespace(name="fp32"))
    timer = CudaTimer(torch.device("cuda:1"))
    timing, losses = timer.time(runner, lambda: [1, 2])
    assert fake.events == [1, 1] and timing.host_s >= 0 and losses == [1, 2]
    probe, _ = timer.busy(runner, lambda: [1], 1, 1e-4)
    assert fake.events[2:] == [1, 1] and fake.sleeps and all(d == 1 for d, _ in fake.sleeps) and probe is not None
    assert probe.busy_s >= 0 and probe.host_s >= 0
    assert fake.current == 0  # left as found


def test_the_slowdown_plant_sleeps_on_cuda_n_and_spins_the_host(monkeypatch):
    fake = FakeCuda(monkeypatch)
    spins = []
    monkeypatch.setattr(delays, "busy_wait", spins.append)
    delays.delay(torch.device("cuda:1"), 0.002)
    assert fake.sleeps == [(1, 2_000_000)] and spins == [0.002]


def test_the_noise_window_follows_cuda_n():
    nvml = FakeNVML()
    open_noise_window("cuda:3", pynvml=nvml, own_pids={os.getpid()}).close()
    assert nvml.handles == [3]
