"""Peak memory of one steady-state training step, measured the same way in every mode.

CUDA: requested bytes from ``torch.cuda.memory_stats`` at the step's peak.  CPU: the profiler's
allocation events, so the logic is exercised in CPU-only CI too.  Either way the figure does not
depend on the order of modes or tests (see :func:`memory_pass`).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from .data import DeviceDataset
from .mode_runner import ModeRunner
from .modes import cuda_bf16_supported, cuda_index
from .precision_policy import heuristic_conv_algorithms, numerics_policy
from .timing import synchronize

MEMORY_COVERS = (
    "one training step's peak: parameters, buffers, fp32 master weights, optimizer state, gradients, activations, the input batch "
    "(a fresh copy in every mode, as a data loader delivers it, plus its casts) and temporaries; requested "
    "bytes, without allocator rounding, library workspaces or other modes' memory"
)


def _storage_bytes(tensors, seen: set) -> int:
    total = 0
    for t in tensors:
        if not torch.is_tensor(t) or t.device.type == "meta":
            continue
        try:
            local = t.to_local() if hasattr(t, "to_local") else t  # FSDP2/DTensor: this rank's shard
            storage = local.untyped_storage()
            key, size = (storage.data_ptr(), str(local.device)), storage.nbytes()
        except (RuntimeError, TypeError, NotImplementedError):  # a tensor subclass without storage
            continue
        if key in seen or size == 0:
            continue
        seen.add(key)
        total += size
    return total


def state_bytes(runner: ModeRunner) -> dict:
    """Bytes the mode holds between steps: parameters, buffers, fp32 master weights, optimizer state; and its gradients' size.

    The masters (fp16_master, Apex O2) are float32 copies the runner keeps beside the model, not
    model parameters: they are counted here, once (a BatchNorm parameter that is its own master is
    not counted twice)."""
    seen: set = set()
    params = list(runner.model.parameters())
    parameter_bytes = _storage_bytes(params, seen)
    buffer_bytes = _storage_bytes(runner.model.buffers(), seen)
    master = getattr(runner, "master", None)
    master_bytes = _storage_bytes(master.masters, seen) if master is not None else 0
    optimizer_tensors = [v for state in runner.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    optimizer_bytes = _storage_bytes(optimizer_tensors, seen)
    gradient_bytes = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    return {
        "parameter_bytes": parameter_bytes,
        "buffer_bytes": buffer_bytes,
        "master_weight_bytes": master_bytes,
        "optimizer_state_bytes": optimizer_bytes,
        "gradient_bytes": gradient_bytes,
        "state_bytes": parameter_bytes + buffer_bytes + master_bytes + optimizer_bytes,
    }


class _ForwardMarks:
    """Pre- and post-forward hooks on the model: live bytes when the forward starts and ends."""

    def __init__(self, model, read: Callable[[str], None]):
        self.handles = [
            model.register_forward_pre_hook(lambda *_a: read("start")),
            model.register_forward_hook(lambda *_a: read("end")),
        ]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def cuda_requested(device: torch.device, which: str) -> int:
    stats = torch.cuda.memory_stats(device)
    key = f"requested_bytes.all.{which}"
    return int(stats[key]) if key in stats else int(stats.get(f"allocated_bytes.all.{which}", 0))


def _fresh_batch_step(runner: ModeRunner, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
    """One step on a fresh copy of the batch, as a data loader delivers it, in every mode alike: (loss, the copy's bytes).

    The copy is freed when this returns, still inside the caller's measuring window.
    """
    xb, yb = x.clone(), y.clone()
    return runner.step(xb, yb), xb.untyped_storage().nbytes() + yb.untyped_storage().nbytes()


def _activation_bytes(live: dict, batch: int) -> int | None:
    """Live bytes the forward added (what it keeps for backward), plus the input batch: None without both marks."""
    return live["end"] - live["start"] + batch if "start" in live and "end" in live else None


def _cuda_step_memory(runner: ModeRunner, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> tuple[int, int, torch.Tensor, int]:
    """(peak above the step's start, activation bytes, loss, absolute peak) of one step, in requested bytes."""
    marks: dict = {}
    hooks = _ForwardMarks(runner.model, lambda what: marks.__setitem__(what, cuda_requested(device, "current")))
    try:
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = cuda_requested(device, "current")
        loss, batch = _fresh_batch_step(runner, x, y)
        synchronize(device)
        absolute = cuda_requested(device, "peak")
    finally:
        hooks.remove()
    return absolute - start, _activation_bytes(marks, batch), loss, absolute


CPU_PROFILER_BUSY = (
    "CPU peak memory not measured: a torch.profiler session of yours was running, and the CPU figure is read "
    "from torch.profiler, which runs one session at a time (yours keeps its events); the rest was measured"
)
"""Why a CPU run under the user's own profiler has no memory figure."""

PROFILER_LOG_LINE = re.compile(rb"^(?:USDT|ERROR|WARNING|INFO|STAGE|VERBOSE):\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \d+:\d+ \w+\.cpp:\d+\] ")
"""libkineto's own log lines (``USDT:... profiler_start``, ``ERROR:... gpuGetDeviceCount failed`` on a
machine without a GPU): written to file descriptor 2 by C++, so Python's ``sys.stderr`` never sees them."""


def profiler_in_use() -> bool:
    """Whether a profiler session (the user's ``torch.profiler.profile()``, the autograd profiler) is running.

    torch allows one at a time: starting ours inside the user's would end theirs with no events.
    """
    enabled = getattr(torch.autograd.profiler, "_is_profiler_enabled", False)
    check = getattr(getattr(torch._C, "_autograd", None), "_profiler_enabled", None)
    return bool(enabled or (check is not None and check()))


@contextmanager
def _without_profiler_log() -> Iterator[None]:
    """Keep libkineto's log lines out of the user's output, and nothing else.

    They would read as a broken GPU on every gated CPU test (and ``KINETO_LOG_LEVEL`` is read once per
    process, so setting it would change the user's own profiling too).  File descriptor 2 goes to a
    temporary file for the profiled step; afterwards every line that is not libkineto's is written
    back, in order, so what the model or the user printed meanwhile is kept.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    try:
        saved = os.dup(2)
    except OSError:  # no file descriptor 2 to guard
        yield
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            except (AttributeError, OSError, ValueError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = b"".join(line for line in held.read().splitlines(keepends=True) if not PROFILER_LOG_LINE.match(line))
            if kept:
                os.write(2, kept)


def _cpu_step_memory(runner: ModeRunner, x: torch.Tensor, y: torch.Tensor) -> tuple[int, int | None, torch.Tensor]:
    """(peak above the step's start, activation bytes, loss) of one CPU step, from the profiler's allocation events.

    The CPU allocator reports every allocation and free (requested bytes) to ``torch.profiler``;
    their running sum over the step, in time order, is the memory the step added.  Two markers
    from the forward hooks give the live bytes when the forward starts and ends.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    def mark(what: str) -> None:
        with record_function(f"ampgate::forward_{what}"):
            pass

    hooks = _ForwardMarks(runner.model, mark)
    try:
        with _without_profiler_log(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            loss, batch = _fresh_batch_step(runner, x, y)
            if runner.wait_for_collectives is not None:
                # A gloo collective's future completes before its worker thread records the collective's end
                # into this profiler; stopping the profiler meanwhile corrupts the heap (SIGABRT, torch 2.4).
                runner.wait_for_collectives()
    finally:
        hooks.remove()
    allocations, marks = [], {}
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        fields_ = getattr(node, "extra_fields", None)
        if hasattr(fields_, "alloc_size") and str(getattr(fields_, "device", "cpu")).startswith("cpu"):
            allocations.append((node.start_time_ns, int(fields_.alloc_size), int(getattr(fields_, "ptr", 0) or 0)))
        elif node.name.startswith("ampgate::forward_"):
            marks[node.name.rsplit("_", 1)[1]] = node.start_time_ns
    peak, at = window_peak(sorted(allocations), marks)
    return peak, _activation_bytes(at, batch), loss


def window_peak(allocations: list[tuple[int, int, int]], marks: dict[str, int] | None = None) -> tuple[int, dict[str, int]]:
    """(peak, live bytes at each mark) of what the window itself allocated, from time-ordered (time, size, address) events.

    A free (negative size) counts only where the window allocated that address: freeing a tensor
    that existed before the window (last step's retained activation, a tensor the garbage collector
    happened to release now) must not lower the figure, or a retained activation or a planted
    memory regression would cancel out and two runs of one workload would differ by what the
    collector did.  A free of an unknown address (no ``ptr`` in older profilers: 0) counts as before.
    """
    live = peak = 0
    owned: dict[int, int] = {}
    at: dict[str, int] = {}
    for t, size, ptr in allocations:
        for what, when in (marks or {}).items():
            if what not in at and when < t:
                at[what] = live
        if size >= 0:
            if ptr:
                owned[ptr] = owned.get(ptr, 0) + size
            live += size
        elif not ptr:
            live += size
        elif ptr in owned:
            freed = min(-size, owned[ptr])
            owned[ptr] -= freed
            if not owned[ptr]:
                del owned[ptr]
            live -= freed
        peak = max(peak, live)
    for what in marks or {}:
        at.setdefault(what, live)
    return peak, at


def memory_pass(
    runner: ModeRunner, dataset: DeviceDataset, batch_size: int, steps: int, device: torch.device, base: int | None = None
) -> tuple[dict, list]:
    """Peak memory of a steady-state training step, the same way in every mode; (figures, losses).

    Gradients are set to None before each step, so every mode starts it holding its parameters,
    buffers and optimizer state (and whatever else it keeps between steps), and the input batch
    is a fresh copy in every mode.  CUDA: requested bytes (``torch.cuda.memory_stats``, no
    allocator rounding) at the step's peak, less ``base``, what was allocated before this mode's
    model existed (after the libraries were warmed: their workspaces are in ``base`` whichever
    mode or test came first).  CPU: the parameters, buffers and optimizer state counted from the
    tensors themselves, plus the step's peak from the profiler's allocation events (requested
    bytes); only the first step is profiled.  Either way the figure does not depend on the order
    of modes or tests.  ``None`` for the figures: not measured, because the user's own profiler
    was running on the CPU (:data:`CPU_PROFILER_BUSY`).
    """
    state = state_bytes(runner)
    losses, peaks, activations, totals = [], [], [], []
    busy = False
    with numerics_policy(runner.mode), heuristic_conv_algorithms():
        for k in range(steps):
            runner.optimizer.zero_grad(set_to_none=True)
            x, y = dataset.batch(runner.steps_taken, batch_size)
            if device.type == "cuda":
                peak, activation, loss, absolute = _cuda_step_memory(runner, x, y, device)
                totals.append(absolute - (base or 0))
            elif k == 0 and profiler_in_use():  # the user's session: leave it whole, measure the rest
                losses.append(runner.step(x, y))
                busy = True
                continue
            elif k == 0:
                peak, activation, loss = _cpu_step_memory(runner, x, y)
            else:
                losses.append(runner.step(x, y))
                continue
            losses.append(loss)
            peaks.append(peak)
            if activation is not None:
                activations.append(activation)
    if busy:
        return None, losses
    figures = {
        **state,
        "step_peak_bytes": max(peaks),
        "peak_bytes": max(totals) if totals else state["state_bytes"] + max(peaks),
        "activation_bytes": max(activations) if activations else None,
        "method": "torch.cuda.memory_stats requested bytes, cuDNN algorithms by heuristics"
        if device.type == "cuda"
        else "torch.profiler CPU allocation events",
        "covers": MEMORY_COVERS,
    }
    return figures, losses


def warm_libraries(device: torch.device) -> None:
    """A small matmul and a Linear with bias per dtype before any mode is measured, so cuBLAS/cuBLASLt workspaces exist already.

    Their first call in a process allocates the workspace through the caching allocator; warmed
    here, it is charged to no mode, whichever test or mode runs first.
    """
    if device.type != "cuda":
        return
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if cuda_bf16_supported(cuda_index(device)) else [])
    for dtype in dtypes:
        a = torch.ones(64, 64, device=device, dtype=dtype, requires_grad=True)
        bias = torch.ones(64, device=device, dtype=dtype, requires_grad=True)
        (a @ a).sum().backward()
        # a Linear with bias goes through cuBLASLt's fused epilogue (addmm -> gemm_and_bias); on
        # releases without the unified cuBLAS/cuBLASLt workspace its workspace is allocated there first
        torch.nn.functional.linear(a, a, bias).sum().backward()
    synchronize(device)


def oom_message(device: torch.device, exc: BaseException) -> str:
    """An out-of-memory error with the device's memory state beside it."""
    text = f"out of memory: {str(exc).splitlines()[0]}"
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        text += (
            f" (allocated {torch.cuda.memory_allocated(device) / 2**20:.0f} MiB, "
            f"peak {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB, "
            f"free {free / 2**20:.0f} of {total / 2**20:.0f} MiB)"
        )
    return text
