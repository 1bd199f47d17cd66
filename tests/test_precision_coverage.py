"""Precision coverage: deterministic, timing-free detection of layers left in fp32 under AMP."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pytest_ampgate.errors import BaselineError
from pytest_ampgate.precision_coverage import (
    LOW_PRECISION,
    ROOT_NAME,
    OpRecord,
    PrecisionCoverage,
    PrecisionRecorder,
    measure_precision_coverage,
)


class FP32Island(nn.Module):
    """The regression we hunt: a layer forced to fp32 inside an autocast region."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        with torch.autocast("cpu", enabled=False):
            return self.inner(x.float())


class MLP(nn.Module):
    def __init__(self, island: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 256)
        big = nn.Linear(256, 256)  # the biggest layer
        self.fc2 = FP32Island(big) if island else big
        self.head = nn.Linear(256, 10)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.head = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        return self.head(torch.flatten(torch.relu(self.features(x)), 1))


def _make_step(model, x, y, autocast_dtype=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step():
        opt.zero_grad(set_to_none=True)
        if autocast_dtype is not None:
            with torch.autocast("cpu", dtype=autocast_dtype):
                out = model(x)
        else:
            out = model(x)
        loss = nn.functional.cross_entropy(out.float(), y)
        loss.backward()
        opt.step()
        return loss

    return step


def _mlp_step(island=False, autocast_dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    model = MLP(island=island)
    x = torch.randn(32, 64)
    y = torch.randint(0, 10, (32,))
    return model, _make_step(model, x, y, autocast_dtype)


def test_low_precision_set():
    assert torch.float16 in LOW_PRECISION and torch.bfloat16 in LOW_PRECISION
    assert torch.float32 not in LOW_PRECISION
    if hasattr(torch, "float8_e4m3fn"):
        assert torch.float8_e4m3fn in LOW_PRECISION


def test_bf16_autocast_mlp_is_covered():
    model, step = _mlp_step()
    cov = measure_precision_coverage(step, model)
    assert cov.total_flops > 0
    assert cov.share > 0.95
    assert set(cov.by_dtype()) == {"bfloat16"}
    assert cov.fp32_hotspots() == []
    # Every linear, forward and backward, is accounted for under its named_modules() path.
    seen = {(r.module, r.phase) for r in cov.records}
    for name in ("fc1", "fc2", "head"):
        assert (name, "forward") in seen and (name, "backward") in seen
    assert {r.op for r in cov.records} <= {"aten.addmm", "aten.mm"}
    assert cov.describe() == "100.0% of matmul/conv FLOPs in low precision"


def test_fp32_mlp_has_no_low_precision_and_matches_flop_counter():
    model, step = _mlp_step(autocast_dtype=None)
    cov = measure_precision_coverage(step, model)
    assert cov.share == 0.0
    assert cov.low_precision_flops == 0
    assert list(cov.by_dtype()) == ["float32"]

    # Cross-check the arithmetic against torch's own counter on an identical step.
    _model2, step2 = _mlp_step(autocast_dtype=None)
    with FlopCounterMode(display=False) as counter:
        step2()
    assert cov.total_flops == counter.get_total_flops()
    # And by hand: batch 32; forward 2*B*in*out per layer, backward twice that except fc1 (no dgrad).
    b = 32
    fwd = 2 * b * (64 * 256 + 256 * 256 + 256 * 10)
    bwd = 2 * fwd - 2 * b * 64 * 256
    assert cov.total_flops == fwd + bwd
    assert sum(r.flops for r in cov.records if r.phase == "forward") == fwd


def test_bf16_total_matches_flop_counter():
    model, step = _mlp_step()
    cov = measure_precision_coverage(step, model)
    _, step2 = _mlp_step()
    with FlopCounterMode(display=False) as counter:
        step2()
    assert cov.total_flops == counter.get_total_flops()


def test_fp32_island_is_found():
    _, clean_step = _mlp_step()
    clean = measure_precision_coverage(clean_step)
    model, step = _mlp_step(island=True)
    cov = measure_precision_coverage(step, model)

    assert cov.total_flops == clean.total_flops  # same work, different dtype
    assert cov.share < clean.share - 0.5  # fc2 is ~79% of the FLOPs
    hot = cov.fp32_hotspots()
    assert hot[0][0] == "fc2.inner"
    assert len(hot) == 1
    _, flops, frac = hot[0]
    assert flops == cov.total_flops - cov.low_precision_flops
    assert frac == pytest.approx(1.0 - cov.share)
    assert {r.phase for r in cov.records if r.module == "fc2.inner"} == {"forward", "backward"}
    assert {r.dtype for r in cov.records if r.module == "fc2.inner"} == {"float32"}
    text = cov.describe()
    assert "fc2.inner" in text and text.startswith(f"{cov.share * 100:.1f}% of matmul/conv FLOPs")
    assert "fp32: fc2.inner (" in text


def test_names_without_model_are_relative_to_called_module():
    _, step = _mlp_step(island=True)
    cov = measure_precision_coverage(step)
    assert cov.fp32_hotspots()[0][0] == "fc2.inner"


def test_direct_submodule_call_and_root_ops_named_from_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    x = torch.randn(4, 8)
    w = torch.randn(4, 4)

    def step():
        h = model[1](model[0](x))  # submodules called directly, root never runs
        (h @ w).sum().backward()  # a matmul outside every module

    cov = measure_precision_coverage(step, model)
    modules = {r.module for r in cov.records}
    assert {"0", "1"} <= modules
    assert "<unknown>" in modules
    assert ROOT_NAME not in modules


def test_module_outside_given_model_keeps_tracker_name():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    extra = nn.Linear(8, 2)  # not part of `model`
    cov = measure_precision_coverage(lambda: extra(model(torch.randn(4, 8))).sum().backward(), model)
    modules = {r.module for r in cov.records}
    assert modules == {"0", "Linear"}


def test_cnn_conv_counted_in_bf16_forward_and_backward():
    torch.manual_seed(0)
    model = CNN()
    x = torch.randn(4, 3, 8, 8)
    y = torch.randint(0, 10, (4,))
    cov = measure_precision_coverage(_make_step(model, x, y, torch.bfloat16), model)
    conv = [r for r in cov.records if r.module.startswith("features.")]
    assert conv
    assert {r.dtype for r in conv} == {"bfloat16"}
    assert {r.phase for r in conv} == {"forward", "backward"}
    assert {r.module for r in conv if r.phase == "backward"} == {"features.0", "features.2"}
    assert any(r.op == "aten.convolution_backward" for r in conv)
    assert cov.share > 0.95


def test_pure_bf16_model_counts_as_low_precision():
    torch.manual_seed(0)
    model = MLP().to(torch.bfloat16)
    x = torch.randn(32, 64, dtype=torch.bfloat16)
    y = torch.randint(0, 10, (32,))
    cov = measure_precision_coverage(_make_step(model, x, y, None), model)
    assert cov.share == 1.0
    assert cov.by_dtype() == {"bfloat16": cov.total_flops}


def test_root_module_ops_are_named_model():
    class Raw(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(16, 16))

        def forward(self, x):
            return x @ self.w

    model = Raw()
    cov = measure_precision_coverage(lambda: model(torch.randn(4, 16)).sum().backward(), model)
    assert {r.module for r in cov.records} == {ROOT_NAME}
    assert cov.fp32_hotspots()[0][0] == ROOT_NAME


def test_dict_round_trip_through_json():
    model, step = _mlp_step(island=True)
    cov = measure_precision_coverage(step, model)
    data = json.loads(json.dumps(cov.to_dict()))
    back = PrecisionCoverage.from_dict(data)
    assert back == cov
    assert back.share == cov.share
    assert back.describe() == cov.describe()


def test_from_dict_rejects_inconsistent_or_malformed():
    cov = PrecisionCoverage.from_records([OpRecord("fc", "aten.mm", "float32", "forward", 10, 1)])
    bad = cov.to_dict()
    bad["total_flops"] = 11
    with pytest.raises(BaselineError, match="total_flops"):
        PrecisionCoverage.from_dict(bad)
    with pytest.raises(BaselineError, match="record 0"):
        PrecisionCoverage.from_dict({"records": [{"module": "fc"}]})
    with pytest.raises(BaselineError, match="schema"):
        PrecisionCoverage.from_dict({**cov.to_dict(), "schema": 99})


def test_empty_coverage():
    cov = measure_precision_coverage(lambda: torch.randn(3).relu())
    assert cov.total_flops == 0 and cov.share == 0.0
    assert cov.records == ()
    assert cov.describe() == "no matmul/conv FLOPs recorded"


def test_describe_limits_and_aggregation():
    recs = [
        OpRecord("a", "aten.mm", "bfloat16", "forward", 900, 1),
        OpRecord("b", "aten.mm", "float32", "forward", 50, 1),
        OpRecord("b", "aten.mm", "float32", "backward", 30, 2),
        OpRecord("c", "aten.mm", "float32", "forward", 15, 1),
        OpRecord("d", "aten.mm", "float64", "forward", 5, 1),
    ]
    cov = PrecisionCoverage.from_records(recs)
    assert cov.total_flops == 1000 and cov.low_precision_flops == 900
    assert cov.fp32_hotspots(limit=2) == [("b", 80, 0.08), ("c", 15, 0.015)]
    assert cov.describe(limit=2) == "90.0% of matmul/conv FLOPs in low precision; fp32: b (8.0%), c (1.5%), +1 more"
    assert cov.by_dtype() == {"bfloat16": 900, "float32": 95, "float64": 5}


def test_recorder_leaves_nothing_behind():
    from torch.nn.modules import module as nn_module

    hooks_before = (len(nn_module._global_forward_pre_hooks), len(nn_module._global_forward_hooks))
    model, step = _mlp_step()
    with PrecisionRecorder(model) as rec:
        step()
    first = rec.result()
    assert (len(nn_module._global_forward_pre_hooks), len(nn_module._global_forward_hooks)) == hooks_before
    assert first.total_flops > 0
    # A later step outside the recorder is neither recorded nor broken by leftover hooks/modes.
    step()
    model(torch.randn(2, 64)).sum().backward()
    assert rec.result() == first
    assert torch._C._len_torch_dispatch_stack() == 0


def test_recorder_cleans_up_when_step_raises():
    model, step = _mlp_step()

    def failing():
        step()
        raise ValueError("boom")

    rec = PrecisionRecorder(model)
    with pytest.raises(ValueError, match="boom"), rec:
        failing()
    assert torch._C._len_torch_dispatch_stack() == 0
    partial = rec.result()
    assert partial.total_flops > 0  # what ran before the error is kept
    step()  # no stale tracker hooks or modes interfere
    assert rec.result() == partial
    # measure_precision_coverage propagates too.
    with pytest.raises(ValueError, match="boom"):
        measure_precision_coverage(failing, model)
    assert torch._C._len_torch_dispatch_stack() == 0


def test_recorder_is_not_reentrant():
    rec = PrecisionRecorder()
    with rec, pytest.raises(RuntimeError, match="re-entrant"):
        rec.__enter__()
    assert torch._C._len_torch_dispatch_stack() == 0
