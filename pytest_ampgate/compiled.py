"""torch.compile as a gated dimension: the ``compile`` setting, wrapping, and dynamo's own counts.

Every mode's model (the fp32 reference too) is wrapped the same way after the mode prepared it,
so speedup and memory compare like with like.  Graph breaks, graphs and recompiles are read from
torch's own instrumentation (``torch._dynamo.utils.counters`` and ``guard_failures``), which
exist from torch 2.4 on; what a torch lacks is reported as a clear skip reason, never guessed.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

COMPILED_SUFFIX = "+compiled"
"""Under ``also_eager``, a mode measured compiled is reported and stored as ``<mode>+compiled``."""


def compiled_name(mode: str) -> str:
    """The row name of ``mode`` measured compiled beside its eager run, e.g. ``amp_bf16+compiled``."""
    return mode + COMPILED_SUFFIX


def eager_name(name: str) -> str:
    """The precision mode of a row: ``amp_bf16+compiled`` -> ``amp_bf16``; an eager row's name unchanged."""
    return name[: -len(COMPILED_SUFFIX)] if name.endswith(COMPILED_SUFFIX) else name


def compared_with(name: str, reference: str) -> str:
    """The row ``name`` is compared with: a compiled AMP row with the compiled reference (like with like),
    the compiled reference itself with the eager reference (what compiling gains), an eager row with the reference."""
    if name.endswith(COMPILED_SUFFIX) and eager_name(name) != reference:
        return compiled_name(reference)
    return reference


@dataclass(frozen=True)
class CompileSpec:
    """How to compile: a torch.compile backend and optional mode (e.g. "reduce-overhead")."""

    backend: str = "inductor"
    mode: str | None = None

    def to_dict(self) -> dict:
        return {"backend": self.backend, "mode": self.mode}


def parse_compile(name: str, value: Any) -> CompileSpec | None:
    """The ``compile`` setting: False/None (eager), True (Inductor default), "backend[:mode]" or a dict."""
    if value is None or value is False:
        return None
    if value is True:
        return CompileSpec()
    if isinstance(value, CompileSpec):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("", "0", "false", "no", "off"):
            return None
        if text.lower() in ("1", "true", "yes", "on"):
            return CompileSpec()
        backend, _, mode = text.partition(":")
        return CompileSpec(backend.strip() or "inductor", mode.strip() or None)
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"backend", "mode"})
        if unknown:
            raise ConfigError(f"{name}: unknown key(s) {', '.join(unknown)}; valid: backend, mode")
        backend, mode = value.get("backend", "inductor"), value.get("mode")
        if not isinstance(backend, str) or (mode is not None and not isinstance(mode, str)):
            raise ConfigError(f"{name}: backend and mode must be strings, e.g. {{'backend': 'inductor', 'mode': 'reduce-overhead'}}")
        return CompileSpec(backend, mode)
    raise ConfigError(f"{name} must be true/false, 'backend[:mode]' (e.g. 'inductor:reduce-overhead') or a dict, not {value!r}")


def unsupported_reason() -> str | None:
    """Why compiled modes cannot be measured with this torch, or None when they can."""
    import torch

    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile (needs torch 2.0 or newer)"
    try:
        from torch._dynamo.utils import counters  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} lacks torch._dynamo.utils.counters, needed to count graph breaks"
    return None


def compile_model(model, spec: CompileSpec):
    """``model`` wrapped by torch.compile as ``spec`` names (the module's parameters are shared)."""
    import torch

    kwargs = {"backend": spec.backend}
    if spec.mode is not None:
        kwargs["mode"] = spec.mode
    return torch.compile(model, **kwargs)


@dataclass
class DynamoCounts:
    """What dynamo compiled since the last ``reset_dynamo``: graphs, breaks (by reason) and recompiles."""

    graphs: int = 0
    graph_breaks: dict[str, int] = field(default_factory=dict)
    recompile_reasons: list[str] = field(default_factory=list)
    break_sites: list[str] = field(default_factory=list)
    """Where the user's code broke the graph: dynamo's resume functions ``torch_dynamo_resume_in_<fn>_at_<line>``."""
    resumed_at: list[str] = field(default_factory=list)
    """Every resume function in dynamo's ContinueExecutionCache since the reset: where a torch without the
    ``resumes`` counter (2.4) says the graph broke, for all modes together (the modes share the cache)."""

    @property
    def graph_break_count(self) -> int:
        return sum(self.graph_breaks.values())

    def to_dict(self) -> dict:
        return {
            "graphs": self.graphs,
            "graph_breaks": self.graph_break_count,
            "graph_break_reasons": dict(self.graph_breaks),
            "recompiles": len(self.recompile_reasons),
            "recompile_reasons": list(self.recompile_reasons),
            "graph_break_sites": list(dict.fromkeys(self.break_sites)),
        }

    def since(self, before: DynamoCounts) -> DynamoCounts:
        """What dynamo did between ``before`` and now (its counters are global to the process)."""
        breaks = {r: n - before.graph_breaks.get(r, 0) for r, n in self.graph_breaks.items() if n > before.graph_breaks.get(r, 0)}
        sites = list((Counter(self.break_sites) - Counter(before.break_sites)).elements())
        if breaks and not sites and self.resumed_at:  # torch 2.4: where dynamo resumed in this run, said as such
            sites = [f"{site} (where dynamo resumed in this run)" for site in self.resumed_at]
        return DynamoCounts(
            graphs=self.graphs - before.graphs,
            graph_breaks=breaks,
            recompile_reasons=self.recompile_reasons[len(before.recompile_reasons) :],
            break_sites=sites,
            resumed_at=list(self.resumed_at),
        )


def reset_dynamo() -> None:
    """Forget every compiled graph and count, so one mode's counts never include another's."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()


def _guard_failure_reasons() -> list[str]:
    """Each recompile's guard failure, with the frame that recompiled (file:line of the code object)."""
    try:
        from torch._dynamo.utils import guard_failures
    except ImportError:
        return []
    return [f"{_code_site(code)}: {reason}" for code, reasons in guard_failures.items() for reason in reasons if not _other_mode(reason)]


def _other_mode(reason) -> bool:
    """A guard failure that only says another precision mode's cached graph had autocast on or off.

    The modes share dynamo's cache (it is keyed by the code object), so when a mode recompiles,
    dynamo lists every cached entry that failed, the other modes' too; theirs fail on the autocast
    state, which is not why this mode recompiled.  New graphs are still counted, by ``graphs``."""
    text = str(reason)
    return "GLOBAL_STATE changed" in text and "autocast" in text and "\n" not in text.strip()


_RESUME = re.compile(r"torch_dynamo_resume_in_(?P<fn>\w+?)_at_(?P<line>\d+)")


def _code_site(code) -> str:
    match = _RESUME.search(getattr(code, "co_name", ""))
    line = match.group("line") if match else getattr(code, "co_firstlineno", "?")
    name = match.group("fn") if match else getattr(code, "co_name", "?")
    return f"{getattr(code, 'co_filename', '?')}:{line} in {name}"


def _break_sites(counters) -> list[str]:
    """``fn line N`` for each resume function dynamo made after a graph break (torch >= 2.5 counts them)."""
    sites = []
    for name, n in counters.get("resumes", {}).items():
        match = _RESUME.search(str(name))
        if match:
            sites += [f"{match.group('fn')} line {match.group('line')}"] * int(n)
    return sites


def _cached_resume_sites() -> list[str]:
    """``fn line N`` of each resume function dynamo keeps in its ContinueExecutionCache (cleared by ``torch._dynamo.reset``).

    torch 2.4 counts no ``resumes``, but dynamo still builds one resume function per graph break, named
    after the user's function and the line it resumes at (torch/_dynamo/resume_execution.py); the cache is an
    ExactWeakKeyDictionary whose ``values`` map each broken code object to its resume functions."""
    try:
        from torch._dynamo.resume_execution import ContinueExecutionCache

        tables = list(ContinueExecutionCache.cache.values.values())
    except (ImportError, AttributeError):
        return []
    sites = []
    for table in tables:
        for code in table.values():
            match = _RESUME.search(getattr(code, "co_name", ""))
            if match:
                sites.append(f"{match.group('fn')} line {match.group('line')}")
    return sorted(set(sites))


def read_counts() -> DynamoCounts:
    """The counts since the last reset, from torch._dynamo.utils.counters and guard_failures."""
    from torch._dynamo.utils import counters

    return DynamoCounts(
        graphs=int(counters["stats"]["unique_graphs"]),
        graph_breaks={str(reason): int(n) for reason, n in counters["graph_break"].items()},
        recompile_reasons=_guard_failure_reasons(),
        break_sites=_break_sites(counters),
        resumed_at=[] if "resumes" in counters else _cached_resume_sites(),
    )


@dataclass
class WarmupResult:
    """How long compiling took (the warm-up steps that compiled) and whether compiling settled."""

    compile_time_s: float
    warmup_steps: int
    settled: bool


def warm_up_until_settled(step: Callable[[], Any], min_steps: int = 1, max_steps: int = 10) -> WarmupResult:
    """Run ``step`` until one step compiles nothing new (at least ``min_steps``, at most ``max_steps``).

    The steps that compiled are timed apart as compile time; the last, settled step is not counted.
    """
    from torch._dynamo.utils import counters

    compile_time = 0.0
    for n in range(1, max_steps + 1):
        before = (counters["stats"]["unique_graphs"], len(_guard_failure_reasons()))
        start = time.perf_counter()
        step()
        elapsed = time.perf_counter() - start
        compiled = (counters["stats"]["unique_graphs"], len(_guard_failure_reasons())) != before
        if compiled:
            compile_time += elapsed
        elif n >= min_steps:
            return WarmupResult(compile_time, n, True)
    return WarmupResult(compile_time, max_steps, False)


def timed_step_problems(before: DynamoCounts, after: DynamoCounts) -> list[str]:
    """Why the timed steps are not a settled compiled model: each recompile, named by its reason."""
    new = after.recompile_reasons[len(before.recompile_reasons) :]
    problems = [f"recompiled during the timed steps: {reason}" for reason in new]
    if after.graphs > before.graphs and not new:
        problems.append(f"dynamo compiled {after.graphs - before.graphs} new graph(s) during the timed steps")
    return problems


def graph_break_problems(counts: DynamoCounts, max_graph_breaks: int | None, baseline_breaks: int | None = None) -> list[str]:
    """Failures for graph breaks beyond ``max_graph_breaks`` or beyond the baseline's count, naming reasons."""
    reasons = "; ".join(f"{r.splitlines()[0]} (x{n})" for r, n in counts.graph_breaks.items()) or "none"
    if counts.break_sites:
        reasons += f"; at {', '.join(dict.fromkeys(counts.break_sites))}"
    elif counts.graph_breaks:
        reasons += "; line not recorded: this torch's dynamo keeps no resume function for it (TORCH_LOGS=graph_breaks shows where)"
    problems = []
    if max_graph_breaks is not None and counts.graph_break_count > max_graph_breaks:
        problems.append(f"{counts.graph_break_count} graph break(s), more than max_graph_breaks={max_graph_breaks}: {reasons}")
    if baseline_breaks is not None and counts.graph_break_count > baseline_breaks:
        problems.append(f"{counts.graph_break_count} graph break(s), the baseline had {baseline_breaks}: {reasons}")
    return problems
