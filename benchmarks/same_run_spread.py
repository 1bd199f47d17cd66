#!/usr/bin/env python3
"""Same-run spread: how far healthy modes land from fp32 in the same run, to size
``same_run_tolerance`` and ``same_run_loss_tolerance``.

Every mode starts from fp32's initial weights and trains on the same batches, so the only
difference is precision.  For each workload and seed this prints, per mode, the metric's shortfall
against fp32 (positive = worse, in the metric's direction) and the relative excess of its mean
loss over the last block; the summary gives the worst of each.  The defaults must clear the worst
healthy figures with room to spare, and stay well below what a mode at chance shows.

Workloads: the two built-ins at the CPU profile (``profiles.CPU_PROFILE`` and
``CPU_WORKLOAD_SIZES``: what ``pytest --ampgate --ampgate-device cpu`` runs) and the residual MLP
of ``examples/user_project`` at its CPU size (AdamW, LayerNorm).

    python benchmarks/same_run_spread.py --seeds 0 1 2 --json spread.json
    python benchmarks/same_run_spread.py --device cuda --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples" / "user_project"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from pytest_ampgate import MeasureConfig, Workload, measure  # noqa: E402
from pytest_ampgate.checks import tail_loss  # noqa: E402
from pytest_ampgate.profiles import default_measure_config  # noqa: E402


def user_project(device: str) -> Workload:
    from mymodel import ResidualMLP, make_data

    on_gpu = device.startswith("cuda")
    width, batch = (1024, 512) if on_gpu else (128, 64)
    return Workload(
        name="residual_mlp",
        model_factory=lambda: ResidualMLP(width=width),
        data=make_data(n_train=16 * batch, n_test=2048),
        loss_fn=nn.CrossEntropyLoss(),
        optimizer_factory=lambda params: torch.optim.AdamW(params, lr=1e-3),
        batch_size=batch,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--modes", nargs="+", default=["amp_fp16", "amp_bf16"])
    parser.add_argument("--workloads", nargs="+", default=["mnist_mlp", "cifar_cnn", "residual_mlp"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    base = default_measure_config(args.device.split(":")[0])
    rows, started = [], time.perf_counter()
    for name in args.workloads:
        for seed in args.seeds:
            config = MeasureConfig(**{**base.to_dict(), "seed": seed})
            workload = user_project(args.device) if name == "residual_mlp" else name
            t0 = time.perf_counter()
            m = measure(workload, args.modes, device=args.device, config=config, progress=False)
            ref = m.reference
            ref_tail = tail_loss(ref, config.steps_per_block)
            for mode, mm in m.modes.items():
                if not mm.ok:
                    print(f"{name} seed {seed} {mode}: {mm.unsupported_reason or mm.error}")
                    continue
                shortfall = (ref.metric - mm.metric) if mm.higher_is_better else (mm.metric - ref.metric)
                excess = tail_loss(mm, config.steps_per_block) / ref_tail - 1
                rows.append(
                    dict(
                        workload=name,
                        seed=seed,
                        mode=mode,
                        metric=mm.metric_name,
                        reference=ref.metric,
                        value=mm.metric,
                        shortfall=shortfall,
                        ref_tail_loss=ref_tail,
                        loss_excess=excess,
                    )
                )
                print(
                    f"{name:12s} seed {seed} {mode:9s} {mm.metric_name} {mm.metric:.3f} vs fp32 {ref.metric:.3f} "
                    f"(shortfall {shortfall:+.3f}); tail loss {excess:+.2%} vs fp32 {ref_tail:.4g}  [{time.perf_counter() - t0:.0f} s]",
                    flush=True,
                )
    print()
    for name in args.workloads:
        mine = [r for r in rows if r["workload"] == name]
        if mine:
            print(
                f"{name}: worst shortfall {max(r['shortfall'] for r in mine):+.3f}, worst tail-loss excess "
                f"{max(r['loss_excess'] for r in mine):+.2%}, fp32 metric {min(r['reference'] for r in mine):.3f}-"
                f"{max(r['reference'] for r in mine):.3f} over {len(mine)} (seed, mode) pairs"
            )
    print(f"wall time: {time.perf_counter() - started:.0f} s on {args.device}; torch {torch.__version__}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "device": args.device}, indent=2, allow_nan=False))
    return 0 if rows and all(math.isfinite(r["shortfall"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
