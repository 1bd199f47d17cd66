#!/usr/bin/env python3
"""Peak-memory ratios AMP / fp32 for models of different kinds, measured twice in reversed mode order.

What the default ``max_memory_ratio`` and the shipped example's settings must fit: models whose
memory is dominated by activations (the CIFAR CNN), by the input batch (the MNIST MLP at batch
4096), or by parameters and optimizer state (a wide MLP at a small batch, with AdamW or SGD, and
the example project's residual MLP).  Each row is measured with the modes in both orders (the AMP
mode as the reference the second time), in one process, so the order-independence shows too.

    python benchmarks/memory_ratios.py                 # CPU: torch.profiler allocation events
    python benchmarks/memory_ratios.py --device cuda   # CUDA: requested bytes
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "examples" / "user_project"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from pytest_ampgate import MeasureConfig, Workload, measure  # noqa: E402
from pytest_ampgate.outputs.table import format_table  # noqa: E402
from pytest_ampgate.workloads import cifar_cnn, mnist_mlp  # noqa: E402


def wide_mlp(optimizer, batch: int) -> Workload:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(max(4 * batch, 512), 256, generator=g)
    y = (x[:, 0] > 0).long()
    model = lambda: nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 2))  # noqa: E731
    return Workload(
        f"wide_mlp_{optimizer.__name__}", model, (x, y, x[:64], y[:64]), nn.CrossEntropyLoss(), lambda p: optimizer(p, lr=1e-3), batch
    )


def example(width: int, batch: int) -> Workload:
    from mymodel import ResidualMLP, make_data

    return Workload(
        "example_residual_mlp",
        lambda: ResidualMLP(width=width),
        make_data(n_train=2 * batch, n_test=256),
        nn.CrossEntropyLoss(),
        lambda p: torch.optim.AdamW(p, lr=1e-3),
        batch,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--mode", default=None, help="AMP mode (default: amp_fp16 on CUDA, amp_bf16 on the CPU)")
    args = parser.parse_args(argv)
    mode = args.mode or ("amp_fp16" if args.device == "cuda" else "amp_bf16")
    config = MeasureConfig(warmup_steps=2, rounds=1, steps_per_block=1, memory_steps=1, precision_coverage=False)
    reverse = MeasureConfig(**{**config.to_dict(), "reference_mode": mode})
    cases = [
        ("activations", cifar_cnn(256).with_options(data_options={"n_train": 1024, "n_test": 256})),
        ("input batch", mnist_mlp(4096).with_options(data_options={"n_train": 8192, "n_test": 512})),
        ("params + AdamW state", wide_mlp(torch.optim.AdamW, 16)),
        ("params (SGD)", wide_mlp(torch.optim.SGD, 16)),
        ("example project (GPU size)", example(1024, 512)),
    ]
    rows = []
    for kind, workload in cases:
        first = measure(workload, [mode], device=args.device, config=config)
        second = measure(workload, ["fp32"], device=args.device, config=reverse)
        ref, amp = first.reference, first.modes[mode]
        forward = first.comparisons[mode].memory_ratio
        backward = 1 / second.comparisons["fp32"].memory_ratio
        parts = ref.memory
        rows.append(
            [
                kind,
                workload.name,
                str(workload.batch_size),
                f"{ref.peak_memory_bytes / 2**20:.1f}",
                f"{amp.peak_memory_bytes / 2**20:.1f}",
                f"{parts['state_bytes'] / 2**20:.1f}",
                f"{ref.activation_memory_bytes / 2**20:.1f} / {amp.activation_memory_bytes / 2**20:.1f}",
                f"{forward:.3f}",
                f"{backward:.3f}",
                f"{abs(forward - backward) / forward:.2%}",
            ]
        )
    print(f"device {args.device}, {mode} vs fp32, {parts['method']}; torch {torch.__version__}")
    print(
        format_table(
            rows,
            [
                "kind",
                "workload",
                "batch",
                "fp32 MiB",
                f"{mode} MiB",
                "params+opt MiB",
                "activations MiB (fp32 / amp)",
                "ratio",
                "ratio reversed",
                "spread",
            ],
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
