"""Imports point down the layers that docs/architecture.md draws: no upward import, no circle, no private name.

The layer table is read from the document itself, so the picture a newcomer reads and the rule
the suite enforces cannot drift apart.  Each rule is also shown failing on a planted package.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "pytest_ampgate"
ARCHITECTURE = ROOT / "docs" / "architecture.md"


def declared_layers(doc: Path = ARCHITECTURE) -> dict[str, int]:
    """``{module or subpackage: layer number}`` from the doc's ``| layer | modules | ... |`` table."""
    layers = {}
    for line in doc.read_text(encoding="utf-8").splitlines():
        match = re.match(r"\|\s*(\d+)\s[^|]*\|([^|]*)\|", line)
        if match:
            for name in re.findall(r"`([\w.]+)`", match.group(2)):
                layers[name] = int(match.group(1))
    return layers


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:`` (annotations only: never imported at run time)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def import_edges(root: Path) -> list[tuple[str, str, str]]:
    """(importer, imported module, name) for every import of the package by itself; name '' for a whole module."""
    package = root.name
    edges = []
    for path in sorted(root.rglob("*.py")):
        importer = _module_name(path, root)
        here = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
        for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                edges += [(importer, a.name, "") for a in node.names if a.name.split(".")[0] == package]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")[: len(here.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != package:
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    is_module = (root.parent / Path(*sub.split("."))).with_suffix(".py").exists() or (
                        root.parent / Path(*sub.split("."))
                    ).is_dir()
                    edges.append((importer, sub, "") if is_module else (importer, target, alias.name))
    return edges


def layer_of(module: str, layers: dict[str, int], package: str) -> tuple[str, int | None]:
    """The table entry that covers ``module`` (itself, or the subpackage it sits in) and its layer."""
    if module == package:
        return package, layers.get(package)
    parts = module.split(".")[1:]
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in layers:
            return key, layers[key]
    return ".".join(parts), None


def problems(root: Path, layers: dict[str, int]) -> list[str]:
    """Every breach of the three rules, each said with the fix."""
    package = root.name
    found = []
    modules = {_module_name(p, root) for p in root.rglob("*.py")}
    for module in sorted(modules):
        key, layer = layer_of(module, layers, package)
        if layer is None:
            found.append(
                f"{module} is in no layer: add `{key}` to the layer table in docs/architecture.md (the lowest layer whose modules it imports)"
            )
    graph: dict[str, set[str]] = {}
    for importer, target, name in import_edges(root):
        _, la = layer_of(importer, layers, package)
        _, lb = layer_of(target, layers, package)
        if la is not None and lb is not None and lb > la:
            found.append(
                f"upward import: {importer} (layer {la}) imports {target} (layer {lb}); move what it needs down, or the importer up"
            )
        if name.startswith("_") and not name.startswith("__") and target != importer:
            found.append(f"private import: {importer} imports {target}.{name}; make the name public in {target}, or keep the use inside it")
        if target != importer and target in modules:
            graph.setdefault(importer, set()).add(target)
    for circle in _circles(graph):
        found.append(f"import circle: {' -> '.join(circle + circle[:1])}; move the shared names into the lower of them")
    return found


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_package_keeps_its_layers():
    layers = declared_layers()
    assert layers, "docs/architecture.md lost its layer table"
    assert problems(ROOT / PACKAGE, layers) == []


@pytest.fixture
def planted(tmp_path):
    """A small package with one breach of each rule, and a table in the doc's format."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "low.py": "from .high import THING\n",  # upward
        "base.py": "_hidden = 1\n",
        "high.py": "from .base import _hidden\nTHING = 1\n",  # private name
        "a.py": "def f():\n    from . import b\n",  # a circle through a function-level import
        "b.py": "from .a import f\n",
        "typed.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .high import THING\n",  # not a run-time edge
        "stray.py": "",
        "sub/__init__.py": "from .. import low\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    doc = tmp_path / "architecture.md"
    doc.write_text(
        "| layer | modules | what |\n| --- | --- | --- |\n"
        "| 1 low | `low`, `base`, `a`, `b`, `typed` | x |\n| 2 high | `high`, `sub` | y |\n| 3 top | `pkg` | z |\n"
    )
    return pkg, declared_layers(doc)


def test_each_rule_fails_on_a_planted_breach_and_says_the_fix(planted):
    pkg, layers = planted
    found = problems(pkg, layers)
    assert any(p.startswith("upward import: pkg.low (layer 1) imports pkg.high (layer 2)") for p in found), found
    assert any(p.startswith("private import: pkg.high imports pkg.base._hidden") for p in found), found
    assert any(p.startswith("import circle: pkg.a -> pkg.b -> pkg.a") for p in found), found
    assert any(p.startswith("pkg.stray is in no layer: add `stray` to the layer table") for p in found), found
    assert not any("pkg.typed" in p for p in found), "an import under TYPE_CHECKING never runs"
    assert len(found) == 4, found


def test_mode_validation_does_not_import_the_distributed_package():
    """config checks a marker's mode names from parallel_modes' table: torch.distributed stays unloaded."""
    code = (
        "import sys; from pytest_ampgate.config import _modes; "
        "print(_modes('modes', ['fsdp2_bf16', 'amp_bf16'])); "
        "print(sorted(m for m in sys.modules if m.startswith('pytest_ampgate.distributed')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["('fsdp2_bf16', 'amp_bf16')", "[]"]
