"""Markers and the settings they carry: class and method markers merge (closest wins), too few rounds never
give a decisive speed verdict, unsupported modes are skipped not passed, and relative paths follow one rule."""

from __future__ import annotations

import torch
from session_helpers import CPU, HELPERS, UPDATE
from test_bad_input_and_faults import INTERNAL_FRAME, _assert_clean, _output, _quiet_and_isolated  # noqa: F401
from test_baseline_files import GATED_TEST

# --------------------------------------------------------------------------------------------------
# 9. Markers and settings.
# --------------------------------------------------------------------------------------------------


def test_class_and_method_markers_merge_closest_wins(pytester):
    pytester.makepyfile(
        test_markers="""
import pytest

pytestmark = pytest.mark.amp_regression(accuracy_tolerance=0.3, rounds=7)


@pytest.mark.amp_regression(min_speedup=3.0, max_memory_ratio=0.5, rounds=8)
class TestBoth:
    @pytest.mark.amp_regression(modes=["amp_bf16"], min_speedup=2.0)
    def test_method(self, ampgate):
        c = ampgate.config
        assert c.modes == ("amp_bf16",) and c.min_speedup == 2.0, "the method's settings"
        assert c.max_memory_ratio == 0.5 and c.rounds == 8, "the class's settings"
        assert c.accuracy_tolerance == 0.3, "the module's settings"


@pytest.mark.amp_regression(min_speedup=1.7)
@pytest.mark.amp_regression(modes=["amp_bf16"], min_speedup=1.9)
def test_twice(ampgate):
    assert ampgate.config.modes == ("amp_bf16",) and ampgate.config.min_speedup == 1.9
"""
    )
    result = pytester.runpytest(*CPU)
    result.assert_outcomes(passed=2)
    _assert_clean(result)


def test_too_few_rounds_never_give_a_decisive_speed_verdict(pytester):
    pytester.makepyfile(
        test_rounds=HELPERS
        + """

@pytest.mark.amp_regression(modes=["amp_bf16"], check_speed=True, min_speedup=1.2, rounds=1, steps_per_block=2,
                            warmup_steps=1, missing_baseline="ignore")
def test_gated(ampgate):
    ampgate.run(tiny("slow", model=lambda: Faulty("slow")))
"""
    )
    result = pytester.runpytest(*CPU, "-rP")
    result.assert_outcomes(passed=1)
    out = _assert_clean(result)
    assert (
        "AMP GATE INCONCLUSIVE" in out and "only 1 round, so the interval covers 0%, not 95%: no verdict; raise rounds to at least 6" in out
    ), out
    strict = pytester.runpytest(*CPU, "--ampgate-strict")
    strict.assert_outcomes(failed=1)


def test_every_requested_mode_unsupported_is_skipped_not_passed(pytester, monkeypatch):
    from pytest_ampgate import modes

    real = modes._cpu_supports
    monkeypatch.setattr(
        modes, "_cpu_supports", lambda dtype, autocast: "no bfloat16 here (simulated)" if dtype == torch.bfloat16 else real(dtype, autocast)
    )
    pytester.makepyfile(test_gated=GATED_TEST)
    result = pytester.runpytest(*UPDATE, "-rs")
    result.assert_outcomes(skipped=1)
    out = _assert_clean(result)
    assert "AMP GATE SKIPPED: no requested precision mode can run here" in out and "no bfloat16 here (simulated)" in out, out
    assert "AMP GATE PASSED" not in out
    assert not (pytester.path / "baselines" / "test_gated.json").exists(), "a skipped gate records nothing"


def test_relative_paths_follow_one_rule_command_line_from_cwd_ini_from_rootdir(pytester, monkeypatch):
    pytester.makeini("[pytest]\nampgate_data_root = ini_data\n")
    pytester.makepyfile(test_gated=GATED_TEST)
    sub = pytester.mkdir("sub")
    monkeypatch.chdir(sub)
    result = pytester.runpytest(
        *UPDATE, "--rootdir", str(pytester.path), "--ampgate-baseline-dir", "cli_baselines", str(pytester.path / "test_gated.py")
    )
    result.assert_outcomes(passed=1)
    assert (sub / "cli_baselines" / "test_gated.json").is_file(), "a command-line path is relative to where pytest was started"
    assert not (pytester.path / "cli_baselines").exists()
    pytester.makeini("[pytest]\nampgate_baseline_dir = ini_baselines\n")
    result = pytester.runpytest(*UPDATE, "--rootdir", str(pytester.path), str(pytester.path / "test_gated.py"))
    result.assert_outcomes(passed=1)
    assert (pytester.path / "ini_baselines" / "test_gated.json").is_file(), "an ini path is relative to the rootdir"
