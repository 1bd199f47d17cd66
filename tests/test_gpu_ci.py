"""The gate where GPU CI really runs (issue 20): a runner lacking every requested mode under --ampgate-strict,
and launch-bound workloads that must never excuse a regression."""

from __future__ import annotations

from test_reliability import CPU, HELPERS, _assert_clean

UNSUPPORTED_ONLY = (
    HELPERS
    + """

@pytest.mark.amp_regression(**dict(FAST, modes=["tf32"]))
def test_gated(ampgate):
    ampgate.run(tiny())
"""
)


def test_only_unsupported_modes_skip_with_the_reason_and_fail_under_strict(pytester):
    pytester.makepyfile(test_gated=UNSUPPORTED_ONLY)
    plain = pytester.runpytest(*CPU, "-rs")
    plain.assert_outcomes(skipped=1)
    out = _assert_clean(plain)
    assert "no requested precision mode can run here" in out and "tf32 exists only on NVIDIA GPUs" in out, out

    strict = pytester.runpytest(*CPU, "--ampgate-strict")
    strict.assert_outcomes(failed=1)
    assert strict.ret != 0
    out = _assert_clean(strict)
    assert "tf32 exists only on NVIDIA GPUs" in out, out
    assert "--ampgate-strict fails a gated test that gated nothing" in out, out
