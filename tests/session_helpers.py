"""What the end-to-end tests share: tiny gated projects written for pytester, the command lines that run them,
and the autouse fixtures that keep each run isolated (one thread, private device locks, no real step summary)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from test_bad_input_and_faults import INTERNAL_FRAME, _assert_clean, _output, _quiet_and_isolated  # noqa: F401

from pytest_ampgate.baselines import SCHEMA, SCHEMA_VERSION

CPU = ("--ampgate", "--ampgate-device", "cpu", "-p", "no:cacheprovider")
TINY = 'modes=["amp_bf16"], rounds=3, steps_per_block=3, warmup_steps=1, missing_baseline="ignore"'
FAILING = (
    TINY.replace("rounds=3", "rounds=6") + ", check_speed=True, min_speedup=1000.0, confirm=False"
)  # 6 rounds: enough for a decisive verdict

WORKLOAD = """
import os
import time

import pytest
import torch
from torch import nn

from pytest_ampgate import Workload


def workload():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = (x[:, 0] > 0).long()
    return Workload(
        name="tiny",
        model_factory=lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)),
        data=(x, y, x[:64], y[:64]),
        loss_fn=nn.CrossEntropyLoss(),
        optimizer_factory=lambda params: torch.optim.SGD(params, lr=0.1),
        batch_size=32,
    )
"""


def gated(name, marker=TINY, extra=""):
    return f"@pytest.mark.amp_regression({marker})\ndef {name}(ampgate):\n{extra}    ampgate.run(workload())\n"


def project(*bodies):
    return WORKLOAD + "\n\n" + "\n\n".join(bodies)


@pytest.fixture(scope="module", autouse=True)
def imported_first():
    """Import once, outside the in-process runs, what they import (pytester drops modules first
    imported during a run, and some of torch's and matplotlib's C extensions abort when imported twice)."""
    import importlib
    import pkgutil

    import jsonschema  # noqa: F401
    import matplotlib.backends.backend_agg
    import matplotlib.figure  # noqa: F401
    import pytest_benchmark.logger
    import pytest_benchmark.stats
    import pytest_benchmark.utils  # noqa: F401

    import pytest_ampgate
    from pytest_ampgate.measurement import MeasureConfig, measure
    from pytest_ampgate.workloads import mnist_mlp

    for info in pkgutil.iter_modules(pytest_ampgate.__path__):
        importlib.import_module(f"pytest_ampgate.{info.name}")
    tiny = mnist_mlp().with_options(batch_size=8, data_options={"n_train": 16, "n_test": 8})
    measure(tiny, ["amp_bf16"], device="cpu", config=MeasureConfig(warmup_steps=0, rounds=1, steps_per_block=1, memory_steps=0))


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """One thread (tiny models on a busy machine), private device locks, no real step summary."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # xdist workers
    monkeypatch.setenv("PYTEST_AMPGATE_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    yield
    torch.set_num_threads(before)


ROOT = Path(__file__).resolve().parents[1]
HTML = importlib.util.find_spec("pytest_html") is not None
MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
NATIVE_TOML = tuple(int(p) for p in pytest.__version__.split(".")[:2]) >= (9, 0)


@pytest.fixture(autouse=True)
def private_locks(monkeypatch, tmp_path):
    monkeypatch.setenv("PYTEST_AMPGATE_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


# Shared with the fault catalogue: its early imports (run on import), its autouse fixture (one
# intra-op thread, a private device-lock directory), its output helper and internal-frame pattern.


CPU = ("--ampgate", "--ampgate-device", "cpu", "-p", "no:cacheprovider")
UPDATE = (*CPU, "--ampgate-update")
POSIX = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and FIFOs")

HELPERS = '''
import os
import time

import pytest
import torch
from torch import nn

from pytest_ampgate import Workload
from pytest_ampgate.delays import busy_wait

FAST = dict(modes=["amp_bf16"], rounds=2, steps_per_block=2, warmup_steps=1, missing_baseline="ignore",
            check_speed=False, check_memory=False)


def in_bf16(device_type):
    return torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.bfloat16


class Faulty(nn.Module):
    """Linear(8, 2) that misbehaves under bfloat16 autocast only (NaN output or a slow step)."""

    def __init__(self, fault=""):
        super().__init__()
        self.lin = nn.Linear(8, 2)
        self.fault = fault

    def forward(self, x):
        out = self.lin(x)
        if self.fault == "nan_everywhere":
            return out * float("nan")
        if in_bf16(x.device.type):
            if self.fault == "nan":
                return out * float("nan")
            if self.fault == "slow":
                busy_wait(0.02)  # CPU work: the CPU clock is the thread's CPU time
        return out


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = (x[:, 0] > 0).long()
    return x, y, x[:32], y[:32]


def tiny(name="tiny", model=None, loss=None, optimizer=None, **changes):
    w = Workload(
        name=name,
        model_factory=model or (lambda: nn.Linear(8, 2)),
        data=data(),
        loss_fn=loss or nn.CrossEntropyLoss(),
        optimizer_factory=optimizer or (lambda p: torch.optim.SGD(p, lr=0.1)),
        batch_size=16,
    )
    return w.with_options(**changes) if changes else w
'''


def _hashes(root: Path) -> dict:
    """sha256 of every file under ``root`` (the baseline directory), by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _env_key() -> str:
    from pytest_ampgate.env import fingerprint

    return fingerprint("cpu").key()


def _entry(accuracy=0.5, **mode) -> dict:
    return {
        "environment": {"device_name": "somewhere"},
        "recorded_at": "2026-01-01T00:00:00+00:00",
        "settings": {},
        "modes": {"fp32": {"accuracy": accuracy}, "amp_bf16": {"accuracy": accuracy, **mode}},
    }


def _baseline_doc(tests: dict) -> bytes:
    return json.dumps({"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "tests": tests}, indent=2).encode()


def _write_baseline(pytester, module: str, tests: dict) -> Path:
    path = pytester.path / "baselines" / f"{module}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_baseline_doc(tests))
    return path
