"""One rank of a distributed gate run; started by torchrun (``python -m torch.distributed.run ... -m
pytest_ampgate.distributed.worker JOB.json``), never imported by the test process.

Each rank joins the process group (gloo on CPUs, NCCL on ``cuda:LOCAL_RANK``), loads the same
workload and data (seeded, so every rank builds the same initial weights), keeps its strided
shard of the training set, and runs :func:`measurement.measure` with a runner factory that wraps
each mode's model in DDP (optionally with a gradient-compression hook) or FSDP2.  After training
it compares its parameters with every other rank's (DDP keeps replicas bit-identical) and writes
its result atomically to ``rank<N>.json`` in the job directory.

For the parent's diagnosis it also writes its pid, its last progress message, and on SIGUSR1
its Python stack (``faulthandler``); a rank that raises writes ``rank<N>.error.json`` and
re-raises, so torchrun's own error file (``@record``) names it too.  All of that is set up before
torch is imported (seconds per rank), so even a rank stuck in its first second can be diagnosed.
"""

from __future__ import annotations

import datetime
import faulthandler
import hashlib
import inspect
import json
import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path

from ..file_safety import write_atomic
from ..records import from_dict
from .agreement import Agreement, StepRecord
from .job import Job, RankError, RankResult, load_workload, write_record
from .modes import distributed_mode, fsdp2_api


def _atomic_write(path: Path, text: str) -> None:
    """The parent polls these files: it must see none or a whole one (the project's one atomic write)."""
    write_atomic(path, text.encode("utf-8"))


def _with_plants(runner, plants: list):
    """The runner, its ``step`` first applying the faults planted for this rank and mode (tests of the gate)."""
    if not plants:
        return runner
    step = runner.step

    def planted_step(x, y):
        for p in plants:
            if p.get("step", 0) == runner.steps_taken:
                x = _plant(p, x, where=f"{runner.mode.name} step {runner.steps_taken}")
        return step(x, y)

    runner.step = planted_step
    return runner


def _plant(p: dict, x=None, where: str = "start"):
    kind = p["kind"]
    if kind == "nan" and x is not None:
        import torch

        return torch.full_like(x, float("nan")) if x.is_floating_point() else x
    if kind == "hang":
        while True:
            time.sleep(1.0)
    if kind == "raise":
        raise RuntimeError(f"planted fault: rank {p['rank']} raised at {where}")
    if kind == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def _runner_factory(device, plants: list, made: dict, agreement, steps):
    """``measurement.measure``'s runner factory: the single-device set-up (:func:`mode_runner.prepare`), then the
    model wrapped in DDP, or sharded by FSDP2 (whose parameters then need a fresh optimizer), on the mode's
    own process group (:class:`.agreement.Agreement`); every step counted in the rank's step record."""
    import dataclasses

    import torch

    from ..mode_runner import ModeRunner, prepare

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

    def make(mode, initial_model, optimizer_factory, loss_fn, _device):
        dmode = distributed_mode(mode.name)
        runner = prepare(mode, initial_model, optimizer_factory, loss_fn, device)
        if dmode.strategy == "ddp":  # DDP keeps the module's parameters, so the optimizer built on them stays valid
            from torch.nn.parallel import DistributedDataParallel

            runner.model = DistributedDataParallel(
                runner.model, device_ids=[device.index] if device.type == "cuda" else None, process_group=agreement.group(mode.name)
            )
            if dmode.comm_hook:
                from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

                # state: the hook's process group (None would all-reduce on the world group, outside the mode's)
                runner.model.register_comm_hook(state=agreement.group(mode.name), hook=getattr(default_hooks, dmode.comm_hook))
        else:
            fully_shard, policy_type = fsdp2_api()
            from torch.distributed.device_mesh import DeviceMesh

            mesh = DeviceMesh.from_group(agreement.group(mode.name), device.type)
            # Outputs in float32, so the loss is computed in float32 as under autocast.
            policy = policy_type(
                param_dtype=dtypes.get(dmode.param_dtype), reduce_dtype=dtypes.get(dmode.reduce_dtype), output_dtype=torch.float32
            )
            model = runner.model
            for child in model.children():  # one all-gather unit per layer that has parameters, then the root
                if any(True for _ in child.parameters()):
                    fully_shard(child, mesh=mesh, mp_policy=policy)
            fully_shard(model, mesh=mesh, mp_policy=policy)
            # Sharding replaced the parameters (DTensors): a fresh optimizer; fp16 parameters get a loss scaler
            # (the GradScaler unscales DTensor gradients and all-reduces its inf check; see modes.fsdp2_fp16_reason).
            scaled = dataclasses.replace(mode, grad_scaler=dmode.param_dtype == "float16")
            runner = ModeRunner(scaled, model, optimizer_factory(model.parameters()), loss_fn, device)
        runner.step = steps.counted(runner.step)
        runner.wait_for_collectives = _collectives_waiter(agreement.group(mode.name))
        mine = [p for p in plants if p["kind"] in ("nan", "hang", "raise", "die") and p.get("mode") in (None, mode.name)]
        made[mode.name] = (dmode, _with_plants(runner, mine))
        return runner

    return make


def _collectives_waiter(group):
    """A wait until every collective already started on ``group`` has finished on the backend's own threads.

    DDP waits on each all-reduce's future, which gloo completes *before* its worker thread runs the
    collective's profiler end callback (``ProcessGroupGloo::AsyncWork::finishWorkGloo``: the future,
    then ``Work::finish``, which calls ``recordFunctionEndCallback_`` under the work's mutex).  Stopping
    a profiler in that gap frees the record queue the gloo thread is writing: torch 2.4 aborted a
    rank with "free(): corrupted unsorted chunks" in ``~KinetoThreadLocalState``.  A barrier waits
    for every in-progress and queued work of its group (``work->wait()``, which returns only after
    ``Work::finish``), so after it no gloo thread still touches the profiler.
    """
    import torch.distributed as dist

    def wait() -> None:
        dist.barrier(group=group)

    return wait


def _shard(dataset, rank: int, world_size: int):
    """Rank r trains on samples r, r+N, r+2N, ... (as DistributedSampler without shuffling); all evaluate on the whole test set."""
    import dataclasses

    return dataclasses.replace(
        dataset, train_x=dataset.train_x[rank::world_size].contiguous(), train_y=dataset.train_y[rank::world_size].contiguous()
    )


def _fingerprint(model) -> list[tuple[str, str, float]]:
    import torch

    module = getattr(model, "module", model)
    out = []
    for name, p in module.named_parameters():
        t = p.detach().to("cpu").contiguous()
        digest = hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()[:20]
        out.append((name, digest, float(t.double().sum())))
    return out


def _compare_replicas(made: dict, order: list[str], world_size: int) -> dict:
    """Every rank's parameter fingerprints gathered with ``all_gather_object``; the first that differs, by name."""
    import torch.distributed as dist

    replicas = {}
    for name in order:
        dmode, runner = made[name]
        if dmode.strategy != "ddp":
            replicas[name] = {"checked": False, "reason": "FSDP2 shards the parameters: each rank holds its own part, no replicas"}
            continue
        local = _fingerprint(runner.model)
        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, local)
        diverged, first = [], None
        for i, (param, digest, total) in enumerate(gathered[0]):
            for r in range(1, world_size):
                if gathered[r][i][1] != digest:
                    diverged.append(param)
                    if first is None:
                        first = {"parameter": param, "ranks": [0, r], "sums": [total, gathered[r][i][2]]}
                    break
        replicas[name] = {"checked": True, "parameters": len(local), "diverged": diverged, "first_diverged": first}
    return replicas


def run_rank(job: Job, rank: int, world_size: int, local_rank: int, say, steps, *, join: bool = True) -> RankResult:
    """This rank's part of the job: join the process group (unless ``join`` is False: pytest is itself a
    rank of a job that joined already), measure every mode on its own group with the ranks' agreement,
    compare replicas; the groups made for the run are destroyed at the end."""
    import torch
    import torch.distributed as dist

    from ..measurement import measure
    from ..modes import MODES, PrecisionMode

    device = torch.device(f"cuda:{local_rank}") if job.device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    plants = [p for p in job.plants if p["rank"] == rank]
    options = {"timeout": datetime.timedelta(seconds=job.pg_timeout_s)}
    if device.type == "cuda" and "device_id" in inspect.signature(dist.init_process_group).parameters:
        options["device_id"] = device  # NCCL binds this rank's GPU at once (torch >= 2.3), not guessed at the first collective
    if join:
        dist.init_process_group(job.backend, **options)
        say("joined the process group")
    workload = load_workload(job.workload, job.workload_options)
    config = job.measure
    if job.download and local_rank != 0:
        dist.barrier()  # local rank 0 downloads first; the others read its files
    dataset = workload.dataset(device, root=job.data_root, download=job.download, seed=config.seed)
    if job.download and local_rank == 0:
        dist.barrier()
    modes = [MODES[n] if n in MODES else PrecisionMode(n, distributed_mode(n).description) for n in job.modes]
    made: dict = {}
    names = [config.reference_mode, *[n for n in job.modes if n != config.reference_mode]]
    agreement = Agreement(names, job.backend, options["timeout"], release=lambda name: made.pop(name, None))
    m = measure(
        workload,
        modes,
        device=device,
        config=config,
        dataset=_shard(dataset, rank, world_size),
        progress=say,
        runner_factory=_runner_factory(device, plants, made, agreement, steps),
        after_phase=agreement,
    )
    for p in plants:
        if p["kind"] == "perturb":
            for name, (_dmode, runner) in made.items():
                if p.get("mode") in (None, name):
                    params = dict(getattr(runner.model, "module", runner.model).named_parameters())
                    target = params[p.get("parameter") or next(iter(params))]
                    with torch.no_grad():
                        target.add_(float(p.get("by", 1e-3)))
    say("comparing replicas")
    order = [n for n in [config.reference_mode, *job.modes] if n in made]
    replicas = _compare_replicas(made, order, world_size)
    agreement.close()
    return RankResult(rank, world_size, socket.gethostname(), str(device), m.to_dict(), replicas)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    job = from_dict(Job, json.loads(Path(argv[0]).read_text()))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    job_dir = Path(job.job_dir)
    _atomic_write(job_dir / f"rank{rank}.pid", str(os.getpid()))
    stack_file = open(job_dir / f"rank{rank}.stack", "w")  # noqa: SIM115 - held open for faulthandler until exit
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)

    def say(message: str) -> None:
        _atomic_write(job_dir / f"rank{rank}.progress", message)

    say("started")
    try:
        for p in job.plants:
            if p["rank"] == rank and p.get("step") is None and p["kind"] in ("hang", "raise", "die"):
                _plant(p, where="start")
        from torch.distributed.elastic.multiprocessing.errors import record

        # @record: torchrun's error file then names this rank and its exception in the launcher's summary.
        steps = StepRecord(job_dir / f"rank{rank}.steps")
        write_record(job_dir / f"rank{rank}.json", record(run_rank)(job, rank, world_size, local_rank, say, steps))
        say("done")
    except BaseException as exc:
        frames = traceback.extract_tb(exc.__traceback__)
        last = frames[-1] if frames else None
        error = RankError(
            rank,
            type(exc).__name__,
            message=str(exc).splitlines()[0] if str(exc) else "",
            where=f"{Path(last.filename).name}:{last.lineno} in {last.name}" if last else "",
            traceback=traceback.format_exc(),
            time=time.time(),
        )
        write_record(job_dir / f"rank{rank}.error.json", error)
        raise
    finally:
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    status = main()
    # The result is on disk and the process group is gone: skip the interpreter's slow teardown of
    # torch (seconds per rank on a small machine), which would only delay the launcher's exit.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
