"""The gate: Measurements + GateConfig + stored Baseline -> a Verdict, confirmed before a timing failure stands.

The speedup check is the one that meets noise, so it is three-valued: PASS when the whole
confidence interval clears the floor, FAIL only when the whole interval lies below it (and, with
``confirm``, a fresh measurement agrees), INCONCLUSIVE otherwise, said as such.  A GPU shared
with other processes or held back by thermal or power limits turns a would-be FAIL into
INCONCLUSIVE with that reason: a verdict nobody can trust must not break a build.  The checks
themselves live in :mod:`pytest_ampgate.checks`, outcomes and messages in :mod:`pytest_ampgate.verdict`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from .baselines import Baseline, ModeBaseline
from .checks import COMPARED_CHECKS, MODE_CHECKS, Judging, error_hint
from .config import GateConfig
from .judging import fmt_seconds
from .known_state import LEAKED_KEY, describe
from .pooling import pooled
from .records import from_dict, to_dict, utc_timestamp
from .results import Measurements, ModeMeasurement
from .stats import MIN_ROUNDS_FOR_CONFIDENCE, estimate_ratio
from .verdict import ANY_MODE, FAIL, INCONCLUSIVE, PASS, SKIPPED, TIMING_METRICS, Check, CheckName, Verdict


def evaluate(
    measurements: Measurements,
    config: GateConfig,
    baseline: Baseline | None = None,
    *,
    missing_baseline_note: str = "",
    metric_tolerance: float | None = None,
    same_run_tolerance: float | None = None,
    recording: bool = False,
) -> Verdict:
    """All checks for one measured workload.

    ``missing_baseline_note`` says why no baseline applied (e.g. which environments have one) so
    the accuracy check can say how to record one.  ``metric_tolerance`` and ``same_run_tolerance``
    are a custom metric's own tolerances (its units); None uses the config's.  ``recording``: this run
    becomes the baseline (``--ampgate-update``), so how noisy it is is judged too.
    """
    judging = Judging(measurements, config, baseline, missing_baseline_note, metric_tolerance, same_run_tolerance, recording)
    checks: list[Check] = []
    for mm, _comparison in measurements.each_mode():
        if not mm.supported:
            checks.append(Check(mm.mode, CheckName.SUPPORTED, SKIPPED, f"{mm.mode} not run: {mm.unsupported_reason}"))
        elif mm.error:
            where = f"in {mm.failed_phase}" if mm.failed_phase else "while running"
            checks.append(Check(mm.mode, CheckName.RAN, FAIL, f"{mm.mode} failed {where}: {mm.error}{error_hint(mm.error)}"))
        else:
            for check in MODE_CHECKS:
                checks += check(judging, mm)
    for name, mm in measurements.modes.items():
        if mm.ok and measurements.reference_of(name).ok:
            for check in COMPARED_CHECKS:
                checks += check(judging, name)
    leaked = measurements.environment.get(LEAKED_KEY)
    if leaked:
        checks.append(Check(ANY_MODE, CheckName.KNOWN_STATE, PASS, describe(leaked)))
    return Verdict(checks, reference=measurements.reference.mode)


def decide(
    measure_once: Callable[[], Measurements],
    config: GateConfig,
    baseline: Baseline | None = None,
    *,
    missing_baseline_note: str = "",
    metric_tolerance: float | None = None,
    same_run_tolerance: float | None = None,
) -> tuple[Measurements, Verdict]:
    """Measure, judge, and (with ``config.confirm``) measure again where a timing check failed or was left undecided.

    A FAIL stands only if the fresh run fails it on its own too (two independent misses: noise at
    the limit fails an unchanged run about 2.5% of the time, twice in a row about 0.06%); if the
    runs disagree the check is INCONCLUSIVE.  An undecided check is judged again on the rounds of
    both runs together (:func:`~pytest_ampgate.pooling.pooled`): twice the rounds may clear the
    limit, and then it PASSes.  Every extra look is another chance for noise to condemn, so a
    second look FAILs an undecided check (or confirms a FAIL the fresh run alone leaves undecided)
    only where it is a speedup, the pooled interval (at a stricter confidence,
    :data:`SECOND_LOOK_STRICTER`) lies wholly below the floor and each run's own median does too
    (:func:`_below_in_both`).  A speedup still undecided is measured again, up to
    ``config.confirm_runs`` runs in all, and judged on all their rounds together the same way
    (more than half the runs' medians below: :func:`_mostly_below`): under load that comes and
    goes, one run's interval straddles a real drop just past the tolerance (BENCHMARKS.md, side by
    side).  Non-timing checks (numerics, memory) come from the
    first run: they are deterministic enough not to need a second opinion.  The returned
    measurements are the first run's.
    """
    tolerances = dict(metric_tolerance=metric_tolerance, same_run_tolerance=same_run_tolerance)

    def judge(measurements: Measurements, judged_by: GateConfig = config) -> dict:
        found = evaluate(measurements, judged_by, baseline, missing_baseline_note=missing_baseline_note, **tolerances)
        return {(c.mode, c.metric): c for c in found.checks}

    first = measure_once()
    verdict = evaluate(first, config, baseline, missing_baseline_note=missing_baseline_note, **tolerances)
    undecided = [c for c in verdict.checks if c.metric in TIMING_METRICS and c.outcome in (FAIL, INCONCLUSIVE)]
    if not (config.confirm and undecided and config.rounds >= MIN_ROUNDS_FOR_CONFIDENCE):
        return first, verdict
    second = measure_once()
    alone, both = judge(second), judge(pooled([first, second]))
    stricter = 1 - (1 - config.confidence) / SECOND_LOOK_STRICTER

    def surer(runs: list[Measurements]) -> dict:  # the rounds of ``runs`` together, judged at the stricter confidence
        return judge(pooled(runs, stricter), replace(config, confidence=stricter))

    judged_surer = surer([first, second])
    checks = []
    for c in verdict.checks:
        key = (c.mode, c.metric)
        if c not in undecided:
            pass
        elif c.outcome == FAIL:
            c2 = alone.get(key)
            if c2 is not None and c2.outcome == FAIL:
                c = Check(c.mode, c.metric, FAIL, f"{c.why}; confirmed by a fresh run: {_figure(c2)}", c.measured, c.threshold, c.baseline)
            elif _below_in_both(c, c2, judged_surer.get(key)):
                why = (
                    f"{c.why}; a fresh run gave {_figure(c2)} ({c2.outcome}), also below, and the rounds of both together "
                    f"lie wholly below at {stricter:.2%}: {_figure(judged_surer[key])}"
                )
                c = Check(c.mode, c.metric, FAIL, why, c.measured, c.threshold, c.baseline)
            else:
                second_text = f"{_figure(c2)} ({c2.outcome})" if c2 is not None and c2.measured is not None else "no result"
                c = Check(
                    c.mode, c.metric, INCONCLUSIVE, f"{c.why}, but a fresh run gave {second_text}", c.measured, c.threshold, c.baseline
                )
        elif both.get(key) is not None and both[key].outcome == PASS:
            c = replace(
                both[key], why=f"{both[key].why}; judged on the rounds of this run and a fresh one together (this run alone: inconclusive)"
            )
        elif _below_in_both(c, alone.get(key), judged_surer.get(key)):
            c2 = alone[key]
            c = replace(
                judged_surer[key],
                why=f"{judged_surer[key].why}; judged on the rounds of this run and a fresh one together, and each run's own median "
                f"({_figure(c)}, {_figure(c2)}) lies below the floor too (this run alone: inconclusive)",
            )
        elif both.get(key) is not None and both[key].measured is not None:
            c = replace(c, why=f"{c.why}; with a fresh run's rounds added: {_figure(both[key])} ({both[key].outcome})")
        checks.append(c)
    firsts = {(c.mode, c.metric): c for c in verdict.checks}
    figures = {key: [firsts[key].measured, alone[key].measured if key in alone else None] for key in firsts}
    still = [
        i
        for i, c in enumerate(checks)
        if c.metric == CheckName.SPEEDUP and c.outcome == INCONCLUSIVE and firsts[(c.mode, c.metric)] in undecided
    ]
    runs = [first, second]
    while still and len(runs) < config.confirm_runs:
        runs.append(measure_once())
        own, both, judged_surer = judge(runs[-1]), judge(pooled(runs)), surer(runs)
        last = len(runs) == config.confirm_runs
        for i in list(still):
            key = (checks[i].mode, checks[i].metric)
            figures[key].append(own[key].measured if key in own else None)
            together = f"judged on the rounds of {len(runs)} runs together"
            if key in both and both[key].outcome == PASS:
                checks[i] = replace(both[key], why=f"{both[key].why}; {together} (the first alone: {firsts[key].outcome})")
            elif _mostly_below(figures[key], judged_surer.get(key)):
                said = ", ".join(_figure(replace(judged_surer[key], measured=f)) for f in figures[key] if f is not None)
                why = f"{judged_surer[key].why}; {together} at {stricter:.2%}, most runs' own medians ({said}) below the floor too"
                checks[i] = replace(judged_surer[key], why=f"{why} (the first alone: {firsts[key].outcome})")
            else:  # still undecided: measured again, or after the last run said with all their rounds' figure
                if last and key in both and both[key].measured is not None:
                    checks[i] = replace(checks[i], why=f"{firsts[key].why}; {together}: {_figure(both[key])} ({both[key].outcome})")
                continue
            still.remove(i)
    return first, Verdict(checks, confirmed=True, reference=verdict.reference)


def record(measure_once: Callable[[], Measurements], config: GateConfig) -> Measurements:
    """What ``--ampgate-update`` records: ``config.baseline_runs`` measurements with their timed rounds pooled.

    One run is as uncertain as the runs it will judge; a baseline is judged against many times, so
    it is worth more evidence.  Only timing benefits, so only gated timing is measured again, and
    not after a run in which a mode failed (nothing of it will be stored).
    """
    runs = [measure_once()]
    device_type = runs[0].device.split(":")[0]
    if not config.timing_applies(device_type):
        return runs[0]
    while len(runs) < config.baseline_runs and not any(mm.error for mm, _c in runs[-1].each_mode()):
        runs.append(measure_once())
    return pooled(runs)


SECOND_LOOK_STRICTER = 100
"""A later look that may FAIL a check is judged at 1/100 of the interval's miss rate (99.95% for 95%):
with up to three such looks, where the truth sits exactly at the floor they condemn at most about
one run in a thousand between them (Bonferroni; simulated in tests/test_gate.py)."""


def _below_in_both(first: Check, second: Check | None, both: Check | None) -> bool:
    """A speedup that twice the rounds put wholly below the floor, where each run's own median lies below it too.

    It FAILs a check the first run left undecided, and confirms one the first run failed where the
    fresh run, alone, could not decide.
    """
    if first.metric != CheckName.SPEEDUP or second is None:
        return False
    return _mostly_below([first.measured, second.measured], both)


def _mostly_below(medians: list[float | None], together: Check | None) -> bool:
    """The rounds of several runs together FAIL a speedup, and more than half the runs' own medians lie below its floor.

    Only the speedup: its two sides are timed in the same rounds, so load that comes and goes
    widens its interval without moving it, and more rounds can resolve what one run could not.
    An absolute step time under such load moves with it, so only two runs that each fail condemn
    it.  The runs' medians must agree, so one run's outlying rounds cannot carry the others.
    """
    if together is None or together.metric != CheckName.SPEEDUP or together.outcome != FAIL or together.threshold is None:
        return False
    below = sum(1 for m in medians if m is not None and m < together.threshold)
    return below * 2 > len(medians)


def _figure(check: Check) -> str:
    """A timing check's measured figure as its text gives it: a speedup in x, a step time in ms."""
    if check.metric == CheckName.STEP_TIME:
        return fmt_seconds(check.measured)
    return f"{check.measured:.2f}x"


def baseline_from(measurements: Measurements, test_id: str, env_key: str, settings: dict) -> Baseline:
    """What ``--ampgate-update`` stores for one test: per-mode figures with their spread."""
    modes = {}
    for (mm, _comparison), f in zip(measurements.each_mode(), measurements.figures()):
        if not mm.ok:
            continue
        modes[mm.mode] = ModeBaseline(
            speedup=f.speedup.median if f.speedup else None,
            speedup_low=f.speedup.low if f.speedup else None,
            speedup_high=f.speedup.high if f.speedup else None,
            memory_ratio=None if f.reference else f.memory_ratio,  # the reference is not stored against itself
            step_time_s=f.step_time_s,
            **_step_time_interval(mm),
            peak_memory_bytes=f.peak_memory_bytes,
            accuracy=f.accuracy,
            final_loss=f.final_loss if f.final_loss is not None and math.isfinite(f.final_loss) else None,
            low_precision_share=f.low_precision_share,
            extra=_metric_extra(mm),
        )
    return Baseline(
        test_id=test_id,
        env_key=env_key,
        environment={k: v for k, v in measurements.environment.items() if k != LEAKED_KEY},
        recorded_at=utc_timestamp(),
        settings={"workload": measurements.workload, "batch_size": measurements.batch_size, **settings},
        modes=modes,
    )


def _step_time_interval(mm: ModeMeasurement) -> dict:
    """The recorded run's interval of per-round step times, stored so later runs know how sure the figure is."""
    if not mm.step_times_s:
        return {}
    est = estimate_ratio(mm.step_times_s)
    return {"step_time_low": est.low, "step_time_high": est.high}


def _metric_extra(mm: ModeMeasurement) -> dict:
    """A custom metric is stored under its own name (accuracy has its own field); a compiled mode's compile figures as ``compiled``."""
    if mm.compiled is not None:
        keep = ("backend", "mode", "compile_time_s", "graphs", "graph_breaks", "graph_break_reasons", "graph_break_sites", "recompiles")
        return {"compiled": {k: mm.compiled[k] for k in keep if k in mm.compiled}, **_metric_extra(replace(mm, compiled=None))}
    if mm.metric_name == "accuracy" or mm.metric is None or not math.isfinite(mm.metric):
        return {}
    return {mm.metric_name: mm.metric}


@dataclass
class GateResult:
    """One gated run of one test: what was measured, the verdict, and what --ampgate-update stores.

    This is what the fixtures hand back, so a test can add asserts of its own.
    """

    test_id: str
    env_key: str
    measurements: Measurements
    verdict: Verdict
    baseline_accuracy: dict = field(default_factory=dict)
    """Stored accuracy per mode, for the table (empty when there was no baseline)."""
    baseline_metric: dict = field(default_factory=dict)
    """Stored value of the workload's metric (whatever its name) per mode (empty when there was no baseline)."""
    update: dict | None = None
    """The baseline entry to store (``Baseline.to_entry()``), set only under --ampgate-update."""
    strict: bool = False
    config: GateConfig | None = None
    """The test's settings (margins, limits): reports and charts draw floors from it."""

    def __post_init__(self):
        if isinstance(self.config, Mapping):  # as read from JSON
            self.config = from_dict(GateConfig, self.config) if self.config else None

    @property
    def failed(self) -> bool:
        """A FAIL; under strict also an INCONCLUSIVE, or a gate that gated nothing (no requested mode could run)."""
        if self.verdict.outcome == FAIL:
            return True
        return self.strict and (self.verdict.outcome == INCONCLUSIVE or self.verdict.no_mode_ran)

    @property
    def passed(self) -> bool:
        return not self.failed

    def mode(self, name: str) -> ModeMeasurement:
        """The measurement of one mode (the reference too), e.g. ``result.mode("amp_fp16").accuracy``."""
        if name == self.measurements.reference.mode and name not in self.measurements.modes:
            return self.measurements.reference
        try:
            return self.measurements.modes[name]
        except KeyError:
            raise KeyError(
                f"{name!r} was not measured; measured: {self.measurements.reference.mode}, {', '.join(self.measurements.modes)}"
            ) from None

    def speedup(self, name: str) -> float | None:
        """Median speedup of a mode over the reference (None when not timed)."""
        estimate = self.measurements.comparisons[name].speedup
        return estimate.median if estimate else None

    def memory_ratio(self, name: str) -> float | None:
        return self.measurements.comparisons[name].memory_ratio

    def explain(self) -> str:
        return self.verdict.explain(self.test_id, strict=self.strict)

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GateResult:
        return from_dict(cls, {"baseline_metric": d.get("baseline_accuracy", {}), **d})
