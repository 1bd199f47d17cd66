"""This project's own AMP gate: the built-in workloads, judged against baselines/.

Skipped in a plain ``pytest`` run.  On a GPU machine, ``pytest --ampgate`` checks that AMP still
pays off and stays safe for both reference models; ``pytest --ampgate --ampgate-device cpu`` checks
their numerics and accuracy on the CPU.  Baselines for each environment measured live in
``baselines/tests/test_amp_gate.json``.
"""

import pytest


@pytest.mark.amp_regression
def test_mnist_mlp(ampgate_mnist):
    """The 784-128-64-10 MLP: a small, launch-bound model; see BENCHMARKS.md for what AMP does to it."""


@pytest.mark.amp_regression(min_speedup=1.3, max_memory_ratio=0.8)
def test_cifar_cnn(ampgate_cifar):
    """The two-conv CIFAR-10 CNN: the workload where AMP's benefit must be real on a tensor-core GPU."""
