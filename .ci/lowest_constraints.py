"""Print pip constraints that pin every floor pyproject.toml claims, so CI tests the lowest versions.

pyproject.toml is the one home of the floors: this reads them (``name>=X`` becomes ``name==X``) from
the runtime dependencies and from the test extra's pytest-xdist (the plugin schedules through it);
the other test-only extras float. ``--python`` prints requires-python's floor instead (``3.10``).
"""

import re
import sys
from pathlib import Path

import tomllib

PINNED_TEST_EXTRAS = ("pytest-xdist",)
FLOOR = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(?:\[[^\]]*\])?\s*>=\s*([0-9][0-9A-Za-z.]*)")


def floors(project: dict) -> list[str]:
    requirements = list(project["dependencies"])
    requirements += [r for r in project["optional-dependencies"]["test"] if r.split(">")[0].strip() in PINNED_TEST_EXTRAS]
    pins = []
    for requirement in requirements:
        match = FLOOR.match(requirement)
        if match is None:
            raise SystemExit(f"{requirement!r} in pyproject.toml has no '>=' floor: give it one, so the lowest CI leg can test it")
        pins.append(f"{match[1]}=={match[2]}")
    return pins


def main() -> None:
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    if sys.argv[1:] == ["--python"]:
        print(re.fullmatch(r">=\s*(\d+\.\d+)", project["requires-python"])[1])
    else:
        print("\n".join(floors(project)))


if __name__ == "__main__":
    main()
