"""Tiny workloads, one per kind of built-in metric, for the same-run spread benchmark and the tests.

- ``tiny_lm``: a next-token model returning ``(N, T, V)`` logits (the usual language-model layout),
  labels ``(N, T)`` with the last position set to the ignore index; gated by ``perplexity()`` or
  ``token_accuracy()``.
- ``regression_head``: an MLP regressing targets in physical units (about 60 +/- 10), ``mse()``.
- ``tiny_classifier``: four Gaussian blobs, default accuracy.

``collapsed(workload)`` plants a quality collapse: under any low-precision mode the model's output
is zeroed, so no gradient reaches its weights and the mode stays where it started while fp32 learns.
"""

from __future__ import annotations

import torch
from torch import nn

from pytest_ampgate import Workload
from pytest_ampgate.workloads import mse, perplexity, token_accuracy

VOCAB, SEQ = 48, 12


def _lm_data(n: int, seed: int):
    """Sequences where the next token is (3 * token + 1) mod V, with 20% of tokens random."""
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n, SEQ + 1, dtype=torch.long)
    x[:, 0] = torch.randint(0, VOCAB, (n,), generator=g)
    for t in range(1, SEQ + 1):
        noise = torch.rand(n, generator=g) < 0.2
        x[:, t] = torch.where(noise, torch.randint(0, VOCAB, (n,), generator=g), (3 * x[:, t - 1] + 1) % VOCAB)
    inputs, labels = x[:, :-1].clone(), x[:, 1:].clone()
    labels[:, -1] = -100  # the ignore index: a position the metric must leave out
    return inputs, labels


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.body = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, VOCAB))

    def forward(self, x):
        return self.body(self.embed(x))  # (N, T, V)


def _lm_loss(logits, y):
    return nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)


def tiny_lm(metric: str = "perplexity", seed: int = 0) -> Workload:
    (a, b), (c, d) = _lm_data(1024, seed), _lm_data(256, seed + 1000)
    return Workload(
        name=f"tiny_lm_{metric}",
        model_factory=TinyLM,
        data=(a, b, c, d),
        loss_fn=_lm_loss,
        optimizer_factory=lambda p: torch.optim.Adam(p, lr=3e-3),
        batch_size=32,
        metric=perplexity() if metric == "perplexity" else token_accuracy(),
    )


def _regression_data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    w = torch.linspace(-1, 1, 8) * 6
    return x, 60 + x @ w + torch.randn(n, generator=g)  # physical units: about 60 +/- 10


class RegressionHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, x):
        return self.body(x).squeeze(-1)


def regression_head(seed: int = 0) -> Workload:
    (a, b), (c, d) = _regression_data(1024, seed), _regression_data(256, seed + 1000)
    return Workload(
        name="regression_head",
        model_factory=RegressionHead,
        data=(a, b, c, d),
        loss_fn=nn.MSELoss(),
        optimizer_factory=lambda p: torch.optim.Adam(p, lr=0.1),
        batch_size=32,
        metric=mse(),
    )


def _blobs(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, 16, generator=torch.Generator().manual_seed(123)) * 1.5
    y = torch.randint(0, 4, (n,), generator=g)
    return centers[y] + torch.randn(n, 16, generator=g), y


def tiny_classifier(seed: int = 0) -> Workload:
    (a, b), (c, d) = _blobs(1024, seed), _blobs(256, seed + 1000)
    return Workload(
        name="tiny_classifier",
        model_factory=lambda: nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)),
        data=(a, b, c, d),
        loss_fn=nn.CrossEntropyLoss(),
        optimizer_factory=lambda p: torch.optim.SGD(p, lr=0.05),
        batch_size=32,
    )


WORKLOADS = {
    "tiny_lm_perplexity": lambda seed: tiny_lm("perplexity", seed),
    "tiny_lm_token_accuracy": lambda seed: tiny_lm("token_accuracy", seed),
    "regression_head": regression_head,
    "tiny_classifier": tiny_classifier,
}


class _Collapsing(nn.Module):
    """Learns in fp32; under any low-precision mode its output is zeroed (the planted collapse)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        out = self.inner(x)
        low = (x.is_floating_point() and x.dtype != torch.float32) or torch.is_autocast_enabled("cpu")
        return out * 0 if low else out


def collapsed(workload: Workload) -> Workload:
    """The workload with a quality collapse planted in every low-precision mode."""
    factory = workload.model_factory
    return workload.with_options(name=f"{workload.name}_collapsed", model_factory=lambda: _Collapsing(factory()))
