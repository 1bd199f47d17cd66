"""The run behind docs/ampgate-chart.png (a CPU run of the built-in MNIST MLP). From this folder:

    pytest --ampgate --ampgate-device cpu --ampgate-plot ../ampgate-chart.png

CPU speedups say nothing about GPUs; this run only shows what the chart draws.
"""

import pytest


# check_speed=True gates the speedup on the CPU too, so the chart shows floors being applied.
@pytest.mark.amp_regression(modes=["amp_bf16", "bf16", "amp_fp16"], check_speed=True, min_speedup=1.0)
def test_mnist_mlp(ampgate_mnist):
    pass


# The defaults: on the CPU the speedup is measured but not gated (the dashed floor).
@pytest.mark.amp_regression(modes=["amp_bf16"])
def test_mnist_mlp_default(ampgate_mnist):
    pass
