"""Workloads: a model, its data, loss and optimizer, and a batch size, under one name.

The built-in ones are the two reference models the product rests on (an MNIST MLP and a two-conv
CIFAR-10 CNN).  A user's own workload fills in the same :class:`Workload` fields, so it goes
through exactly the same measurement engine.  A user's objects are checked before anything is
trained: its data here and in :mod:`pytest_ampgate.data`, its model and optimizer in
:mod:`pytest_ampgate.workload_checks`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from .builtin_data import load_cifar10, load_mnist
from .data import DeviceDataset, check_dataset, check_not_meta, from_tensors
from .errors import WorkloadError
from .metrics import (  # noqa: F401  (the metric layer; re-exported where users have always imported it)
    RESERVED_METRIC_NAMES,
    HeldOut,
    Metric,
    accuracy,
    accuracy_fit_problem,
    describe_output,
    metric_of,
    mse,
    perplexity,
    prediction_of,
    token_accuracy,
)

#: A dataset, a ``(train_x, train_y, test_x, test_y)`` tuple, or a callable called as
#: ``f(device=..., root=..., download=..., n_train=..., n_test=..., seed=...)``.
DataSource = DeviceDataset | tuple | Callable[..., DeviceDataset]


@dataclass(frozen=True)
class Workload:
    """Everything needed to train one model under any precision mode."""

    name: str
    model_factory: Callable[[], nn.Module]
    data: DataSource
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    optimizer_factory: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
    batch_size: int
    eval_batch_size: int = 2048
    description: str = ""
    data_options: dict = field(default_factory=dict)
    """Extra keyword arguments for a data callable (for example smaller synthetic sizes in tests)."""
    metric: Metric | None = None
    """How held-out quality is judged; None is classification accuracy (see :class:`Metric`)."""
    prediction: Callable[[Any], torch.Tensor] | None = None
    """Picks the prediction out of the model's output for every built-in metric; None: :func:`prediction_of`."""

    def with_options(self, **changes) -> Workload:
        """A copy with some fields changed, e.g. ``cifar_cnn().with_options(batch_size=32)``."""
        return replace(self, **changes)

    def dataset(self, device: str | torch.device, *, root=None, download: bool = False, seed: int = 0) -> DeviceDataset:
        """The workload's data, resident on ``device``."""
        source = self.data
        if isinstance(source, DeviceDataset):
            check_dataset(source, f"workload {self.name!r}: data")
            return source.to(device)
        if isinstance(source, tuple):
            if len(source) != 4:
                raise WorkloadError(
                    f"workload {self.name!r}: data as a tuple must be (train_x, train_y, test_x, test_y), got {len(source)} items"
                )
            check_not_meta(self.name, dict(zip(("train_x", "train_y", "test_x", "test_y"), source)))
            return from_tensors(self.name, *source, device=device)
        if callable(source):
            options = {"root": root, "download": download, "seed": seed, **self.data_options}
            result = source(device=device, **options)
            if not isinstance(result, DeviceDataset):
                raise WorkloadError(
                    f"workload {self.name!r}: its data callable returned {type(result).__name__}, expected a DeviceDataset "
                    "(build one with pytest_ampgate.data.from_tensors)"
                )
            return result
        raise WorkloadError(
            f"workload {self.name!r}: data must be a DeviceDataset, a (train_x, train_y, test_x, test_y) tuple "
            f"or a callable returning a DeviceDataset, got {type(source).__name__}"
        )


def mnist_mlp_model() -> nn.Module:
    """The reference MNIST model: 784-128-64-10 MLP, ReLU, log-softmax (paired with NLLLoss)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 128),
        nn.ReLU(),
        nn.Linear(128, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
        nn.LogSoftmax(dim=1),
    )


def cifar_cnn_model() -> nn.Module:
    """The reference CIFAR-10 CNN: two 3x3 convs (32, 64 channels) each with ReLU and 2x2 max-pool, then 4096-512-10."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 8 * 8, 512),
        nn.ReLU(),
        nn.Linear(512, 10),
    )


def _sgd(lr: float, momentum: float = 0.0):
    def factory(params):
        return torch.optim.SGD(params, lr=lr, momentum=momentum)

    factory.__qualname__ = f"SGD(lr={lr}, momentum={momentum})"
    return factory


# Default batch sizes are larger than the reference tutorials' (64 and 256): at those sizes an
# H100 spends most of a step launching kernels, and AMP cannot pay off on a launch-bound step.
# See BENCHMARKS.md for what was measured and what is still to be measured on a GPU.
MNIST_BATCH = 4096
CIFAR_BATCH = 1024


def mnist_mlp(batch_size: int = MNIST_BATCH) -> Workload:
    return Workload(
        name="mnist_mlp",
        model_factory=mnist_mlp_model,
        data=load_mnist,
        loss_fn=nn.NLLLoss(),
        optimizer_factory=_sgd(0.01),
        batch_size=batch_size,
        description="MNIST MLP 784-128-64-10, log-softmax + NLLLoss, SGD lr 0.01",
    )


def cifar_cnn(batch_size: int = CIFAR_BATCH) -> Workload:
    return Workload(
        name="cifar_cnn",
        model_factory=cifar_cnn_model,
        data=load_cifar10,
        loss_fn=nn.CrossEntropyLoss(),
        optimizer_factory=_sgd(0.01, momentum=0.9),
        batch_size=batch_size,
        description="CIFAR-10 CNN conv32-conv64-fc512-fc10, cross-entropy, SGD lr 0.01 momentum 0.9",
    )


BUILTIN: dict[str, Callable[[], Workload]] = {"mnist_mlp": mnist_mlp, "cifar_cnn": cifar_cnn}


def get_workload(name: str | Workload) -> Workload:
    """A built-in workload by name (or a Workload passed through)."""
    if isinstance(name, Workload):
        return name
    try:
        return BUILTIN[name]()
    except (KeyError, TypeError):
        raise WorkloadError(f"unknown workload {name!r}; built-in workloads: {', '.join(BUILTIN)}") from None
