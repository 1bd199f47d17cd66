"""A baseline pooled from several ``--ampgate-update`` recordings, each made in its own process.

One recording is one process at one moment, and what the machine drew then (its clocks, its
neighbours, where the allocations landed) moves the AMP/fp32 speedup between processes by more than
it moves inside one run (BENCHMARKS.md, "Step time between processes").  A baseline that landed
high then fails healthy runs, and one that landed low hides regressions, however many rounds each
run has.  So every ``--ampgate-update`` adds its run to the entry's last ``baseline_recordings``
recordings, and the stored timing figures become their median, with the distribution-free interval
of that median across the recordings as the baseline's own interval (which the checks count beside
the run's own: :func:`pytest_ampgate.baseline_checks.widened`).

A recording that lies beyond the gate's tolerance of everything the recordings so far span, or one
measured under other settings, starts the baseline afresh: the earlier recordings measured other
code (the user is accepting a change) or another protocol, and pooling them would hide it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from .baseline_schema import Baseline, ModeBaseline, Recording
from .config import GateConfig
from .stats import median, median_interval

TIMING_FIGURES = (("speedup", "speedup_low", "speedup_high"), ("step_time_s", "step_time_low", "step_time_high"))
"""The figures that move between processes, each with the two ends of its interval: only they are pooled."""


def recording_of(baseline: Baseline) -> Recording:
    """What one recorded run keeps for pooling: each mode's timing figures with their intervals."""
    modes = {}
    for name, mode in baseline.modes.items():
        kept = {f: getattr(mode, f) for trio in TIMING_FIGURES for f in trio}
        if any(v is not None for v in kept.values()):
            modes[name] = ModeBaseline(**kept)
    return Recording(baseline.recorded_at, modes)


def recordings_of(baseline: Baseline) -> tuple[Recording, ...]:
    """The recordings a stored baseline pools; a file written before they were kept counts as one."""
    return baseline.recordings or (recording_of(baseline),)


def pooled_baseline(newest: Baseline, recordings: Sequence[Recording], confidence: float) -> Baseline:
    """``newest`` with each mode's timing figures replaced by their median over ``recordings``.

    The interval is the median's own across the recordings (:func:`~pytest_ampgate.stats.median_interval`,
    with the coverage the count allows): each recording is one draw of the process-to-process offset
    that the rounds inside one run cannot show.  A figure only one recording has keeps its own
    interval.  Everything else (memory, accuracy, coverage) is the newest recording's.
    """
    modes = {}
    for name, mode in newest.modes.items():
        changes: dict = {}
        counts = [1]
        for middle, low_field, high_field in TIMING_FIGURES:
            values = [getattr(r.modes[name], middle) for r in recordings if name in r.modes]
            values = [v for v in values if v is not None]
            if len(values) >= 2:
                low, high, _coverage = median_interval(values, confidence)
                changes.update({middle: median(values), low_field: low, high_field: high})
            if getattr(mode, middle) is not None:
                counts.append(len(values))
        modes[name] = replace(mode, **changes, recordings=max(counts) if max(counts) > 1 else None)
    return replace(newest, modes=modes, recordings=tuple(recordings))


def _speedup(x: float) -> str:
    return f"{x:.2f}"


def _milliseconds(x: float) -> str:
    return f"{x * 1e3:.3g}"


def moved(previous: Baseline, newest: Baseline, speedup_tolerance: float, step_time_tolerance: float) -> list[str]:
    """Each timing figure of ``newest`` that lies beyond the tolerance of the interval ``previous`` stores, said.

    The interval already spans how far the recordings so far moved; a recording beyond it by more
    than the gate tolerates is what a gated run would fail (or, improved, a change the older
    recordings would hide).  A speedup may fall to ``1 - tol`` of the stored one and a step time
    grow to ``1 + tol`` of it, as the checks allow; the same factor the other way is a move too.
    """
    figures = (  # (middle, low, high), what, the factor the gate allows, how a value is said, its unit
        (*TIMING_FIGURES[0], "speedup", 1 / (1 - speedup_tolerance), speedup_tolerance, _speedup, "x"),
        (*TIMING_FIGURES[1], "step time", 1 + step_time_tolerance, step_time_tolerance, _milliseconds, " ms"),
    )
    found = []
    for name, mode in newest.modes.items():
        old = previous.modes.get(name)
        if old is None:
            continue
        for middle, low_field, high_field, what, factor, tolerance, said, unit in figures:
            value, stored = getattr(mode, middle), getattr(old, middle)
            if value is None or stored is None:
                continue
            low = getattr(old, low_field) if getattr(old, low_field) is not None else stored
            high = getattr(old, high_field) if getattr(old, high_field) is not None else stored
            if not low / factor <= value <= high * factor:
                found.append(
                    f"{name} {what} {said(value)}{unit} lies beyond the stored {said(stored)}{unit} [{said(low)}-{said(high)}{unit}] "
                    f"by more than its tolerance ({tolerance:.0%})"
                )
    return found


def _measured_alike(settings: dict) -> dict:
    """The settings that decide what a figure means (workload, batch, protocol, metric); the gate's
    own margins and tolerances may change without making earlier recordings another measurement."""
    return {k: v for k, v in settings.items() if k != "config"}


def joined(previous: Baseline | None, newest: Baseline, config: GateConfig, device_type: str) -> tuple[Baseline, str]:
    """The baseline to store when ``newest`` is recorded over ``previous`` (None: nothing stored), and
    one sentence saying what became of the earlier recordings.  How many are kept, their interval's
    coverage and the tolerances that start afresh are the gate's own settings on ``device_type``."""
    keep = config.baseline_recordings
    if previous is None:
        why = "first recording for this machine key"
    elif keep <= 1:
        why = "baseline_recordings=1: this recording replaces the stored one"
    elif _measured_alike(previous.settings) != _measured_alike(newest.settings):
        why = "the stored recordings were measured under other settings (workload, batch or protocol), so this one starts afresh"
    elif moves := moved(previous, newest, config.speedup_tolerance_on(device_type), config.step_time_tolerance_on(device_type)):
        earlier = len(recordings_of(previous))
        why = f"{'; '.join(moves)}: the {earlier} earlier recording(s) measured other code or another machine, so this one starts afresh"
    else:
        kept = (*recordings_of(previous)[-(keep - 1) :], recording_of(newest))
        return pooled_baseline(newest, kept, config.confidence), f"pooled with {len(kept) - 1} earlier recording(s), up to {keep}"
    return pooled_baseline(newest, (recording_of(newest),), config.confidence), why
