"""Per-device run sizes: what a run costs on the CPU, shared by ``measure()`` and the pytest face.

One source of truth, so ``measure("mnist_mlp", device="cpu")`` from a script and
``pytest --ampgate --ampgate-device cpu`` train the same steps on the same batches and reach the
same numbers.  GPU defaults live in :class:`~pytest_ampgate.config.MeasureConfig`.
"""

from __future__ import annotations

import contextlib

CPU_PROFILE = {"warmup_steps": 2, "rounds": 4, "steps_per_block": 20, "memory_steps": 1}
"""Protocol defaults on the CPU: enough steps for the numerics and accuracy to mean something (the
MNIST MLP reaches ~0.5, the CIFAR CNN ~0.85 on their CPU data), few enough for a CPU CI job; one
profiled step gives peak memory (reported, gated on CUDA only unless check_memory=True).  Timing is
not gated on the CPU, so rounds only need to exist, not to be many; see BENCHMARKS.md for what each
costs."""

CPU_WORKLOAD_SIZES = {
    "mnist_mlp": {"batch_size": 128, "data_options": {"n_train": 4096, "n_test": 1024}},
    "cifar_cnn": {"batch_size": 8, "data_options": {"n_train": 2048, "n_test": 256, "synthetic_noise": 5.0}},
}
"""Built-in workloads shrink on the CPU; their GPU batch sizes would take minutes per mode there.

The CIFAR CNN sees 8 x 103 samples on the CPU (its float16 convolutions are emulated there, and
dominate the run); at the stand-in's usual noise (8.0) it stays near chance after so few, which
would leave its accuracy and same-run checks blind, so its CPU stand-in is less noisy (5.0: about
0.84 after 103 steps, still short of the 1.000 at which an accuracy gate sees nothing).  Real
CIFAR-10 files (``--ampgate-data-root``) are used as they are."""

SLOW_ON_CPU = ("amp_fp16", "fp16", "fp16_master")
"""Modes that compute in float16: on a CPU without fp16 arithmetic they run many times slower than
fp32 (5-13x measured, BENCHMARKS.md); they are there for their numerics, not their speed."""


def default_measure_config(device_type: str):
    """The engine's protocol when the caller gives none: the CPU profile on the CPU, GPU defaults on CUDA."""
    from .config import MeasureConfig

    return MeasureConfig(**CPU_PROFILE) if device_type == "cpu" else MeasureConfig()


def sized_for(workload, device_type: str):
    """A built-in workload at its default (GPU) size gets its CPU size on the CPU; anything else is left alone."""
    from .workloads import BUILTIN

    if device_type != "cpu" or workload.name not in CPU_WORKLOAD_SIZES or workload.data_options:
        return workload
    default = BUILTIN[workload.name]()
    if workload.model_factory is not default.model_factory or workload.batch_size != default.batch_size:
        return workload
    return workload.with_options(**CPU_WORKLOAD_SIZES[workload.name])


CPU_THREADS = 1
"""Intra-op threads while measuring on the CPU.  One, because a CPU run's numbers must not depend on
the machine's core count: a float reduction split over 2 threads rounds differently from one over
1, small-batch training amplifies that, and the CPU baseline key (CPU model, torch version) does
not name a thread count (measured: the CPU profile's CIFAR CNN, amp_bf16, 0.879 with 2 threads,
0.855 with 1).  One thread is also what a shared CI machine can give without its other jobs
stalling every parallel region (BENCHMARKS.md, "CPU gate time")."""


@contextlib.contextmanager
def cpu_threads(device_type: str):
    """Run with CPU_THREADS intra-op threads on the CPU, restoring the caller's setting afterwards."""
    import torch

    if device_type != "cpu":
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(CPU_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
