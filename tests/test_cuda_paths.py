"""CUDA-only checks of the GPU verdicts: what the CPU tests prove with fakes, checked on a real GPU.

Every test skips without CUDA; ``benchmarks/gpu_acceptance.py`` runs this file first on a lent GPU.
"""

import os

import pytest
import torch

from pytest_ampgate import testing
from pytest_ampgate.gpu_noise import open_noise_window
from pytest_ampgate.measurement import MeasureConfig, measure
from pytest_ampgate.modes import MODES
from pytest_ampgate.precision_policy import numerics_policy
from pytest_ampgate.timing import launch_bound
from pytest_ampgate.workloads import cifar_cnn, mnist_mlp

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHORT = MeasureConfig(warmup_steps=6, rounds=4, steps_per_block=10, memory_steps=2)


def test_mnist_at_its_default_batch_gets_a_launch_bound_diagnosis():
    m = measure(mnist_mlp(), ["amp_bf16"], device="cuda", config=SHORT)
    bound = launch_bound(m.reference)
    assert bound is not None, "the probe could not tell (a host sync in the fp32 step?)"
    assert 0 < bound.busy_s <= bound.step_s * 1.05 and bound.host_s > 0
    print(bound.describe(), "bound" if bound.bound else "not bound")


def test_cifar_at_its_default_batch_is_not_launch_bound():
    m = measure(cifar_cnn(), ["amp_bf16"], device="cuda", config=SHORT)
    bound = launch_bound(m.reference)
    assert bound is not None and not bound.bound, bound and bound.describe()


def test_memory_ratio_is_order_independent_with_real_cublas_workspaces():
    config = SHORT
    forward = measure(mnist_mlp(), ["amp_fp16"], device="cuda", config=config)
    backward = measure(mnist_mlp(), ["fp32"], device="cuda", config=MeasureConfig(**{**config.to_dict(), "reference_mode": "amp_fp16"}))
    ratio = forward.comparisons["amp_fp16"].memory_ratio
    assert 1 / backward.comparisons["fp32"].memory_ratio == pytest.approx(ratio, rel=0.02)
    assert forward.reference.activation_memory_bytes > 0 and "requested" in forward.reference.memory["method"]


@pytest.mark.parametrize("name", list(MODES))
def test_legacy_tf32_readers_do_not_raise_under_any_mode(name):
    before = torch.get_float32_matmul_precision()
    with numerics_policy(name):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32  # noqa: B018  (must not raise)
    assert torch.get_float32_matmul_precision() == before


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_1_measures_on_cuda_1():
    m = measure(mnist_mlp(1024), ["amp_bf16"], device="cuda:1", config=SHORT)
    assert m.reference.ok and m.modes["amp_bf16"].ok and m.reference.peak_memory_bytes > 0
    assert torch.cuda.memory_allocated(1) >= 0 and m.device == "cuda:1"


def test_planted_slowdown_shows_on_a_launch_bound_step():
    workload = mnist_mlp()
    clean = measure(workload, ["amp_bf16"], device="cuda", config=SHORT).modes["amp_bf16"].step_time_s
    planted = testing.slow_down(workload, 0.5, modes=["amp_bf16"], device="cuda", calibration=SHORT)
    slowed = measure(planted, ["amp_bf16"], device="cuda", config=SHORT).modes["amp_bf16"].step_time_s
    assert slowed / clean - 1 == pytest.approx(0.5, abs=0.2)


def test_the_noise_window_reads_nvml_and_ignores_this_process():
    window = open_noise_window("cuda")
    torch.ones(1024, 1024, device="cuda").sum().item()
    result = window.close()
    if not result.available:
        pytest.skip(f"NVML not available here: {result.reason}")
    assert os.getpid() not in [p.pid for p in result.busy_processes]
