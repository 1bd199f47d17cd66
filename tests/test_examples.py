"""The example project and the example GitHub Actions workflow: they run, validate and stay safe."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
from session_helpers import CPU, ROOT, gated, imported_first, isolated, private_locks, project  # noqa: F401  (autouse fixtures)  # noqa: F401  (imported_first: autouse)

# --- examples/ -------------------------------------------------------------------------------

EXAMPLES = __import__("pathlib").Path(__file__).resolve().parent.parent / "examples"


def test_example_user_project_gates_its_own_model(pytester):
    import shutil

    shutil.copytree(EXAMPLES / "user_project", pytester.path, dirs_exist_ok=True)
    if tuple(int(p) for p in pytest.__version__.split(".")[:2]) < (9, 0):
        _as_ini_options(pytester.path / "pyproject.toml")
    quick = ("-o", "ampgate_rounds=1", "-o", "ampgate_steps_per_block=3", "-o", "ampgate_warmup_steps=3")
    result = pytester.runpytest(*CPU, *quick, "--ampgate-json", "r.json")
    result.assert_outcomes(passed=1)
    [test] = json.loads((pytester.path / "r.json").read_text())["tests"]
    assert test["test_id"] == "tests/test_amp_mymodel.py::test_residual_mlp_amp" and test["workload"] == "residual_mlp"
    assert [m["mode"] for m in test["modes"]] == ["fp32", "amp_fp16", "amp_bf16"]
    assert test["config"]["min_speedup"] == 1.3 and test["config"]["accuracy_tolerance"] == 0.03  # ini, then marker


def _as_ini_options(pyproject) -> None:
    """What the example's pyproject.toml tells a pytest < 9 user to do: its native ``[tool.pytest]``
    table (its last section) as ``[tool.pytest.ini_options]``, the numbers quoted."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: tomli, which pytest itself requires there
        import tomli as tomllib

    text = pyproject.read_text()
    table = tomllib.loads(text)["tool"]["pytest"]
    quoted = {key: value if isinstance(value, list) else str(value) for key, value in table.items()}
    head = text[: text.index("[tool.pytest]")]
    pyproject.write_text(head + "[tool.pytest.ini_options]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in quoted.items()))


def test_example_workflow_runs_the_gate_and_uploads_report_and_chart():
    import yaml

    workflow = yaml.safe_load((EXAMPLES / "github-actions" / "ampgate.yml").read_text())
    job = workflow["jobs"]["ampgate"]
    assert "self-hosted" in job["runs-on"] and "gpu" in job["runs-on"]
    script = "\n".join(step.get("run", "") for step in job["steps"])
    for flag in ("pytest --ampgate", "--ampgate-json ampgate/report.json", "--ampgate-plot ampgate/chart.png", "--junitxml"):
        assert flag in script
    upload = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact"))
    assert upload["with"]["path"] == "ampgate/" and upload["if"] == "always()"


# --- 10. examples ----------------------------------------------------------------------------


WORKFLOW = ROOT / "examples" / "github-actions" / "ampgate.yml"


def test_example_workflow_validates_against_the_github_workflow_schema():
    exe = shutil.which("check-jsonschema")
    if exe is None:
        pytest.skip("check-jsonschema is not installed (pip install -e '.[test]')")
    done = subprocess.run([exe, "--builtin-schema", "vendor.github-workflows", str(WORKFLOW)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_example_workflow_is_safe():
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load(WORKFLOW.read_text())
    assert doc["permissions"] == {"contents": "read"}
    job = doc["jobs"]["ampgate"]
    assert "self-hosted" in job["runs-on"]
    assert "github.event.pull_request.head.repo.full_name == github.repository" in job["if"]  # no fork PRs
    assert "inputs.update" in str(doc["concurrency"]["cancel-in-progress"])  # a baseline run is never cancelled
    assert "update" in doc["concurrency"]["group"]
    steps = {s.get("name", s.get("uses")): s for s in job["steps"]}
    python = next(s for s in job["steps"] if str(s.get("uses", "")).startswith("actions/setup-python"))
    assert tuple(int(p) for p in str(python["with"]["python-version"]).split(".")) >= (3, 10)
    gate = steps["AMP gate"]
    assert "refs/heads/main" in gate["env"]["HISTORY"] and "--benchmark-autosave" in gate["env"]["HISTORY"]
    assert "--benchmark-autosave" not in gate["run"] and " -n " not in gate["run"]
    # a runner whose torch cannot reach the GPU must not go green with every gated test skipped
    assert "--ampgate-strict" in gate["run"] and "torch.cuda.is_available()" in steps["GPU"]["run"]
    # a test waiting for the device lock gives up (naming the holder) before the job is killed
    lock_timeout = int(re.search(r"--ampgate-lock-timeout (\d+)", gate["run"])[1])
    assert 0 < lock_timeout < job["timeout-minutes"] * 60
    # a baseline is recorded three times, each a fresh process, so it pools three recordings
    earlier = steps["Earlier baseline recordings"]
    assert "inputs.update" in earlier["if"] and "for i in 1 2" in earlier["run"] and "--ampgate-update" in earlier["run"]
    install = steps["Install"]["run"]
    assert '"$PYTEST_AMPGATE"' in install and "git+https://" in doc["env"]["PYTEST_AMPGATE"]


def test_example_project_declares_an_installable_pytest_ampgate():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: tomli, which pytest itself requires there
        import tomli as tomllib
    from packaging.requirements import Requirement

    project_toml = tomllib.loads((ROOT / "examples" / "user_project" / "pyproject.toml").read_text())
    assert project_toml["project"]["requires-python"] == ">=3.10"
    reqs = [Requirement(r) for r in project_toml["project"]["optional-dependencies"]["test"]]
    ampgate = next(r for r in reqs if r.name == "pytest-ampgate")
    assert {"plot", "html"} <= ampgate.extras
    own = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(ampgate.extras) <= set(own)
    readme = (ROOT / "examples" / "user_project" / "README.md").read_text()
    assert "git+https://" in readme and 'pip install -e "../..[plot,html]"' in readme
    yaml = pytest.importorskip("yaml")  # the workflow's requirement is a valid PEP 508 direct reference
    direct = Requirement(yaml.safe_load(WORKFLOW.read_text())["env"]["PYTEST_AMPGATE"])
    assert direct.name == "pytest-ampgate" and direct.url.startswith("git+https://") and {"plot", "html"} <= direct.extras
