import contextlib
import warnings

import pytest
import torch
from torch import nn

from pytest_ampgate import mode_runner, modes, precision_policy
from pytest_ampgate.errors import ModeError
from pytest_ampgate.mode_runner import ScalerStats
from pytest_ampgate.records import from_dict, to_dict


def test_resolve_names_and_apex_aliases():
    assert modes.resolve_mode("amp_fp16").grad_scaler
    assert modes.resolve_mode("O0").name == "fp32"
    assert modes.resolve_mode("o1").name == "amp_fp16"
    assert modes.resolve_mode("O3").name == "fp16"
    assert modes.resolve_mode(" AMP_BF16 ").name == "amp_bf16"


def test_apex_o2_is_the_fp16_master_weights_mode():
    mode = modes.resolve_mode("O2")
    assert mode.name == "fp16_master" and mode.master_weights and mode.param_dtype == torch.float16


def test_unknown_mode_lists_valid_names():
    with pytest.raises(ModeError) as info:
        modes.resolve_mode("fp8")
    assert "'fp8'" in str(info.value)
    for name in ("fp32", "tf32", "amp_fp16", "amp_bf16", "fp16", "bf16", "O1"):
        assert name in str(info.value)
    with pytest.raises(ModeError, match="must be a name"):
        modes.resolve_mode(3)


def _switch_values():
    return [getattr(holder, attr) for holder, attr, _strict, _tf32 in precision_policy._tf32_switches()]


@pytest.mark.parametrize("name", list(modes.MODES))
def test_every_mode_sets_and_restores_the_tf32_switches(name):
    mode = modes.resolve_mode(name)
    before = _switch_values()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with precision_policy.numerics_policy(mode):
            inside = {(id(h), a): getattr(h, a) for h, a, _s, _t in precision_policy._tf32_switches()}
            for holder, attr, strict, tf32 in precision_policy._tf32_switches():
                assert getattr(holder, attr) == (tf32 if mode.tf32 else strict), (name, attr)
    assert _switch_values() == before
    assert inside  # there is at least one switch on every torch we support


def test_switches_restored_after_an_exception_and_from_a_non_default_state():
    holder, attr, strict, tf32 = precision_policy._tf32_switches()[0]
    original = getattr(holder, attr)
    setattr(holder, attr, tf32)
    try:
        with pytest.raises(RuntimeError, match="boom"), precision_policy.numerics_policy("fp32"):
            assert getattr(holder, attr) == strict
            raise RuntimeError("boom")
        assert getattr(holder, attr) == tf32
    finally:
        setattr(holder, attr, original)


def test_legacy_allow_tf32_switches_used_when_fp32_precision_is_absent(monkeypatch):
    class Legacy:
        allow_tf32 = True

    fake_backends = type("B", (), {})()
    fake_backends.cuda = type("C", (), {"matmul": Legacy()})()
    fake_backends.cudnn = Legacy()
    monkeypatch.setattr(torch, "backends", fake_backends)
    switches = precision_policy._tf32_switches()
    assert [(a, s, t) for _h, a, s, t in switches] == [("allow_tf32", False, True)] * 2
    with precision_policy.numerics_policy("fp32"):
        assert fake_backends.cuda.matmul.allow_tf32 is False and fake_backends.cudnn.allow_tf32 is False
    assert fake_backends.cuda.matmul.allow_tf32 is True and fake_backends.cudnn.allow_tf32 is True


def test_cudnn_benchmark_restored():
    before = torch.backends.cudnn.benchmark
    with precision_policy.cudnn_benchmark(not before):
        assert torch.backends.cudnn.benchmark is (not before)
    assert torch.backends.cudnn.benchmark is before


@pytest.mark.parametrize("name", ["fp32", "amp_bf16", "bf16", "amp_fp16", "fp16"])
def test_cpu_runs_these_modes(name):
    assert modes.unsupported_reason(name, "cpu") is None


def test_tf32_on_cpu_is_unsupported_with_reason():
    assert "NVIDIA GPUs" in modes.unsupported_reason("tf32", "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_cuda_without_a_gpu_is_unsupported():
    assert "no CUDA device" in modes.unsupported_reason("amp_fp16", "cuda")


def test_unknown_device_type():
    assert "'meta'" in modes.unsupported_reason("fp32", "meta")


def test_old_gpu_has_no_bf16_or_tf32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "device", lambda i: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert "Tesla T4 (compute capability 7.5) has no native bfloat16" in modes.unsupported_reason("amp_bf16", "cuda")
    assert "bfloat16" in modes.unsupported_reason("bf16", "cuda:0")
    assert "no TF32 tensor cores" in modes.unsupported_reason("tf32", "cuda")
    assert modes.unsupported_reason("amp_fp16", "cuda") is None
    assert "device 3 does not exist" in modes.unsupported_reason("fp32", "cuda:3")


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1)


def test_prepare_gives_identical_initial_weights_and_leaves_the_original_alone():
    initial = _net()
    original = {k: v.clone() for k, v in initial.state_dict().items()}
    runners = [mode_runner.prepare(m, initial, _sgd, nn.CrossEntropyLoss(), "cpu") for m in ("fp32", "amp_bf16", "bf16")]
    for runner in runners[:2]:
        for k, v in runner.model.state_dict().items():
            assert torch.equal(v, original[k])
    pure = runners[2].model
    assert pure[0].weight.dtype == torch.bfloat16
    assert torch.equal(pure[0].weight, original["0.weight"].bfloat16())
    x, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 0])
    for runner in runners:
        runner.step(x, y)
    for k, v in initial.state_dict().items():
        assert torch.equal(v, original[k])


def test_pure_low_precision_keeps_batchnorm_fp32():
    runner = mode_runner.prepare("bf16", _net(), _sgd, nn.CrossEntropyLoss(), "cpu")
    bn = runner.model[1]
    assert bn.weight.dtype == torch.float32 and bn.running_mean.dtype == torch.float32
    out = runner.model(runner.cast_input(torch.randn(4, 8)))
    assert out.dtype == torch.bfloat16
    loss = runner.step(torch.randn(4, 8), torch.tensor([0, 1, 2, 0]))
    assert loss.dtype == torch.bfloat16 and torch.isfinite(loss)


def test_amp_bf16_step_runs_linear_layers_in_bf16_and_keeps_fp32_weights():
    runner = mode_runner.prepare("amp_bf16", _net(), _sgd, nn.CrossEntropyLoss(), "cpu")
    seen = []
    runner.model[0].register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    loss = runner.step(torch.randn(4, 8), torch.tensor([0, 1, 2, 0]))
    assert seen == [torch.bfloat16]
    assert runner.model[0].weight.dtype == torch.float32
    assert not loss.requires_grad and runner.steps_taken == 1


def test_training_reduces_the_loss_in_every_cpu_mode():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    for name in ("fp32", "amp_bf16", "bf16", "amp_fp16"):
        runner = mode_runner.prepare(name, _net(), _sgd, nn.CrossEntropyLoss(), "cpu")
        losses = [float(runner.step(x, y)) for _ in range(40)]
        assert losses[-1] < losses[0] * 0.8, name
        assert runner.evaluate([(x, y)]) > 0.6, name


def test_grad_scaler_counts_skipped_steps_and_backs_off():
    runner = mode_runner.prepare("amp_fp16", _net(), _sgd, nn.CrossEntropyLoss(), "cpu")
    x, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 0])
    runner.step(x, y)
    bad = x.clone()
    bad[0, 0] = float("inf")
    runner.step(bad, y)
    runner.step(bad, y)
    runner.step(x, y)
    stats = runner.scaler_stats()
    assert stats.steps == 4 and stats.skipped_steps == 2
    assert stats.initial_scale == 65536.0 and stats.final_scale == 65536.0 / 4
    assert stats.min_scale == stats.final_scale
    assert from_dict(ScalerStats, to_dict(stats)) == stats


def test_modes_without_scaler_report_no_scaler_stats():
    assert mode_runner.prepare("amp_bf16", _net(), _sgd, nn.CrossEntropyLoss(), "cpu").scaler_stats() is None
