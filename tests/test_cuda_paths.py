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
    # in a container NVML shows host PIDs: this process must still be recognised, or the window says why not
    assert result.identified_by in ("pid", "context", "memory") or result.cannot_tell, result
    assert not (result.cannot_tell and result.noisy), "a window that cannot tell is neither busy nor quiet"


LT_PROBE = """
import torch
from pytest_ampgate.memory import warm_libraries

device = torch.device("cuda")
warm_libraries(device)
torch.cuda.synchronize()
before = torch.cuda.memory_allocated(device)
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    x = torch.ones(256, 128, device=device, dtype=dtype, requires_grad=True)
    layer = torch.nn.Linear(128, 64, device=device, dtype=dtype)
    layer(x).sum().backward()
    del x, layer
torch.cuda.synchronize()
print(torch.cuda.memory_allocated(device) - before)
"""


def test_after_the_library_warm_up_a_first_linear_with_bias_allocates_no_workspace():
    """In a fresh process: cuBLASLt's workspace (on releases without the unified one) is already there."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", LT_PROBE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) == 0, "a library workspace was allocated after warm_libraries"


def test_the_memory_pass_gives_the_same_peak_in_two_processes_with_autotuning_on():
    """cuDNN's autotuner may pick different algorithms per process; the memory pass must not follow it."""
    import json
    import subprocess
    import sys

    probe = (
        "import json, torch\n"
        "from pytest_ampgate.measurement import MeasureConfig, measure\n"
        "from pytest_ampgate.workloads import cifar_cnn\n"
        "m = measure(cifar_cnn(), ['amp_bf16'], device='cuda', config=MeasureConfig(warmup_steps=6, rounds=2, steps_per_block=5, memory_steps=2))\n"
        "print(json.dumps({m.reference.mode: m.reference.peak_memory_bytes, **{k: v.peak_memory_bytes for k, v in m.modes.items()}}))\n"
    )
    peaks = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr[-2000:]
        peaks.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert peaks[0] == peaks[1]
