"""The distributed modes, and what this machine and torch can run of them.

Every single-device precision mode (:mod:`pytest_ampgate.modes`) also runs under DDP; a few modes
exist only with ``world_size``: DDP with a gradient-compression hook, and FSDP2 with or without a
mixed-precision policy.  Whether a device can compute in a dtype is the precision modes' question;
this module only adds what several ranks need (a backend, enough devices, FSDP2 in this torch).

Nothing here imports torch at module level: the mode table is read when markers are validated.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import ConfigError
from ..parallel_modes import DISTRIBUTED_ONLY, DistributedMode


def distributed_mode(name: str) -> DistributedMode:
    """The distributed mode of a name: one of :data:`DISTRIBUTED_ONLY`, or DDP under a precision mode."""
    key = name.strip().lower()
    if key in DISTRIBUTED_ONLY:
        return DISTRIBUTED_ONLY[key]
    from ..modes import resolve_mode

    precision = resolve_mode(name)
    return DistributedMode(
        precision.name, "ddp", precision=precision.name, description=f"DDP, each rank in {precision.name}: {precision.description}"
    )


def require_world_size(modes: Sequence[str], world_size: int | None, source: str) -> None:
    """Distributed-only modes without ``world_size`` are a usage error, said before anything runs."""
    only = [m for m in modes if m in DISTRIBUTED_ONLY]
    if only and world_size is None:
        raise ConfigError(
            f"{source}: mode{'s' if len(only) > 1 else ''} {', '.join(only)} run{'' if len(only) > 1 else 's'} only under "
            "torch.distributed; set world_size=N (e.g. @pytest.mark.amp_regression(world_size=2, ...))"
        )


# --- what this machine and torch can run ------------------------------------------------------


def backend_for(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def unavailable_reason(world_size: int, device: str) -> str | None:
    """Why ``world_size`` ranks cannot run on ``device`` here (no torch.distributed, backend, or devices), or None."""
    import torch

    from ..modes import parse_device

    device_type = parse_device(device).type
    try:
        import torch.distributed as dist
    except ImportError as exc:  # pragma: no cover - depends on the build
        return f"this torch {torch.__version__} has no torch.distributed: {exc}"
    if not dist.is_available():
        return f"this torch {torch.__version__} build has no torch.distributed (built without it)"
    if device_type == "cuda":
        if not dist.is_nccl_available():
            return f"world_size={world_size} on CUDA needs the NCCL backend, which this torch {torch.__version__} build lacks"
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count < world_size:
            return f"world_size={world_size} needs {world_size} CUDA devices (one per rank); this machine has {count}"
        return None
    if not dist.is_gloo_available():
        return f"world_size={world_size} on the CPU needs the gloo backend, which this torch {torch.__version__} build lacks"
    return None


def fsdp2_api():
    """(fully_shard, MixedPrecisionPolicy) from this torch, or a string saying why there is none.

    torch >= 2.6 exports them from ``torch.distributed.fsdp``; 2.4-2.5 only from the private
    ``torch.distributed._composable.fsdp``, asked only when the public one is missing.
    """
    import torch

    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        return fully_shard, MixedPrecisionPolicy
    except ImportError:
        pass
    try:
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard

        return fully_shard, MixedPrecisionPolicy
    except ImportError:
        return f"FSDP2 (fully_shard with MixedPrecisionPolicy) is not in this torch {torch.__version__}; it needs torch 2.4+"


def fsdp2_comm_context():
    """FSDP2's private ``FSDPCommContext`` class (its streams), or None: only to tell what it can run on."""
    import importlib

    for home in ("torch.distributed.fsdp._fully_shard", "torch.distributed._composable.fsdp"):  # torch >= 2.6, 2.4-2.5
        try:
            return importlib.import_module(f"{home}._fsdp_param_group").FSDPCommContext
        except (ImportError, AttributeError):
            continue
    return None


def fsdp2_off_cuda_reason() -> str | None:
    """Why this torch's FSDP2 cannot run off CUDA (on the CPU with gloo), or None.

    torch 2.4's fully_shard makes CUDA streams whatever its mesh's device (``FSDPCommContext.init()``);
    later ones make the device's own (``FSDPCommContext.lazy_init(device)``).
    """
    import inspect

    import torch

    context = fsdp2_comm_context()
    if context is None:
        return None  # cannot tell: let it run, and fail with torch's own error if it must
    lazy_init = getattr(context, "lazy_init", None)
    try:
        if lazy_init is not None and "device" in inspect.signature(lazy_init).parameters:
            return None
    except (TypeError, ValueError):
        return None
    return (
        f"FSDP2 in this torch {torch.__version__} runs on CUDA only (its fully_shard makes CUDA streams); on the CPU it needs a newer torch"
    )


def mode_unsupported_reason(name: str, device: str) -> str | None:
    """Why a distributed mode cannot run here, or None (checked here, so every rank runs the same modes)."""
    from ..modes import MODES, parse_device, unsupported_reason

    dmode = distributed_mode(name)
    reason = unsupported_reason(dmode.precision, device)
    if reason:
        return reason
    if dmode.comm_hook:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        if getattr(default_hooks, dmode.comm_hook, None) is None:
            import torch

            return f"this torch {torch.__version__} has no DDP communication hook {dmode.comm_hook}"
        if dmode.comm_hook.startswith("bf16") and parse_device(device).type == "cuda":
            return unsupported_reason(MODES["amp_bf16"], device)
    if dmode.strategy == "fsdp2":
        api = fsdp2_api()
        if isinstance(api, str):
            return api
        if parse_device(device).type != "cuda":
            reason = fsdp2_off_cuda_reason()
            if reason:
                return reason
        if dmode.param_dtype:
            reason = unsupported_reason(MODES["bf16" if dmode.param_dtype == "bfloat16" else "fp16"], device)
            if reason or dmode.param_dtype != "float16":
                return reason
            return fsdp2_fp16_reason()
    return None


def fsdp2_fp16_reason() -> str | None:
    """Why FSDP2 with float16 parameters cannot be loss-scaled in this torch, or None.

    float16 gradients underflow without loss scaling, so fsdp2_fp16 trains with ``torch.amp.GradScaler``
    (the recipe torch's own FSDP2 grad-scaler test uses).  That needs DTensor to unscale its gradients
    and to all-reduce the scaler's inf check, so every rank skips the same steps: DTensor's custom handler
    for ``aten._amp_foreach_non_finite_check_and_unscale_``, feature-detected here (absent in torch 2.4).
    """
    import torch

    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        try:
            from torch.distributed._tensor import DTensor
        except ImportError:
            return f"this torch {torch.__version__} has no DTensor, which FSDP2 needs"
    handlers = getattr(getattr(DTensor, "_op_dispatcher", None), "_custom_op_handlers", {})
    unscale = getattr(torch.ops.aten, "_amp_foreach_non_finite_check_and_unscale_", None)
    if unscale is not None and unscale.default in handlers:
        return None
    return (
        f"fsdp2_fp16 needs loss scaling, and this torch {torch.__version__} cannot unscale FSDP2's DTensor gradients "
        "with an inf check agreed across ranks (GradScaler support for DTensor came in a later torch); "
        "training float16 parameters without it lets small gradients underflow to zero: use fsdp2_bf16, or a newer torch"
    )


def env_key(base_key: str, world_size: int, device: str) -> str:
    """Baselines of distributed runs are their own environment: world size and backend change every figure."""
    from ..modes import parse_device

    return f"{base_key}|{backend_for(parse_device(device).type)}|world{world_size}"
