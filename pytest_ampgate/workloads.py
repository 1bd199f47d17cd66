"""Workloads: a model, its data, loss and optimizer, and a batch size, under one name.

The built-in ones are the two reference models the product rests on (an MNIST MLP and a two-conv
CIFAR-10 CNN).  A user's own workload fills in the same :class:`Workload` fields, so it goes
through exactly the same measurement engine.  A user's objects are checked before anything is
trained, in :mod:`pytest_ampgate.workload_checks`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from .builtin_data import load_cifar10, load_mnist
from .data import DeviceDataset, from_tensors
from .errors import WorkloadError
from .workload_checks import check_dataset, check_not_meta

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
    """Picks the prediction out of the model's output for accuracy; None: :func:`prediction_of`."""

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


# --- outputs and metrics ----------------------------------------------------------------------


def prediction_of(output: Any) -> torch.Tensor:
    """The prediction in a model's output: the tensor itself, the first element of a tuple or list,
    the ``logits`` of a dict or a Hugging Face style ``ModelOutput`` (or its only tensor).

    The loss always receives the output as the model returned it; only accuracy needs this.
    """
    if torch.is_tensor(output):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if torch.is_tensor(logits):
        return logits
    if isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
        return output[0]
    if isinstance(output, Mapping):
        tensors = [k for k, v in output.items() if torch.is_tensor(v)]
        if len(tensors) == 1:
            return output[tensors[0]]
        raise WorkloadError(
            f"the model returned a {type(output).__name__} with keys {list(output)} and no 'logits'; "
            "name the prediction 'logits', or give the Workload prediction=lambda out: out['<key>']"
        )
    raise WorkloadError(
        f"cannot find the prediction in a model output of type {type(output).__name__}: expected a tensor, "
        "a tuple or list (first element), a dict or ModelOutput with 'logits'; "
        "or give the Workload prediction=<function of the output>"
    )


def describe_output(output: Any) -> str:
    """The output's structure with shapes, for error messages: ``tuple(Tensor(32, 10), Tensor(32,))``."""
    if torch.is_tensor(output):
        return f"Tensor{tuple(output.shape)} {str(output.dtype).replace('torch.', '')}"
    if isinstance(output, Mapping):
        return f"{type(output).__name__}(" + ", ".join(f"{k}={describe_output(v)}" for k, v in output.items()) + ")"
    if isinstance(output, (tuple, list)):
        return f"{type(output).__name__}(" + ", ".join(describe_output(v) for v in output) + ")"
    return type(output).__name__


RESERVED_METRIC_NAMES = frozenset(
    (
        "speedup",
        "speedup_low",
        "speedup_high",
        "memory_ratio",
        "step_time_s",
        "peak_memory_bytes",
        "final_loss",
        "low_precision_share",
        "extra",
        "memory",
        "finite_loss",
        "skipped_steps",
        "loss_scale",
        "precision_coverage",
        "supported",
        "ran",
        "same_run",
        "same_run_loss",
        "metric",
    )
)
"""Names a custom metric may not take: they are baseline fields or check names already."""


@dataclass(frozen=True)
class Metric:
    """A held-out quality measure: ``fn(model, batches) -> float`` with a name and a direction.

    ``fn`` is called once per mode after training, under ``torch.no_grad()``, with the model in
    eval mode and inside the mode's precision (its autocast; inputs already cast to the mode's
    dtype), so ``model(x)`` computes as that mode does.  ``batches`` yields the held-out
    ``(x, y)`` pairs.  The result is stored, gated and reported under ``name``.

    ``tolerance`` (against the stored baseline) and ``same_run_tolerance`` (against fp32 in the
    same run) are in the metric's own units; None takes the gate's ``accuracy_tolerance`` and
    ``same_run_tolerance`` settings, which suit metrics on accuracy's 0-1 scale.
    """

    name: str
    fn: Callable[[nn.Module, Iterable[tuple[torch.Tensor, torch.Tensor]]], float]
    higher_is_better: bool = True
    tolerance: float | None = None
    same_run_tolerance: float | None = None
    bounds: tuple[float | None, float | None] = (None, None)
    """Values outside these are refused as a broken metric (accuracy: (0, 1))."""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise WorkloadError(f"Metric name must be an identifier such as 'mse' or 'perplexity', got {self.name!r}")
        if self.name in RESERVED_METRIC_NAMES:
            raise WorkloadError(f"Metric name {self.name!r} is taken by a figure of the gate; choose another")
        if not callable(self.fn):
            raise WorkloadError(f"Metric {self.name!r}: fn must be callable as fn(model, batches), got {type(self.fn).__name__}")
        if not isinstance(self.higher_is_better, bool):
            raise WorkloadError(f"Metric {self.name!r}: higher_is_better must be True or False, got {self.higher_is_better!r}")
        for what in ("tolerance", "same_run_tolerance"):
            value = getattr(self, what)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or not math.isfinite(value)
            ):
                raise WorkloadError(f"Metric {self.name!r}: {what} must be a finite number >= 0, got {value!r}")

    @property
    def direction(self) -> str:
        return "higher is better" if self.higher_is_better else "lower is better"

    def check_value(self, value: Any, workload: str) -> float:
        """The metric's result as a float, or a WorkloadError saying why it is not one number in bounds."""
        if torch.is_tensor(value):
            if value.numel() != 1:
                raise WorkloadError(
                    f"workload {workload!r}: metric {self.name!r} returned a tensor of shape {tuple(value.shape)}; it must return one number"
                )
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise WorkloadError(f"workload {workload!r}: metric {self.name!r} returned {type(value).__name__}; it must return one number")
        value = float(value)
        low, high = self.bounds
        if math.isfinite(value) and ((low is not None and value < low) or (high is not None and value > high)):
            raise WorkloadError(f"workload {workload!r}: metric {self.name!r} returned {value:g}, outside its bounds [{low}, {high}]")
        return value


def _accuracy_fn(prediction: Callable[[Any], torch.Tensor] | None = None):
    pick = prediction or prediction_of

    def accuracy(model: nn.Module, batches) -> float:
        correct, total = None, 0
        for x, y in batches:
            pred = pick(model(x))
            hits = (pred.argmax(dim=1) == y).sum()
            correct = hits if correct is None else correct + hits
            total += y.numel()
        return float(correct.item()) / total if total else float("nan")

    return accuracy


def accuracy(prediction: Callable[[Any], torch.Tensor] | None = None) -> Metric:
    """Classification accuracy (the default): share of held-out samples whose top class is the label."""
    return Metric("accuracy", _accuracy_fn(prediction), higher_is_better=True, bounds=(0.0, 1.0))


def accuracy_fit_problem(pred: Any, y: torch.Tensor) -> str | None:
    """Why class scores ``pred`` cannot be scored against labels ``y`` by accuracy, or None when they can.

    Found before training: a single logit (N, 1) would make accuracy the share of class 0, and
    (N, C, 1) against (N,) would broadcast into an "accuracy" far above 1.
    """
    if not torch.is_tensor(pred):
        return f"the prediction is a {type(pred).__name__}, not a tensor of class scores"
    if y.is_floating_point():
        return (
            f"the targets are floating {tuple(y.shape)} (regression or soft labels) and accuracy needs integer "
            "class labels; give the Workload a metric (e.g. pytest_ampgate.workloads.mse()), or use y.argmax(1) for one-hot labels"
        )
    if pred.dim() < 2 or pred.shape[0] != y.shape[0]:
        return f"accuracy needs class scores (N, C) with N = {y.shape[0]} samples, got a prediction of shape {tuple(pred.shape)}"
    if pred.shape[1] < 2:
        return (
            f"the prediction has shape {tuple(pred.shape)}: a single score per sample, so its argmax is always class 0 "
            "and accuracy would be the share of one class; output one score per class (2 for a binary task), "
            "or give the Workload a metric that thresholds it"
        )
    if tuple(pred.shape[2:]) != tuple(y.shape[1:]):
        want = f"(N, C{''.join(', ' + str(d) for d in y.shape[1:])})"
        return (
            f"the prediction has shape {tuple(pred.shape)} but the targets {tuple(y.shape)}: accuracy compares the "
            f"argmax over dim 1 with the labels, so it needs class scores {want}"
            + (" (squeeze the trailing dimension)" if pred.dim() > 2 and all(d == 1 for d in pred.shape[2:]) else "")
            + "; or give the Workload a metric"
        )
    return None


def mse() -> Metric:
    """Mean squared error of the prediction against floating targets (lower is better)."""

    def fn(model: nn.Module, batches) -> float:
        total, count = None, 0
        for x, y in batches:
            err = (prediction_of(model(x)).float().reshape(y.shape) - y.float()).pow(2).sum()
            total = err if total is None else total + err
            count += y.numel()
        return float(total.item()) / count if count else float("nan")

    return Metric("mse", fn, higher_is_better=False)


def perplexity(ignore_index: int = -100) -> Metric:
    """exp(mean token cross-entropy) of class scores (N, C) or (N, C, T) against labels (lower is better)."""

    def fn(model: nn.Module, batches) -> float:
        total, count = None, 0
        for x, y in batches:
            pred = prediction_of(model(x)).float()
            nll = nn.functional.cross_entropy(pred, y, ignore_index=ignore_index, reduction="sum")
            total = nll if total is None else total + nll
            count += int((y != ignore_index).sum())
        return math.exp(float(total.item()) / count) if count else float("nan")

    return Metric("perplexity", fn, higher_is_better=False)


def token_accuracy(ignore_index: int = -100) -> Metric:
    """Share of labelled positions whose top class is the label, for class scores (N, C, T) or (N, T, C)."""

    def fn(model: nn.Module, batches) -> float:
        correct, count = None, 0
        for x, y in batches:
            pred = prediction_of(model(x))
            classes = pred.argmax(dim=1) if tuple(pred.shape[2:]) == tuple(y.shape[1:]) else pred.argmax(dim=-1)
            keep = y != ignore_index
            hits = ((classes == y) & keep).sum()
            correct = hits if correct is None else correct + hits
            count += int(keep.sum())
        return float(correct.item()) / count if count else float("nan")

    return Metric("token_accuracy", fn, higher_is_better=True, bounds=(0.0, 1.0))


def metric_of(workload: Workload) -> Metric:
    """The workload's metric: its own, or accuracy through its prediction picker."""
    if workload.metric is None:
        return accuracy(workload.prediction)
    if not isinstance(workload.metric, Metric):
        raise WorkloadError(
            f"workload {workload.name!r}: metric must be a pytest_ampgate.workloads.Metric(name, fn, higher_is_better=...), "
            f"got {type(workload.metric).__name__}"
        )
    return workload.metric


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
