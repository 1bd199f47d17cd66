"""The AMP gate on our own model: run with ``pytest --ampgate`` (skipped without the flag)."""

import pytest
import torch
from mymodel import ResidualMLP, make_data
from torch import nn

from pytest_ampgate import Workload


@pytest.mark.amp_regression(modes=["amp_fp16", "amp_bf16"], accuracy_tolerance=0.03)
def test_residual_mlp_amp(ampgate):
    # Sized so that AMP's benefit is real on a tensor-core GPU; a tenth of it on the CPU,
    # where only the numerics and accuracy are gated.
    on_gpu = ampgate.device.startswith("cuda")
    width, batch = (1024, 512) if on_gpu else (128, 64)
    result = ampgate.run(
        Workload(
            name="residual_mlp",
            model_factory=lambda: ResidualMLP(width=width),
            data=make_data(n_train=16 * batch, n_test=2048),
            loss_fn=nn.CrossEntropyLoss(),
            optimizer_factory=lambda params: torch.optim.AdamW(params, lr=1e-3),
            batch_size=batch,
        )
    )
    # The verdict fails this test by itself; asserts of your own can go further.
    assert result.mode("amp_bf16").accuracy > 0.5
