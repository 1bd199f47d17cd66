"""pytest-xdist: every gated test on one worker, plain tests on the others meanwhile.

Why not ``xdist_group`` with ``--dist loadgroup`` (what the plugin used to force): on pytest 9.2 a
node id is built from ``Node._id``, so the ``@group`` suffix xdist's worker writes into
``item._nodeid`` no longer reaches the controller and the grouping silently does nothing; and
loadgroup's scheduler (LoadScopeScheduling) hangs for ever once a crashed worker is replaced
(pytest-xdist issues #1323, #1327, #1378).  So the plugin keeps xdist's own ``load`` scheduling,
whose crash handling works (it reports the test a worker died on and hands the rest out again),
and changes only the first distribution: the gated tests go to one worker, in collection order.

The controller collects nothing itself, so each worker writes the ids of its gated tests to a file
in a folder the controller made (named in ``workerinput``) before it reports its collection.  A
worker that cannot write there (a remote ``--tx ssh`` worker) leaves plain ``load`` scheduling in
place: the device lock still runs one gated test at a time.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

from xdist.scheduler import LoadScheduling


def gated_ids_file(folder: str | os.PathLike, worker_id: str) -> Path:
    return Path(folder) / f"gated-{worker_id}.json"


def write_gated_ids(folder: str | os.PathLike, worker_id: str, node_ids: list[str]) -> None:
    """On a worker: its gated tests' node ids, written whole (a temp file renamed into place)."""
    path = gated_ids_file(folder, worker_id)
    temp = path.with_suffix(".tmp")
    try:
        temp.write_text(json.dumps(node_ids), encoding="utf-8")
        os.replace(temp, path)
    except OSError:
        pass  # not the controller's machine: plain load scheduling, serialised by the device lock


def read_gated_ids(folder: str | os.PathLike, worker_id: str) -> set[str] | None:
    """On the controller: the gated ids a worker wrote, or None if it wrote none."""
    try:
        return set(json.loads(gated_ids_file(folder, worker_id).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


class GatedLoadScheduling(LoadScheduling):
    """xdist's ``load`` scheduling, with every gated test sent up front to one worker.

    Only :meth:`schedule`'s first distribution differs; the rest (topping workers up as they finish,
    a crashed worker's test reported as failed and its other tests handed out again, shutting
    down) is xdist's own.  Plain tests fill the gated worker too, once its gated tests are done.
    """

    def __init__(self, config, log=None, *, folder: str):
        super().__init__(config, log)
        self.folder = folder

    def _gated_indices(self, collection: list[str]) -> list[int] | None:
        node = next(iter(self.node2collection))
        gated = read_gated_ids(self.folder, node.gateway.id)
        if gated is None:
            return None
        return [index for index, node_id in enumerate(collection) if node_id in gated]

    def schedule(self) -> None:
        if self.collection is not None or len(self.nodes) < 2:
            return super().schedule()  # later calls (a replaced worker), or nobody to run plain tests meanwhile
        collection = next(iter(self.node2collection.values()))
        gated = self._gated_indices(collection)
        if not gated:
            return super().schedule()
        if not self._check_nodes_have_same_collection():
            self.log("**Different tests collected, aborting run**")
            return
        self.collection = collection
        if self.maxschedchunk is None:
            self.maxschedchunk = len(collection)
        owner, *others = self.nodes
        chosen = set(gated)
        self.pending[:] = [index for index in range(len(collection)) if index not in chosen]
        self.node2pending[owner].extend(gated)
        owner.send_runtest_some(gated)
        if len(gated) < 2:
            # xdist's worker starts a test once it holds the next one (or is shut down)
            self._send_tests(owner, 1)
        if len(self.pending) < 2 * len(others):
            nodes = itertools.cycle(others)
            for _ in range(len(self.pending)):
                self._send_tests(next(nodes), 1)
        else:
            chunk = max(2, min(len(self.pending) // len(others) // 4, self.maxschedchunk))
            for node in others:
                self._send_tests(node, chunk)
        if not self.pending:
            for node in self.nodes:
                node.shutdown()
