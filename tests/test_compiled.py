"""Compiled modes: the ``compile`` setting, dynamo's counts of graph breaks and recompiles (eager backend: fast)."""

import pytest

torch = pytest.importorskip("torch")

from pytest_ampgate import compiled  # noqa: E402

reason = compiled.unsupported_reason()
pytestmark = pytest.mark.skipif(reason is not None, reason=reason or "")


class MLP(torch.nn.Module):
    def __init__(self, plant_break=False):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 2)
        self.plant_break = plant_break

    def forward(self, x):
        h = torch.relu(self.a(x))
        if self.plant_break and h.sum().item() > 0:  # planted data-dependent branch
            h = h * 2
        return self.b(h)


BREAK_LINE = MLP.forward.__code__.co_firstlineno + 2
"""The planted ``.item()`` branch's line."""


def train_step(model, opt, batch):
    def step():
        x = torch.randn(batch(), 8)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


@pytest.mark.parametrize(
    "value, expected",
    [
        (False, None),
        ("off", None),
        (True, compiled.CompileSpec()),
        ("inductor:reduce-overhead", compiled.CompileSpec("inductor", "reduce-overhead")),
        ({"backend": "eager"}, compiled.CompileSpec("eager", None)),
    ],
)
def test_compile_setting_parses(value, expected):
    assert compiled.parse_compile("compile", value) == expected


@pytest.mark.parametrize("value", [3, {"backend": "eager", "modee": "x"}, {"backend": 1}])
def test_bad_compile_setting_names_the_fix(value):
    with pytest.raises(ValueError, match="compile"):
        compiled.parse_compile("compile", value)


def run(plant_break=False, shapes=(4,)):
    compiled.reset_dynamo()
    torch.manual_seed(0)
    model = compiled.compile_model(MLP(plant_break), compiled.CompileSpec("eager"))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    warm = compiled.warm_up_until_settled(train_step(model, opt, lambda: 4), min_steps=1, max_steps=5)
    before = compiled.read_counts()
    sizes = iter(list(shapes) * 3)
    step = train_step(model, opt, lambda: next(sizes))
    for _ in range(3):
        step()
    return warm, before, compiled.read_counts()


def test_clean_compiled_mlp_has_no_breaks_or_recompiles():
    warm, before, after = run()
    assert warm.settled and warm.compile_time_s > 0 and warm.warmup_steps == 2
    assert after.graph_break_count == 0 and after.recompile_reasons == []
    assert after.graphs >= 1
    assert compiled.timed_step_problems(before, after) == []
    assert compiled.graph_break_problems(after, max_graph_breaks=0, baseline_breaks=0) == []
    assert after.to_dict()["graph_breaks"] == 0 and after.to_dict()["recompiles"] == 0


def test_planted_graph_break_is_counted_and_fails_against_limit_and_baseline():
    _warm, _before, after = run(plant_break=True)
    assert after.graph_break_count >= 1
    problems = compiled.graph_break_problems(after, max_graph_breaks=0, baseline_breaks=0)
    assert len(problems) == 2
    assert all("item" in p.lower() for p in problems), problems
    # as measurement reads it (the counts since the warm-up began): the user's line, on torch 2.4 too
    sites = after.since(compiled.DynamoCounts()).break_sites
    assert sites and all(site.startswith(f"forward line {BREAK_LINE}") for site in sites), sites


def test_planted_recompile_in_timed_steps_fails_naming_reason():
    _warm, before, after = run(shapes=(4, 5, 7))
    problems = compiled.timed_step_problems(before, after)
    assert problems, "a changing batch shape must recompile"
    assert any("size" in p.lower() or "shape" in p.lower() or "new graph" in p for p in problems), problems


CPU = ("--ampgate", "--ampgate-device", "cpu", "-p", "no:cacheprovider")

_PROJECT = """
import os
import pytest
import torch
from torch import nn
from pytest_ampgate import Workload

PLANT = os.environ.get("PLANT", "")
LATE = [False]
CALLS = [0]


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 32), nn.Linear(32, 4)

    def forward(self, x):
        h = torch.relu(self.a(x))
        if PLANT == "break" and h.sum().item() > 0:  # planted graph break
            h = h * 1.0
        if LATE[0]:  # planted recompile: the batch grows once the timed steps run
            h = torch.cat([h, h[:1]])[: x.shape[0]]
        if PLANT == "fp32":
            with torch.autocast("cpu", enabled=False):
                return self.b(h.float())
        return self.b(h)


def loss(out, y):
    CALLS[0] += 1
    if PLANT == "recompile" and CALLS[0] == int(os.environ["FLIP_AT"]):
        LATE[0] = True
    return nn.functional.cross_entropy(out.float(), y)


def data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return x, (x[:, 0] > 0).long()


@pytest.mark.amp_regression(modes=["amp_bf16"], rounds=2, steps_per_block=3, warmup_steps=2, compile="aot_eager",
                            check_speed=False, max_compile_time_ratio=1000)
def test_compiled_mlp(ampgate):
    (a, b), (c, d) = data(128, 0), data(64, 1)
    ampgate.run(Workload(name="mlp", model_factory=MLP, data=(a, b, c, d), loss_fn=loss,
                         optimizer_factory=lambda p: torch.optim.SGD(p, lr=0.05), batch_size=16))
"""


def _gate(pytester, monkeypatch, plant="", *args):
    monkeypatch.setenv("PLANT", plant)
    pytester.makepyfile(test_mlp=_PROJECT)
    return pytester.runpytest_subprocess(*CPU, "-rA", "--ampgate-json", "out.json", *args)


def test_compiled_mlp_end_to_end_breaks_recompiles_and_coverage(pytester, monkeypatch):
    """Done-when: clean compiled MLP passes with figures stored; a planted break and recompile fail; fp32 layer named."""
    import json

    clean = _gate(pytester, monkeypatch, "", "--ampgate-update")
    clean.assert_outcomes(passed=1)
    report = json.loads((pytester.path / "out.json").read_text())
    text = json.dumps(report)
    assert '"compile_time_s"' in text and '"graph_breaks": 0' in text and '"recompiles": 0' in text, text[:2000]
    stored = "".join(p.read_text() for p in (pytester.path / "baselines").rglob("*.json"))
    assert '"compiled"' in stored and '"graph_breaks": 0' in stored and '"recompiles": 0' in stored, stored
    clean.stdout.fnmatch_lines(["*0 recompiles in the timed steps*"])

    broken = _gate(pytester, monkeypatch, "break")
    broken.assert_outcomes(failed=1)
    broken.stdout.fnmatch_lines(["*fp32: 1 graph break(s), the baseline had 0*item*"])
    # both modes, each with its own count: one break each, not the other mode's added in; the line on torch 2.4 too
    # (from dynamo's resume functions: counted per mode from torch 2.5, cached for all modes together on 2.4)
    broken.stdout.fnmatch_lines(
        [
            "*fp32: 1 graph break(s), the baseline had 0:*(x1); at forward line 19*",
            "*amp_bf16: 1 graph break(s), the baseline had 0:*(x1); at forward line 19*",
        ]
    )

    monkeypatch.setenv("FLIP_AT", "14")
    recompiled = _gate(pytester, monkeypatch, "recompile")
    recompiled.assert_outcomes(failed=1)
    recompiled.stdout.fnmatch_lines(["*recompiled during the timed steps*LATE*"])

    forced = _gate(pytester, monkeypatch, "fp32")
    forced.assert_outcomes(failed=1)
    forced.stdout.fnmatch_lines(["*amp_bf16 ran *% of matmul/conv FLOPs in low precision*still fp32: b (*"])


def _judged(compiled_figures, stored=None, **settings):
    from pytest_ampgate.baselines import Baseline, ModeBaseline
    from pytest_ampgate.checks import Judging, compiled_checks
    from pytest_ampgate.config import GateConfig
    from pytest_ampgate.results import ModeMeasurement

    mm = ModeMeasurement("amp_bf16", compiled=compiled_figures)
    base = None
    if stored is not None:
        base = Baseline("t", "env", {}, "now", {}, {"amp_bf16": ModeBaseline(extra={"compiled": stored})})
    judging = Judging(measurements=None, config=GateConfig(**settings), baseline=base)
    return {c.metric: c for c in compiled_checks(judging, mm)}


FIGURES = dict(
    backend="inductor", mode=None, compile_time_s=2.0, settled=True, compile_steps=2, graphs=1, graph_breaks=0,
    graph_break_reasons={}, graph_break_sites=[], recompiles=0, timed_recompiles=[],
)  # fmt: skip


def test_fewer_graph_breaks_than_baseline_is_an_improvement_to_record():
    checks = _judged(FIGURES, stored={"graph_breaks": 2, "compile_time_s": 2.0})
    assert checks["graph_breaks"].outcome == "pass"
    assert "fewer than the baseline's 2: an improvement" in checks["graph_breaks"].why
    assert "--ampgate-update" in checks["graph_breaks"].why


def test_compile_time_gated_against_baseline_with_generous_ratio():
    slow = {**FIGURES, "compile_time_s": 7.0}
    assert _judged(slow, stored={"graph_breaks": 0, "compile_time_s": 2.0})["compile_time"].outcome == "fail"
    assert _judged(slow, stored={"graph_breaks": 0, "compile_time_s": 2.0}, max_compile_time_ratio=4)["compile_time"].outcome == "pass"
    assert "compile_time" not in _judged(slow)  # nothing stored: reported in the recompiles line, not gated


def test_max_graph_breaks_fails_without_a_baseline_and_unsettled_warm_up_fails():
    broken = {**FIGURES, "graph_breaks": 1, "graph_break_reasons": {"Tensor.item": 1}, "graph_break_sites": ["forward line 7"]}
    check = _judged(broken, max_graph_breaks=0)["graph_breaks"]
    assert check.outcome == "fail" and "Tensor.item" in check.why and "forward line 7" in check.why
    unsettled = _judged({**FIGURES, "settled": False, "compile_steps": 5})["recompiles"]
    assert unsettled.outcome == "fail" and "still recompiling after 5 warm-up steps" in unsettled.why
