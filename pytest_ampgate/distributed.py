"""The gate for data-parallel training: DDP and FSDP2 runs under torch's elastic launcher, judged as one.

Mixed precision breaks in multi-process training in ways one device never shows: gradients
compressed to fp16/bf16 for the all-reduce, FSDP2's parameter and reduction dtypes, one rank going
non-finite while the others do not, replicas drifting apart.  So a gated test with ``world_size=N``
runs its workload on N ranks of ``torch.distributed`` (gloo on CPUs, NCCL on GPUs), started by
``torch.distributed.run`` (torchrun) in a process group of its own, each rank running the same
measurement protocol as a single-device run (:func:`measurement.measure`, with each mode's model
wrapped in DDP or FSDP2 by :mod:`distributed_worker`).  This process then merges the ranks into one
:class:`~measurement.Measurements` (the slowest rank's step time per round, the largest peak
memory, the mean loss per step with any rank's non-finite step kept, the lowest accuracy), which
the ordinary gate judges, plus the checks only several ranks have: which rank went non-finite
first, and whether every replica ended with identical parameters.

Objects cannot cross process boundaries, so the workload travels as a reference: a built-in name
or ``"module:function"`` naming an importable factory that returns a :class:`Workload`.

Nothing here imports torch at module level: the mode table is read when markers are validated.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import AmpGateError, ConfigError

LAUNCHER = "torch.distributed.run"
WORKER_MODULE = "pytest_ampgate.distributed_worker"
PLANT_ENV = "PYTEST_AMPGATE_DISTRIBUTED_PLANT"
"""JSON list of planted faults for the ranks (tests of the gate itself); see :data:`PLANT_KINDS`."""
PLANT_KINDS = ("nan", "perturb", "hang", "raise", "die")


class DistributedError(AmpGateError):
    """A distributed run did not finish: a rank raised, died or hung (the message names it)."""


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


def distributed_mode(name: str) -> DistributedMode:
    """The distributed mode of a name: one of :data:`DISTRIBUTED_ONLY`, or DDP under a precision mode."""
    key = name.strip().lower()
    if key in DISTRIBUTED_ONLY:
        return DISTRIBUTED_ONLY[key]
    from .modes import resolve_mode

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

    device_type = device.split(":")[0]
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


def mode_unsupported_reason(name: str, device: str) -> str | None:
    """Why a distributed mode cannot run here, or None (checked here, so every rank runs the same modes)."""
    from .modes import MODES, unsupported_reason

    dmode = distributed_mode(name)
    reason = unsupported_reason(dmode.precision, device)
    if reason:
        return reason
    if dmode.comm_hook:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        if getattr(default_hooks, dmode.comm_hook, None) is None:
            import torch

            return f"this torch {torch.__version__} has no DDP communication hook {dmode.comm_hook}"
        if dmode.comm_hook.startswith("bf16") and device.startswith("cuda"):
            return unsupported_reason(MODES["amp_bf16"], device)
    if dmode.strategy == "fsdp2":
        api = fsdp2_api()
        if isinstance(api, str):
            return api
        if dmode.param_dtype:
            return unsupported_reason(MODES["bf16" if dmode.param_dtype == "bfloat16" else "fp16"], device)
    return None


# --- workloads by reference ---------------------------------------------------------------------


def load_workload(reference: str, options: dict | None = None):
    """The Workload a reference names: a built-in name, or ``module:function`` returning a Workload."""
    from .workloads import BUILTIN, Workload, get_workload

    if reference in BUILTIN:
        workload = get_workload(reference)
    else:
        module_name, sep, attr = reference.partition(":")
        if not sep or not module_name or not attr:
            raise ConfigError(
                f"distributed workload {reference!r}: name a built-in workload ({', '.join(BUILTIN)}) or an importable "
                "factory as 'module:function' that returns a pytest_ampgate.Workload"
            )
        try:
            target = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"distributed workload {reference!r} cannot be imported: {type(exc).__name__}: {exc}") from None
        workload = target() if callable(target) and not isinstance(target, Workload) else target
        if not isinstance(workload, Workload):
            raise ConfigError(f"distributed workload {reference!r} gave {type(workload).__name__}, expected a pytest_ampgate.Workload")
    return workload.with_options(**options) if options else workload


def workload_reference(workload) -> tuple[str, Any]:
    """(reference, Workload) for a gated run with ``world_size``; a Workload object cannot reach the ranks."""
    if not isinstance(workload, str):
        raise ConfigError(
            f"world_size runs the workload in other processes, which cannot receive a {type(workload).__name__} object: "
            "pass a built-in name or 'module:function' (an importable factory returning the Workload), "
            "e.g. ampgate.run('tests.my_workloads:my_model')"
        )
    return workload, load_workload(workload)


def env_key(base_key: str, world_size: int, device: str) -> str:
    """Baselines of distributed runs are their own environment: world size and backend change every figure."""
    return f"{base_key}|{backend_for(device.split(':')[0])}|world{world_size}"


# --- launching ------------------------------------------------------------------------------------


def plants_from_env() -> list[dict]:
    """Planted faults from :data:`PLANT_ENV` (a JSON list), validated so a typo cannot pass silently."""
    text = os.environ.get(PLANT_ENV, "").strip()
    if not text:
        return []
    try:
        plants = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"${PLANT_ENV} must be a JSON list of faults: {exc}") from None
    plants = plants if isinstance(plants, list) else [plants]
    for p in plants:
        if not isinstance(p, dict) or p.get("kind") not in PLANT_KINDS or not isinstance(p.get("rank"), int):
            raise ConfigError(f"${PLANT_ENV}: each fault is {{'kind': one of {', '.join(PLANT_KINDS)}, 'rank': N, ...}}, got {p!r}")
    return plants


def measure_distributed(
    workload: str,
    modes: Sequence[str],
    *,
    world_size: int,
    device: str = "cuda",
    config=None,
    timeout_s: float = 300.0,
    workload_options: dict | None = None,
    data_root: str | None = None,
    download: bool = False,
    progress: Callable[[str], None] | None = None,
    plants: Sequence[dict] | None = None,
):
    """Run ``workload`` (a reference) on ``world_size`` ranks under each mode; one merged Measurements.

    Raises :class:`DistributedError` naming the rank when a rank raises, dies or hangs past
    ``timeout_s`` (then every process of the run is killed).
    """
    from .config import MeasureConfig
    from .measurement import _compare
    from .results import ModeMeasurement

    started = time.perf_counter()
    config = config or MeasureConfig()
    device_type = device.split(":")[0]
    say = progress or (lambda _msg: None)
    reason = unavailable_reason(world_size, device)
    if reason:
        raise DistributedError(reason)
    names = [distributed_mode(m).name for m in modes]
    unsupported = {n: r for n in [config.reference_mode, *names] if (r := mode_unsupported_reason(n, device))}
    if config.reference_mode in unsupported:
        raise DistributedError(f"the reference mode {config.reference_mode} cannot run: {unsupported[config.reference_mode]}")
    spec = {
        "workload": workload,
        "workload_options": workload_options or {},
        "modes": [n for n in names if n not in unsupported],
        "measure": config.to_dict(),
        "device_type": device_type,
        "backend": backend_for(device_type),
        "data_root": data_root,
        "download": download,
        "pg_timeout_s": timeout_s + 60,  # longer than ours, so a hang is diagnosed here, with every rank's stack
        "plants": list(plants if plants is not None else plants_from_env()),
    }
    job_dir = Path(tempfile.mkdtemp(prefix="ampgate-dist-"))
    spec["job_dir"] = str(job_dir)
    say(f"{workload}: launching {world_size} ranks ({spec['backend']}) for {config.reference_mode}, {', '.join(spec['modes'])}")
    try:
        ranks = launch(spec, world_size=world_size, timeout_s=timeout_s, job_dir=job_dir, progress=say)
    finally:
        shutil.rmtree(job_dir, ignore_errors=True)
    merged = merge(ranks, config, spec)
    for name in names:
        if name in unsupported:
            merged.modes[name] = ModeMeasurement(name, supported=False, unsupported_reason=unsupported[name])
            merged.comparisons[name] = _compare(merged.reference, merged.modes[name], config)
    merged.modes = {n: merged.modes[n] for n in names if n in merged.modes}
    merged.comparisons = {n: merged.comparisons[n] for n in names if n in merged.comparisons}
    merged.distributed["modes"] = {n: distributed_mode(n).description for n in [config.reference_mode, *names]}
    merged.distributed["launch_wall_time_s"] = round(time.perf_counter() - started, 3)
    merged.wall_time_s = time.perf_counter() - started
    return merged


def launch(spec: dict, *, world_size: int, timeout_s: float, job_dir: Path, progress=None) -> list[dict]:
    """torchrun the worker on ``world_size`` ranks; every rank's result, in rank order.

    The launcher runs in a session of its own; its workers start sessions of their own too
    (torchrun does that), so on a timeout every process is found and killed by pid.
    """
    spec_path = job_dir / "job.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [
        sys.executable,
        "-m",
        LAUNCHER,
        "--standalone",
        f"--nproc-per-node={world_size}",
        "--max-restarts=0",
        "--monitor-interval=0.1",
        "-m",
        WORKER_MODULE,
        str(spec_path),
    ]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [*sys.path, env.get("PYTHONPATH", "")] if p)
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default for several ranks, set here so it says nothing
    env.pop(PLANT_ENV, None)  # faults travel in the job spec only
    log_path = job_dir / "launcher.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
    deadline = time.monotonic() + timeout_s
    said = ""
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
            if progress:
                note = _read(job_dir / "rank0.progress")
                if note and note != said:
                    progress(f"rank 0: {note}")
                    said = note
    except BaseException:  # Ctrl-C: leave nothing running
        _kill_all(proc, job_dir, world_size)
        raise
    if proc.poll() is None:
        stacks = _dump_stacks(job_dir, world_size)
        leftover = _kill_all(proc, job_dir, world_size)
        raise DistributedError(_hang_message(timeout_s, world_size, job_dir, stacks, leftover))
    results = {r: _load(job_dir / f"rank{r}.json") for r in range(world_size)}
    if proc.returncode == 0 and all(results.values()):
        return [results[r] for r in range(world_size)]
    leftover = _kill_all(proc, job_dir, world_size)
    raise DistributedError(_failure_message(proc.returncode, world_size, job_dir, results, leftover))


def _die_with_parent() -> None:
    """Linux, in the launcher's child before exec: SIGTERM it when this process dies, however it dies.

    A CI job killed hard (``kill -9``, an OOM kill) would otherwise leave torchrun and its ranks
    running in their own sessions; on SIGTERM torchrun stops its ranks itself.
    """
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --- stopping, and saying what happened -------------------------------------------------------------


def _children(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc; empty where there is none)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True


def _rank_pids(job_dir: Path, world_size: int) -> dict[int, int]:
    pids = {}
    for r in range(world_size):
        text = _read(job_dir / f"rank{r}.pid")
        if text.isdigit():
            pids[r] = int(text)
    return pids


def _dump_stacks(job_dir: Path, world_size: int) -> dict[int, str]:
    """Ask each live rank for its Python stack (faulthandler on SIGUSR1, see distributed_worker)."""
    pids = {r: p for r, p in _rank_pids(job_dir, world_size).items() if _alive(p)}
    for pid in pids.values():
        try:
            os.kill(pid, signal.SIGUSR1)
        except OSError:
            pass
    stacks: dict[int, str] = {}
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline and len(stacks) < len(pids):
        time.sleep(0.1)
        for r in pids:
            text = _read(job_dir / f"rank{r}.stack")
            if "File " in text:
                stacks[r] = text
    return stacks


def _kill_all(proc: subprocess.Popen, job_dir: Path, world_size: int) -> list[int]:
    """Kill the ranks (each in a session of its own), the launcher and anything they started; pids left alive."""
    pids = set(_rank_pids(job_dir, world_size).values()) | set(_children(proc.pid))
    for pid in sorted(pids):
        for kill in (lambda p: os.killpg(p, signal.SIGKILL), lambda p: os.kill(p, signal.SIGKILL)):
            try:
                kill(pid)
            except OSError:
                pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    return sorted(p for p in [*pids, proc.pid] if _alive(p))


_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+) in (?P<func>\S+)')


def _where(stack: str) -> tuple[str, bool]:
    """(innermost frame of our or the user's code, whether the rank sits inside torch: waiting for the others)."""
    frames = _FRAME.findall(stack)  # most recent call first
    if not frames:
        return "no Python stack", False
    in_torch = f"{os.sep}torch{os.sep}" in frames[0][0]
    own = next((f for f in frames if f"{os.sep}torch{os.sep}" not in f[0]), frames[0])
    return f"{Path(own[0]).name}:{own[1]} in {own[2]}", in_torch


def _hang_message(timeout_s, world_size, job_dir: Path, stacks: dict[int, str], leftover: list[int]) -> str:
    parts, culprits = [], []
    for r in range(world_size):
        note = _read(job_dir / f"rank{r}.progress") or "never started"
        if r in stacks:
            where, waiting = _where(stacks[r])
            state = "waiting inside torch (a collective, or backward's all-reduce)" if waiting else "not in a collective"
            if not waiting:
                culprits.append(r)
            parts.append(f"rank {r}: {state} at {where}; last step: {note}")
        else:
            parts.append(f"rank {r}: no stack (not running); last step: {note}")
    head = f"distributed run hung: no result within distributed_timeout={timeout_s:g} s"
    if culprits and len(culprits) < world_size:
        head += f"; rank {', '.join(map(str, culprits))} stopped responding while the others waited for it"
    text = head + "\n  " + "\n  ".join(parts)
    text += "\n  " + (f"all {world_size} ranks and the launcher were killed" if not leftover else f"processes still alive: {leftover}")
    return text


_ROOT = re.compile(r"rank\s*:\s*(\d+)[^\n]*\n\s*exitcode\s*:\s*(-?\d+)")


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _failure_message(returncode, world_size, job_dir: Path, results: dict, leftover: list[int]) -> str:
    log = _read(job_dir / "launcher.log")
    exits = {int(r): int(c) for r, c in _ROOT.findall(log)}
    root = _ROOT.search(log.rpartition("Root Cause")[2]) if "Root Cause" in log else None
    first = int(root.group(1)) if root else None  # torchrun's "Root Cause (first observed failure)"
    errors = {r: e for r in range(world_size) if (e := _load(job_dir / f"rank{r}.error.json"))}
    if first is None and errors:
        first = min(errors, key=lambda r: errors[r].get("time", 0))

    def about(r: int) -> str:
        if r in errors:
            e = errors[r]
            where = f" ({e['where']})" if e.get("where") else ""
            return f"rank {r} raised {e['type']}: {e['message']}{where}"
        if results.get(r):
            return f"rank {r} finished"
        if r in exits:
            if first == r:
                return f"rank {r} died: it {_exit_text(exits[r])}"
            return f"rank {r} was stopped by the launcher (SIGTERM)" if exits[r] == -signal.SIGTERM else f"rank {r} {_exit_text(exits[r])}"
        return f"rank {r} gave no result"

    if first is None:
        head = f"distributed run failed: the launcher exited with code {returncode} and no rank said why"
    else:
        head = f"distributed run failed: {about(first)}"
    others = [about(r) for r in range(world_size) if r != first]
    text = head + ("\n  then: " + "; ".join(others) if others else "")
    if first is None:
        text += "\n  launcher output (last lines):\n    " + "\n    ".join(log.splitlines()[-15:])
    if leftover:
        text += f"\n  processes still alive: {leftover}"
    return text


# --- merging the ranks ----------------------------------------------------------------------------


def merge(ranks: list[dict], config, spec: dict):
    """One Measurements from every rank's: what decides a distributed run is its worst rank."""
    import math

    from .measurement import _compare
    from .modes import MODES
    from .results import Measurements, ModeMeasurement

    per_rank = [Measurements.from_dict(r["measurements"]) for r in ranks]
    base = per_rank[0]

    def merged_mode(name: str) -> ModeMeasurement:
        ms = [m.reference if m.reference.mode == name else m.modes[name] for m in per_rank]
        out = ModeMeasurement(name, supported=all(m.supported for m in ms))
        out.unsupported_reason = next((m.unsupported_reason for m in ms if m.unsupported_reason), "")
        out.error = "; ".join(f"rank {r}: {m.error}" for r, m in enumerate(ms) if m.error)
        rounds = min(len(m.step_times_s) for m in ms)
        out.step_times_s = [max(m.step_times_s[i] for m in ms) for i in range(rounds)]
        peaks = [m.peak_memory_bytes for m in ms]
        out.peak_memory_bytes = None if any(p is None for p in peaks) else max(peaks)
        out.memory_note = ms[0].memory_note
        steps = min(len(m.losses) for m in ms)
        out.record_losses(
            [
                math.fsum(m.losses[i] for m in ms) / len(ms)
                if all(math.isfinite(m.losses[i]) for m in ms)
                else next(m.losses[i] for m in ms if not math.isfinite(m.losses[i]))
                for i in range(steps)
            ]
        )
        accuracies = [m.accuracy for m in ms if m.accuracy is not None]
        out.accuracy = min(accuracies) if accuracies else None
        out.scaler = ms[0].scaler
        out.precision_coverage = ms[0].precision_coverage if name in MODES else None
        return out

    reference = merged_mode(base.reference.mode)
    modes = {name: merged_mode(name) for name in base.modes}
    comparisons = {name: _compare(reference, m, config) for name, m in modes.items()}
    rank_records = []
    for r, (raw, m) in enumerate(zip(ranks, per_rank, strict=True)):
        rank_records.append(
            {
                "rank": r,
                "host": raw.get("host"),
                "device": raw.get("device"),
                "modes": {
                    mm.mode: {
                        "step_time_s": mm.step_time_s,
                        "peak_memory_bytes": mm.peak_memory_bytes,
                        "first_nonfinite_step": mm.first_nonfinite_step,
                        "nonfinite_steps": mm.nonfinite_steps,
                        "final_loss": None if mm.final_loss is None or not math.isfinite(mm.final_loss) else mm.final_loss,
                        "accuracy": mm.accuracy,
                        "error": mm.error,
                    }
                    for mm, _c in m.each_mode()
                },
            }
        )
    return Measurements(
        workload=base.workload,
        device=spec["device_type"],
        config=config,
        batch_size=base.batch_size,
        environment=base.environment,
        dataset={**base.dataset, "sharded": f"training set split over {len(ranks)} ranks (strided: rank r takes samples r, r+N, ...)"},
        reference=reference,
        modes=modes,
        comparisons=comparisons,
        noise=base.noise,
        distributed={
            "world_size": len(ranks),
            "backend": spec["backend"],
            "launcher": LAUNCHER,
            "batch_size_per_rank": base.batch_size,
            "ranks": rank_records,
            "replicas": ranks[0].get("replicas", {}),
            "plants": spec.get("plants", []),
        },
    )


# --- the checks only several ranks have -------------------------------------------------------------


def judge(measurements, verdict):
    """The gate's verdict with the distributed checks: the rank that went non-finite first, replica drift."""
    from .verdict import FAIL, PASS, SKIPPED, Check, Verdict

    info = measurements.distributed
    ranks = info.get("ranks", [])
    checks = []
    for c in verdict.checks:
        if c.metric == "finite_loss" and c.outcome == FAIL:
            firsts = {r["rank"]: r["modes"].get(c.mode, {}).get("first_nonfinite_step") for r in ranks}
            firsts = {r: s for r, s in firsts.items() if s is not None}
            if firsts:
                step = min(firsts.values())
                first_ranks = [r for r, s in firsts.items() if s == step]
                later = [f"rank {r} from step {s}" for r, s in sorted(firsts.items()) if s != step]
                fine = [str(r["rank"]) for r in ranks if r["rank"] not in firsts]
                who = "ranks " + ", ".join(map(str, first_ranks)) if len(first_ranks) > 1 else f"rank {first_ranks[0]}"
                why = f"{c.mode} loss non-finite first on {who} at step {step}"
                if later:
                    why += f"; then {', '.join(later)} (the all-reduce spreads it)"
                if fine:
                    why += f"; finite throughout on rank {', '.join(fine)}"
                c = dataclasses.replace(c, why=why, measured=step)
        checks.append(c)
    for name, replica in info.get("replicas", {}).items():
        if not replica.get("checked"):
            checks.append(Check(name, "replicas", SKIPPED, f"{name} replicas not compared: {replica.get('reason', '')}"))
            continue
        first = replica.get("first_diverged")
        if first is None:
            checks.append(
                Check(
                    name,
                    "replicas",
                    PASS,
                    f"{name} all {info['world_size']} ranks hold identical parameters after training ({replica['parameters']} tensors)",
                    measured=0,
                    threshold=0,
                )
            )
        else:
            checks.append(
                Check(
                    name,
                    "replicas",
                    FAIL,
                    f"{name} ranks diverged after training: parameter {first['parameter']!r} differs between rank "
                    f"{first['ranks'][0]} and rank {first['ranks'][1]} (sum {first['sums'][0]:.6g} vs {first['sums'][1]:.6g}; "
                    f"{len(replica['diverged'])} of {replica['parameters']} tensors differ); DDP keeps replicas bit-identical, "
                    "so one rank's update went astray",
                    measured=len(replica["diverged"]),
                    threshold=0,
                )
            )
    return Verdict(checks, confirmed=verdict.confirmed, reference=verdict.reference)
