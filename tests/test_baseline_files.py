"""Baseline files that are not plain JSON documents (a FIFO, a byte-order mark, huge numbers, deep nesting, bad
ranges) are refused naming the file, the key and the fix, and are never changed."""

from __future__ import annotations

import json
import os
import re

from session_helpers import CPU, HELPERS, POSIX, UPDATE, _baseline_doc, _entry, _env_key, _hashes
from test_bad_input_and_faults import INTERNAL_FRAME, _assert_clean, _output, _quiet_and_isolated  # noqa: F401

from pytest_ampgate.baselines import SCHEMA

# --------------------------------------------------------------------------------------------------
# 8. Baseline files that are not plain JSON documents.
# --------------------------------------------------------------------------------------------------

GATED_TEST = (
    HELPERS
    + """

@pytest.mark.amp_regression(**FAST)
def test_gated(ampgate):
    ampgate.run(tiny())
"""
)
GATED_ID = "test_gated.py::test_gated"


def _bad_files():
    env = "cpu|elsewhere|torch2"

    def doc(**mode) -> bytes:
        return _baseline_doc({GATED_ID: {env: _entry(0.5, **mode)}})

    where = f"tests['{GATED_ID}']['{env}']['modes']['amp_bf16']"
    return {
        "400_digit_number": (doc(speedup=10**399), f"{where}['speedup'] is a 400-digit number, too large"),
        "400_digit_bytes": (
            doc(peak_memory_bytes=10**399),
            f"{where}['peak_memory_bytes'] is a 400-digit number, but it is a number of bytes",
        ),
        "deep_nesting": (
            b'{"schema": "pytest-ampgate-baselines", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            "nests JSON arrays or objects more than 64 levels deep",
        ),
        "deep_but_parseable": (
            json.dumps({"schema": SCHEMA, "schema_version": 1, "tests": {}, "x": json.loads("[" * 500 + "]" * 500)}).encode(),
            "nests JSON arrays or objects more than 64 levels deep",
        ),
        "negative_accuracy": (
            _baseline_doc({GATED_ID: {env: _entry(-0.3)}}),
            f"tests['{GATED_ID}']['{env}']['modes']['fp32']['accuracy'] is -0.3, but it is a share of correct predictions and must be >= 0 and <= 1",
        ),
        "accuracy_above_one": (
            _baseline_doc({GATED_ID: {env: _entry(32.6)}}),
            "['accuracy'] is 32.6, but it is a share of correct predictions",
        ),
        "negative_speedup": (doc(speedup=-1.5), f"{where}['speedup'] is -1.5, but it is a ratio of step times and must be > 0"),
        "zero_memory_ratio": (doc(memory_ratio=0), f"{where}['memory_ratio'] is 0.0, but it is a ratio of peak memories and must be > 0"),
        "speedup_outside_interval": (
            doc(speedup=1.5, speedup_low=1.6, speedup_high=1.8),
            "the speedup 1.5 lies outside its own interval [1.6, 1.8]",
        ),
    }


def test_bad_baseline_files_are_refused_with_file_key_and_fix(pytester):
    """One module (and one baseline file) per bad input, all in one session: check, then update."""
    cases = _bad_files()
    (pytester.path / "baselines").mkdir()
    for i, (_name, (content, _message)) in enumerate(cases.items()):
        module = f"test_bad{i}"
        pytester.makepyfile(**{module: GATED_TEST})
        (pytester.path / "baselines" / f"{module}.json").write_bytes(
            content.replace(b"test_gated.py::test_gated", f"{module}.py::test_gated".encode())
        )
    before = _hashes(pytester.path / "baselines")
    for args in (CPU, UPDATE):
        result = pytester.runpytest(*args)
        result.assert_outcomes(failed=len(cases))
        out = _assert_clean(result)
        for i, (name, (_content, message)) in enumerate(cases.items()):
            assert re.search(rf"BaselineError: (refusing to update baselines: )?baselines/test_bad{i}.json: ", out), (name, out)
            assert message.replace("test_gated.py::test_gated", f"test_bad{i}.py::test_gated") in out, (name, args, out)
        assert out.count("re-record with pytest --ampgate --ampgate-update") >= len(cases), out
        assert _hashes(pytester.path / "baselines") == before, "every refused file is byte for byte as it was"


def test_utf8_byte_order_mark_is_read_past(pytester):
    pytester.makepyfile(test_gated=GATED_TEST)
    path = pytester.path / "baselines" / "test_gated.json"
    path.parent.mkdir()
    path.write_bytes(b"\xef\xbb\xbf" + _baseline_doc({GATED_ID: {_env_key(): _entry(0.0)}}))
    before = _hashes(path.parent)
    result = pytester.runpytest(*CPU, "-rP")
    result.assert_outcomes(passed=1)
    out = _assert_clean(result)
    assert "fp32 accuracy" in out and "vs baseline 0.000" in out, out  # the stored figures were read
    assert _hashes(path.parent) == before
    updated = pytester.runpytest(*UPDATE)
    updated.assert_outcomes(passed=1)
    assert json.loads(path.read_bytes())["tests"][GATED_ID], "an update rewrites it as plain UTF-8 JSON"


@POSIX
def test_fifo_in_place_of_a_baseline_file_is_refused_without_hanging(pytester):
    pytester.makepyfile(test_gated=GATED_TEST)
    path = pytester.path / "baselines" / "test_gated.json"
    path.parent.mkdir()
    os.mkfifo(path)
    for args in (UPDATE,):  # reads it (lookup) and would write it (commit): both must refuse, not hang
        result = pytester.runpytest_subprocess(*args, timeout=120)
        result.assert_outcomes(failed=1)
        out = _assert_clean(result)
        assert "baselines/test_gated.json: is a FIFO (named pipe), not a regular file; refusing to read it" in out, out
        assert path.is_fifo()
