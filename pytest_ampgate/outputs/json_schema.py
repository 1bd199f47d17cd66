"""The JSON Schema of the JSON report (``--ampgate-json``): the contract readers can validate against.

Draft 2020-12.  ``schema_version`` changes only when a field is removed or changes meaning, never
when one is added, so readers should ignore keys they do not know.  ``docs/json-report.md``
describes every field.
"""

from __future__ import annotations

SCHEMA_ID = "pytest-ampgate/report"
SCHEMA_VERSION = 1

OUTCOMES = ("pass", "fail", "inconclusive", "skipped")

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
        "compared_with",
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
                "master_weight_bytes": _INT,
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
        "compared_with": {"type": ["string", "null"]},
        "compiled": {
            "type": ["object", "null"],
            "required": ["backend", "mode", "compile_time_s", "settled", "graphs", "graph_breaks", "recompiles", "timed_recompiles"],
            "properties": {
                "backend": _STR,
                "mode": {"type": ["string", "null"]},
                "compile_time_s": {"type": "number", "minimum": 0},
                "compile_steps": {"type": "integer", "minimum": 0},
                "settled": {"type": "boolean"},
                "graphs": {"type": "integer", "minimum": 0},
                "graph_breaks": {"type": "integer", "minimum": 0},
                "graph_break_reasons": {"type": "object"},
                "graph_break_sites": {"type": "array", "items": _STR},
                "recompiles": {"type": "integer", "minimum": 0},
                "recompile_reasons": {"type": "array", "items": _STR},
                "timed_recompiles": {"type": "array", "items": _STR},
                "note": _STR,
            },
        },
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
