"""Key figures of a gated test as JUnit XML properties, as plain (name, value) pairs.

Dashboards that read JUnit (GitLab, Jenkins, Azure) show them next to the test without parsing
our own report.  The plugin hands the pairs to pytest's junitxml: as the test case's
``<properties>`` under the xunit1 family, as ``<test id>::<name>`` suite properties under xunit2
(where a test case may hold none).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .figures import figures_of, finite

if TYPE_CHECKING:
    from ..gate import GateResult


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if finite(value) is None else float(f"{value:.{digits}g}")


def junit_properties(result: GateResult) -> list[tuple[str, object]]:
    """The figures of one gated test; absent figures are left out rather than written as empty values."""
    m = result.measurements
    props: list[tuple[str, object]] = [
        ("ampgate_verdict", result.verdict.outcome),
        ("ampgate_env", result.env_key),
        ("ampgate_device", m.device),
        ("ampgate_workload", m.workload),
    ]
    if m.distributed:  # runs under torch.distributed (see distributed.py)
        props += [("ampgate_world_size", m.distributed.get("world_size")), ("ampgate_backend", m.distributed.get("backend"))]
    for f in figures_of(result):
        speedup = f.speedup
        loss = f.final_loss
        figures = {
            "outcome": f.outcome,
            "step_time_ms": _round(f.step_time_s * 1e3) if f.step_time_s is not None else None,
            "speedup": _round(speedup.median) if speedup else None,
            "speedup_low": _round(speedup.low) if speedup else None,
            "speedup_high": _round(speedup.high) if speedup else None,
            "peak_memory_mib": _round(f.peak_memory_bytes / 2**20) if f.peak_memory_bytes is not None else None,
            "memory_ratio": None if f.reference else _round(f.memory_ratio),
            "accuracy": _round(f.accuracy),
            **({f.metric_name: _round(f.metric)} if f.metric_name != "accuracy" and f.metric is not None else {}),
            "final_loss": None if loss is None else (_round(loss) if math.isfinite(loss) else str(loss)),
            "first_nonfinite_step": f.first_nonfinite_step,
        }
        props += [(f"ampgate_{f.mode}_{k}", v) for k, v in figures.items() if v is not None]
    return props


def suite_properties(results: list[GateResult]) -> list[tuple[str, object]]:
    """The figures of every test as suite properties, each named ``<test id>::<name>`` (xunit2)."""
    return [(f"{r.test_id}::{name}", value) for r in results for name, value in junit_properties(r)]
