"""The gate where GPU CI really runs (issue 20): a runner lacking every requested mode under --ampgate-strict,
and launch-bound workloads that must never excuse a regression."""

from __future__ import annotations

import os
import time
import types

import pytest
from test_reliability import CPU, HELPERS, _assert_clean

UNSUPPORTED_ONLY = (
    HELPERS
    + """

@pytest.mark.amp_regression(**dict(FAST, modes=["tf32"]))
def test_gated(ampgate):
    ampgate.run(tiny())
"""
)


def test_only_unsupported_modes_skip_with_the_reason_and_fail_under_strict(pytester):
    pytester.makepyfile(test_gated=UNSUPPORTED_ONLY)
    plain = pytester.runpytest(*CPU, "-rs")
    plain.assert_outcomes(skipped=1)
    out = _assert_clean(plain)
    assert "no requested precision mode can run here" in out and "tf32 exists only on NVIDIA GPUs" in out, out

    strict = pytester.runpytest(*CPU, "--ampgate-strict")
    strict.assert_outcomes(failed=1)
    assert strict.ret != 0
    out = _assert_clean(strict)
    assert "tf32 exists only on NVIDIA GPUs" in out, out
    assert "--ampgate-strict fails a gated test that gated nothing" in out, out


# --- launch-bound never excuses a regression against the same machine's baseline (issue 20, point 4) -------

# MNIST-like on an H100: the host launches slower than the device works, AMP slower than fp32 (0.77x).
# (device time per step, host time per step in the timed rounds, device busy time per step, host launch time in the probe)
HEALTHY = {"fp32": (200e-6, 190e-6, 30e-6, 180e-6), "amp_bf16": (260e-6, 250e-6, 12e-6, 240e-6)}
SLOWED = {**HEALTHY, "amp_bf16": (520e-6, 510e-6, 24e-6, 500e-6)}  # the AMP step 2x slower, as a new host sync would


def _launch_bound_verdict(per_mode, baseline_from_run=None, **settings):
    from test_gpu_verdicts import DECISIVE, FakeTimer, as_if_on_cuda, tiny_workload

    from pytest_ampgate.config import build_config
    from pytest_ampgate.gate import baseline_from, evaluate
    from pytest_ampgate.measurement import measure

    m = as_if_on_cuda(measure(tiny_workload(), ["amp_bf16"], device="cpu", config=DECISIVE, timer=FakeTimer(per_mode)))
    config = build_config(("test", {"modes": ["amp_bf16"], "missing_baseline": "ignore", **settings}))
    baseline = baseline_from(baseline_from_run, "t.py::t", "cuda|H100", {}) if baseline_from_run is not None else None
    verdict = evaluate(m, config, baseline)
    return m, next(c for c in verdict.checks if c.metric == "speedup")


def test_launch_bound_amp_slowed_2x_against_its_stored_baseline_fails():
    from test_gpu_verdicts import DECISIVE, FakeTimer, as_if_on_cuda, tiny_workload

    from pytest_ampgate.measurement import measure
    from pytest_ampgate.timing import launch_bound
    from pytest_ampgate.verdict import FAIL

    recorded = as_if_on_cuda(measure(tiny_workload(), ["amp_bf16"], device="cpu", config=DECISIVE, timer=FakeTimer(HEALTHY)))
    m, speed = _launch_bound_verdict(SLOWED, recorded)
    assert launch_bound(m.reference).bound
    assert speed.outcome == FAIL, speed.why
    assert "baseline 0.77x" in speed.why and "< floor 0.69x" in speed.why, speed.why
    assert "margin 1.20x against fp32 not gated" in speed.why and "launch-bound" in speed.why, speed.why


def test_healthy_launch_bound_run_passes_against_its_baseline_with_the_plain_statement():
    from test_gpu_verdicts import DECISIVE, FakeTimer, as_if_on_cuda, tiny_workload

    from pytest_ampgate.measurement import measure
    from pytest_ampgate.verdict import PASS

    recorded = as_if_on_cuda(measure(tiny_workload(), ["amp_bf16"], device="cpu", config=DECISIVE, timer=FakeTimer(HEALTHY)))
    _m, speed = _launch_bound_verdict(HEALTHY, recorded)
    assert speed.outcome == PASS, speed.why
    assert "AMP cannot pay off at this size" in speed.why and "0.18 ms to launch" in speed.why, speed.why
    assert speed.threshold == pytest.approx(0.77 * 0.9, rel=0.01)


def test_launch_bound_without_a_baseline_says_what_it_could_not_gate():
    from pytest_ampgate.verdict import SKIPPED

    _m, speed = _launch_bound_verdict(HEALTHY)
    assert speed.outcome == SKIPPED and "no stored baseline to gate it against" in speed.why, speed.why


def test_launch_diagnosis_uses_the_probe_not_the_timed_host_time():
    """A host-side regression (the host blocking on a full queue, a new .item()) swells the timed rounds'
    host time; the probe, with the device held busy, measures the launch cost alone and excuses nothing."""
    from pytest_ampgate.verdict import FAIL

    gpu_bound = {"fp32": (2e-3, 0.2e-3, 1.9e-3, 0.2e-3), "amp_bf16": (2.6e-3, 2.55e-3, 2.5e-3, 0.3e-3)}
    _m, speed = _launch_bound_verdict(gpu_bound)
    assert speed.outcome == FAIL and "launch-bound" not in speed.why, speed.why


def test_strict_summary_lists_every_skipped_speed_check(pytester):
    pytester.makepyfile(
        test_gated=HELPERS
        + """

@pytest.mark.amp_regression(**FAST)
def test_gated(ampgate):
    ampgate.run(tiny())
"""
    )
    plain = pytester.runpytest(*CPU)
    plain.assert_outcomes(passed=1)
    assert "SKIPPED SPEED CHECK" not in _assert_clean(plain)
    strict = pytester.runpytest(*CPU, "--ampgate-strict")
    strict.assert_outcomes(passed=1)
    out = _assert_clean(strict)
    assert "SKIPPED SPEED CHECK test_gated.py::test_gated: amp_bf16 speedup not gated on cpu" in out, out


# --- who used the GPU: containers, MPS, MIG, xdist siblings (issue 20, points 1-3) ----------------------

HOST_PID, NEIGHBOUR_PID = 4_190_001, 4_190_002
"""PIDs of another PID namespace (the host's), as NVML reports them inside a container: not visible here."""
MPS_PID = 4_190_003
MIB = 2**20


class NotSupported(Exception):
    """pynvml's NVMLError_NotSupported: its str() is "Not Supported"."""

    def __str__(self):
        return "Not Supported"


class ContainerNVML:
    """A fake NVML that reports what the real driver reports, one case per ``kind``.

    * ``plain``: NVML lists this process under its own PID (no PID namespace in between).
    * ``container``: NVML is not PID-namespace aware: the compute-process list and the per-process
      utilisation samples carry host PIDs, this process's own PID is absent and it appears under a
      host PID (NVIDIA/nvidia-docker #179 and #1483; Project-HAMi/HAMi-core #112 shows the two
      lists disagreeing on driver 560).  ``usedGpuMemory`` is this process's allocator memory plus
      its CUDA context, as ``nvmlDeviceGetComputeRunningProcesses`` documents (NVML API reference,
      nvmlProcessInfo_t).
    * ``mps``: under the Multi-Process Service every client's work appears under the PID of
      ``nvidia-cuda-mps-server`` (NVML API reference, nvmlDeviceGetMPSComputeRunningProcesses).
    * ``mig``: ``nvmlDeviceGetProcessUtilization`` is not supported on MIG device handles and
      raises NVMLError_NotSupported (NVML API reference: "not supported on MIG-enabled devices";
      vGPU guests likewise).
    """

    NVML_PERF_POLICY_POWER, NVML_PERF_POLICY_THERMAL, NVML_PERF_POLICY_RELIABILITY = 0, 1, 5

    def __init__(self, kind, processes, samples):
        self.kind, self.processes, self.samples = kind, list(processes), list(samples)

    def nvmlDeviceGetHandleByIndex(self, index):
        return f"gpu{index}"

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return [types.SimpleNamespace(pid=pid, usedGpuMemory=mem) for pid, mem in self.processes]

    def nvmlDeviceGetProcessUtilization(self, handle, since_us):
        if self.kind == "mig":
            raise NotSupported()
        return [
            types.SimpleNamespace(pid=pid, smUtil=sm, memUtil=5, timeStamp=int(time.time() * 1e6) + 10_000_000) for pid, sm in self.samples
        ]

    def nvmlDeviceGetViolationStatus(self, handle, policy):
        return types.SimpleNamespace(violationTime=0)

    def nvmlSystemGetProcessName(self, pid):
        return b"/usr/bin/nvidia-cuda-mps-server" if pid == MPS_PID else b"python"

    def nvmlShutdown(self):
        pass


@pytest.fixture
def holds_1gib(monkeypatch):
    """This process's allocator holds 1 GiB on the GPU (torch.cuda.memory_reserved at the hardware boundary)."""
    import torch

    from pytest_ampgate import gpu_identity

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda index=None: 1024 * MIB)
    monkeypatch.setattr(gpu_identity, "_context_pids", {})


def _window(kind, processes, samples):
    from pytest_ampgate.gpu_noise import open_noise_window

    window = open_noise_window("cuda:0", pynvml=ContainerNVML(kind, processes, samples))
    return window.close()


def _speed_of(window):
    from test_gpu_verdicts import failing_measurement

    from pytest_ampgate.config import build_config
    from pytest_ampgate.gate import evaluate

    verdict = evaluate(failing_measurement(window), build_config(("test", {"modes": ["amp_fp16"], "missing_baseline": "ignore"})))
    return next(c for c in verdict.checks if c.metric == "speedup")


def test_plain_case_this_process_by_its_pid_is_not_noise_another_is(holds_1gib):
    from pytest_ampgate.verdict import FAIL, INCONCLUSIVE

    me = os.getpid()
    quiet = _window("plain", [(me, 1500 * MIB)], [(me, 95)])
    assert quiet.identified_by == "pid" and not quiet.noisy and not quiet.cannot_tell
    assert quiet.describe() == "quiet during the timed rounds" and _speed_of(quiet).outcome == FAIL
    busy = _window("plain", [(me, 1500 * MIB), (NEIGHBOUR_PID, 8000 * MIB)], [(me, 60), (NEIGHBOUR_PID, 40)])
    assert busy.noisy and [p.pid for p in busy.busy_processes] == [NEIGHBOUR_PID]
    assert _speed_of(busy).outcome == INCONCLUSIVE


def test_container_this_process_under_a_host_pid_is_found_by_its_memory_and_a_regression_fails(holds_1gib):
    from pytest_ampgate.verdict import FAIL, INCONCLUSIVE

    processes = [(HOST_PID, 1024 * MIB + 500 * MIB), (NEIGHBOUR_PID, 30_000 * MIB)]  # 500 MiB: the CUDA context
    alone = _window("container", processes, [(HOST_PID, 95)])
    assert alone.identified_by == "memory" and alone.ignored_own_pids == (HOST_PID,) and not alone.noisy, alone
    speed = _speed_of(alone)
    assert speed.outcome == FAIL and "other process" not in speed.why, speed.why  # the regression is not excused
    shared = _window("container", processes, [(HOST_PID, 60), (NEIGHBOUR_PID, 40)])
    assert shared.noisy and [p.pid for p in shared.busy_processes] == [NEIGHBOUR_PID]
    assert _speed_of(shared).outcome == INCONCLUSIVE


def test_container_this_process_found_by_the_pid_that_appeared_with_its_context(holds_1gib):
    from pytest_ampgate import gpu_identity

    nvml = ContainerNVML("container", [(NEIGHBOUR_PID, 1400 * MIB)], [(HOST_PID, 95)])
    gpu_identity.note_context(nvml, "gpu0", 0, lambda: nvml.processes.append((HOST_PID, 1300 * MIB)))
    from pytest_ampgate.gpu_noise import NoiseWindow

    window = NoiseWindow(nvml, "gpu0").close()  # both processes fit 1 GiB + context by memory; the context decides
    assert window.identified_by == "context" and not window.noisy and window.ignored_own_pids == (HOST_PID,), window


def test_container_where_memory_cannot_tell_says_so_and_never_busy_or_quiet(holds_1gib):
    from pytest_ampgate.gpu_noise import NoiseReadings
    from pytest_ampgate.records import to_dict
    from pytest_ampgate.results import noise_dict
    from pytest_ampgate.verdict import FAIL

    twins = [(HOST_PID, 1400 * MIB), (NEIGHBOUR_PID, 1450 * MIB)]  # an xdist sibling in the same container, say
    window = _window("container", twins, [(HOST_PID, 95), (NEIGHBOUR_PID, 20)])
    assert window.cannot_tell and not window.noisy
    text = window.describe()
    assert text.startswith("cannot tell who used the GPU") and "nvidia-docker #179" in text and "quiet" not in text, text
    speed = _speed_of(window)
    assert speed.outcome == FAIL and "cannot tell who used the GPU" in speed.why and "busy" not in speed.why, speed.why
    assert "another PID namespace" in noise_dict(NoiseReadings(window=window))["window"]["cannot_tell"]  # the JSON says it too
    assert to_dict(window)["identified_by"] == ""


def test_mps_every_client_under_the_server_pid_cannot_tell(holds_1gib):
    from pytest_ampgate.verdict import FAIL

    window = _window("mps", [(MPS_PID, 3000 * MIB)], [(MPS_PID, 95)])
    assert window.cannot_tell and "MPS server" in window.cannot_tell and not window.noisy
    speed = _speed_of(window)
    assert speed.outcome == FAIL and "cannot tell who used the GPU" in speed.why, speed.why


def test_mig_without_per_process_utilisation_is_not_quiet(holds_1gib):
    from pytest_ampgate.gpu_noise import NoiseReadings
    from pytest_ampgate.results import noise_dict

    window = _window("mig", [(os.getpid(), 1500 * MIB)], [])
    assert window.cannot_tell and "Not Supported" in window.cannot_tell and "MIG" in window.cannot_tell
    assert "quiet" not in window.describe() and "cannot tell who used the GPU" in window.describe()
    assert "MIG" in noise_dict(NoiseReadings(window=window))["window"]["cannot_tell"]
    assert "cannot tell who used the GPU" in _speed_of(window).why


def test_a_real_xdist_run_each_worker_finds_its_siblings_and_controller(pytester):
    out = pytester.mkdir("siblings")
    pytester.makepyfile(
        test_siblings=f"""
import json, os, time
from pathlib import Path
from pytest_ampgate.gpu_noise import own_run_pids

def test_find_siblings():
    out = Path({str(out)!r})
    (out / f"{{os.getpid()}}.ready").write_text("")
    deadline = time.time() + 120
    while len(list(out.glob("*.ready"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
    run = sorted(own_run_pids())
    (out / f"{{os.getpid()}}.json").write_text(json.dumps({{"pid": os.getpid(), "ppid": os.getppid(), "run": run}}))
"""
    )
    result = pytester.runpytest_subprocess("-n", "2", "--dist", "each", "-p", "no:cacheprovider", timeout=240)
    result.assert_outcomes(passed=2)
    import json

    workers = [json.loads(p.read_text()) for p in out.glob("*.json")]
    assert len(workers) == 2 and workers[0]["ppid"] == workers[1]["ppid"], workers
    controller = workers[0]["ppid"]
    for me, sibling in (workers, workers[::-1]):
        assert {me["pid"], sibling["pid"], controller} <= set(me["run"]), (me, sibling)
        assert os.getpid() not in me["run"]  # this outer pytest is not of that run


# --- memory that two processes agree on (issue 20, point 6) ------------------------------------------------


def test_the_memory_pass_picks_convolution_algorithms_by_heuristics_and_restores_the_users_settings():
    """cuDNN's flags are process globals, readable on the CPU: what the step saw is what cuDNN would be told."""
    import dataclasses

    import torch
    from test_gpu_verdicts import TINY, tiny_workload

    from pytest_ampgate.measurement import measure

    seen = []

    class Recording(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))

        def forward(self, x):
            seen.append((torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic))
            return self.net(x)

    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, False
    try:
        measure(tiny_workload(model=Recording), ["amp_bf16"], device="cpu", config=dataclasses.replace(TINY, memory_steps=2))
        after = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, False
    assert (True, False) in seen, "warm-up and timed steps autotune"
    assert (False, True) in seen, "the memory pass must not reuse timed (autotuned) algorithm choices"
    assert after == (False, False), "the user's cuDNN settings are restored"
