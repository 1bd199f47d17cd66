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
from fakes import FakePynvml
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
    fake = FakePynvml(driver="580.65.06")
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


def test_cpu_name_comes_from_py_cpuinfo_where_proc_cpuinfo_has_none(monkeypatch):

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
