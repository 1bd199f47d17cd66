"""Which tests are gated, and which modules were collected in full.

Stale baselines are the stored entries of tests that no longer exist; only a module whose every
test was collected and selected can tell that.  Anything narrower (``-k``, node ids, ``--lf``, a
plugin that drops items) must never make a living test's baseline look stale, so every
narrowing marks its module "partial".
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ..baselines import module_of

MARKER = "amp_regression"
FIXTURES = ("ampgate", "ampgate_mnist", "ampgate_cifar")


NOT_RECORDED_ATTR = "ampgate_not_recorded"
"""The report attribute that says why a gated test's baseline was not recorded (read by the reporting)."""


@dataclass
class CollectionState:
    """What this process (or, on the xdist controller, every worker) collected."""

    gated_ids: set[str] = field(default_factory=set)
    modules: set[str] = field(default_factory=set)
    """Modules (paths relative to the rootdir) that hold gated tests."""
    partial_modules: set[str] = field(default_factory=set)
    """Modules collected or selected only in part: their entries can never be stale."""
    reported: set[str] = field(default_factory=set)
    """Collectors that reported (before any plugin filtered their results)."""
    raw_items: set[str] = field(default_factory=set)
    raw_collectors: set[str] = field(default_factory=set)

    SHARED = ("gated_ids", "partial_modules", "modules")
    """What an xdist worker sends its controller (which collects nothing itself)."""

    def add_gated(self, node_id: str) -> None:
        self.gated_ids.add(node_id)
        self.modules.add(module_of(node_id))

    def collected(self, nodeid: str, results, is_item) -> None:
        """A collector's report, before any plugin filtered it."""
        self.reported.add(nodeid)
        for node in results:
            (self.raw_items if is_item(node) else self.raw_collectors).add(node.nodeid)

    def finish(self, selected: set[str], last_failed: bool) -> None:
        """A module counts as collected in full only if every item it yielded is still selected and
        every class in it was collected; anything narrower can never make its baselines stale."""
        if last_failed:  # --last-failed narrows by design, even where it keeps a whole module
            self.partial_modules |= self.modules
            return
        items, classes = defaultdict(set), defaultdict(set)  # by module, grouped once (not once per module)
        for node_id in self.raw_items:
            items[module_of(node_id)].add(node_id)
        for node_id in self.raw_collectors:
            module = module_of(node_id)
            if node_id != module:
                classes[module].add(node_id)
        for module in self.modules:
            if not items[module] or items[module] - selected or classes[module] - self.reported:
                self.partial_modules.add(module)

    def complete_modules(self) -> set[str]:
        return self.modules - self.partial_modules

    def to_worker_output(self) -> dict[str, list[str]]:
        return {name: sorted(getattr(self, name)) for name in self.SHARED}

    def merge_worker_output(self, collected: dict) -> None:
        for name in self.SHARED:
            getattr(self, name).update(collected.get(name, ()))


def is_gated(item) -> bool:
    return item.get_closest_marker(MARKER) is not None or any(f in getattr(item, "fixturenames", ()) for f in FIXTURES)


def test_id(node_or_id) -> str:
    """The test's own node id: without the ``@<group>`` suffix that ``--dist loadgroup`` (chosen by
    the user; pytest < 9.2) appends to tests with an ``xdist_group`` mark on its workers (baselines,
    reports and locks are keyed by the real id).  A test function's name holds no ``@``, and one in
    a parametrize id sits before its closing ``]``."""
    nodeid = getattr(node_or_id, "nodeid", node_or_id)
    head, sep, tail = nodeid.rpartition("@")
    return head if sep and tail and "]" not in tail and "::" not in tail and "/" not in tail else nodeid


def named_in_part(config, modules: set) -> set:
    """Modules the command line picks tests from by node id (``tests/test_x.py::test_y``).

    Like ``-k``, that collects a module in part, so the entries of its other tests are not stale.
    When such an argument cannot be mapped to a node id, every module counts as picked in part.
    """
    picked = set()
    root = Path(config.rootpath).resolve()
    for arg in config.args:
        path, sep, _rest = str(arg).partition("::")
        if not sep:
            continue
        try:
            picked.add(Path(config.invocation_params.dir, path).resolve().relative_to(root).as_posix())
        except ValueError:
            return set(modules)
    return picked


def marker_settings(item) -> tuple[tuple, dict]:
    """Every amp_regression marker on the test (module, class, function, stacked): merged, the
    closest one (as pytest's get_closest_marker sees it) winning each setting it names."""
    args, kwargs = (), {}
    for marker in reversed(list(item.iter_markers(MARKER))):
        args += tuple(marker.args)
        kwargs.update(marker.kwargs)
    return args, kwargs
