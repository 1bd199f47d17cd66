"""Verdicts: Measurements + GateConfig + stored Baseline -> a list of Checks, each with its one-line why.

The speedup check is the one that meets noise, so it is three-valued: PASS when the whole
confidence interval clears the floor, FAIL only when the whole interval lies below it (and, with
``confirm``, a fresh measurement agrees), INCONCLUSIVE otherwise, said as such.  A GPU shared
with other processes or held back by thermal or power limits turns a would-be FAIL into
INCONCLUSIVE with that reason: a verdict nobody can trust must not break a build.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from .baselines import Baseline, ModeBaseline
from .config import GateConfig
from .known_state import LEAKED_KEY, describe
from .measurement import Measurements, ModeMeasurement, launch_bound

PASS, FAIL, INCONCLUSIVE, SKIPPED = "pass", "fail", "inconclusive", "skipped"
WORKLOAD_METRICS = ("ran", "finite_loss")
"""Checks that, failing in the full-precision reference, mean the workload itself is broken."""
ANY_MODE = "*"
"""The mode of a check about the whole run (e.g. leaked global state), not one precision mode."""
UPDATE_HINT = "accept a deliberate change with: pytest --ampgate --ampgate-update"
RECORD_HINT = "record one with: pytest --ampgate --ampgate-update"
TIMING_METRICS = ("speedup",)
MARGIN_SETTING = {
    "speedup": "min_speedup",
    "memory": "max_memory_ratio",
    "skipped_steps": "max_skipped_fraction",
    "loss_scale": "min_loss_scale",
    "precision_coverage": "min_low_precision_share",
    "same_run": "same_run_tolerance",
    "same_run_loss": "same_run_loss_tolerance",
}
"""The marker setting behind each check that a fixed margin (not a stored baseline) can fail."""


@dataclass(frozen=True)
class Check:
    """One gated property of one mode: what was measured, against what, and the outcome."""

    mode: str
    metric: str
    outcome: str
    why: str
    measured: float | None = None
    threshold: float | None = None
    baseline: float | None = None

    def line(self) -> str:
        if self.mode == ANY_MODE:  # a note about the whole run, not a gated property
            return f"NOTE: {self.why}"
        word = {PASS: "ok", FAIL: "FAILED", INCONCLUSIVE: "INCONCLUSIVE", SKIPPED: "skipped"}[self.outcome]
        return f"{self.why} {word}" if self.outcome in (PASS, FAIL) else f"{self.why} [{word}]"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Check:
        return cls(**d)


@dataclass
class Verdict:
    checks: list[Check] = field(default_factory=list)
    confirmed: bool = False
    """A timing failure was re-measured before being reported."""
    reference: str = "fp32"
    """The reference mode: its failures are the workload's fault, not AMP's."""

    def of(self, outcome: str) -> list[Check]:
        return [c for c in self.checks if c.outcome == outcome]

    @property
    def outcome(self) -> str:
        if self.of(FAIL):
            return FAIL
        if self.no_mode_ran:
            return SKIPPED
        for outcome in (INCONCLUSIVE, PASS):
            if self.of(outcome):
                return outcome
        return SKIPPED

    @property
    def workload_at_fault(self) -> bool:
        """The reference itself failed: the workload (model, data, loss) is broken in full precision."""
        return any(c.mode == self.reference and c.metric in WORKLOAD_METRICS for c in self.of(FAIL))

    @property
    def no_mode_ran(self) -> bool:
        """Every compared mode was unsupported here: nothing about AMP was gated, so nothing passed."""
        compared = {c.mode for c in self.checks if c.mode not in (self.reference, ANY_MODE)}
        return bool(compared) and all(c.metric == "supported" for c in self.checks if c.mode in compared)

    def headline(self) -> str:
        if self.outcome == FAIL and self.workload_at_fault:
            return f"WORKLOAD ERROR: the {self.reference} reference itself failed, so AMP is not to blame: fix the workload"
        if self.outcome == SKIPPED and self.no_mode_ran:
            return "AMP GATE SKIPPED: no requested precision mode can run here, so nothing was gated"
        return {FAIL: "AMP REGRESSION", INCONCLUSIVE: "AMP GATE INCONCLUSIVE", PASS: "AMP GATE PASSED", SKIPPED: "AMP GATE SKIPPED"}[
            self.outcome
        ]

    def explain(self, test_id: str = "", strict: bool = False) -> str:
        """The failure text of DESIGN.md: one line per check, failures first, then what to run next."""
        order = {FAIL: 0, INCONCLUSIVE: 1, PASS: 2, SKIPPED: 3}
        head = self.headline()
        lines = [f"{test_id} - {head}" if test_id else head]
        lines += ["  " + c.line() for c in sorted(self.checks, key=lambda c: order[c.outcome])]
        failed = self.of(FAIL)
        if self.workload_at_fault:
            return "\n".join(lines)  # a broken workload is not cured by a new baseline or a relaxed margin
        if any(c.baseline is not None for c in failed):
            lines.append("  " + UPDATE_HINT)
        margins = sorted({MARGIN_SETTING[c.metric] for c in failed if c.baseline is None and c.metric in MARGIN_SETTING})
        if margins:
            lines.append(f"  a fixed margin failed: fix the regression, or relax {', '.join(margins)} in @pytest.mark.amp_regression(...)")
        if not failed and self.of(INCONCLUSIVE):
            # Only a timing doubt is cured by a quiet GPU; a missing baseline's line already says how to record one.
            timing = any(c.metric in TIMING_METRICS for c in self.of(INCONCLUSIVE))
            advice = ["--ampgate-strict treats this as a failure"] if strict else []
            advice += ["rerun on a quiet GPU, or raise rounds"] if timing else []
            if advice:
                lines.append("  " + "; ".join(advice))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "outcome": self.outcome,
            "confirmed": self.confirmed,
            "reference": self.reference,
            "checks": [c.to_dict() for c in self.checks],
        }

    @classmethod
    def from_dict(cls, d: dict) -> Verdict:
        return cls(
            checks=[Check.from_dict(c) for c in d["checks"]], confirmed=d.get("confirmed", False), reference=d.get("reference", "fp32")
        )


def _fmt_bytes(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


def _noise_reason(measurements: Measurements) -> str:
    """Why timing on this GPU could not be trusted, or '' (see ``gpu_noise.NoiseReadings.untrusted_reason``)."""
    from .gpu_noise import NoiseReadings
    from .records import from_dict

    return from_dict(NoiseReadings, measurements.noise).untrusted_reason()


def _launch_diagnosis(name: str, m: Measurements, floor: float) -> str:
    """Why the floor is out of reach on this device at this size, or '' (see measurement.launch_bound).

    Two ways to know: the reference leaves the device idle a large share of each step (it is
    waiting for the host, so no mode can beat the host's launch time, and AMP launches more); or
    the mode's own launch time already exceeds what the floor allows (a block cannot end before
    its last kernel is launched).  The second needs the mode's probe to have worked (no host
    sync in its step: a GradScaler's sync puts device time into the host time).
    """
    from .stats import median

    bound = launch_bound(m.reference)
    if bound is not None and bound.bound:
        return bound.describe()
    mm = m.modes[name]
    if not m.device.startswith("cuda") or mm.busy_step_s is None or not mm.host_times_s or not m.reference.step_times_s:
        return ""
    ref_step, host = median(m.reference.step_times_s), median(mm.host_times_s)
    ceiling = ref_step / host if host > 0 else float("inf")
    if ceiling >= floor:
        return ""
    return (
        f"{name} is launch-bound: the host takes {host * 1e3:.3g} ms to launch its step, so it can be at most "
        f"{ceiling:.2f}x faster than {m.reference.mode}'s {ref_step * 1e3:.3g} ms step, below the floor"
    )


def _speedup_check(name: str, m: Measurements, config: GateConfig, base: ModeBaseline | None, env_label: str) -> Check:
    comparison = m.comparisons[name]
    est = comparison.speedup
    floor, source = config.min_speedup, f"margin {config.min_speedup:.2f}x"
    if base is not None and base.speedup is not None:
        allowed = base.speedup * (1 - config.speedup_tolerance)
        source += f"; baseline {base.speedup:.2f}x on {env_label}, tol {config.speedup_tolerance:.0%}"
        floor = max(floor, allowed)
    if est is None:
        return Check(name, "speedup", SKIPPED, f"{name} speedup not measured: {comparison.note or 'no timed rounds'}")
    text = f"{name} speedup {est.median:.2f}x [{est.confidence:.0%} CI {est.low:.2f}-{est.high:.2f}]"
    args = dict(measured=est.median, threshold=floor, baseline=base.speedup if base else None)
    diagnosis = _launch_diagnosis(name, m, floor) if est.low < floor else ""
    if diagnosis:
        statement = (
            f"{text} not gated: {diagnosis}; AMP cannot pay off at this size: use a larger batch, "
            "a wider model, CUDA graphs or torch.compile"
        )
        if config.check_speed is not True:
            return Check(name, "speedup", SKIPPED, f"{statement} (check_speed=True gates it anyway)", **args)
        text += f" ({diagnosis})"
    too_few = _too_few_rounds(est, config)
    if too_few:
        return Check(name, "speedup", INCONCLUSIVE, f"{text} vs floor {floor:.2f}x ({source}): {too_few}", **args)
    if est.low >= floor:
        return Check(name, "speedup", PASS, f"{text} >= floor {floor:.2f}x ({source})", **args)
    if est.high < floor:
        noise = _noise_reason(m)
        if noise:
            return Check(name, "speedup", INCONCLUSIVE, f"{text} < floor {floor:.2f}x ({source}), but the GPU was busy: {noise}", **args)
        return Check(name, "speedup", FAIL, f"{text} < floor {floor:.2f}x ({source})", **args)
    noisy = f"; {est.note}" if est.noisy else ""
    return Check(name, "speedup", INCONCLUSIVE, f"{text} straddles floor {floor:.2f}x ({source}{noisy})", **args)


def _too_few_rounds(est, config: GateConfig) -> str:
    """Why the interval cannot decide anything (too few rounds for the requested coverage), or ''."""
    from .stats import MIN_ROUNDS_FOR_CONFIDENCE

    if est.rounds >= MIN_ROUNDS_FOR_CONFIDENCE and est.confidence >= config.confidence:
        return ""
    return (
        f"only {est.rounds} round{'s' if est.rounds != 1 else ''}, so the interval covers {est.confidence:.0%}, "
        f"not {config.confidence:.0%}: no verdict; raise rounds to at least {max(MIN_ROUNDS_FOR_CONFIDENCE, est.rounds + 1)}"
    )


def _memory_check(name: str, m: Measurements, config: GateConfig, base: ModeBaseline | None, env_label: str) -> Check:
    ratio = m.comparisons[name].memory_ratio
    if ratio is None:
        note = m.modes[name].memory_note or m.reference.memory_note or "not measured"
        return Check(name, "memory", SKIPPED, f"{name} peak memory: {note}")
    limit, source = config.max_memory_ratio, f"limit {config.max_memory_ratio:.2f}x"
    if base is not None and base.memory_ratio is not None:
        source += f"; baseline {base.memory_ratio:.2f}x on {env_label}, tol +{config.memory_tolerance:.2f}"
        limit = min(limit, base.memory_ratio + config.memory_tolerance)
    text = (
        f"{name} peak memory {_fmt_bytes(m.modes[name].peak_memory_bytes)} = {ratio:.2f}x fp32 ({_fmt_bytes(m.reference.peak_memory_bytes)}"
    )
    act, ref_act = getattr(m.modes[name], "activation_memory_bytes", None), getattr(m.reference, "activation_memory_bytes", None)
    text += f"; activations {_fmt_bytes(act)} vs {_fmt_bytes(ref_act)})" if act is not None and ref_act is not None else ")"
    outcome = PASS if ratio <= limit else FAIL
    return Check(
        name,
        "memory",
        outcome,
        f"{text} {'<=' if outcome == PASS else '>'} {limit:.2f}x ({source})",
        measured=ratio,
        threshold=limit,
        baseline=base.memory_ratio if base else None,
    )


def _finite_check(mm: ModeMeasurement) -> Check:
    steps = len(mm.losses)
    if mm.first_nonfinite_step is None:
        return Check(mm.mode, "finite_loss", PASS, f"{mm.mode} loss finite at all {steps} steps", measured=0, threshold=0)
    bad = mm.losses[mm.first_nonfinite_step]
    return Check(
        mm.mode,
        "finite_loss",
        FAIL,
        f"{mm.mode} loss non-finite ({bad}) first at step {mm.first_nonfinite_step} of {steps} ({mm.nonfinite_steps} non-finite steps)",
        measured=mm.nonfinite_steps,
        threshold=0,
    )


def _scaler_name(mm: ModeMeasurement) -> str:
    """GradScaler for amp_fp16; the master weights' own dynamic loss scaler for fp16_master (Apex O2)."""
    from .modes import MODES

    mode = MODES.get(mm.mode)
    return "loss scaler" if mode is not None and mode.master_weights else "GradScaler"


def _scaler_checks(mm: ModeMeasurement, config: GateConfig) -> list[Check]:
    s = mm.scaler
    if s is None:
        return []
    checks = []
    if s.skipped_steps is not None:
        fraction = s.skipped_steps / s.steps if s.steps else 0.0
        ok = fraction <= config.max_skipped_fraction
        checks.append(
            Check(
                mm.mode,
                "skipped_steps",
                PASS if ok else FAIL,
                f"{mm.mode} {_scaler_name(mm)} skipped {s.skipped_steps} of {s.steps} steps ({fraction:.1%}) "
                f"{'<=' if ok else '>'} {config.max_skipped_fraction:.1%}",
                measured=fraction,
                threshold=config.max_skipped_fraction,
            )
        )
    ok = s.final_scale >= config.min_loss_scale
    checks.append(
        Check(
            mm.mode,
            "loss_scale",
            PASS if ok else FAIL,
            f"{mm.mode} loss scale {s.final_scale:g} (start {s.initial_scale:g}, lowest {s.min_scale:g}) "
            f"{'>=' if ok else '< collapse limit'} {config.min_loss_scale:g}",
            measured=s.final_scale,
            threshold=config.min_loss_scale,
        )
    )
    return checks


def stored_metric(base: ModeBaseline | None, name: str) -> float | None:
    """A mode's stored metric: ``accuracy`` in its own field, any other metric under its name."""
    if base is None:
        return None
    if name == "accuracy":
        return base.accuracy
    value = base.extra.get(name)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def _fmt_metric(value: float) -> str:
    return f"{value:.3f}" if abs(value) >= 0.1 or value == 0 else f"{value:.4g}"


def _metric_check(mm: ModeMeasurement, config: GateConfig, baseline: Baseline | None, missing: str, tolerance: float | None) -> Check:
    """The mode's held-out metric against its stored baseline, in the metric's direction and units."""
    if mm.metric_name == "accuracy" and mm.metric is None and mm.accuracy is not None:
        mm.metric = mm.accuracy
    name = mm.metric_name
    if name == "accuracy" and tolerance is None:
        return _accuracy_check(mm, config, baseline, missing)
    tol = config.accuracy_tolerance if tolerance is None else tolerance
    value = mm.metric
    if value is None or not math.isfinite(value):
        if value is None:
            return Check(mm.mode, name, SKIPPED, f"{mm.mode} {name} not measured")
        return Check(mm.mode, name, FAIL, f"{mm.mode} {name} is {value} (non-finite)", measured=None)
    base = stored_metric(baseline.modes.get(mm.mode) if baseline else None, name)
    if base is None:
        outcome = {"warn": INCONCLUSIVE, "fail": FAIL, "ignore": SKIPPED}[config.missing_baseline]
        return Check(mm.mode, name, outcome, f"{mm.mode} {name} {_fmt_metric(value)}: {missing}", measured=value)
    higher = mm.higher_is_better
    limit = base - tol if higher else base + tol
    text = (
        f"{mm.mode} {name} {_fmt_metric(value)} vs baseline {_fmt_metric(base)} (tol {tol:g}, {'higher' if higher else 'lower'} is better)"
    )
    worse = value < limit if higher else value > limit
    if worse:
        return Check(
            mm.mode,
            name,
            FAIL,
            f"{text} {'dropped below' if higher else 'rose above'} {_fmt_metric(limit)}",
            measured=value,
            threshold=limit,
            baseline=base,
        )
    if (value > base + tol) if higher else (value < base - tol):
        text += "; better than the baseline by more than the tolerance, refresh it with --ampgate-update"
    return Check(mm.mode, name, PASS, text, measured=value, threshold=limit, baseline=base)


def tail_loss(mm: ModeMeasurement, steps: int) -> float | None:
    """Mean loss over the last ``steps`` training steps: every mode trains on the same batches in the
    same order, so these are comparable across modes, and steadier than the very last step's loss."""
    tail = mm.losses[-max(1, steps) :]
    return sum(tail) / len(tail) if tail else None


def _same_run_checks(name: str, m: Measurements, config: GateConfig, tolerance: float | None) -> list[Check]:
    """The mode's metric and late loss against the reference's in this very run: needs no baseline,
    so a mode that trains to chance while fp32 learns fails on the first run."""
    mm, ref = m.modes[name], m.reference
    checks = []
    metric = mm.metric_name
    tol = config.same_run_tolerance if tolerance is None else tolerance
    if mm.metric is not None and ref.metric is not None and math.isfinite(ref.metric):
        value, base = mm.metric, ref.metric
        higher = mm.higher_is_better
        limit = base - tol if higher else base + tol
        ok = math.isfinite(value) and (value >= limit if higher else value <= limit)
        text = (
            f"{name} {metric} {_fmt_metric(value) if math.isfinite(value) else value} vs {ref.mode} "
            f"{_fmt_metric(base)} in this run ({'higher' if higher else 'lower'} is better, tol {tol:g})"
        )
        if not ok:
            text += f": {'below' if higher else 'above'} {_fmt_metric(limit)}"
        checks.append(
            Check(name, "same_run", PASS if ok else FAIL, text, measured=value if math.isfinite(value) else None, threshold=limit)
        )
    steps = m.config.steps_per_block
    loss, ref_loss = tail_loss(mm, steps), tail_loss(ref, steps)
    if loss is not None and ref_loss is not None and math.isfinite(ref_loss) and math.isfinite(loss):
        ltol = config.same_run_loss_tolerance
        limit = ref_loss + ltol * max(abs(ref_loss), 1e-3)
        ok = loss <= limit
        text = (
            f"{name} loss over the last {min(steps, len(mm.losses))} steps {loss:.4g} vs {ref.mode} {ref_loss:.4g} "
            f"in this run (at most +{ltol:.0%})"
        )
        if not ok:
            text += f": above {limit:.4g}"
        checks.append(Check(name, "same_run_loss", PASS if ok else FAIL, text, measured=loss, threshold=limit))
    return checks


def _accuracy_check(mm: ModeMeasurement, config: GateConfig, baseline: Baseline | None, missing: str) -> Check:
    if mm.accuracy is None or (isinstance(mm.accuracy, float) and math.isnan(mm.accuracy)):
        return Check(mm.mode, "accuracy", SKIPPED, f"{mm.mode} accuracy not measured")
    base = baseline.modes.get(mm.mode) if baseline else None
    if base is None or base.accuracy is None:
        outcome = {"warn": INCONCLUSIVE, "fail": FAIL, "ignore": SKIPPED}[config.missing_baseline]
        return Check(mm.mode, "accuracy", outcome, f"{mm.mode} accuracy {mm.accuracy:.3f}: {missing}", measured=mm.accuracy)
    low = base.accuracy - config.accuracy_tolerance
    text = f"{mm.mode} accuracy {mm.accuracy:.3f} vs baseline {base.accuracy:.3f} (tol {config.accuracy_tolerance:g})"
    if mm.accuracy < low:
        return Check(
            mm.mode, "accuracy", FAIL, f"{text} dropped below {low:.3f}", measured=mm.accuracy, threshold=low, baseline=base.accuracy
        )
    if mm.accuracy > base.accuracy + config.accuracy_tolerance:
        text += "; above the baseline by more than the tolerance, refresh it with --ampgate-update"
    return Check(mm.mode, "accuracy", PASS, text, measured=mm.accuracy, threshold=low, baseline=base.accuracy)


def _coverage_check(mm: ModeMeasurement, config: GateConfig) -> Check | None:
    from .modes import resolve_mode

    cov = mm.precision_coverage
    if cov is None or resolve_mode(mm.mode).low_precision_dtype is None:
        return None
    if cov.total_flops == 0:
        return Check(mm.mode, "precision_coverage", SKIPPED, f"{mm.mode}: no matmul/convolution FLOPs recorded")
    ok = cov.share >= config.min_low_precision_share
    text = f"{mm.mode} ran {cov.share:.1%} of matmul/conv FLOPs in low precision {'>=' if ok else '<'} {config.min_low_precision_share:.0%}"
    text += fp32_layers_text(cov)
    return Check(mm.mode, "precision_coverage", PASS if ok else FAIL, text, measured=cov.share, threshold=config.min_low_precision_share)


def fp32_layers_text(cov, shown: int = 5) -> str:
    """``; still fp32: a (60.0%), b (20.0%), and 3 more (8.0%)``: every layer left in fp32, or the top
    ones and the rest summed, so the shares add up to what did not run in low precision."""
    every = cov.fp32_hotspots(limit=None)
    if not every:
        return ""
    head = every if len(every) <= shown else every[: shown - 1]
    parts = [f"{name} ({fraction:.1%})" for name, _flops, fraction in head]
    rest = every[len(head) :]
    if rest:
        parts.append(f"and {len(rest)} more ({sum(f for _n, _fl, f in rest):.1%})")
    return "; still fp32: " + ", ".join(parts)


def evaluate(
    measurements: Measurements,
    config: GateConfig,
    baseline: Baseline | None = None,
    *,
    missing_baseline_note: str = "",
    metric_tolerance: float | None = None,
    same_run_tolerance: float | None = None,
) -> Verdict:
    """All checks for one measured workload.

    ``missing_baseline_note`` says why no baseline applied (e.g. which environments have one) so
    the accuracy check can say how to record one.  ``metric_tolerance`` and ``same_run_tolerance``
    are a custom metric's own tolerances (its units); None uses the config's.
    """
    env_label = _env_label(baseline.environment) if baseline else ""
    missing = missing_baseline_note or f"no stored baseline; {RECORD_HINT}"
    device_type = measurements.device.split(":")[0]
    checks: list[Check] = []
    for mm, _comparison in measurements.each_mode():
        if not mm.supported:
            checks.append(Check(mm.mode, "supported", SKIPPED, f"{mm.mode} not run: {mm.unsupported_reason}"))
            continue
        if mm.error:
            where = f"in {mm.failed_phase}" if getattr(mm, "failed_phase", "") else "while running"
            checks.append(Check(mm.mode, "ran", FAIL, f"{mm.mode} failed {where}: {mm.error}{_error_hint(mm.error)}"))
            continue
        checks.append(_finite_check(mm))
        checks += _scaler_checks(mm, config)
        coverage = _coverage_check(mm, config)
        if coverage:
            checks.append(coverage)
        checks.append(_metric_check(mm, config, baseline, missing, metric_tolerance))
    for name, mm in measurements.modes.items():
        if not mm.ok or not measurements.reference.ok:
            continue
        checks += _same_run_checks(name, measurements, config, same_run_tolerance)
        base = baseline.modes.get(name) if baseline else None
        if config.timing_applies(device_type):
            checks.append(_speedup_check(name, measurements, config, base, env_label))
        else:
            checks.append(
                Check(
                    name,
                    "speedup",
                    SKIPPED,
                    f"{name} speedup not gated on {device_type} (timing gates run on CUDA; check_speed=True forces them)",
                )
            )
        if config.memory_applies(device_type):
            checks.append(_memory_check(name, measurements, config, base, env_label))
    leaked = measurements.environment.get(LEAKED_KEY)
    if leaked:
        checks.append(Check(ANY_MODE, "known_state", PASS, describe(leaked)))
    return Verdict(checks, reference=measurements.reference.mode)


ERROR_HINTS = {
    "does not require grad": "the loss is not connected to the model's parameters (does loss_fn detach it, "
    "call .item(), or are the parameters frozen?)",
    "meta tensor": "a tensor is on the meta device (no data)",
    "closure": "the optimizer's step() needs a closure",
}


def _error_hint(error: str) -> str:
    for marker, hint in ERROR_HINTS.items():
        if marker in error:
            return f"; {hint}"
    return ""


def _env_label(environment: dict) -> str:
    name = environment.get("device_name", "?")
    torch_version = ".".join(str(environment.get("torch_version", "?")).split("+")[0].split(".")[:2])
    return f"{name}, torch {torch_version}"


def decide(
    measure_once: Callable[[], Measurements],
    config: GateConfig,
    baseline: Baseline | None = None,
    *,
    missing_baseline_note: str = "",
    metric_tolerance: float | None = None,
    same_run_tolerance: float | None = None,
) -> tuple[Measurements, Verdict]:
    """Measure, judge, and re-measure before reporting a timing failure (when ``config.confirm``).

    A speedup FAIL stands only if the fresh measurement fails it too; if the two runs disagree the
    check is INCONCLUSIVE.  Non-timing checks (numerics, memory) come from the first run: they are
    deterministic enough not to need a second opinion.
    """
    tolerances = dict(metric_tolerance=metric_tolerance, same_run_tolerance=same_run_tolerance)
    first = measure_once()
    verdict = evaluate(first, config, baseline, missing_baseline_note=missing_baseline_note, **tolerances)
    timing_failures = [c for c in verdict.of(FAIL) if c.metric in TIMING_METRICS]
    if not (config.confirm and timing_failures):
        return first, verdict
    second = measure_once()
    again = {
        (c.mode, c.metric): c for c in evaluate(second, config, baseline, missing_baseline_note=missing_baseline_note, **tolerances).checks
    }
    checks = []
    for c in verdict.checks:
        if c in timing_failures:
            c2 = again.get((c.mode, c.metric))
            if c2 is not None and c2.outcome == FAIL:
                c = Check(
                    c.mode, c.metric, FAIL, f"{c.why}; confirmed by a fresh run: {c2.measured:.2f}x", c.measured, c.threshold, c.baseline
                )
            else:
                second_text = f"{c2.measured:.2f}x ({c2.outcome})" if c2 is not None and c2.measured is not None else "no result"
                c = Check(
                    c.mode, c.metric, INCONCLUSIVE, f"{c.why}, but a fresh run gave {second_text}", c.measured, c.threshold, c.baseline
                )
        checks.append(c)
    return first, Verdict(checks, confirmed=True, reference=verdict.reference)


def baseline_from(measurements: Measurements, test_id: str, env_key: str, settings: dict) -> Baseline:
    """What ``--ampgate-update`` stores for one test: per-mode figures with their spread."""
    modes = {}
    for mm, comparison in measurements.each_mode():
        if not mm.ok:
            continue
        speedup = comparison.speedup if comparison else None
        cov = mm.precision_coverage
        final = mm.final_loss
        modes[mm.mode] = ModeBaseline(
            speedup=speedup.median if speedup else None,
            speedup_low=speedup.low if speedup else None,
            speedup_high=speedup.high if speedup else None,
            memory_ratio=comparison.memory_ratio if comparison else None,
            step_time_s=mm.step_time_s,
            peak_memory_bytes=mm.peak_memory_bytes,
            accuracy=mm.accuracy,
            final_loss=final if final is not None and math.isfinite(final) else None,
            low_precision_share=cov.share if cov is not None and cov.total_flops else None,
            extra=_metric_extra(mm),
        )
    return Baseline(
        test_id=test_id,
        env_key=env_key,
        environment={k: v for k, v in measurements.environment.items() if k != LEAKED_KEY},
        recorded_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        settings={"workload": measurements.workload, "batch_size": measurements.batch_size, **settings},
        modes=modes,
    )


def _metric_extra(mm: ModeMeasurement) -> dict:
    """A custom metric is stored under its own name (accuracy has its own field)."""
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
    config: dict = field(default_factory=dict)
    """The test's GateConfig as a dict (margins, limits): reports and charts draw floors from it."""

    @property
    def failed(self) -> bool:
        return self.verdict.outcome == FAIL or (self.strict and self.verdict.outcome == INCONCLUSIVE)

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
        return {
            "test_id": self.test_id,
            "env_key": self.env_key,
            "measurements": self.measurements.to_dict(),
            "verdict": self.verdict.to_dict(),
            "baseline_accuracy": self.baseline_accuracy,
            "baseline_metric": self.baseline_metric,
            "update": self.update,
            "strict": self.strict,
            "config": self.config,
        }

    @classmethod
    def from_dict(cls, d: dict) -> GateResult:
        return cls(
            test_id=d["test_id"],
            env_key=d["env_key"],
            measurements=Measurements.from_dict(d["measurements"]),
            verdict=Verdict.from_dict(d["verdict"]),
            baseline_accuracy=d.get("baseline_accuracy", {}),
            baseline_metric=d.get("baseline_metric", d.get("baseline_accuracy", {})),
            update=d.get("update"),
            strict=d.get("strict", False),
            config=d.get("config", {}),
        )
