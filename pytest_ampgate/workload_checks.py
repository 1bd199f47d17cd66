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

from .errors import WorkloadError
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
