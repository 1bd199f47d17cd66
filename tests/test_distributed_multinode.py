"""Across machines: pytest started by torchrun on every "node" is one rank of a job.

Two torchrun invocations on the loopback interface act as two nodes of 2 gloo ranks each, each in a
directory of its own (as on two hosts), running exactly the README's multi-node command (with
``--ampgate-device cpu``).  Healthy: a DDP and an FSDP2 test pass on every rank and only global rank
0 wrote files.  Then the second node is killed mid-run: the first ends within its timeout with a clear
error and nothing half-written.  Each pair of launches costs about half a minute on two cores.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_distributed import needs_gloo

README = Path(__file__).resolve().parents[1] / "docs" / "distributed.md"

TESTS = """
import pytest
import torch
from torch import nn

from pytest_ampgate import Workload


def blobs(n, seed):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, 16, generator=torch.Generator().manual_seed(123)) * 3
    y = torch.randint(0, 4, (n,), generator=g)
    return centers[y] + torch.randn(n, 16, generator=g), y


def workload():
    return Workload(
        name="blobs",
        model_factory=lambda: nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)),
        data=(*blobs(512, 0), *blobs(256, 1)),
        loss_fn=nn.CrossEntropyLoss(),
        optimizer_factory=lambda params: torch.optim.SGD(params, lr=0.1),
        batch_size=32,
    )


@pytest.mark.amp_regression(world_size=2, modes=["bf16_compress_hook"], rounds=ROUNDS, steps_per_block=4, warmup_steps=1,
                            distributed_timeout=60)
def test_ddp(ampgate):
    ampgate.run("test_multinode:workload")


@pytest.mark.amp_regression(world_size=2, modes=["fsdp2_bf16"], rounds=2, steps_per_block=4, warmup_steps=1)
def test_fsdp2(ampgate):
    ampgate.run("test_multinode:workload")
"""


def readme_command() -> list[str]:
    """The documented multi-node command block (docs/distributed.md), as argv (continuation lines joined, comments dropped)."""
    text = README.read_text()
    block = text.split("<!-- multinode-command:", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line for line in block.splitlines() if not line.lstrip().startswith("#")]
    return shlex.split(" ".join(lines).replace("\\", " "))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node(tmp_path: Path, k: int, rounds: int) -> Path:
    node = tmp_path / f"node{k}"
    (node / "tests").mkdir(parents=True)
    (node / "tmp").mkdir()
    (node / "tests" / "test_multinode.py").write_text(TESTS.replace("ROUNDS", str(rounds)))
    return node


def _start(node: Path, k: int, port: int, extra: list[str]) -> subprocess.Popen:
    variables = {"$NODE_RANK": str(k), "$HEAD": "127.0.0.1", "$CI_JOB_ID": f"{os.getpid()}-{port}"}
    argv = []
    for arg in readme_command():
        for name, value in variables.items():
            arg = arg.replace(name, value)
        argv.append(arg)
    assert argv[0] == "torchrun"
    # One machine plays both nodes, so two things differ from real hosts: the rendezvous port is a
    # free one (other jobs on this machine may hold 29500), and the head is named as the store's
    # host (on loopback both nodes match the endpoint, and whichever binds first would host it).
    argv = [arg.replace(":29500", f":{port}") for arg in argv]
    launcher = [*argv[1 : argv.index("-m")], f"--rdzv-conf=is_host={int(k == 0)}"]
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *launcher,
        *argv[argv.index("-m") :],
        "--ampgate-device",
        "cpu",
        "-p",
        "no:cacheprovider",
        *extra,
    ]
    env = {**os.environ, "TMPDIR": str(node / "tmp"), "PYTHONPATH": os.pathsep.join([str(node / "tests"), *sys.path])}
    log = open(node / "log.txt", "wb")  # noqa: SIM115 - closed by the child's exit
    return subprocess.Popen(argv, cwd=node, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_node(proc: subprocess.Popen) -> None:
    """SIGKILL a node: its launcher and every rank (torchrun starts each rank in a session of its own)."""
    for pid in [*_descendants(proc.pid), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    proc.wait(timeout=30)


def _files(node: Path) -> set[str]:
    skip = {"log.txt", "tests/test_multinode.py"}
    return {
        str(p.relative_to(node))
        for p in node.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.parts[len(node.parts)] != "tmp" and str(p.relative_to(node)) not in skip
    }


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the node kill walks /proc")
@needs_gloo
def test_two_nodes_on_loopback_gate_ddp_and_fsdp2_and_survive_a_dead_node(tmp_path):
    from pytest_ampgate.distributed import mode_unsupported_reason

    reason = mode_unsupported_reason("fsdp2_bf16", "cpu")
    if reason is not None:  # torch 2.4: FSDP2 does not run on a CPU, so its half of this test cannot
        pytest.skip(reason)
    # healthy: both nodes pass both tests; only global rank 0 wrote the report and baselines
    port = _free_port()
    nodes = [_node(tmp_path / "healthy", k, rounds=2) for k in (0, 1)]
    procs = [_start(node, k, port, ["--ampgate-update"]) for k, node in enumerate(nodes)]
    for proc in procs:
        assert proc.wait(timeout=240) == 0, [(n / "log.txt").read_text()[-3000:] for n in nodes]
    for node in nodes:
        assert len(re.findall(r" 2 passed in ", (node / "log.txt").read_text())) == 2  # each local rank
    written = [_files(node) for node in nodes]
    assert sorted(written, key=len) == [set(), {"report.json", "baselines/tests/test_multinode.json"}], written
    writer = nodes[written.index(max(written, key=len))]
    report = json.loads((writer / "report.json").read_text())
    assert [(t["outcome"], t["distributed"]["world_size"]) for t in report["tests"]] == [("pass", 4), ("pass", 4)]
    assert [r["rank"] for r in report["tests"][0]["distributed"]["ranks"]] == [0, 1, 2, 3]

    # one node killed mid-run: the other ends within its timeout (60 s) with a clear error
    port = _free_port()
    nodes = [_node(tmp_path / "killed", k, rounds=400) for k in (0, 1)]
    procs = [_start(node, k, port, []) for k, node in enumerate(nodes)]
    deadline = time.monotonic() + 120
    while not any((nodes[1] / "tmp").glob("ampgate-rank-*")) and time.monotonic() < deadline:
        time.sleep(0.2)  # node 1's ranks are measuring test_ddp
    time.sleep(2)
    killed_at = time.monotonic()
    _kill_node(procs[1])
    assert procs[0].wait(timeout=60 + 30) != 0
    took = time.monotonic() - killed_at
    log = (nodes[0] / "log.txt").read_text()
    assert took < 60, f"the surviving node took {took:.0f} s"
    assert "distributed job failed (rank " in log and "another rank or node of the job failed or went away" in log, log[-3000:]
    assert "distributed job unusable" in log  # test_fsdp2 fails at once with the same cause
    for node in nodes:
        for path in node.rglob("*.json"):
            json.loads(path.read_text())  # nothing half-written
        assert not [p for p in node.rglob("*.tmp") if "tmp" not in p.relative_to(node).parts[:1]]


@pytest.mark.parametrize(("rank", "writes"), [("1", False), ("0", True)])
def test_only_global_rank_0_of_a_job_writes_reports(pytester, monkeypatch, rank, writes):
    for name, value in {"RANK": rank, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29400"}.items():
        monkeypatch.setenv(name, value)  # what torchrun or a scheduler sets for every rank
    pytester.makepyfile("def test_plain():\n    pass\n")
    result = pytester.runpytest("--ampgate", "--ampgate-device", "cpu", "-p", "no:cacheprovider", "--ampgate-json", "report.json")
    result.assert_outcomes(passed=1)
    assert (pytester.path / "report.json").exists() is writes
