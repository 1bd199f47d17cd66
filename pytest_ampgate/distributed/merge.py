"""Per-rank results into one Measurements, and the checks only several ranks have.

What decides a distributed run is its worst rank: the slowest rank's step time per round, the
largest peak memory, the mean loss per step with any rank's non-finite step kept, the lowest
accuracy.  The ordinary gate judges that merged record; :func:`judge` then adds which rank went
non-finite first and whether every replica ended with identical parameters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from ..records import from_dict
from .job import LAUNCHER, Job, RankResult


def merge(ranks: Sequence[RankResult | Mapping], config, job: Job | Mapping):
    """One Measurements from every rank's: what decides a distributed run is its worst rank.

    The rank results and the job may also be given as the JSON dicts their files hold.
    """
    import math

    from ..measurement import compare_modes
    from ..modes import MODES
    from ..results import Measurements, ModeMeasurement, noise_dict

    ranks = [r if isinstance(r, RankResult) else from_dict(RankResult, r) for r in ranks]
    job = job if isinstance(job, Job) else from_dict(Job, job)
    per_rank = [Measurements.from_dict(r.measurements) for r in ranks]
    base = per_rank[0]

    def merged_mode(name: str) -> ModeMeasurement:
        ms = [m.reference if m.reference.mode == name else m.modes[name] for m in per_rank]
        out = ModeMeasurement(name, supported=all(m.supported for m in ms))
        out.unsupported_reason = next((m.unsupported_reason for m in ms if m.unsupported_reason), "")
        errors = {r: m.error for r, m in enumerate(ms) if m.error}
        # After the ranks' agreement every rank holds the same message, naming the rank that failed.
        out.error = (
            next(iter(errors.values())) if len(set(errors.values())) == 1 else "; ".join(f"rank {r}: {e}" for r, e in errors.items())
        )
        out.failed_phase = next((m.failed_phase for m in ms if m.failed_phase), out.failed_phase)
        rounds = min(len(m.step_times_s) for m in ms)
        # The ranks start each timed block together (their agreement after the previous phase is the
        # start line), so a round's slowest rank is the round's time, without start skew.
        out.step_times_s = [max(m.step_times_s[i] for m in ms) for i in range(rounds)]
        host_rounds = min(len(m.host_times_s) for m in ms)
        out.host_times_s = [max(m.host_times_s[i] for m in ms) for i in range(host_rounds)]
        busy = [m.busy_step_s for m in ms]
        out.busy_step_s = None if any(b is None for b in busy) else max(busy)  # the launch-bound probe of the slowest rank
        out.block_seconds = max(m.block_seconds for m in ms)
        peaks = [m.peak_memory_bytes for m in ms]
        out.peak_memory_bytes = None if any(p is None for p in peaks) else max(peaks)
        out.memory_note = ms[0].memory_note
        steps = min(len(m.losses) for m in ms)
        out.record_losses(
            [
                math.fsum(m.losses[i] for m in ms) / len(ms)
                if all(math.isfinite(m.losses[i]) for m in ms)
                else next(m.losses[i] for m in ms if not math.isfinite(m.losses[i]))
                for i in range(steps)
            ]
        )
        accuracies = [m.accuracy for m in ms if m.accuracy is not None]
        out.accuracy = min(accuracies) if accuracies else None
        out.scaler = ms[0].scaler
        out.precision_coverage = ms[0].precision_coverage if name in MODES else None
        return out

    reference = merged_mode(base.reference.mode)
    modes = {name: merged_mode(name) for name in base.modes}
    comparisons = {name: compare_modes(reference, m, config) for name, m in modes.items()}
    rank_records = []
    for r, (raw, m) in enumerate(zip(ranks, per_rank, strict=True)):
        rank_records.append(
            {
                "rank": r,
                "host": raw.host,
                "device": raw.device,
                "noise": noise_dict(m.noise),
                "modes": {
                    mm.mode: {
                        "step_time_s": mm.step_time_s,
                        "step_times_s": mm.step_times_s,
                        "host_times_s": mm.host_times_s,
                        "busy_step_s": mm.busy_step_s,
                        "peak_memory_bytes": mm.peak_memory_bytes,
                        "first_nonfinite_step": mm.first_nonfinite_step,
                        "nonfinite_steps": mm.nonfinite_steps,
                        "final_loss": None if mm.final_loss is None or not math.isfinite(mm.final_loss) else mm.final_loss,
                        "accuracy": mm.accuracy,
                        "error": mm.error,
                    }
                    for mm, _c in m.each_mode()
                },
            }
        )
    slowest = {}
    for name in [base.reference.mode, *base.modes]:
        medians = {r: _median(rec["modes"][name]["step_times_s"]) for r, rec in enumerate(rank_records) if name in rec["modes"]}
        medians = {r: t for r, t in medians.items() if t is not None}
        if medians:
            slowest[name] = {"rank": max(medians, key=medians.get), "step_time_s": max(medians.values())}
    noisy = [r for r, m in enumerate(per_rank) if m.noise.untrusted_reason()]
    return Measurements(
        workload=base.workload,
        device=job.device_type,
        config=config,
        batch_size=base.batch_size,
        environment=base.environment,
        dataset={**base.dataset, "sharded": f"training set split over {len(ranks)} ranks (strided: rank r takes samples r, r+N, ...)"},
        reference=reference,
        modes=modes,
        comparisons=comparisons,
        noise=per_rank[noisy[0]].noise if noisy else base.noise,  # any rank's noise makes the run's timing untrusted
        distributed={
            "slowest_rank": slowest,
            "noisy_ranks": noisy,
            "world_size": len(ranks),
            "backend": job.backend,
            "launcher": LAUNCHER,
            "batch_size_per_rank": base.batch_size,
            "ranks": rank_records,
            "replicas": ranks[0].replicas,
            "plants": job.plants,
        },
    )


def _median(values):
    import statistics

    return statistics.median(values) if values else None


# --- the checks only several ranks have -------------------------------------------------------------


def judge(measurements, verdict):
    """The gate's verdict with the distributed checks: the rank that went non-finite first, replica drift."""
    from ..verdict import FAIL, PASS, SKIPPED, Check, Verdict

    info = measurements.distributed
    ranks = info.get("ranks", [])
    checks = []
    for c in verdict.checks:
        if c.metric == "finite_loss" and c.outcome == FAIL:
            firsts = {r["rank"]: r["modes"].get(c.mode, {}).get("first_nonfinite_step") for r in ranks}
            firsts = {r: s for r, s in firsts.items() if s is not None}
            if firsts:
                step = min(firsts.values())
                first_ranks = [r for r, s in firsts.items() if s == step]
                later = [f"rank {r} from step {s}" for r, s in sorted(firsts.items()) if s != step]
                fine = [str(r["rank"]) for r in ranks if r["rank"] not in firsts]
                who = "ranks " + ", ".join(map(str, first_ranks)) if len(first_ranks) > 1 else f"rank {first_ranks[0]}"
                why = f"{c.mode} loss non-finite first on {who} at step {step}"
                if later:
                    why += f"; then {', '.join(later)} (the all-reduce spreads it)"
                if fine:
                    why += f"; finite throughout on rank {', '.join(fine)}"
                c = dataclasses.replace(c, why=why, measured=step)
        checks.append(c)
    for name, replica in info.get("replicas", {}).items():
        if not replica.get("checked"):
            checks.append(Check(name, "replicas", SKIPPED, f"{name} replicas not compared: {replica.get('reason', '')}"))
            continue
        first = replica.get("first_diverged")
        if first is None:
            checks.append(
                Check(
                    name,
                    "replicas",
                    PASS,
                    f"{name} all {info['world_size']} ranks hold identical parameters after training ({replica['parameters']} tensors)",
                    measured=0,
                    threshold=0,
                )
            )
        else:
            checks.append(
                Check(
                    name,
                    "replicas",
                    FAIL,
                    f"{name} ranks diverged after training: parameter {first['parameter']!r} differs between rank "
                    f"{first['ranks'][0]} and rank {first['ranks'][1]} (sum {first['sums'][0]:.6g} vs {first['sums'][1]:.6g}; "
                    f"{len(replica['diverged'])} of {replica['parameters']} tensors differ); DDP keeps replicas bit-identical, "
                    "so one rank's update went astray",
                    measured=len(replica["diverged"]),
                    threshold=0,
                )
            )
    return Verdict(checks, confirmed=verdict.confirmed, reference=verdict.reference)
