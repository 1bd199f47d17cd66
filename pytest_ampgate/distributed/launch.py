"""Launching a distributed run: torchrun in a session of its own, watched, and stopped whole.

:func:`measure_distributed` writes the job, starts ``torch.distributed.run`` with the rank entry
point (:mod:`pytest_ampgate.distributed.worker`), polls it against ``distributed_timeout``, and on
a hang or a failure kills every process of the run and says which rank did what: the rank outside a
collective (from each rank's Python stack), the rank that raised or died first.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .agreement import read_step_record, stopped_first
from .in_job import job_rank, job_world_size, local_ranks, run_in_job
from .job import (
    LAUNCHER,
    PLANT_ENV,
    WORKER_MODULE,
    DistributedError,
    Job,
    RankError,
    RankResult,
    plants_from_env,
    read_record,
    write_record,
)
from .merge import merge
from .modes import backend_for, distributed_mode, mode_unsupported_reason, unavailable_reason


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
    from ..config import MeasureConfig
    from ..measurement import compare_modes
    from ..modes import parse_device
    from ..results import ModeMeasurement

    started = time.perf_counter()
    config = config or MeasureConfig()
    device_type = parse_device(device).type
    say = progress or (lambda _msg: None)
    world_size = job_world_size(world_size)
    reason = unavailable_reason(local_ranks(world_size), device)
    if reason:
        raise DistributedError(reason)
    names = [distributed_mode(m).name for m in modes]
    unsupported = {n: r for n in [config.reference_mode, *names] if (r := mode_unsupported_reason(n, device))}
    if config.reference_mode in unsupported:
        raise DistributedError(f"the reference mode {config.reference_mode} cannot run: {unsupported[config.reference_mode]}")
    job_dir = Path(tempfile.mkdtemp(prefix="ampgate-dist-"))
    job = Job(
        workload=workload,
        workload_options=workload_options or {},
        modes=[n for n in names if n not in unsupported],
        measure=config,
        device_type=device_type,
        backend=backend_for(device_type),
        data_root=data_root,
        download=download,
        pg_timeout_s=timeout_s + 60,  # longer than ours, so a hang is diagnosed here, with every rank's stack
        plants=list(plants if plants is not None else plants_from_env()),
        job_dir=str(job_dir),
    )
    if job_rank() is not None:  # pytest is one rank of a job (torchrun on every node): run across it, here
        shutil.rmtree(job_dir, ignore_errors=True)
        say(f"{workload}: rank {job_rank()} of a {world_size}-rank job ({job.backend}): {config.reference_mode}, {', '.join(job.modes)}")
        ranks = run_in_job(job, timeout_s=timeout_s, say=say)
    else:
        say(f"{workload}: launching {world_size} ranks ({job.backend}) for {config.reference_mode}, {', '.join(job.modes)}")
        try:
            ranks = launch(job, world_size=world_size, timeout_s=timeout_s, job_dir=job_dir, progress=say)
        finally:
            shutil.rmtree(job_dir, ignore_errors=True)
    merged = merge(ranks, config, job)
    for name in names:
        if name in unsupported:
            merged.modes[name] = ModeMeasurement(name, supported=False, unsupported_reason=unsupported[name])
            merged.comparisons[name] = compare_modes(merged.reference, merged.modes[name], config)
    merged.modes = {n: merged.modes[n] for n in names if n in merged.modes}
    merged.comparisons = {n: merged.comparisons[n] for n in names if n in merged.comparisons}
    merged.distributed["modes"] = {n: distributed_mode(n).description for n in [config.reference_mode, *names]}
    merged.distributed["launch_wall_time_s"] = round(time.perf_counter() - started, 3)
    merged.wall_time_s = time.perf_counter() - started
    return merged


def launch(job: Job, *, world_size: int, timeout_s: float, job_dir: Path, progress=None) -> list[RankResult]:
    """torchrun the worker on ``world_size`` ranks; every rank's result, in rank order.

    The launcher runs in a session of its own; its workers start sessions of their own too
    (torchrun does that), so on a timeout every process is found and killed by pid.
    """
    job_path = job_dir / "job.json"
    write_record(job_path, job)
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
        str(job_path),
    ]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [*sys.path, env.get("PYTHONPATH", "")] if p)
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default for several ranks, set here so it says nothing
    env.pop(PLANT_ENV, None)  # faults travel in the job file only
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
    results = {r: read_record(RankResult, job_dir / f"rank{r}.json") for r in range(world_size)}
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
    """Ask each live rank for its Python stack (faulthandler on SIGUSR1, see worker.py)."""
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
    records = {r: rec for r in range(world_size) if (rec := read_step_record(job_dir / f"rank{r}.steps"))}
    first = stopped_first(records)
    if first is not None:  # from the ranks' own step records: whose steps stopped first
        entered, finished, at = records[first]
        others = max(rec[0] for r, rec in records.items() if r != first)
        head += (
            f"; rank {first} stopped first: it finished {finished} training steps and entered {entered}, while the others "
            f"entered {others} (its last step {time.time() - at:.0f} s ago; last progress: {_read(job_dir / f'rank{first}.progress')})"
        )
    elif culprits and len(culprits) < world_size:
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
    errors = {r: e for r in range(world_size) if (e := read_record(RankError, job_dir / f"rank{r}.error.json"))}
    if first is None and errors:
        first = min(errors, key=lambda r: errors[r].time)

    def about(r: int) -> str:
        if r in errors:
            e = errors[r]
            where = f" ({e.where})" if e.where else ""
            return f"rank {r} raised {e.type}: {e.message}{where}"
        if results.get(r):
            return f"rank {r} finished"
        if r in exits:
            if first == r:
                return f"rank {r} died: it {_exit_text(exits[r])}"
            return f"rank {r} was stopped by the launcher (SIGTERM)" if exits[r] == -signal.SIGTERM else f"rank {r} {_exit_text(exits[r])}"
        if first is not None:
            # torchrun stops every other rank once one fails; before torch 2.5 or so its summary
            # lists only the failed one, so the stopped ranks' exit codes are not known
            return f"rank {r} was stopped by the launcher"
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
