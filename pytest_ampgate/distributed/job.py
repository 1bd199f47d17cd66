"""What travels from the test process to the ranks: the workload by reference, and planted faults.

Objects cannot cross process boundaries, so the workload travels as a reference: a built-in name
or ``"module:function"`` naming an importable factory that returns a :class:`Workload`.  The rest
of the job (modes, measurement settings, backend, planted faults) is a JSON file that the launcher
writes and every rank (:mod:`pytest_ampgate.distributed.worker`) reads.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ..config import MeasureConfig
from ..errors import AmpGateError, ConfigError
from ..file_safety import write_atomic
from ..records import from_dict, to_dict

LAUNCHER = "torch.distributed.run"
WORKER_MODULE = "pytest_ampgate.distributed.worker"
PLANT_ENV = "PYTEST_AMPGATE_DISTRIBUTED_PLANT"
"""JSON list of planted faults for the ranks (tests of the gate itself); see :data:`PLANT_KINDS`."""
PLANT_KINDS = ("nan", "perturb", "hang", "raise", "die")

R = TypeVar("R")


class DistributedError(AmpGateError):
    """A distributed run did not finish: a rank raised, died or hung (the message names it)."""


@dataclass
class Job:
    """What every rank reads from ``job.json``: the workload, its modes and protocol, where to run."""

    workload: str = ""
    """A built-in name or ``module:function`` (see :func:`load_workload`)."""
    workload_options: dict = field(default_factory=dict)
    modes: list[str] = field(default_factory=list)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    device_type: str = "cpu"
    backend: str = "gloo"
    data_root: str | None = None
    download: bool = False
    pg_timeout_s: float = 360.0
    """The process group's own timeout: longer than the launcher's, so a hang is diagnosed by the launcher."""
    plants: list[dict] = field(default_factory=list)
    """Planted faults (tests of the gate only), each ``{'kind': ..., 'rank': N, ...}``."""
    job_dir: str = ""


@dataclass
class RankResult:
    """One rank's ``rank<N>.json``: its measurements (``Measurements.to_dict()``) and its replica comparison."""

    rank: int
    world_size: int = 0
    host: str | None = None
    device: str | None = None
    measurements: dict = field(default_factory=dict)
    replicas: dict = field(default_factory=dict)
    """Per mode: ``checked``, and ``parameters``, ``diverged``, ``first_diverged`` or the ``reason`` it was not."""


@dataclass
class RankError:
    """One rank's ``rank<N>.error.json``: the exception it raised, and when, to tell which rank failed first."""

    rank: int
    type: str
    message: str = ""
    where: str = ""
    traceback: str = ""
    time: float = 0.0


def write_record(path: Path, record: Any) -> None:
    """A record as JSON, atomically: the launcher polls these files and must see none or a whole one."""
    write_atomic(path, json.dumps(to_dict(record), allow_nan=False).encode("utf-8"))


def read_record(cls: type[R], path: Path) -> R | None:
    """The record in ``path``, or None while there is none (or only part of one)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return from_dict(cls, data) if isinstance(data, Mapping) else None


def load_workload(reference: str, options: dict | None = None):
    """The Workload a reference names: a built-in name, or ``module:function`` returning a Workload."""
    from ..workloads import BUILTIN, Workload, get_workload

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
