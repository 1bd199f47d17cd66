"""The distributed step of ``gpu_acceptance.py``: DDP with a compression hook and FSDP2 on NCCL, and a planted fault.

    python benchmarks/distributed_acceptance.py --out DIR [--device cpu]   # this step alone

On a GPU it gates a small project under ``world_size`` 1 on NCCL, and 2 where two GPUs are
visible: DDP with ``bf16_compress_hook`` beside ``amp_bf16``, and FSDP2 (``fsdp2_bf16``,
``fsdp2_fp16``, loss-scaled or refused with the reason).  Then the same project with a planted fault
(the last rank raises at its 4th step of ``bf16_compress_hook``): that test must fail within
:data:`FAULT_LIMIT_S`, naming the rank, the mode and the exception, and the next test must still run.
On the CPU (``--device cpu``, the smoke run) the same runs on 2 gloo ranks.  Each run is one
subprocess with its own time limit (``run`` from gpu_acceptance).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

FAULT_LIMIT_S = 30.0
PROJECT = """
import pytest

PROTOCOL = dict(rounds={rounds}, steps_per_block={steps}, warmup_steps=2, missing_baseline="ignore")


@pytest.mark.amp_regression(world_size={world}, modes=["amp_bf16", "bf16_compress_hook"], **PROTOCOL)
def test_ddp_compress_hook(ampgate):
    ampgate.run("mnist_mlp")


@pytest.mark.amp_regression(world_size={world}, modes=["fsdp2_bf16", "fsdp2_fp16"], **PROTOCOL)
def test_fsdp2(ampgate):
    ampgate.run("mnist_mlp")


def test_next():
    pass
"""


def world_sizes(device: str) -> list[int]:
    """1 on one GPU, and 2 where two are visible; 2 gloo ranks on the CPU."""
    if device == "cpu":
        return [2]
    import torch

    return [1, 2] if torch.cuda.device_count() >= 2 else [1]


def _outcomes(report: Path) -> dict:
    try:
        tests = json.loads(report.read_text())["tests"]
    except (OSError, ValueError, KeyError):
        return {}
    return {t["test_id"].rsplit("::", 1)[-1]: t for t in tests}


def run_step(args, out: Path, run, pytest_cmd) -> dict:
    """Every world size's healthy and faulty runs: ``{"steps": [...], "checks": [(name, value, required, ok)], "figures": {...}}``."""
    steps, checks, figures = [], [], {}
    from pytest_ampgate.distributed import mode_unsupported_reason

    reason = mode_unsupported_reason("fsdp2_bf16", args.device)
    if reason is not None:  # e.g. torch 2.4 on a CPU: FSDP2 cannot run here, so this step cannot judge
        return {"steps": [], "checks": [("distributed step not run", reason, False, True)], "figures": {}}
    small = args.smoke or args.device == "cpu"
    for world in world_sizes(args.device):
        project = out / f"distributed_world{world}"
        project.mkdir(parents=True, exist_ok=True)
        (project / "test_distributed_acceptance.py").write_text(
            PROJECT.format(world=world, rounds=2 if small else 6, steps=4 if small else 20)
        )
        (project / "pytest.ini").write_text("[pytest]\n")
        base = ["--ampgate", "--ampgate-device", args.device, "-rA", "test_distributed_acceptance.py"]
        healthy = run(f"distributed world{world}", pytest_cmd(*base, "--ampgate-json", "healthy.json"), args.step_timeout, cwd=project)
        last = world - 1
        plant = [{"kind": "raise", "rank": last, "mode": "bf16_compress_hook", "step": 3}]
        faulty = run(
            f"distributed world{world} planted fault",
            pytest_cmd(*base, "--ampgate-json", "fault.json"),
            args.step_timeout,
            cwd=project,
            env={"PYTEST_AMPGATE_DISTRIBUTED_PLANT": json.dumps(plant)},
        )
        steps += [healthy, faulty]
        ran = _outcomes(project / "healthy.json")
        modes = {name: {m["mode"]: m["outcome"] for m in t.get("modes", [])} for name, t in ran.items()}
        figures[f"world{world}"] = {"healthy": modes, "healthy_wall_s": healthy["wall_s"], "fault_wall_s": faulty["wall_s"]}
        checks.append(
            (
                f"distributed world_size={world}: DDP compress hook and FSDP2 pass",
                f"exit {healthy['rc']}: {modes}",
                True,
                healthy["rc"] == 0 and set(modes) == {"test_ddp_compress_hook", "test_fsdp2"},
            )
        )
        fault_ran = _outcomes(project / "fault.json")
        faulted = fault_ran.get("test_ddp_compress_hook", {})
        named = f"rank {last} raised RuntimeError: planted fault" in json.dumps(faulted) and faulted.get("outcome") == "fail"
        next_ran = (
            fault_ran.get("test_fsdp2", {}).get("outcome") == "pass"
            and "PASSED test_distributed_acceptance.py::test_next" in faulty["tail"]
        )
        checks.append(
            (
                f"distributed world_size={world}: planted fault fails fast (<= {FAULT_LIMIT_S:g} s), named, next tests run",
                f"{faulty['wall_s']:.1f} s for the whole run, exit {faulty['rc']}",
                True,
                faulty["rc"] == 1 and named and next_ran and faulty["wall_s"] <= FAULT_LIMIT_S + 20,
            )
        )
    return {"steps": steps, "checks": checks, "figures": figures}


def extend(args, out: Path, run, pytest_cmd, steps: list, checks: list) -> tuple[list, list]:
    """gpu_acceptance's hook: its steps and checks with this step's added."""
    result = run_step(args, out, run, pytest_cmd)
    (out / "distributed_acceptance.json").write_text(json.dumps(result, indent=1, default=str))
    return steps + result["steps"], checks + result["checks"]


def main(argv=None) -> int:
    import argparse
    import importlib.util

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--step-timeout", type=float, default=180.0)
    args = parser.parse_args(argv)
    args.smoke = args.device == "cpu"
    spec = importlib.util.spec_from_file_location("gpu_acceptance", Path(__file__).with_name("gpu_acceptance.py"))
    acceptance = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(acceptance)
    out = Path(args.out).resolve()
    result = run_step(args, out, acceptance.run, acceptance.pytest_cmd)
    (out / "distributed_acceptance.json").write_text(json.dumps(result, indent=1, default=str))
    for name, value, _required, ok in result["checks"]:
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {value}")
    return 0 if all(ok for *_rest, ok in result["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
