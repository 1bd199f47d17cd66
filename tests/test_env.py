"""Tests for the environment fingerprint (env), the TF32 policy (precision_policy) and NVML noise checks (gpu_noise).

No GPU is needed: the CUDA side is exercised with torch.cuda monkeypatched and a fake ``pynvml``
module injected into ``sys.modules``.
"""

from __future__ import annotations

import json
import os
import re
import sys
import types
import warnings
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from session_helpers import (  # noqa: F401  (imported_first: autouse)
    CPU,
    gated,
    imported_first,
    private_locks,
    project,
)

from pytest_ampgate import env, modes, precision_policy
from pytest_ampgate.env import Environment, fingerprint
from pytest_ampgate.errors import BaselineError, ConfigError
from pytest_ampgate.gpu_noise import GpuProcess, NoiseReport, noise_report
from pytest_ampgate.precision_policy import TF32Policy, current_tf32_policy
from pytest_ampgate.records import from_dict, to_dict

HAS_NEW_TF32_API = hasattr(torch.backends.cudnn, "conv") and precision_policy._read_fp32_precision(torch.backends.cuda.matmul) is not None


def _forbid_cuda(monkeypatch):
    """Make any CUDA call fail loudly, to prove a CPU fingerprint makes none."""

    def boom(*args, **kwargs):
        raise AssertionError("CUDA was touched for a CPU fingerprint")

    for name in (
        "is_available",
        "device_count",
        "current_device",
        "get_device_properties",
        "get_device_name",
        "get_device_capability",
        "is_bf16_supported",
        "init",
    ):
        monkeypatch.setattr(torch.cuda, name, boom)
    monkeypatch.setattr(torch.backends.cudnn, "version", boom)


def _cuda_env(**changes) -> Environment:
    base = Environment(
        device_type="cuda",
        device_name="NVIDIA H100 80GB HBM3",
        compute_capability="9.0",
        bf16_supported=True,
        torch_version="2.11.0+cu130",
        cuda_version="13.0",
        cudnn_version=91002,
        driver_version="580.65.06",
        gpu_count=8,
        tf32=TF32Policy(matmul="ieee", cudnn_conv="ieee", api="fp32_precision"),
        python_version="3.12.3",
        platform="Linux-6.8.0-x86_64-with-glibc2.39",
    )
    return replace(base, **changes)


# --------------------------------------------------------------------------------------------------
# fingerprint on the CPU
# --------------------------------------------------------------------------------------------------


def test_cpu_fingerprint_fields_and_no_cuda_calls(monkeypatch):
    _forbid_cuda(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        e = fingerprint("cpu")
    assert e.device_type == "cpu"
    assert e.device_name and e.device_name == e.device_name.strip()
    assert e.compute_capability is None
    assert e.bf16_supported is True
    assert e.torch_version == torch.__version__
    assert e.cuda_version == torch.version.cuda
    assert e.cudnn_version is None and e.driver_version is None
    assert e.gpu_count == 0
    assert e.tf32 == current_tf32_policy()
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", e.python_version)
    assert e.platform
    assert fingerprint(torch.device("cpu")) == e


def test_cpu_key_is_stable_and_well_formed():
    e = fingerprint("cpu")
    key = e.key()
    assert key == fingerprint("cpu").key() == Environment.from_dict(to_dict(e)).key()
    major, minor = torch.__version__.split(".")[:2]
    assert re.fullmatch(r"cpu\|[ -~]+\|torch" + re.escape(f"{major}.{minor}"), key), key
    assert '"' not in key and "\\" not in key and key.count("|") == 2
    assert e.short().endswith(f"torch {major}.{minor}")
    # the key does not depend on things that do not change AMP performance
    assert replace(e, platform="other", python_version="3.9.0", torch_version=f"{major}.{minor}.99").key() == key


def test_cpu_model_read_from_proc_cpuinfo_or_platform():
    name = env._cpu_model()
    assert isinstance(name, str) and name and "\n" not in name
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as fh:
            models = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
        if models:
            assert name == " ".join(models[0].split())


def test_environment_json_round_trip():
    for e in (fingerprint("cpu"), _cuda_env()):
        text = json.dumps(to_dict(e), sort_keys=True)
        back = Environment.from_dict(json.loads(text))
        assert back == e
        assert isinstance(back.tf32, TF32Policy)
        assert back.key() == e.key()


def test_environment_from_dict_tolerates_new_keys_and_names_missing_ones():
    data = to_dict(_cuda_env())
    data["added_in_a_future_version"] = 1
    assert Environment.from_dict(data) == _cuda_env()
    del data["device_name"]
    with pytest.raises(BaselineError, match="device_name"):
        Environment.from_dict(data)
    with pytest.raises(BaselineError, match="JSON object"):
        Environment.from_dict(["not", "a", "dict"])
    with pytest.raises(BaselineError, match="tf32"):
        Environment.from_dict(dict(to_dict(_cuda_env()), tf32="ieee"))


def test_fingerprint_cuda_without_gpu_is_a_clear_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no.*visible|none is visible"):
        fingerprint("cuda")
    assert fingerprint(None).device_type == "cpu"  # None picks the CPU when there is no GPU
    with pytest.raises(ConfigError):
        fingerprint("not-a-device")


# --------------------------------------------------------------------------------------------------
# the environment key on CUDA
# --------------------------------------------------------------------------------------------------


def test_cuda_key_documented_format():
    e = _cuda_env()
    assert e.key() == "NVIDIA H100 80GB HBM3|sm90|torch2.11|cuda13"
    assert e.short() == "NVIDIA H100, torch 2.11"
    assert _cuda_env(compute_capability="12.0", device_name="NVIDIA B200").key() == "NVIDIA B200|sm120|torch2.11|cuda13"


def test_cuda_key_changes_with_what_changes_amp_performance():
    key = _cuda_env().key()
    # same key: patch releases, driver, cuDNN, CUDA minor, TF32 policy, python, host
    assert _cuda_env(torch_version="2.11.1").key() == key
    assert _cuda_env(torch_version="2.11.0a0+git1234abc").key() == key
    assert _cuda_env(driver_version="590.1", cudnn_version=92000, cuda_version="13.2").key() == key
    assert _cuda_env(python_version="3.10.1", platform="x", gpu_count=1).key() == key
    # different key: torch minor, GPU model, compute capability, CUDA major
    assert _cuda_env(torch_version="2.12.0").key() != key
    assert _cuda_env(torch_version="3.11.0").key() != key
    assert _cuda_env(device_name="NVIDIA A100-SXM4-80GB", compute_capability="8.0").key() != key
    assert _cuda_env(device_name="NVIDIA H100 PCIe").key() != key
    assert _cuda_env(cuda_version="12.8").key() != key


def test_key_strips_characters_that_are_unsafe_in_keys():
    e = _cuda_env(device_name='Weird|GPU "X"\\\t\u00e9  name\n')
    key = e.key()
    assert key.startswith("Weird GPU X name|sm90|")
    assert key.count("|") == 3
    assert all(" " <= ch <= "~" for ch in key)
    assert json.loads(json.dumps({key: 1})) == {key: 1}


@pytest.mark.parametrize(
    "name, short",
    [
        ("NVIDIA H100 80GB HBM3", "NVIDIA H100"),
        ("NVIDIA A100-SXM4-80GB", "NVIDIA A100"),
        ("NVIDIA H100 PCIe", "NVIDIA H100"),
        ("Tesla V100-SXM2-16GB", "Tesla V100"),
        ("NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 4090"),
        ("NVIDIA L4", "NVIDIA L4"),
    ],
)
def test_short_gpu_name(name, short):
    assert _cuda_env(device_name=name).short() == f"{short}, torch 2.11"


def test_fingerprint_cuda_with_mocked_device(monkeypatch):
    props = SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    seen = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: seen.append(i) or props)
    monkeypatch.setattr(modes, "cuda_bf16_supported", lambda i: True)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91002)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    fake = FakeNVML(driver="580.65.06")
    monkeypatch.setitem(sys.modules, "pynvml", fake)

    e = fingerprint("cuda:1")
    assert seen == [1]
    assert (e.device_type, e.device_name, e.compute_capability) == ("cuda", "NVIDIA H100 80GB HBM3", "9.0")
    assert (e.cuda_version, e.cudnn_version, e.driver_version, e.gpu_count) == ("13.0", 91002, "580.65.06", 2)
    assert fake.inits == fake.shutdowns == 1
    major, minor = torch.__version__.split(".")[:2]
    assert e.key() == f"NVIDIA H100 80GB HBM3|sm90|torch{major}.{minor}|cuda13"
    with pytest.raises(ConfigError, match="only 2 visible"):
        fingerprint("cuda:5")


# --------------------------------------------------------------------------------------------------
# TF32 policy
# --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_NEW_TF32_API, reason="torch < 2.9 has no fp32_precision API")
def test_tf32_policy_new_api_reads_what_was_set_without_warnings():
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = (matmul.fp32_precision, conv.fp32_precision)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            policy = current_tf32_policy()
            assert policy.api == "fp32_precision"
            assert policy == TF32Policy(matmul=saved[0], cudnn_conv=saved[1], api="fp32_precision")
            matmul.fp32_precision = "tf32"
            conv.fp32_precision = "ieee"
            policy = current_tf32_policy()
            assert (policy.matmul, policy.cudnn_conv) == ("tf32", "ieee")
            assert policy.matmul_tf32 and not policy.cudnn_conv_tf32
            assert policy.describe() == "matmul tf32, cudnn conv ieee"
            # the legacy API was not touched: reading it now would raise in torch >= 2.9
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved
    assert current_tf32_policy() == TF32Policy(matmul=saved[0], cudnn_conv=saved[1], api="fp32_precision")


class _LegacyCuBLAS:
    """Like torch < 2.9's cuBLASModule: fp32_precision is an unknown attribute."""

    def __init__(self, allow):
        self._allow = allow

    def __getattr__(self, name):
        if name == "allow_tf32":
            return self._allow
        raise AttributeError("Unknown attribute " + name)


class _MixGuard:
    """Like torch >= 2.9 after the new API was used: the legacy flag raises when read."""

    def __init__(self, precision):
        self.fp32_precision = precision

    @property
    def allow_tf32(self):
        raise RuntimeError("you have used mix of the legacy and new APIs")


def _fake_torch(cuda_matmul, cudnn):
    return SimpleNamespace(backends=SimpleNamespace(cuda=SimpleNamespace(matmul=cuda_matmul), cudnn=cudnn))


@pytest.mark.parametrize("matmul, conv", [(True, False), (False, True), (False, False), (True, True)])
def test_tf32_policy_legacy_api(monkeypatch, matmul, conv):
    monkeypatch.setattr(precision_policy, "torch", _fake_torch(_LegacyCuBLAS(matmul), SimpleNamespace(allow_tf32=conv)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        policy = current_tf32_policy()
    assert policy == TF32Policy(matmul="tf32" if matmul else "ieee", cudnn_conv="tf32" if conv else "ieee", api="allow_tf32")
    assert policy.matmul_tf32 is matmul and policy.cudnn_conv_tf32 is conv


def test_tf32_policy_prefers_new_api_and_never_reads_legacy(monkeypatch):
    cudnn = _MixGuard("none")  # cudnn's own fp32_precision; its legacy allow_tf32 raises
    cudnn.conv = _MixGuard("tf32")
    monkeypatch.setattr(precision_policy, "torch", _fake_torch(_MixGuard("none"), cudnn))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        policy = current_tf32_policy()
    assert policy == TF32Policy(matmul="none", cudnn_conv="tf32", api="fp32_precision")
    assert not policy.matmul_tf32  # "none" inherits torch's default, IEEE for cuBLAS


def test_tf32_policy_round_trip():
    policy = TF32Policy(matmul="ieee", cudnn_conv="tf32", api="fp32_precision")
    assert from_dict(TF32Policy, json.loads(json.dumps(to_dict(policy)))) == policy


# --------------------------------------------------------------------------------------------------
# NVML noise checks
# --------------------------------------------------------------------------------------------------


class NVMLError(Exception):
    def __init__(self, value):
        super().__init__(value)
        self.value = value

    def __str__(self):
        return {3: "Not Supported", 9: "Driver Not Loaded", 13: "Not Found"}.get(self.value, f"code {self.value}")


class FakeNVML(types.ModuleType):
    """Just enough of pynvml: records calls, and each function can be made to raise NVMLError."""

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


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch.cuda pretends to have one GPU; returns a function installing a FakeNVML."""
    props = SimpleNamespace(
        name="NVIDIA H100 80GB HBM3", major=9, minor=0, uuid="1234-abcd", pci_domain_id=0, pci_bus_id=0x65, pci_device_id=0
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)

    def install(**kwargs):
        fake = FakeNVML(**kwargs)
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
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML())
    report = noise_report("cuda")
    assert (report.available, report.reason) == (False, "no CUDA device")
    assert sys.modules["pynvml"].inits == 0


def test_noise_report_other_processes_and_throttle_reasons(fake_gpu):
    mask = (
        FakeNVML.EVENT["HwThermalSlowdown"]
        | FakeNVML.EVENT["GpuIdle"]
        | FakeNVML.EVENT["SyncBoost"]
        | FakeNVML.EVENT["ApplicationsClocksSetting"]
        | FakeNVML.EVENT["DisplayClockSetting"]
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
        mask |= FakeNVML.EVENT[bit]
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
    fake_gpu(processes=[(123, 5), (456, None)], mask=FakeNVML.EVENT["SwPowerCap"])
    report = noise_report("cuda")
    back = from_dict(NoiseReport, json.loads(json.dumps(to_dict(report))))
    assert back == report
    unavailable = NoiseReport(available=False, reason="no CUDA device")
    assert from_dict(NoiseReport, json.loads(json.dumps(to_dict(unavailable)))) == unavailable


# --- 4. CPU names ----------------------------------------------------------------------------


def test_cpu_name_comes_from_py_cpuinfo_where_proc_cpuinfo_has_none(monkeypatch):
    import types

    from pytest_ampgate import env

    def no_proc(*args, **kwargs):
        raise OSError("no /proc here (macOS)")

    monkeypatch.setattr(env, "open", no_proc, raising=False)
    monkeypatch.setattr(env, "_CPUINFO_BRAND", [])
    monkeypatch.setitem(sys.modules, "cpuinfo", types.SimpleNamespace(get_cpu_info=lambda: {"brand_raw": "Apple  M2 Pro"}))
    assert env._cpu_model() == "Apple M2 Pro"  # not platform.processor()'s "arm"
    assert env._cpuinfo_brand() == "Apple M2 Pro"  # asked once, cached


def test_cpu_name_keeps_existing_keys_where_proc_cpuinfo_names_the_model():
    """On x86 Linux /proc/cpuinfo's model name is what py-cpuinfo reports too, so keys recorded
    before ('cpu|AMD EPYC|torch2.15' in baselines/) still match."""
    from pytest_ampgate import env

    proc = Path("/proc/cpuinfo")
    if not proc.exists() or "model name" not in proc.read_text(errors="replace"):
        pytest.skip("no model name in /proc/cpuinfo on this machine")
    cpuinfo = pytest.importorskip("cpuinfo")
    assert env._cpu_model() == " ".join(cpuinfo.get_cpu_info()["brand_raw"].split())
