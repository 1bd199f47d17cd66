"""Fakes at the hardware boundary, in one place: a CUDA-like timing source, NVML (plain, container, MPS and MIG
behaviour), and torch.cuda's device and event objects.  Each behaves as the real thing is documented to
behave; the docstrings cite the source."""

from __future__ import annotations

import os
import time
import types
from types import SimpleNamespace

import torch

from pytest_ampgate import delays, modes
from pytest_ampgate.gpu_noise import open_noise_window
from pytest_ampgate.timing import BlockTiming, Probe

# --- CUDA events and the busy probe ---------------------------------------------------------------


class FakeTimer:
    """A CUDA-like timing source: per mode, (device time per step, host enqueue time per step, busy time per step
    [, host launch time per step while the probe held the device busy: the timed host time unless given])."""

    def __init__(self, per_mode):
        self.per_mode = per_mode

    def time(self, runner, run):
        losses = run()
        step, host, *_probe = self.per_mode[runner.mode.name]
        return BlockTiming(step * len(losses), host * len(losses)), losses

    def busy(self, runner, run, steps, host_step_s):
        _step, host, busy, *probe_host = self.per_mode[runner.mode.name]
        return Probe(busy, probe_host[0] if probe_host else host), run()


def as_if_on_cuda(m):
    """The fake timer stands in for CUDA events: judge the result as a CUDA run."""
    m.device = "cuda:0"
    return m


# MNIST at batch 4096 on an H100 as the issue describes it: every mode bound by the host, AMP slower.


# --- NVML: per-process utilisation samples and violation counters --------------------------------


class FakeNVML(types.SimpleNamespace):
    """Per-process utilisation samples and cumulative violation counters, as NVML reports them."""

    def __init__(self, samples=(), violation_step_ns=0):
        super().__init__(NVML_PERF_POLICY_POWER=0, NVML_PERF_POLICY_THERMAL=1, NVML_PERF_POLICY_RELIABILITY=5)
        self.samples, self.violation_step_ns, self.reads, self.handles = list(samples), violation_step_ns, 0, []

    def nvmlDeviceGetHandleByIndex(self, index):
        self.handles.append(index)
        return f"gpu{index}"

    def nvmlDeviceGetProcessUtilization(self, handle, since_us):
        return [s for s in self.samples if s.timeStamp > since_us]

    def nvmlDeviceGetViolationStatus(self, handle, policy):
        self.reads += 1
        return types.SimpleNamespace(violationTime=(self.reads // 3) * self.violation_step_ns if policy == 0 else 0)

    def nvmlSystemGetProcessName(self, pid):
        return f"proc{pid}"

    def nvmlShutdown(self):
        pass


def sample(pid, sm, mem=0):
    return types.SimpleNamespace(pid=pid, smUtil=sm, memUtil=mem, timeStamp=int(time.time() * 1e6) + 10_000_000)


def windowed(samples=(), own=(), violation_step_ns=0, device="cuda:0"):
    window = open_noise_window(device, pynvml=FakeNVML(samples, violation_step_ns), own_pids={os.getpid(), *own})
    time.sleep(0.02)
    return window.close()


# --- torch.cuda's device and event objects (cuda:N) ------------------------------------------------


class FakeCuda:
    """torch.cuda's device context, events and _sleep, recording which device each call landed on."""

    def __init__(self, monkeypatch):
        self.current, self.events, self.sleeps = 0, [], []
        fake = self

        class Device:
            def __init__(self, device):
                self.index = device.index if isinstance(device, torch.device) else int(device)

            def __enter__(self):
                self.previous, fake.current = fake.current, self.index

            def __exit__(self, *exc):
                fake.current = self.previous

        class Event:
            def __init__(self, enable_timing=False):
                fake.events.append(fake.current)
                self.t = None

            def record(self):
                self.t = time.perf_counter()

            def synchronize(self):
                pass

            def query(self):
                return False

            def elapsed_time(self, other):
                return (other.t - self.t) * 1000.0

        monkeypatch.setattr(torch.cuda, "device", Device)
        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: fake.current)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
        monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: fake.sleeps.append((fake.current, cycles)))
        monkeypatch.setattr(modes, "gpu_cycles_per_second", lambda index: 1e9)  # the timing probe's
        monkeypatch.setattr(delays, "gpu_cycles_per_second", lambda index: 1e9)  # the planted delay's


# --- NVML as a container, MPS or MIG shows it -------------------------------------------------------

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


# --- the pynvml module itself (for environment fingerprints and one-shot noise reports) -------------


class NVMLError(Exception):
    def __init__(self, value):
        super().__init__(value)
        self.value = value

    def __str__(self):
        return {3: "Not Supported", 9: "Driver Not Loaded", 13: "Not Found"}.get(self.value, f"code {self.value}")


class FakePynvml(types.ModuleType):
    """Just enough of the pynvml module (nvidia-ml-py) to stand in ``sys.modules``: records calls, and each
    function can be made to raise NVMLError, whose str() is NVML's own text ("Not Supported", ...)."""

    EVENT = dict(
        GpuIdle=0x1,
        ApplicationsClocksSetting=0x2,
        SwPowerCap=0x4,
        HwSlowdown=0x8,
        SyncBoost=0x10,
        SwThermalSlowdown=0x20,
        HwThermalSlowdown=0x40,
        HwPowerBrakeSlowdown=0x80,
        DisplayClockSetting=0x100,
    )

    def __init__(
        self, *, processes=(), mask=0, fail=(), old_names=False, driver="580.65.06", uuids=("GPU-1234-abcd",), pci=("00000000:65:00.0",)
    ):
        super().__init__("pynvml")
        self.NVMLError = NVMLError
        self.NVML_CLOCK_SM = 1
        self.NVML_TEMPERATURE_GPU = 0
        self.inits = self.shutdowns = 0
        self.calls = []
        self._processes, self._mask, self._fail = processes, mask, set(fail)
        self._driver, self._uuids, self._pci = driver, set(uuids), set(pci)
        prefix = "nvmlClocksThrottleReason" if old_names else "nvmlClocksEventReason"
        for name, bit in self.EVENT.items():
            setattr(self, prefix + name, bit)
        reasons = "nvmlDeviceGetCurrentClocksThrottleReasons" if old_names else "nvmlDeviceGetCurrentClocksEventReasons"
        setattr(self, reasons, self._reasons)

    def _call(self, name, *args):
        self.calls.append((name, *args))
        if name in self._fail:
            raise NVMLError(3 if name != "nvmlInit" else 9)

    def nvmlInit(self):
        self._call("nvmlInit")
        self.inits += 1

    def nvmlShutdown(self):
        self._call("nvmlShutdown")
        self.shutdowns += 1

    def nvmlSystemGetDriverVersion(self):
        self._call("nvmlSystemGetDriverVersion")
        return self._driver

    def nvmlDeviceGetHandleByUUID(self, uuid):
        self._call("nvmlDeviceGetHandleByUUID", uuid)
        if uuid not in self._uuids:
            raise NVMLError(13)
        return ("handle", uuid)

    def nvmlDeviceGetHandleByPciBusId(self, bus_id):
        self._call("nvmlDeviceGetHandleByPciBusId", bus_id)
        if bus_id not in self._pci:
            raise NVMLError(13)
        return ("handle", bus_id)

    def nvmlDeviceGetHandleByIndex(self, index):
        self._call("nvmlDeviceGetHandleByIndex", index)
        return ("handle", index)

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        self._call("nvmlDeviceGetComputeRunningProcesses", handle)
        return [SimpleNamespace(pid=pid, usedGpuMemory=mem) for pid, mem in self._processes]

    def nvmlSystemGetProcessName(self, pid):
        self._call("nvmlSystemGetProcessName", pid)
        if pid == 456:
            raise NVMLError(3)
        return b"/usr/bin/python3" if pid == 123 else "trainer"

    def _reasons(self, handle):
        self._call("reasons", handle)
        return self._mask

    def nvmlDeviceGetClockInfo(self, handle, kind):
        self._call("nvmlDeviceGetClockInfo", handle, kind)
        return 1410

    def nvmlDeviceGetMaxClockInfo(self, handle, kind):
        self._call("nvmlDeviceGetMaxClockInfo", handle, kind)
        return 1980

    def nvmlDeviceGetTemperature(self, handle, sensor):
        self._call("nvmlDeviceGetTemperature", handle, sensor)
        return 71

    def nvmlDeviceGetUtilizationRates(self, handle):
        self._call("nvmlDeviceGetUtilizationRates", handle)
        return SimpleNamespace(gpu=97, memory=40)
