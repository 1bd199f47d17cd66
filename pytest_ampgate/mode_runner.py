"""How each precision mode prepares a model and optimizer and runs one training step.

One code path, :class:`ModeRunner`, serves every mode, so the modes differ only in what they are
meant to differ in, and a timed step is the same handful of calls a user would write by hand: zero
grads, forward and loss (under autocast where the mode says so), backward, optimizer step (through
``torch.amp.GradScaler`` for float16 autocast, or fp32 master weights for Apex O2).  What a mode
*is* lives in :mod:`.modes`; the global float32 switches it pins, in :mod:`.precision_policy`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .modes import PrecisionMode, resolve_mode

NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _keep_norm_in_fp32(model: nn.Module, compute_dtype: torch.dtype) -> None:
    """Pure low precision, but BatchNorm statistics stay float32 (they overflow or lose resolution otherwise).

    The layer runs on float32 inputs and hands its output back in the model's dtype.
    """

    def to_fp32(_module, args):
        return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    def back(_module, _args, output):
        return output.to(compute_dtype) if torch.is_tensor(output) and output.is_floating_point() else output

    for module in model.modules():
        if isinstance(module, NORM_LAYERS):
            module.float()
            module.register_forward_pre_hook(to_fp32)
            module.register_forward_hook(back)


def cast_floats(obj, dtype: torch.dtype):
    """``obj`` with every floating tensor in it (a tensor, tuple, list, dict, dataclass / ModelOutput) cast to ``dtype``."""
    if torch.is_tensor(obj):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: cast_floats(getattr(obj, f.name), dtype) for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple
        return type(obj)(*(cast_floats(v, dtype) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(cast_floats(v, dtype) for v in obj)
    if isinstance(obj, dict):
        return type(obj)((k, cast_floats(v, dtype)) for k, v in obj.items())
    return obj


class MasterWeights:
    """Apex O2 on plain torch: fp32 master copies of a low-precision model's parameters, and a dynamic loss scale.

    Forward and backward run in the model's float16; the scaled gradients are unscaled into the
    float32 masters, which the optimizer updates and which are then copied back into the model.
    A step whose gradients hold inf/NaN is skipped and the scale backs off; after
    ``growth_interval`` clean steps it grows: the same policy and defaults as ``torch.amp.GradScaler``
    (whose own unscale refuses float16 gradients, hence this class).  Parameters already float32
    (BatchNorm, kept float32 as Apex's ``keep_batchnorm_fp32``) are their own masters.
    """

    def __init__(
        self,
        model: nn.Module,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ):
        self.model_params = [p for p in model.parameters() if p.requires_grad]
        self.masters = [p if p.dtype == torch.float32 else nn.Parameter(p.detach().float().clone()) for p in self.model_params]
        self.scale = float(init_scale)
        self.initial_scale = float(init_scale)
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self._good_steps = 0
        self.steps = 0
        self.skipped_steps = 0

    def zero_grad(self) -> None:
        for p, m in zip(self.model_params, self.masters):
            p.grad = None
            m.grad = None

    def unscale_to_masters(self) -> torch.Tensor:
        """Masters' gradients = model gradients / scale, in float32; returns a device flag: any inf/NaN."""
        inv = 1.0 / self.scale
        flags = []
        for p, m in zip(self.model_params, self.masters):
            if p.grad is None:
                continue
            if p is m:
                p.grad.mul_(inv)
            else:
                m.grad = p.grad.float() * inv
            flags.append(torch.isfinite(m.grad).all())
        if not flags:
            return torch.zeros((), dtype=torch.bool)
        return torch.logical_not(torch.stack(flags).all())

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for p, m in zip(self.model_params, self.masters):
            if p is not m:
                p.copy_(m)

    def update(self, skipped: bool) -> None:
        self.steps += 1
        if skipped:
            self.skipped_steps += 1
            self.scale *= self.backoff_factor
            self._good_steps = 0
        else:
            self._good_steps += 1
            if self._good_steps == self.growth_interval:
                self.scale *= self.growth_factor
                self._good_steps = 0


@dataclass
class ScalerStats:
    """GradScaler health over a run: a collapsing scale or many skipped steps means fp16 trouble."""

    initial_scale: float
    final_scale: float
    min_scale: float
    steps: int
    skipped_steps: int | None
    """Steps whose gradients held inf/NaN so the optimizer step was skipped; None when not countable (fused optimizers)."""
    note: str = ""


class ModeRunner:
    """One mode's model, optimizer and (for amp_fp16) scaler, ready to take training steps.

    ``step`` returns the loss as a device tensor and never reads anything back to the host, so a
    block of steps can be timed with a single synchronisation at its end.  (``GradScaler.step``
    itself reads the inf check on the host unless the optimizer is fused: that is part of
    amp_fp16 as users run it, so it stays in the timed step.)
    """

    def __init__(
        self,
        mode: PrecisionMode,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        device: torch.device,
        master: MasterWeights | None = None,
    ):
        self.mode = mode
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.device = device
        self.steps_taken = 0
        self.scaler = torch.amp.GradScaler(device.type) if mode.grad_scaler else None
        self.master: MasterWeights | None = master
        # Set by a distributed rank: returns once every collective its steps started has finished on the
        # backend's own threads; the CPU memory pass calls it before its profiler stops (memory._cpu_step_memory).
        self.wait_for_collectives: Callable[[], None] | None = None
        self._optimizer_steps = 0
        self._scale_seen: list[float] = []
        self._countable = not getattr(optimizer, "_step_supports_amp_scaling", False)
        if self.scaler is not None:
            optimizer.register_step_post_hook(self._count_optimizer_step)
            self._initial_scale = float(self.scaler.get_scale())

    def _count_optimizer_step(self, *_args) -> None:
        self._optimizer_steps += 1

    def autocast(self):
        """The forward's context: autocast for AMP modes, nothing at all otherwise (as a hand-written loop)."""
        if self.mode.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.mode.autocast_dtype)

    def cast_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode.param_dtype is not None and x.is_floating_point():
            return x.to(self.mode.param_dtype)
        return x

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One training step; returns the detached loss on the device (no host sync here)."""
        x = self.cast_input(x)
        if self.master is not None:
            return self._master_step(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss = self.loss_fn(self.model(x), y)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.steps_taken += 1
        return loss.detach().reshape(())  # a loss of shape (1,) is legal: read back one number per step

    def _master_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Apex O2's step: scaled backward in float16, unscale into the fp32 masters, step them unless
        the gradients overflowed, copy them back.  The overflow flag is read on the host once, as
        ``GradScaler.step`` does for every non-fused optimizer."""
        master = self.master
        master.zero_grad()
        loss = self.loss_fn(self.model(x), y)
        (loss.float() * master.scale).backward()
        skipped = bool(master.unscale_to_masters().item())
        if not skipped:
            self.optimizer.step()
            master.copy_to_model()
        master.update(skipped)
        self.steps_taken += 1
        return loss.detach().reshape(())  # a loss of shape (1,) is legal: read back one number per step

    def note_scale(self) -> None:
        """Read the loss scale (a host sync: call it between timed blocks only)."""
        if self.scaler is not None:
            self._scale_seen.append(float(self.scaler.get_scale()))
        elif self.master is not None:
            self._scale_seen.append(self.master.scale)

    def scaler_stats(self) -> ScalerStats | None:
        if self.master is not None:
            self.note_scale()
            seen = self._scale_seen
            return ScalerStats(
                initial_scale=self.master.initial_scale,
                final_scale=seen[-1],
                min_scale=min(seen),
                steps=self.steps_taken,
                skipped_steps=self.master.skipped_steps,
                note="dynamic loss scale of the float32 master weights (Apex O2)",
            )
        if self.scaler is None:
            return None
        self.note_scale()
        seen = self._scale_seen
        return ScalerStats(
            initial_scale=self._initial_scale,
            final_scale=seen[-1],
            min_scale=min(seen),
            steps=self.steps_taken,
            skipped_steps=self.steps_taken - self._optimizer_steps if self._countable else None,
            note="" if self._countable else "fused optimizer: skipped steps happen inside the optimizer and are not counted",
        )

    @torch.no_grad()
    def evaluate(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], metric=None):
        """The workload's metric (held-out accuracy by default) in this mode's precision.

        The metric's function sees the model in eval mode, inside this mode's autocast, with
        inputs already cast as in training, so ``model(x)`` computes as the mode trains.
        """
        if metric is None:
            from .workloads import accuracy

            metric = accuracy()
        was_training = self.model.training
        self.model.eval()
        try:
            with self.autocast():
                from .metrics import HeldOut

                return metric.fn(self.model, HeldOut(batches, cast=self.cast_input))
        finally:
            self.model.train(was_training)


def prepare(
    mode: str | PrecisionMode,
    initial_model: nn.Module,
    optimizer_factory: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: str | torch.device,
) -> ModeRunner:
    """A fresh copy of ``initial_model`` set up for ``mode`` on ``device``.

    Copying one initial model gives every mode identical starting weights, so differences in loss
    and accuracy come from precision alone.
    """
    mode = resolve_mode(mode)
    device = torch.device(device)
    model = copy.deepcopy(initial_model).to(device)
    model.train()
    if mode.param_dtype is not None:
        model.to(mode.param_dtype)
        _keep_norm_in_fp32(model, mode.param_dtype)
    if mode.master_weights:
        # Apex O2 casts the model's outputs to float32, so the loss is computed in float32.
        model.register_forward_hook(lambda _module, _args, output: cast_floats(output, torch.float32))
        master = MasterWeights(model)
        return ModeRunner(mode, model, optimizer_factory(master.masters), loss_fn, device, master=master)
    optimizer = optimizer_factory(model.parameters())
    return ModeRunner(mode, model, optimizer, loss_fn, device)
