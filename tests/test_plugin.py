"""The pytest face, through ``pytester``: options, marker, skips, the fail -> update -> pass cycle,
marker validation, ini vs marker margins, baseline files, stale entries and the summary table.

Every gated run here trains for real on the CPU (``--ampgate --ampgate-device cpu``), on a tiny
user workload (a 16-32-4 MLP on Gaussian blobs, learnable in a few steps) or the built-in MNIST MLP.
"""

import json
import os
import re
from pathlib import Path

import pytest
import torch

from pytest_ampgate.config import SETTINGS

CPU = ("--ampgate", "--ampgate-device", "cpu", "-p", "no:cacheprovider")
TINY = 'modes=["amp_bf16"], rounds=2, steps_per_block=4, warmup_steps=1'

USER_WORKLOAD = """
import os

import pytest
import torch
from torch import nn

from pytest_ampgate import Workload


def blobs(n, seed):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, 16, generator=torch.Generator().manual_seed(123)) * 3
    y = torch.randint(0, 4, (n,), generator=g)
    return centers[y] + torch.randn(n, 16, generator=g), y


def workload():
    # The planted regression: AMPGATE_TEST_LR=0 stops learning, so accuracy falls from ~1.0 to chance.
    lr = float(os.environ.get("AMPGATE_TEST_LR", "0.1"))
    train_x, train_y = blobs(512, 1)
    test_x, test_y = blobs(256, 2)
    return Workload(
        name="blobs",
        model_factory=lambda: nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)),
        data=(train_x, train_y, test_x, test_y),
        loss_fn=nn.CrossEntropyLoss(),
        optimizer_factory=lambda params: torch.optim.SGD(params, lr=lr),
        batch_size=32,
    )
"""


def user_tests(*bodies):
    return USER_WORKLOAD + "\n\n" + "\n\n".join(bodies)


def gated(name, marker=TINY):
    return f"@pytest.mark.amp_regression({marker})\ndef {name}(ampgate):\n    ampgate.run(workload())\n"


@pytest.fixture(scope="module", autouse=True)
def engine_imported():
    """Import, once and outside the runs, everything a gated run imports.

    pytester's in-process runs drop every module first imported during a run, and some of what
    torch imports lazily (triton's and numpy's C extensions, through torch._dynamo) aborts the
    interpreter when imported a second time.  One tiny measurement here pulls all of it in.
    """
    import importlib
    import pkgutil

    import pytest_ampgate
    from pytest_ampgate.measurement import MeasureConfig, measure
    from pytest_ampgate.workloads import mnist_mlp

    for info in pkgutil.iter_modules(pytest_ampgate.__path__):
        importlib.import_module(f"pytest_ampgate.{info.name}")
    tiny = mnist_mlp().with_options(batch_size=8, data_options={"n_train": 16, "n_test": 8})
    measure(tiny, ["amp_bf16", "amp_fp16"], device="cpu", config=MeasureConfig(warmup_steps=0, rounds=1, steps_per_block=1, memory_steps=0))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a busy 2-core machine: OpenMP threads spinning against each other turn 0.4 ms
    steps into 70 ms ones.  One thread keeps the runs fast; the training is the same."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def stored(pytester, module="test_user"):
    return json.loads((pytester.path / "baselines" / f"{module}.json").read_text())


# --- options and marker ----------------------------------------------------------------------


def test_help_lists_every_option_and_ini_setting(pytester):
    result = pytester.runpytest("--help")
    assert result.ret == 0
    out = result.stdout.str()
    assert "AMP regression gate (pytest-ampgate):" in out
    for flag in (
        "--ampgate ",
        "--ampgate-update",
        "--ampgate-prune",
        "--ampgate-device=",
        "--ampgate-baseline-dir=",
        "--ampgate-data-root=",
        "--ampgate-download",
        "--ampgate-strict",
    ):
        assert flag in out, flag
    for ini in ["device", "baseline_dir", "data_root", *SETTINGS]:
        assert re.search(rf"^  ampgate_{ini} \((string|float|int|bool|args)\):", out, re.M), ini  # typed


def test_markers_lists_amp_regression_with_its_settings(pytester):
    result = pytester.runpytest("--markers")
    line = [ln for ln in result.stdout.lines if ln.startswith("@pytest.mark.amp_regression")]
    assert len(line) == 1
    assert line[0].startswith("@pytest.mark.amp_regression(**settings): an AMP regression gate, run with --ampgate.")
    assert all(name in line[0] for name in SETTINGS)


def test_marker_is_registered_for_strict_markers(pytester):
    pytester.makepyfile("import pytest\n\n@pytest.mark.amp_regression(rounds=2)\ndef test_x():\n    pass\n")
    result = pytester.runpytest("--strict-markers", "-rs")
    result.assert_outcomes(skipped=1)


# --- skips -----------------------------------------------------------------------------------


def test_skipped_without_the_flag_for_marker_and_fixtures(pytester):
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.amp_regression(rounds=2)
        def test_marked():
            raise AssertionError("must not run without --ampgate")

        def test_fixture_only(ampgate_mnist):
            raise AssertionError("must not run without --ampgate")

        def test_plain():
            pass
        """
    )
    result = pytester.runpytest("-rs", "-W", "error")
    result.assert_outcomes(passed=1, skipped=2)
    reasons = [ln for ln in result.stdout.lines if ln.startswith("SKIPPED")]
    assert len(reasons) == 2 and all(ln.endswith(": AMP regression test: run it with pytest --ampgate") for ln in reasons)
    assert result.ret == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA, so the gate does not skip")
def test_skipped_without_cuda_naming_the_cpu_alternative(pytester):
    pytester.makepyfile(user_tests(gated("test_blobs")))
    result = pytester.runpytest("--ampgate", "-rs", "-W", "error", "-p", "no:cacheprovider")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(
        [
            "SKIPPED [[]1[]] *: no CUDA device available for the AMP gate (--ampgate-device cuda); "
            "run the numerical checks on the CPU with --ampgate --ampgate-device cpu"
        ]
    )
    assert result.ret == 0 and not (pytester.path / "baselines").exists()


# --- the whole cycle -------------------------------------------------------------------------


def test_missing_update_pass_regression_update_pass(pytester, monkeypatch):
    pytester.makepyfile(test_user=user_tests(gated("test_blobs")))
    monkeypatch.delenv("AMPGATE_TEST_LR", raising=False)
    path = pytester.path / "baselines" / "test_user.json"

    # 1. No baseline: the gate warns (INCONCLUSIVE) and says how to record one; the test passes.
    result = pytester.runpytest(*CPU, "-W", "error")
    result.assert_outcomes(passed=1, warnings=0)
    result.stdout.fnmatch_lines(
        [
            "INCONCLUSIVE test_user.py::test_blobs: amp_bf16 accuracy *: no baseline for cpu|* (none recorded for this test); "
            "record one with: pytest --ampgate --ampgate-update --ampgate-device cpu test_user.py::test_blobs",
        ]
    )
    assert not path.exists()

    # 2. Record it.
    result = pytester.runpytest(*CPU, "--ampgate-update", "-W", "error")
    result.assert_outcomes(passed=1, warnings=0)
    result.stdout.fnmatch_lines([f"baseline written: {path}"])
    entry = next(iter(stored(pytester)["tests"]["test_user.py::test_blobs"].values()))
    recorded = entry["modes"]["amp_bf16"]["accuracy"]
    assert recorded > 0.9 and entry["modes"]["fp32"]["accuracy"] > 0.9
    assert entry["settings"]["workload"] == "blobs" and entry["settings"]["config"]["rounds"] == 2

    # 3. Same code, same numbers: pass, compared with the baseline.
    result = pytester.runpytest(*CPU, "-rA", "-W", "error")
    result.assert_outcomes(passed=1, warnings=0)
    result.stdout.fnmatch_lines([f"  amp_bf16 accuracy {recorded:.3f} vs baseline {recorded:.3f} (tol 0.02) ok"])
    assert "INCONCLUSIVE" not in result.stdout.str()

    # 4. A planted regression (the learning rate set to 0): the test fails and explains itself.
    monkeypatch.setenv("AMPGATE_TEST_LR", "0")
    result = pytester.runpytest(*CPU)
    result.assert_outcomes(failed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    out = result.stdout.str()
    result.stdout.fnmatch_lines(
        [
            "FAILED test_user.py::test_blobs - AMP REGRESSION",
        ]
    )
    match = re.search(r"  amp_bf16 accuracy (\d\.\d{3}) vs baseline (\d\.\d{3}) \(tol 0\.02\) dropped below (\d\.\d{3}) FAILED", out)
    assert match, out
    measured, baseline, floor = map(float, match.groups())
    assert baseline == pytest.approx(recorded, abs=5e-4) and floor == pytest.approx(recorded - 0.02, abs=1e-3)
    assert measured < floor - 0.3  # chance level, far below the stored accuracy
    assert "accept a deliberate change with: pytest --ampgate --ampgate-update" in out
    assert out.count("AMP REGRESSION") == 2  # the failure and the short summary, not a repeated section

    # 5. Accept the deliberate change ...
    result = pytester.runpytest(*CPU, "--ampgate-update")
    result.assert_outcomes(passed=1)
    entry = next(iter(stored(pytester)["tests"]["test_user.py::test_blobs"].values()))
    assert entry["modes"]["amp_bf16"]["accuracy"] == pytest.approx(measured, abs=5e-4)

    # 6. ... and the regressed code now passes against its new baseline.
    result = pytester.runpytest(*CPU, "-rA")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"  amp_bf16 accuracy {measured:.3f} vs baseline {measured:.3f} (tol 0.02) ok"])


def test_update_does_not_record_a_failing_test(pytester):
    """A model whose loss is never finite fails even under --ampgate-update, and is not recorded."""
    pytester.makepyfile(
        test_nan="""
        import pytest
        import torch
        from torch import nn
        from pytest_ampgate import Workload

        class Blowup(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(8, 2)
            def forward(self, x):
                return self.fc(x) * float("inf")

        @pytest.mark.amp_regression(modes=["amp_bf16"], rounds=2, steps_per_block=2, warmup_steps=1)
        def test_nan(ampgate):
            x = torch.randn(64, 8)
            y = torch.randint(0, 2, (64,))
            ampgate.run(Workload("blowup", Blowup, (x, y, x, y), nn.CrossEntropyLoss(),
                                 lambda p: torch.optim.SGD(p, lr=0.1), batch_size=16))
        """
    )
    result = pytester.runpytest(*CPU, "--ampgate-update")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "FAILED test_nan.py::test_nan - WORKLOAD ERROR" in out
    assert re.search(r"fp32 loss non-finite \(nan\) first at step 0 of \d+", out), out
    assert "baseline NOT recorded: fix the failing checks" in out
    assert "baseline NOT recorded for test_nan.py::test_nan: it has failing checks" in out
    assert not (pytester.path / "baselines" / "test_nan.json").exists()


# --- marker validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, words",
    [
        ("min_speedp=1.3", "unknown setting min_speedp; valid: modes, min_speedup, speedup_tolerance"),
        ("min_speedup='fast'", "min_speedup must be a number, got 'fast'"),
        ("rounds=0", "rounds must be a whole number >= 1, got 0"),
        ("modes=['fp8']", "modes: unknown precision mode 'fp8'; valid modes: fp32, tf32, amp_fp16, amp_bf16"),
        ("1.3", "takes keyword arguments only, got positional [1.3]"),
        ("accuracy_tolerance=-0.1", "accuracy_tolerance must be >= 0, got -0.1"),
    ],
)
def test_bad_marker_arguments_are_a_usage_error(pytester, args, words):
    pytester.makepyfile(test_bad=f"import pytest\n\n@pytest.mark.amp_regression({args})\ndef test_x(ampgate):\n    pass\n")
    result = pytester.runpytest(*CPU)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [ln for ln in result.stderr.lines if ln.startswith("ERROR: ")]
    assert len(errors) == 1 and errors[0].startswith(f"ERROR: marker amp_regression on test_bad.py::test_x: {words}"), errors
    assert "Traceback" not in result.stderr.str() + result.stdout.str()
    assert not (pytester.path / "baselines").exists()


def test_bad_marker_is_reported_without_ampgate_too(pytester):
    """A typo in a margin must not wait for the GPU job to surface."""
    pytester.makepyfile(test_bad="import pytest\n\n@pytest.mark.amp_regression(min_speedp=1.3)\ndef test_x():\n    pass\n")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert result.stderr.lines[0].startswith("ERROR: marker amp_regression on test_bad.py::test_x: unknown setting min_speedp; valid: ")


def test_bad_ini_value_names_the_ini_key(pytester):
    pytester.makeini("[pytest]\nampgate_min_speedup = fast\n")
    pytester.makepyfile(test_bad="import pytest\n\n@pytest.mark.amp_regression\ndef test_x(ampgate):\n    pass\n")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "ERROR: ini option ampgate_min_speedup: min_speedup must be a number, got 'fast'" in result.stderr.lines


def test_bad_device_option_is_a_usage_error(pytester):
    pytester.makepyfile(test_ok="def test_x():\n    pass\n")
    result = pytester.runpytest("--ampgate-device", "gpu")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "ERROR: --ampgate-device must be 'cuda', 'cuda:N' or 'cpu', got 'gpu'" in result.stderr.lines


# --- per-test margins over ini defaults ------------------------------------------------------


def test_marker_margins_override_ini_defaults(pytester, monkeypatch):
    pytester.makeini(
        "[pytest]\nampgate_accuracy_tolerance = 0.9\nampgate_modes = amp_bf16\nampgate_rounds = 2\n"
        "ampgate_steps_per_block = 4\nampgate_warmup_steps = 1\n"
    )
    pytester.makepyfile(
        test_user=user_tests(
            "@pytest.mark.amp_regression\ndef test_ini(ampgate):\n    ampgate.run(workload())\n",
            "@pytest.mark.amp_regression(accuracy_tolerance=0.01)\ndef test_marker(ampgate):\n    ampgate.run(workload())\n",
        )
    )
    monkeypatch.delenv("AMPGATE_TEST_LR", raising=False)
    pytester.runpytest(*CPU, "--ampgate-update").assert_outcomes(passed=2)
    entries = stored(pytester)["tests"]
    assert {e["settings"]["config"]["accuracy_tolerance"] for e in entries["test_user.py::test_ini"].values()} == {0.9}
    assert {e["settings"]["config"]["accuracy_tolerance"] for e in entries["test_user.py::test_marker"].values()} == {0.01}
    assert {e["settings"]["config"]["rounds"] for e in entries["test_user.py::test_marker"].values()} == {2}  # ini, not CPU profile

    monkeypatch.setenv("AMPGATE_TEST_LR", "0")
    result = pytester.runpytest(*CPU, "-rA")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["FAILED test_user.py::test_marker - AMP REGRESSION"])
    out = result.stdout.str()
    assert re.search(r"amp_bf16 accuracy 0\.\d{3} vs baseline 1\.000 \(tol 0\.9\) ok", out), out  # test_ini
    assert re.search(r"amp_bf16 accuracy 0\.\d{3} vs baseline 1\.000 \(tol 0\.01\) dropped below 0\.990 FAILED", out), out


# --- baseline files --------------------------------------------------------------------------


def _entry(accuracy, device_name):
    return {
        "environment": {"device_name": device_name, "torch_version": "2.11.0"},
        "recorded_at": "2026-01-01T00:00:00+00:00",
        "settings": {"hand_written": True},
        "modes": {"fp32": {"accuracy": accuracy, "future_field": [1, 2]}, "amp_bf16": {"accuracy": accuracy, "speedup": 1.7}},
    }


def _block(text, key):
    """The lines of one entry as written in the file: from its key line to its closing brace."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.strip().startswith(json.dumps(key) + ":"))
    indent = len(lines[start]) - len(lines[start].lstrip())
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith(" " * indent + "}"))
    return "\n".join(lines[start : end + 1]).rstrip(",")


def test_update_rewrites_only_what_ran_atomically(pytester, monkeypatch):
    pytester.makepyfile(test_user=user_tests(gated("test_blobs"), gated("test_other")))
    h100 = "NVIDIA H100 80GB HBM3|sm90|torch2.11|cuda13"
    doc = {
        "schema": "pytest-ampgate-baselines",
        "schema_version": 1,
        "tests": {
            "test_user.py::test_blobs": {h100: _entry(0.5, "NVIDIA H100 80GB HBM3")},
            "test_user.py::test_other": {"cpu|Some CPU|torch2.11": _entry(0.25, "Some CPU")},
        },
    }
    path = pytester.path / "baselines" / "test_user.json"
    path.parent.mkdir()
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    before = path.read_text()
    renames = []
    real_replace = os.replace

    def spy_replace(src, dst):
        renames.append((Path(src), Path(dst), Path(dst).read_text()))  # what readers see until the rename
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy_replace)
    result = pytester.runpytest(*CPU, "--ampgate-update", "-k", "test_blobs")
    monkeypatch.undo()
    result.assert_outcomes(passed=1, deselected=1)
    after = path.read_text()
    # Written once, by renaming a complete temp file from the same directory over the old file.
    assert [(dst, seen) for _src, dst, seen in renames] == [(path, before)]
    src = renames[0][0]
    assert src.parent == path.parent and src.name.startswith(".test_user.json.") and src.name.endswith(".tmp")
    new = json.loads(after)["tests"]
    # Another environment of the same test, and another test, are kept byte for byte.
    for key in ("test_user.py::test_other", h100):
        assert _block(before, key) in after, key
    assert new["test_user.py::test_other"] == doc["tests"]["test_user.py::test_other"]
    assert new["test_user.py::test_blobs"][h100] == doc["tests"]["test_user.py::test_blobs"][h100]
    # The environment that ran was added next to them.
    cpu_keys = [k for k in new["test_user.py::test_blobs"] if k.startswith("cpu|")]
    assert len(cpu_keys) == 1 and new["test_user.py::test_blobs"][cpu_keys[0]]["modes"]["amp_bf16"]["accuracy"] > 0.9
    # No temp or lock files left behind.
    assert sorted(p.name for p in path.parent.iterdir()) == ["test_user.json"]


# --- stale entries ---------------------------------------------------------------------------


def test_stale_entries_are_reported_then_pruned_on_request(pytester):
    pytester.makepyfile(test_user=user_tests(gated("test_blobs"), gated("test_other")))
    pytester.runpytest(*CPU, "--ampgate-update").assert_outcomes(passed=2)
    path = pytester.path / "baselines" / "test_user.json"
    doc = json.loads(path.read_text())
    doc["tests"]["test_user.py::test_gone"] = {"cpu|Some CPU|torch2.11": _entry(0.5, "Some CPU")}
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    elsewhere = pytester.path / "baselines" / "test_elsewhere.json"
    elsewhere.write_text(
        json.dumps(
            {
                "schema": "pytest-ampgate-baselines",
                "schema_version": 1,
                "tests": {"test_elsewhere.py::test_y": {"cpu|Some CPU|torch2.11": _entry(0.5, "Some CPU")}},
            }
        )
    )
    hint = (
        "stale baseline entries (their tests no longer exist): test_user.py::test_gone; delete them with --ampgate-update --ampgate-prune"
    )

    # Reported, not deleted; a module that was not collected is not judged.
    result = pytester.runpytest(*CPU, "test_user.py")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines([hint])
    assert "test_user.py::test_gone" in json.loads(path.read_text())["tests"] and elsewhere.exists()

    # With part of the module deselected, nothing in it is called stale.
    result = pytester.runpytest(*CPU, "test_user.py", "-k", "test_blobs")
    result.assert_outcomes(passed=1, deselected=1)
    assert "stale baseline entries" not in result.stdout.str()
    # Nor when one test is picked by node id, even with --ampgate-prune.
    result = pytester.runpytest(*CPU, "test_user.py::test_blobs", "--ampgate-update", "--ampgate-prune")
    result.assert_outcomes(passed=1)
    assert not any(ln.startswith(("stale baseline entries", "pruned ")) for ln in result.stdout.lines)
    assert {"test_user.py::test_gone", "test_user.py::test_other"} <= set(json.loads(path.read_text())["tests"])

    # --ampgate-prune without --ampgate-update deletes nothing.
    result = pytester.runpytest(*CPU, "test_user.py", "--ampgate-prune")
    result.stdout.fnmatch_lines([hint])
    assert "test_user.py::test_gone" in json.loads(path.read_text())["tests"]

    # With --ampgate-update --ampgate-prune it goes; the live entries and other modules stay.
    result = pytester.runpytest(*CPU, "test_user.py", "--ampgate-update", "--ampgate-prune")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["pruned 1 stale baseline entry"])
    tests = json.loads(path.read_text())["tests"]
    assert set(tests) == {"test_user.py::test_blobs", "test_user.py::test_other"}
    assert "test_elsewhere.py::test_y" in json.loads(elsewhere.read_text())["tests"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["test_elsewhere.json", "test_user.json"]


# --- the summary table and a real built-in workload ------------------------------------------


def test_builtin_mnist_end_to_end_on_cpu(pytester):
    pytester.makepyfile(
        test_mnist="""
        import pytest

        @pytest.mark.amp_regression(modes=["amp_bf16"], rounds=2, steps_per_block=5, warmup_steps=1)
        def test_mnist(ampgate_mnist):
            assert ampgate_mnist.mode("fp32").accuracy is not None
            assert len(ampgate_mnist.mode("amp_bf16").losses) == 1 + 1 + 1 + (1 + 2) * 5  # + memory step, lead-in/balance block
        """
    )
    result = pytester.runpytest(*CPU, "-W", "error")
    result.assert_outcomes(passed=1, warnings=0)
    assert result.ret == 0
    lines = result.stdout.lines
    header = next(i for i, ln in enumerate(lines) if ln.startswith("test "))
    assert re.split(r"\s{2,}", lines[header].strip()) == [
        "test",
        "mode",
        "step time",
        "speedup [CI]",
        "peak mem (ratio)",
        "final loss",
        "accuracy (baseline)",
        "verdict",
    ]
    assert set(lines[header + 1].replace(" ", "")) == {"-"}
    rows = [re.split(r"\s{2,}", ln.strip()) for ln in lines[header + 2 : header + 4]]
    assert [r[:2] for r in rows] == [["test_mnist.py::test_mnist", "fp32"], ["test_mnist.py::test_mnist", "amp_bf16"]]
    assert rows[0][3] == "reference" and re.fullmatch(r"\d+\.\d\dx \[\d+\.\d\d-\d+\.\d\d\]", rows[1][3])
    assert all(
        re.fullmatch(r"[\d.]+ (ms|us)", r[2]) and re.fullmatch(r"[\d.]+ MiB \([\d.]+x\)", r[4]) and re.fullmatch(r"0\.\d{3}", r[6])
        for r in rows
    ), rows
    assert [r[7] for r in rows] == ["INCONCLUSIVE", "INCONCLUSIVE"]  # no baseline yet: a warning, not a failure
    assert lines[header + 4].startswith("environment: cpu|")

    # --ampgate-strict makes the missing baseline fail; after recording, the table says pass with the baseline.
    result = pytester.runpytest(*CPU, "--ampgate-strict")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["FAILED test_mnist.py::test_mnist - AMP GATE INCONCLUSIVE"])
    pytester.runpytest(*CPU, "--ampgate-update").assert_outcomes(passed=1)
    result = pytester.runpytest(*CPU)
    result.assert_outcomes(passed=1)
    result.stdout.re_match_lines(
        [
            r"test_mnist\.py::test_mnist +fp32 +.* +reference +[\d.]+ MiB \(1\.00x\) +[\d.]+ +(0\.\d{3}) \(\1\) +pass$",
            r"test_mnist\.py::test_mnist +amp_bf16 +.* +[\d.]+ MiB \([\d.]+x\) +[\d.]+ +(0\.\d{3}) \(\1\) +pass$",
        ]
    )


def test_missing_baseline_policy_from_the_marker(pytester):
    pytester.makepyfile(
        test_user=user_tests(
            gated("test_warn"),
            gated("test_fail", TINY + ", missing_baseline='fail'"),
            gated("test_ignore", TINY + ", missing_baseline='ignore'"),
        )
    )
    result = pytester.runpytest(*CPU)
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["FAILED test_user.py::test_fail - AMP REGRESSION"])
    out = result.stdout.str()
    assert "INCONCLUSIVE test_user.py::test_warn:" in out
    assert "INCONCLUSIVE test_user.py::test_ignore" not in out and "INCONCLUSIVE test_user.py::test_fail" not in out
    result.stdout.re_match_lines(
        [
            r"test_user\.py::test_warn +amp_bf16 .* INCONCLUSIVE$",
            r"test_user\.py::test_fail +amp_bf16 .* FAIL$",
            r"test_user\.py::test_ignore +amp_bf16 .* pass$",
        ]
    )
