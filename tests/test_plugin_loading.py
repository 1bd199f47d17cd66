"""Loading the plugin: only the plugin subpackage knows pytest, and with --ampgate off a run imports no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from session_helpers import (  # noqa: F401  (imported_first: autouse)
    CPU,
    gated,
    imported_first,
    private_locks,
    project,
)

import pytest_ampgate

# --- 1. nothing when off ---------------------------------------------------------------------


PROBE = """
import atexit, sys

def _report():
    heavy = [m for m in ("torch", "numpy", "torchvision", "matplotlib", "cpuinfo") if m in sys.modules]
    print("HEAVY-MODULES:", ",".join(heavy) or "-", flush=True)

atexit.register(_report)  # after every hook of the session, the plugin's included
"""


def test_a_plain_run_imports_no_torch(pytester):
    pytester.makeconftest(PROBE)
    pytester.makepyfile(test_plain="def test_trivial():\n    assert 1 + 1 == 2\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    out = result.stdout.str()
    assert "ampgate-" in out  # the plugin was loaded (its entry point: "plugins: ... ampgate-0.1.0")
    assert "HEAVY-MODULES: -" in out, out


PACKAGE = Path(pytest_ampgate.__file__).parent
PLUGIN = PACKAGE / "plugin"


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def _is_pytest(module: str) -> bool:
    top = module.split(".", 1)[0]
    return top in ("pytest", "_pytest")


def test_only_the_plugin_subpackage_imports_pytest():
    engine = [p for p in PACKAGE.rglob("*.py") if PLUGIN not in p.parents]
    assert engine, "the package's modules were not found"
    offenders = {str(p.relative_to(PACKAGE)): sorted(m for m in _imported_modules(p) if _is_pytest(m)) for p in engine}
    assert {name: mods for name, mods in offenders.items() if mods} == {}


def test_the_plugin_subpackage_is_where_pytest_is_imported():
    """The check above looks in the right place: the plugin itself does import pytest."""
    assert any(_is_pytest(m) for p in PLUGIN.glob("*.py") for m in _imported_modules(p))


def test_importing_the_plugin_imports_no_torch():
    probe = (
        "import sys\n"
        "import pytest_ampgate.plugin\n"
        "heavy = [m for m in ('torch', 'numpy', 'torchvision', 'matplotlib', 'cpuinfo') if m in sys.modules]\n"
        "print('HEAVY:', ','.join(heavy) or '-')\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert "HEAVY: -" in out, out


def test_the_entry_point_module_holds_the_hooks_and_fixtures():
    import pytest_ampgate.plugin as plugin

    for name in ("pytest_addoption", "pytest_configure", "ampgate", "ampgate_mnist", "ampgate_cifar"):
        assert hasattr(plugin, name), name
