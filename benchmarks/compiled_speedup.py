#!/usr/bin/env python3
"""Eager vs compiled AMP speedup for the built-in workloads: the same protocol, ``compile`` off and on.

Each row is one :func:`pytest_ampgate.measure` run of fp32 and amp_bf16 (amp_fp16 on CUDA too),
eager or under ``torch.compile`` (fp32 compiled the same way), so the compiled AMP speedup is
against compiled fp32.  Compile time, graph breaks and recompiles come from dynamo's own counters.

    python benchmarks/compiled_speedup.py                         # CPU, Inductor's C++ backend
    python benchmarks/compiled_speedup.py --device cuda           # GPU (still to be measured)
    python benchmarks/compiled_speedup.py --compile inductor:reduce-overhead --device cuda
    python benchmarks/compiled_speedup.py --together --workloads mnist_mlp   # one run, eager and compiled interleaved

``--together`` measures each workload once with ``also_eager``: eager and compiled rows share the ABBA
rounds, so "fp32+compiled" against fp32 is what compiling gains, measured under the same load.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import torch  # noqa: E402

from pytest_ampgate import MeasureConfig, measure  # noqa: E402
from pytest_ampgate.compiled import parse_compile  # noqa: E402


def row(workload: str, modes: list[str], device: str, compile_value, rounds: int, together: bool = False) -> list[str]:
    spec = parse_compile("--compile", compile_value)
    config = MeasureConfig(warmup_steps=3, rounds=rounds, steps_per_block=5, memory_steps=0, compile=spec, also_eager=together)
    m = measure(workload, modes, device=device, config=config, progress=False)
    label = "eager" if spec is None else f"compiled ({spec.backend}{':' + spec.mode if spec.mode else ''})"
    label += " and eager, interleaved" if together else ""
    cells = []
    for mm, comparison in m.each_mode():
        if not mm.ok:
            cells.append(f"{mm.mode}: {mm.unsupported_reason or mm.error}")
            continue
        step = sorted(mm.step_times_s)[len(mm.step_times_s) // 2] * 1e3
        text = f"{mm.mode} {step:.2f} ms"
        if comparison is not None and comparison.speedup is not None:
            s = comparison.speedup
            text += f", {s.median:.2f}x [{s.low:.2f}-{s.high:.2f}]" + (f" vs {comparison.reference}" if together else "")
        if mm.compiled:
            c = mm.compiled
            text += f", compile {c['compile_time_s']:.1f} s, {c['graph_breaks']} breaks, {c['recompiles']} recompiles"
        cells.append(text)
    return [workload, label, *cells]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", default="inductor", help="the compiled rows' setting: BACKEND or BACKEND:MODE")
    parser.add_argument("--workloads", nargs="+", default=["mnist_mlp", "cifar_cnn"])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--together", action="store_true", help="one run per workload, eager and compiled rows interleaved (also_eager)")
    args = parser.parse_args()
    modes = ["amp_bf16"] + (["amp_fp16"] if args.device.startswith("cuda") else [])
    print(
        f"# {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, Python {platform.python_version()}, {args.device}"
    )
    if args.together:
        rows = [f"{m}+compiled" for m in ("fp32", *modes)]
        print("| workload | run | reference | " + " | ".join([*modes, *rows]) + " |")
        print("|---" * (3 + 2 * len(modes) + 1) + "|")
        for workload in args.workloads:
            print("| " + " | ".join(row(workload, modes, args.device, args.compile, args.rounds, together=True)) + " |", flush=True)
        return
    print("| workload | run | reference | " + " | ".join(modes) + " |")
    print("|---" * (3 + len(modes)) + "|")
    for workload in args.workloads:
        for compile_value in (False, args.compile):
            print("| " + " | ".join(row(workload, modes, args.device, compile_value, args.rounds)) + " |", flush=True)


if __name__ == "__main__":
    main()
