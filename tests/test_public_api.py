"""What users hold is importable from the package root, and only the plugin subpackage knows pytest."""

import subprocess
import sys

import pytest_ampgate


def test_every_root_export_resolves_to_its_home():
    for name in pytest_ampgate.__all__:
        value = getattr(pytest_ampgate, name)
        assert value is not None, name
    from pytest_ampgate.config import GateConfig
    from pytest_ampgate.data import from_tensors
    from pytest_ampgate.gate import GateResult

    assert pytest_ampgate.GateConfig is GateConfig
    assert pytest_ampgate.GateResult is GateResult
    assert pytest_ampgate.from_tensors is from_tensors


def test_the_root_names_what_a_user_holds_without_importing_torch():
    code = "import sys, pytest_ampgate; pytest_ampgate.__all__; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    for name in ("GateConfig", "GateResult", "from_tensors", "decide", "measure", "Workload"):
        assert name in pytest_ampgate.__all__


def test_tensor_data_from_the_root_trains_a_gate_config_from_the_root():
    import torch

    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    dataset = pytest_ampgate.from_tensors("toy", x, y, x[:16], y[:16])
    assert dataset.num_classes == 3 and tuple(dataset.train_x.shape) == (64, 4)
    config = pytest_ampgate.GateConfig(min_speedup=1.1)
    assert config.min_speedup == 1.1 and config.measure_config().rounds == config.rounds
