"""This process in NVML's terms (gpu_identity): by PID, by the PID that appeared with its CUDA context, or by its
memory; 'cannot tell' for containers it cannot match, MPS and MIG; xdist siblings found with a real pytest -n 2."""

from __future__ import annotations

import os

import pytest
from fakes import HOST_PID, MIB, MPS_PID, NEIGHBOUR_PID, ContainerNVML


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
    from test_noise_window import failing_measurement

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
