"""Precision modes, and every question about what a device can run.

A mode is a small frozen description (autocast dtype, parameter dtype, scaler, TF32 policy); the
one training step every mode shares lives in :mod:`.mode_runner`, and the global float32 switches
a mode pins in :mod:`.precision_policy`.  This module names the modes (with Apex's O0-O3 aliases)
and answers, in one place, what a device string means, whether this machine has that device, and
whether it can run a mode (bfloat16, TF32, the CPU's dtype support), so that the fingerprint, the
noise readings, ``measure()`` and the plugin all ask the same question the same way.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError, ModeError

DeviceLike = str | torch.device | int | None


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
    optimizer updates, with dynamic loss scaling (see :class:`.mode_runner.MasterWeights`)."""

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


# --- what a device string means, and whether this machine has it -----------------------------

DEVICE_FORMS = "'cuda', 'cuda:N', 'cpu' or a torch.device"


def parse_device(device: DeviceLike) -> torch.device:
    """``device`` as a torch.device: a device string, a torch.device, a CUDA index, or None for the
    current CUDA device where there is one and the CPU otherwise.

    Only the spelling is checked here (a :class:`~pytest_ampgate.errors.ConfigError` when it names
    no device at all); whether this machine has it is :func:`device_missing_reason`'s question.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, torch.device):
        return device
    if isinstance(device, bool):
        raise ConfigError(f"device must be {DEVICE_FORMS}, got {device!r}")
    try:
        return torch.device("cuda", device) if isinstance(device, int) else torch.device(str(device))
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ConfigError(f"device must be {DEVICE_FORMS}, got {device!r} ({exc})") from None


def device_missing_reason(device: DeviceLike) -> str | None:
    """Why this machine has no ``device`` to measure on (no CUDA, no such index, an unsupported
    type), or None: the one check behind a mode's support, ``measure()``'s refusal and the fingerprint."""
    device = parse_device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            return f"no CUDA device is available (none is visible to torch {torch.__version__}, {build})"
        count = torch.cuda.device_count()
        index = cuda_index(device)
        if not 0 <= index < count:
            return f"CUDA device {index} does not exist (only {count} visible)"
        return None
    if device.type == "cpu":
        return None
    return f"device type {device.type!r} is not supported; use 'cuda' or 'cpu'"


def require_device(device: DeviceLike, asker: str) -> torch.device:
    """``device`` as a torch.device this machine has, or a ConfigError naming ``asker`` and why.

    Falling back to the CPU instead would file a measurement under the wrong baseline key.
    """
    try:
        parsed = parse_device(device)
    except ConfigError as exc:
        raise ConfigError(f"{asker}: {exc}") from None
    missing = device_missing_reason(parsed)
    if missing:
        advice = "; measure on the CPU with device='cpu'" if parsed.type == "cuda" else ""
        raise ConfigError(f"{asker}: {missing}{advice}")
    return parsed


def cuda_index(device: torch.device) -> int:
    """The CUDA index ``device`` names: its own, or the current device for a plain ``"cuda"``."""
    return device.index if device.index is not None else torch.cuda.current_device()


def cuda_bf16_supported(index: int) -> bool:
    """Native bfloat16 on this GPU; emulated bfloat16 (pre-Ampere) runs but brings AMP no speedup.

    Newer torch answers True for emulated bfloat16 unless ``including_emulation=False`` is passed,
    and answers for the *current* device, hence the device context.
    """
    try:
        with torch.cuda.device(index):
            try:
                return bool(torch.cuda.is_bf16_supported(including_emulation=False))
            except TypeError:  # torch < 2.3 has no including_emulation argument
                return bool(torch.cuda.is_bf16_supported())
    except Exception:
        return False


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


def unsupported_reason(mode: str | PrecisionMode, device: DeviceLike) -> str | None:
    """Why ``mode`` cannot run on ``device``, or None when it can.

    Reported rather than raised: a gate on a GPU without bfloat16 still measures float16, and a
    CPU run still checks the numerics of the modes the CPU can run.
    """
    mode = resolve_mode(mode)
    device = parse_device(device)
    missing = device_missing_reason(device)
    if missing:
        return missing
    if device.type == "cuda":
        index = cuda_index(device)
        major, minor = torch.cuda.get_device_capability(index)
        gpu = torch.cuda.get_device_name(index)
        if mode.low_precision_dtype == torch.bfloat16 and not cuda_bf16_supported(index):
            return f"{gpu} (compute capability {major}.{minor}) has no native bfloat16 support; it needs 8.0+ (Ampere or newer)"
        if mode.tf32 and major < 8:
            return f"{gpu} (compute capability {major}.{minor}) has no TF32 tensor cores; they need 8.0+ (Ampere or newer)"
        return None
    if mode.cuda_only:
        return f"{mode.name} exists only on NVIDIA GPUs (TF32 tensor cores); run it with a CUDA device"
    dtype = mode.low_precision_dtype
    return None if dtype is None else _cpu_supports(dtype, mode.is_amp)


@functools.cache
def gpu_cycles_per_second(device_index: int) -> float:
    """How many ``torch.cuda._sleep`` cycles this GPU runs per second, timed with CUDA events (median of 5).

    A fact about the device: the timing probe and the planted delays both size their sleeps with it."""
    cycles = 20_000_000
    rates = []
    with torch.cuda.device(device_index):
        torch.cuda._sleep(1_000_000)  # load the kernel
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.cuda._sleep(cycles)
            end.record()
            end.synchronize()
            rates.append(cycles / (start.elapsed_time(end) / 1000.0))
    return sorted(rates)[len(rates) // 2]
