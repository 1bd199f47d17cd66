"""Every mode against its own stored baseline: step time, peak memory, and how noisy the baseline itself is.

The ratios to fp32 (``checks.py``) cancel whatever the modes share, which is their strength and
their blind spot: a regression that hits every mode alike leaves them unchanged.  These checks
compare each mode's own figures with that mode's stored ones (same machine key); see
docs/baseline-gates.md for the tolerances and the spread they were chosen from.
"""

from __future__ import annotations

import math

from .baseline_schema import Baseline
from .judging import Judging, fmt_bytes, fmt_seconds, too_few_rounds
from .results import ModeMeasurement
from .stats import estimate_ratio
from .verdict import ANY_MODE, FAIL, INCONCLUSIVE, PASS, RECORD_HINT, SKIPPED, UPDATE_COMMAND, Check, CheckName

MIN_RECORDINGS = 3
"""Recordings a baseline should pool before its spread means anything: the median of three is the
first that one outlying process cannot move."""


def own_baseline_figure(j: Judging, mm: ModeMeasurement, field: str, metric: CheckName, what: str) -> tuple[object, list[Check]]:
    """This mode's stored figure, or the checks to return instead: none without a baseline (the other
    checks say how to record one), SKIPPED where the baseline predates the figure."""
    if j.baseline is None:
        return None, []
    base = j.stored(mm.mode)
    value = getattr(base, field, None) if base is not None else None
    if value is None:
        why = f"{mm.mode} {what} not gated against the baseline: the stored baseline has no {what} for {mm.mode}; {RECORD_HINT}"
        return None, [Check(mm.mode, metric, SKIPPED, why)]
    return value, []


def widened(est, stored_low: float | None, stored: float, stored_high: float | None, scale: float) -> tuple[float, float]:
    """The run's interval widened by the stored figure's own, for a limit of ``stored * scale``.

    A baseline is a measurement too: judging against it as if exact turns its error into false
    alarms or missed regressions.  The two errors are independent, so their half-widths add in
    quadrature (as for a difference of two means); the run's low end takes the limit's upward
    uncertainty and its high end the downward one.  A stored figure without an interval (an old
    file) counts as exact.
    """
    if stored_low is None or stored_high is None:
        return est.low, est.high
    up, down = max(stored_high - stored, 0.0) * scale, max(stored - stored_low, 0.0) * scale
    return est.median - math.hypot(est.median - est.low, up), est.median + math.hypot(est.high - est.median, down)


def pooled_said(base) -> str:
    """How many recordings a stored figure is the median of, said where more than one."""
    return f" (median of {base.recordings} recordings)" if (base.recordings or 1) > 1 else ""


def combined(low: float, high: float, est, fmt) -> str:
    """How a widened interval is said beside the run's own, or '' where the baseline added nothing."""
    if (low, high) == (est.low, est.high):
        return ""
    return f" ({fmt(low)}-{fmt(high)} with the baseline's own interval)"


def step_time_check(j: Judging, mm: ModeMeasurement) -> list[Check]:
    """This mode's own step time against its stored baseline (same machine key), every mode the reference too.

    The ratios to fp32 cannot see a slowdown that hits every mode alike (a slower data path, a new
    sync in the shared training loop): this can.  Across processes step time is noisier than a
    ratio within one run, so the tolerance is wider (``step_time_tolerance``, from the measured
    spread between processes in BENCHMARKS.md); the interval of this run's per-round step times
    must lie wholly beyond the limit to FAIL (and a fresh run must agree), wholly within it to PASS.
    ``check_step_time=False`` turns it off where runs land on different machines under one key.
    """
    device_type = j.measurements.device.split(":")[0]
    if not (j.config.check_step_time and j.config.timing_applies(device_type)) or not mm.step_times_s:
        return []
    stored, instead = own_baseline_figure(j, mm, "step_time_s", CheckName.STEP_TIME, "step time")
    if stored is None:
        return instead
    tol = j.config.step_time_tolerance_on(device_type)
    limit = stored * (1 + tol)
    est = estimate_ratio(mm.step_times_s, j.config.confidence, j.config.noise_threshold)
    text = f"{mm.mode} step time {fmt_seconds(est.median)} [{est.confidence:.0%} CI {fmt_seconds(est.low)}-{fmt_seconds(est.high)}]"
    base = j.stored(mm.mode)
    source = f"baseline {fmt_seconds(stored)}{pooled_said(base)} on {j.env_label}, tol +{tol:.0%}"
    source += stored_noise(base.step_time_low, stored, base.step_time_high, tol)
    low, high = widened(est, base.step_time_low, stored, base.step_time_high, 1 + tol)
    text += combined(low, high, est, fmt_seconds)
    args = dict(measured=est.median, threshold=limit, baseline=stored)
    too_few = too_few_rounds(est, j.config)
    if too_few:
        return [Check(mm.mode, CheckName.STEP_TIME, INCONCLUSIVE, f"{text} vs limit {fmt_seconds(limit)} ({source}): {too_few}", **args)]
    if high <= limit:
        return [Check(mm.mode, CheckName.STEP_TIME, PASS, f"{text} <= limit {fmt_seconds(limit)} ({source})", **args)]
    if low > limit:
        noise = j.measurements.noise.untrusted_reason()
        if noise:
            why = f"{text} > limit {fmt_seconds(limit)} ({source}), but the GPU was busy: {noise}"
            return [Check(mm.mode, CheckName.STEP_TIME, INCONCLUSIVE, why, **args)]
        return [Check(mm.mode, CheckName.STEP_TIME, FAIL, f"{text} > limit {fmt_seconds(limit)} ({source})", **args)]
    noisy = f"; {est.note}" if est.noisy else ""
    why = f"{text} straddles limit {fmt_seconds(limit)} ({source}{noisy}); on shared runners check_step_time=False turns this gate off"
    return [Check(mm.mode, CheckName.STEP_TIME, INCONCLUSIVE, why, **args)]


def peak_memory_check(j: Judging, mm: ModeMeasurement) -> list[Check]:
    """This mode's own peak memory against its stored baseline, every mode the reference too.

    A change that grows every mode (an activation kept for logging) improves the AMP/fp32 ratio
    and so passes the ratio check; the figure itself does not.  The memory pass is deterministic
    (requested bytes; cuDNN algorithms by heuristics on CUDA, the window's own allocations on the
    CPU), so a tight relative tolerance (``peak_memory_tolerance``) holds.
    """
    if not j.config.memory_applies(j.measurements.device.split(":")[0]):
        return []
    stored, instead = own_baseline_figure(j, mm, "peak_memory_bytes", CheckName.PEAK_MEMORY, "peak memory")
    if stored is None:
        return instead
    if mm.peak_memory_bytes is None:
        return [Check(mm.mode, CheckName.PEAK_MEMORY, SKIPPED, f"{mm.mode} peak memory: {mm.memory_note or 'not measured'}")]
    tol = j.config.peak_memory_tolerance
    limit = stored * (1 + tol)
    outcome = PASS if mm.peak_memory_bytes <= limit else FAIL
    change = mm.peak_memory_bytes / stored - 1 if stored else math.inf
    why = (
        f"{mm.mode} peak memory {fmt_bytes(mm.peak_memory_bytes)} ({change:+.1%}) {'<=' if outcome == PASS else '>'} "
        f"limit {fmt_bytes(limit)} (baseline {fmt_bytes(stored)} on {j.env_label}, tol +{tol:.0%})"
    )
    return [Check(mm.mode, CheckName.PEAK_MEMORY, outcome, why, measured=mm.peak_memory_bytes, threshold=limit, baseline=stored)]


BETTER_BASELINE = (
    "record it again on a quiet machine (no other jobs on the device), or with more rounds "
    "(rounds=N in the marker or ampgate_rounds in the ini), and commit that one"
)


def baseline_noise_check(j: Judging, mm: ModeMeasurement) -> list[Check]:
    """While recording (``--ampgate-update``): is this run quiet enough to judge later runs against?

    A baseline is one measurement, as uncertain as the runs it will judge: recorded in a noisy
    moment, it hides real slowdowns or turns healthy runs INCONCLUSIVE.  So a timing interval wider
    than the gate can use is said now, as INCONCLUSIVE (``--ampgate-strict`` then refuses to record
    it), with how to get a better one; each later run that uses it says so again.
    """
    device_type = j.measurements.device.split(":")[0]
    if not j.recording or not j.config.timing_applies(device_type):
        return []
    problems = []
    comparison = j.measurements.comparisons.get(mm.mode)
    est = comparison.speedup if comparison is not None else None
    if est is not None and est.noisy:
        problems.append(f"its speedup interval is too wide to judge against ({est.note})")
    if mm.step_times_s and j.config.check_step_time:
        spread = estimate_ratio(mm.step_times_s, j.config.confidence, j.config.noise_threshold)
        half = (spread.high - spread.low) / 2 / spread.median if spread.median else math.inf
        tolerance = j.config.step_time_tolerance_on(device_type)
        if half > tolerance / 2:
            problems.append(f"its step time wanders +-{half:.0%} within the run, more than half the step_time_tolerance ({tolerance:.0%})")
    if not problems:
        return []
    why = f"{mm.mode} baseline recorded from a noisy run: {'; '.join(problems)}; {BETTER_BASELINE}"
    return [Check(mm.mode, CheckName.BASELINE_NOISE, INCONCLUSIVE, why)]


def stored_noise(low: float | None, mid: float | None, high: float | None, limit: float) -> str:
    """A stored figure's own interval, said where it is too wide to judge against; '' otherwise or where unknown."""
    if low is None or high is None or not mid:
        return ""
    width = (high - low) / mid
    if width <= limit:
        return ""
    return f"; the stored baseline is itself noisy (its interval spans {width:.0%} of its median): {BETTER_BASELINE}"


def recordings_checks(j: Judging, stored: Baseline, how: str) -> list[Check]:
    """While recording: how many runs the stored baseline now pools, and whether they agree enough to judge against.

    One recording cannot show how far this machine moves between processes; several can, and
    their median is what later runs are judged against (:mod:`pytest_ampgate.recordings`).  Where
    the recordings disagree by more than ``noise_threshold`` the baseline is said to be noisy
    (INCONCLUSIVE, as a noisy run is: ``--ampgate-strict`` then records nothing).
    """
    device_type = j.measurements.device.split(":")[0]
    if not j.config.timing_applies(device_type):
        return []
    checks = []
    for name, mode in stored.modes.items():
        count = mode.recordings or 1
        if count < 2 or mode.speedup is None or mode.speedup_low is None or mode.speedup_high is None:
            continue
        spread = (mode.speedup_high - mode.speedup_low) / mode.speedup
        if spread > j.config.noise_threshold:
            why = (
                f"{name} baseline's {count} recordings disagree: speedup {mode.speedup_low:.2f}-{mode.speedup_high:.2f}x around "
                f"{mode.speedup:.2f}x ({spread:.0%} of it, more than noise_threshold {j.config.noise_threshold:.0%}); {BETTER_BASELINE}"
            )
            checks.append(Check(name, CheckName.BASELINE_NOISE, INCONCLUSIVE, why))
    pooled = max((m.recordings or 1 for m in stored.modes.values()), default=1)
    keep = j.config.baseline_recordings
    why = f"baseline pools {pooled} recording(s) ({how})"
    if pooled < min(keep, MIN_RECORDINGS):
        why += (
            f"; one process cannot show how far this machine moves between runs: run {UPDATE_COMMAND} again "
            f"(a fresh process, ideally minutes apart) until it pools {min(keep, MIN_RECORDINGS)}"
        )
    return [*checks, Check(ANY_MODE, CheckName.BASELINE_NOISE, PASS, why)]
