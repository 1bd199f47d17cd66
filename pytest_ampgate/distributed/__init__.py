"""The gate for data-parallel training: DDP and FSDP2 runs under torch's elastic launcher, judged as one.

Mixed precision breaks in multi-process training in ways one device never shows: gradients
compressed to fp16/bf16 for the all-reduce, FSDP2's parameter and reduction dtypes, one rank going
non-finite while the others do not, replicas drifting apart.  So a gated test with ``world_size=N``
runs its workload on N ranks of ``torch.distributed`` (gloo on CPUs, NCCL on GPUs), started by
``torch.distributed.run`` (torchrun) in a process group of its own, each rank running the same
measurement protocol as a single-device run.  One step per module:

* :mod:`.modes`: the distributed modes (DDP under any precision mode, compression hooks, FSDP2)
  and what this machine and torch can run of them;
* :mod:`.job`: what travels to the ranks (the workload by reference, planted faults);
* :mod:`.launch`: :func:`measure_distributed`: torchrun started, watched and stopped, failures named;
* :mod:`.worker`: one rank (``python -m pytest_ampgate.distributed.worker``), each mode's model
  wrapped in DDP or FSDP2 around :func:`pytest_ampgate.measurement.measure`;
* :mod:`.agreement`: a process group per mode and the ranks' agreement after every phase, so a rank
  that raises fails that mode on every rank at once, named; step records that name a hung rank;
* :mod:`.merge`: the ranks merged into one Measurements for the ordinary gate (every rank's noise and
  timings, the slowest rank per mode), and the checks only several ranks have (the rank that went
  non-finite first, replica drift);
* :mod:`.in_job`: pytest that is itself one rank of a job (torchrun on every node, or a scheduler):
  the test runs across the whole job in this process, and only global rank 0 writes.

Nothing here imports torch at module level: the mode table is read when markers are validated.
"""

from .job import PLANT_ENV, load_workload, workload_reference
from .launch import DistributedError, measure_distributed
from .merge import judge, merge
from .modes import (
    DISTRIBUTED_ONLY,
    DistributedMode,
    backend_for,
    distributed_mode,
    env_key,
    fsdp2_api,
    mode_unsupported_reason,
    require_world_size,
    unavailable_reason,
)

__all__ = [
    "DISTRIBUTED_ONLY",
    "PLANT_ENV",
    "DistributedError",
    "DistributedMode",
    "backend_for",
    "distributed_mode",
    "env_key",
    "fsdp2_api",
    "judge",
    "load_workload",
    "measure_distributed",
    "merge",
    "mode_unsupported_reason",
    "require_world_size",
    "unavailable_reason",
    "workload_reference",
]
