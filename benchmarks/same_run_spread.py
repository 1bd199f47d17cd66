#!/usr/bin/env python3
"""Same-run spread: how far healthy modes land from fp32 in the same run, to size
``same_run_tolerance`` and ``same_run_loss_tolerance``.

Every mode starts from fp32's initial weights and trains on the same batches, so the only
difference is precision.  For each workload and seed this prints, per mode, the metric's shortfall
against fp32 (positive = worse, in the metric's direction) and the relative excess of its mean
loss over the last block; the summary gives the worst of each.  The defaults must clear the worst
healthy figures with room to spare, and stay well below what a mode at chance shows.

Workloads: the two built-ins at the CPU profile (``profiles.CPU_PROFILE`` and
``CPU_WORKLOAD_SIZES``: what ``pytest --ampgate --ampgate-device cpu`` runs), the residual MLP
of ``examples/user_project`` at its CPU size (AdamW, LayerNorm), and one tiny workload per kind of
built-in metric (``benchmarks/metric_workloads.py``: a small LM with (N, T, V) logits under
``perplexity()`` and ``token_accuracy()``, a regression head in physical units under ``mse()``, a
blob classifier under accuracy).  The relative shortfall (shortfall / |fp32's value|) is what the
relative tolerance of an unbounded metric is sized from; ``--collapse`` adds, per workload, one run
with a planted quality collapse, to show how far above the tolerance a real regression lands.

    python benchmarks/same_run_spread.py --seeds 0 1 2 --json spread.json
    python benchmarks/same_run_spread.py --workloads tiny_lm_perplexity tiny_lm_token_accuracy \
        regression_head tiny_classifier --seeds 0 1 2 3 4 --collapse
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

sys.path.insert(0, str(ROOT / "benchmarks"))
from metric_workloads import WORKLOADS as METRIC_WORKLOADS  # noqa: E402
from metric_workloads import collapsed  # noqa: E402


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
    parser.add_argument("--collapse", action="store_true", help="also run each workload once with a planted collapse")
    args = parser.parse_args(argv)
    base = default_measure_config(args.device.split(":")[0])
    rows, started = [], time.perf_counter()
    runs = [(name, seed, False) for name in args.workloads for seed in args.seeds]
    runs += [(name, args.seeds[0], True) for name in args.workloads if args.collapse]
    for name, seed, collapse in runs:
        if True:
            config = MeasureConfig(**{**base.to_dict(), "seed": seed})
            if name in METRIC_WORKLOADS:
                workload = METRIC_WORKLOADS[name](seed)
            else:
                workload = user_project(args.device) if name == "residual_mlp" else name
            if collapse:
                from pytest_ampgate.workloads import get_workload

                workload = collapsed(get_workload(workload))
            t0 = time.perf_counter()
            m = measure(workload, args.modes, device=args.device, config=config, progress=False)
            ref = m.reference
            ref_tail = tail_loss(ref, config.steps_per_block)
            for mode, mm in m.modes.items():
                if not mm.ok:
                    print(f"{name} seed {seed} {mode}: {mm.unsupported_reason or mm.error}")
                    continue
                shortfall = (ref.metric - mm.metric) if mm.higher_is_better else (mm.metric - ref.metric)
                relative = shortfall / abs(ref.metric) if ref.metric else float("nan")
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
                        relative_shortfall=relative,
                        collapsed=collapse,
                        ref_tail_loss=ref_tail,
                        loss_excess=excess,
                    )
                )
                print(
                    f"{name + (' COLLAPSED' if collapse else ''):12s} seed {seed} {mode:9s} {mm.metric_name} {mm.metric:.4g} vs fp32 "
                    f"{ref.metric:.4g} (shortfall {shortfall:+.4g}, {relative:+.2%} of fp32); tail loss {excess:+.2%} vs fp32 {ref_tail:.4g}  [{time.perf_counter() - t0:.0f} s]",
                    flush=True,
                )
    print()
    for name in args.workloads:
        mine = [r for r in rows if r["workload"] == name and not r["collapsed"]]
        if mine:
            print(
                f"{name}: worst shortfall {max(r['shortfall'] for r in mine):+.4g} "
                f"({max(r['relative_shortfall'] for r in mine):+.2%} of fp32), worst tail-loss excess "
                f"{max(r['loss_excess'] for r in mine):+.2%}, fp32 metric {min(r['reference'] for r in mine):.4g}-"
                f"{max(r['reference'] for r in mine):.4g} over {len(mine)} (seed, mode) pairs"
            )
        bad = [r for r in rows if r["workload"] == name and r["collapsed"]]
        if bad:
            print(
                f"{name} with a planted collapse: smallest shortfall {min(r['shortfall'] for r in bad):+.4g} "
                f"({min(r['relative_shortfall'] for r in bad):+.2%} of fp32)"
            )
    print(f"wall time: {time.perf_counter() - started:.0f} s on {args.device}; torch {torch.__version__}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "device": args.device}, indent=2, allow_nan=False))
    return 0 if rows and all(math.isfinite(r["shortfall"]) for r in rows if not r["collapsed"]) else 1


if __name__ == "__main__":
    sys.exit(main())
