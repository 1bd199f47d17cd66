"""The JSON report of a whole gated run (``--ampgate-json PATH``), for CI dashboards and scripts.

One document per pytest session: where it ran, every gated test, every mode with its measurement
and spread, every check and verdict.  It is built from :class:`~pytest_ampgate.gate.GateResult`
records, which is all the controller has under pytest-xdist, so a distributed run reports the same
as a serial one.  :data:`SCHEMA` is the contract (JSON Schema, draft 2020-12); ``schema_version``
changes only when a field is removed or changes meaning, never when one is added, so readers should
ignore keys they do not know.  ``docs/json-report.md`` describes every field.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .records import to_dict

SCHEMA_ID = "pytest-ampgate/report"
SCHEMA_VERSION = 1

OUTCOMES = ("pass", "fail", "inconclusive", "skipped")


def _num(value: Any) -> float | int | None:
    """Strict JSON has no NaN or infinity: those become null (a loss keeps them as strings: measurement.json_float)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and math.isfinite(value):
        return value
    return None


def _step_time(mm, steps_per_round: int) -> dict | None:
    from .stats import summarize_times

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


def _speedup(comparison) -> dict | None:
    est = comparison.speedup if comparison else None
    if est is None:
        return None
    return {
        "median": est.median,
        "low": est.low,
        "high": est.high,
        "confidence": est.confidence,
        "rounds": est.rounds,
        "noisy": est.noisy,
        "note": est.note,
        "samples": list(est.samples),
    }


def _memory(mm) -> dict | None:
    """What the peak-memory figure covers and its parts (parameters, buffers, optimizer state, gradients, activations)."""
    if not mm.memory:
        return None
    keys = (
        "peak_bytes",
        "parameter_bytes",
        "buffer_bytes",
        "optimizer_state_bytes",
        "gradient_bytes",
        "activation_bytes",
        "step_peak_bytes",
        "state_bytes",
    )
    return {**{k: mm.memory.get(k) for k in keys}, "method": mm.memory.get("method", ""), "covers": mm.memory.get("covers", "")}


def _launch(mm) -> dict | None:
    """Host enqueue time beside device time per step, and the launch-bound diagnosis where it was probed."""
    from .measurement import launch_bound
    from .stats import median

    if not mm.host_times_s:
        return None
    bound = launch_bound(mm)
    return {
        "host_step_s": median(mm.host_times_s),
        "busy_step_s": mm.busy_step_s,
        "idle_share": bound.idle_share if bound else None,
        "launch_bound": bound.bound if bound else None,
    }


def _mode_record(result, mm, comparison) -> dict:
    from .measurement import json_float
    from .report import mode_status, reference_memory_ratio

    m = result.measurements
    role = "reference" if mm is m.reference else "compared"
    cov = mm.precision_coverage
    return {
        "mode": mm.mode,
        "role": role,
        "supported": mm.supported,
        "unsupported_reason": mm.unsupported_reason,
        "error": mm.error,
        "outcome": mode_status(result, mm),
        "step_time": _step_time(mm, m.config.steps_per_block),
        "speedup": _speedup(comparison),
        "peak_memory_bytes": mm.peak_memory_bytes,
        "memory_ratio": _num(comparison.memory_ratio) if comparison else (reference_memory_ratio(mm) if role == "reference" else None),
        "memory_note": mm.memory_note,
        "activation_memory_bytes": mm.activation_memory_bytes,
        "memory": _memory(mm),
        "failed_phase": mm.failed_phase,
        "launch": _launch(mm),
        "device_seconds": _num(mm.block_seconds),
        "accuracy": _num(mm.accuracy),
        "baseline_accuracy": _num(result.baseline_accuracy.get(mm.mode)),
        "metric": {
            "name": mm.metric_name,
            "value": None if mm.metric is None else json_float(mm.metric),
            "higher_is_better": mm.higher_is_better,
            "baseline": _num(
                (getattr(result, "baseline_metric", None) or ({} if mm.metric_name != "accuracy" else result.baseline_accuracy)).get(
                    mm.mode
                )
            ),
        },
        "final_loss": None if mm.final_loss is None else json_float(mm.final_loss),
        "steps": len(mm.losses),
        "first_nonfinite_step": mm.first_nonfinite_step,
        "nonfinite_steps": mm.nonfinite_steps,
        "scaler": to_dict(mm.scaler) if mm.scaler else None,
        "low_precision_share": _num(cov.share) if cov is not None and cov.total_flops else None,
    }


def test_record(result, run: Mapping[str, Any] | None = None) -> dict:
    """One gated test: its settings, every mode, every check, the verdict, and where/when it ran."""
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
        "protocol": m.config.to_dict(),
        "config": dict(getattr(result, "config", None) or {}),
        "dataset": m.dataset,
        "wall_time_s": m.wall_time_s,
        "run": dict(run) if run else None,
        "modes": [_mode_record(result, mm, comparison) for mm, comparison in m.each_mode()],
        "checks": [c.to_dict() for c in result.verdict.checks],
        "verdict": {"outcome": result.verdict.outcome, "confirmed": result.verdict.confirmed, "strict": result.strict},
        "noise": m.noise,
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
    ``run_info`` describes the session (args, device, exit status...), see :data:`SCHEMA`."""
    from . import __version__

    runs = runs or {}
    environments: dict[str, dict] = {}
    for r in results:
        environments.setdefault(r.env_key, r.measurements.environment)
    outcomes = {o: 0 for o in OUTCOMES}
    for r in results:
        outcomes[r.verdict.outcome] = outcomes.get(r.verdict.outcome, 0) + 1
    info = dict(run_info or {})
    return {
        "schema": SCHEMA_ID,
        "schema_version": SCHEMA_VERSION,
        "generator": {"name": "pytest-ampgate", "version": __version__},
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
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


def write_report(path: str | os.PathLike, report: Mapping[str, Any]) -> Path:
    """Write atomically (temp file + rename), so a CI step never uploads half a report."""
    from .file_safety import write_atomic  # removes its temp file when the write fails: no debris

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(report, indent=2, allow_nan=False) + "\n").encode("utf-8"))
    return path


_NUM = {"type": ["number", "null"]}
_INT = {"type": ["integer", "null"]}
_STR = {"type": "string"}

_STEP_TIME = {
    "type": ["object", "null"],
    "required": ["median_s", "mean_s", "min_s", "max_s", "stddev_s", "iqr_s", "rounds", "steps_per_round", "samples_s"],
    "properties": {
        **{k: {"type": "number", "minimum": 0} for k in ("median_s", "mean_s", "min_s", "max_s", "stddev_s", "iqr_s")},
        "rounds": {"type": "integer", "minimum": 1},
        "steps_per_round": {"type": "integer", "minimum": 1},
        "samples_s": {"type": "array", "items": {"type": "number", "minimum": 0}, "minItems": 1},
    },
}

_SPEEDUP = {
    "type": ["object", "null"],
    "required": ["median", "low", "high", "confidence", "rounds", "noisy", "note", "samples"],
    "properties": {
        "median": {"type": "number"},
        "low": {"type": "number"},
        "high": {"type": "number"},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "rounds": {"type": "integer", "minimum": 1},
        "noisy": {"type": "boolean"},
        "note": _STR,
        "samples": {"type": "array", "items": {"type": "number"}},
    },
}

_MODE = {
    "type": "object",
    "required": [
        "mode",
        "role",
        "supported",
        "unsupported_reason",
        "error",
        "outcome",
        "step_time",
        "speedup",
        "peak_memory_bytes",
        "memory_ratio",
        "memory_note",
        "accuracy",
        "baseline_accuracy",
        "metric",
        "final_loss",
        "steps",
        "first_nonfinite_step",
        "nonfinite_steps",
        "scaler",
        "low_precision_share",
        "activation_memory_bytes",
        "memory",
        "failed_phase",
        "launch",
    ],
    "properties": {
        "mode": _STR,
        "role": {"enum": ["reference", "compared"]},
        "supported": {"type": "boolean"},
        "unsupported_reason": _STR,
        "error": _STR,
        "outcome": {"enum": [*OUTCOMES, "unsupported"]},
        "step_time": _STEP_TIME,
        "speedup": _SPEEDUP,
        "peak_memory_bytes": _INT,
        "memory_ratio": _NUM,
        "memory_note": _STR,
        "activation_memory_bytes": _INT,
        "memory": {
            "type": ["object", "null"],
            "required": [
                "peak_bytes",
                "parameter_bytes",
                "optimizer_state_bytes",
                "gradient_bytes",
                "activation_bytes",
                "method",
                "covers",
            ],
            "properties": {
                "peak_bytes": {"type": "integer", "minimum": 0},
                "parameter_bytes": {"type": "integer", "minimum": 0},
                "buffer_bytes": _INT,
                "optimizer_state_bytes": {"type": "integer", "minimum": 0},
                "gradient_bytes": {"type": "integer", "minimum": 0},
                "activation_bytes": _INT,
                "step_peak_bytes": _INT,
                "state_bytes": _INT,
                "method": _STR,
                "covers": _STR,
            },
        },
        "failed_phase": _STR,
        "device_seconds": _NUM,
        "launch": {
            "type": ["object", "null"],
            "required": ["host_step_s", "busy_step_s", "idle_share", "launch_bound"],
            "properties": {
                "host_step_s": {"type": "number", "minimum": 0},
                "busy_step_s": _NUM,
                "idle_share": _NUM,
                "launch_bound": {"type": ["boolean", "null"]},
            },
        },
        "accuracy": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
        "baseline_accuracy": _NUM,
        "metric": {
            "type": "object",
            "required": ["name", "value", "higher_is_better", "baseline"],
            "properties": {
                "name": _STR,
                "value": {"type": ["number", "string", "null"]},
                "higher_is_better": {"type": "boolean"},
                "baseline": _NUM,
            },
        },
        "final_loss": {"type": ["number", "string", "null"]},
        "steps": {"type": "integer", "minimum": 0},
        "first_nonfinite_step": _INT,
        "nonfinite_steps": {"type": "integer", "minimum": 0},
        "scaler": {"type": ["object", "null"]},
        "low_precision_share": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
    },
}

_CHECK = {
    "type": "object",
    "required": ["mode", "metric", "outcome", "why", "measured", "threshold", "baseline"],
    "properties": {
        "mode": _STR,
        "metric": _STR,
        "outcome": {"enum": list(OUTCOMES)},
        "why": _STR,
        "measured": _NUM,
        "threshold": _NUM,
        "baseline": _NUM,
    },
}

_RUN = {
    "type": ["object", "null"],
    "required": ["key", "holder", "pid", "requested_at", "acquired_at", "released_at", "waited_s", "locked"],
    "properties": {
        "key": _STR,
        "holder": _STR,
        "pid": {"type": "integer"},
        "worker": {"type": ["string", "null"]},
        "requested_at": {"type": "number"},
        "acquired_at": {"type": "number"},
        "released_at": {"type": "number"},
        "waited_s": {"type": "number", "minimum": 0},
        "locked": {"type": "boolean"},
    },
}

_TEST = {
    "type": "object",
    "required": [
        "test_id",
        "outcome",
        "failed",
        "env_key",
        "workload",
        "device",
        "batch_size",
        "reference_mode",
        "protocol",
        "config",
        "dataset",
        "wall_time_s",
        "run",
        "modes",
        "checks",
        "verdict",
        "noise",
        "baseline_update",
    ],
    "properties": {
        "test_id": _STR,
        "outcome": {"enum": list(OUTCOMES)},
        "failed": {"type": "boolean"},
        "env_key": _STR,
        "workload": _STR,
        "device": _STR,
        "batch_size": {"type": "integer", "minimum": 1},
        "reference_mode": _STR,
        "protocol": {"type": "object", "required": ["warmup_steps", "rounds", "steps_per_block", "confidence"]},
        "config": {"type": "object"},
        "dataset": {"type": "object"},
        "wall_time_s": {"type": "number", "minimum": 0},
        "run": _RUN,
        "modes": {"type": "array", "minItems": 1, "items": _MODE},
        "checks": {"type": "array", "items": _CHECK},
        "verdict": {
            "type": "object",
            "required": ["outcome", "confirmed", "strict"],
            "properties": {"outcome": {"enum": list(OUTCOMES)}, "confirmed": {"type": "boolean"}, "strict": {"type": "boolean"}},
        },
        "noise": {"type": "object"},
        "baseline_update": {"type": ["object", "null"]},
        "distributed": {"type": ["object", "null"]},
    },
}

SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": f"{SCHEMA_ID}/v{SCHEMA_VERSION}",
    "title": "pytest-ampgate run report",
    "type": "object",
    "required": ["schema", "schema_version", "generator", "created_at", "run", "environments", "summary", "tests"],
    "properties": {
        "schema": {"const": SCHEMA_ID},
        "schema_version": {"const": SCHEMA_VERSION},
        "generator": {"type": "object", "required": ["name", "version"]},
        "created_at": {"type": "string"},
        "run": {
            "type": "object",
            "required": ["args", "rootdir", "device", "update", "strict", "baseline_dir", "exit_status", "workers", "skip_reason"],
            "properties": {
                "args": {"type": "array", "items": _STR},
                "device": {"type": ["string", "null"]},
                "update": {"type": "boolean"},
                "strict": {"type": "boolean"},
                "exit_status": _INT,
                "workers": _INT,
                "skip_reason": {"type": ["string", "null"]},
            },
        },
        "environments": {
            "type": "object",
            "additionalProperties": {"type": "object", "required": ["device_type"]},
        },
        "summary": {
            "type": "object",
            "required": ["tests", "failed", "outcomes", "baselines_written", "stale_baselines"],
            "properties": {
                "tests": {"type": "integer", "minimum": 0},
                "failed": {"type": "integer", "minimum": 0},
                "outcomes": {"type": "object", "required": list(OUTCOMES), "additionalProperties": {"type": "integer"}},
                "baselines_written": {"type": "array", "items": _STR},
                "stale_baselines": {"type": "array", "items": _STR},
            },
        },
        "tests": {"type": "array", "items": _TEST},
    },
}
