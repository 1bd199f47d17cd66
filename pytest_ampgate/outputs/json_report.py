"""The JSON report of a whole gated run (``--ampgate-json PATH``), for CI dashboards and scripts.

One document per pytest session: where it ran, every gated test, every mode with its measurement
and spread, every check and verdict.  It is built from :class:`~pytest_ampgate.gate.GateResult`
records, which is all the controller has under pytest-xdist, so a distributed run reports the same
as a serial one.  :data:`~pytest_ampgate.outputs.json_schema.SCHEMA` is the contract.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..records import json_float, to_dict, utc_timestamp
from .figures import ModeFigures, figures_of, finite, settings_of
from .json_schema import OUTCOMES, SCHEMA_ID, SCHEMA_VERSION
from .paths import save

MEMORY_PARTS = (
    "peak_bytes",
    "parameter_bytes",
    "buffer_bytes",
    "master_weight_bytes",
    "optimizer_state_bytes",
    "gradient_bytes",
    "activation_bytes",
    "step_peak_bytes",
    "state_bytes",
)


def _step_time(mm, steps_per_round: int) -> dict | None:
    from ..stats import summarize_times

    if not mm.step_times_s:
        return None
    s = summarize_times(mm.step_times_s)
    return {
        "median_s": s["median"],
        "mean_s": s["mean"],
        "min_s": s["min"],
        "max_s": s["max"],
        "stddev_s": s["stddev"],
        "iqr_s": s["iqr"],
        "rounds": s["rounds"],
        "steps_per_round": steps_per_round,
        "samples_s": list(mm.step_times_s),
    }


def _memory(mm) -> dict | None:
    """What the peak-memory figure covers and its parts (parameters, buffers, optimizer state, gradients, activations)."""
    if not mm.memory:
        return None
    return {**{k: mm.memory.get(k) for k in MEMORY_PARTS}, "method": mm.memory.get("method", ""), "covers": mm.memory.get("covers", "")}


def _launch(mm) -> dict | None:
    """Host enqueue time beside device time per step, and the launch-bound diagnosis where it was probed."""
    from ..stats import median
    from ..timing import launch_bound

    if not mm.host_times_s:
        return None
    bound = launch_bound(mm)
    return {
        "host_step_s": median(mm.host_times_s),
        "busy_step_s": mm.busy_step_s,
        "idle_share": bound.idle_share if bound else None,
        "launch_bound": bound.bound if bound else None,
    }


def _mode_record(f: ModeFigures, steps_per_round: int) -> dict:
    mm = f.measurement
    return {
        "mode": f.mode,
        "role": "reference" if f.reference else "compared",
        "compared_with": f.comparison.reference if f.comparison is not None else None,
        "supported": mm.supported,
        "unsupported_reason": mm.unsupported_reason,
        "error": mm.error,
        "outcome": f.outcome,
        "step_time": _step_time(mm, steps_per_round),
        "speedup": to_dict(f.speedup),
        "peak_memory_bytes": f.peak_memory_bytes,
        "memory_ratio": finite(f.memory_ratio),
        "memory_note": mm.memory_note,
        "activation_memory_bytes": mm.activation_memory_bytes,
        "memory": _memory(mm),
        "failed_phase": mm.failed_phase,
        "launch": _launch(mm),
        "device_seconds": finite(mm.block_seconds),
        "accuracy": finite(f.accuracy),
        "baseline_accuracy": finite(f.baseline_accuracy),
        "metric": {
            "name": f.metric_name,
            "value": None if f.metric is None else json_float(f.metric),
            "higher_is_better": f.higher_is_better,
            "baseline": finite(f.baseline_metric),
        },
        "final_loss": None if f.final_loss is None else json_float(f.final_loss),
        "steps": len(mm.losses),
        "first_nonfinite_step": f.first_nonfinite_step,
        "nonfinite_steps": f.nonfinite_steps,
        "scaler": to_dict(mm.scaler) if mm.scaler else None,
        "low_precision_share": finite(f.low_precision_share),
        "compiled": mm.compiled,
    }


def test_record(result, run: Mapping[str, Any] | None = None) -> dict:
    """One gated test: its settings, every mode, every check, the verdict, and where/when it ran."""
    from ..results import noise_dict

    m = result.measurements
    return {
        "test_id": result.test_id,
        "outcome": result.verdict.outcome,
        "failed": result.failed,
        "env_key": result.env_key,
        "workload": m.workload,
        "device": m.device,
        "batch_size": m.batch_size,
        "reference_mode": m.reference.mode,
        "protocol": to_dict(m.config),
        "config": to_dict(settings_of(result)),
        "dataset": m.dataset,
        "wall_time_s": m.wall_time_s,
        "run": dict(run) if run else None,
        "modes": [_mode_record(f, m.config.steps_per_block) for f in figures_of(result)],
        "checks": [to_dict(c) for c in result.verdict.checks],
        "verdict": {"outcome": result.verdict.outcome, "confirmed": result.verdict.confirmed, "strict": result.strict},
        "noise": noise_dict(m.noise),
        "baseline_update": None if result.update is None else {"recorded": True},
        "distributed": m.distributed or None,
    }


def build_report(
    results: Sequence,
    *,
    runs: Mapping[str, Mapping[str, Any]] | None = None,
    run_info: Mapping[str, Any] | None = None,
) -> dict:
    """The whole report.  ``runs`` maps test ids to their device-lock holding (worker, times);
    ``run_info`` describes the session (args, device, exit status...), see :mod:`.json_schema`."""
    from ..version import __version__

    runs = runs or {}
    environments: dict[str, dict] = {}
    for r in results:
        environments.setdefault(r.env_key, to_dict(r.measurements.environment))
    outcomes = {o: 0 for o in OUTCOMES}
    for r in results:
        outcomes[r.verdict.outcome] = outcomes.get(r.verdict.outcome, 0) + 1
    info = dict(run_info or {})
    return {
        "schema": SCHEMA_ID,
        "schema_version": SCHEMA_VERSION,
        "generator": {"name": "pytest-ampgate", "version": __version__},
        "created_at": utc_timestamp(),
        "run": {
            "args": list(info.get("args", [])),
            "rootdir": str(info.get("rootdir", "")),
            "device": info.get("device"),
            "update": bool(info.get("update", False)),
            "strict": bool(info.get("strict", False)),
            "baseline_dir": str(info.get("baseline_dir", "")),
            "exit_status": info.get("exit_status"),
            "workers": info.get("workers"),
            "skip_reason": info.get("skip_reason"),
        },
        "environments": environments,
        "summary": {
            "tests": len(results),
            "failed": sum(1 for r in results if r.failed),
            "outcomes": outcomes,
            "baselines_written": [str(p) for p in info.get("baselines_written", [])],
            "stale_baselines": list(info.get("stale_baselines", [])),
        },
        "tests": [test_record(r, runs.get(r.test_id)) for r in results],
    }


def write(
    results: Sequence,
    path: str | os.PathLike,
    *,
    runs: Mapping[str, Mapping[str, Any]] | None = None,
    run_info: Mapping[str, Any] | None = None,
) -> Path:
    """Build the report of ``results`` and write it to ``path`` (whole or not at all); returns the path."""
    report = build_report(results, runs=runs, run_info=run_info)
    return save(path, (json.dumps(report, indent=2, allow_nan=False) + "\n").encode("utf-8"))
