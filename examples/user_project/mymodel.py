"""Stand-in for your own training code: a residual MLP classifier and a learnable synthetic task.

Nothing here knows about pytest-ampgate; the test in tests/ wraps it in a ``Workload``.
"""

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.ff = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):
        return x + self.ff(self.norm(x))


class ResidualMLP(nn.Module):
    def __init__(self, features: int = 64, width: int = 1024, depth: int = 4, classes: int = 10):
        super().__init__()
        self.embed = nn.Linear(features, width)
        self.blocks = nn.Sequential(*(Block(width) for _ in range(depth)))
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, classes))

    def forward(self, x):
        return self.head(self.blocks(self.embed(x)))


def make_data(n_train: int, n_test: int, features: int = 64, classes: int = 10, seed: int = 0):
    """Gaussian clusters, one per class: (train_x, train_y, test_x, test_y)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, features, generator=g) * 2
    y = torch.randint(0, classes, (n_train + n_test,), generator=g)
    x = centers[y] + torch.randn(n_train + n_test, features, generator=g)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]
