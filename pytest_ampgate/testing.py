"""Planted regressions: check that your gate catches a regression before you trust it to.

A gate is only worth having if both of its answers can be trusted: it must pass unchanged code and
fail a real regression.  The second half cannot be shown with healthy workloads, so each function
here takes a :class:`~pytest_ampgate.workloads.Workload` (or a built-in name) and returns a copy
carrying one of the regressions AMP users meet in practice, with its size as a parameter.  Gate the
planted copy with your own settings (measure it and ``gate.decide`` it, as ``tests/test_plants.py``
does) and it must fail the checks :data:`PLANTS` names for it, and no other::

    from pytest_ampgate import testing

    planted = testing.force_fp32_layer(my_workload())  # must fail precision_coverage, naming the layer
    slower = testing.slow_down(my_workload(), testing.slowdown_for_drop(2 * speedup_tolerance))

* :func:`force_fp32_layer`: the largest layer runs under ``autocast(enabled=False)`` on ``.float()``
  inputs (the commonest silent AMP loss); fails ``precision_coverage``, naming the layer.
* :func:`slow_down`: each step of the named AMP modes takes ``fraction`` x its step time longer;
  fails ``speedup``.
* :func:`retain_activation`: an extra ``extra_bytes`` kept alive across the step of the named AMP
  modes; fails ``memory``.
* :func:`overflow_in_fp16`: a loss term (~1e5) that fits float32 and bfloat16 but not float16
  (max 65504); fails ``finite_loss`` in fp16 only.
* :func:`collapse_loss_scale`: a constant (1e5) in a layer's backward that float16 cannot hold, so
  every fp16 gradient is inf/NaN while the loss stays finite and GradScaler halves its scale every
  step; fails ``skipped_steps`` and ``loss_scale``.

The planted copy builds its model from the original factory (so every mode still starts from the
same weights as the unplanted workload), then changes it.  Plants that must act in some modes only
ask :func:`running_mode` inside the forward which mode is running: autocast's state and dtype tell
the AMP modes apart, the input's dtype the pure low-precision ones.  Per-copy state (the retained
tensor) lives on hook objects that ``copy.deepcopy`` copies with the model, so the modes of one
run never share it.  The slowdown's delays and their calibration live in :mod:`pytest_ampgate.delays`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .delays import calibrate_measured_delay, cpu_work_unit_s, delay, fresh_model
from .errors import ConfigError, WorkloadError
from .modes import MODES, parse_device, resolve_mode
from .workloads import Workload, get_workload

AMP_MODES = tuple(name for name, mode in MODES.items() if mode.is_amp)
"""The modes a plant acts in by default: the autocast modes (amp_fp16, amp_bf16), as the mode table says."""
COMPUTE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
FP16_MAX = float(torch.finfo(torch.float16).max)  # 65504


# --- which mode is running -----------------------------------------------------------------------


def running_mode(x: torch.Tensor | None = None, module: nn.Module | None = None) -> str:
    """The precision mode the current forward runs in, as :mod:`pytest_ampgate.modes` names them.

    AMP modes are told apart by autocast's state on the input's device; pure ``fp16``/``bf16`` by
    the input's (or, for integer inputs, the first parameter's) dtype; ``tf32`` by the TF32 switch
    that :func:`~pytest_ampgate.precision_policy.numerics_policy` sets for the step.
    """
    device_type = x.device.type if x is not None else "cpu"
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return {torch.float16: "amp_fp16", torch.bfloat16: "amp_bf16"}.get(dtype, f"amp_{dtype}")
    dtype = x.dtype if x is not None and x.is_floating_point() else None
    if dtype is None and module is not None:
        dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
    if dtype == torch.float16:
        return "fp16"
    if dtype == torch.bfloat16:
        return "bf16"
    if device_type == "cuda" and _tf32_on():
        return "tf32"
    return "fp32"


def _tf32_on() -> bool:
    from .precision_policy import current_tf32_policy

    return current_tf32_policy().matmul_tf32


def _first_tensor(args) -> torch.Tensor | None:
    return next((a for a in args if torch.is_tensor(a)), None)


# --- plumbing: a model factory that plants after building -----------------------------------------


class _PlantedFactory:
    """``model_factory`` of a planted workload: the original factory, then ``plant(model)``.

    A class rather than a closure so the planted workload reads well in reprs and error messages.
    """

    def __init__(self, factory: Callable[[], nn.Module], plant: Callable[[nn.Module], None], label: str):
        self.factory, self.plant, self.label = factory, plant, label

    def __call__(self) -> nn.Module:
        model = self.factory()
        self.plant(model)
        return model

    def __repr__(self) -> str:
        return f"{self.label} on {getattr(self.factory, '__qualname__', self.factory)!r}"


def _planted(workload: Workload, label: str, *, plant=None, loss_fn=None) -> Workload:
    changes: dict = {"description": f"{workload.description}; planted: {label}".lstrip("; ")}
    if plant is not None:
        changes["model_factory"] = _PlantedFactory(workload.model_factory, plant, label)
    if loss_fn is not None:
        changes["loss_fn"] = loss_fn
    return workload.with_options(**changes)


def _check_modes(modes: Iterable[str]) -> tuple[str, ...]:
    names = tuple(resolve_mode(m).name for m in modes)
    if not names:
        raise ConfigError("a plant needs at least one mode to act in")
    return names


def largest_layer(model_or_workload: nn.Module | Workload | str) -> str:
    """``named_modules()`` path of the Linear/Conv layer with the most parameters (first one on ties)."""
    model = model_or_workload
    if not isinstance(model, nn.Module):
        model = fresh_model(get_workload(model_or_workload))
    best, best_size = None, -1
    for path, module in model.named_modules():
        if isinstance(module, COMPUTE_LAYERS):
            size = sum(p.numel() for p in module.parameters(recurse=False))
            if size > best_size:
                best, best_size = path, size
    if best is None:
        raise WorkloadError(f"{type(model).__name__} has no Linear or Conv layer to plant a regression in")
    return best


def _resolve_layer(workload: Workload, layer: str | None) -> str:
    model = fresh_model(workload)
    path = largest_layer(model) if layer is None else layer
    try:
        model.get_submodule(path)
    except AttributeError:
        paths = [p for p, m in model.named_modules() if isinstance(m, COMPUTE_LAYERS)]
        raise WorkloadError(f"workload {workload.name!r} has no layer {path!r}; its Linear/Conv layers: {', '.join(paths)}") from None
    return path


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, name, new)


# --- (a) a layer forced to fp32 --------------------------------------------------------------------


class ForcedFp32(nn.Module):
    """Runs ``layer`` with autocast switched off on float32 inputs, as a hand-written fp32 island does.

    The layer keeps its path as the parent; the coverage check names it ``<path>.layer``.
    """

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.layer(x.float())


def force_fp32_layer(workload: Workload | str, layer: str | None = None) -> Workload:
    """Plant (a): ``layer`` (default: the largest Linear/Conv by parameters) always computes in float32.

    Its size is the layer's share of the step's matmul/convolution FLOPs, forward and backward
    (88% for the MNIST MLP's first layer, 28% for the CIFAR CNN's fc layer); the coverage check fails it
    whenever that share exceeds ``1 - min_low_precision_share``, naming ``<layer>.layer``.
    """
    workload = get_workload(workload)
    path = _resolve_layer(workload, layer)

    def plant(model: nn.Module) -> None:
        _replace(model, path, ForcedFp32(model.get_submodule(path)))

    return _planted(workload, f"layer {path} forced to fp32", plant=plant)


# --- (b) a slowdown of known size ------------------------------------------------------------------


class _DelayHook:
    """Forward pre-hook: in the named modes, delay each step by that mode's planted seconds (see :func:`pytest_ampgate.delays.delay`)."""

    def __init__(self, delays: Mapping[str, float], device_type: str):
        self.delays, self.device_type = dict(delays), device_type

    def __call__(self, module: nn.Module, args):
        x = _first_tensor(args)
        seconds = self.delays.get(running_mode(x, module), 0.0)
        if seconds <= 0:
            return None
        device = x.device if x is not None else torch.device("cpu")
        if device.type != self.device_type:
            raise WorkloadError(
                f"slow_down was sized for {self.device_type} but the step runs on {device.type}; plant it with device={device.type!r}"
            )
        delay(device, seconds)
        return None


def slowdown_for_drop(drop: float) -> float:
    """The ``fraction`` for :func:`slow_down` that lowers a speedup by ``drop`` (0.1 = 10% lower).

    The speedup is fp32 time / mode time, so adding ``f`` x the mode's step time divides it by
    ``1 + f``: a drop ``d`` needs ``f = 1 / (1 - d) - 1``.
    """
    if not 0 <= drop < 1:
        raise ConfigError(f"a speedup drop must be in [0, 1), got {drop!r}")
    return 1.0 / (1.0 - drop) - 1.0


def slow_down(
    workload: Workload | str,
    fraction: float,
    *,
    modes: Sequence[str] = AMP_MODES,
    step_time_s: float | Mapping[str, float] | None = None,
    device: str | torch.device | None = None,
    calibration=None,
) -> Workload:
    """Plant (b): every step of ``modes`` takes ``fraction`` x that mode's step time longer.

    ``device`` (default: CUDA if there is one) is where the planted workload will run.

    * CUDA: a host spin and a ``torch.cuda._sleep`` kernel (see :func:`pytest_ampgate.delays.delay`), so a launch-bound
      step is slowed as surely as a GPU-bound one.
    * CPU: real CPU work (:func:`pytest_ampgate.delays.cpu_work`), which slows with the machine as the
      step does.  It also slows the step that follows it (cold caches), so its cost is more than its length.

    Without ``step_time_s`` the delay is calibrated against the drop the gate's own timed blocks
    measure (:func:`~pytest_ampgate.delays.calibrate_measured_delay`, short measurements with
    ``calibration``; each mode relative to an unplanted mode in the same run, so the machine's
    drift between measurements cancels).  With ``step_time_s`` (one number, or one per mode, e.g. a
    baseline's ``ModeMeasurement.step_time_s``) the delay is ``fraction`` x that time, uncalibrated.

    Use :func:`slowdown_for_drop` to size it against the speedup tolerance.
    """
    workload = get_workload(workload)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not math.isfinite(fraction) or fraction < 0:
        raise ConfigError(f"slow_down fraction must be a finite number >= 0, got {fraction!r}")
    modes = _check_modes(modes)
    device = parse_device(device)
    device_type = device.type
    if step_time_s is None:
        delays = calibrated_delays(workload, fraction, modes=modes, device=device, calibration=calibration)
    if step_time_s is not None:
        if isinstance(step_time_s, Mapping):
            missing = [m for m in modes if m not in step_time_s or step_time_s[m] is None]
            if missing:
                raise ConfigError(f"slow_down: no step time given for {', '.join(missing)}")
            delays = {m: fraction * float(step_time_s[m]) for m in modes}
        else:
            delays = {m: fraction * float(step_time_s) for m in modes}

    shown = ", ".join(f"{m} +{d * 1e3:.3g} ms" for m, d in delays.items())
    return _slowed(workload, delays, device_type, f"slowdown of {fraction:.1%} of the step on {device_type} ({shown})")


def calibrated_delays(
    workload: Workload | str,
    fraction: float,
    *,
    modes: Sequence[str] = AMP_MODES,
    device: str | torch.device | None = None,
    calibration=None,
) -> dict[str, float]:
    """Per mode, the delay (seconds) that :func:`slow_down` plants for ``fraction``, measured as the gate measures.

    For a benchmark that sizes a plant once and hands it to several processes (``step_time_s``).
    """
    workload, device = get_workload(workload), parse_device(device)
    planted = lambda delays: _slowed(workload, delays, device.type)  # noqa: E731
    return calibrate_measured_delay(workload, fraction, _check_modes(modes), device, calibration, planted=planted)


def _slowed(workload: Workload, delays: Mapping[str, float], device_type: str, label: str = "calibration") -> Workload:
    """``workload`` with each step of the named modes delayed by that mode's seconds."""
    if device_type == "cpu":
        cpu_work_unit_s()  # measured now, not in the first planted step, which may run under the profiler

    def plant(model: nn.Module) -> None:
        model.register_forward_pre_hook(_DelayHook(delays, device_type))

    return _planted(workload, label, plant=plant)


# --- (c) a memory plant -----------------------------------------------------------------------------


class _RetainHook:
    """Forward pre-hook: in the named modes, keep ``extra_bytes`` alive until the next forward.

    The old tensor is dropped before the new one is allocated, so the step's peak rises by exactly
    ``extra_bytes`` (rounded up to the allocator's 512-byte blocks), not twice that.
    """

    def __init__(self, extra_bytes: int, modes: tuple[str, ...]):
        self.extra_bytes, self.modes = extra_bytes, modes
        self.kept: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args):
        x = _first_tensor(args)
        if running_mode(x, module) not in self.modes:
            return None
        self.kept = None
        device = x.device if x is not None else torch.device("cpu")
        self.kept = torch.empty(self.extra_bytes, dtype=torch.uint8, device=device)
        return None

    def __deepcopy__(self, memo):
        return _RetainHook(self.extra_bytes, self.modes)  # a fresh slot per model copy


def retain_activation(workload: Workload | str, extra_bytes: int, *, modes: Sequence[str] = AMP_MODES) -> Workload:
    """Plant (c): the named modes' peak memory rises by ``extra_bytes`` (an activation kept across the step).

    Size it against the memory tolerance with ``extra_bytes = k * memory_tolerance * fp32 peak``:
    the memory ratio then rises by ``k`` x the tolerance.  Peak memory is gated on CUDA only.
    """
    workload = get_workload(workload)
    if isinstance(extra_bytes, bool) or not isinstance(extra_bytes, int) or extra_bytes < 1:
        raise ConfigError(f"retain_activation extra_bytes must be a whole number >= 1, got {extra_bytes!r}")
    modes = _check_modes(modes)

    def plant(model: nn.Module) -> None:
        model.register_forward_pre_hook(_RetainHook(extra_bytes, modes))

    return _planted(workload, f"{extra_bytes / 2**20:.3g} MiB retained in {', '.join(modes)}", plant=plant)


# --- (d) a loss that overflows in fp16 only -----------------------------------------------------------


class Fp16OverflowLoss(nn.Module):
    """``base(out, y) + weight * v*v``, with ``v*v`` computed by a matmul (so autocast runs it in fp16).

    ``v*v`` is about 1e5: fine in float32 and bfloat16 (it adds ``weight * 1e5``, 0.1 by default,
    a constant that changes no gradient), inf in float16 (largest finite value 65504).  This is
    the shape of the classic fp16 bug: a sum of squares or a hard-coded large constant in the loss.
    """

    def __init__(self, base: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], value: float = 316.3, weight: float = 1e-6):
        super().__init__()
        self.base, self.value, self.weight = base, value, weight

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        v = out.new_full((1, 1), self.value)
        square = torch.mm(v, v.t()).float().reshape(())
        return self.base(out, y) + self.weight * square


def overflow_in_fp16(workload: Workload | str, value: float = 316.3) -> Workload:
    """Plant (d): the loss is +inf in float16 (``amp_fp16``, ``fp16``) and finite in every other mode.

    ``value**2`` must exceed 65504 (the default squares to about 1e5).  Gradients stay finite, so
    the check that fails is ``finite_loss``, not the scaler's.
    """
    workload = get_workload(workload)
    if not value * value > FP16_MAX or not math.isfinite(value * value):
        raise ConfigError(f"overflow_in_fp16 value must square past {FP16_MAX:g} (and stay finite), got {value!r}")
    return _planted(workload, f"loss term {value:g}^2 overflows in fp16", loss_fn=Fp16OverflowLoss(workload.loss_fn, value))


# --- (e) a loss scale that collapses -------------------------------------------------------------------


class _Fp16HostileBackward(torch.autograd.Function):
    """Identity forward; backward rescales by a constant stored in the gradient's dtype and back.

    ``grad * c / c`` with ``c = 1e5`` is the identity in float32 and bfloat16.  Float16 cannot hold
    ``c`` (it becomes inf), so every fp16 gradient turns inf/NaN whatever the loss scale:
    GradScaler skips every step and halves its scale each time, while the loss stays finite.
    """

    CONSTANT = 1e5

    @staticmethod
    def forward(ctx, x):
        return x.clone()  # not a view: a later in-place op (ReLU(inplace=True)) must stay legal

    @staticmethod
    def backward(ctx, grad):
        c = torch.tensor(_Fp16HostileBackward.CONSTANT, dtype=grad.dtype, device=grad.device)
        return grad * c / c


def _hostile_backward_hook(_module, _args, output):
    return _Fp16HostileBackward.apply(output) if torch.is_tensor(output) else output


def collapse_loss_scale(workload: Workload | str, layer: str | None = None) -> Workload:
    """Plant (e): ``layer``'s output gradient (default: the largest layer's) is inf/NaN in float16.

    Under ``amp_fp16`` every step's gradients are non-finite, so GradScaler skips every step and
    its scale halves each time: after ``n`` steps it is ``65536 / 2**n``, below the default collapse
    limit of 1.0 after 17 steps.  The forward, and so the loss, is unchanged and finite.
    """
    workload = get_workload(workload)
    path = _resolve_layer(workload, layer)

    def plant(model: nn.Module) -> None:
        model.get_submodule(path).register_forward_hook(_hostile_backward_hook)

    return _planted(workload, f"fp16 gradients of layer {path} overflow", plant=plant)


@dataclass(frozen=True)
class PlantInfo:
    """What the quality benchmark and tests need to know about a plant: the checks it must fail."""

    name: str
    metrics: tuple[str, ...]
    modes: tuple[str, ...]
    consequences: tuple[str, ...] = ()
    """Checks that may fail too as a consequence, not a false alarm (a mode that never steps never learns)."""


PLANTS = {
    "force_fp32_layer": PlantInfo("force_fp32_layer", ("precision_coverage",), AMP_MODES),
    "slow_down": PlantInfo("slow_down", ("speedup",), AMP_MODES),
    "retain_activation": PlantInfo("retain_activation", ("memory",), AMP_MODES),
    "overflow_in_fp16": PlantInfo("overflow_in_fp16", ("finite_loss",), ("amp_fp16",)),
    "collapse_loss_scale": PlantInfo(
        "collapse_loss_scale", ("skipped_steps", "loss_scale"), ("amp_fp16",), consequences=("same_run", "same_run_loss")
    ),
}
"""Which checks each plant must fail, and in which modes (the others must not fail for it)."""
