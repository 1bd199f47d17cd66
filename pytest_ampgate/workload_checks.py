"""A user's workload objects, checked before anything is trained.

A model factory that returns a class, an optimizer over other parameters: each is caught here with
a WorkloadError naming the object and the fix, rather than as a traceback from deep inside some
precision mode's timed training step.  Data (a dataset on the meta device, the wrong type) is
checked where it is defined, in :mod:`pytest_ampgate.data`.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from .data import DeviceDataset
from .errors import WorkloadError
from .metrics import HeldOut, accuracy_fit_problem, describe_output, metric_of, misplaced_prediction, prediction_of
from .workloads import Workload


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
        raise WorkloadError(f"workload {name!r}: optimizer_factory(model.parameters()) raised {type(exc).__name__}: {exc}") from exc
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


def check_fits(workload: Workload, model: torch.nn.Module, dataset: DeviceDataset) -> None:
    """One fp32 forward and loss on a batch, so a misfit is reported as the user's error, not ours.

    The batch is the training batch size (capped at 32, to stay cheap on the CPU): with two samples
    a two-class output (2, 2) against targets (2,) broadcasts in an elementwise loss and slips by."""
    n_train = dataset.train_x.shape[0]
    if workload.batch_size > n_train:
        raise WorkloadError(
            f"workload {workload.name!r}: batch_size {workload.batch_size} is larger than its training set ({n_train} samples)"
        )
    param = next(model.parameters(), None)
    where = param.device if param is not None else torch.device("cpu")
    x, y = (t.to(where) for t in dataset.batch(0, min(workload.batch_size, n_train, 32)))
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:
        raise WorkloadError(
            f"workload {workload.name!r}: the model rejected a batch from its data "
            f"(input shape {tuple(x.shape)}, {x.dtype}): {type(exc).__name__}: {exc}"
        ) from exc
    try:
        with torch.no_grad():
            loss = workload.loss_fn(out, y)
    except Exception as exc:
        raise WorkloadError(
            f"workload {workload.name!r}: the loss rejected the model's output "
            f"({f'shape {tuple(out.shape)}, {out.dtype}' if torch.is_tensor(out) else describe_output(out)}) "
            f"with targets (shape {tuple(y.shape)}, {y.dtype}): {type(exc).__name__}: {exc}"
        ) from exc
    if not torch.is_tensor(loss) or loss.numel() != 1:
        shape = tuple(loss.shape) if torch.is_tensor(loss) else type(loss).__name__
        raise WorkloadError(f"workload {workload.name!r}: the loss must be a scalar tensor, got {shape}")
    _check_metric_fits(workload, model, out, y, dataset)


def _check_metric_fits(workload: Workload, model: torch.nn.Module, out, y: torch.Tensor, dataset: DeviceDataset) -> None:
    """Before training: the model's output must fit the metric (shapes named), and the metric must
    return one real number within its bounds, so a misfit is not found after every mode has trained.
    The metric sees a :class:`~pytest_ampgate.metrics.HeldOut` here as after training."""
    where = f"workload {workload.name!r}"
    metric = metric_of(workload)
    if workload.prediction is None:
        misplaced = misplaced_prediction(out, int(getattr(dataset, "num_classes", 0) or 0))
        if misplaced:
            raise WorkloadError(f"{where}: {misplaced}")
    if workload.metric is None:
        try:
            pred = (workload.prediction or prediction_of)(out)
        except WorkloadError as exc:
            raise WorkloadError(f"{where}: {exc}") from None
        problem = accuracy_fit_problem(pred, y)
        if problem:
            raise WorkloadError(
                f"{where}: the model's output {describe_output(out)} does not fit the default metric, accuracy, "
                f"against targets {tuple(y.shape)} {y.dtype}: {problem}; or give the Workload a metric"
            )
        return  # the default accuracy needs nothing more than fitting scores: its value is always in [0, 1]
    x_test, y_test = next(iter(dataset.test_batches(min(32, dataset.n_test))))
    param = next(model.parameters(), None)
    if param is not None:
        x_test, y_test = x_test.to(param.device), y_test.to(param.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            value = metric.fn(model, HeldOut([(x_test, y_test)]))
    except WorkloadError as exc:
        raise WorkloadError(f"{where}: metric {metric.name!r}: {exc}") from None
    except Exception as exc:
        raise WorkloadError(
            f"{where}: its metric {metric.name!r} failed on a held-out batch (input {tuple(x_test.shape)} {x_test.dtype}, "
            f"targets {tuple(y_test.shape)} {y_test.dtype}; the model returns {describe_output(out)}): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    finally:
        model.train(was_training)
    metric.check_value(value, workload.name)
