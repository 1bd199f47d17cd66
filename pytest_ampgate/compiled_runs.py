"""The engine's torch.compile wiring: which rows run compiled, compiling and settling a mode, timed recompiles.

Kept apart from :mod:`pytest_ampgate.measurement` so the protocol reads the same eager or compiled:
it asks here which spec each row runs under, hands a mode's runner over to be compiled, and
notes what dynamo did during each timed block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

from . import compiled as compiled_mod
from .config import MeasureConfig
from .errors import ConfigError
from .mode_runner import ModeRunner
from .results import ModeMeasurement


def rows(reference: str, modes: Sequence[str], config: MeasureConfig) -> list[tuple[str, str, Any]]:
    """(row name, precision mode, CompileSpec or None) for each row, the reference first.

    ``compile`` alone: every row compiled, under its mode's own name.  With ``also_eager``: every
    mode eager under its own name, then each again compiled as ``<mode>+compiled``."""
    names = [reference, *modes]
    if config.compile is None or not config.also_eager:
        return [(name, name, config.compile) for name in names]
    if reference in modes:
        raise ConfigError(
            f"also_eager: modes names the reference {reference!r} (an A/A control), whose compiled row would be "
            f"{compiled_mod.compiled_name(reference)!r} twice; drop {reference!r} from modes or set also_eager=False"
        )
    return [(name, name, None) for name in names] + [(compiled_mod.compiled_name(n), n, config.compile) for n in names]


def prepare(measurements: Sequence[ModeMeasurement], specs: Sequence[Any]) -> None:
    """Compiled rows start from a clean dynamo, or each is unsupported with torch's reason."""
    if all(spec is None for spec in specs):
        return
    reason = compiled_mod.unsupported_reason()
    if reason is None:
        compiled_mod.reset_dynamo()
        return
    for m, spec in zip(measurements, specs):
        if spec is not None:
            m.supported, m.unsupported_reason = False, reason


CPU_REDUCE_OVERHEAD = "reduce-overhead's CUDA graphs need CUDA: not used on this device, so this measured the backend without them"
"""Said beside a reduce-overhead run off CUDA: Inductor skips CUDA graphs for CPU tensors ("skipping cudagraphs due to
cpu device"), and an AOTAutograd backend such as aot_eager ignores the mode ("ignoring extra kwargs")."""


def compile_and_settle(
    runner: ModeRunner, m: ModeMeasurement, spec, warmup_steps: int, step: Callable[[], Any], device_type: str = "cuda"
) -> None:
    """Wrap the mode's model in torch.compile and step until dynamo compiles nothing new; what it cost and saw."""
    runner.model = compiled_mod.compile_model(runner.model, spec)
    before = compiled_mod.read_counts()
    warm = compiled_mod.warm_up_until_settled(step, min_steps=1, max_steps=max(3, warmup_steps))
    counts = compiled_mod.read_counts().since(before)
    m.compiled = {
        **spec.to_dict(),
        "compile_time_s": warm.compile_time_s,
        "compile_steps": warm.warmup_steps,
        "settled": warm.settled,
        **counts.to_dict(),
        "timed_recompiles": [],
    }
    if spec.mode == "reduce-overhead" and device_type != "cuda":
        m.compiled["note"] = CPU_REDUCE_OVERHEAD


@contextmanager
def watching_timed_block(m: ModeMeasurement):
    """Around a timed block of a compiled row: each recompile (or new graph) in it is kept for the gate."""
    if m.compiled is None:
        yield
        return
    before = compiled_mod.read_counts()
    yield
    new = compiled_mod.read_counts().since(before)
    m.compiled["timed_recompiles"] += compiled_mod.timed_step_problems(compiled_mod.DynamoCounts(), new)
