"""The facts of the distributed-only modes: a torch-free table that config and distributed both read.

``config`` validates mode names when markers are read (before torch is imported), and
:mod:`pytest_ampgate.distributed` runs the modes; both point down to this table, so neither
reaches into the other.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DistributedMode:
    """How one distributed mode wraps the model: the data-parallel strategy and its precision knobs."""

    name: str
    strategy: str
    """'ddp' (DistributedDataParallel) or 'fsdp2' (``fully_shard``)."""
    precision: str = "fp32"
    """The single-device precision mode each rank trains in (autocast, scaler, parameter dtype)."""
    comm_hook: str | None = None
    """A DDP communication hook from ``torch.distributed.algorithms.ddp_comm_hooks.default_hooks``."""
    param_dtype: str | None = None
    """FSDP2 ``MixedPrecisionPolicy.param_dtype``: the dtype parameters are all-gathered and computed in."""
    reduce_dtype: str | None = None
    """FSDP2 ``MixedPrecisionPolicy.reduce_dtype``: the dtype gradients are reduce-scattered in."""
    description: str = ""


DISTRIBUTED_ONLY: dict[str, DistributedMode] = {
    m.name: m
    for m in (
        DistributedMode(
            "fp16_compress_hook",
            "ddp",
            comm_hook="fp16_compress_hook",
            description="DDP, fp32 training, gradients all-reduced in float16 (fp16_compress_hook)",
        ),
        DistributedMode(
            "bf16_compress_hook",
            "ddp",
            comm_hook="bf16_compress_hook",
            description="DDP, fp32 training, gradients all-reduced in bfloat16 (bf16_compress_hook)",
        ),
        DistributedMode("fsdp2", "fsdp2", description="FSDP2 fully_shard, float32 throughout"),
        DistributedMode(
            "fsdp2_bf16",
            "fsdp2",
            param_dtype="bfloat16",
            reduce_dtype="float32",
            description="FSDP2 fully_shard, MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)",
        ),
        DistributedMode(
            "fsdp2_fp16",
            "fsdp2",
            param_dtype="float16",
            reduce_dtype="float32",
            description="FSDP2 fully_shard, MixedPrecisionPolicy(param_dtype=float16, reduce_dtype=float32)",
        ),
    )
}
"""Modes that exist only with ``world_size``; every single-device precision mode also runs under DDP."""
