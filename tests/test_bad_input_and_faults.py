"""Fault injection, end to end through the plugin: every bad input gets a clear error naming the
culprit and the fix, every fault is survived, and no baseline file is ever lost or half-written.

Each case runs a real pytest session (in-process with ``pytester``, or as a subprocess where a
process must be killed or two must race) on a tiny user workload, and asserts three things: the
exact message (file, key or argument at fault, and what to do), that no traceback into the
plugin's internals is shown, and what is on disk afterwards (bytes unchanged, or a whole file).

The catalogue of bad inputs and faults is data (the dicts below); ``test_fault_catalogue_size``
counts it.  GPU-only faults (a real CUDA out-of-memory, a GPU without bfloat16) skip without CUDA.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import pytest_ampgate
from pytest_ampgate.baselines import SCHEMA, SCHEMA_VERSION, BaselineStore
from pytest_ampgate.gpu_noise import GpuProcess, NoiseReport


def _import_early() -> None:
    """pytester drops the modules an in-process run imported once it ends, so the next run imports
    (and assertion-rewrites) them again: about 2 s a run.  Worse, torch._dynamo (imported lazily
    by torch.random.fork_rng) pulls in triton, whose native module aborts the process when it is
    initialised a second time.  Importing them here, outside any run, keeps them."""
    import importlib
    import pkgutil

    names = [f"pytest_ampgate.{m.name}" for m in pkgutil.iter_modules(pytest_ampgate.__path__)]
    names += ["hypothesis", "torch._dynamo"]
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:  # optional extras (matplotlib for the chart, hypothesis)
            pass


_import_early()

CPU = ("--ampgate", "--ampgate-device", "cpu", "-p", "no:cacheprovider")
UPDATE = (*CPU, "--ampgate-update")
GATED_FILE = "test_gated.py"
GATED_ID = "test_gated.py::test_gated"
BASELINE = Path("baselines") / "test_gated.json"

HELPERS = '''
import os
import time

import pytest
import torch
from torch import nn

from pytest_ampgate import Workload
from pytest_ampgate.delays import busy_wait

# Timing and memory are not gated even on a GPU: these tests are about faults, not about speed.
FAST = dict(rounds=2, steps_per_block=2, warmup_steps=1, memory_steps=0, missing_baseline="ignore", check_speed=False, check_memory=False)


def in_bf16(device_type):
    return torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.bfloat16


class Faulty(nn.Module):
    """Linear(8, 2) that misbehaves only under bfloat16 autocast (after ``after`` calls), so the
    other modes stay healthy and must still be measured."""

    def __init__(self, fault="", after=0):
        super().__init__()
        self.lin = nn.Linear(8, 2)
        self.fault, self.after, self.calls = fault, after, 0

    def forward(self, x):
        out = self.lin(x)
        if not in_bf16(x.device.type):
            return out
        self.calls += 1
        if self.calls <= self.after:
            return out
        if self.fault == "oom" or (self.fault == "oom_eval" and not self.training):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")
        if self.fault == "real_oom":
            torch.empty(1 << 42, dtype=torch.uint8, device=x.device)  # 4 TiB: more than any GPU has
        if self.fault == "nan":
            return out * float("nan")
        if self.fault == "slow":
            busy_wait(0.02)  # a mode 20 ms of CPU a step slower than fp32, for real (the CPU clock is CPU time)
        return out


class InfLoss:
    """Cross-entropy that turns infinite under bfloat16 autocast after ``after`` calls."""

    def __init__(self, after):
        self.after, self.calls = after, 0

    def __call__(self, out, y):
        loss = nn.functional.cross_entropy(out, y)
        if in_bf16(out.device.type):
            self.calls += 1
            if self.calls > self.after:
                return loss * float("inf")
        return loss


def tiny(name="tiny", model=None, loss=None, data=None, **changes):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = (x[:, 0] > 0).long()
    w = Workload(
        name=name,
        model_factory=model or (lambda: nn.Linear(8, 2)),
        data=data if data is not None else (x, y, x[:32], y[:32]),
        loss_fn=loss or nn.CrossEntropyLoss(),
        optimizer_factory=lambda p: torch.optim.SGD(p, lr=0.1),
        batch_size=16,
    )
    return w.with_options(**changes) if changes else w
'''

GATED_TEST = (
    HELPERS
    + """

@pytest.mark.amp_regression(modes=["amp_bf16"], **FAST)
def test_gated(ampgate):
    ampgate.run(tiny())
"""
)


@pytest.fixture(autouse=True)
def _quiet_and_isolated(monkeypatch, tmp_path):
    """One intra-op thread: on a loaded 2-core CI box OpenMP spin-waiting makes a tiny step take
    50 ms instead of 0.5 ms.  A private device-lock directory keeps other sessions' gated tests
    from queueing with ours."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTEST_AMPGATE_LOCK_DIR", str(tmp_path / "locks"))
    yield
    torch.set_num_threads(threads)


def _output(result) -> str:
    return result.stdout.str() + "\n" + result.stderr.str()


INTERNAL_FRAME = re.compile(r"pytest_ampgate[/\\]\w+\.py:\d+")


def _assert_clean(result) -> str:
    """No traceback at all, and in particular no frame from inside the plugin."""
    out = _output(result)
    assert "Traceback" not in out and "INTERNALERROR" not in out, out
    assert not INTERNAL_FRAME.search(out), out
    return out


def _snapshot(root: Path) -> dict:
    """Every file under ``root`` with its bytes (directories as None)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


# --------------------------------------------------------------------------------------------------
# 1. Bad baseline files: a clear error naming the file, the problem and the fix; bytes unchanged.
# --------------------------------------------------------------------------------------------------

ENV = "cpu|somewhere|torch2"


def _doc(entry_change=None, **top) -> bytes:
    entry = {
        "environment": {"device_name": "somewhere"},
        "recorded_at": "2026-01-01T00:00:00+00:00",
        "settings": {},
        "modes": {"fp32": {"accuracy": 0.8}, "amp_bf16": {"accuracy": 0.8, "speedup": 1.5}},
    }
    if entry_change:
        entry_change(entry)
    doc = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "tests": {GATED_ID: {ENV: entry}}}
    doc.update(top)
    return json.dumps(doc, indent=2).encode()


BAD_BASELINES = {
    "empty": (b"", "is empty"),
    "whitespace": (b"  \n\n", "is empty"),
    "truncated": (_doc()[:70], "is not valid JSON"),
    "yaml_not_json": (b"schema: pytest-ampgate-baselines\ntests: {}\n", "is not valid JSON"),
    "binary": (b"\x80\x81\xfe\xff", "is not UTF-8 text"),
    "merge_conflict": (b"<<<<<<< HEAD\n{}\n=======\n{}\n>>>>>>> other\n", "git merge conflict markers"),
    "top_level_list": (b"[]", "top level must be a JSON object, got list"),
    "unknown_schema": (_doc(schema="pytest-regressions"), "has schema 'pytest-regressions', expected 'pytest-ampgate-baselines'"),
    "future_version": (_doc(schema_version=SCHEMA_VERSION + 98), f"written by a newer pytest-ampgate (schema {SCHEMA_VERSION + 98}"),
    "version_string": (_doc(schema_version="1"), "'schema_version' must be an integer, got '1' (str)"),
    "missing_tests": (json.dumps({"schema": SCHEMA, "schema_version": 1}).encode(), "has no 'tests' key"),
    "tests_list": (_doc(tests=[]), "'tests' must be a JSON object, got [] (list)"),
    "entry_missing_modes": (_doc(lambda e: e.pop("modes")), "is missing required key(s) 'modes'"),
    "accuracy_string": (
        _doc(lambda e: e["modes"]["fp32"].update(accuracy="high")),
        "['modes']['fp32']['accuracy'] must be a number or null, got 'high' (str)",
    ),
    "nan_literal": (_doc().replace(b"1.5", b"NaN"), "non-standard JSON constant NaN"),
    "duplicate_key": (b'{"schema": "pytest-ampgate-baselines", "schema": "x"}', "duplicate key 'schema'"),
}


def _write_bad(pytester, content: bytes) -> Path:
    pytester.makepyfile(**{GATED_FILE[:-3]: GATED_TEST})
    path = pytester.path / BASELINE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("content, problem", list(BAD_BASELINES.values()), ids=list(BAD_BASELINES))
def test_bad_baseline_check_and_update_name_file_problem_and_fix(pytester, content, problem):
    path = _write_bad(pytester, content)
    before = _snapshot(pytester.path / "baselines")
    shown = str(BASELINE)
    if "newer" in problem:
        fixes = ["upgrade pytest-ampgate or restore the file from git"]
    elif "tests[" in problem or "['modes']" in problem or "missing required" in problem:  # one entry at fault
        fixes = ["correct it, restore the file from version control, or re-record with pytest --ampgate --ampgate-update"]
    else:
        fixes = [
            f"Restore it from version control (git checkout -- {shown}) or delete it and re-record with pytest --ampgate --ampgate-update"
        ]

    check = pytester.runpytest(*CPU)
    check.assert_outcomes(failed=1)
    out = _assert_clean(check)
    assert f"BaselineError: {shown}: " in out and problem in out and all(f in out for f in fixes), out
    assert f"FAILED {GATED_ID} - BaselineError: " in out

    update = pytester.runpytest(*UPDATE)
    update.assert_outcomes(failed=1)
    assert update.ret == pytest.ExitCode.TESTS_FAILED
    out = _assert_clean(update)
    assert f"BaselineError: refusing to update baselines: {shown}: " in out and problem in out and all(f in out for f in fixes), out
    assert path.read_bytes() == content, "a bad baseline must never be overwritten"
    assert _snapshot(pytester.path / "baselines") == before, "no temp, lock or backup files left behind"


def test_baseline_path_that_is_a_directory(pytester):
    pytester.makepyfile(**{GATED_FILE[:-3]: GATED_TEST})
    (pytester.path / BASELINE).mkdir(parents=True)
    for args in (CPU, UPDATE):
        result = pytester.runpytest(*args)
        result.assert_outcomes(failed=1)
        out = _assert_clean(result)
        assert f"{BASELINE}: is a directory, not a baseline file" in out, out
    assert (pytester.path / BASELINE).is_dir() and not any((pytester.path / BASELINE).iterdir())


def test_baseline_corrupted_during_the_update_run_is_refused_at_session_end(pytester):
    """The early check passed, then the file went bad before the session-end commit (another
    process, a bad merge): the commit refuses, says so in the summary, and the run fails."""
    pytester.makepyfile(
        **{
            GATED_FILE[:-3]: HELPERS
            + """

@pytest.mark.amp_regression(modes=["amp_bf16"], **FAST)
def test_gated(ampgate):
    ampgate.run(tiny())
    os.makedirs("baselines", exist_ok=True)
    with open(os.path.join("baselines", "test_gated.json"), "wb") as f:
        f.write(b'{"schema": "pytest-ampgate-baselines", "tests": {')
"""
        }
    )
    result = pytester.runpytest(*UPDATE)
    result.assert_outcomes(passed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    out = _assert_clean(result)
    assert f"baselines NOT fully written: refusing to update baselines: {BASELINE}: is not valid JSON" in out, out
    assert (pytester.path / BASELINE).read_bytes() == b'{"schema": "pytest-ampgate-baselines", "tests": {'


def test_baseline_directory_that_is_a_file(pytester):
    pytester.makepyfile(**{GATED_FILE[:-3]: GATED_TEST})
    pytester.path.joinpath("not_a_dir").write_text("x")
    for args in (CPU, UPDATE):  # a usage error at start-up (found by the reliability review), nothing measured
        result = pytester.runpytest(*args, "--ampgate-baseline-dir", "not_a_dir")
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        out = _assert_clean(result)
        assert "not_a_dir: is a file, not a directory" in out and "--ampgate-baseline-dir" in out, out
    assert pytester.path.joinpath("not_a_dir").read_text() == "x"


# --------------------------------------------------------------------------------------------------
# 2. Bad options, ini values and marker arguments: a usage error naming the key and what is allowed.
# --------------------------------------------------------------------------------------------------

VALID_MODES = "valid modes: fp32, tf32, amp_fp16, amp_bf16, fp16, bf16, fp16_master, O0, O1, O2, O3"

BAD_OPTIONS = {
    "device_gpu": (("--ampgate-device", "gpu"), "--ampgate-device must be 'cuda', 'cuda:N' or 'cpu', got 'gpu'"),
    "device_cuda_x": (("--ampgate-device", "cuda:x"), "got 'cuda:x'"),
    "device_cpu_1": (("--ampgate-device", "cpu:1"), "got 'cpu:1'"),
    "ini_device": (("-o", "ampgate_device=tpu"), "got 'tpu'"),
    "ini_speedup_word": (("-o", "ampgate_min_speedup=abc"), "ini option ampgate_min_speedup: min_speedup must be a number, got 'abc'"),
    "ini_speedup_zero": (("-o", "ampgate_min_speedup=0"), "ini option ampgate_min_speedup: min_speedup must be > 0, got 0.0"),
    "ini_speedup_nan": (("-o", "ampgate_min_speedup=nan"), "ini option ampgate_min_speedup: min_speedup must be a finite number"),
    "ini_tolerance_above_1": (
        ("-o", "ampgate_accuracy_tolerance=1.5"),
        "ini option ampgate_accuracy_tolerance: accuracy_tolerance must be <= 1, got 1.5",
    ),
    "ini_tolerance_negative": (("-o", "ampgate_speedup_tolerance=-0.1"), "speedup_tolerance must be >= 0, got -0.1"),
    "ini_rounds_zero": (("-o", "ampgate_rounds=0"), "ini option ampgate_rounds: rounds must be a whole number >= 1, got 0"),
    "ini_rounds_fraction": (("-o", "ampgate_rounds=2.5"), "rounds must be a whole number >= 1, got '2.5'"),
    "ini_unknown_mode": (
        ("-o", "ampgate_modes=amp_fp16 fp8"),
        f"ini option ampgate_modes: modes: unknown precision mode 'fp8'; {VALID_MODES}",
    ),
    "ini_apex_o2_twice": (
        ("-o", "ampgate_modes=O2 fp16_master"),
        "ini option ampgate_modes: modes names a mode twice: ['O2', 'fp16_master']",
    ),
    "ini_mode_twice": (("-o", "ampgate_modes=amp_fp16,O1"), "names a mode twice"),
    "ini_policy": (("-o", "ampgate_missing_baseline=maybe"), "missing_baseline must be one of warn, fail, ignore, got 'maybe'"),
    "ini_flag": (("-o", "ampgate_confirm=perhaps"), "confirm must be true or false, got 'perhaps'"),
    "ini_confidence_one": (("-o", "ampgate_confidence=1.5"), "confidence must be < 1, got 1.5"),
}


@pytest.mark.parametrize("args, message", list(BAD_OPTIONS.values()), ids=list(BAD_OPTIONS))
def test_bad_option_or_ini_value_is_a_usage_error(pytester, args, message):
    pytester.makepyfile(**{GATED_FILE[:-3]: GATED_TEST})
    result = pytester.runpytest("--ampgate", "-p", "no:cacheprovider", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    out = _assert_clean(result)
    assert "ERROR: " in result.stderr.str() and message in out, out
    assert not (pytester.path / "baselines").exists()


def test_bad_value_in_an_ini_file(pytester):
    pytester.makeini("[pytest]\nampgate_max_memory_ratio = lots\n")
    pytester.makepyfile(**{GATED_FILE[:-3]: GATED_TEST})
    result = pytester.runpytest(*CPU)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "ini option ampgate_max_memory_ratio: max_memory_ratio must be a number, got 'lots'" in _assert_clean(result)


MARKER_ON = f"marker amp_regression on {GATED_ID}"

BAD_MARKERS = {
    "unknown_mode": ('modes=["amp_fp16", "fp8"]', f"{MARKER_ON}: modes: unknown precision mode 'fp8'; {VALID_MODES}"),
    "mode_not_a_name": ("modes=[16]", "precision mode must be a name (str), got int 16"),
    "no_modes": ("modes=[]", f"{MARKER_ON}: modes must be a non-empty list of precision modes, got []"),
    "speedup_word": ('min_speedup="fast"', f"{MARKER_ON}: min_speedup must be a number, got 'fast'"),
    "speedup_negative": ("min_speedup=-1", f"{MARKER_ON}: min_speedup must be > 0, got -1"),
    "speedup_bool": ("min_speedup=True", f"{MARKER_ON}: min_speedup must be a finite number, got True"),
    "speedup_list": ("min_speedup=[1.2]", f"{MARKER_ON}: min_speedup must be a finite number, got [1.2]"),
    "tolerance_above_1": ("accuracy_tolerance=2", f"{MARKER_ON}: accuracy_tolerance must be <= 1, got 2"),
    "memory_ratio_zero": ("max_memory_ratio=0", f"{MARKER_ON}: max_memory_ratio must be > 0, got 0"),
    "rounds_float": ("rounds=2.0", f"{MARKER_ON}: rounds must be a whole number >= 1, got 2.0"),
    "unknown_setting": ("min_speed=1.2", f"{MARKER_ON}: unknown setting min_speed; valid: modes, min_speedup"),
    "positional": ("1.2", f"{MARKER_ON}: takes keyword arguments only, got positional [1.2]"),
}


@pytest.mark.parametrize("marker, message", list(BAD_MARKERS.values()), ids=list(BAD_MARKERS))
def test_bad_marker_argument_is_a_usage_error(pytester, marker, message):
    pytester.makepyfile(
        **{
            GATED_FILE[:-3]: HELPERS
            + f"""

@pytest.mark.amp_regression({marker})
def test_gated(ampgate):
    ampgate.run(tiny())
"""
        }
    )
    result = pytester.runpytest(*CPU)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    out = _assert_clean(result)
    assert message in out, out


BAD_RUN_CALLS = {
    "run_unknown_mode": ('tiny(), modes=["fp8"]', f"ConfigError: run(modes=...): modes: unknown precision mode 'fp8'; {VALID_MODES}"),
    "run_unknown_builtin": ('"resnet50"', "WorkloadError: unknown workload 'resnet50'; built-in workloads: mnist_mlp, cifar_cnn"),
    "run_twice": ("tiny()); ampgate.run(tiny()", f"ConfigError: {GATED_ID}: one gated run per test (baselines are keyed by test id)"),
}


@pytest.mark.parametrize("call, message", list(BAD_RUN_CALLS.values()), ids=list(BAD_RUN_CALLS))
def test_bad_run_call_fails_the_test_with_the_message_alone(pytester, call, message):
    pytester.makepyfile(
        **{
            GATED_FILE[:-3]: HELPERS
            + f"""

@pytest.mark.amp_regression(modes=["amp_bf16"], **FAST)
def test_gated(ampgate):
    ampgate.run({call})
"""
        }
    )
    result = pytester.runpytest(*CPU)
    result.assert_outcomes(failed=1)
    assert message in _assert_clean(result)


def test_full_trace_brings_the_traceback_back(pytester):
    pytester.makepyfile(
        **{
            GATED_FILE[:-3]: HELPERS
            + """

@pytest.mark.amp_regression(modes=["amp_bf16"], **FAST)
def test_gated(ampgate):
    ampgate.run("resnet50")
"""
        }
    )
    result = pytester.runpytest(*CPU, "--full-trace")
    result.assert_outcomes(failed=1)
    assert INTERNAL_FRAME.search(_output(result)), "--full-trace shows where in the plugin it was raised"


# --------------------------------------------------------------------------------------------------
# 3. Bad data roots: DataError naming the directory or file, at the fixture's set-up.
# --------------------------------------------------------------------------------------------------

MNIST_FILES = {
    "train-images-idx3-ubyte": (2051, (12, 28, 28)),
    "train-labels-idx1-ubyte": (2049, (12,)),
    "t10k-images-idx3-ubyte": (2051, (6, 28, 28)),
    "t10k-labels-idx1-ubyte": (2049, (6,)),
}


def _idx(magic: int, dims: tuple) -> bytes:
    body = bytes(int(torch.tensor(dims).prod()))
    return magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims) + body


def _mnist_root(root: Path, change=None) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name, (magic, dims) in MNIST_FILES.items():
        (raw / name).write_bytes(_idx(magic, dims))
    if change:
        change(raw)
    return root


def _cifar_root(root: Path, keep: int | None = None) -> Path:
    from torchvision.datasets import CIFAR10

    base = root / CIFAR10.base_folder
    base.mkdir(parents=True)
    names = [n for n, _ in CIFAR10.train_list + CIFAR10.test_list] + [CIFAR10.meta["filename"]]
    for name in names[:keep]:
        (base / name).write_bytes(b"not the CIFAR-10 release")
    return root


def _truncate(raw: Path) -> None:
    p = raw / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:1000])


def _bad_magic(raw: Path) -> None:
    p = raw / "train-labels-idx1-ubyte"
    p.write_bytes((1234).to_bytes(4, "big") + p.read_bytes()[4:])


BAD_DATA_ROOTS = {
    "missing_root": ("mnist", lambda root: root / "does" / "not" / "exist", "data root {root}/does/not/exist does not exist: create it"),
    "root_is_a_file": (
        "mnist",
        lambda root: (root.mkdir(), root.joinpath("f").write_text("x"), root / "f")[-1],
        "data root {root}/f is not a directory",
    ),
    "mnist_truncated": (
        "mnist",
        lambda root: _mnist_root(root, _truncate),
        "MNIST file {root}/MNIST/raw/train-images-idx3-ubyte is truncated",
    ),
    "mnist_bad_magic": (
        "mnist",
        lambda root: _mnist_root(root, _bad_magic),
        "MNIST file {root}/MNIST/raw/train-labels-idx1-ubyte is not an idx file of the expected kind: magic number 1234, expected 2049",
    ),
    "mnist_incomplete": (
        "mnist",
        lambda root: _mnist_root(root, lambda raw: (raw / "t10k-labels-idx1-ubyte").unlink()),
        "MNIST under {root}/MNIST/raw is incomplete: t10k-labels-idx1-ubyte missing",
    ),
    "mnist_gzipped": (
        "mnist",
        lambda root: _mnist_root(root, lambda raw: [p.rename(p.with_name(p.name + ".gz")) for p in list(raw.iterdir())]),
        "MNIST under {root}/MNIST/raw holds only the compressed train-images-idx3-ubyte.gz",
    ),
    "cifar_corrupt": (
        "cifar",
        lambda root: _cifar_root(root),
        "CIFAR-10 file {root}/cifar-10-batches-py/data_batch_1 is corrupt or truncated",
    ),
    "cifar_incomplete": ("cifar", lambda root: _cifar_root(root, keep=3), "CIFAR-10 under {root}/cifar-10-batches-py is incomplete"),
}


@pytest.mark.parametrize("which, make, message", list(BAD_DATA_ROOTS.values()), ids=list(BAD_DATA_ROOTS))
def test_bad_data_root_is_a_data_error_naming_the_file(pytester, tmp_path, which, make, message):
    root = tmp_path / "data"
    target = make(root)
    before = _snapshot(tmp_path / "data") if (tmp_path / "data").exists() else {}
    pytester.makepyfile(
        **{
            GATED_FILE[:-3]: HELPERS
            + f"""

@pytest.mark.amp_regression(modes=["amp_bf16"], **FAST)
def test_gated(ampgate_{which}):
    pass
"""
        }
    )
    result = pytester.runpytest(*CPU, "--ampgate-data-root", str(target))
    result.assert_outcomes(errors=1)
    out = _assert_clean(result)
    assert "DataError: " + message.format(root=root) in out, out
    assert (_snapshot(tmp_path / "data") if (tmp_path / "data").exists() else {}) == before, "data files untouched"


def test_bad_data_root_from_the_ini_file(pytester, tmp_path):
    pytester.makeini(f"[pytest]\nampgate_data_root = {tmp_path / 'nowhere'}\n")
    pytester.makepyfile(
        **{
            GATED_FILE[:-3]: HELPERS
            + """

@pytest.mark.amp_regression(modes=["amp_bf16"], **FAST)
def test_gated(ampgate_mnist):
    pass
"""
        }
    )
    result = pytester.runpytest(*CPU)
    result.assert_outcomes(errors=1)
    assert f"DataError: data root {tmp_path / 'nowhere'} does not exist" in _assert_clean(result)


# --------------------------------------------------------------------------------------------------
# 4. A user workload that does not fit together: the user's error, said as such.
# --------------------------------------------------------------------------------------------------

USER_FAULT = "(the workload this test built is at fault, not pytest-ampgate: fix its model, data or loss)"

BAD_WORKLOADS = {
    "model_shape": (
        'tiny("w", model=lambda: nn.Linear(9, 2))',
        "workload 'w': the model rejected a batch from its data (input shape (16, 8), torch.float32): RuntimeError: ",
    ),
    "model_dtype": (
        'tiny("w", model=lambda: nn.Linear(8, 2).double())',
        "workload 'w': the model rejected a batch from its data (input shape (16, 8), torch.float32): RuntimeError: ",
    ),
    "loss_vs_targets": (
        'tiny("w", loss=nn.MSELoss())',
        "workload 'w': the loss rejected the model's output (shape (16, 2), torch.float32) with targets (shape (16,), torch.int64)",
    ),
    "too_few_classes": (
        'tiny("w", data=(torch.randn(64, 8), torch.full((64,), 5), torch.randn(8, 8), torch.full((8,), 5)))',
        "workload 'w': the loss rejected the model's output (shape (16, 2), torch.float32) with targets (shape (16,), torch.int64): IndexError: Target 5 is out of bounds",
    ),
    "loss_not_scalar": (
        'tiny("w", loss=nn.CrossEntropyLoss(reduction="none"))',
        "workload 'w': the loss must be a scalar tensor, got (16,)",
    ),
    "batch_larger_than_data": ('tiny("w", batch_size=1000)', "workload 'w': batch_size 1000 is larger than its training set (64 samples)"),
    "data_three_items": (
        'tiny("w", data=(torch.randn(8, 8), torch.zeros(8).long(), torch.randn(8, 8)))',
        "workload 'w': data as a tuple must be (train_x, train_y, test_x, test_y), got 3 items",
    ),
    "float_labels": (
        'tiny("w", data=(torch.randn(64, 8), torch.rand(64), torch.randn(8, 8), torch.rand(8)))',
        "workload 'w': the loss rejected the model's output (shape (16, 2), torch.float32) with targets (shape (16,), torch.float32)",
    ),
    "length_mismatch": (
        'tiny("w", data=(torch.randn(64, 8), torch.zeros(32).long(), torch.randn(8, 8), torch.zeros(8).long()))',
        "dataset 'w': ",
    ),
    "data_callable_wrong_type": (
        'tiny("w", data=lambda **kw: [1, 2])',
        "workload 'w': its data callable returned list, expected a DeviceDataset",
    ),
}


@pytest.mark.parametrize("workload, message", list(BAD_WORKLOADS.values()), ids=list(BAD_WORKLOADS))
def test_workload_misfit_is_the_users_error(pytester, workload, message):
    pytester.makepyfile(
        **{
            GATED_FILE[:-3]: HELPERS
            + f"""

@pytest.mark.amp_regression(modes=["amp_bf16"], **FAST)
def test_gated(ampgate):
    ampgate.run({workload})
"""
        }
    )
    result = pytester.runpytest(*CPU)
    result.assert_outcomes(failed=1)
    out = _assert_clean(result)
    assert "WorkloadError: " + message in out and USER_FAULT in out, out
    assert f"FAILED {GATED_ID} - WorkloadError: " in out


# --------------------------------------------------------------------------------------------------
# 5. Faults in one mode: that check fails with the reason; the other modes are still measured;
#    the next test in the same session runs clean.
# --------------------------------------------------------------------------------------------------

FAULT_TEST = (
    HELPERS
    + """
SETTINGS = dict(modes=["amp_fp16", "amp_bf16"], **FAST)


@pytest.mark.amp_regression(**SETTINGS)
def test_faulty(ampgate):
    result = ampgate.run(tiny("faulty", {args}))
    for healthy in ("fp32", "amp_fp16"):  # measured in full despite the fault in amp_bf16
        m = result.mode(healthy)
        assert m.ok and len(m.step_times_s) == 2 and m.accuracy is not None and m.first_nonfinite_step is None, healthy
    print("HEALTHY MODES MEASURED")


@pytest.mark.amp_regression(**SETTINGS)
def test_next(ampgate):
    result = ampgate.run(tiny("next", model=lambda: Faulty("")))
    assert all(result.mode(m).ok for m in ("fp32", "amp_fp16", "amp_bf16"))
"""
)

FAULTS = {
    "oom_at_setup": (
        'model=lambda: Faulty("oom")',
        "amp_bf16 failed in set-up: out of memory: CUDA out of memory. Tried to allocate 20.00 GiB (simulated) FAILED",
    ),
    "oom_in_timed_rounds": ('model=lambda: Faulty("oom", after=2)', "amp_bf16 failed in timed round 1: out of memory: CUDA out of memory."),
    "oom_in_evaluation": ('model=lambda: Faulty("oom_eval")', "amp_bf16 failed in evaluation: out of memory: CUDA out of memory."),
    "nan_from_the_start": (
        'model=lambda: Faulty("nan")',
        "amp_bf16 loss non-finite (nan) first at step 0 of 8 (8 non-finite steps) FAILED",
    ),
    "inf_from_step_3": ("loss=InfLoss(after=3)", "amp_bf16 loss non-finite (inf) first at step 3 of 8 (5 non-finite steps) FAILED"),
}


@pytest.mark.parametrize("args, message", list(FAULTS.values()), ids=list(FAULTS))
def test_fault_in_one_mode_fails_that_check_and_the_rest_is_measured(pytester, args, message):
    pytester.makepyfile(**{GATED_FILE[:-3]: FAULT_TEST.replace("{args}", args)})
    result = pytester.runpytest(*CPU, "-s")
    result.assert_outcomes(failed=1, passed=1)
    out = _assert_clean(result)
    assert "HEALTHY MODES MEASURED" in out and "AssertionError" not in out, out
    assert "FAILED test_gated.py::test_faulty - AMP REGRESSION" in out
    assert message in out, out
    assert "fp32 loss finite at all" in out and "amp_fp16 loss finite at all" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("test_gated.py::test_faulty ")]
    assert [r[1] for r in rows] == ["fp32", "amp_fp16", "amp_bf16"] and rows[-1][-1] == "FAIL", rows


def test_a_faulty_mode_is_never_recorded_as_a_baseline(pytester):
    pytester.makepyfile(**{GATED_FILE[:-3]: FAULT_TEST.replace("{args}", 'model=lambda: Faulty("nan")')})
    result = pytester.runpytest(*UPDATE)
    result.assert_outcomes(failed=1, passed=1)
    out = _assert_clean(result)
    assert "baseline NOT recorded for test_gated.py::test_faulty: it has failing checks" in out
    stored = json.loads((pytester.path / BASELINE).read_text())["tests"]
    assert list(stored) == ["test_gated.py::test_next"], "only the healthy test is recorded"


# --------------------------------------------------------------------------------------------------
# 6. A busy or throttled GPU: a would-be timing failure is INCONCLUSIVE with the reason.
# --------------------------------------------------------------------------------------------------

SLOW_TEST = (
    HELPERS
    + """

@pytest.mark.amp_regression(modes=["amp_bf16"], check_speed=True, min_speedup=1.2, rounds=6, steps_per_block=2, warmup_steps=1, missing_baseline="ignore")
def test_gated(ampgate):
    ampgate.run(tiny("slow", model=lambda: Faulty("slow")))
"""
)


BUSY = {
    "other_processes": (
        NoiseReport(available=True, other_processes=(GpuProcess(4242, 2**30, "python train.py"),)),
        "but the GPU was busy: before timing: GPU shared with 1 other process (pids 4242)",
    ),
    "thermal_throttling": (
        NoiseReport(available=True, throttle_reasons=("hw_thermal_slowdown",)),
        "but the GPU was busy: before timing: clocks held back by hw_thermal_slowdown",
    ),
}


@pytest.mark.parametrize("noise, because", list(BUSY.values()), ids=list(BUSY))
def test_busy_gpu_turns_a_timing_failure_into_inconclusive(pytester, monkeypatch, noise, because):
    """NVML's view is what is simulated (no GPU here); the slow mode and its timing are real."""
    from pytest_ampgate import gpu_noise

    pytester.makepyfile(**{GATED_FILE[:-3]: SLOW_TEST})
    control = pytester.runpytest(*CPU)  # a quiet device: the slow mode really fails
    control.assert_outcomes(failed=1)
    assert re.search(r"amp_bf16 speedup 0\.\d\dx .*< floor 1\.20x .*confirmed by a fresh run", _output(control))

    monkeypatch.setattr(gpu_noise, "noise_report", lambda device="cuda": noise)
    busy = pytester.runpytest(*CPU, "-rP")
    busy.assert_outcomes(passed=1)
    out = _assert_clean(busy)
    assert "AMP GATE INCONCLUSIVE" in out and because in out, out
    assert f"INCONCLUSIVE {GATED_ID}: amp_bf16 speedup" in out

    strict = pytester.runpytest(*CPU, "--ampgate-strict")
    strict.assert_outcomes(failed=1)
    assert because in _output(strict)


# --------------------------------------------------------------------------------------------------
# 7. No bfloat16 on this device: the bf16 modes are skipped with the reason, the rest still gated.
# --------------------------------------------------------------------------------------------------


def test_device_without_bf16_skips_the_bf16_modes(pytester, monkeypatch):
    from pytest_ampgate import modes

    real = modes._cpu_supports
    reason = "this CPU has no bfloat16 (simulated)"
    monkeypatch.setattr(modes, "_cpu_supports", lambda dtype, autocast: reason if dtype == torch.bfloat16 else real(dtype, autocast))
    pytester.makepyfile(
        **{
            GATED_FILE[:-3]: HELPERS
            + """

@pytest.mark.amp_regression(modes=["amp_fp16", "amp_bf16", "bf16"], **FAST)
def test_gated(ampgate):
    result = ampgate.run(tiny())
    assert result.mode("amp_fp16").ok and result.mode("amp_fp16").accuracy is not None
    assert not result.mode("amp_bf16").supported and not result.mode("bf16").supported
"""
        }
    )
    result = pytester.runpytest(*CPU, "-rA")
    result.assert_outcomes(passed=1)
    out = _assert_clean(result)
    assert f"amp_bf16 not run: {reason} [skipped]" in out and f"bf16 not run: {reason} [skipped]" in out, out
    assert re.search(rf"{re.escape(GATED_ID)}\s+amp_bf16\s.*unsupported", out), out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_without_bf16_skips_the_bf16_modes(pytester, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    pytester.makepyfile(
        **{
            GATED_FILE[:-3]: HELPERS
            + """

@pytest.mark.amp_regression(modes=["amp_fp16", "amp_bf16"], **FAST)
def test_gated(ampgate):
    result = ampgate.run(tiny())
    assert result.mode("amp_fp16").ok and not result.mode("amp_bf16").supported
"""
        }
    )
    result = pytester.runpytest("--ampgate", "--ampgate-device", "cuda", "-p", "no:cacheprovider", "-rA")
    result.assert_outcomes(passed=1)
    assert "has no native bfloat16 support; it needs 8.0+ (Ampere or newer) [skipped]" in _assert_clean(result)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_cuda_out_of_memory_reports_memory_and_leaves_the_gpu_clean(pytester):
    pytester.makepyfile(**{GATED_FILE[:-3]: FAULT_TEST.replace("{args}", 'model=lambda: Faulty("real_oom")')})
    x = torch.ones(64, 64, device="cuda", requires_grad=True)  # cuBLAS keeps a workspace per handle: make it now
    for dtype in (torch.float16, torch.bfloat16):
        with torch.autocast("cuda", dtype=dtype):
            (x @ x).float().sum().backward()
    del x
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    result = pytester.runpytest("--ampgate", "--ampgate-device", "cuda", "-p", "no:cacheprovider", "-s")
    result.assert_outcomes(failed=1, passed=1)
    out = _assert_clean(result)
    assert "HEALTHY MODES MEASURED" in out
    assert re.search(r"amp_bf16 failed in [\w -]+: out of memory: .*\(allocated \d+ MiB, peak \d+ MiB, free \d+ of \d+ MiB\)", out), out
    import gc

    gc.collect()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - before < 16 * 2**20, "the OOM left tensors behind on the GPU"


# --------------------------------------------------------------------------------------------------
# 8. Paths: test ids with path-like characters, symlinks, files outside the rootdir.
# --------------------------------------------------------------------------------------------------


def test_path_like_test_ids_stay_inside_the_baseline_directory(pytester, tmp_path):
    sub = pytester.path / "a b" / "c..d"
    sub.mkdir(parents=True)
    (sub / "test_odd.py").write_text(
        HELPERS
        + """

@pytest.mark.amp_regression(modes=["amp_bf16"], **FAST)
@pytest.mark.parametrize("case", ["../../../../escaped", "/etc/passwd", "..\\\\..\\\\win", "nul:"])
def test_odd(ampgate, case):
    ampgate.run(tiny())
"""
    )
    outside_before = _snapshot(pytester.path.parent)
    result = pytester.runpytest(*UPDATE)
    result.assert_outcomes(passed=4)
    _assert_clean(result)
    written = sorted(str(p.relative_to(pytester.path)) for p in (pytester.path / "baselines").rglob("*") if p.is_file())
    assert written == [os.path.join("baselines", "a_b", "c..d", "test_odd.json")], written
    stored = json.loads((pytester.path / written[0]).read_text())["tests"]
    assert len(stored) == 4 and all(t.startswith("a b/c..d/test_odd.py::test_odd[") for t in stored)
    new = set(_snapshot(pytester.path.parent)) - set(outside_before)
    ours = (pytester.path.name + os.sep, os.path.join(tmp_path.name, "locks"))  # the run's own dirs
    assert all(n.startswith(ours) for n in new), sorted(new)
    assert not [n for n in new if re.search(r"escaped|passwd|win|nul", n)], sorted(new)
    again = pytester.runpytest(*CPU)  # and they are found again by the check run
    again.assert_outcomes(passed=4)
    assert "no baseline" not in _output(again)


def test_symlink_out_of_the_baseline_directory_is_refused(pytester, tmp_path):
    pytester.makepyfile(**{GATED_FILE[:-3]: GATED_TEST})
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (pytester.path / "baselines").mkdir()
    (pytester.path / BASELINE).symlink_to(outside / "stolen.json")
    for args in (CPU, UPDATE):
        result = pytester.runpytest(*args)
        result.assert_outcomes(failed=1)
        out = _assert_clean(result)
        assert "outside the baseline directory" in out and "Remove the symlink or choose another baseline directory" in out, out
    assert list(outside.iterdir()) == []


def test_gated_test_outside_the_rootdir_is_a_usage_error(pytester):
    (pytester.path / "root").mkdir()
    (pytester.path / "other").mkdir()
    (pytester.path / "other" / "test_far.py").write_text(GATED_TEST)
    result = pytester.runpytest(*UPDATE, "--rootdir", str(pytester.path / "root"), str(pytester.path / "other" / "test_far.py"))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    out = _assert_clean(result)
    assert "lies outside the rootdir" in out and "run pytest with a --rootdir that contains it" in out, out
    assert not any(pytester.path.rglob("*.json"))


# --------------------------------------------------------------------------------------------------
# 9. Interrupted and concurrent update sessions (real processes).
# --------------------------------------------------------------------------------------------------

RACE_TESTS = (
    HELPERS
    + """

@pytest.mark.amp_regression(modes=["amp_bf16"], **FAST)
def test_zero(ampgate):
    ampgate.run(tiny())


@pytest.mark.amp_regression(modes=["amp_bf16"], **FAST)
def test_one(ampgate):
    ampgate.run(tiny())


@pytest.mark.amp_regression(modes=["amp_bf16"], **FAST)
def test_two(ampgate):
    if os.environ.get("AMPGATE_FAULT") == "during-test":
        open(os.environ["AMPGATE_FAULT_MARK"], "w").close()
        time.sleep(300)
    ampgate.run(tiny())
"""
)

FAULT_CONFTEST = '''
"""Fault points inside the baseline writer of this child session, chosen by AMPGATE_FAULT."""
import json
import os
import time

import pytest

from pytest_ampgate import baselines, file_safety

FAULT = os.environ.get("AMPGATE_FAULT", "")
MARK = os.environ.get("AMPGATE_FAULT_MARK", "")


def stall():
    with open(MARK, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(300)  # until the parent kills or interrupts us


class FaultyOs:
    """``os`` as baselines.py sees it, with the fault points; everything else is the real ``os``."""

    def __init__(self):
        self.tmp_fds = set()

    def __getattr__(self, name):
        return getattr(os, name)

    def open(self, path, flags, mode=0o777):
        fd = os.open(path, flags, mode)
        if str(path).endswith(".tmp"):
            self.tmp_fds.add(fd)
        return fd

    def write(self, fd, data):
        if FAULT == "mid-write" and fd in self.tmp_fds:
            os.write(fd, bytes(data[: len(data) // 2]))
            os.fsync(fd)
            stall()
        return os.write(fd, data)

    def replace(self, src, dst):
        if FAULT == "before-replace":
            stall()
        os.replace(src, dst)
        if FAULT == "after-replace":
            stall()


if FAULT:
    baselines.os = FaultyOs()
    file_safety.os = baselines.os  # the atomic write lives there (one write policy for every file)

if os.environ.get("AMPGATE_RACE"):
    real_write = baselines._write_atomic

    def slow_write(target, data):
        """Hold the file long enough that an unlocked second writer would lose our entries."""
        start = time.time()
        time.sleep(1.0)
        real_write(target, data)
        with open(os.environ["AMPGATE_RACE"] + ".log", "a") as f:
            f.write(json.dumps([os.getpid(), start, time.time()]) + "\\n")

    baselines._write_atomic = slow_write

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(session):
        """Meet the other session here, so both commit at the same moment."""
        me = os.environ["AMPGATE_RACE"] + "." + str(os.getpid())
        open(me, "w").close()
        deadline = time.time() + 240
        folder, stem = os.path.split(os.environ["AMPGATE_RACE"])
        while time.time() < deadline:
            if sum(n.startswith(stem + ".") and not n.endswith(".log") for n in os.listdir(folder)) >= 2:
                return
            time.sleep(0.05)
'''


POSIX = pytest.mark.skipif(sys.platform == "win32", reason="kills and interrupts processes with POSIX signals")


def _child_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_ADDOPTS", "PYTEST_XDIST", "PYTEST_CURRENT"))}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


CHILD_PLUGINS_OFF = ("-p", "no:hypothesispytest", "-p", "no:xdist", "-p", "no:benchmark")  # a second less each


def _spawn(cwd: Path, *args: str, **env) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", *UPDATE, *CHILD_PLUGINS_OFF, "-q", *args],
        cwd=cwd,
        env=_child_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # our signals reach the child only, never this test session
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # Ctrl-C works even if we ignore it
    )


def _session_dir(base: Path, name: str, old: bytes | None) -> Path:
    d = base / name
    (d / "baselines").mkdir(parents=True)
    (d / "pytest.ini").write_text("[pytest]\n")
    (d / "conftest.py").write_text(FAULT_CONFTEST)
    (d / "test_race.py").write_text(RACE_TESTS)
    if old is not None:
        (d / "baselines" / "test_race.json").write_bytes(old)
    return d


@pytest.fixture(scope="module")
def old_baseline(tmp_path_factory) -> bytes:
    """A committed baseline holding test_zero only: the 'old' file every interruption starts from."""
    from pytest_ampgate.baselines import Baseline, ModeBaseline
    from pytest_ampgate.records import utc_timestamp

    store = BaselineStore(tmp_path_factory.mktemp("old"))
    store.stage(
        Baseline(
            "test_race.py::test_zero",
            "cpu|elsewhere|torch2",
            {"device_name": "elsewhere"},
            utc_timestamp(),
            {},
            {"fp32": ModeBaseline(accuracy=0.8)},
        )
    )
    (path,) = store.commit()
    return path.read_bytes()


INTERRUPTIONS = {
    # name: (fault point, signal, what the file must be afterwards, what a Ctrl-C'd session says)
    "sigkill_mid_write": ("mid-write", signal.SIGKILL, "old", None),
    "sigkill_before_rename": ("before-replace", signal.SIGKILL, "old", None),
    "sigkill_after_rename": ("after-replace", signal.SIGKILL, "new", None),
    "ctrl_c_mid_write": (
        "mid-write",
        signal.SIGINT,
        "old",
        "baselines NOT fully written: interrupted while writing them; "
        "each baseline file is either unchanged or fully updated. Run pytest --ampgate --ampgate-update --ampgate-device cpu again",
    ),
    "ctrl_c_during_a_test": (
        "during-test",
        signal.SIGINT,
        "new",
        "the run was interrupted: baselines were recorded for the tests that finished only",
    ),
}


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, old_baseline):
    """Start every interrupted session at once (they share the torch import time), wait until each
    reaches its fault point, signal it, and collect (directory, exit code, output) by name."""
    base = tmp_path_factory.mktemp("interrupted")
    running = {}
    for name, (point, *_rest) in INTERRUPTIONS.items():
        d = _session_dir(base, name, old_baseline)
        tests = "test_one or test_two" if point == "during-test" else "test_one"
        running[name] = (
            d,
            _spawn(d, "-k", tests, AMPGATE_FAULT=point, AMPGATE_FAULT_MARK=str(d / "reached"), PYTEST_AMPGATE_LOCK_DIR=str(d / "locks")),
        )
    outcomes = {}
    deadline = time.monotonic() + 300
    pending = dict(running)
    while pending and time.monotonic() < deadline:
        for name, (d, proc) in list(pending.items()):
            if (d / "reached").exists():
                time.sleep(0.2)  # let the stall begin
                proc.send_signal(INTERRUPTIONS[name][1])
                del pending[name]
            elif proc.poll() is not None:
                del pending[name]
        time.sleep(0.05)
    for name, (d, proc) in running.items():
        try:
            out = proc.communicate(timeout=120)[0].decode(errors="replace")
        except subprocess.TimeoutExpired:
            proc.kill()
            out = proc.communicate()[0].decode(errors="replace") + "\n[killed: did not stop]"
        outcomes[name] = (d, proc.returncode, out, (d / "reached").exists())
    return outcomes


@POSIX
@pytest.mark.parametrize("name", list(INTERRUPTIONS))
def test_interrupted_update_leaves_the_old_or_the_new_file_whole(interrupted, old_baseline, name):
    d, returncode, out, reached = interrupted[name]
    point, sig, expect, says = INTERRUPTIONS[name]
    assert reached, f"the session never reached its fault point {point}:\n{out}"
    if sig == signal.SIGKILL:
        assert returncode == -signal.SIGKILL, out
    else:
        assert returncode == pytest.ExitCode.INTERRUPTED and says in out, out
        assert "Traceback" not in out and not INTERNAL_FRAME.search(out), out
    path = d / "baselines" / "test_race.json"
    data = path.read_bytes()
    if expect == "old":
        assert data == old_baseline, "the interrupted write must leave the old file, byte for byte"
    else:
        ids = sorted(json.loads(data)["tests"])
        assert ids == ["test_race.py::test_one", "test_race.py::test_zero"], ids
        assert json.loads(data)["tests"]["test_race.py::test_zero"] == json.loads(old_baseline)["tests"]["test_race.py::test_zero"]
    store = BaselineStore(d / "baselines")
    assert store.environments("test_race.py::test_zero"), "the file validates and still holds test_zero"
    if sig == signal.SIGINT:  # Python ran its clean-up: no temp file left behind
        assert not list((d / "baselines").glob(".*.tmp")), list((d / "baselines").iterdir())


@POSIX
def test_next_update_after_a_kill_completes_and_clears_the_debris(interrupted, pytester):
    d, _rc, _out, _reached = interrupted["sigkill_before_rename"]
    assert list((d / "baselines").glob(".test_race.json.*.tmp")), "the killed writer left its complete temp file"
    for name in ("test_race.py", "conftest.py", "pytest.ini"):
        shutil.copy(d / name, pytester.path / name)
    shutil.copytree(d / "baselines", pytester.path / "baselines")
    result = pytester.runpytest(*UPDATE, "-k", "test_one")
    result.assert_outcomes(passed=1, deselected=2)
    _assert_clean(result)
    left = sorted(p.name for p in (pytester.path / "baselines").iterdir())
    assert left == ["test_race.json"], left
    assert sorted(json.loads((pytester.path / "baselines" / "test_race.json").read_text())["tests"]) == [
        "test_race.py::test_one",
        "test_race.py::test_zero",
    ]


@POSIX
def test_two_concurrent_update_sessions_keep_both_sets_of_entries(tmp_path, old_baseline):
    d = _session_dir(tmp_path, "shared", old_baseline)
    race = str(tmp_path / "race")
    env = dict(AMPGATE_RACE=race, PYTEST_AMPGATE_LOCK_DIR=str(tmp_path / "locks"))
    first = _spawn(d, "-k", "test_one", **env)
    second = _spawn(d, "-k", "test_two", **env)
    outs = [p.communicate(timeout=400)[0].decode(errors="replace") for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, "\n\n".join(outs)
    doc = json.loads((d / "baselines" / "test_race.json").read_text())
    assert sorted(doc["tests"]) == ["test_race.py::test_one", "test_race.py::test_two", "test_race.py::test_zero"]
    writes = sorted(json.loads(line) for line in Path(race + ".log").read_text().splitlines())
    assert len(writes) == 2 and {w[0] for w in writes} == {first.pid, second.pid}
    spans = sorted((w[1], w[2]) for w in writes)  # stamped inside the lock, around the whole write
    assert spans[1][0] >= spans[0][1] - 0.05, f"the two writes overlapped: {spans}"
    assert not list((d / "baselines").glob(".*")), "no temp or lock files left"


# --------------------------------------------------------------------------------------------------
# 10. Nothing unsafe is loaded.
# --------------------------------------------------------------------------------------------------

PACKAGE = Path(pytest_ampgate.__file__).parent
UNSAFE_MODULES = {"pickle", "cPickle", "marshal", "shelve", "dill", "cloudpickle", "joblib", "yaml"}
UNSAFE_CALLS = {
    "pickle.load",
    "pickle.loads",
    "pickle.Unpickler",
    "marshal.load",
    "marshal.loads",
    "yaml.load",
    "yaml.unsafe_load",
    "shelve.open",
    "dill.load",
    "dill.loads",
    "eval",
    "exec",
    "numpy.load",
    "np.load",
}


def _unsafe_loads(source: str, where: str) -> list[str]:
    """Imports of deserialisers that run code, calls that do, and torch.load without weights_only=True."""
    found = []
    tree = ast.parse(source, where)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = {a.name.split(".")[0] for a in node.names}
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module.split(".")[0])
            found += [f"{where}:{node.lineno}: imports {n}" for n in sorted(names & UNSAFE_MODULES)]
        elif isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else ast.unparse(f) if isinstance(f, ast.Attribute) else ""
            if name in UNSAFE_CALLS:
                found.append(f"{where}:{node.lineno}: {name}()")
            if name == "load" or name.endswith("torch.load"):
                kw = {k.arg: k.value for k in node.keywords}
                if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                    found.append(f"{where}:{node.lineno}: {name}() without weights_only=True")
    return found


def test_the_unsafe_load_scan_finds_what_it_looks_for():
    planted = (
        "import pickle\nimport torch\ntorch.load('m.pt')\ntorch.load('m.pt', weights_only=False)\n"
        "torch.load('m.pt', weights_only=True)\npickle.loads(b'')\neval('1')\n"
    )
    assert _unsafe_loads(planted, "planted.py") == [
        "planted.py:1: imports pickle",
        "planted.py:3: torch.load() without weights_only=True",
        "planted.py:4: torch.load() without weights_only=True",
        "planted.py:6: pickle.loads()",
        "planted.py:7: eval()",
    ]


def test_package_source_loads_nothing_unsafe():
    files = sorted(PACKAGE.glob("*.py"))
    assert len(files) > 10
    found = [hit for path in files for hit in _unsafe_loads(path.read_text(encoding="utf-8"), path.name)]
    assert found == []


def test_baselines_are_strict_json(pytester):
    pytester.makepyfile(**{GATED_FILE[:-3]: GATED_TEST})
    pytester.runpytest(*UPDATE).assert_outcomes(passed=1)
    text = (pytester.path / BASELINE).read_text(encoding="utf-8")

    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    doc = json.loads(text, parse_constant=refuse)
    assert doc["schema"] == SCHEMA and GATED_ID in doc["tests"]


class _Sentinel:
    """Unpickling this creates a file: proof that someone ran code from a data file."""

    path = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _evil(path: Path) -> bytes:
    import pickle

    obj = _Sentinel()
    obj.path = str(path)
    return pickle.dumps(obj)


def test_malicious_pickles_in_a_data_root_are_never_run(pytester, tmp_path):
    from torchvision.datasets import CIFAR10

    sentinel = tmp_path / "PWNED"
    cifar = tmp_path / "cifar" / CIFAR10.base_folder
    cifar.mkdir(parents=True)
    for name in [n for n, _ in CIFAR10.train_list + CIFAR10.test_list] + [CIFAR10.meta["filename"]]:
        (cifar / name).write_bytes(_evil(sentinel))
    legacy = tmp_path / "mnist" / "MNIST" / "processed"
    legacy.mkdir(parents=True)
    for name in ("training.pt", "test.pt"):
        (legacy / name).write_bytes(_evil(sentinel))
    pytester.makepyfile(
        **{
            GATED_FILE[:-3]: HELPERS
            + """

@pytest.mark.amp_regression(modes=["amp_bf16"], **FAST)
def test_cifar(ampgate_cifar):
    pass


@pytest.mark.amp_regression(modes=["amp_bf16"], **FAST)
def test_mnist(ampgate_mnist):
    pass
"""
        }
    )
    result = pytester.runpytest(*CPU, "-k", "cifar", "--ampgate-data-root", str(tmp_path / "cifar"))
    result.assert_outcomes(errors=1, deselected=1)
    assert f"DataError: CIFAR-10 file {cifar / 'data_batch_1'} is corrupt or truncated" in _assert_clean(result)
    result = pytester.runpytest(*CPU, "-k", "mnist", "--ampgate-data-root", str(tmp_path / "mnist"), "-W", "ignore::UserWarning")
    result.assert_outcomes(errors=1, deselected=1)
    out = _assert_clean(result)
    assert f"DataError: MNIST's legacy cache {legacy} holds more than plain tensors, so torch.load(weights_only=True) refused it" in out, (
        out
    )
    assert "weights_only=False" not in out, "never advise the unsafe retry"
    assert not sentinel.exists(), "a data file's pickle ran code"


# --------------------------------------------------------------------------------------------------
# The count.
# --------------------------------------------------------------------------------------------------

CATALOGUE = {
    "bad baseline file": [*BAD_BASELINES, "is_a_directory", "corrupted_before_commit", "baseline_dir_is_a_file"],
    "bad option, ini value or marker": [*BAD_OPTIONS, "ini_file_value", *BAD_MARKERS, *BAD_RUN_CALLS],
    "bad data root": [*BAD_DATA_ROOTS, "ini_data_root", "malicious_cifar_pickle", "malicious_mnist_legacy_pickle"],
    "workload misfit": list(BAD_WORKLOADS),
    "fault in one mode": [*FAULTS, *BUSY, "no_bf16_cpu", "no_bf16_gpu", "real_cuda_oom"],
    "path": ["path_like_ids", "symlink_escape", "outside_rootdir"],
    "interruption or race": [*INTERRUPTIONS, "two_concurrent_sessions"],
}


def test_fault_catalogue_size(record_property):
    """How many bad inputs and faults this suite drives (reported in the README)."""
    total = sum(len(v) for v in CATALOGUE.values())
    names = [n for v in CATALOGUE.values() for n in v]
    assert len(set(names)) == len(names), "every case has its own name"
    record_property("ampgate_fault_cases", total)
    assert total >= 90, {k: len(v) for k, v in CATALOGUE.items()}
