"""NVML readings outside the timed window: the one-shot noise report (other processes, throttle reasons decoded under
new and old pynvml names), every NVML refusal degrading to "not available" with the reason, and the device matched
by PCI bus id (fake pynvml module)."""

from __future__ import annotations

import json
import os
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch
from fakes import FakePynvml

from pytest_ampgate.gpu_noise import GpuProcess, NoiseReport, noise_report
from pytest_ampgate.records import from_dict, to_dict


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch.cuda pretends to have one GPU; returns a function installing a FakePynvml."""
    props = SimpleNamespace(
        name="NVIDIA H100 80GB HBM3", major=9, minor=0, uuid="1234-abcd", pci_domain_id=0, pci_bus_id=0x65, pci_device_id=0
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)

    def install(**kwargs):
        fake = FakePynvml(**kwargs)
        monkeypatch.setitem(sys.modules, "pynvml", fake)
        return fake

    install.props = props
    return install


def _quietly(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args)


def test_noise_report_on_cpu():
    report = noise_report("cpu")
    assert not report.available and not report.noisy
    assert report.reason == "timing on the CPU; NVML applies to NVIDIA GPUs only"
    assert report.describe() == "NVML not available: timing on the CPU; NVML applies to NVIDIA GPUs only"


def test_noise_report_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(sys.modules, "pynvml", FakePynvml())
    report = noise_report("cuda")
    assert (report.available, report.reason) == (False, "no CUDA device")
    assert sys.modules["pynvml"].inits == 0


def test_noise_report_other_processes_and_throttle_reasons(fake_gpu):
    mask = (
        FakePynvml.EVENT["HwThermalSlowdown"]
        | FakePynvml.EVENT["GpuIdle"]
        | FakePynvml.EVENT["SyncBoost"]
        | FakePynvml.EVENT["ApplicationsClocksSetting"]
        | FakePynvml.EVENT["DisplayClockSetting"]
    )
    fake = fake_gpu(processes=[(123, 2 << 30), (os.getpid(), 1 << 30), (456, None)], mask=mask)
    report = _quietly(noise_report, "cuda")
    assert report.available and report.reason == ""
    assert report.other_processes == (
        GpuProcess(pid=123, used_memory_bytes=2 << 30, name="python3"),
        GpuProcess(pid=456, used_memory_bytes=None, name=report.other_processes[1].name),
    )
    assert os.getpid() not in [p.pid for p in report.other_processes]
    assert report.throttle_reasons == ("hw_thermal_slowdown",)
    assert (report.sm_clock_mhz, report.max_sm_clock_mhz, report.temperature_c, report.utilization_percent) == (1410, 1980, 71, 97)
    assert report.noisy and not report.own_process_unidentified and report.unreadable == ()
    assert report.describe() == ("GPU shared with 2 other processes (pids 123, 456); clocks held back by hw_thermal_slowdown")
    # the device was found by UUID, with NVML's "GPU-" prefix, and NVML was shut down again
    assert ("nvmlDeviceGetHandleByUUID", "GPU-1234-abcd") in fake.calls
    assert fake.inits == fake.shutdowns == 1
    assert fake.calls[-1] == ("nvmlShutdown",)


@pytest.mark.parametrize(
    "bits, names",
    [
        (["SwPowerCap"], ("sw_power_cap",)),
        (["HwSlowdown", "HwPowerBrakeSlowdown"], ("hw_slowdown", "hw_power_brake_slowdown")),
        (["SwThermalSlowdown", "GpuIdle"], ("sw_thermal_slowdown",)),
        (["GpuIdle", "ApplicationsClocksSetting", "SyncBoost", "DisplayClockSetting"], ()),
        ([], ()),
    ],
)
@pytest.mark.parametrize("old_names", [False, True])
def test_throttle_bits_decoded_with_new_and_old_pynvml_names(fake_gpu, bits, names, old_names):
    mask = 0
    for bit in bits:
        mask |= FakePynvml.EVENT[bit]
    fake = fake_gpu(mask=mask, old_names=old_names)
    assert not hasattr(fake, "nvmlDeviceGetCurrentClocksEventReasons") or not old_names
    report = _quietly(noise_report, "cuda")
    assert report.available
    assert report.throttle_reasons == names
    assert report.noisy is bool(names)
    if not names:
        assert report.describe() == "quiet"
    assert ("reasons", ("handle", "GPU-1234-abcd")) in fake.calls


def test_nvml_init_failure_is_not_available(fake_gpu):
    fake = fake_gpu(fail={"nvmlInit"})
    report = _quietly(noise_report, "cuda")
    assert not report.available and not report.noisy
    assert report.reason == "NVML init failed: Driver Not Loaded"
    assert report.describe() == "NVML not available: NVML init failed: Driver Not Loaded"
    assert fake.shutdowns == 0  # balanced: nothing to shut down after a failed init


def test_pynvml_missing(fake_gpu, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    report = _quietly(noise_report, "cuda")
    assert (report.available, report.reason) == (False, "pynvml not installed")


def test_individual_nvml_refusals_degrade_to_none(fake_gpu):
    fake = fake_gpu(fail={"nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetClockInfo", "nvmlDeviceGetTemperature", "reasons"})
    report = _quietly(noise_report, "cuda")
    assert report.available
    assert report.other_processes == () and report.throttle_reasons == ()
    assert report.sm_clock_mhz is None and report.temperature_c is None
    assert report.max_sm_clock_mhz == 1980 and report.utilization_percent == 97
    assert report.unreadable == ("processes", "clock event reasons")
    assert report.describe() == "quiet (NVML could not read: processes, clock event reasons)"
    assert fake.inits == fake.shutdowns == 1


def test_device_matched_by_pci_bus_id_then_index(fake_gpu):
    fake = fake_gpu(uuids=())
    assert _quietly(noise_report, "cuda").available
    assert ("nvmlDeviceGetHandleByPciBusId", "00000000:65:00.0") in fake.calls
    assert not any(c[0] == "nvmlDeviceGetHandleByIndex" for c in fake.calls)

    del fake_gpu.props.uuid
    fake_gpu.props.pci_bus_id = None
    fake = fake_gpu(uuids=(), pci=())
    assert _quietly(noise_report, torch.device("cuda", 0)).available
    assert [c[0] for c in fake.calls if c[0].startswith("nvmlDeviceGetHandle")] == ["nvmlDeviceGetHandleByIndex"]


def test_device_index_out_of_range(fake_gpu):
    fake = fake_gpu()
    report = noise_report("cuda:3")
    assert not report.available and report.reason.startswith("no CUDA device 3")
    assert fake.inits == 0


def test_own_process_under_host_pid_is_not_counted_as_noise(fake_gpu):
    # in a container NVML shows host PIDs, so our own context appears under a PID we cannot match
    fake_gpu(processes=[(987654, 1 << 30)])
    report = _quietly(noise_report, "cuda")
    assert report.own_process_unidentified
    assert report.other_process_count == 0 and not report.noisy
    assert report.describe() == "quiet"

    fake_gpu(processes=[(987654, 1 << 30), (987655, 1 << 30)])
    report = _quietly(noise_report, "cuda")
    assert report.other_process_count == 1 and report.noisy
    assert report.describe().startswith("GPU shared with 1 other process (pids 987654, 987655; one of them")


def test_unexpected_pynvml_exception_never_escapes(fake_gpu):
    fake = fake_gpu()

    def broken(handle):
        raise TypeError("pynvml bug")

    fake.nvmlDeviceGetUtilizationRates = broken
    report = _quietly(noise_report, "cuda")
    assert report.available and report.utilization_percent is None


def test_noise_report_json_round_trip(fake_gpu):
    fake_gpu(processes=[(123, 5), (456, None)], mask=FakePynvml.EVENT["SwPowerCap"])
    report = noise_report("cuda")
    back = from_dict(NoiseReport, json.loads(json.dumps(to_dict(report))))
    assert back == report
    unavailable = NoiseReport(available=False, reason="no CUDA device")
    assert from_dict(NoiseReport, json.loads(json.dumps(to_dict(unavailable)))) == unavailable


# --- 4. CPU names ----------------------------------------------------------------------------
