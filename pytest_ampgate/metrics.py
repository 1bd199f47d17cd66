"""The metric layer: how held-out quality is measured, and how far a mode may stray from fp32.

Three rules hold for every built-in metric and every user metric alike:

- **Layout.** The class axis of the scores is decided once, from the targets' shape: labels
  ``(N,)`` need scores ``(N, C)``; labels ``(N, T...)`` need ``(N, C, T...)`` or ``(N, T..., C)``.
  When both fit (as many classes as positions) the layout is refused unless stated with
  ``class_dim=``.  Positions labelled ``ignore_index`` (-100) are left out.
- **Tolerance.** A share (a metric bounded to [0, 1], such as accuracy) has absolute tolerances on
  its 0-1 scale; any other metric (loss, mse, perplexity) relative ones, a fraction of the value
  it is compared with, so a perplexity of 244 and an mse in physical units are judged alike.
- **Contract.** ``fn(model, batches)`` gets a :class:`HeldOut`: the held-out ``(x, y)`` batches,
  which may be iterated as often as the function likes, in the pre-flight check and after
  training alike.  It returns one real number (Python, numpy or a one-element tensor), which is
  checked against the metric's bounds on the pre-flight batch, before anything trains.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, WorkloadError

IGNORE_INDEX = -100
"""The label that marks a position to leave out (PyTorch's ``cross_entropy`` default)."""

SHARE_SAME_RUN_TOLERANCE = 0.08
"""Default same-run tolerance of a share (absolute): see "Same-run tolerances" in BENCHMARKS.md."""
RELATIVE_SAME_RUN_TOLERANCE = 0.10
"""Default same-run tolerance of an unbounded metric (relative to fp32's value): see BENCHMARKS.md."""
RELATIVE_BASELINE_TOLERANCE = 0.10
"""Default tolerance of an unbounded metric against its stored baseline (relative to the stored value)."""


# --- where the prediction is -------------------------------------------------------------------


def prediction_of(output: Any) -> torch.Tensor:
    """The prediction in a model's output: the tensor itself, the first element of a tuple or list,
    the ``logits`` of a dict or a Hugging Face style ``ModelOutput`` (or its only tensor).

    The loss always receives the output as the model returned it; only the metric needs this.
    """
    if torch.is_tensor(output):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if torch.is_tensor(logits):
        return logits
    if isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
        return output[0]
    if isinstance(output, Mapping):
        tensors = [k for k, v in output.items() if torch.is_tensor(v)]
        if len(tensors) == 1:
            return output[tensors[0]]
        raise WorkloadError(
            f"the model returned a {type(output).__name__} with keys {list(output)} and no 'logits'; "
            "name the prediction 'logits', or give the Workload prediction=lambda out: out['<key>']"
        )
    raise WorkloadError(
        f"cannot find the prediction in a model output of type {type(output).__name__}: expected a tensor, "
        "a tuple or list (first element), a dict or ModelOutput with 'logits'; "
        "or give the Workload prediction=<function of the output>"
    )


def describe_output(output: Any) -> str:
    """The output's structure with shapes, for error messages: ``tuple(Tensor(32, 10), Tensor(32,))``."""
    if torch.is_tensor(output):
        return f"Tensor{tuple(output.shape)} {str(output.dtype).replace('torch.', '')}"
    if isinstance(output, Mapping):
        return f"{type(output).__name__}(" + ", ".join(f"{k}={describe_output(v)}" for k, v in output.items()) + ")"
    if isinstance(output, (tuple, list)):
        return f"{type(output).__name__}(" + ", ".join(describe_output(v) for v in output) + ")"
    return type(output).__name__


def misplaced_prediction(output: Any, num_classes: int) -> str | None:
    """Why the first element of a tuple/list output cannot be the class scores while another can, or None.

    A model returning ``(features, logits)`` would otherwise be scored on the argmax of its features."""
    if not isinstance(output, (tuple, list)) or len(output) < 2 or num_classes < 2:
        return None
    widths = [t.shape[1] if torch.is_tensor(t) and t.dim() >= 2 else None for t in output]
    fitting = [i for i, w in enumerate(widths) if w == num_classes]
    if widths[0] == num_classes or len(fitting) != 1:
        return None
    i = fitting[0]
    return (
        f"the model returns {describe_output(output)}: its first element, which the metric would score, has "
        f"{widths[0]} scores per sample for {num_classes} classes, element {i} has {num_classes}; "
        f"give the Workload prediction=lambda out: out[{i}]"
    )


# --- the layout rule ---------------------------------------------------------------------------


def class_axis(pred_shape: tuple, y_shape: tuple, class_dim: int | None = None) -> int:
    """The axis of ``pred`` that holds the classes, decided from the targets' shape (see the module doc)."""
    pred_shape, y_shape = tuple(pred_shape), tuple(y_shape)
    rest = y_shape[1:]
    if class_dim is not None:
        dim = class_dim % len(pred_shape) if pred_shape else 0
        if dim == 0 or pred_shape[:dim] + pred_shape[dim + 1 :] != y_shape:
            raise WorkloadError(
                f"class_dim={class_dim} does not fit: class scores {pred_shape} without that axis are not the targets' shape {y_shape}"
            )
        return dim
    if len(pred_shape) != len(y_shape) + 1 or pred_shape[0] != y_shape[0]:
        squeeze = " (squeeze the trailing dimension)" if len(pred_shape) > 2 and all(d == 1 for d in pred_shape[2:]) else ""
        want = "(N, C)" if not rest else f"(N, C, {', '.join(map(str, rest))}) or (N, {', '.join(map(str, rest))}, C)"
        return _layout_error(f"the prediction has shape {pred_shape} but the targets {y_shape}: it needs class scores {want}{squeeze}")
    if not rest:
        return 1
    first, last = pred_shape[2:] == rest, pred_shape[1:-1] == rest
    if first and last:
        raise WorkloadError(
            f"class scores {pred_shape} against targets {y_shape} are ambiguous: with as many classes as positions "
            f"({pred_shape[1]}) the class axis cannot be told from the shapes; state it with class_dim: "
            "class_dim=-1 for (N, T, C) (the usual language-model layout), class_dim=1 for (N, C, T), e.g. "
            "metric=pytest_ampgate.workloads.accuracy(class_dim=-1) (token_accuracy and perplexity take it too)"
        )
    if first:
        return 1
    if last:
        return len(pred_shape) - 1
    return _layout_error(
        f"the prediction has shape {pred_shape} but the targets {y_shape}: it needs class scores "
        f"(N, C, {', '.join(map(str, rest))}) or (N, {', '.join(map(str, rest))}, C)"
    )


def _layout_error(text: str) -> int:
    raise WorkloadError(text)


def class_scores(pred: torch.Tensor, y: torch.Tensor, class_dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores as (M, C) and labels as (M,), one row per labelled position, by the layout rule."""
    if not torch.is_tensor(pred):
        raise WorkloadError(f"the prediction is a {type(pred).__name__}, not a tensor of class scores")
    if y.is_floating_point():
        raise WorkloadError(
            f"the targets are floating {tuple(y.shape)} (regression or soft labels) and a class metric needs integer "
            "labels; give the Workload a metric (e.g. pytest_ampgate.workloads.mse()), or use y.argmax(1) for one-hot labels"
        )
    dim = class_axis(pred.shape, y.shape, class_dim)
    return pred.movedim(dim, -1).reshape(-1, pred.shape[dim]), y.reshape(-1)


def accuracy_fit_problem(pred: Any, y: torch.Tensor, class_dim: int | None = None) -> str | None:
    """Why class scores ``pred`` cannot be scored against labels ``y``, or None when they can.

    Found before training: a single logit (N, 1) would make accuracy the share of class 0, and
    (N, C, 1) against (N,) would broadcast into an "accuracy" far above 1.
    """
    try:
        scores, _ = class_scores(pred, y, class_dim)
    except WorkloadError as exc:
        return str(exc)
    if scores.shape[1] < 2:
        return (
            f"the prediction has shape {tuple(pred.shape)}: a single score per sample, so its argmax is always class 0 "
            "and accuracy would be the share of one class; output one score per class (2 for a binary task), "
            "or give the Workload a metric that thresholds it"
        )
    return None


# --- what metric functions receive ---------------------------------------------------------------


class HeldOut:
    """The held-out ``(x, y)`` batches a metric function receives: iterate it as often as you like
    (a mean, then the errors), every pass yields the same batches, inputs already cast as the mode trains."""

    def __init__(self, batches: Callable[[], Iterable] | Iterable, cast: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if isinstance(batches, HeldOut):
            batches, cast = batches._source, _chain(batches._cast, cast)
        elif not callable(batches):
            batches = list(batches)
        self._source, self._cast = batches, cast

    def __iter__(self):
        source = self._source() if callable(self._source) else self._source
        for x, y in source:
            yield (self._cast(x) if self._cast is not None else x), y


def _chain(first, second):
    if first is None or second is None:
        return first or second
    return lambda x: second(first(x))


# --- metrics --------------------------------------------------------------------------------------

RESERVED_METRIC_NAMES = frozenset(
    (
        "speedup",
        "speedup_low",
        "speedup_high",
        "memory_ratio",
        "step_time_s",
        "peak_memory_bytes",
        "final_loss",
        "low_precision_share",
        "extra",
        "memory",
        "finite_loss",
        "skipped_steps",
        "loss_scale",
        "precision_coverage",
        "supported",
        "ran",
        "same_run",
        "same_run_loss",
        "metric",
    )
)
"""Names a custom metric may not take: they are baseline fields or check names already."""

SHARE = (0.0, 1.0)


@dataclass(frozen=True)
class Tolerance:
    """How far a metric may stray from the value it is compared with: absolute for a share,
    relative (a fraction of that value) for any other metric; ``setting`` names where it is set."""

    value: float
    relative: bool
    setting: str = "same_run_tolerance"

    def allowed(self, reference: float) -> float:
        return self.value * abs(reference) if self.relative else self.value

    def limit(self, reference: float, higher_is_better: bool) -> float:
        return reference - self.allowed(reference) if higher_is_better else reference + self.allowed(reference)

    def text(self) -> str:
        return f"tol {self.value:.3g} relative" if self.relative else f"tol {self.value:g}"

    def relief(self, value: float, reference: float, higher_is_better: bool) -> str:
        """`` (same_run_tolerance=0.0012 would pass this run)``: the least setting (two digits, rounded up) that passes."""
        gap = (reference - value) if higher_is_better else (value - reference)
        if not math.isfinite(gap) or gap <= 0:
            return ""
        needed = gap / abs(reference) if self.relative else gap
        if not math.isfinite(needed):
            return ""
        digits = 1 - math.floor(math.log10(needed))
        nice = math.ceil(needed * 10**digits - 1e-9) / 10**digits
        passes = replace(self, value=nice).limit(reference, higher_is_better)
        if (value < passes) if higher_is_better else (value > passes):  # rounding fell short: one step up
            nice = (round(nice * 10**digits) + 1) / 10**digits
        if not self.relative and nice > 1:
            return ""
        return f" ({self.setting}={nice:g} would pass this run)"


@dataclass(frozen=True)
class Metric:
    """A held-out quality measure: ``fn(model, batches) -> number`` with a name and a direction.

    ``fn`` is called once per mode after training (and once on one batch before any training),
    under ``torch.no_grad()``, with the model in eval mode and inside the mode's precision, so
    ``model(x)`` computes as that mode does.  ``batches`` is a :class:`HeldOut`: it yields the
    held-out ``(x, y)`` pairs and may be iterated more than once.  The result is stored, gated and
    reported under ``name``.

    A metric whose ``bounds`` lie within [0, 1] is a share (``accuracy`` always is): its
    ``tolerance`` (against the stored baseline) and ``same_run_tolerance`` (against fp32 in the same
    run) are absolute and at most 1.  Any other metric's are relative: 0.05 lets it be 5% worse
    than the value it is compared with.  None takes the gate's settings, then the defaults.
    """

    name: str
    fn: Callable[[nn.Module, HeldOut], Any]
    higher_is_better: bool = True
    tolerance: float | None = None
    same_run_tolerance: float | None = None
    bounds: tuple[float | None, float | None] = (None, None)
    """Values outside these are refused as a broken metric, before training (accuracy: (0, 1))."""
    rebind: Callable[[Callable[[Any], torch.Tensor]], Callable] | None = field(default=None, repr=False, compare=False)
    """A built-in's ``fn`` for another prediction picker: how ``Workload(prediction=...)`` reaches it."""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise WorkloadError(f"Metric name must be an identifier such as 'mse' or 'perplexity', got {self.name!r}")
        if self.name in RESERVED_METRIC_NAMES:
            raise WorkloadError(f"Metric name {self.name!r} is taken by a figure of the gate; choose another")
        if not callable(self.fn):
            raise WorkloadError(f"Metric {self.name!r}: fn must be callable as fn(model, batches), got {type(self.fn).__name__}")
        if not isinstance(self.higher_is_better, bool):
            raise WorkloadError(f"Metric {self.name!r}: higher_is_better must be True or False, got {self.higher_is_better!r}")
        if self.name == "accuracy":  # stored in the baseline's accuracy field, which holds a share
            if self.bounds == (None, None):
                object.__setattr__(self, "bounds", SHARE)
            elif not self.share:
                raise WorkloadError(
                    f"Metric 'accuracy' is stored as a share in [0, 1], so its bounds must lie within (0, 1), got {self.bounds}; "
                    "return a share (percent / 100), or give a percentage another name"
                )
        for what in ("tolerance", "same_run_tolerance"):
            value = getattr(self, what)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0 or not math.isfinite(value):
                raise WorkloadError(f"Metric {self.name!r}: {what} must be a finite number >= 0, got {value!r}")
            if self.share and value > 1:
                raise WorkloadError(
                    f"Metric {self.name!r}: {what}={value!r} is too large: {self.name} is a share in [0, 1], so its "
                    "tolerances are absolute and at most 1 (0.02 = two points of accuracy); a metric in percent must "
                    "return a share (percent / 100)"
                )

    @property
    def direction(self) -> str:
        return "higher is better" if self.higher_is_better else "lower is better"

    @property
    def share(self) -> bool:
        """Bounded to [0, 1]: absolute tolerances; any other metric has relative ones."""
        low, high = self.bounds
        return low is not None and high is not None and low >= 0 and high <= 1

    def tolerances(self, config) -> dict[str, Tolerance | None]:
        """The baseline and same-run tolerances for this metric under ``config`` (a GateConfig):
        its own, else the gate's setting, else the default for its kind.  A setting outside the
        limits of this metric's kind is refused here, before anything trains."""
        configured = getattr(config, "same_run_tolerance", None)
        if self.share and configured is not None and configured > 1:
            raise ConfigError(
                f"same_run_tolerance={configured:g} is too large for {self.name}, a share in [0, 1]: its tolerance is "
                "absolute and at most 1 (0.08 = eight points); relative tolerances apply to unbounded metrics "
                "(loss, mse, perplexity)"
            )
        if self.share:
            base_default, same_default = getattr(config, "accuracy_tolerance", 0.02), SHARE_SAME_RUN_TOLERANCE
        else:
            base_default, same_default = RELATIVE_BASELINE_TOLERANCE, RELATIVE_SAME_RUN_TOLERANCE
        base_setting = f"Metric({self.name!r}, tolerance=...)" if not self.share or self.tolerance is not None else "accuracy_tolerance"
        same = self.same_run_tolerance if self.same_run_tolerance is not None else configured
        same_setting = "same_run_tolerance" if self.same_run_tolerance is None else f"Metric({self.name!r}, same_run_tolerance=...)"
        own_or_relative = not self.share or self.tolerance is not None  # else the checks read accuracy_tolerance themselves
        return dict(
            metric_tolerance=Tolerance(self.tolerance if self.tolerance is not None else base_default, not self.share, base_setting)
            if own_or_relative
            else None,
            same_run_tolerance=Tolerance(same if same is not None else same_default, not self.share, same_setting),
        )

    def check_value(self, value: Any, workload: str) -> float:
        """The metric's result as a float, or a WorkloadError saying why it is not one real number in bounds."""
        where = f"workload {workload!r}: metric {self.name!r}"
        if torch.is_tensor(value) or (hasattr(value, "shape") and hasattr(value, "item")):  # a tensor or a numpy array
            shape = tuple(value.shape)
            if math.prod(shape) != 1:
                kind = "a tensor" if torch.is_tensor(value) else "an array"
                raise WorkloadError(f"{where} returned {kind} of shape {shape}; it must return one number (e.g. .mean())")
            if torch.is_tensor(value) and (value.is_complex() or value.dtype == torch.bool):
                raise WorkloadError(f"{where} returned a {value.dtype} tensor; it must return one real number")
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise WorkloadError(f"{where} returned {type(value).__name__}; it must return one real number")
        value = float(value)
        low, high = self.bounds
        if math.isfinite(value) and ((low is not None and value < low) or (high is not None and value > high)):
            advice = ""
            if self.share and 1 < value <= 100:
                advice = "; it looks like a percentage: return a share (divide by 100)"
            raise WorkloadError(f"{where} returned {value:g}, outside its bounds [{low}, {high}]{advice}")
        return value


def _class_metric(name: str, prediction, class_dim: int | None, ignore_index: int) -> Metric:
    """Share of labelled positions whose top class is the label."""

    def make(pick):
        pick = pick or prediction_of

        def fn(model: nn.Module, batches) -> float:
            correct, count = None, 0
            for x, y in batches:
                scores, labels = class_scores(pick(model(x)), y, class_dim)
                keep = labels != ignore_index
                hits = ((scores.argmax(dim=1) == labels) & keep).sum()
                correct = hits if correct is None else correct + hits
                count += int(keep.sum())
            return float(correct.item()) / count if count else float("nan")

        fn.__qualname__ = name
        return fn

    return Metric(name, make(prediction), higher_is_better=True, bounds=SHARE, rebind=None if prediction else make)


def accuracy(
    prediction: Callable[[Any], torch.Tensor] | None = None, *, class_dim: int | None = None, ignore_index: int = IGNORE_INDEX
) -> Metric:
    """Classification accuracy (the default): share of labelled positions whose top class is the label."""
    return _class_metric("accuracy", prediction, class_dim, ignore_index)


def token_accuracy(ignore_index: int = IGNORE_INDEX, *, class_dim: int | None = None, prediction=None) -> Metric:
    """Accuracy per position, for class scores (N, C, T) or (N, T, C) against labels (N, T)."""
    return _class_metric("token_accuracy", prediction, class_dim, ignore_index)


def mse(prediction: Callable[[Any], torch.Tensor] | None = None) -> Metric:
    """Mean squared error of the prediction against floating targets (lower is better; relative tolerances)."""

    def make(pick):
        pick = pick or prediction_of

        def fn(model: nn.Module, batches) -> float:
            total, count = None, 0
            for x, y in batches:
                pred = pick(model(x))
                if not torch.is_tensor(pred) or pred.numel() != y.numel():
                    shape = tuple(pred.shape) if torch.is_tensor(pred) else type(pred).__name__
                    raise WorkloadError(f"mse needs one prediction per target: the prediction is {shape}, the targets {tuple(y.shape)}")
                err = (pred.float().reshape(y.shape) - y.float()).pow(2).sum()
                total = err if total is None else total + err
                count += y.numel()
            return float(total.item()) / count if count else float("nan")

        return fn

    return Metric("mse", make(prediction), higher_is_better=False, bounds=(0.0, None), rebind=None if prediction else make)


def perplexity(ignore_index: int = IGNORE_INDEX, *, class_dim: int | None = None, prediction=None) -> Metric:
    """exp(mean token cross-entropy) of class scores (N, C), (N, C, T) or (N, T, C) against labels (lower is better)."""

    def make(pick):
        pick = pick or prediction_of

        def fn(model: nn.Module, batches) -> float:
            total, count = None, 0
            for x, y in batches:
                scores, labels = class_scores(pick(model(x)), y, class_dim)
                nll = nn.functional.cross_entropy(scores.float(), labels, ignore_index=ignore_index, reduction="sum")
                total = nll if total is None else total + nll
                count += int((labels != ignore_index).sum())
            return math.exp(float(total.item()) / count) if count else float("nan")

        return fn

    return Metric("perplexity", make(prediction), higher_is_better=False, bounds=(1.0, None), rebind=None if prediction else make)


def metric_of(workload) -> Metric:
    """The workload's metric (its own, or accuracy), with the workload's ``prediction=`` bound into a built-in."""
    metric = workload.metric
    if metric is None:
        return accuracy(workload.prediction)
    if not isinstance(metric, Metric):
        raise WorkloadError(
            f"workload {workload.name!r}: metric must be a pytest_ampgate.workloads.Metric(name, fn, higher_is_better=...), "
            f"got {type(metric).__name__}"
        )
    if workload.prediction is not None and metric.rebind is not None:
        return replace(metric, fn=metric.rebind(workload.prediction), rebind=None)
    return metric


RELATIVE_BUILTINS = frozenset(("mse", "perplexity"))
"""Built-in metrics that are not shares, known by name where only the name reached the checks."""


def as_tolerance(given: Tolerance | float | None, metric_name: str, configured: float | None, setting: str) -> Tolerance:
    """A check's tolerance: the one resolved from the Metric (``Metric.tolerances``), or, where only a
    number or nothing came (``gate.evaluate`` called directly), one by the metric's name."""
    if isinstance(given, Tolerance):
        return given
    relative = metric_name in RELATIVE_BUILTINS
    if given is not None:
        return Tolerance(float(given), relative, setting)
    if relative:
        default = RELATIVE_SAME_RUN_TOLERANCE if setting == "same_run_tolerance" else RELATIVE_BASELINE_TOLERANCE
        return Tolerance(configured if configured is not None and setting == "same_run_tolerance" else default, True, setting)
    if configured is None:
        configured = SHARE_SAME_RUN_TOLERANCE if setting == "same_run_tolerance" else 0.02
    return Tolerance(configured, False, setting)
