"""The metric layer (pytest_ampgate/metrics.py): one layout rule, one tolerance rule, one contract
for every built-in and user metric (issue 22).  Each test here failed before that fix."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pytest_ampgate import ConfigError, MeasureConfig, Workload, WorkloadError, measure
from pytest_ampgate.config import GateConfig, build_config
from pytest_ampgate.gate import evaluate
from pytest_ampgate.metrics import HeldOut
from pytest_ampgate.profiles import default_measure_config
from pytest_ampgate.results import Comparison, Measurements, ModeMeasurement
from pytest_ampgate.verdict import FAIL, PASS
from pytest_ampgate.workloads import Metric, accuracy, metric_of, mse, perplexity, token_accuracy

TINY = MeasureConfig(warmup_steps=1, rounds=2, steps_per_block=3, memory_steps=0)
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _metric_workloads():
    spec = importlib.util.spec_from_file_location("metric_workloads", BENCHMARKS / "metric_workloads.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["metric_workloads"] = module
    spec.loader.exec_module(module)
    return module


# --- 1. tolerances on the metric's own scale ---------------------------------------------------


def _same_run(name, ref_value, value, higher_is_better, **tolerances):
    def mm(mode, v):
        m = ModeMeasurement(mode, losses=[1.0, 1.0])
        m.set_metric(name, v, higher_is_better)
        return m

    m = Measurements(
        "w",
        "cpu",
        TINY,
        8,
        {},
        {},
        mm("fp32", ref_value),
        {"amp_bf16": mm("amp_bf16", value)},
        {"amp_bf16": Comparison("amp_bf16", "fp32")},
    )
    config = tolerances.pop("config", GateConfig(modes=("amp_bf16",)))
    return next(c for c in evaluate(m, config, **tolerances).checks if c.metric == "same_run")


@pytest.mark.parametrize(
    "metric, ref, value",
    [(perplexity(), 243.912, 244.135), (mse(), 2497.334, 2499.240)],  # the healthy runs: +0.09%, +0.08%
)
def test_unbounded_metrics_get_relative_tolerances(metric, ref, value):
    config = GateConfig(modes=("amp_bf16",))
    check = _same_run(metric.name, ref, value, False, **metric.tolerances(config))
    assert check.outcome == PASS, check.why
    assert "relative" in check.why
    collapsed = _same_run(metric.name, ref, ref * 3, False, **metric.tolerances(config))
    assert collapsed.outcome == FAIL
    # Also when gate.evaluate is called without the Metric: a built-in is known by its name.
    assert _same_run(metric.name, ref, value, False).outcome == PASS


def test_the_hint_names_a_value_the_setting_accepts_and_that_passes():
    metric = perplexity()
    check = _same_run("perplexity", 10.0, 35.0, False, **metric.tolerances(GateConfig(modes=("amp_bf16",))))
    assert check.outcome == FAIL and "(same_run_tolerance=2.5 would pass this run)" in check.why, check.why
    config = build_config(("marker", {"modes": ["amp_bf16"], "same_run_tolerance": 2.5}))  # accepted: > 1 is fine here
    assert _same_run("perplexity", 10.0, 35.0, False, config=config, **metric.tolerances(config)).outcome == PASS
    share = _same_run("accuracy", 0.9, 0.5, True, **accuracy().tolerances(GateConfig(modes=("amp_bf16",))))
    assert "(same_run_tolerance=0.4 would pass this run)" in share.why, share.why


def test_the_limits_of_each_setting_follow_the_metric():
    assert perplexity().tolerances(GateConfig(same_run_tolerance=5.0))["same_run_tolerance"].value == 5.0
    with pytest.raises(ConfigError, match=r"same_run_tolerance=5 is too large for accuracy, a share in \[0, 1\]"):
        accuracy().tolerances(GateConfig(same_run_tolerance=5.0))
    with pytest.raises(WorkloadError, match="tolerance=2 is too large: accuracy is a share.*percent / 100"):
        Metric("accuracy", lambda model, batches: 54.69, tolerance=2)
    assert Metric("mae", lambda model, batches: 1.0, higher_is_better=False, tolerance=2).tolerance == 2  # relative: 200%


# --- 2. one layout rule --------------------------------------------------------------------------


class Oracle(nn.Module):
    """A perfect model: returns one-hot scores for the labels it is handed, in a chosen layout."""

    def __init__(self, classes, last=True):
        super().__init__()
        self.classes, self.last, self.w = classes, last, nn.Parameter(torch.zeros(1))

    def forward(self, y):
        scores = nn.functional.one_hot(y.clamp(min=0), self.classes).float() * 10 + self.w
        return scores if self.last else scores.movedim(-1, 1)


def _labels(n=8, t=6, classes=5, ignore=True):
    y = torch.arange(n * t).reshape(n, t) % classes
    if ignore:
        y[:, -2:] = -100
    return y


@pytest.mark.parametrize("make", [accuracy, token_accuracy])
@pytest.mark.parametrize("last", [True, False])
def test_class_metrics_read_both_layouts_and_mask_the_ignore_index(make, last):
    y = _labels()
    value = make().fn(Oracle(5, last), HeldOut([(y, y)]))
    assert value == 1.0  # before the fix: accuracy took the argmax over time, and -100 labels counted as misses


@pytest.mark.parametrize("last", [True, False])
def test_perplexity_reads_the_language_model_layout(last):
    y = _labels()
    value = perplexity().fn(Oracle(5, last), HeldOut([(y, y)]))
    assert 1.0 <= value < 1.01


@pytest.mark.parametrize("make", [accuracy, token_accuracy, perplexity])
def test_as_many_classes_as_positions_is_refused_unless_stated(make):
    y = _labels(t=5, classes=5)
    with pytest.raises(WorkloadError, match=r"ambiguous.*class_dim=-1 for \(N, T, C\)"):
        make().fn(Oracle(5), HeldOut([(y, y)]))
    stated = make(class_dim=-1).fn(Oracle(5), HeldOut([(y, y)]))
    assert stated == 1.0 or 1.0 <= stated < 1.01


def test_ambiguous_layout_is_refused_before_training():
    y = _labels(n=64, t=5, classes=5, ignore=False)
    workload = Workload(
        "tc", lambda: Oracle(5), (y, y, y, y), lambda out, t: out.sum() * 0 + out.mean(), lambda p: torch.optim.SGD(p, lr=0.1), 8
    )
    with pytest.raises(WorkloadError, match="workload 'tc'.*ambiguous.*class_dim"):
        measure(workload, ["amp_bf16"], device="cpu", config=TINY, progress=False)


# --- 3. prediction= reaches every metric ----------------------------------------------------------


class Pair(nn.Module):
    """Returns (features, prediction), as many models do."""

    def __init__(self, out):
        super().__init__()
        self.features, self.head = nn.Linear(4, 8), nn.Linear(8, out)

    def forward(self, x):
        h = self.features(x)
        return h, self.head(h).squeeze(-1)


def test_prediction_reaches_mse_and_perplexity():
    x, target = torch.randn(16, 4), torch.randn(16)
    model = Pair(1)
    pick = lambda out: out[1]  # noqa: E731
    workload = Workload("p", lambda: model, None, None, None, 8, metric=mse(), prediction=pick)
    value = metric_of(workload).fn(model, HeldOut([(x, target)]))
    assert value == pytest.approx(((model(x)[1] - target) ** 2).mean().item())
    labels = torch.randint(0, 3, (16,))
    lm = Pair(3)
    picked = metric_of(Workload("q", lambda: lm, None, None, None, 8, metric=perplexity(), prediction=pick))
    assert picked.fn(lm, HeldOut([(x, labels)])) == pytest.approx(nn.functional.cross_entropy(lm(x)[1], labels).exp().item(), rel=1e-5)


def test_features_first_is_refused_before_training_naming_the_element():
    x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
    workload = Workload(
        "f", lambda: Pair(2), (x, y, x, y), lambda out, t: nn.functional.cross_entropy(out[1], t), lambda p: torch.optim.SGD(p, lr=0.1), 16
    )
    with pytest.raises(
        WorkloadError, match=r"first element.*8 scores per sample for 2 classes, element 1.*prediction=lambda out: out\[1\]"
    ):
        measure(workload, ["amp_bf16"], device="cpu", config=TINY, progress=False)
    fixed = measure(workload.with_options(prediction=lambda out: out[1]), ["amp_bf16"], device="cpu", config=TINY, progress=False)
    assert fixed.reference.ok


# --- 4. one re-iterable object for metric functions ---------------------------------------------


def r_squared(model, batches):
    """Two passes: the mean first, then the errors."""
    total, count = 0.0, 0
    for _x, y in batches:
        total, count = total + y.sum().item(), count + y.numel()
    mean = total / count
    ss_res = ss_tot = 0.0
    for x, y in batches:
        ss_res += ((model(x).float().squeeze(-1) - y) ** 2).sum().item()
        ss_tot += ((y - mean) ** 2).sum().item()
    return 1 - ss_res / ss_tot


def test_a_two_pass_metric_gets_its_right_value():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.5 * torch.randn(256, generator=g)
    seen = []

    def model_factory():
        return nn.Linear(4, 1)

    workload = Workload(
        "r2",
        model_factory,
        (x, y, x, y),
        lambda out, t: nn.functional.mse_loss(out.squeeze(-1), t),
        lambda p: torch.optim.SGD(p, lr=0.05),
        32,
        metric=Metric("r2", lambda model, batches: seen.append(type(batches)) or r_squared(model, batches)),
        eval_batch_size=64,
    )
    m = measure(workload, ["amp_bf16"], device="cpu", config=TINY, progress=False)
    assert set(seen) == {HeldOut}  # one kind of object, in the pre-flight check and after training
    for mm, _ in m.each_mode():
        assert mm.ok, mm.error
        assert mm.metric < 0.999  # before the fix the second pass was empty: r2 1.000 in every mode


# --- 5. numbers are numbers; a percentage is refused before training ---------------------------


@pytest.mark.parametrize("value", [np.float32(0.25), np.float64(0.25), np.array(0.25), torch.tensor(0.25), torch.tensor([0.25]), 1, 0.25])
def test_any_real_scalar_is_accepted(value):
    assert Metric("m", lambda model, batches: value).check_value(value, "w") == pytest.approx(0.25 if value != 1 else 1.0)


@pytest.mark.parametrize("value", [np.array([0.1, 0.2]), torch.tensor(True), "0.5", [0.5], 1 + 2j])
def test_anything_else_is_refused(value):
    with pytest.raises(WorkloadError, match="metric 'm' returned"):
        Metric("m", lambda model, batches: value).check_value(value, "w")


def test_a_percent_scale_accuracy_is_refused_before_training(monkeypatch):
    x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))

    def in_percent(model, batches):
        hits = total = 0
        for xb, yb in batches:
            hits, total = hits + (model(xb).argmax(1) == yb).sum().item(), total + yb.numel()
        return 50 + 50 * hits / total  # a percentage, and always above 1 whatever the untrained model scores

    trained = []
    monkeypatch.setattr("pytest_ampgate.mode_runner.ModeRunner.step", lambda self, *a: trained.append(1))
    workload = Workload(
        "pct",
        lambda: nn.Linear(4, 2),
        (x, y, x, y),
        nn.CrossEntropyLoss(),
        lambda p: torch.optim.SGD(p, lr=0.1),
        16,
        metric=Metric("accuracy", in_percent),
    )
    with pytest.raises(
        WorkloadError, match=r"metric 'accuracy' returned \S+, outside its bounds \[0.0, 1.0\]; it looks like a percentage: return a share"
    ):
        measure(workload, ["amp_bf16"], device="cpu", config=TINY, progress=False)
    assert not trained


# --- 6. a loss of shape (1,) -----------------------------------------------------------------------


def test_a_loss_of_shape_one_is_accepted():
    x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
    workload = Workload(
        "l1",
        lambda: nn.Linear(4, 2),
        (x, y, x, y),
        lambda out, t: nn.functional.cross_entropy(out, t).reshape(1),
        lambda p: torch.optim.SGD(p, lr=0.1),
        16,
    )
    m = measure(workload, ["amp_bf16"], device="cpu", config=TINY, progress=False)
    for mm, _ in m.each_mode():
        assert mm.ok, mm.error
        assert mm.losses and all(isinstance(v, float) for v in mm.losses)


# --- Done when: each built-in metric's typical model, healthy and collapsed ---------------------


@pytest.fixture(scope="module")
def workloads():
    return _metric_workloads()


@pytest.mark.parametrize("name", ["tiny_lm_perplexity", "tiny_lm_token_accuracy", "regression_head", "tiny_classifier"])
def test_healthy_bf16_passes_and_a_planted_collapse_fails_at_default_settings(workloads, name):
    config = GateConfig(modes=("amp_bf16",))
    for seed in (0, 1, 2):
        workload = workloads.WORKLOADS[name](seed)
        tolerances = metric_of(workload).tolerances(config)
        m = measure(
            workload,
            ["amp_bf16"],
            device="cpu",
            config=MeasureConfig(**{**default_measure_config("cpu").to_dict(), "seed": seed}),
            progress=False,
        )
        same_run = [c for c in evaluate(m, config, **tolerances).checks if c.metric == "same_run"]
        assert [c.outcome for c in same_run] == [PASS], (seed, same_run)
    bad = measure(
        workloads.collapsed(workloads.WORKLOADS[name](0)), ["amp_bf16"], device="cpu", config=default_measure_config("cpu"), progress=False
    )
    same_run = [c for c in evaluate(bad, config, **tolerances).checks if c.metric == "same_run"]
    assert [c.outcome for c in same_run] == [FAIL], same_run


# --- 7. the chart shows every failure ------------------------------------------------------------


def test_the_chart_shows_a_coverage_a_memory_and_a_metric_failure_in_red(workloads, tmp_path):
    pytest.importorskip("matplotlib")
    from pytest_ampgate import testing
    from pytest_ampgate.gate import GateResult
    from pytest_ampgate.outputs import chart

    def result(test_id, workload, **settings):
        config = GateConfig(modes=("amp_bf16",), **settings)
        m = measure(workload, ["amp_bf16"], device="cpu", config=MeasureConfig(warmup_steps=1, rounds=2, steps_per_block=3), progress=False)
        return GateResult(test_id, "cpu|test", m, evaluate(m, config, **metric_of(workload).tolerances(config)), config=config)

    results = [
        result("t.py::coverage", testing.force_fp32_layer(workloads.tiny_classifier(0))),
        result("t.py::memory", workloads.tiny_classifier(0), check_memory=True, max_memory_ratio=0.01),
        result("t.py::metric", workloads.collapsed(workloads.regression_head(0))),
    ]
    rows = {row.test_id: row for row in chart.chart_rows(results)}
    assert ("precision_coverage", "fail") in rows["t.py::coverage"].other_checks  # before: drawn with no red at all
    assert rows["t.py::memory"].memory_outcome == "fail"
    assert rows["t.py::metric"].metric_outcome == "fail"
    assert all(chart._row_failed(row) for row in rows.values())
    png = chart.png(results)
    assert png.startswith(b"\x89PNG")
    from matplotlib.figure import Figure

    fig = Figure()
    ax = fig.subplots()
    chart._draw_metric(ax, list(rows.values()), [2, 1, 0])  # accuracy and mse: each against its own fp32, not one axis
    assert "change vs fp32" in ax.get_xlabel()
    assert ax.get_xlim()[1] < 100  # the collapsed mse (+30000%) does not flatten the others
