"""Precision coverage: which dtype every matmul/convolution of a training step really computed in.

The commonest AMP regression is not a slow kernel but a layer silently left in float32: a block
wrapped in ``torch.autocast(device, enabled=False)`` that feeds itself ``.float()`` inputs, a custom
op autocast does not cover, a parameter someone forgot to cast. Such a layer costs the speedup
without failing anything. Timing finds it only through noise; this module finds it exactly, on CPU
and GPU alike, by watching one step (forward + backward) from below autocast and weighing every
matmul/convolution by its FLOPs.

How it works, and why these pieces:

* A :class:`~torch.utils._python_dispatch.TorchDispatchMode` sees every aten op *after* autocast
  has cast its inputs and *after* autograd has unrolled backward into ordinary ops, so the dtype it
  sees is the dtype the kernel computed in, forward and backward. It is the mechanism
  :class:`torch.utils.flop_counter.FlopCounterMode` is built on, and we mirror that class's dispatch
  logic (including its decomposition of ops that have no formula) so that our ``total_flops``
  equals ``FlopCounterMode.get_total_flops()`` for the same step.
* FLOP formulas come from ``torch.utils.flop_counter.flop_registry`` (looked up when the recorder
  is entered, so formulas added with ``register_flop_formula`` count too). Ops without a formula
  (elementwise, reductions, norms) are ignored: they are memory-bound and rarely decide the AMP win.
* :class:`torch.utils.module_tracker.ModuleTracker` says which modules are running, in forward and
  in backward. It names modules ``"<RootClass>.<fqn>"`` (``"Net.fc1"``, ``"Net"`` for the root);
  we report the innermost one, translated to the ``named_modules()`` path (``"fc1"``,
  ``"features.0"``), with the root shown as ``"<model>"`` and ops outside any module as
  ``"<unknown>"``.

The compute dtype of an op is the dtype of its first floating-point tensor argument (the matmul or
convolution operands; float8 counts for ``_scaled_mm``).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from pytest_ampgate.errors import BaselineError
from pytest_ampgate.records import to_dict

try:  # torch >= 2.4 has it; without it every op is attributed to "<unknown>".
    from torch.utils.module_tracker import ModuleTracker as _ModuleTracker
except ImportError:  # pragma: no cover - depends on the torch build
    _ModuleTracker = None


if _ModuleTracker is not None and hasattr(_ModuleTracker, "_fw_pre_hook") and hasattr(_ModuleTracker, "_fw_post_hook"):

    class _ModelTracker(_ModuleTracker):
        """torch's ModuleTracker on one model's own modules, through per-module hooks.

        ModuleTracker registers *global* module hooks; while any exist, calling a ``torch.compile``d
        module warns ("Using torch.compile(module) when there are global hooks on modules",
        torch/_dynamo/eval_frame.py) and the hooks fire once more for the OptimizedModule.  Hooks on
        the measured model's modules see the same forward and backward, and leave nothing global.
        """

        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self._model_modules = list(model.modules())
            self._handles: list = []

        def __enter__(self):
            for module in self._model_modules:
                self._handles.append(module.register_forward_pre_hook(self._fw_pre_hook))
                self._handles.append(module.register_forward_hook(self._fw_post_hook))
            return self

        def __exit__(self, *args):
            handles, self._handles = self._handles, []
            for handle in handles:
                handle.remove()

else:  # pragma: no cover - a torch whose ModuleTracker hooks are named otherwise: its global hooks, as before
    _ModelTracker = None


def _holds_compiled(model: torch.nn.Module) -> bool:
    """The model is, or contains, a ``torch.compile``d module (an OptimizedModule)."""
    return any(type(m).__name__ == "OptimizedModule" and type(m).__module__.startswith("torch._dynamo") for m in model.modules())


__all__ = [
    "LOW_PRECISION",
    "ROOT_NAME",
    "UNKNOWN_MODULE",
    "OpRecord",
    "PrecisionCoverage",
    "PrecisionRecorder",
    "measure_precision_coverage",
]

#: Display name of the model's root module (whose ``named_modules()`` path is ``""``).
ROOT_NAME = "<model>"
#: Module name for ops that ran outside any ``nn.Module`` (or with no tracker available).
UNKNOWN_MODULE = "<unknown>"

_FLOAT8_NAMES = (
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
)

#: Dtypes that count as "low precision": the ones AMP exists to reach. Float8 types are included
#: when this torch build has them. A frozenset, so nobody can widen the gate by mutating it.
LOW_PRECISION: frozenset[torch.dtype] = frozenset(
    [torch.float16, torch.bfloat16]
    + [getattr(torch, name) for name in _FLOAT8_NAMES if isinstance(getattr(torch, name, None), torch.dtype)]
)

_FULL_PRECISION = frozenset(["float32", "float64"])
_PHASES = ("forward", "backward")
_SCHEMA = 1


def _dtype_name(dtype: torch.dtype) -> str:
    text = str(dtype)
    return text[len("torch.") :] if text.startswith("torch.") else text


_LOW_PRECISION_NAMES = frozenset(_dtype_name(d) for d in LOW_PRECISION)


@dataclass(frozen=True)
class OpRecord:
    """FLOPs of one op kind, run by one module, in one dtype and phase, summed over its calls."""

    module: str  #: ``named_modules()`` path, ``"<model>"`` for the root, ``"<unknown>"`` outside modules
    op: str  #: the aten overload packet, e.g. ``"aten.mm"``
    dtype: str  #: compute dtype without the ``torch.`` prefix, e.g. ``"bfloat16"``
    phase: str  #: ``"forward"`` or ``"backward"``
    flops: int
    calls: int

    @property
    def low_precision(self) -> bool:
        return self.dtype in _LOW_PRECISION_NAMES


def _pct(fraction: float) -> str:
    """A percentage with one decimal that never rounds a non-zero share to 0% or a partial one to 100%."""
    if fraction <= 0.0:
        return "0.0%"
    if fraction >= 1.0:
        return "100.0%"
    if fraction < 0.001:
        return "<0.1%"
    return f"{math.floor(fraction * 1000) / 10:.1f}%" if fraction > 0.999 else f"{fraction * 100:.1f}%"


@dataclass(frozen=True)
class PrecisionCoverage:
    """What one step computed in: records aggregated by (module, op, dtype, phase), in first-seen order.

    ``share`` is 0.0 when no matmul/convolution ran at all (``total_flops == 0``): a step with
    nothing to cover cannot claim coverage, and callers that need to tell "no FLOPs" from
    "all fp32" check ``total_flops``.
    """

    records: tuple[OpRecord, ...]
    total_flops: int
    low_precision_flops: int

    @property
    def share(self) -> float:
        """Fraction of matmul/convolution FLOPs that ran in a :data:`LOW_PRECISION` dtype."""
        if self.total_flops <= 0:
            return 0.0
        return self.low_precision_flops / self.total_flops

    @classmethod
    def from_records(cls, records: Iterable[OpRecord]) -> PrecisionCoverage:
        records = tuple(records)
        total = sum(r.flops for r in records)
        low = sum(r.flops for r in records if r.low_precision)
        return cls(records=records, total_flops=total, low_precision_flops=low)

    def by_dtype(self) -> dict[str, int]:
        """FLOPs per compute dtype, largest first."""
        totals: dict[str, int] = {}
        for r in self.records:
            totals[r.dtype] = totals.get(r.dtype, 0) + r.flops
        return dict(sorted(totals.items(), key=lambda kv: (-kv[1], kv[0])))

    def fp32_hotspots(self, limit: int | None = 5) -> list[tuple[str, int, float]]:
        """``(module, flops, fraction of total)`` for modules whose FLOPs ran in float32/float64.

        Forward and backward are summed per module; largest first, ties by name. ``limit=None``
        returns them all.
        """
        per_module: dict[str, int] = {}
        for r in self.records:
            if r.dtype in _FULL_PRECISION and r.flops > 0:
                per_module[r.module] = per_module.get(r.module, 0) + r.flops
        ranked = sorted(per_module.items(), key=lambda kv: (-kv[1], kv[0]))
        if limit is not None:
            ranked = ranked[: max(0, int(limit))]
        total = self.total_flops
        return [(name, flops, flops / total if total > 0 else 0.0) for name, flops in ranked]

    def describe(self, limit: int = 3) -> str:
        """One line: ``"97.2% of matmul/conv FLOPs in low precision; fp32: fc2 (2.1%), head (0.7%)"``."""
        if self.total_flops <= 0:
            return "no matmul/conv FLOPs recorded"
        line = f"{_pct(self.share)} of matmul/conv FLOPs in low precision"
        every = self.fp32_hotspots(limit=None)
        if every:
            shown = every[: max(0, limit)]
            parts = [f"{name} ({_pct(frac)})" for name, _, frac in shown]
            if len(every) > len(shown):
                parts.append(f"+{len(every) - len(shown)} more")
            line += "; fp32: " + ", ".join(parts)
        return line

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict; ``share`` is included for readers and ignored by :meth:`from_dict`."""
        return {"schema": _SCHEMA, **to_dict(self), "share": self.share}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PrecisionCoverage:
        """Inverse of :meth:`to_dict`; raises :class:`~pytest_ampgate.errors.BaselineError` on bad input."""
        if not isinstance(d, Mapping):
            raise BaselineError(f"precision coverage must be a JSON object, got {type(d).__name__}")
        schema = d.get("schema", _SCHEMA)
        if schema != _SCHEMA:
            raise BaselineError(f"precision coverage has schema {schema!r}; this version reads schema {_SCHEMA}")
        raw = d.get("records")
        if not isinstance(raw, list):
            raise BaselineError("precision coverage needs a 'records' list")
        records = []
        for i, item in enumerate(raw):
            try:
                rec = OpRecord(
                    module=str(item["module"]),
                    op=str(item["op"]),
                    dtype=str(item["dtype"]),
                    phase=str(item["phase"]),
                    flops=int(item["flops"]),
                    calls=int(item["calls"]),
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise BaselineError(f"precision coverage record {i} is malformed: {exc!r}") from None
            if rec.phase not in _PHASES:
                raise BaselineError(f"precision coverage record {i} has phase {rec.phase!r}; expected one of {_PHASES}")
            records.append(rec)
        derived = cls.from_records(records)
        for key in ("total_flops", "low_precision_flops"):
            if key in d and d[key] != getattr(derived, key):
                raise BaselineError(f"precision coverage {key}={d[key]!r} disagrees with its records ({getattr(derived, key)})")
        return derived


# Metadata queries FlopCounterMode declines (they matter only for tensor subclasses such as NJT);
# mirrored so both see the same op stream.
def _metadata_ops() -> frozenset:
    aten = torch.ops.aten
    found = []
    for packet, overload in (
        ("sym_is_contiguous", "default"),
        ("is_contiguous", "default"),
        ("is_contiguous", "memory_format"),
        ("is_strides_like_format", "default"),
        ("is_non_overlapping_and_dense", "default"),
        ("size", "default"),
        ("sym_size", "default"),
        ("stride", "default"),
        ("sym_stride", "default"),
        ("storage_offset", "default"),
        ("sym_storage_offset", "default"),
        ("numel", "default"),
        ("sym_numel", "default"),
        ("dim", "default"),
    ):
        try:
            found.append(getattr(getattr(aten, packet), overload))
        except (AttributeError, RuntimeError):
            pass
    try:
        found.append(torch.ops.prim.layout.default)
    except (AttributeError, RuntimeError):
        pass
    return frozenset(found)


def _compute_dtype(args: Any, kwargs: Mapping[str, Any]) -> torch.dtype | None:
    flat, _ = tree_flatten((args, kwargs))
    first_tensor = None
    for a in flat:
        if isinstance(a, torch.Tensor):
            if a.dtype.is_floating_point:
                return a.dtype
            if first_tensor is None:
                first_tensor = a.dtype
    return first_tensor


class _CoverageMode(TorchDispatchMode):
    """Runs every op unchanged and reports the ones ``flop_registry`` has a formula for."""

    def __init__(self, recorder: PrecisionRecorder) -> None:
        super().__init__()
        self._recorder = recorder
        self._registry = recorder._registry
        self._skip = _metadata_ops()
        self._device_op = getattr(getattr(torch.ops, "prim", None), "device", None)
        self._device_op = getattr(self._device_op, "default", None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs if kwargs else {}
        if func in self._skip:
            return NotImplemented
        packet = getattr(func, "_overloadpacket", None)
        if packet is None:  # higher-order ops and the like: run them, count nothing
            return func(*args, **kwargs)
        if packet not in self._registry and func is not self._device_op:
            # Same as FlopCounterMode: an op without a formula may decompose into ones with one.
            decompose = getattr(func, "decompose", None)
            if decompose is not None:
                with self:
                    r = decompose(*args, **kwargs)
                if r is not NotImplemented:
                    return r
        out = func(*args, **kwargs)
        formula = self._registry.get(packet)
        if formula is not None:
            flops = formula(*args, **kwargs, out_val=out)
            self._recorder._record(packet, _compute_dtype(args, kwargs), int(flops))
        return out


class PrecisionRecorder:
    """Context manager that records the compute dtype and FLOPs of every matmul/convolution.

    ``model`` is optional: with it, module names are exactly its ``named_modules()`` paths (modules
    outside it keep the tracker's ``"<Class>.<path>"`` name, except when the model holds a
    ``torch.compile``d module: then only its own modules are tracked, through per-module hooks); without it, names are taken relative
    to the outermost module the step called, so the usual single ``model(x)`` call gives the same
    names either way. Not re-entrant; one recorder per step.
    """

    def __init__(self, model: torch.nn.Module | None = None) -> None:
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
        self._model = model
        self._registry: dict = {}
        self._lock = threading.Lock()
        self._agg: dict[tuple[str, str, str, str], list[int]] = {}
        self._names: dict[str, str] = {}
        self._tracker: Any = None
        self._mode: _CoverageMode | None = None
        self._active = False
        self._result: PrecisionCoverage | None = None

    # -- context manager -------------------------------------------------------------------
    def __enter__(self) -> PrecisionRecorder:
        if self._active:
            raise RuntimeError("PrecisionRecorder is not re-entrant")
        from torch.utils import flop_counter

        self._registry = dict(flop_counter.flop_registry)
        self._agg = {}
        self._result = None
        self._names = self._name_map(self._model)
        if self._model is not None and _ModelTracker is not None and _holds_compiled(self._model):
            tracker = _ModelTracker(self._model)  # global hooks would trip torch.compile's warning
        else:
            tracker = _ModuleTracker() if _ModuleTracker is not None else None
        mode = _CoverageMode(self)
        if tracker is not None:
            tracker.__enter__()
            # Name the model's tree from its root before anything runs, so a step that calls a
            # submodule first still gets named_modules() paths (private helper: feature-detected).
            if self._model is not None and hasattr(tracker, "_get_mod_name"):
                try:
                    tracker._get_mod_name(self._model)
                except Exception:  # pragma: no cover - naming is best effort
                    pass
        try:
            mode.__enter__()
        except BaseException:
            if tracker is not None:
                tracker.__exit__(None, None, None)
            raise
        self._tracker, self._mode, self._active = tracker, mode, True
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._active:
            return None
        mode, tracker = self._mode, self._tracker
        self._mode, self._tracker, self._active = None, None, False
        try:
            if mode is not None:
                mode.__exit__(exc_type, exc, tb)
        finally:
            if tracker is not None:
                tracker.__exit__(exc_type, exc, tb)
            self._result = self._build()
        return None  # never swallow the step's exception

    # -- results ---------------------------------------------------------------------------
    def result(self) -> PrecisionCoverage:
        """The coverage recorded so far (final once the context has exited)."""
        if self._result is not None and not self._active:
            return self._result
        return self._build()

    def _build(self) -> PrecisionCoverage:
        with self._lock:
            items = list(self._agg.items())
        records = [OpRecord(module=m, op=o, dtype=d, phase=p, flops=v[0], calls=v[1]) for (m, o, d, p), v in items]
        return PrecisionCoverage.from_records(records)

    # -- recording (called from the dispatch mode) -----------------------------------------
    def _record(self, packet: Any, dtype: torch.dtype | None, flops: int) -> None:
        module, phase = self._where()
        key = (module, str(packet), _dtype_name(dtype) if dtype is not None else "unknown", phase)
        with self._lock:
            slot = self._agg.get(key)
            if slot is None:
                self._agg[key] = [flops, 1]
            else:
                slot[0] += flops
                slot[1] += 1

    def _where(self) -> tuple[str, str]:
        tracker = self._tracker
        if tracker is None:
            bw = _in_backward()
            return UNKNOWN_MODULE, "backward" if bw else "forward"
        try:
            bw = bool(tracker.is_bw)
        except Exception:  # pragma: no cover - very old trackers
            bw = _in_backward()
        parents = [p for p in set(tracker.parents) if p != "Global"]
        if not parents:
            return UNKNOWN_MODULE, "backward" if bw else "forward"
        # Innermost = deepest name; ties (stale backward entries) broken by name for determinism.
        inner = max(parents, key=lambda n: (n.count("."), n))
        return self._normalise(inner), "backward" if bw else "forward"

    # -- naming ----------------------------------------------------------------------------
    @staticmethod
    def _name_map(model: torch.nn.Module | None) -> dict[str, str]:
        """Tracker name -> named_modules() path, for every path to every submodule (shared ones too)."""
        if model is None:
            return {}
        prefix = type(model).__name__
        mapping = {}
        for fqn, _ in model.named_modules(remove_duplicate=False):
            mapping[f"{prefix}.{fqn}" if fqn else prefix] = fqn
        return mapping

    def _normalise(self, tracker_name: str) -> str:
        fqn = self._names.get(tracker_name)
        if fqn is None:
            if self._model is not None:
                # A module outside the given model (a separate head, a loss module): keep the
                # tracker's "<Class>.<path>" name rather than pass it off as part of the model.
                return tracker_name
            # No model given: drop the root class name the tracker prefixes, giving the path
            # relative to the outermost module that ran.
            _, dot, rest = tracker_name.partition(".")
            fqn = rest if dot else ""
        return fqn if fqn else ROOT_NAME


def _in_backward() -> bool:
    fn = getattr(torch._C, "_current_graph_task_id", None)
    return bool(fn is not None and fn() != -1)


def measure_precision_coverage(step: Callable[[], Any], model: torch.nn.Module | None = None) -> PrecisionCoverage:
    """Run ``step()`` once (forward + loss + backward, optimizer step optional) and say what it computed in.

    The step runs exactly as it would otherwise, just slower (every op passes through Python), so
    use it on a warm, representative step, not inside a timed loop. Exceptions from ``step``
    propagate after the recorder has been removed.
    """
    with PrecisionRecorder(model) as rec:
        step()
    return rec.result()
