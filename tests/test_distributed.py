"""The distributed gate: DDP and FSDP2 under torchrun, on the CPU with gloo and two ranks.

Each launch costs a few seconds of torch imports per rank, so the end-to-end tests share one launch
for several modes, and each planted fault is one launch: a passing DDP/FSDP2 run, a run with two
planted faults (rank 1 alone goes NaN; rank 1's parameters perturbed after training), and runs
where rank 1 hangs, raises or dies.  The rest are cheap unit tests of settings, merging and checks.
"""

import json
import os
import sys
import time
import uuid
from pathlib import Path

import pytest

from pytest_ampgate import distributed as D
from pytest_ampgate.config import GateConfig, MeasureConfig, build_config
from pytest_ampgate.distributed import launch
from pytest_ampgate.errors import ConfigError

CPU = ("--ampgate", "--ampgate-device", "cpu", "-p", "no:cacheprovider")
GLOO_MISSING = D.unavailable_reason(2, "cpu")
needs_gloo = pytest.mark.skipif(GLOO_MISSING is not None, reason=f"no gloo here: {GLOO_MISSING}")
HAS_FSDP2 = not isinstance(D.fsdp2_api(), str)
FSDP2_ON_CPU = HAS_FSDP2 and D.mode_unsupported_reason("fsdp2_bf16", "cpu") is None  # not torch 2.4's

# The ranks import this file's module by name ("test_dist:workload"): objects cannot cross processes.
WORKLOAD = """
import pytest
import torch
from torch import nn

from pytest_ampgate import Workload


def blobs(n, seed):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, 16, generator=torch.Generator().manual_seed(123)) * 3
    y = torch.randint(0, 4, (n,), generator=g)
    return centers[y] + torch.randn(n, 16, generator=g), y


def workload():
    return Workload(
        name="blobs",
        model_factory=lambda: nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)),
        data=(*blobs(512, 0), *blobs(256, 1)),
        loss_fn=nn.CrossEntropyLoss(),
        optimizer_factory=lambda params: torch.optim.SGD(params, lr=0.1),
        batch_size=32,
    )
"""
PROTOCOL = "rounds=2, steps_per_block=4, warmup_steps=1"


def _tagged_processes(tag: str) -> list[int]:
    """Live processes whose environment carries ``tag`` (what a run started and might have left behind)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if tag.encode() in (entry / "environ").read_bytes() and launch._alive(int(entry.name)):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


# --- settings ----------------------------------------------------------------------------------------


def test_world_size_and_timeout_are_validated_settings():
    config = build_config(
        ("marker", {"world_size": "2", "distributed_timeout": 30, "modes": ["amp_bf16", "BF16_compress_hook", "fsdp2_bf16"]})
    )
    assert (config.world_size, config.distributed_timeout) == (2, 30.0)
    assert config.modes == ("amp_bf16", "bf16_compress_hook", "fsdp2_bf16")
    assert GateConfig().world_size is None
    for bad in (0, -1, 1.5, "two", True):
        with pytest.raises(ConfigError, match="marker: world_size must be a whole number >= 1"):
            build_config(("marker", {"world_size": bad}))
    with pytest.raises(ConfigError, match="distributed_timeout must be > 0"):
        build_config(("marker", {"distributed_timeout": 0}))
    with pytest.raises(ConfigError, match="with world_size also: fp16_compress_hook, bf16_compress_hook, fsdp2, fsdp2_bf16"):
        build_config(("marker", {"modes": ["bf16_compres_hook"]}))


def test_distributed_only_mode_without_world_size_is_a_usage_error():
    from pytest_ampgate.session import GateOptions, GateSession

    session = GateSession(GateOptions(enabled=True, device="cpu"))
    with pytest.raises(
        ConfigError, match=r"marker amp_regression on t.py::x: mode bf16_compress_hook runs only under torch.distributed; set world_size=N"
    ):
        session.config_for("t.py::x", (), {"modes": ["amp_bf16", "bf16_compress_hook"]})
    assert session.config_for("t.py::x", (), {"modes": ["bf16_compress_hook"], "world_size": 2}).world_size == 2


def test_workload_object_cannot_go_to_the_ranks():
    from pytest_ampgate import mnist_mlp

    with pytest.raises(ConfigError, match="pass a built-in name or 'module:function'"):
        D.workload_reference(mnist_mlp())
    with pytest.raises(ConfigError, match="cannot be imported: ModuleNotFoundError"):
        D.workload_reference("no_such_module_here:factory")
    with pytest.raises(ConfigError, match="name a built-in workload"):
        D.workload_reference("not a reference")
    assert D.workload_reference("mnist_mlp")[1].name == "mnist_mlp"


def test_too_few_gpus_skips_and_fails_under_strict(pytester, monkeypatch):
    import torch

    # The hardware boundary: one CUDA device.  The gate itself decides that two ranks need two.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    pytester.makepyfile(
        "import pytest\n\n"
        "@pytest.mark.amp_regression(world_size=2)\ndef test_x(ampgate_mnist):\n    pass\n\n"
        "@pytest.mark.amp_regression(world_size=2, strict=True)\ndef test_strict(ampgate_mnist):\n    pass\n"
    )
    result = pytester.runpytest("--ampgate", "-p", "no:cacheprovider", "-rA")
    result.assert_outcomes(skipped=1, errors=1)  # strict fails it at set-up, where the fixture decides
    reason = r"world_size=2 (needs 2 CUDA devices \(one per rank\); this machine has 1|on CUDA needs the NCCL)"
    result.stdout.re_match_lines([rf"--ampgate-strict: {reason}", rf"SKIPPED \[1\] .*\.py:3: {reason}"])


def test_fsdp2_is_feature_detected(monkeypatch):
    assert HAS_FSDP2 or "torch 2.4+" in D.fsdp2_api()
    monkeypatch.setitem(sys.modules, "torch.distributed.fsdp", None)  # as on a torch without FSDP2
    monkeypatch.setitem(sys.modules, "torch.distributed._composable.fsdp", None)
    reason = D.fsdp2_api()
    assert isinstance(reason, str) and "FSDP2" in reason and "needs torch 2.4+" in reason
    assert D.mode_unsupported_reason("fsdp2_bf16", "cpu") == reason
    assert D.mode_unsupported_reason("bf16_compress_hook", "cpu") is None


@pytest.mark.skipif(not HAS_FSDP2, reason="no FSDP2 in this torch")
def test_fsdp2_off_cuda_is_feature_detected(monkeypatch):
    """torch 2.4's FSDP2 makes CUDA streams on any device: its comm context has init(), not lazy_init(device)."""
    from pytest_ampgate.distributed.modes import fsdp2_comm_context

    context = fsdp2_comm_context()
    assert context is not None
    monkeypatch.delattr(context, "lazy_init", raising=False)
    monkeypatch.setattr(context, "init", lambda self: None, raising=False)  # torch 2.4's
    reason = D.mode_unsupported_reason("fsdp2_bf16", "cpu")
    assert reason and "runs on CUDA only" in reason
    assert D.mode_unsupported_reason("fsdp2_bf16", "cuda") != reason  # on CUDA it runs (where there is one)
    monkeypatch.setattr(context, "lazy_init", lambda self, device: None, raising=False)  # later torch's
    assert D.mode_unsupported_reason("fsdp2_bf16", "cpu") is None


# --- merging ranks and the distributed checks --------------------------------------------------------


def _rank(rank: int, times, loss, accuracy, peak=None, nan_at=None, replicas=None) -> dict:
    from pytest_ampgate.results import Measurements, ModeMeasurement

    def mode(name):
        mm = ModeMeasurement(name, step_times_s=list(times), peak_memory_bytes=peak, accuracy=accuracy)
        mm.record_losses([float("nan") if nan_at is not None and i >= nan_at else loss for i in range(6)])
        return mm

    m = Measurements(
        workload="w",
        device="cpu",
        config=MeasureConfig(),
        batch_size=8,
        environment={"device_type": "cpu"},
        dataset={},
        reference=mode("fp32"),
        modes={"amp_bf16": mode("amp_bf16")},
        comparisons={},
    )
    return {"rank": rank, "host": "h", "device": "cpu", "measurements": m.to_dict(), "replicas": replicas or {}}


def test_merge_takes_the_worst_rank_and_judge_names_rank_and_parameter():
    from pytest_ampgate.gate import evaluate
    from pytest_ampgate.verdict import FAIL, PASS, Verdict

    replicas = {
        "fp32": {"checked": True, "parameters": 4, "diverged": [], "first_diverged": None},
        "amp_bf16": {
            "checked": True,
            "parameters": 4,
            "diverged": ["2.weight"],
            "first_diverged": {"parameter": "2.weight", "ranks": [0, 1], "sums": [1.5, 1.75]},
        },
    }
    ranks = [_rank(0, [0.010, 0.030], 1.0, 0.9, peak=100, replicas=replicas), _rank(1, [0.020, 0.015], 3.0, 0.8, peak=300, nan_at=4)]
    config = MeasureConfig(rounds=2)
    m = D.merge(ranks, config, {"device_type": "cpu", "backend": "gloo"})
    bf16 = m.modes["amp_bf16"]
    assert bf16.step_times_s == [0.020, 0.030]  # per round, the slowest rank
    assert bf16.peak_memory_bytes == 300 and bf16.accuracy == 0.8
    assert bf16.losses[:4] == [2.0] * 4 and bf16.first_nonfinite_step == 4  # mean loss; rank 1's NaN kept
    assert m.comparisons["amp_bf16"].memory_ratio == 1.0
    assert m.distributed["world_size"] == 2 and m.distributed["ranks"][1]["modes"]["amp_bf16"]["first_nonfinite_step"] == 4
    verdict = D.judge(m, evaluate(m, GateConfig(modes=("amp_bf16",), missing_baseline="ignore")))
    assert isinstance(verdict, Verdict) and verdict.outcome == FAIL
    why = {(c.mode, c.metric): (c.outcome, c.why) for c in verdict.checks}
    assert why[("amp_bf16", "finite_loss")] == (FAIL, "amp_bf16 loss non-finite first on rank 1 at step 4; finite throughout on rank 0")
    assert why[("fp32", "replicas")][0] == PASS
    outcome, text = why[("amp_bf16", "replicas")]
    assert outcome == FAIL and "parameter '2.weight' differs between rank 0 and rank 1 (sum 1.5 vs 1.75; 1 of 4 tensors differ)" in text
    assert D.env_key("cpu|X|torch2.14", 2, "cpu") == "cpu|X|torch2.14|gloo|world2"


def test_hang_message_names_the_rank_outside_a_collective(tmp_path):
    (tmp_path / "rank0.progress").write_text("w: timed round 1/2: fp32")
    (tmp_path / "rank1.progress").write_text("w: timed round 1/2: fp32")
    torch_file = os.path.join(os.sep, "x", "torch", "autograd", "graph.py")
    stacks = {
        0: f'Current thread 0x1 (most recent call first):\n  File "{torch_file}", line 8 in _engine_run_backward\n  File "/p/measurement.py", line 3 in time_block\n',
        1: 'Current thread 0x2 (most recent call first):\n  File "/home/me/model.py", line 42 in forward\n',
    }
    text = launch._hang_message(20, 2, tmp_path, stacks, [])
    assert "rank 1 stopped responding while the others waited for it" in text
    assert "rank 1: not in a collective at model.py:42 in forward" in text
    assert "rank 0: waiting inside torch (a collective, or backward's all-reduce) at measurement.py:3 in time_block" in text
    assert text.endswith("all 2 ranks and the launcher were killed")


# --- end to end on two gloo ranks -------------------------------------------------------------------


@needs_gloo
def test_ddp_and_fsdp2_pass_and_are_reported_like_single_device_runs(pytester):
    modes = ["amp_bf16", "bf16_compress_hook"] + (["fsdp2_bf16"] if FSDP2_ON_CPU else [])
    pytester.makepyfile(
        test_dist=WORKLOAD
        + f"""

@pytest.mark.amp_regression(world_size=2, modes={modes!r}, {PROTOCOL}, missing_baseline="ignore")
def test_ddp(ampgate):
    result = ampgate.run("test_dist:workload")
    assert result.mode("amp_bf16").accuracy > 0.5
"""
    )
    result = pytester.runpytest(*CPU, "--ampgate-json", "report.json", "--junitxml", "junit.xml", "-rA")
    result.assert_outcomes(passed=1)
    rows = [rf"test_dist.py::test_ddp\s+{mode}\s+.*\s+pass$" for mode in ["fp32", *modes]]
    result.stdout.re_match_lines([r".*ampgate summary.*", *rows, r"environment: cpu\|.*\|gloo\|world2"])
    test = json.loads((pytester.path / "report.json").read_text())["tests"][0]
    assert test["outcome"] == "pass" and test["env_key"].endswith("|gloo|world2")
    assert [m["mode"] for m in test["modes"]] == ["fp32", *modes]
    assert all(m["outcome"] == "pass" and m["steps"] > 0 and m["first_nonfinite_step"] is None for m in test["modes"])
    dist = test["distributed"]
    assert (dist["world_size"], dist["backend"], dist["launcher"]) == (2, "gloo", "torch.distributed.run")
    assert [r["rank"] for r in dist["ranks"]] == [0, 1]
    assert "bfloat16" in dist["modes"]["bf16_compress_hook"] and dist["replicas"]["bf16_compress_hook"]["diverged"] == []
    replica_checks = {c["mode"]: c["outcome"] for c in test["checks"] if c["metric"] == "replicas"}
    assert replica_checks == {
        "fp32": "pass",
        "amp_bf16": "pass",
        "bf16_compress_hook": "pass",
        **({"fsdp2_bf16": "skipped"} if FSDP2_ON_CPU else {}),
    }
    junit = (pytester.path / "junit.xml").read_text()
    # xunit2 (the default): suite properties named "<test id>::ampgate_<figure>"
    assert '::ampgate_world_size" value="2"' in junit and '::ampgate_backend" value="gloo"' in junit


@needs_gloo
def test_planted_rank_faults_fail_naming_rank_step_and_parameter(pytester, monkeypatch):
    monkeypatch.setenv(
        D.PLANT_ENV,
        json.dumps(
            [
                {"kind": "nan", "rank": 1, "mode": "amp_bf16", "step": 4},
                {"kind": "perturb", "rank": 1, "mode": "bf16_compress_hook", "parameter": "2.weight"},
            ]
        ),
    )
    pytester.makepyfile(
        test_dist=WORKLOAD
        + f"""

@pytest.mark.amp_regression(world_size=2, modes=["amp_bf16", "bf16_compress_hook"], {PROTOCOL}, missing_baseline="ignore")
def test_ddp(ampgate):
    ampgate.run("test_dist:workload")
"""
    )
    result = pytester.runpytest(*CPU, "--ampgate-json", "report.json")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*AMP REGRESSION*",
            "*amp_bf16 loss non-finite first on rank 1 at step 4; then rank 0 from step 5 (the all-reduce spreads it) FAILED*",
            "*bf16_compress_hook ranks diverged after training: parameter '2.weight' differs between rank 0 and rank 1 (sum *",
        ]
    )
    result.stdout.fnmatch_lines(["*fp32 all 2 ranks hold identical parameters after training (4 tensors) ok*"])
    test = json.loads((pytester.path / "report.json").read_text())["tests"][0]
    firsts = [r["modes"]["amp_bf16"]["first_nonfinite_step"] for r in test["distributed"]["ranks"]]
    assert firsts == [5, 4] and test["distributed"]["ranks"][0]["modes"]["fp32"]["first_nonfinite_step"] is None
    assert {m["mode"]: m["outcome"] for m in test["modes"]} == {"fp32": "pass", "amp_bf16": "fail", "bf16_compress_hook": "fail"}


def _launch_with_fault(monkeypatch, fault: dict, timeout_s: float) -> tuple[str, float, str]:
    tag = f"ampgate-test-{uuid.uuid4().hex}"
    monkeypatch.setenv("AMPGATE_TEST_TAG", tag)  # every process of the run inherits it
    started = time.monotonic()
    with pytest.raises(D.DistributedError) as excinfo:
        D.measure_distributed(
            "mnist_mlp",
            ["amp_bf16"],
            world_size=2,
            device="cpu",
            timeout_s=timeout_s,
            config=MeasureConfig(warmup_steps=1, rounds=2, steps_per_block=2, memory_steps=0),
            workload_options={"batch_size": 16, "data_options": {"n_train": 128, "n_test": 64}},
            plants=[fault],
        )
    return str(excinfo.value), time.monotonic() - started, tag


@needs_gloo
def test_hanging_rank_is_stopped_within_the_timeout_and_named(monkeypatch):
    text, took, tag = _launch_with_fault(monkeypatch, {"kind": "hang", "rank": 1}, timeout_s=10)
    assert took < 10 + 10, f"took {took:.1f} s"  # the timeout, then stacks (3 s at most) and the kill
    assert text.startswith("distributed run hung: no result within distributed_timeout=10 s")
    assert "rank 1: not in a collective at worker.py:" in text and "in _plant" in text
    assert "all 2 ranks and the launcher were killed" in text
    assert _tagged_processes(tag) == []  # no launcher, rank or grandchild left behind


@needs_gloo
@pytest.mark.parametrize(
    ("kind", "said"),
    [
        ("raise", "rank 1 raised RuntimeError: planted fault: rank 1 raised at start (worker.py:"),
        ("die", "rank 1 died: it was killed by SIGKILL"),
    ],
)
def test_rank_that_raises_or_dies_is_named(monkeypatch, kind, said):
    text, _took, tag = _launch_with_fault(monkeypatch, {"kind": kind, "rank": 1}, timeout_s=120)
    assert text.startswith(f"distributed run failed: {said}"), text
    # torch >= 2.5's torchrun names the stopped rank's SIGTERM; 2.4's lists only the failed rank
    assert "rank 0 was stopped by the launcher" in text or "rank 0 raised" in text, text
    assert _tagged_processes(tag) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_launcher_dies_with_the_test_process():
    """A CI job killed hard must not leave torchrun running in its own session: it gets SIGTERM."""
    import signal
    import subprocess

    code = (
        "import subprocess, sys, time\n"
        "from pytest_ampgate.distributed.launch import _die_with_parent\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], preexec_fn=_die_with_parent, start_new_session=True)\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert launch._alive(child)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 5
    while launch._alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not launch._alive(child)
