"""Layering of the distributed gate: no module reaches into another module's private names, and
validating a marker's modes (config) does not import the distributed package."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pytest_ampgate"


def _private_imports() -> list[str]:
    """Every ``from <module> import _name`` in the package where the module is another module."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        found.append(f"{path.relative_to(PACKAGE.parent)}: from {'.' * node.level}{node.module} import {alias.name}")
    return found


def test_no_module_imports_a_private_name_of_another():
    assert _private_imports() == []


def test_mode_validation_does_not_import_the_distributed_package():
    code = (
        "import sys; from pytest_ampgate.config import _modes; "
        "print(_modes('modes', ['fsdp2_bf16', 'amp_bf16'])); "
        "print(sorted(m for m in sys.modules if m.startswith('pytest_ampgate.distributed')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["('fsdp2_bf16', 'amp_bf16')", "[]"]
