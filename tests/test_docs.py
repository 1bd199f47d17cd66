"""The documentation a newcomer reads: a short README, reference pages in docs/ whose links resolve,
and a configuration reference that is generated from the code and cannot drift from it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_the_configuration_reference_is_what_the_code_declares():
    proc = subprocess.run([sys.executable, "docs/generate_configuration.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_the_configuration_reference_names_every_setting_and_every_flag():
    from pytest_ampgate.config import SETTINGS

    text = (ROOT / "docs" / "configuration.md").read_text()
    assert all(f"| `{name}` |" in text for name in SETTINGS)
    flags = set(re.findall(r'"(--ampgate[\w-]*)"', (ROOT / "pytest_ampgate" / "plugin" / "options.py").read_text()))
    assert flags and all(f"`{flag}" in text for flag in flags), flags


def test_the_check_fails_when_the_page_is_stale(tmp_path):
    """Run against a copy whose page lost a line: the check must say so and name the command."""
    import shutil

    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "docs", copy / "docs")
    shutil.copytree(ROOT / "pytest_ampgate", copy / "pytest_ampgate", ignore=shutil.ignore_patterns("__pycache__"))
    page = copy / "docs" / "configuration.md"
    page.write_text(page.read_text().replace("| `min_speedup` |", "| `min_speedup_old` |"))
    proc = subprocess.run([sys.executable, "docs/generate_configuration.py", "--check"], cwd=copy, capture_output=True, text=True)
    assert proc.returncode == 1 and "python docs/generate_configuration.py" in proc.stderr


def test_the_readme_is_a_five_minute_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) < 250, len(lines)
    text = "\n".join(lines)
    for part in ("## Set up", "## Use it in your project", "## In CI", "## Read on"):
        assert part in text


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://", "#", "mailto:")):
                continue
            path = (page.parent / target.split("#", 1)[0]).resolve()
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert broken == []
