"""Workloads: a model, its data, loss and optimizer, and a batch size, under one name.

The built-in ones are the two reference models the product rests on (an MNIST MLP and a two-conv
CIFAR-10 CNN).  A user's own workload fills in the same :class:`Workload` fields, so it goes
through exactly the same measurement engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Union

import torch
from torch import nn

from . import data as data_mod
from .data import DeviceDataset
from .errors import WorkloadError

DataSource = Union[
    DeviceDataset,
    tuple,  # (train_x, train_y, test_x, test_y)
    Callable[..., DeviceDataset],  # called as f(device=..., root=..., download=..., n_train=..., n_test=..., seed=...)
]


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

    def with_options(self, **changes) -> "Workload":
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
            _check_not_meta(self.name, dict(zip(("train_x", "train_y", "test_x", "test_y"), source)))
            return data_mod.from_tensors(self.name, *source, device=device)
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


def _mnist_data(**kwargs) -> DeviceDataset:
    return data_mod.load_mnist(**kwargs)


def _cifar_data(**kwargs) -> DeviceDataset:
    return data_mod.load_cifar10(**kwargs)


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
        data=_mnist_data,
        loss_fn=nn.NLLLoss(),
        optimizer_factory=_sgd(0.01),
        batch_size=batch_size,
        description="MNIST MLP 784-128-64-10, log-softmax + NLLLoss, SGD lr 0.01",
    )


def cifar_cnn(batch_size: int = CIFAR_BATCH) -> Workload:
    return Workload(
        name="cifar_cnn",
        model_factory=cifar_cnn_model,
        data=_cifar_data,
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


# --- the user's objects, checked before anything is trained ------------------------------------------


def build_model(workload: Workload) -> nn.Module:
    """``workload.model_factory()``, checked: a WorkloadError naming the object and the fix, not a
    traceback from deep inside a mode's training step.  Also builds the optimizer once to check it."""
    name = workload.name
    if not callable(workload.model_factory):
        raise WorkloadError(
            f"workload {name!r}: model_factory must be a callable returning a torch.nn.Module, got "
            f"{type(workload.model_factory).__name__}; pass e.g. model_factory=MyNet or lambda: MyNet()"
        )
    if isinstance(workload.model_factory, nn.Module):  # callable, but calling it runs forward()
        raise WorkloadError(
            f"workload {name!r}: model_factory is a model instance ({type(workload.model_factory).__name__}), "
            "not a factory: every mode trains a fresh copy from the same start; pass "
            "model_factory=lambda: MyNet() (or the class itself)"
        )
    try:
        model = workload.model_factory()
    except WorkloadError:
        raise
    except Exception as exc:
        raise WorkloadError(f"workload {name!r}: model_factory() raised {type(exc).__name__}: {exc}") from exc
    validate_model(workload, model)
    validate_optimizer(workload, model)
    return model


def validate_model(workload: Workload, model) -> None:
    """A Module with parameters to train, holding real data (not on the meta device)."""
    name = workload.name
    if not isinstance(model, nn.Module):
        what = f"the class {model.__name__}" if isinstance(model, type) else type(model).__name__
        raise WorkloadError(
            f"workload {name!r}: model_factory returned {what}, not a torch.nn.Module instance; "
            "return a fresh model, e.g. model_factory=lambda: MyNet()"
        )
    params = list(model.parameters())
    if not params:
        raise WorkloadError(
            f"workload {name!r}: the model ({type(model).__name__}) has no parameters, so there is nothing to "
            "train and nothing for AMP to speed up; gate a model with trainable layers (nn.Linear, nn.Conv2d, ...)"
        )
    meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if meta:
        raise WorkloadError(
            f"workload {name!r}: the model has tensors on the meta device (no data), e.g. {meta[0]!r}; build it "
            "without device='meta', or materialise it (model.to_empty(device='cpu') and initialise its weights)"
        )
    if not any(p.requires_grad for p in params):
        raise WorkloadError(
            f"workload {name!r}: every parameter of the model is frozen (requires_grad=False), so no mode "
            "trains anything; unfreeze at least the layers the gate should train"
        )


def validate_optimizer(workload: Workload, model: nn.Module) -> None:
    """One torch Optimizer, over the parameters it is given, whose step() needs no closure."""
    import inspect

    name = workload.name
    if not callable(workload.optimizer_factory):
        raise WorkloadError(
            f"workload {name!r}: optimizer_factory must be a callable taking the model's parameters, got "
            f"{type(workload.optimizer_factory).__name__}; e.g. optimizer_factory=lambda params: torch.optim.SGD(params, lr=0.01)"
        )
    params = list(model.parameters())
    try:
        optimizer = workload.optimizer_factory(iter(params))
    except WorkloadError:
        raise
    except Exception as exc:
        raise WorkloadError(
            f"workload {name!r}: optimizer_factory(model.parameters()) raised {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise WorkloadError(
            f"workload {name!r}: optimizer_factory returned {type(optimizer).__name__}, not a "
            "torch.optim.Optimizer; return one optimizer built over the parameters it is given, "
            "e.g. lambda params: torch.optim.SGD(params, lr=0.01)"
        )
    try:
        closure = inspect.signature(optimizer.step).parameters.get("closure")
    except (TypeError, ValueError):
        closure = None
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise WorkloadError(
            f"workload {name!r}: {type(optimizer).__name__}.step() needs a closure that re-evaluates the loss, "
            "which a timed training step (one forward, backward and step, under GradScaler for fp16) cannot "
            "give; gate an optimizer whose step() takes no closure (SGD, Adam, AdamW, ...)"
        )
    given = {id(p) for p in params}
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not held & given:
        raise WorkloadError(
            f"workload {name!r}: optimizer_factory built a {type(optimizer).__name__} over other parameters "
            "than the ones it was given, so training would never change the model; build it over its argument"
        )


def check_dataset(dataset, where: str = "run(dataset=...)") -> None:
    """A dataset handed to ``run(dataset=...)`` is a DeviceDataset whose tensors hold data."""
    if dataset is None:
        return
    if not isinstance(dataset, DeviceDataset):
        raise WorkloadError(
            f"{where} takes a pytest_ampgate.data.DeviceDataset, got {type(dataset).__name__}; build one with "
            "pytest_ampgate.data.from_tensors(name, train_x, train_y, test_x, test_y), or give the workload "
            "its data with Workload(data=(train_x, train_y, test_x, test_y))"
        )
    _check_not_meta(dataset.name, {k: getattr(dataset, k) for k in ("train_x", "train_y", "test_x", "test_y")})


def _check_not_meta(name: str, tensors: dict) -> None:
    meta = [k for k, t in tensors.items() if isinstance(t, torch.Tensor) and t.is_meta]
    if meta:
        raise WorkloadError(
            f"dataset {name!r}: {', '.join(meta)} {'is' if len(meta) == 1 else 'are'} on the meta device (shapes "
            "only, no data); build the tensors on 'cpu' (or the GPU) with real values"
        )
