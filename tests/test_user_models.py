"""Any model a user trains: integer token inputs, any output structure, any metric, the same-run
check, Apex O2 (fp16_master), and the engine API on the CPU.

Engine-level tests use tiny models (a few steps on a handful of samples); what a user sees is
driven end to end through ``pytester`` with ``--ampgate --ampgate-device cpu``.
"""

import collections
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from pytest_ampgate import ConfigError, MeasureConfig, Workload, WorkloadError, measure
from pytest_ampgate.checks import fp32_layers_text
from pytest_ampgate.config import GateConfig
from pytest_ampgate.gate import evaluate
from pytest_ampgate.mode_runner import prepare
from pytest_ampgate.modes import MODES, resolve_mode
from pytest_ampgate.precision_coverage import OpRecord, PrecisionCoverage
from pytest_ampgate.verdict import FAIL, PASS
from pytest_ampgate.workloads import Metric


@pytest.fixture(scope="module", autouse=True)
def engine_imported():
    """Import everything a gated run imports once, outside the in-process pytester runs (which drop
    modules first imported during a run; some of torch's C extensions abort when imported twice)."""
    import importlib
    import pkgutil

    import pytest_ampgate
    from pytest_ampgate.workloads import mnist_mlp

    for info in pkgutil.iter_modules(pytest_ampgate.__path__):
        importlib.import_module(f"pytest_ampgate.{info.name}")
    tiny = mnist_mlp().with_options(batch_size=8, data_options={"n_train": 16, "n_test": 8})
    measure(
        tiny,
        ["amp_bf16", "fp16_master"],
        device="cpu",
        config=MeasureConfig(warmup_steps=0, rounds=1, steps_per_block=1, memory_steps=0),
        progress=False,
    )


TINY = MeasureConfig(warmup_steps=1, rounds=2, steps_per_block=3, memory_steps=0)
CPU = ("--ampgate", "--ampgate-device", "cpu", "-p", "no:cacheprovider")
VOCAB = 5000


# --- integer inputs ---------------------------------------------------------------------------


class TokenClassifier(nn.Module):
    """Embedding bag over token ids; records every input it sees so the test can check the ids."""

    def __init__(self, vocab=VOCAB, dim=16, classes=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.fc = nn.Linear(dim, classes)
        self.seen = []

    def forward(self, ids):
        self.seen.append(ids)
        return self.fc(self.emb(ids).mean(dim=1))


def _tokens(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, 6), generator=g)
    return ids, ids[:, 0] % 4  # the class is in the first token


def _token_workload(model_box):
    def factory():
        model_box.append(TokenClassifier())
        return model_box[-1]

    train_x, train_y = _tokens(256, 0)
    test_x, test_y = _tokens(64, 1)
    return Workload(
        "tokens", factory, (train_x, train_y, test_x, test_y), nn.CrossEntropyLoss(), lambda p: torch.optim.Adam(p, lr=0.05), batch_size=32
    )


def test_int64_token_ids_stay_unchanged_under_amp_bf16_and_bf16(monkeypatch):
    seen = {}
    real_prepare = prepare

    def spy(mode, model, *args, **kwargs):  # each mode's own copy of the model records its inputs
        runner = real_prepare(mode, model, *args, **kwargs)
        seen[runner.mode.name] = runner.model.seen
        return runner

    monkeypatch.setattr("pytest_ampgate.measurement.prepare", spy)
    box = []
    workload = _token_workload(box)
    train_x = workload.data[0]
    m = measure(workload, ["amp_bf16", "bf16"], device="cpu", config=TINY, progress=False)
    for mm, _ in m.each_mode():
        assert mm.ok and mm.first_nonfinite_step is None, mm
        assert mm.accuracy is not None and 0 <= mm.accuracy <= 1
    for mode in ("amp_bf16", "bf16"):
        inputs = seen[mode]
        assert inputs and all(x.dtype == torch.int64 for x in inputs)
        first = inputs[1]  # step 0's batch (input 0 is the fit check's)
        assert torch.equal(first, train_x[: first.shape[0]]), f"{mode} changed token ids"
    # What a pure-bf16 cast would have done to the same ids: most of them change.
    assert (train_x.to(torch.bfloat16).long() != train_x).float().mean() > 0.5


def test_embedding_model_passes_the_gate_end_to_end(pytester):
    pytester.makepyfile(
        test_tok=_TOKEN_PROJECT
        + """
@pytest.mark.amp_regression(modes=["amp_bf16", "bf16"], rounds=2, steps_per_block=4, warmup_steps=1)
def test_tokens(ampgate):
    ampgate.run(workload())
"""
    )
    result = pytester.runpytest(*CPU, "-rA")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*bf16 accuracy * vs fp32 * in this run*", "*ampgate summary*"])


_TOKEN_PROJECT = """
import pytest
import torch
from torch import nn
from pytest_ampgate import Workload


class Tok(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5000, 16)
        self.fc = nn.Linear(16, 4)

    def forward(self, ids):
        assert ids.dtype == torch.int64
        return self.fc(self.emb(ids).mean(dim=1))


def data(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 5000, (n, 6), generator=g)
    return ids, ids[:, 0] % 4


def workload(**changes):
    (a, b), (c, d) = data(256, 0), data(64, 1)
    options = dict(name="tokens", model_factory=Tok, data=(a, b, c, d), loss_fn=nn.CrossEntropyLoss(),
                   optimizer_factory=lambda p: torch.optim.Adam(p, lr=0.05), batch_size=32)
    options.update(changes)
    return Workload(**options)
"""


@pytest.mark.parametrize(
    "dtype, advice",
    [
        (torch.uint8, "for uint8 images use train_x.float() / 255"),
        (torch.int16, "use train_x.long()"),
        (torch.bool, "for a mask use train_x.float()"),
    ],
)
def test_unsupported_input_dtypes_name_what_is_supported(dtype, advice):
    from pytest_ampgate.data import from_tensors

    x = torch.zeros(8, 3, dtype=dtype)
    with pytest.raises(WorkloadError) as info:
        from_tensors("d", x, torch.zeros(8, dtype=torch.long), torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), num_classes=2)
    text = str(info.value)
    assert "int64, int32" in text and "float32" in text and advice in text
    assert ("uint8 images" in text) == (dtype == torch.uint8)


def test_int32_inputs_stay_int32_and_float_targets_are_kept():
    from pytest_ampgate.data import from_tensors

    ds = from_tensors(
        "d", torch.arange(24, dtype=torch.int32).view(8, 3), torch.randn(8), torch.zeros(2, 3, dtype=torch.int32), torch.randn(2)
    )
    assert ds.train_x.dtype == torch.int32 and ds.train_y.dtype == torch.float32 and ds.num_classes == 0


# --- any output -------------------------------------------------------------------------------


@dataclasses.dataclass
class Output:  # Hugging Face's ModelOutput is a dataclass and an OrderedDict; this is the dataclass half
    logits: torch.Tensor
    hidden: torch.Tensor


class OrderedOutput(collections.OrderedDict):  # ... and this the OrderedDict half, with attribute access
    @property
    def logits(self):
        return self["logits"]


WRAP = {
    "tuple": lambda logits, h: (logits, h),
    "list": lambda logits, h: [logits, h],
    "dict": lambda logits, h: {"hidden": h, "logits": logits},
    "dataclass": lambda logits, h: Output(logits=logits, hidden=h),
    "ordered_dict": lambda logits, h: OrderedOutput(hidden=h, logits=logits),
}


class Wrapped(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.body(x)
        return WRAP[self.kind](self.head(h), h)


def _blobs(n, seed, features=8, classes=3):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, features, generator=torch.Generator().manual_seed(9)) * 3
    y = torch.randint(0, classes, (n,), generator=g)
    return centers[y] + torch.randn(n, features, generator=g), y


def _logits_loss(out, y):
    logits = out.logits if hasattr(out, "logits") else (out["logits"] if isinstance(out, dict) else out[0])
    return nn.functional.cross_entropy(logits, y)


@pytest.mark.parametrize("kind", sorted(WRAP))
def test_structured_outputs_pass_and_the_loss_gets_them_as_returned(kind):
    got = []

    def loss(out, y):
        got.append(type(out))
        return _logits_loss(out, y)

    (a, b), (c, d) = _blobs(128, 0), _blobs(64, 1)
    workload = Workload(kind, lambda: Wrapped(kind), (a, b, c, d), loss, lambda p: torch.optim.SGD(p, lr=0.1), 16)
    m = measure(workload, ["amp_bf16", "fp16_master"], device="cpu", config=TINY, progress=False)
    for mm, _ in m.each_mode():
        assert mm.ok and mm.accuracy is not None and 0.0 <= mm.accuracy <= 1.0, mm
    assert set(got) == {type(WRAP[kind](torch.zeros(1), torch.zeros(1)))}


class Shaped(nn.Module):
    def __init__(self, out_shape):
        super().__init__()
        self.out_shape = out_shape
        self.fc = nn.Linear(8, 3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        logits = self.fc(x)
        return {"single": lambda: logits[:, :1], "trailing": lambda: logits.unsqueeze(-1), "vector": lambda: logits[:, 0]}[self.out_shape]()


@pytest.mark.parametrize(
    "shape, loss, message",
    [
        (
            "single",
            lambda out, y: nn.functional.binary_cross_entropy_with_logits(out.squeeze(1), (y > 0).float()),
            r"output Tensor\(16, 1\).*single score per sample, so its argmax is always class 0",
        ),
        (
            "trailing",
            lambda out, y: nn.functional.cross_entropy(out.squeeze(-1), y),
            r"output Tensor\(16, 3, 1\).*prediction has shape \(16, 3, 1\) but the targets \(16,\).*class scores \(N, C\) \(squeeze the trailing",
        ),
    ],
)
def test_bad_output_shapes_are_refused_before_training_with_the_shapes(shape, loss, message):
    made = []

    def factory():
        made.append(Shaped(shape))
        return made[-1]

    (a, b), (c, d) = _blobs(64, 0), _blobs(32, 1)
    workload = Workload("shaped", factory, (a, b, c, d), loss, lambda p: torch.optim.SGD(p, lr=0.1), 16)
    with pytest.raises(WorkloadError, match=message):
        measure(workload, ["amp_bf16"], device="cpu", config=TINY, progress=False)
    assert made[0].calls == 1  # one fit-check forward: nothing trained


def test_bad_output_shape_is_a_clean_error_in_pytest(pytester):
    pytester.makepyfile(
        test_bad=_TOKEN_PROJECT
        + """
class Trailing(Tok):
    def forward(self, ids):
        return super().forward(ids).unsqueeze(-1)


@pytest.mark.amp_regression(modes=["amp_bf16"], rounds=2, steps_per_block=4, warmup_steps=1)
def test_trailing(ampgate):
    ampgate.run(workload(model_factory=Trailing, loss_fn=lambda out, y: nn.functional.cross_entropy(out.squeeze(-1), y)))
"""
    )
    result = pytester.runpytest(*CPU)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*WorkloadError: workload 'tokens': the model's output Tensor(32, 4, 1) float32 does not fit*"])
    assert "pytest_ampgate/" not in result.stdout.str()


# --- any metric -------------------------------------------------------------------------------

_REGRESSION_PROJECT = """
import os

import pytest
import torch
from torch import nn
from pytest_ampgate import Workload
from pytest_ampgate.workloads import mse


def data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    w = torch.linspace(-1, 1, 8)
    return x, x @ w + 0.05 * torch.randn(n, generator=g)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, x):
        return self.body(x).squeeze(-1)


@pytest.mark.amp_regression(modes=["amp_bf16"], rounds=2, steps_per_block=5, warmup_steps=1)
def test_regression(ampgate):
    (a, b), (c, d) = data(512, 0), data(128, 1)
    lr = float(os.environ.get("AMPGATE_TEST_LR", "0.05"))
    ampgate.run(Workload("regression", Net, (a, b, c, d), nn.MSELoss(),
                         lambda p: torch.optim.Adam(p, lr=lr), batch_size=32, metric=mse()))
"""


def test_custom_lower_is_better_metric_is_gated_and_baselined_under_its_name(pytester, monkeypatch):
    pytester.makepyfile(test_reg=_REGRESSION_PROJECT)
    first = pytester.runpytest(*CPU, "--ampgate-update", "--ampgate-json", "update.json")
    first.assert_outcomes(passed=1)
    stored = json.loads((pytester.path / "baselines" / "test_reg.json").read_text())
    entry = next(iter(stored["tests"]["test_reg.py::test_regression"].values()))
    assert set(entry["modes"]) == {"fp32", "amp_bf16"}
    for mode in entry["modes"].values():
        assert mode["mse"] > 0 and "accuracy" not in mode
    assert entry["settings"]["metric"] == {"name": "mse", "higher_is_better": False}

    again = pytester.runpytest(*CPU, "-rA", "--ampgate-json", "report.json", "--ampgate-markdown", "summary.md")
    again.assert_outcomes(passed=1)
    again.stdout.fnmatch_lines(
        [
            "*amp_bf16 mse * vs baseline * (tol 0.1 relative, lower is better)*",
            "*metric (baseline)*",
            "*test_reg.py::test_regression*amp_bf16*mse *(*)*pass*",
        ]
    )
    report = json.loads((pytester.path / "report.json").read_text())
    import jsonschema

    from pytest_ampgate.outputs.json_schema import SCHEMA

    jsonschema.validate(report, SCHEMA)
    modes = {m["mode"]: m for m in report["tests"][0]["modes"]}
    assert modes["amp_bf16"]["metric"]["name"] == "mse" and modes["amp_bf16"]["metric"]["higher_is_better"] is False
    assert modes["amp_bf16"]["metric"]["baseline"] == pytest.approx(entry["modes"]["amp_bf16"]["mse"])
    assert modes["amp_bf16"]["accuracy"] is None
    assert {c["metric"] for c in report["tests"][0]["checks"]} >= {"mse", "same_run"}
    assert "metric (baseline)" in (pytester.path / "summary.md").read_text()

    # A worse (higher) mse than the baseline fails, in the lower-is-better direction.
    monkeypatch.setenv("AMPGATE_TEST_LR", "0.0")
    worse = pytester.runpytest(*CPU)
    worse.assert_outcomes(failed=1)
    worse.stdout.fnmatch_lines(["*amp_bf16 mse * vs baseline * rose above * FAILED*"])


def test_metric_chart_names_the_metric(tmp_path):
    pytest.importorskip("matplotlib")
    from pytest_ampgate.gate import GateResult
    from pytest_ampgate.outputs.chart import chart_rows
    from pytest_ampgate.outputs.chart import write as write_chart

    (a, b), (c, d) = _blobs(128, 0), _blobs(64, 1)
    from pytest_ampgate.workloads import perplexity

    workload = Workload(
        "ppl", lambda: Wrapped("tuple"), (a, b, c, d), _logits_loss, lambda p: torch.optim.SGD(p, lr=0.1), 16, metric=perplexity()
    )
    m = measure(workload, ["amp_bf16"], device="cpu", config=TINY, progress=False)
    result = GateResult("t::ppl", "cpu", m, evaluate(m, GateConfig(modes=("amp_bf16",))), baseline_metric={"amp_bf16": 2.0})
    (row,) = chart_rows([result])
    assert row.metric_name == "perplexity" and not row.higher_is_better and row.baseline_metric == 2.0
    assert row.metric == pytest.approx(m.modes["amp_bf16"].metric) and row.reference_metric == pytest.approx(m.reference.metric)
    # The metric panel shows the worst of the metric's checks: same-run passed, no stored baseline (warn).
    same_run = next(c for c in result.verdict.checks if c.metric == "same_run")
    assert same_run.outcome == PASS and row.metric_outcome == "inconclusive"
    assert write_chart([result], tmp_path / "c.png").stat().st_size > 1000


def test_metric_must_return_one_number_before_training():
    (a, b), (c, d) = _blobs(64, 0), _blobs(32, 1)
    broken = Metric("per_sample", lambda model, batches: torch.zeros(3))
    workload = Workload("m", lambda: Wrapped("tuple"), (a, b, c, d), _logits_loss, lambda p: torch.optim.SGD(p, lr=0.1), 16, metric=broken)
    with pytest.raises(WorkloadError, match=r"metric 'per_sample' returned a tensor of shape \(3,\)"):
        measure(workload, ["amp_bf16"], device="cpu", config=TINY, progress=False)
    with pytest.raises(WorkloadError, match="taken by a figure"):
        Metric("speedup", lambda m, b: 0.0)


def test_float_targets_without_a_metric_say_to_bring_one():
    x = torch.randn(64, 8)
    workload = Workload(
        "r",
        lambda: nn.Linear(8, 1),
        (x, x[:, 0], x[:16], x[:16, 0]),
        lambda out, y: ((out.squeeze(-1) - y) ** 2).mean(),
        lambda p: torch.optim.SGD(p, lr=0.1),
        16,
    )
    with pytest.raises(WorkloadError, match=r"targets are floating \(16,\).*give the Workload a metric"):
        measure(workload, ["amp_bf16"], device="cpu", config=TINY, progress=False)


# --- the same-run check -------------------------------------------------------------------------

_CHANCE_PROJECT = '''
import pytest
import torch
from torch import nn
from pytest_ampgate import Workload


class CollapsesInLowPrecision(nn.Module):
    """Learns in fp32; under any low-precision mode its logits are zeroed, so no gradient reaches its
    weights and it stays at chance: the planted regression."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x):
        out = self.fc(x)
        low = x.dtype != torch.float32 or torch.is_autocast_enabled("cpu")
        return out * 0 if low else out


def blobs(n, seed):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, 16, generator=torch.Generator().manual_seed(123)) * 3
    y = torch.randint(0, 4, (n,), generator=g)
    return centers[y] + torch.randn(n, 16, generator=g), y


@pytest.mark.amp_regression(modes=["amp_bf16"], rounds=2, steps_per_block=5, warmup_steps=1, min_low_precision_share=0)
def test_chance(ampgate):
    (a, b), (c, d) = blobs(512, 1), blobs(256, 2)
    ampgate.run(Workload("blobs", CollapsesInLowPrecision, (a, b, c, d), nn.CrossEntropyLoss(),
                         lambda p: torch.optim.SGD(p, lr=0.1), batch_size=32))
'''


def test_a_mode_at_chance_fails_the_same_run_check_on_a_first_run(pytester):
    pytester.makepyfile(test_chance=_CHANCE_PROJECT)
    result = pytester.runpytest(*CPU, "--ampgate-update")
    result.assert_outcomes(failed=1)
    text = result.stdout.str()
    line = re.search(
        r"amp_bf16 accuracy ([\d.]+) vs fp32 ([\d.]+) in this run \(higher is better, tol 0\.08\): below \S+ \(same_run_tolerance=0\.\d+ would pass this run\) FAILED",
        text,
    )
    assert line, text
    assert float(line.group(1)) < 0.4 and float(line.group(2)) > 0.9
    result.stdout.fnmatch_lines(
        [
            "*amp_bf16 loss over the last 5 steps * vs fp32 * in this run (at most +25%): above * FAILED*",
            "*relax same_run_loss_tolerance, same_run_tolerance in @pytest.mark.amp_regression*",
        ]
    )
    assert not list(pytester.path.glob("baselines/**/*.json"))  # a failing run is not recorded as the baseline


def test_same_run_tolerance_has_an_ini_twin_and_is_validated(pytester):
    pytester.makepyfile(test_chance=_CHANCE_PROJECT)
    pytester.makeini("[pytest]\nampgate_same_run_tolerance = 1.0\nampgate_same_run_loss_tolerance = 100\n")
    pytester.runpytest(*CPU).assert_outcomes(passed=1)
    from pytest_ampgate.config import build_config

    with pytest.raises(ConfigError, match="ini option ampgate_same_run_tolerance: same_run_tolerance must be >= 0, got -1.0"):
        build_config(("ini option ampgate_<name>", {"same_run_tolerance": "-1"}))
    # Its upper limit follows the metric: 1 for a share (absolute), none for a relative one; refused before training.
    pytester.makeini("[pytest]\nampgate_same_run_tolerance = 2\n")
    refused = pytester.runpytest(*CPU)
    refused.assert_outcomes(failed=1)
    refused.stdout.fnmatch_lines(["*same_run_tolerance=2 is too large for accuracy, a share in ?0, 1?*"])
    assert "loss finite" not in refused.stdout.str()  # nothing trained


def test_same_run_check_follows_a_lower_is_better_metric():
    from pytest_ampgate.results import Comparison, Measurements, ModeMeasurement

    def mm(name, value, losses):
        m = ModeMeasurement(name, losses=list(losses))
        m.set_metric("perplexity", value, higher_is_better=False)
        return m

    ref = mm("fp32", 3.0, [2.0, 1.1, 1.0])
    worse = mm("amp_bf16", 3.5, [2.0, 1.1, 1.05])
    m = Measurements("w", "cpu", TINY, 8, {}, {}, ref, {"amp_bf16": worse}, {"amp_bf16": Comparison("amp_bf16", "fp32")})
    checks = {c.metric: c for c in evaluate(m, GateConfig(modes=("amp_bf16",))).checks if c.mode == "amp_bf16"}
    assert checks["same_run"].outcome == FAIL and "perplexity 3.500 vs fp32 3.000" in checks["same_run"].why
    assert checks["same_run_loss"].outcome == PASS
    tolerant = evaluate(m, GateConfig(modes=("amp_bf16",)), same_run_tolerance=1.0)
    assert [c.outcome for c in tolerant.checks if c.metric == "same_run"] == [PASS]


# --- Apex O2 ----------------------------------------------------------------------------------


class WithNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def test_o2_keeps_fp32_master_weights_that_the_optimizer_updates():
    runner = prepare("O2", WithNorm(), lambda p: torch.optim.SGD(p, lr=0.1), nn.CrossEntropyLoss(), "cpu")
    assert runner.mode is MODES["fp16_master"] and resolve_mode("o2") is MODES["fp16_master"]
    assert runner.model.fc1.weight.dtype == torch.float16 and runner.model.bn.weight.dtype == torch.float32
    params = [p for group in runner.optimizer.param_groups for p in group["params"]]
    assert params and all(p.dtype == torch.float32 for p in params)
    assert not any(p is q for p in params for q in (runner.model.fc1.weight, runner.model.fc2.weight))
    x, y = _blobs(16, 0)
    before = runner.master.masters[0].detach().clone()
    loss = runner.step(x, y)
    assert loss.dtype == torch.float32  # outputs are cast to fp32 before the loss, as Apex O2 does
    assert not torch.equal(before, runner.master.masters[0])
    torch.testing.assert_close(runner.model.fc1.weight, runner.master.masters[0].half())


def test_o2_overflow_skips_the_step_and_backs_off_the_scale():
    def loss_fn(out, y):  # a loss whose scaled gradient overflows float16 at the starting scale
        return nn.functional.cross_entropy(out, y) * 1e4

    runner = prepare("O2", WithNorm(), lambda p: torch.optim.SGD(p, lr=1e-6), loss_fn, "cpu")
    x, y = _blobs(16, 0)
    for _ in range(6):
        runner.step(x, y)
    stats = runner.scaler_stats()
    assert stats.skipped_steps >= 1 and stats.final_scale < stats.initial_scale == 2.0**16
    assert stats.steps == 6 and stats.min_scale == stats.final_scale


def test_o2_runs_in_the_gate_with_its_loss_scale_and_skipped_steps(pytester):
    pytester.makepyfile(
        test_o2=_TOKEN_PROJECT
        + """
@pytest.mark.amp_regression(modes=["O2"], rounds=2, steps_per_block=4, warmup_steps=1)
def test_o2(ampgate):
    result = ampgate.run(workload())
    scaler = result.mode("fp16_master").scaler
    assert scaler.initial_scale == 2.0 ** 16 and scaler.skipped_steps is not None
"""
    )
    result = pytester.runpytest(*CPU, "-rA")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "*fp16_master loss scaler skipped * of * steps*",
            "*fp16_master loss scale * (start 65536, lowest *)*",
            "*fp16_master ran 100.0% of matmul/conv FLOPs in low precision*",
        ]
    )


def test_every_apex_level_resolves():
    assert [resolve_mode(level).name for level in ("O0", "O1", "O2", "O3")] == ["fp32", "amp_fp16", "fp16_master", "fp16"]


# --- the engine API -----------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_measure_on_a_missing_device_is_an_error_naming_it(device):
    with pytest.raises(ConfigError, match=rf"measure\(device='{device}'\): no CUDA device is available.*device='cpu'"):
        measure("mnist_mlp", ["amp_bf16"], device=device)


def test_measure_on_the_cpu_uses_the_cpu_profile_and_says_what_it_costs(capsys, monkeypatch):
    from pytest_ampgate import profiles
    from pytest_ampgate.workloads import cifar_cnn, mnist_mlp

    assert profiles.sized_for(cifar_cnn(), "cpu").batch_size == profiles.CPU_WORKLOAD_SIZES["cifar_cnn"]["batch_size"]
    assert profiles.sized_for(cifar_cnn(), "cuda").batch_size == cifar_cnn().batch_size
    assert profiles.sized_for(cifar_cnn(batch_size=64), "cpu").batch_size == 64  # the caller's own choice stands
    # The same profile as the pytest face, not a copy of it.
    from pytest_ampgate import session

    assert session.CPU_PROFILE is profiles.CPU_PROFILE and session.CPU_WORKLOAD_SIZES is profiles.CPU_WORKLOAD_SIZES
    tiny = mnist_mlp().with_options(batch_size=8, data_options={"n_train": 32, "n_test": 8})
    monkeypatch.setitem(profiles.CPU_PROFILE, "rounds", 1)
    m = measure(tiny, ["amp_fp16"], device="cpu")
    assert m.config == MeasureConfig(**profiles.CPU_PROFILE)
    err = capsys.readouterr().err
    assert re.search(r"mnist_mlp on cpu: 2 mode\(s\) \(fp32, amp_fp16\) x \d+ training steps of batch 8", err), err
    assert "amp_fp16 run in float16, which a CPU without fp16 arithmetic runs many times slower" in err
    assert "timed round 1/1" in err and "held-out accuracy" in err


def test_the_python_api_example_runs_as_written(monkeypatch):
    from pytest_ampgate import profiles

    readme = (Path(__file__).parent.parent / "docs" / "python-api.md").read_text()
    section = readme.split("## Call the engine from Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.setitem(profiles.CPU_PROFILE, "rounds", 1)  # the same code, fewer steps: the suite stays quick
    monkeypatch.setitem(profiles.CPU_WORKLOAD_SIZES, "mnist_mlp", {"batch_size": 16, "data_options": {"n_train": 64, "n_test": 16}})
    exec(compile(code, "docs/python-api.md", "exec"), {})


# --- precision coverage: every fp32 layer, or the top ones and the rest, adding up -------------


def test_coverage_failure_lists_every_fp32_layer_or_the_rest_summed():
    def cov(n):
        records = [OpRecord(f"layer{i}", "aten.mm", "float32", "forward", 10 * (i + 1), 1) for i in range(n)]
        records.append(OpRecord("big", "aten.mm", "bfloat16", "forward", 1000, 1))
        return PrecisionCoverage.from_records(records)

    three = fp32_layers_text(cov(3))
    assert three.count("layer") == 3 and "more" not in three
    many = cov(9)
    text = fp32_layers_text(many)
    shares = [float(s) for s in re.findall(r"\((\d+\.\d)%\)", text)]
    assert "and 5 more" in text and text.count("layer") == 4
    assert sum(shares) == pytest.approx((1 - many.share) * 100, abs=0.3)


def test_cpu_profile_cifar_stand_in_is_less_noisy_and_says_so():
    from pytest_ampgate.builtin_data import load_cifar10
    from pytest_ampgate.profiles import CPU_WORKLOAD_SIZES

    noise = CPU_WORKLOAD_SIZES["cifar_cnn"]["data_options"]["synthetic_noise"]
    easy, usual = load_cifar10(n_train=16, n_test=8, synthetic_noise=noise), load_cifar10(n_train=16, n_test=8)
    assert f"synthetic noise {noise:g} instead of 8" in easy.note and "synthetic noise" not in usual.note
    assert easy.train_x.std() < usual.train_x.std()
