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
from typing import Any

from ..errors import ConfigError

LAUNCHER = "torch.distributed.run"
WORKER_MODULE = "pytest_ampgate.distributed.worker"
PLANT_ENV = "PYTEST_AMPGATE_DISTRIBUTED_PLANT"
"""JSON list of planted faults for the ranks (tests of the gate itself); see :data:`PLANT_KINDS`."""
PLANT_KINDS = ("nan", "perturb", "hang", "raise", "die")


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
