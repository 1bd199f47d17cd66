"""The measurement engine on the CPU: real training, the protocol's bookkeeping, JSON round trip."""

import json

import pytest
import torch
from torch import nn

from pytest_ampgate import measurement as measure_mod
from pytest_ampgate.data import from_tensors, synthetic
from pytest_ampgate.errors import ConfigError, WorkloadError
from pytest_ampgate.measurement import MeasureConfig, measure
from pytest_ampgate.results import Measurements
from pytest_ampgate.workloads import Workload, cifar_cnn, mnist_mlp

SMALL = {"n_train": 2048, "n_test": 512}


@pytest.fixture(scope="module")
def mnist_run():
    config = MeasureConfig(warmup_steps=2, rounds=6, steps_per_block=25, memory_steps=0)
    workload = mnist_mlp().with_options(batch_size=128, data_options=SMALL)
    return measure(workload, ["amp_bf16"], device="cpu", config=config)


@pytest.fixture(scope="module")
def cifar_run():
    config = MeasureConfig(warmup_steps=1, rounds=4, steps_per_block=30, memory_steps=0)
    workload = cifar_cnn().with_options(batch_size=32, data_options={"n_train": 2048, "n_test": 256})
    return measure(workload, ["amp_bf16"], device="cpu", config=config)


@pytest.mark.parametrize("run", ["mnist_run", "cifar_run"])
def test_cpu_training_learns_in_fp32_and_amp_bf16(run, request):
    m = request.getfixturevalue(run)
    for mm in (m.reference, m.modes["amp_bf16"]):
        assert mm.ok and mm.accuracy > 0.3, (m.workload, mm.mode, mm.accuracy)  # chance is 0.1
        assert mm.losses[-1] < mm.losses[0]
        assert mm.first_nonfinite_step is None and mm.nonfinite_steps == 0
    assert m.dataset["source"] == "synthetic"


def test_every_step_is_accounted_for(mnist_run):
    config = mnist_run.config
    for mm in (mnist_run.reference, mnist_run.modes["amp_bf16"]):
        assert len(mm.losses) == config.total_steps() == 1 + 2 + (1 + 6) * 25
        assert len(mm.step_times_s) == config.rounds
        assert all(t > 0 for t in mm.step_times_s)
        assert mm.peak_memory_bytes is None and "memory_steps=0" in mm.memory_note


def test_modes_start_from_identical_weights(mnist_run):
    # Same initial weights and same first batch: the first losses differ only by bf16 rounding.
    ref, amp = mnist_run.reference.losses[0], mnist_run.modes["amp_bf16"].losses[0]
    assert amp == pytest.approx(ref, rel=0.02)


def test_comparison_has_an_interval_from_every_round(mnist_run):
    speedup = mnist_run.comparisons["amp_bf16"].speedup
    assert speedup.rounds == 6 and speedup.low <= speedup.median <= speedup.high
    assert mnist_run.comparisons["amp_bf16"].memory_ratio is None


def test_precision_coverage_recorded_per_mode(mnist_run):
    assert mnist_run.reference.precision_coverage.share == 0.0
    assert mnist_run.modes["amp_bf16"].precision_coverage.share > 0.99


def test_json_round_trip(mnist_run):
    text = mnist_run.to_json()
    json.loads(text)  # strict JSON
    again = Measurements.from_json(text)
    assert again.to_dict() == mnist_run.to_dict()
    assert again.modes["amp_bf16"].step_time_s == mnist_run.modes["amp_bf16"].step_time_s
    assert again.comparisons["amp_bf16"].speedup == mnist_run.comparisons["amp_bf16"].speedup


def test_environment_recorded(mnist_run):
    assert mnist_run.environment["device_type"] == "cpu"
    assert mnist_run.environment["torch_version"] == torch.__version__
    assert mnist_run.noise.before.available is False


def _tiny_workload(name="tiny", data=None, model=None, loss=None):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = (x[:, 0] > 0).long()
    return Workload(
        name=name,
        model_factory=model or (lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))),
        data=data if data is not None else (x, y, x[:64], y[:64]),
        loss_fn=loss or nn.CrossEntropyLoss(),
        optimizer_factory=lambda p: torch.optim.SGD(p, lr=0.1),
        batch_size=32,
    )


TINY = MeasureConfig(warmup_steps=1, rounds=4, steps_per_block=3, memory_steps=0, precision_coverage=False)


def test_abba_schedule_is_followed(monkeypatch):
    calls = []
    real = measure_mod.timed_block

    def spy(runner, *args):
        calls.append(runner.mode.name)
        return real(runner, *args)

    monkeypatch.setattr(measure_mod, "timed_block", spy)
    measure(_tiny_workload(), ["amp_bf16"], device="cpu", config=TINY)
    lead_in = ["fp32"]  # untimed: gives the reference the back-to-back start the last mode gets at each turn
    balance = ["amp_bf16"]  # untimed: the other modes' matching block, so all train for the same steps
    assert calls == [*lead_in, "fp32", "amp_bf16", "amp_bf16", "fp32", "fp32", "amp_bf16", "amp_bf16", "fp32", *balance]


def test_a_a_control_uses_two_independent_runners():
    m = measure(_tiny_workload(), ["fp32"], device="cpu", config=TINY)
    assert m.reference is not m.modes["fp32"]
    assert m.reference.losses == m.modes["fp32"].losses  # same weights, same batches, same mode
    assert m.comparisons["fp32"].speedup.rounds == 4


def test_unsupported_modes_are_reported_not_crashed():
    m = measure(_tiny_workload(), ["tf32", "amp_bf16"], device="cpu", config=TINY)
    assert not m.modes["tf32"].supported and "NVIDIA GPUs" in m.modes["tf32"].unsupported_reason
    assert m.comparisons["tf32"].speedup is None and "NVIDIA" in m.comparisons["tf32"].note
    assert m.modes["amp_bf16"].ok and m.modes["amp_bf16"].accuracy is not None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_cuda_requested_without_a_gpu_is_an_error_naming_the_device():
    from pytest_ampgate.errors import ConfigError

    with pytest.raises(ConfigError, match=r"measure\(device='cuda'\): no CUDA device is available"):
        measure(_tiny_workload(), ["amp_fp16"], device="cuda", config=TINY)


def test_first_nonfinite_step_is_reported():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = (x[:, 0] > 0).long()
    test_x = x[:64].clone()
    x[3 * 32 + 5] = 3.4e38  # finite in fp32, but the first matmul overflows in every mode (step 3)
    data = from_tensors("overflow", x, y, test_x, y[:64])
    config = MeasureConfig(warmup_steps=1, rounds=2, steps_per_block=3, memory_steps=0)
    m = measure(_tiny_workload(data=data), ["amp_bf16", "amp_fp16"], device="cpu", config=config)
    for mm in (m.reference, m.modes["amp_bf16"], m.modes["amp_fp16"]):
        assert mm.first_nonfinite_step == 3, mm.mode
    scaler = m.modes["amp_fp16"].scaler
    assert scaler.skipped_steps >= 1 and scaler.final_scale < scaler.initial_scale
    assert m.reference.scaler is None
    Measurements.from_json(m.to_json())  # non-finite losses survive strict JSON


def test_a_mode_that_crashes_does_not_stop_the_others():
    class FailsInBf16(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            if torch.is_autocast_enabled("cpu"):
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
            return self.fc(x)

    m = measure(_tiny_workload(model=FailsInBf16), ["amp_bf16"], device="cpu", config=TINY)
    assert "out of memory" in m.modes["amp_bf16"].error
    assert m.reference.ok and m.reference.accuracy is not None
    assert "out of memory" in m.comparisons["amp_bf16"].note


def test_a_model_that_does_not_fit_its_data_is_the_users_error():
    wrong = _tiny_workload(model=lambda: nn.Linear(10, 2))
    with pytest.raises(WorkloadError, match=r"workload 'tiny': the model rejected a batch .*input shape \(32, 8\)"):
        measure(wrong, ["amp_bf16"], device="cpu", config=TINY)
    bad_loss = _tiny_workload(loss=nn.functional.binary_cross_entropy_with_logits)
    with pytest.raises(WorkloadError, match="the loss rejected the model's output"):
        measure(bad_loss, ["amp_bf16"], device="cpu", config=TINY)


def test_config_is_validated():
    with pytest.raises(ConfigError, match="rounds must be a whole number >= 1"):
        MeasureConfig(rounds=0)
    with pytest.raises(ConfigError, match="confidence"):
        MeasureConfig(confidence=1.5)
    with pytest.raises(ConfigError, match="modes must not repeat"):
        measure(_tiny_workload(), ["amp_bf16", "amp_bf16"], device="cpu", config=TINY)


def test_every_supported_cpu_mode_trains():
    data = synthetic("s", (1, 8, 8), 4, n_train=512, n_test=128, seed=1)
    workload = Workload(
        name="conv",
        model_factory=lambda: nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(256, 4)),
        data=data,
        loss_fn=nn.CrossEntropyLoss(),
        optimizer_factory=lambda p: torch.optim.SGD(p, lr=0.05),
        batch_size=32,
    )
    config = MeasureConfig(warmup_steps=1, rounds=2, steps_per_block=15, memory_steps=0)
    m = measure(workload, ["amp_bf16", "bf16", "amp_fp16", "fp16"], device="cpu", config=config)
    for mm in [m.reference, *m.modes.values()]:
        assert mm.ok and mm.first_nonfinite_step is None, (mm.mode, mm.error)
        assert mm.accuracy > 0.4, (mm.mode, mm.accuracy)  # chance is 0.25
