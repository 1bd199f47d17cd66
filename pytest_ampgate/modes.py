"""Precision modes: how each one prepares a model and optimizer and runs one training step.

A mode is a small frozen description (autocast dtype, parameter dtype, scaler, TF32 policy) plus
one code path, :class:`ModeRunner`, that every mode shares.  Keeping a single step function means
the modes differ only in what they are meant to differ in, and a timed step is the same handful of
calls a user would write by hand: zero grads, forward and loss (under autocast where the mode says
so), backward, optimizer step (through ``torch.amp.GradScaler`` for float16 autocast).

Global numerics flags (TF32 for matmul and cuDNN convolutions) are set by :func:`numerics_policy`
and always restored, so measuring a mode never changes what the rest of the process computes.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ModeError


@dataclass(frozen=True)
class PrecisionMode:
    """What distinguishes one precision mode from another; the step itself is shared."""

    name: str
    description: str
    autocast_dtype: torch.dtype | None = None
    """Forward and loss run under ``torch.autocast`` with this dtype (AMP)."""
    param_dtype: torch.dtype | None = None
    """Parameters, inputs and activations are cast to this dtype (pure low precision)."""
    grad_scaler: bool = False
    """Backward and step go through ``torch.amp.GradScaler`` (dynamic loss scaling)."""
    tf32: bool = False
    """Float32 matmuls and cuDNN convolutions may use TF32 tensor cores."""
    cuda_only: bool = False
    master_weights: bool = False
    """Apex O2: the low-precision model computes, float32 master copies of its parameters are what the
    optimizer updates, with dynamic loss scaling (see :class:`MasterWeights`)."""

    @property
    def low_precision_dtype(self) -> torch.dtype | None:
        return self.autocast_dtype or self.param_dtype

    @property
    def is_amp(self) -> bool:
        return self.autocast_dtype is not None


MODES: dict[str, PrecisionMode] = {
    m.name: m
    for m in (
        PrecisionMode("fp32", "strict IEEE float32: TF32 off for matmul and cuDNN"),
        PrecisionMode("tf32", "float32 storage, TF32 tensor-core matmul and convolution", tf32=True, cuda_only=True),
        PrecisionMode(
            "amp_fp16",
            "torch.amp.autocast(float16) with torch.amp.GradScaler",
            autocast_dtype=torch.float16,
            grad_scaler=True,
        ),
        PrecisionMode("amp_bf16", "torch.amp.autocast(bfloat16), no scaler", autocast_dtype=torch.bfloat16),
        PrecisionMode("fp16", "pure float16 parameters (BatchNorm kept float32), no scaler", param_dtype=torch.float16),
        PrecisionMode("bf16", "pure bfloat16 parameters (BatchNorm kept float32)", param_dtype=torch.bfloat16),
        PrecisionMode(
            "fp16_master",
            "Apex O2: float16 model (BatchNorm kept float32), float32 master weights updated by the optimizer, dynamic loss scaling",
            param_dtype=torch.float16,
            master_weights=True,
        ),
    )
}

APEX_ALIASES = {"O0": "fp32", "O1": "amp_fp16", "O2": "fp16_master", "O3": "fp16"}
REFUSED: dict[str, str] = {}
"""Names recognised but refused, with the reason (none at present: every Apex level O0-O3 runs)."""


def valid_mode_names() -> list[str]:
    return [*MODES, *APEX_ALIASES]


def resolve_mode(name: str | PrecisionMode) -> PrecisionMode:
    """Look a mode up by name or Apex alias; unknown or refused names raise :class:`ModeError`."""
    if isinstance(name, PrecisionMode):
        return name
    if not isinstance(name, str):
        raise ModeError(f"precision mode must be a name (str), got {type(name).__name__} {name!r}; valid: {', '.join(valid_mode_names())}")
    key = name.strip()
    if key.upper() in REFUSED:
        raise ModeError(f"precision mode {name!r} is not supported: {REFUSED[key.upper()]}")
    key = APEX_ALIASES.get(key.upper(), key.lower())
    if key not in MODES:
        raise ModeError(f"unknown precision mode {name!r}; valid modes: {', '.join(valid_mode_names())}")
    return MODES[key]


# --- what the hardware can run ---------------------------------------------------------------


@functools.cache
def _cpu_supports(dtype: torch.dtype, autocast: bool) -> str | None:
    """Probe once whether this torch build runs a tiny linear layer in ``dtype`` on the CPU."""
    try:
        layer = nn.Linear(4, 4)
        x = torch.randn(2, 4)
        if autocast:
            with torch.autocast("cpu", dtype=dtype):
                y = layer(x)
            if y.dtype != dtype:
                return f"CPU autocast in this torch {torch.__version__} does not run linear layers in {dtype}"
        else:
            layer.to(dtype)(x.to(dtype)).sum().backward()
    except (RuntimeError, TypeError, ValueError) as exc:  # operator not implemented for this dtype
        return f"this torch {torch.__version__} cannot run {dtype} on the CPU: {exc}".splitlines()[0]
    return None


def unsupported_reason(mode: str | PrecisionMode, device: str | torch.device) -> str | None:
    """Why ``mode`` cannot run on ``device``, or None when it can.

    Reported rather than raised: a gate on a GPU without bfloat16 still measures float16, and a
    CPU run still checks the numerics of the modes the CPU can run.
    """
    mode = resolve_mode(mode)
    device = torch.device(device)
    missing = device_missing_reason(device)
    if missing:
        return missing
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        gpu = torch.cuda.get_device_name(index)
        if mode.low_precision_dtype == torch.bfloat16 and not _cuda_bf16_supported(index):
            return f"{gpu} (compute capability {major}.{minor}) has no native bfloat16 support; it needs 8.0+ (Ampere or newer)"
        if mode.tf32 and major < 8:
            return f"{gpu} (compute capability {major}.{minor}) has no TF32 tensor cores; they need 8.0+ (Ampere or newer)"
        return None
    if device.type == "cpu":
        if mode.cuda_only:
            return f"{mode.name} exists only on NVIDIA GPUs (TF32 tensor cores); run it with a CUDA device"
        dtype = mode.low_precision_dtype
        return None if dtype is None else _cpu_supports(dtype, mode.is_amp)
    return None


def device_missing_reason(device: torch.device) -> str | None:
    """Why this machine has no ``device`` to measure on (no CUDA, no such index, an unsupported
    type), or None: the one check behind both a mode's support and ``measure()``'s refusal."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device is available (no GPU, or a CPU-only torch build)"
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            return f"CUDA device {index} does not exist (this machine has {torch.cuda.device_count()})"
        return None
    if device.type == "cpu":
        return None
    return f"device type {device.type!r} is not supported; use 'cuda' or 'cpu'"


def _cuda_bf16_supported(index: int) -> bool:
    with torch.cuda.device(index):
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch < 2.3 has no including_emulation argument
            return torch.cuda.is_bf16_supported()


# --- global numerics flags -------------------------------------------------------------------


def _tf32_switches() -> list[tuple[object, str, object, object]]:
    """(holder, attribute, strict value, tf32 value) for every TF32 switch this torch has.

    torch >= 2.9 has per-backend ``fp32_precision`` settings: matmul, cuDNN convolution and cuDNN
    RNN are all listed, so the pinned state is coherent (see :func:`numerics_policy`).  Older torch
    has only the legacy ``allow_tf32`` flags.
    """
    backends = torch.backends
    matmul = backends.cuda.matmul
    if hasattr(matmul, "fp32_precision") and hasattr(getattr(backends.cudnn, "conv", None), "fp32_precision"):
        switches = [(matmul, "fp32_precision", "ieee", "tf32"), (backends.cudnn.conv, "fp32_precision", "ieee", "tf32")]
        rnn = getattr(backends.cudnn, "rnn", None)
        if hasattr(rnn, "fp32_precision"):
            switches.append((rnn, "fp32_precision", "ieee", "tf32"))
        for name in ("matmul", "conv", "rnn"):  # oneDNN on the CPU: keep float32 strict there too
            holder = getattr(getattr(backends, "mkldnn", None), name, None)
            if hasattr(holder, "fp32_precision"):
                switches.append((holder, "fp32_precision", "ieee", "ieee"))
        return switches
    return [(matmul, "allow_tf32", False, True), (backends.cudnn, "allow_tf32", False, True)]


def _legacy_cudnn_flag() -> bool | None:
    """torch's legacy ``cudnn.allow_tf32``, or None where it cannot be read (a state mixing both APIs)."""
    try:
        return bool(torch.backends.cudnn.allow_tf32)
    except (RuntimeError, AttributeError):
        return None


def _matmul_precision() -> str | None:
    """``torch.get_float32_matmul_precision()``, or None where a state mixing both APIs makes it raise."""
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:
        return None


def _set_legacy_cudnn(value: bool) -> None:
    """The legacy cuDNN switch: the only way to move torch's own allow_tf32 bool with conv and RNN.

    Some torch releases (2.9-2.10) warn once that the legacy API will be deprecated; the user did
    not call it, so the warning is not theirs to see.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.backends.cudnn.allow_tf32 = value


@contextlib.contextmanager
def numerics_policy(mode: str | PrecisionMode) -> Iterator[None]:
    """Set the TF32 switches ``mode`` needs (strict IEEE unless the mode is ``tf32``), then restore them.

    Every mode pins the switches, not only ``fp32``: float32 regions left outside autocast must
    compute the same way in every mode, or a speedup would partly be TF32's.

    On torch >= 2.9 the new per-backend settings and the legacy readers
    (``torch.backends.cuda.matmul.allow_tf32``, ``torch.backends.cudnn.allow_tf32``, read by
    inductor, TunableOp, the profiler and user code) must agree, or the legacy readers raise "mix
    of the legacy and new APIs".  So the float32 matmul precision is pinned with
    ``torch.set_float32_matmul_precision`` ("highest", or "high" for tf32), cuDNN through its legacy
    switch (which sets convolution and RNN together) and then each per-backend setting; on exit
    the user's float32 matmul precision comes back exactly ("medium" stays "medium"), then every
    per-backend setting.
    """
    mode = resolve_mode(mode)
    switches = _tf32_switches()
    new_api = switches[0][1] == "fp32_precision"
    saved_precision = _matmul_precision()
    saved_cudnn = _legacy_cudnn_flag() if new_api else None
    saved = [(holder, attr, getattr(holder, attr)) for holder, attr, _strict, _tf32 in switches]
    try:
        if new_api:
            torch.set_float32_matmul_precision("high" if mode.tf32 else "highest")
            _set_legacy_cudnn(mode.tf32)
        for holder, attr, strict, tf32 in switches:
            setattr(holder, attr, tf32 if mode.tf32 else strict)
        yield
    finally:
        if new_api:
            if saved_precision is not None:
                torch.set_float32_matmul_precision(saved_precision)
            if saved_cudnn is not None:
                _set_legacy_cudnn(saved_cudnn)
        for holder, attr, value in reversed(saved):
            setattr(holder, attr, value)
        if not new_api and saved_precision is not None and _matmul_precision() != saved_precision:
            torch.set_float32_matmul_precision(saved_precision)  # the legacy matmul flag moves it


@contextlib.contextmanager
def cudnn_benchmark(enabled: bool = True) -> Iterator[None]:
    """Let cuDNN autotune convolutions during warm-up, restoring the user's setting afterwards."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


# --- preparing and stepping ------------------------------------------------------------------

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

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict) -> ScalerStats:
        return cls(**d)


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
        return loss.detach()

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
        return loss.detach()

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
                return metric.fn(self.model, ((self.cast_input(x), y) for x, y in batches))
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
