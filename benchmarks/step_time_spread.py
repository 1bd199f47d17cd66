#!/usr/bin/env python3
"""How far one mode's step time moves between processes: what the per-mode baseline gate must allow.

A stored baseline's step time was measured in another process (``--ampgate-update``), so the
absolute step-time gate meets the spread between processes, not the spread inside one run that the
speedup's interval describes.  This measures both, for each mode: ``PROCESSES`` fresh processes,
each running the gate's protocol once, and reports the median step time across processes, the
worst deviation of one process's median from it, and the worst half-width of one process's own
interval.  ``step_time_tolerance``'s default is chosen from the worst deviation (BENCHMARKS.md).

It also reports each compared mode's speedup the same way (median across processes, worst process
vs it, widest own interval), and on the CPU can time by the wall clock instead of the gate's CPU
clock (``--clock wall``) to show what the clock choice buys (``timing.cpu_clock``).

    python benchmarks/step_time_spread.py                      # CPU: the gate-quality CPU profile
    python benchmarks/step_time_spread.py --clock wall         # the same, timed by perf_counter
    python benchmarks/step_time_spread.py --device cuda --processes 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CPU_WORKLOAD = {"batch_size": 64, "data_options": {"n_train": 2048, "n_test": 512}}
CPU_PROTOCOL = {"warmup_steps": 5, "rounds": 10, "steps_per_block": 20, "memory_steps": 0, "precision_coverage": False}

ONE_PROCESS = r"""
import json, sys, time
import torch
from pytest_ampgate.measurement import MeasureConfig, measure
from pytest_ampgate.stats import estimate_ratio
from pytest_ampgate.timing import CpuTimer
from pytest_ampgate.workloads import get_workload

args = json.loads(sys.argv[1])
workload = get_workload(args["workload"])
if args["options"]:
    workload = workload.with_options(**args["options"])
timer = CpuTimer(time.perf_counter) if args["clock"] == "wall" else None
m = measure(workload, args["modes"], device=args["device"], config=MeasureConfig(**args["protocol"]), progress=False, timer=timer)
out = {}
for mm in [m.reference, *m.modes.values()]:
    est = estimate_ratio(mm.step_times_s, 0.95, 1.0)
    out[mm.mode] = {"median": est.median, "low": est.low, "high": est.high}
    c = m.comparisons.get(mm.mode)
    if c is not None and c.speedup is not None:
        out[mm.mode]["speedup"] = {"median": c.speedup.median, "width": c.speedup.relative_width}
print("SPREAD " + json.dumps(out))
"""


def one_process(device: str, workload: str, modes: list[str], options: dict, protocol: dict, clock: str = "cpu") -> dict:
    spec = json.dumps({"device": device, "workload": workload, "modes": modes, "options": options, "protocol": protocol, "clock": clock})
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", ONE_PROCESS, spec], capture_output=True, text=True, env={**env, **_passthrough()})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("SPREAD ")]
    if proc.returncode or not lines:
        raise SystemExit(f"a measuring process failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("SPREAD ") :])


def _passthrough() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k in ("HOME", "TMPDIR", "CUDA_VISIBLE_DEVICES", "LD_LIBRARY_PATH")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--workload", default="mnist_mlp")
    parser.add_argument("--modes", nargs="+", default=["amp_bf16"])
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="CPU only: the gate's CPU clock, or perf_counter")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.clock == "wall" and args.device != "cpu":
        parser.error("--clock wall is for the CPU (CUDA is timed by CUDA events)")
    options = CPU_WORKLOAD if args.device == "cpu" else {}
    protocol = CPU_PROTOCOL if args.device == "cpu" else {"memory_steps": 0, "precision_coverage": False}
    runs = [one_process(args.device, args.workload, args.modes, options, protocol, args.clock) for _ in range(args.processes)]
    clock = {"cpu": "the thread's CPU time", "wall": "perf_counter"}[args.clock] if args.device == "cpu" else "CUDA events"
    print(f"{args.workload} on {args.device} ({clock}), {args.processes} fresh processes, protocol {protocol}")
    print(f"{'mode':<10} {'median step':>12} {'worst process vs median':>24} {'worst own half-width':>21}")
    result = {}
    for mode in runs[0]:
        medians = [r[mode]["median"] for r in runs]
        center = statistics.median(medians)
        worst = max(abs(x / center - 1) for x in medians)
        half = max(max(r[mode]["high"] - r[mode]["median"], r[mode]["median"] - r[mode]["low"]) / r[mode]["median"] for r in runs)
        result[mode] = {"median_s": center, "worst_deviation": worst, "worst_half_width": half, "medians_s": medians}
        print(f"{mode:<10} {center * 1e3:>10.3f}ms {worst:>23.1%} {half:>20.1%}")
    for mode in [m for m in runs[0] if "speedup" in runs[0][m]]:
        speedups = [r[mode]["speedup"]["median"] for r in runs]
        center = statistics.median(speedups)
        worst = max(abs(x / center - 1) for x in speedups)
        widest = max(r[mode]["speedup"]["width"] for r in runs)
        result[mode].update(speedup_median=center, speedup_worst_deviation=worst, speedup_widest_interval=widest)
        print(f"{mode:<10} speedup {center:.3f}x, worst process vs median {worst:.1%}, widest own interval {widest:.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
