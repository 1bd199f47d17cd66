"""Gating across machines: pytest started as one rank of a torch.distributed job.

On several nodes, torch's own launcher starts pytest on every node (``torchrun --nnodes=N
--nproc-per-node=P --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT -m pytest --ampgate ...``), or a
cluster scheduler does and sets the same environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``).  Then this process is already a rank: a gated test with
``world_size`` runs its modes across the whole job in this process (no nested launcher), every rank
gathers every rank's result and judges the same merged record, so every rank's pytest reports the
same outcome, and only global rank 0 writes reports and baselines (:func:`writes_outputs`).

A rank that fails or a node that dies ends the survivors' collectives ("Connection closed by peer"
on gloo) or lets them time out after ``distributed_timeout``; the test then fails with a
:class:`DistributedError` naming this rank and what it saw, and every later gated test of the
session fails at once with the same cause (the job's process group is gone).
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
from pathlib import Path

JOB_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
"""What torchrun and the schedulers' torch.distributed integrations set for every rank."""

_broken: list[str] = []
"""Why this process's job can run nothing more (set once a collective of the job failed)."""


def job_rank() -> int | None:
    """This process's global rank when it is one rank of a torch.distributed job, else None."""
    if not all(os.environ.get(k) for k in JOB_ENV):
        return None
    try:
        return int(os.environ["RANK"])
    except ValueError:
        return None


def job_world_size(default: int | None) -> int | None:
    """The job's world size when this process is a rank of one (a gated test then spans the job), else ``default``."""
    return int(os.environ["WORLD_SIZE"]) if job_rank() is not None and default is not None else default


def local_ranks(world_size: int) -> int:
    """How many ranks run on this machine: the launcher's ``LOCAL_WORLD_SIZE`` in a job, else all of them."""
    if job_rank() is None:
        return world_size
    return int(os.environ.get("LOCAL_WORLD_SIZE") or world_size)


def gpus_for(gate, test_id: str, config=None) -> tuple[int | None, int | None]:
    """(world_size, local_rank) of a gated test, for its device locks: the ranks it launches, or this
    process's own GPU when it is one rank of a job.  A marker that does not parse locks one device
    (the test then reports the error itself)."""
    from ..errors import AmpGateError

    if job_rank() is not None:
        return None, int(os.environ.get("LOCAL_RANK", "0"))
    try:
        config = config if config is not None else gate.config_for(test_id)
    except AmpGateError:
        return None, None
    return config.world_size, None


def writes_outputs() -> bool:
    """Only global rank 0 of a job writes reports and baselines (every process does outside a job)."""
    return job_rank() in (None, 0)


def run_in_job(job, *, timeout_s: float, say):
    """This rank's part of ``job`` in this process, then every rank's result (in rank order) gathered to all."""
    import torch.distributed as dist

    from ..records import from_dict, to_dict
    from .agreement import StepRecord
    from .job import DistributedError, RankResult
    from .worker import run_rank

    rank, world_size = job_rank(), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    where = f"rank {rank} of {world_size} on {socket.gethostname()}"
    if _broken:
        raise DistributedError(f"distributed job unusable ({where}): {_broken[0]}")
    if not dist.is_initialized():
        dist.init_process_group(job.backend, timeout=datetime.timedelta(seconds=timeout_s))  # env:// from the launcher
    with tempfile.TemporaryDirectory(prefix="ampgate-rank-") as scratch:
        job.job_dir = scratch
        try:
            result = run_rank(job, rank, world_size, local_rank, say, StepRecord(Path(scratch) / "steps"), join=False)
            gathered: list = [None] * world_size
            dist.all_gather_object(gathered, to_dict(result))
        except Exception as exc:  # a peer died or timed out: this job's group is unusable from now on
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            _broken.append(f"a collective failed on {where}: {type(exc).__name__}: {first}")
            raise DistributedError(
                f"distributed job failed ({where}): {type(exc).__name__}: {first}; another rank or node of the job "
                "failed or went away (its own log names it), so this rank stopped"
            ) from None
    return [from_dict(RankResult, r) for r in gathered]
