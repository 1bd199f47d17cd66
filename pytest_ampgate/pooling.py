"""Several measurements of one workload judged as one: their timed rounds pooled.

A timed run's error has a part that more rounds inside it cannot remove: what its set-up drew
(allocations, caches, clocks, a noisy moment).  So a baseline is recorded from
``baseline_runs`` measurements, not one (``gate.record``), and a timing check the first run
leaves undecided is judged again on the rounds of both runs together (``gate.decide``).  The
pooled rounds keep their pairing: each round's speedup is the ratio of blocks timed in the same
round of the same run (``stats.round_ratios``), so runs are joined by concatenating those ratios.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from .results import Comparison, Measurements, ModeMeasurement
from .stats import estimate_ratio


def pooled(runs: Sequence[Measurements], confidence: float | None = None) -> Measurements:
    """The first run, with every mode's per-round step times and speedup samples joined across ``runs``.

    ``confidence``: the coverage of the joined speedup intervals (default: the runs' own).

    Everything that is not timing (memory, numerics, accuracy, coverage) stays the first run's: it
    does not depend on the moment.  A mode is pooled only where it ran in every run; a busy GPU in
    any run makes the pooled readings untrusted.
    """
    if not runs:
        raise ValueError("no runs to pool")
    first = runs[0]
    if len(runs) == 1:
        return first
    config = first.config

    def join(mm: ModeMeasurement, pick) -> ModeMeasurement:
        others = [pick(r) for r in runs]
        if not all(o is not None and o.ok for o in others):
            return mm
        return replace(
            mm,
            step_times_s=[t for o in others for t in o.step_times_s],
            host_times_s=[t for o in others for t in o.host_times_s],
            block_seconds=sum(o.block_seconds for o in others),
        )

    def compare(name: str, comparison: Comparison) -> Comparison:
        estimates = [r.comparisons.get(name) for r in runs]
        if not all(c is not None and c.speedup is not None for c in estimates):
            return comparison
        samples = [s for c in estimates for s in c.speedup.samples]
        coverage = config.confidence if confidence is None else confidence
        return replace(comparison, speedup=estimate_ratio(samples, coverage, config.noise_threshold))

    noise = next((r.noise for r in runs if r.noise.untrusted_reason()), first.noise)
    return replace(
        first,
        reference=join(first.reference, lambda r: r.reference),
        modes={name: join(mm, lambda r, name=name: r.modes.get(name)) for name, mm in first.modes.items()},
        comparisons={name: compare(name, c) for name, c in first.comparisons.items()},
        noise=noise,
        wall_time_s=sum(r.wall_time_s for r in runs),
    )
