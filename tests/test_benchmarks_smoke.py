"""The engine benchmark (benchmarks/engine_benchmark.py) in its reduced CPU form.

The script is what BENCHMARKS.md's figures come from, so it must keep running and keep printing
what the issue asks for: the per-mode table, the engine-vs-bare-loop ratio, the environment.
"""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pytest_ampgate import workloads
from pytest_ampgate.env import fingerprint
from pytest_ampgate.measurement import MeasureConfig
from pytest_ampgate.mode_runner import prepare
from pytest_ampgate.modes import resolve_mode
from pytest_ampgate.results import Comparison, Measurements, ModeMeasurement
from pytest_ampgate.stats import estimate_ratio
from pytest_ampgate.timing import time_block
from pytest_ampgate.workloads import mnist_mlp

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "engine_benchmark.py"
TINY = ["--rounds", "2", "--steps-per-block", "2", "--warmup", "1", "--threads", "1"]
NUM = r"(\d+\.\d+)"
RATIO = rf"{NUM}x \[{NUM}-{NUM}\]"
VERDICT = rf"engine step costs {NUM}x a bare loop \[{NUM}-{NUM}\]"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("engine_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["engine_benchmark"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("engine_benchmark", None)


def test_quick_cpu_run_prints_table_overhead_ratio_and_environment(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--device",
        "cpu",
        "--quick",
        "--workloads",
        "mnist_mlp",
        "--modes",
        "fp32",
        "tf32",
        "amp_bf16",
        *TINY,
        "--quiet",
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout

    assert re.search(
        r"^workload\s+batch\s+mode\s+step ms \(IQR\)\s+speedup vs fp32 \[CI\]\s+peak MiB\s+mem ratio\s+"
        r"final loss\s+accuracy\s+engine/bare \[CI\]$",
        text,
        re.M,
    ), text
    assert re.search(
        rf"^mnist_mlp\s+128\s+fp32\s+\d+\.\d+ \(\d+\.\d+\)\s+reference\s+\d+\.\d+\s+1\.00\s+\d\.\d+\s+0\.\d+\s+{RATIO}", text, re.M
    ), text  # CPU memory: profiler events
    assert re.search(
        rf"^mnist_mlp\s+128\s+amp_bf16\s+\d+\.\d+ \(\d+\.\d+\)\s+{RATIO}!?\s+\d+\.\d+\s+\d\.\d+\s+\d\.\d+\s+0\.\d+\s+{RATIO}", text, re.M
    ), text
    assert re.search(r"^mnist_mlp\s+128\s+tf32\s+unsupported\*", text, re.M), text
    assert "* mnist_mlp tf32: unsupported: tf32 exists only on NVIDIA GPUs" in text

    verdicts = re.findall(rf"mnist_mlp batch 128 (\w+): {VERDICT}", text)
    assert [v[0] for v in verdicts] == ["fp32", "amp_bf16"], text
    for _mode, median, low, high in verdicts:
        assert 0 < float(low) <= float(median) <= float(high)
    assert re.search(rf"worst: {VERDICT}", text)
    assert "too few rounds (2) to tell" in text  # 2 rounds give no verdict either way
    assert re.search(r"^  mnist_mlp batch 128: fp32 \d+ ops \(0 casts, 0 host syncs\); amp_bf16 \d+ ops \([1-9]\d* casts", text, re.M), text

    assert f"environment: {fingerprint('cpu').short()}" in text
    assert "device: cpu (asked for with --device)" in text
    assert re.search(r"^wall time: \d+\.\d s", text, re.M)
    assert "mnist_mlp: no measured batch qualifies" in text  # CPU: no peak memory, so no default can be chosen

    data = json.loads(out.read_text())
    (case,) = data["cases"]
    assert case["batch_size"] == 128 and case["measurements"]["dataset"]["n_train"] == 4096
    assert set(case["overhead"]) == {"fp32", "amp_bf16"}
    for o in case["overhead"].values():
        assert len(o["engine_step_s"]) == len(o["bare_step_s"]) == 2
        assert o["steps_each"] == 1 + 2 * 2  # warm-up + rounds x steps, the same for both loops
        assert o["param_max_abs_diff"] == 0.0  # same weights, same slices, same mode: same result
    assert not case["measurements"]["modes"]["tf32"]["supported"]
    assert case["ops_per_step"]["amp_bf16"]["total"] > case["ops_per_step"]["fp32"]["total"]


@pytest.mark.parametrize("mode", ["fp32", "amp_fp16", "amp_bf16", "bf16"])
def test_bare_loop_does_exactly_the_engines_work(bench, mode):
    """Equal parameters after training prove the ratio compares the same steps on the same data."""
    workload = mnist_mlp(batch_size=32).with_options(data_options={"n_train": 256, "n_test": 64})
    dataset = workload.dataset("cpu")
    torch.manual_seed(0)
    initial = workload.model_factory()
    device = torch.device("cpu")
    runner = prepare(mode, initial, workload.optimizer_factory, workload.loss_fn, device)
    bare = bench.BareLoop(resolve_mode(mode), initial, workload, dataset, device)
    for _ in range(3):  # 3 x 4 steps wraps around the 256-sample training set
        time_block(runner, dataset, 32, 4)
        assert bare.block(4) > 0
    assert bare.steps_taken == runner.steps_taken == 12
    before = list(initial.parameters())
    for a, b, start in zip(runner.model.parameters(), bare.model.parameters(), before):
        assert a.dtype == b.dtype
        assert torch.equal(a, b)
        assert not torch.equal(b.float(), start)  # both really trained


def test_engine_vs_bare_reports_a_ratio_per_round(bench):
    workload = mnist_mlp(batch_size=32).with_options(data_options={"n_train": 256, "n_test": 64})
    config = MeasureConfig(warmup_steps=1, rounds=4, steps_per_block=2)
    o = bench.engine_vs_bare(workload, "amp_fp16", workload.dataset("cpu"), torch.device("cpu"), config)
    assert not o.error and o.steps_each == 1 + 4 * 2 and o.param_max_abs_diff == 0.0
    assert o.estimate.rounds == 4
    assert sorted(o.estimate.samples) == sorted(e / b for e, b in zip(o.engine_step_s, o.bare_step_s))
    assert re.match(VERDICT, o.verdict())


def test_op_count_sees_autocast_casts_and_the_gradscaler_host_sync(bench):
    workload = mnist_mlp(batch_size=32).with_options(data_options={"n_train": 256, "n_test": 64})
    dataset, device, config = workload.dataset("cpu"), torch.device("cpu"), MeasureConfig()
    fp32 = bench.count_ops(workload, "fp32", dataset, device, config)
    fp16 = bench.count_ops(workload, "amp_fp16", dataset, device, config)
    bf16 = bench.count_ops(workload, "amp_bf16", dataset, device, config)
    assert (fp32.casts, fp32.host_syncs) == (0, 0) and fp32.total >= 12  # 3 linears forward and backward, SGD
    assert fp16.casts > 0 and fp16.host_syncs == 1  # GradScaler.step reads found_inf on the host
    assert bf16.casts > 0 and bf16.host_syncs == 0
    assert fp16.total > bf16.total > fp32.total


def test_sweep_and_quick_choose_the_batch_sizes_measured(bench):
    sweep = bench.workloads_to_run(bench.parse_args(["--sweep"]))
    assert [(w.name, w.batch_size) for w in sweep] == [
        *(("mnist_mlp", b) for b in (512, 1024, 2048, 4096, 8192, 16384)),
        *(("cifar_cnn", b) for b in (128, 256, 512, 1024, 2048)),
    ]
    quick = bench.workloads_to_run(bench.parse_args(["--quick", "--workloads", "cifar_cnn", "--batch-sizes", "8", "16"]))
    assert [w.batch_size for w in quick] == [8, 16] and all(w.data_options["n_train"] == 1024 for w in quick)
    defaults = [w.batch_size for w in bench.workloads_to_run(bench.parse_args([]))]
    assert defaults == [workloads.MNIST_BATCH, workloads.CIFAR_BATCH]
    config = bench.build_config(bench.parse_args(["--quick", "--rounds", "3"]))
    assert (config.rounds, config.steps_per_block, config.warmup_steps) == (3, 8, 2)


def _case(bench, batch, fp16=(1.5, 0.5), bf16=(1.5, 0.5)):
    """A sweep point with given (speedup CI low, memory ratio) per AMP mode, for the selection rule."""
    modes, comparisons = {}, {}
    for name, (low, mem) in (("amp_fp16", fp16), ("amp_bf16", bf16)):
        modes[name] = ModeMeasurement(name)
        comparisons[name] = Comparison(name, "fp32", estimate_ratio([low, low + 0.1, low + 0.2]), mem)
    m = Measurements("cifar_cnn", "cuda", MeasureConfig(), batch, {}, {}, ModeMeasurement("fp32"), modes, comparisons)
    return bench.Case("cifar_cnn", batch, m, {}, 0.0)


def test_default_rule_takes_the_smallest_batch_where_every_amp_mode_clears_both_bars(bench):
    cases = [
        _case(bench, 1024),
        _case(bench, 128, fp16=(1.1, 0.5)),  # speedup interval reaches below 1.2x
        _case(bench, 256, bf16=(1.5, 0.95)),  # memory not below 0.9x
        _case(bench, 512, bf16=(1.25, None)),  # memory not measured
        _case(bench, 2048),
    ]
    chosen, verdicts = bench.choose_default(cases)
    assert chosen == 1024
    why = {b: (ok, reason) for b, ok, reason in verdicts}
    assert [b for b, _, _ in verdicts] == [128, 256, 512, 1024, 2048]
    assert why[128] == (False, "amp_fp16 speedup CI low 1.10x < 1.20x")
    assert why[256] == (False, "amp_bf16 memory ratio 0.95 >= 0.90")
    assert not why[512][0] and "amp_bf16 peak memory not measured" in why[512][1]
    assert why[1024][0] and why[2048][0]
    assert bench.choose_default(cases[1:4])[0] is None
