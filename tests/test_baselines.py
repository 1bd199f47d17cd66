"""The baseline store: round trips, validation with actionable messages, path safety, atomic and
locked writes (checked with real concurrent and SIGKILLed processes), stale entries and pruning."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
try:
    import pytest_ampgate.baselines  # noqa: F401
except ImportError:  # run from outside the checkout without an install
    sys.path.insert(0, str(ROOT))

from pytest_ampgate.baselines import (  # noqa: E402
    SCHEMA,
    SCHEMA_VERSION,
    Baseline,
    BaselineStore,
    ModeBaseline,
    module_relpath,
)
from pytest_ampgate.errors import BaselineError  # noqa: E402

TEST_ID = "tests/test_amp.py::test_cifar_cnn"
ENV = "NVIDIA H100|sm90|torch2.11|cuda12"
ENV_CPU = "cpu|torch2.11"
STAMP = "2026-11-23T02:00:00+00:00"

# Child processes import the module without running pytest_ampgate/__init__.py (which may import
# torch): fast start-up, and proof that baselines.py itself needs only the standard library.
CHILD_PREAMBLE = f"""
import os, sys, time, types
pkg = types.ModuleType("pytest_ampgate")
pkg.__path__ = [{str(ROOT / "pytest_ampgate")!r}]
sys.modules["pytest_ampgate"] = pkg
from pytest_ampgate.baselines import Baseline, BaselineStore, ModeBaseline
"""


def make_baseline(test_id=TEST_ID, env_key=ENV, speedup=1.8, **settings) -> Baseline:
    return Baseline(
        test_id=test_id,
        env_key=env_key,
        environment={"gpu": "NVIDIA H100", "capability": [9, 0], "torch": "2.11"},
        recorded_at=STAMP,
        settings={"rounds": 10, **settings},
        modes={
            "fp32": ModeBaseline(step_time_s=0.002, peak_memory_bytes=2000, accuracy=0.915, final_loss=0.3),
            "amp_fp16": ModeBaseline(
                speedup=speedup,
                speedup_low=speedup - 0.1,
                speedup_high=speedup + 0.1,
                memory_ratio=0.6,
                step_time_s=0.001,
                peak_memory_bytes=1200,
                accuracy=0.912,
                final_loss=0.31,
                low_precision_share=0.97,
                extra={"grad_scaler_skipped_steps": 2},
            ),
        },
    )


def entry_dict(speedup=1.0) -> dict:
    return {
        "environment": {"gpu": "other"},
        "recorded_at": STAMP,
        "settings": {"rounds": 3},
        "modes": {"amp_bf16": {"speedup": speedup, "future_field": "kept"}},
        "note": "unknown entry keys survive rewrites",
    }


def write_doc(path: Path, tests: dict, **top) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "tests": tests, **top}
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def dir_listing(root: Path) -> list:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# ------------------------------------------------------------------------------------------------
# Round trip and layout
# ------------------------------------------------------------------------------------------------


def test_round_trip_stage_commit_lookup(tmp_path):
    store = BaselineStore(tmp_path / "baselines")
    baseline = make_baseline()
    store.stage(baseline)
    assert store.lookup(TEST_ID, ENV) is None, "staged entries are not visible before commit"
    assert not (tmp_path / "baselines").exists(), "stage() must not write"

    written = store.commit()
    path = tmp_path / "baselines" / "tests" / "test_amp.json"
    assert written == [path]
    assert store.staged == []

    text = path.read_text()
    doc = json.loads(text)
    assert text == json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    assert doc["schema"] == SCHEMA and doc["schema_version"] == SCHEMA_VERSION == 1
    stored = doc["tests"][TEST_ID][ENV]
    assert stored["recorded_at"] == STAMP
    assert stored["modes"]["amp_fp16"]["speedup"] == 1.8
    assert stored["modes"]["amp_fp16"]["grad_scaler_skipped_steps"] == 2
    assert "speedup" not in stored["modes"]["fp32"], "None fields are left out"

    fresh = BaselineStore(tmp_path / "baselines")
    assert fresh.lookup(TEST_ID, ENV) == baseline
    assert fresh.lookup(TEST_ID, ENV_CPU) is None
    assert fresh.lookup("tests/test_amp.py::test_other", ENV) is None
    assert fresh.lookup("tests/test_missing.py::t", ENV) is None
    assert fresh.environments(TEST_ID) == [ENV]
    assert fresh.environments("tests/test_missing.py::t") == []

    # Re-committing the same data gives the same bytes: stable diffs in git.
    again = BaselineStore(tmp_path / "baselines")
    again.stage(make_baseline())
    again.commit()
    assert path.read_text() == text


def test_mode_baseline_dict_round_trip_keeps_unknown_fields():
    d = {"speedup": 2, "peak_memory_bytes": 10, "accuracy": None, "new_metric": [1, 2]}
    mode = ModeBaseline.from_dict(d, "somewhere")
    assert mode.speedup == 2 and mode.peak_memory_bytes == 10 and mode.accuracy is None
    assert mode.extra == {"new_metric": [1, 2]}
    assert mode.to_dict() == {"speedup": 2, "peak_memory_bytes": 10, "new_metric": [1, 2]}
    assert ModeBaseline.from_dict(mode.to_dict(), "x") == mode
    with pytest.raises(BaselineError, match=r"where\['accuracy'\] must be a number or null, got 'high'"):
        ModeBaseline.from_dict({"accuracy": "high"}, "where")


def test_commit_keeps_other_tests_and_environments_untouched(tmp_path):
    d = tmp_path / "baselines"
    path = d / "tests" / "test_amp.json"
    others = {
        TEST_ID: {ENV_CPU: entry_dict(1.1)},
        "tests/test_amp.py::test_mlp": {ENV: entry_dict(1.2), ENV_CPU: entry_dict(1.3)},
    }
    write_doc(path, json.loads(json.dumps(others)), comment="unknown top-level keys survive too")
    before = json.loads(path.read_text())

    store = BaselineStore(d)
    store.stage(make_baseline())
    store.commit()

    after = json.loads(path.read_text())
    assert after["comment"] == before["comment"]
    assert after["tests"]["tests/test_amp.py::test_mlp"] == before["tests"]["tests/test_amp.py::test_mlp"]
    assert after["tests"][TEST_ID][ENV_CPU] == before["tests"][TEST_ID][ENV_CPU]
    assert set(after["tests"][TEST_ID]) == {ENV, ENV_CPU}
    assert after["tests"][TEST_ID][ENV] == make_baseline().to_entry()

    # Replacing an entry replaces it whole, and still leaves the rest alone.
    store.stage(make_baseline(speedup=2.5))
    store.commit()
    final = json.loads(path.read_text())
    assert final["tests"][TEST_ID][ENV]["modes"]["amp_fp16"]["speedup"] == 2.5
    del final["tests"][TEST_ID][ENV], after["tests"][TEST_ID][ENV]
    assert final == after


def test_commit_rereads_the_file_written_by_another_store(tmp_path):
    a, b = BaselineStore(tmp_path), BaselineStore(tmp_path)
    assert a.lookup(TEST_ID, ENV) is None  # a has now cached "no file"
    b.stage(make_baseline(test_id="tests/test_amp.py::test_b"))
    b.commit()
    a.stage(make_baseline(test_id="tests/test_amp.py::test_a"))
    a.commit()
    fresh = BaselineStore(tmp_path)
    assert fresh.lookup("tests/test_amp.py::test_a", ENV) is not None
    assert fresh.lookup("tests/test_amp.py::test_b", ENV) is not None
    assert a.lookup("tests/test_amp.py::test_b", ENV) is not None, "commit refreshes the cache"


def test_entries_lists_every_file_test_and_environment(tmp_path):
    store = BaselineStore(tmp_path)
    assert list(store.entries()) == []
    store.stage(make_baseline("tests/test_a.py::t1", ENV))
    store.stage(make_baseline("tests/test_a.py::t1", ENV_CPU))
    store.stage(make_baseline("tests/sub/test_b.py::C::t2[x-1]", ENV))
    store.commit()
    assert list(BaselineStore(tmp_path).entries()) == [
        (tmp_path / "tests" / "sub" / "test_b.json", "tests/sub/test_b.py::C::t2[x-1]", ENV),
        (tmp_path / "tests" / "test_a.json", "tests/test_a.py::t1", ENV),  # "N..." sorts before "c..."
        (tmp_path / "tests" / "test_a.json", "tests/test_a.py::t1", ENV_CPU),
    ]


# ------------------------------------------------------------------------------------------------
# Validation: every problem names the file, the problem and the fix
# ------------------------------------------------------------------------------------------------


def _doc(**over):
    doc = {"schema": SCHEMA, "schema_version": 1, "tests": {TEST_ID: {ENV: make_baseline().to_entry()}}}
    doc.update(over)
    return json.dumps(doc, indent=2).encode()


def _entry_doc(mutate):
    entry = json.loads(json.dumps(make_baseline().to_entry()))
    mutate(entry)
    return json.dumps({"schema": SCHEMA, "schema_version": 1, "tests": {TEST_ID: {ENV: entry}}}).encode()


WHERE = f"tests['{TEST_ID}']['{ENV}']"
CORRUPT = {
    "empty": (b"", "is empty"),
    "whitespace": (b"  \n", "is empty"),
    "truncated": (_doc()[:57], "is not valid JSON"),
    "not_utf8": (b'{"schema": "\xff"}', "is not UTF-8"),
    "merge_conflict": (b"<<<<<<< HEAD\n{}\n=======\n{}\n>>>>>>> x\n", "merge conflict"),
    "top_level_list": (b"[1, 2]", "top level must be a JSON object, got list"),
    "no_schema": (b'{"schema_version": 1, "tests": {}}', "has no 'schema' key"),
    "wrong_schema": (_doc(schema="pytest-regressions"), "has schema 'pytest-regressions', expected"),
    "no_version": (b'{"schema": "pytest-ampgate-baselines", "tests": {}}', "has no 'schema_version' key"),
    "version_str": (_doc(schema_version="1"), "'schema_version' must be an integer, got '1' (str)"),
    "version_bool": (_doc(schema_version=True), "'schema_version' must be an integer"),
    "version_zero": (_doc(schema_version=0), "'schema_version' 0 is invalid"),
    "newer": (_doc(schema_version=2), "written by a newer pytest-ampgate (schema 2"),
    "no_tests": (b'{"schema": "pytest-ampgate-baselines", "schema_version": 1}', "has no 'tests' key"),
    "tests_list": (_doc(tests=[]), "'tests' must be a JSON object, got [] (list)"),
    "test_not_object": (_doc(tests={TEST_ID: 3}), f"tests['{TEST_ID}'] must be a JSON object keyed by environment"),
    "entry_not_object": (_doc(tests={TEST_ID: {ENV: "x"}}), f"{WHERE} must be a JSON object, got 'x'"),
    "missing_modes": (_entry_doc(lambda e: e.pop("modes")), f"{WHERE} is missing required key(s) 'modes'"),
    "missing_two": (
        _entry_doc(lambda e: (e.pop("environment"), e.pop("settings"))),
        "is missing required key(s) 'environment', 'settings'",
    ),
    "missing_recorded_at": (_entry_doc(lambda e: e.pop("recorded_at")), "missing required key(s) 'recorded_at'"),
    "recorded_at_int": (_entry_doc(lambda e: e.update(recorded_at=5)), f"{WHERE}['recorded_at'] must be an ISO 8601"),
    "environment_list": (_entry_doc(lambda e: e.update(environment=[])), f"{WHERE}['environment'] must be a JSON object"),
    "settings_str": (_entry_doc(lambda e: e.update(settings="x")), f"{WHERE}['settings'] must be a JSON object"),
    "modes_list": (_entry_doc(lambda e: e.update(modes=[])), f"{WHERE}['modes'] must be a JSON object"),
    "mode_not_object": (
        _entry_doc(lambda e: e["modes"].update(amp_bf16=1.5)),
        f"{WHERE}['modes']['amp_bf16'] must be a JSON object of measurements",
    ),
    "field_str": (
        _entry_doc(lambda e: e["modes"]["amp_fp16"].update(accuracy="high")),
        f"{WHERE}['modes']['amp_fp16']['accuracy'] must be a number or null, got 'high' (str)",
    ),
    "field_bool": (
        _entry_doc(lambda e: e["modes"]["amp_fp16"].update(speedup=True)),
        f"{WHERE}['modes']['amp_fp16']['speedup'] must be a number or null",
    ),
    "memory_float": (
        _entry_doc(lambda e: e["modes"]["amp_fp16"].update(peak_memory_bytes=1.5)),
        f"{WHERE}['modes']['amp_fp16']['peak_memory_bytes'] must be a non-negative integer",
    ),
    "memory_negative": (
        _entry_doc(lambda e: e["modes"]["fp32"].update(peak_memory_bytes=-1)),
        "['peak_memory_bytes'] must be a non-negative integer",
    ),
    "nan_literal": (_doc().replace(b"1.8", b"NaN"), "non-standard JSON constant NaN"),
    "overflow_to_inf": (_doc().replace(b"1.8", b"1e400"), "['speedup'] is inf, but baselines must be finite"),
    "duplicate_key": (b'{"schema": "pytest-ampgate-baselines", "schema": "x"}', "duplicate key 'schema'"),
}


@pytest.mark.parametrize("content, problem", list(CORRUPT.values()), ids=list(CORRUPT))
def test_corrupt_file_is_an_error_naming_file_problem_and_fix(tmp_path, monkeypatch, content, problem):
    monkeypatch.chdir(tmp_path)  # messages show paths relative to the cwd, as users type them
    path = tmp_path / "baselines" / "tests" / "test_amp.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    shown = os.path.join("baselines", "tests", "test_amp.json")

    with pytest.raises(BaselineError) as lookup_err:
        BaselineStore("baselines").lookup(TEST_ID, ENV)
    message = str(lookup_err.value)
    assert message.startswith(shown + ": "), message
    assert problem in message
    if "newer" in problem:
        assert "upgrade pytest-ampgate or restore the file from git" in message
    else:
        assert f"git checkout -- {shown}" in message or "restore the file from version control" in message
        assert "pytest --ampgate --ampgate-update" in message
    if content == CORRUPT["truncated"][0]:
        assert "at line 3 column" in message, message

    with pytest.raises(BaselineError, match="refusing to update baselines") as commit_err:
        store = BaselineStore("baselines")
        store.stage(make_baseline())
        store.commit()
    assert problem in str(commit_err.value) and shown in str(commit_err.value)
    assert commit_err.value.written == []
    assert path.read_bytes() == content, "a corrupt baseline must never be overwritten"
    assert store.staged == [(TEST_ID, ENV)], "refused entries stay staged"
    assert sorted(os.listdir(path.parent)) == ["test_amp.json"], "no temp or lock files left"

    with pytest.raises(BaselineError, match="refusing to prune"):
        BaselineStore("baselines").prune([(path, TEST_ID)])
    assert path.read_bytes() == content
    with pytest.raises(BaselineError):
        list(BaselineStore("baselines").entries())


def test_commit_writes_good_files_and_reports_the_corrupt_one(tmp_path):
    bad = tmp_path / "tests" / "test_bad.json"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"{")
    store = BaselineStore(tmp_path)
    store.stage(make_baseline("tests/test_bad.py::t"))
    store.stage(make_baseline("tests/test_good.py::t"))
    with pytest.raises(BaselineError, match="test_bad.json: is not valid JSON") as err:
        store.commit()
    good = tmp_path / "tests" / "test_good.json"
    assert err.value.written == [good]
    assert BaselineStore(tmp_path).lookup("tests/test_good.py::t", ENV) == make_baseline("tests/test_good.py::t")
    assert bad.read_bytes() == b"{"
    assert store.staged == [("tests/test_bad.py::t", ENV)]


@pytest.mark.parametrize(
    "modes, settings, where",
    [
        ({"amp_fp16": ModeBaseline(speedup=float("nan"))}, {}, "['modes']['amp_fp16']['speedup']"),
        ({"amp_fp16": ModeBaseline(final_loss=float("-inf"))}, {}, "['modes']['amp_fp16']['final_loss']"),
        ({"amp_fp16": ModeBaseline(extra={"x": float("inf")})}, {}, "['modes']['amp_fp16']['x']"),
        ({}, {"lr": [0.1, float("nan")]}, "['settings']['lr'][1]"),
    ],
)
def test_stage_refuses_non_finite_numbers(tmp_path, modes, settings, where):
    store = BaselineStore(tmp_path)
    bad = Baseline(TEST_ID, ENV, {}, STAMP, settings, modes)
    with pytest.raises(BaselineError) as err:
        store.stage(bad)
    message = str(err.value)
    assert f"tests['{TEST_ID}']['{ENV}']{where}" in message
    assert "not a finite number" in message and "NaN" in message
    assert store.staged == []
    assert store.commit() == [] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "baseline, problem",
    [
        (Baseline(TEST_ID, ENV, {}, STAMP, {}, {"amp_fp16": ModeBaseline(accuracy="0.9")}), "must be a number or null"),
        (Baseline(TEST_ID, ENV, {}, STAMP, {}, {"amp_fp16": ModeBaseline(peak_memory_bytes=1.5)}), "integer"),
        (Baseline(TEST_ID, ENV, {}, STAMP, {}, {"amp_fp16": {"speedup": 1.0}}), "must be a ModeBaseline"),
        (Baseline(TEST_ID, ENV, {"obj": object()}, STAMP, {}, {}), "not JSON-serialisable"),
        (Baseline(TEST_ID, "", {}, STAMP, {}, {}), "environment key must be a non-empty string"),
        (Baseline("", ENV, {}, STAMP, {}, {}), "test id must be a non-empty string"),
        (Baseline(TEST_ID, ENV, [], STAMP, {}, {}), "['environment'] must be a JSON object"),
        (Baseline(TEST_ID, ENV, {}, None, {}, {}), "['recorded_at'] must be an ISO 8601"),
    ],
)
def test_stage_validates_types(tmp_path, baseline, problem):
    store = BaselineStore(tmp_path)
    with pytest.raises(BaselineError, match=None) as err:
        store.stage(baseline)
    assert problem in str(err.value)
    assert store.staged == []


def test_stage_copies_so_later_mutation_does_not_leak(tmp_path):
    store = BaselineStore(tmp_path)
    baseline = make_baseline()
    store.stage(baseline)
    baseline.settings["rounds"] = 999
    store.commit()
    assert BaselineStore(tmp_path).lookup(TEST_ID, ENV).settings["rounds"] == 10


# ------------------------------------------------------------------------------------------------
# Path safety
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "test_id, expected",
    [
        ("tests/test_amp.py::test_x", "tests/test_amp.json"),
        ("test_top.py::TestC::test_m[a/../b::c]", "test_top.json"),
        ("../../etc/passwd.py::t", "_parent_/_parent_/etc/passwd.json"),
        ("/abs/x.py::t", "abs/x.json"),
        ("a/../../b.py::t", "a/_parent_/_parent_/b.json"),
        ("C:\\x.py::t", "C_/x.json"),
        ("weird name?.py::t", "weird_name_.json"),
        ("./a/./b.py::t", "a/b.json"),
        ("...::t", "_.json"),
        ("::t", "_.json"),
        ("con.py::t", "_con.json"),
        ("docs/index.rst::index.rst", "docs/index.rst.json"),
    ],
)
def test_node_ids_map_inside_the_directory(tmp_path, test_id, expected):
    root = tmp_path / "a" / "b" / "baselines"
    store = BaselineStore(root)
    path = store.path_for(test_id)
    assert path == root / Path(expected)
    assert root.resolve() in path.resolve().parents
    store.stage(make_baseline(test_id=test_id))
    assert store.commit() == [path]
    outside = [p for p in tmp_path.rglob("*") if p != root and root not in p.parents and p not in root.parents]
    assert outside == [], "nothing may be written outside the baseline directory"
    assert BaselineStore(root).lookup(test_id, ENV) is not None


def test_long_module_names_are_shortened_but_stay_distinct():
    a = module_relpath("x" * 300 + "a.py")
    b = module_relpath("x" * 300 + "b.py")
    assert a != b and len(a.name) <= 110 and a.suffix == ".json"


@pytest.mark.skipif(not hasattr(os, "symlink") or os.name == "nt", reason="needs POSIX symlinks")
def test_symlink_escaping_the_directory_is_refused(tmp_path):
    root, elsewhere = tmp_path / "baselines", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    (root / "tests").symlink_to(elsewhere, target_is_directory=True)
    store = BaselineStore(root)
    with pytest.raises(BaselineError, match="outside the baseline directory"):
        store.path_for("tests/test_amp.py::t")
    with pytest.raises(BaselineError, match="outside the baseline directory"):
        store.stage(make_baseline("tests/test_amp.py::t"))
    assert list(elsewhere.iterdir()) == []


# ------------------------------------------------------------------------------------------------
# Atomic writes
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("broken", ["replace", "fsync", "write"])
def test_failed_write_leaves_the_original_and_no_temp_files(tmp_path, monkeypatch, broken):
    store = BaselineStore(tmp_path)
    store.stage(make_baseline(speedup=1.5))
    store.commit()
    path = store.path_for(TEST_ID)
    original = path.read_bytes()

    real = getattr(os, broken)

    def boom(*args, **kwargs):
        if broken == "write":  # fail half way through writing the temp file
            real(args[0], bytes(args[1])[:10])
        raise OSError(28, "No space left on device")

    store.stage(make_baseline(speedup=3.0))
    monkeypatch.setattr(os, broken, boom)
    with pytest.raises(BaselineError, match="could not write baselines .*No space left") as err:
        store.commit()
    monkeypatch.undo()
    assert str(path.relative_to(tmp_path)) in str(err.value) or str(path) in str(err.value)
    assert path.read_bytes() == original
    assert sorted(os.listdir(path.parent)) == ["test_amp.json"], "no temp or lock file left behind"
    assert store.staged == [(TEST_ID, ENV)]

    assert store.commit() == [path], "the staged entry can be committed once the cause is fixed"
    assert BaselineStore(tmp_path).lookup(TEST_ID, ENV).modes["amp_fp16"].speedup == 3.0


def test_commit_keeps_the_file_mode(tmp_path):
    store = BaselineStore(tmp_path)
    store.stage(make_baseline())
    (path,) = store.commit()
    os.chmod(path, 0o640)
    store.stage(make_baseline(speedup=2.0))
    store.commit()
    assert path.stat().st_mode & 0o777 == 0o640


def test_commit_removes_temp_files_of_killed_writers(tmp_path):
    store = BaselineStore(tmp_path)
    path = store.path_for(TEST_ID)
    path.parent.mkdir(parents=True)
    orphan = path.parent / ".test_amp.json.12345.deadbeef.tmp"
    orphan.write_text('{"half": ')
    unrelated = path.parent / ".other.json.1.aa.tmp"
    unrelated.write_text("x")
    store.stage(make_baseline())
    store.commit()
    assert sorted(os.listdir(path.parent)) == [unrelated.name, "test_amp.json"]


# ------------------------------------------------------------------------------------------------
# Locking, concurrency, interruption (real processes)
# ------------------------------------------------------------------------------------------------


def _spawn(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD_PREAMBLE + textwrap.dedent(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_module_needs_only_the_standard_library():
    proc = _spawn("print(sorted(m for m in ('torch', 'pytest', 'numpy') if m in sys.modules))")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.strip() == "[]"


def test_lock_timeout_names_the_lock_file(tmp_path, monkeypatch):
    """The store's lock is file_safety's (shared lock directory, holder in a sidecar file)."""
    from pytest_ampgate.file_safety import Lock, lock_name

    monkeypatch.setenv("PYTEST_AMPGATE_LOCK_DIR", str(tmp_path / "locks"))
    store = BaselineStore(tmp_path, lock_timeout=0.2)
    path = store.path_for(TEST_ID)
    other = Lock(lock_name("baseline", str(path)), timeout=None)
    other.acquire("another pytest --ampgate-update (pid 4242)")
    try:
        store.stage(make_baseline())
        start = time.monotonic()
        with pytest.raises(BaselineError) as err:
            store.commit()
        assert 0.15 < time.monotonic() - start < 5
        message = str(err.value)
        assert "timed out after 0.2s waiting for the baseline lock for" in message
        assert str(other.path) in message
        assert "held by: pid" in message and "another pytest --ampgate-update (pid 4242)" in message
        assert not path.exists()
    finally:
        other.release()
    assert store.commit() == [path], "works once the lock is free"


CONCURRENT_CHILD = """
directory, who, count, go = sys.argv[1:5]
store = BaselineStore(directory)
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.001)
for i in range(int(count)):
    store.stage(Baseline(f"tests/test_shared.py::test_{who}_{i}", "env|" + who, {"who": who}, "t",
                         {"i": i}, {"amp_fp16": ModeBaseline(speedup=1.0 + i)}))
    store.commit()
print("done", flush=True)
"""


def test_concurrent_processes_never_lose_each_others_entries(tmp_path):
    count = 50
    go = tmp_path / "go"
    root = tmp_path / "baselines"
    # A pre-existing entry of another test must survive the whole storm as well.
    write_doc(root / "tests" / "test_shared.json", {"tests/test_shared.py::keep": {"e": entry_dict()}})
    procs = [_spawn(CONCURRENT_CHILD, str(root), who, str(count), str(go)) for who in ("a", "b")]
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        go.touch()
        for proc in procs:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            assert out.strip() == "done"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()

    store = BaselineStore(root)
    ids = {test_id for _, test_id, _ in store.entries()}
    expected = {f"tests/test_shared.py::test_{w}_{i}" for w in "ab" for i in range(count)}
    assert ids == expected | {"tests/test_shared.py::keep"}
    for w in "ab":
        for i in range(count):
            got = store.lookup(f"tests/test_shared.py::test_{w}_{i}", "env|" + w)
            assert got.settings == {"i": i} and got.modes["amp_fp16"].speedup == 1.0 + i
    assert sorted(os.listdir(root / "tests")) == ["test_shared.json"], "no temp or lock files remain"


KILLED_CHILD = """
directory, start, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
store = BaselineStore(directory)
print("ready", flush=True)
version = start
while True:
    version += 1
    store.stage(Baseline("tests/test_big.py::test_big", "env", {}, "t",
                         {"version": version, "payload": [version] * size},
                         {"amp_fp16": ModeBaseline(speedup=float(version))}))
    store.commit()
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_mid_commit_leaves_an_old_or_new_complete_file(tmp_path):
    size = 60_000  # ~1 MB of pretty JSON: a write takes long enough to be interrupted
    root = tmp_path / "baselines"
    path = root / "tests" / "test_big.json"
    keep = {"e": entry_dict()}
    write_doc(path, {"tests/test_big.py::keep": keep})
    rng = random.Random(20261123)
    versions_seen = set()
    for round_ in range(8):
        proc = _spawn(KILLED_CHILD, str(root), str(round_ * 1_000_000), str(size))
        try:
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
            time.sleep(rng.uniform(0.05, 0.3))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
        assert proc.returncode == -signal.SIGKILL

        doc = json.loads(path.read_bytes())  # parses: never a partial file
        assert doc["tests"]["tests/test_big.py::keep"] == keep
        big = BaselineStore(root).lookup("tests/test_big.py::test_big", "env")
        if big is not None:  # the first round may be killed before its first commit
            version = big.settings["version"]
            assert big.settings["payload"] == [version] * size, "a complete version, not a mix"
            assert big.modes["amp_fp16"].speedup == float(version)
            versions_seen.add(version)
    assert len(versions_seen) >= 2, "the writer hardly ever completed a commit; the test proved little"

    # Whatever the kills left behind (temp files, a lock file) is harmless and cleaned up.
    store = BaselineStore(root)
    store.stage(make_baseline("tests/test_big.py::after"))
    store.commit()
    assert sorted(os.listdir(path.parent)) == ["test_big.json"]
    assert BaselineStore(root).lookup("tests/test_big.py::after", ENV) is not None


# ------------------------------------------------------------------------------------------------
# Stale entries and pruning
# ------------------------------------------------------------------------------------------------


def _populate(root: Path) -> BaselineStore:
    store = BaselineStore(root)
    for test_id in (
        "tests/test_a.py::test_kept",
        "tests/test_a.py::test_gone",
        "tests/test_b.py::test_gone",
        "tests/sub/test_c.py::test_gone",
    ):
        store.stage(make_baseline(test_id, ENV))
        store.stage(make_baseline(test_id, ENV_CPU))
    store.commit()
    return BaselineStore(root)


def test_stale_entries_with_and_without_modules(tmp_path):
    store = _populate(tmp_path)
    a, b = tmp_path / "tests" / "test_a.json", tmp_path / "tests" / "test_b.json"
    c = tmp_path / "tests" / "sub" / "test_c.json"
    existing = {"tests/test_a.py::test_kept"}
    assert store.stale_entries(existing) == [
        (c, "tests/sub/test_c.py::test_gone"),
        (a, "tests/test_a.py::test_gone"),
        (b, "tests/test_b.py::test_gone"),
    ]
    # A run that collected only test_a.py in full must not call the other modules' tests stale.
    assert store.stale_entries(existing, modules={"tests/test_a.py"}) == [(a, "tests/test_a.py::test_gone")]
    assert store.stale_entries(existing, modules=set()) == []
    everything = existing | {"tests/test_a.py::test_gone", "tests/test_b.py::test_gone", "tests/sub/test_c.py::test_gone"}
    assert store.stale_entries(everything) == []


def test_prune_removes_only_stale_tests_and_deletes_emptied_files(tmp_path):
    store = _populate(tmp_path)
    a = tmp_path / "tests" / "test_a.json"
    kept_before = json.loads(a.read_text())["tests"]["tests/test_a.py::test_kept"]

    stale = store.stale_entries({"tests/test_a.py::test_kept"})
    changed = store.prune(stale)
    assert sorted(changed) == sorted({p for p, _ in stale})

    doc = json.loads(a.read_text())
    assert doc["tests"] == {"tests/test_a.py::test_kept": kept_before}
    assert not (tmp_path / "tests" / "test_b.json").exists()
    assert not (tmp_path / "tests" / "sub").exists(), "emptied directories go too"
    assert dir_listing(tmp_path) == ["tests", "tests/test_a.json"]
    assert store.lookup("tests/test_a.py::test_gone", ENV) is None
    assert store.environments("tests/test_a.py::test_kept") == sorted([ENV, ENV_CPU])
    assert store.stale_entries({"tests/test_a.py::test_kept"}) == []
    assert store.prune(stale) == [], "pruning again changes nothing"


def test_prune_rereads_the_file_and_keeps_entries_added_since(tmp_path):
    store = _populate(tmp_path)
    stale = store.stale_entries({"tests/test_a.py::test_kept"}, modules={"tests/test_a.py"})
    other = BaselineStore(tmp_path)
    other.stage(make_baseline("tests/test_a.py::test_new"))
    other.commit()
    store.prune(stale)
    fresh = BaselineStore(tmp_path)
    assert fresh.lookup("tests/test_a.py::test_new", ENV) is not None
    assert fresh.lookup("tests/test_a.py::test_kept", ENV) is not None
    assert fresh.lookup("tests/test_a.py::test_gone", ENV) is None


def test_record_commits_what_ran_and_prunes_only_what_the_complete_collection_lost(tmp_path):
    store = _populate(tmp_path)
    a, b = tmp_path / "tests" / "test_a.json", tmp_path / "tests" / "test_b.json"
    kept = {"tests/test_a.py::test_kept"}
    # test_a.py was collected in full, the other modules only in part: their entries are never stale.
    done = store.record([make_baseline("tests/test_a.py::test_kept", speedup=2.5)], collected=kept, complete_modules={"tests/test_a.py"})
    assert done.written == [a] and done.write_error is None
    assert done.stale == [(a, "tests/test_a.py::test_gone")] and done.pruned == [], "listed, not pruned, without prune=True"
    assert BaselineStore(tmp_path).lookup("tests/test_a.py::test_kept", ENV).modes["amp_fp16"].speedup == 2.5
    assert BaselineStore(tmp_path).lookup("tests/test_a.py::test_gone", ENV) is not None

    done = store.record([], collected=kept, complete_modules={"tests/test_a.py"}, prune=True)
    assert done.written == [] and done.pruned == [a] and done.prune_error is None
    fresh = BaselineStore(tmp_path)
    assert fresh.lookup("tests/test_a.py::test_gone", ENV) is None
    assert fresh.lookup("tests/test_b.py::test_gone", ENV) is not None
    assert store.record([], collected=kept, complete_modules=set(), prune=True).stale == [], "a narrowed run prunes nothing"

    b.write_bytes(b"{")  # a refused file is reported, not raised, and the other files are still written
    done = store.record([make_baseline("tests/test_b.py::t"), make_baseline("tests/test_c.py::t")], collected=kept, complete_modules=set())
    assert done.written == [tmp_path / "tests" / "test_c.json"]
    assert "test_b.json: is not valid JSON" in str(done.write_error)
