"""The gate's checks: each one a function of what was measured that returns its Checks.

The checks against each mode's own stored figures live in :mod:`pytest_ampgate.baseline_checks`;
what every check reads (:class:`~pytest_ampgate.judging.Judging`) in :mod:`pytest_ampgate.judging`.

:data:`MODE_CHECKS` run for every mode that ran (the reference too); :data:`COMPARED_CHECKS` for
every compared mode whose run and whose reference's run both completed.  A new check is a
function here, a :class:`~pytest_ampgate.verdict.CheckName` name, and an entry in one of the lists.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from .baseline_checks import baseline_noise_check, combined, peak_memory_check, pooled_said, step_time_check, stored_noise, widened
from .baselines import Baseline, ModeBaseline
from .compiled import DynamoCounts, compiled_name, eager_name, graph_break_problems
from .config import GateConfig
from .judging import Judging, fmt_bytes, fmt_seconds, too_few_rounds
from .metrics import as_tolerance
from .results import Measurements, ModeMeasurement
from .timing import launch_diagnosis
from .verdict import FAIL, INCONCLUSIVE, PASS, RECORD_HINT, SKIPPED, Check, CheckName

MISSING_BASELINE_OUTCOME = {"warn": INCONCLUSIVE, "fail": FAIL, "ignore": SKIPPED}
"""What a metric without a stored baseline counts as, per the ``missing_baseline`` setting."""


def speedup_check(j: Judging, name: str) -> list[Check]:
    """The mode's speedup interval against the floor: the one check that meets noise, so three-valued."""
    if name != eager_name(name) == j.measurements.reference.mode:  # the compiled reference: what compiling gains, not AMP
        est = j.measurements.comparisons[name].speedup
        gain = f"{est.median:.2f}x [{est.low:.2f}-{est.high:.2f}]" if est else "not measured"
        why = f"{name} against eager {j.measurements.reference.mode}: {gain}, compiling's gain, reported (min_speedup is AMP's floor)"
        return [Check(name, CheckName.SPEEDUP, SKIPPED, why, measured=est.median if est else None)]
    device_type = j.measurements.device.split(":")[0]
    if not j.config.timing_applies(device_type):
        why = f"{name} speedup not gated on {device_type} (timing gates run on CUDA; check_speed=True forces them)"
        return [Check(name, CheckName.SPEEDUP, SKIPPED, why)]
    return [_speedup(name, j.measurements, j.config, j.stored(name), j.env_label)]


def _speedup(name: str, m: Measurements, config: GateConfig, base: ModeBaseline | None, env_label: str) -> Check:
    """The speedup interval against the floor: the larger of the margin against the reference and the stored baseline's.

    A launch-bound step may excuse only the margin (AMP cannot beat the host's launch time, a plain
    fact of the device at this size); the stored baseline of the same machine is gated whatever the
    step is bound by, or a 2x slowdown of a small model would never fail.
    """
    comparison = m.comparisons[name]
    est = comparison.speedup
    margin = config.min_speedup
    floor, source = margin, f"margin {margin:.2f}x"
    base_floor = None
    tolerance = config.speedup_tolerance_on(m.device.split(":")[0])
    if base is not None and base.speedup is not None:
        base_floor = base.speedup * (1 - tolerance)
        baseline_source = f"baseline {base.speedup:.2f}x{pooled_said(base)} on {env_label}, tol {tolerance:.0%}"
        baseline_source += stored_noise(base.speedup_low, base.speedup, base.speedup_high, config.noise_threshold)
        source += f"; {baseline_source}"
        floor = max(floor, base_floor)
    if est is None:
        return Check(name, CheckName.SPEEDUP, SKIPPED, f"{name} speedup not measured: {comparison.note or 'no timed rounds'}")
    text = f"{name} speedup {est.median:.2f}x [{est.confidence:.0%} CI {est.low:.2f}-{est.high:.2f}]"
    args = dict(measured=est.median, threshold=floor, baseline=base.speedup if base else None)
    reference = m.reference_of(name)
    diagnosis = launch_diagnosis(reference, m.modes[name], m.device, margin) if est.low < margin else ""
    if diagnosis:
        statement = (
            f"margin {margin:.2f}x against {reference.mode} not gated: {diagnosis}; AMP cannot pay off at this size: "
            f"use a larger batch, a wider model, CUDA graphs or torch.compile ({remedy_measured(m, name)})"
        )
        if config.check_speed is True:
            text += f" ({diagnosis})"
        elif base_floor is None:
            why = f"{text}: {statement} (check_speed=True gates it anyway); no stored baseline to gate it against: {RECORD_HINT}"
            return Check(name, CheckName.SPEEDUP, SKIPPED, why, **args)
        else:  # the margin is excused, the same machine's baseline is not
            floor, source = base_floor, f"{baseline_source}; {statement}"
            args["threshold"] = floor
    unobserved = m.noise.unobserved_reason()
    if unobserved:  # said, never guessed: the timings decide
        source += f"; {unobserved}"
    too_few = too_few_rounds(est, config)
    if too_few:
        return Check(name, CheckName.SPEEDUP, INCONCLUSIVE, f"{text} vs floor {floor:.2f}x ({source}): {too_few}", **args)
    low, high = est.low, est.high
    if base_floor is not None and floor == base_floor:  # judged against a measurement: its own error counts too
        low, high = widened(est, base.speedup_low, base.speedup, base.speedup_high, 1 - tolerance)
        text += combined(low, high, est, lambda x: f"{x:.2f}")
    if low >= floor:
        return Check(name, CheckName.SPEEDUP, PASS, f"{text} >= floor {floor:.2f}x ({source})", **args)
    if high < floor:
        noise = m.noise.untrusted_reason()
        if noise:
            return Check(
                name, CheckName.SPEEDUP, INCONCLUSIVE, f"{text} < floor {floor:.2f}x ({source}), but the GPU was busy: {noise}", **args
            )
        return Check(name, CheckName.SPEEDUP, FAIL, f"{text} < floor {floor:.2f}x ({source})", **args)
    noisy = f"; {est.note}" if est.noisy else ""
    return Check(name, CheckName.SPEEDUP, INCONCLUSIVE, f"{text} straddles floor {floor:.2f}x ({source}{noisy})", **args)


def remedy_measured(m: Measurements, name: str) -> str:
    """What compiling gained this mode, as measured in this run (``also_eager``), or how to measure it."""
    eager, compiled = m.modes.get(eager_name(name)), m.modes.get(compiled_name(eager_name(name)))
    if eager is None or compiled is None or not (eager.step_times_s and compiled.step_times_s):
        return "set compile and also_eager=True to measure what compiling gains"
    spec = compiled.compiled or {}
    label = spec.get("backend", "?") + (f":{spec['mode']}" if spec.get("mode") else "")
    text = f"measured: {compiled.mode} ({label}) {fmt_seconds(compiled.step_time_s)} a step vs {fmt_seconds(eager.step_time_s)} eager"
    text += f", {eager.step_time_s / compiled.step_time_s:.2f}x"
    if not m.device.startswith("cuda"):
        text += "; reduce-overhead needs CUDA graphs, so it was not measured on this device"
    elif spec.get("mode") != "reduce-overhead":
        text += "; reduce-overhead (CUDA graphs) not measured: compile='inductor:reduce-overhead' measures it"
    return text


def memory_check(j: Judging, name: str) -> list[Check]:
    """The mode's peak memory against fp32's, where memory is gated on this device."""
    if not j.config.memory_applies(j.measurements.device.split(":")[0]):
        return []
    return [_memory(name, j.measurements, j.config, j.stored(name), j.env_label)]


def _memory(name: str, m: Measurements, config: GateConfig, base: ModeBaseline | None, env_label: str) -> Check:
    ratio = m.comparisons[name].memory_ratio
    if ratio is None:
        note = m.modes[name].memory_note or m.reference_of(name).memory_note or "not measured"
        return Check(name, CheckName.MEMORY, SKIPPED, f"{name} peak memory: {note}")
    limit, source = config.max_memory_ratio, f"limit {config.max_memory_ratio:.2f}x"
    if base is not None and base.memory_ratio is not None:
        source += f"; baseline {base.memory_ratio:.2f}x on {env_label}, tol +{config.memory_tolerance:.2f}"
        limit = min(limit, base.memory_ratio + config.memory_tolerance)
    reference = m.reference_of(name)
    text = (
        f"{name} peak memory {fmt_bytes(m.modes[name].peak_memory_bytes)} = {ratio:.2f}x {reference.mode} "
        f"({fmt_bytes(reference.peak_memory_bytes)}"
    )
    act, ref_act = getattr(m.modes[name], "activation_memory_bytes", None), getattr(reference, "activation_memory_bytes", None)
    text += f"; activations {fmt_bytes(act)} vs {fmt_bytes(ref_act)})" if act is not None and ref_act is not None else ")"
    outcome = PASS if ratio <= limit else FAIL
    return Check(
        name,
        CheckName.MEMORY,
        outcome,
        f"{text} {'<=' if outcome == PASS else '>'} {limit:.2f}x ({source})",
        measured=ratio,
        threshold=limit,
        baseline=base.memory_ratio if base else None,
    )


def finite_loss_check(j: Judging, mm: ModeMeasurement) -> list[Check]:
    """Loss finite at every step, or the first bad step named."""
    steps = len(mm.losses)
    if mm.first_nonfinite_step is None:
        return [Check(mm.mode, CheckName.FINITE_LOSS, PASS, f"{mm.mode} loss finite at all {steps} steps", measured=0, threshold=0)]
    bad = mm.losses[mm.first_nonfinite_step]
    check = Check(
        mm.mode,
        CheckName.FINITE_LOSS,
        FAIL,
        f"{mm.mode} loss non-finite ({bad}) first at step {mm.first_nonfinite_step} of {steps} ({mm.nonfinite_steps} non-finite steps)",
        measured=mm.nonfinite_steps,
        threshold=0,
    )
    return [check]


def _scaler_name(mm: ModeMeasurement) -> str:
    """GradScaler for amp_fp16; the master weights' own dynamic loss scaler for fp16_master (Apex O2)."""
    from .modes import MODES

    mode = MODES.get(mm.mode)
    return "loss scaler" if mode is not None and mode.master_weights else "GradScaler"


def scaler_checks(j: Judging, mm: ModeMeasurement) -> list[Check]:
    """The loss scaler's skipped steps and final scale: a collapsing scale is fp16 trouble."""
    config = j.config
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
                CheckName.SKIPPED_STEPS,
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
            CheckName.LOSS_SCALE,
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
    if name == CheckName.ACCURACY:
        return base.accuracy
    value = base.extra.get(name)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def _fmt_metric(value: float) -> str:
    return f"{value:.3f}" if abs(value) >= 0.1 or value == 0 else f"{value:.4g}"


def metric_check(j: Judging, mm: ModeMeasurement) -> list[Check]:
    """The mode's held-out metric against its stored baseline, in the metric's direction and units."""
    return [_metric(mm, j.config, j.baseline, j.missing, j.metric_tolerance)]


def _metric(mm: ModeMeasurement, config: GateConfig, baseline: Baseline | None, missing: str, tolerance: float | None) -> Check:
    if mm.metric_name == CheckName.ACCURACY and mm.metric is None and mm.accuracy is not None:
        mm.metric = mm.accuracy
    name = mm.metric_name
    if name == CheckName.ACCURACY and tolerance is None:
        return _accuracy(mm, config, baseline, missing)
    tol = as_tolerance(tolerance, name, config.accuracy_tolerance, "accuracy_tolerance")
    value = mm.metric
    if value is None or not math.isfinite(value):
        if value is None:
            return Check(mm.mode, name, SKIPPED, f"{mm.mode} {name} not measured")
        return Check(mm.mode, name, FAIL, f"{mm.mode} {name} is {value} (non-finite)", measured=None)
    base = stored_metric(baseline.modes.get(mm.mode) if baseline else None, name)
    if base is None:
        outcome = MISSING_BASELINE_OUTCOME[config.missing_baseline]
        return Check(mm.mode, name, outcome, f"{mm.mode} {name} {_fmt_metric(value)}: {missing}", measured=value)
    higher = mm.higher_is_better
    limit = tol.limit(base, higher)
    text = (
        f"{mm.mode} {name} {_fmt_metric(value)} vs baseline {_fmt_metric(base)} ({tol.text()}, {'higher' if higher else 'lower'} is better)"
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
    if (value > base + tol.allowed(base)) if higher else (value < base - tol.allowed(base)):
        text += "; better than the baseline by more than the tolerance, refresh it with --ampgate-update"
    return Check(mm.mode, name, PASS, text, measured=value, threshold=limit, baseline=base)


def tail_loss(mm: ModeMeasurement, steps: int) -> float | None:
    """Mean loss over the last ``steps`` training steps: every mode trains on the same batches in the
    same order, so these are comparable across modes, and steadier than the very last step's loss."""
    tail = mm.losses[-max(1, steps) :]
    return sum(tail) / len(tail) if tail else None


def same_run_checks(j: Judging, name: str) -> list[Check]:
    """The mode's metric and late loss against the reference's in this very run: needs no baseline,
    so a mode that trains to chance while fp32 learns fails on the first run."""
    m, config, tolerance = j.measurements, j.config, j.same_run_tolerance
    mm, ref = m.modes[name], m.reference_of(name)
    checks = []
    metric = mm.metric_name
    tol = as_tolerance(tolerance, metric, config.same_run_tolerance, "same_run_tolerance")
    if mm.metric is not None and ref.metric is not None and math.isfinite(ref.metric):
        value, base = mm.metric, ref.metric
        higher = mm.higher_is_better
        limit = tol.limit(base, higher)
        ok = math.isfinite(value) and (value >= limit if higher else value <= limit)
        text = (
            f"{name} {metric} {_fmt_metric(value) if math.isfinite(value) else value} vs {ref.mode} "
            f"{_fmt_metric(base)} in this run ({'higher' if higher else 'lower'} is better, {tol.text()})"
        )
        if not ok:
            text += f": {'below' if higher else 'above'} {_fmt_metric(limit)}{tol.relief(value, base, higher)}"
        checks.append(
            Check(name, CheckName.SAME_RUN, PASS if ok else FAIL, text, measured=value if math.isfinite(value) else None, threshold=limit)
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
        checks.append(Check(name, CheckName.SAME_RUN_LOSS, PASS if ok else FAIL, text, measured=loss, threshold=limit))
    return checks


def _accuracy(mm: ModeMeasurement, config: GateConfig, baseline: Baseline | None, missing: str) -> Check:
    if mm.accuracy is None or (isinstance(mm.accuracy, float) and math.isnan(mm.accuracy)):
        return Check(mm.mode, CheckName.ACCURACY, SKIPPED, f"{mm.mode} accuracy not measured")
    base = baseline.modes.get(mm.mode) if baseline else None
    if base is None or base.accuracy is None:
        outcome = MISSING_BASELINE_OUTCOME[config.missing_baseline]
        return Check(mm.mode, CheckName.ACCURACY, outcome, f"{mm.mode} accuracy {mm.accuracy:.3f}: {missing}", measured=mm.accuracy)
    low = base.accuracy - config.accuracy_tolerance
    text = f"{mm.mode} accuracy {mm.accuracy:.3f} vs baseline {base.accuracy:.3f} (tol {config.accuracy_tolerance:g})"
    if mm.accuracy < low:
        return Check(
            mm.mode,
            CheckName.ACCURACY,
            FAIL,
            f"{text} dropped below {low:.3f}",
            measured=mm.accuracy,
            threshold=low,
            baseline=base.accuracy,
        )
    if mm.accuracy > base.accuracy + config.accuracy_tolerance:
        text += "; above the baseline by more than the tolerance, refresh it with --ampgate-update"
    return Check(mm.mode, CheckName.ACCURACY, PASS, text, measured=mm.accuracy, threshold=low, baseline=base.accuracy)


def coverage_check(j: Judging, mm: ModeMeasurement) -> list[Check]:
    """Share of matmul/conv FLOPs the mode ran in low precision, with the layers left in fp32."""
    from .modes import resolve_mode

    config = j.config
    cov = mm.precision_coverage
    if cov is None or resolve_mode(eager_name(mm.mode)).low_precision_dtype is None:
        return []
    if cov.total_flops == 0:
        return [Check(mm.mode, CheckName.PRECISION_COVERAGE, SKIPPED, f"{mm.mode}: no matmul/convolution FLOPs recorded")]
    ok = cov.share >= config.min_low_precision_share
    text = f"{mm.mode} ran {cov.share:.1%} of matmul/conv FLOPs in low precision {'>=' if ok else '<'} {config.min_low_precision_share:.0%}"
    text += fp32_layers_text(cov)
    return [
        Check(
            mm.mode, CheckName.PRECISION_COVERAGE, PASS if ok else FAIL, text, measured=cov.share, threshold=config.min_low_precision_share
        )
    ]


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


ERROR_HINTS = {
    "does not require grad": "the loss is not connected to the model's parameters (does loss_fn detach it, "
    "call .item(), or are the parameters frozen?)",
    "meta tensor": "a tensor is on the meta device (no data)",
    "closure": "the optimizer's step() needs a closure",
}


def error_hint(error: str) -> str:
    """A likely cause for a known error message, as "; cause", or ""."""
    for marker, hint in ERROR_HINTS.items():
        if marker in error:
            return f"; {hint}"
    return ""


ModeCheck = Callable[[Judging, ModeMeasurement], list[Check]]
ComparedCheck = Callable[[Judging, str], list[Check]]


def compiled_checks(j: Judging, mm: ModeMeasurement) -> list[Check]:
    """A compiled mode: recompiles during timed steps, graph breaks against the limit and the baseline, compile time."""
    c = mm.compiled
    if c is None:
        return []
    stored = j.stored(mm.mode)
    base = (stored.extra.get("compiled") if stored else None) or None
    figures = f"{c['backend']}{':' + c['mode'] if c.get('mode') else ''}: compiled in {c['compile_time_s']:.2f} s"
    figures += f" ({c['note']})" if c.get("note") else ""
    recompiles = list(c["timed_recompiles"]) + ([] if c["settled"] else [f"still recompiling after {c['compile_steps']} warm-up steps"])
    checks = [
        Check(mm.mode, CheckName.RECOMPILES, FAIL, f"{mm.mode}: " + "; ".join(recompiles), len(recompiles), 0)
        if recompiles
        else Check(mm.mode, CheckName.RECOMPILES, PASS, f"{mm.mode} {figures}, 0 recompiles in the timed steps", 0, 0)
    ]
    counts = DynamoCounts(graph_breaks=c["graph_break_reasons"], break_sites=c.get("graph_break_sites", []))
    base_breaks = base.get("graph_breaks") if base else None
    problems = graph_break_problems(counts, j.config.max_graph_breaks, base_breaks)
    n = counts.graph_break_count
    if problems:
        checks.append(Check(mm.mode, CheckName.GRAPH_BREAKS, FAIL, f"{mm.mode}: " + "; ".join(problems), n, base_breaks))
    elif base_breaks is not None and n < base_breaks:
        why = f"{mm.mode}: {n} graph break(s), fewer than the baseline's {base_breaks}: an improvement; {RECORD_HINT}"
        checks.append(Check(mm.mode, CheckName.GRAPH_BREAKS, PASS, why, n, base_breaks, base_breaks))
    else:
        checks.append(Check(mm.mode, CheckName.GRAPH_BREAKS, PASS, f"{mm.mode}: {n} graph break(s)", n, base_breaks, base_breaks))
    base_time = base.get("compile_time_s") if base else None
    if base_time:
        limit = base_time * j.config.max_compile_time_ratio
        outcome = FAIL if c["compile_time_s"] > limit else PASS
        why = f"{mm.mode}: compile time {c['compile_time_s']:.2f} s, baseline {base_time:.2f} s (limit {limit:.2f} s)"
        checks.append(Check(mm.mode, CheckName.COMPILE_TIME, outcome, why, c["compile_time_s"], limit, base_time))
    return checks


MODE_CHECKS: tuple[ModeCheck, ...] = (
    finite_loss_check,
    scaler_checks,
    coverage_check,
    metric_check,
    compiled_checks,
    step_time_check,
    peak_memory_check,
    baseline_noise_check,
)
"""Checks of one mode's own run, in the order a failure text lists them."""
COMPARED_CHECKS: tuple[ComparedCheck, ...] = (same_run_checks, speedup_check, memory_check)
"""Checks of a compared mode against the reference."""
