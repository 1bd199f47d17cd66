"""Measuring leaves the user's process as it found it: no output of torch's profiler, the user's own
profiler session intact, no global module hooks to trip torch.compile's warning."""

import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from pytest_ampgate import MeasureConfig, Workload, measure
from pytest_ampgate.memory import CPU_PROFILER_BUSY

TINY = MeasureConfig(warmup_steps=2, rounds=2, steps_per_block=2, memory_steps=1)
PROFILER_LINES = ("USDT:", "gpuGetDeviceCount", "profiler_start", "profiler_stop", "DeviceProperties.cpp")


def tiny_workload(model_factory=None) -> Workload:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = (x[:, 0] > 0).long()
    return Workload(
        name="tiny",
        model_factory=model_factory or (lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))),
        data=(x, y, x[:32], y[:32]),
        loss_fn=nn.CrossEntropyLoss(),
        optimizer_factory=lambda params: torch.optim.SGD(params, lr=0.1),
        batch_size=16,
    )


def test_a_gated_cpu_run_prints_no_profiler_line_and_keeps_the_users_own(pytester):
    """libkineto writes to file descriptor 2 (so only a subprocess run with -s sees it); what the
    model itself prints to stderr while the memory step is profiled must still come through."""
    pytester.makepyfile(
        test_gated="""
        import sys
        import pytest
        import torch
        from torch import nn
        from pytest_ampgate import Workload

        class Loud(nn.Sequential):
            def forward(self, x):
                print("model says hello", file=sys.stderr, flush=True)
                return super().forward(x)

        @pytest.mark.amp_regression(modes=["amp_bf16"], rounds=2, steps_per_block=2, warmup_steps=1, missing_baseline="ignore")
        def test_gated(ampgate):
            x = torch.randn(64, 8)
            y = (x[:, 0] > 0).long()
            ampgate.run(Workload(name="w", model_factory=lambda: Loud(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2)),
                                 data=(x, y, x, y), loss_fn=nn.CrossEntropyLoss(), batch_size=16,
                                 optimizer_factory=lambda p: torch.optim.SGD(p, lr=0.1)))
        """
    )
    result = pytester.runpytest_subprocess("--ampgate", "--ampgate-device", "cpu", "-s", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    out = result.stdout.str() + result.stderr.str()
    assert not [line for line in out.splitlines() if any(p in line for p in PROFILER_LINES)], out
    assert "model says hello" in result.stderr.str()


def test_the_users_enclosing_profiler_keeps_its_events():
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        m = measure(tiny_workload(), ["amp_bf16"], device="cpu", config=TINY, progress=False)
    names = {e.name for e in prof.events()}
    assert "aten::addmm" in names or "aten::linear" in names, sorted(names)[:20]
    for mode in (m.reference, m.modes["amp_bf16"]):
        assert mode.ok and mode.peak_memory_bytes is None and mode.memory_note == CPU_PROFILER_BUSY
        assert mode.accuracy is not None  # the rest was measured
    assert m.comparisons["amp_bf16"].memory_ratio is None


def test_without_a_profiler_of_the_users_cpu_memory_is_measured():
    m = measure(tiny_workload(), ["amp_bf16"], device="cpu", config=TINY, progress=False)
    assert m.reference.peak_memory_bytes and m.reference.memory_note == ""


def test_a_compiled_model_gets_no_warning_from_the_gate():
    """Precision coverage tracks modules by hooks; global ones make every call of a compiled module
    warn (torch/_dynamo/eval_frame.py, OptimizedModule.__call__), attributed to the gate."""
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile is not in this torch")

    def compiled():
        return torch.compile(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)), backend="eager")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = measure(tiny_workload(compiled), ["amp_bf16"], device="cpu", config=TINY, progress=False)
    assert m.modes["amp_bf16"].ok, m.modes["amp_bf16"].error
    assert not [w for w in caught if "global hooks" in str(w.message)], [str(w.message) for w in caught]
    coverage = m.modes["amp_bf16"].precision_coverage
    assert coverage is not None and coverage.share > 0.9  # the compiled model's layers are still seen in bf16


def test_profiler_output_filter_keeps_everything_else():
    code = (
        "import os\nfrom pytest_ampgate.memory import _without_profiler_log\n"
        "with _without_profiler_log():\n"
        "    os.write(2, b'USDT:2026-12-05 12:37:25 2294:2294 SyncActivityProfilerHandler.cpp:39] profiler_start\\n')\n"
        "    os.write(2, b'mine\\n')\n"
        "os.write(2, b'after\\n')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "mine\nafter\n"
