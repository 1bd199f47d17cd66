"""GateConfig: every margin, tolerance and protocol setting of one gated test, validated once.

Settings come from three layers, later ones winning: built-in defaults, ini options
(``[tool.pytest.ini_options]`` in pyproject.toml, or pytest.ini: ``ampgate_<name> = value``) and
command-line flags, then the keyword arguments of ``@pytest.mark.amp_regression(...)``.  Each layer
is checked against the same table, so an unknown name or a bad value is reported with where it
came from and what is allowed, before anything is measured.

``missing_baseline`` defaults to "warn": with no baseline for this environment the absolute margins
still gate, and accuracy (the one check with nothing else to compare against) is INCONCLUSIVE with
the command that records one.  The first run on a new GPU or torch release should neither break CI
for want of a number nobody has measured yet nor pass silently; "fail" (or ``--ampgate-strict``)
makes it a failure, "ignore" skips the check.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from .errors import ConfigError
from .records import from_dict, to_dict

MISSING_BASELINE_POLICIES = ("warn", "fail", "ignore")

DEFAULT_MODES = ("amp_fp16", "amp_bf16")
"""The modes compared with fp32 unless a test, the ini file or the command line says otherwise.
Here, not in modes.py, because the plugin reads it (for --help) without importing torch."""


def _number(low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False):
    def check(name: str, value: Any) -> float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{name} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
        if low is not None and (value <= low if low_open else value < low):
            raise ConfigError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
        if high is not None and (value >= high if high_open else value > high):
            raise ConfigError(f"{name} must be {'<' if high_open else '<='} {high}, got {value!r}")
        return float(value)

    return check


def _whole(low: int):
    def check(name: str, value: Any) -> int:
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name} must be a whole number >= {low}, got {value!r}")
        return value

    return check


def _flag(name: str, value: Any) -> bool:
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return value.strip().lower() in ("1", "true", "yes", "on")
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    return value


def _auto_flag(name: str, value: Any) -> bool | None:
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    try:
        return _flag(name, value)
    except ConfigError:
        raise ConfigError(f"{name} must be true, false or auto, got {value!r}") from None


def _modes(name: str, value: Any) -> tuple[str, ...]:
    from .modes import resolve_mode  # torch is imported only once a gated test really runs

    if isinstance(value, str):
        value = [v for v in value.replace(",", " ").split() if v]
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{name} must be a non-empty list of precision modes, got {value!r}")
    from .parallel_modes import DISTRIBUTED_ONLY

    try:
        resolved = tuple(
            v.strip().lower() if isinstance(v, str) and v.strip().lower() in DISTRIBUTED_ONLY else resolve_mode(v).name for v in value
        )
    except ConfigError as exc:
        raise ConfigError(f"{name}: {exc}; with world_size also: {', '.join(DISTRIBUTED_ONLY)}") from None
    if len(set(resolved)) != len(resolved):
        raise ConfigError(f"{name} names a mode twice: {list(value)}")
    return resolved


def _compile(name: str, value: Any):
    from .compiled import parse_compile

    return parse_compile(name, value)


def _choice(options: tuple[str, ...]):
    def check(name: str, value: Any) -> str:
        if not isinstance(value, str) or value.strip().lower() not in options:
            raise ConfigError(f"{name} must be one of {', '.join(options)}, got {value!r}")
        return value.strip().lower()

    return check


@dataclass(frozen=True)
class MeasureConfig:
    """How much the engine measures (the protocol).  Defaults are for a GPU; tests pass tiny counts.

    Its fields are validated by the same checks as the gate's settings of the same names.
    """

    warmup_steps: int = 10
    rounds: int = 12
    """12: a whole number of balanced cycles for two modes (4 rounds) and three (6 rounds), see stats.abba_order."""
    steps_per_block: int = 20
    memory_steps: int = 5
    confidence: float = 0.95
    noise_threshold: float = 0.10
    reference_mode: str = "fp32"
    seed: int = 0
    cudnn_benchmark: bool = True
    precision_coverage: bool = True
    compile: Any = None
    """None: eager.  Otherwise a compiled.CompileSpec: every mode (the reference too) is compiled this way."""
    also_eager: bool = False
    """With ``compile``: every mode runs eager too; the compiled runs are the rows ``<mode>+compiled``."""

    def __post_init__(self):
        for name in PROTOCOL:
            SETTINGS[name][0](name, getattr(self, name))
        _whole(0)("seed", self.seed)
        from .modes import resolve_mode

        resolve_mode(self.reference_mode)

    def total_steps(self) -> int:
        coverage = 1 if self.precision_coverage else 0
        lead_in = self.steps_per_block  # the reference's untimed block before round 0 (see measurement._run)
        return coverage + self.warmup_steps + self.memory_steps + lead_in + self.rounds * self.steps_per_block

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MeasureConfig:
        return from_dict(cls, d)


PROTOCOL = ("warmup_steps", "rounds", "steps_per_block", "memory_steps", "confidence", "noise_threshold")
"""The gate settings that are the engine's protocol, passed through to MeasureConfig."""


SPEEDUP_TOLERANCE = {"cuda": 0.10, "cpu": 0.25}
"""Default ``speedup_tolerance`` per device: the fall below the stored baseline's speedup that is
called a regression.  It must clear how far an unchanged speedup lands from its baseline, which is
measured in another process.  CPU: on the 2-core CI VM, idle, the amp_bf16/fp32 ratio of fresh
processes landed up to 8.8% (thread CPU time) and 17.6% (wall clock) from their median, and single
baselines up to 13.7% from the typical run (benchmarks/step_time_spread.py, gate_quality.py;
BENCHMARKS.md), so 25%.  CUDA: 10% until
benchmarks/gate_quality.py --device cuda has measured it (BENCHMARKS.md says it is still to be)."""

STEP_TIME_TOLERANCE = {"cuda": 0.25, "cpu": 1.00}
"""Default ``step_time_tolerance`` per device.  CPU: on the 2-core CI VM, idle, a process's step
time landed up to 69% (wall clock) and 62% (thread CPU time, a gate-quality run) from another's,
so 100%: on such a VM an absolute step time catches a doubling and no less (BENCHMARKS.md).  CUDA:
a dedicated GPU drifts far less; 25% until benchmarks/step_time_spread.py --device cuda has
measured it (BENCHMARKS.md says it is still to be measured)."""


def on_device(setting: float | None, defaults: Mapping[str, float], device_type: str) -> float:
    """A tolerance in force on one device: the setting where given, else the device's measured default (CUDA's elsewhere)."""
    if setting is not None:
        return setting
    return defaults.get(device_type, defaults["cuda"])


@dataclass(frozen=True)
class GateConfig:
    """What one gated test demands.  See SETTINGS for each field's meaning."""

    modes: tuple[str, ...] = DEFAULT_MODES
    min_speedup: float = 1.2
    speedup_tolerance: float | None = None
    """None: the device's default (SPEEDUP_TOLERANCE), chosen from the spread of a speedup between processes."""
    max_memory_ratio: float = 1.25
    """Not 0.9: models dominated by parameters, gradients and optimizer state (AdamW) sit near 1.0x
    under AMP, and ones whose input batch is large beside them (the MNIST MLP: the autocast copy of
    the batch) above it (1.17x measured on the CPU); see BENCHMARKS.md.  Regressions beyond that
    are caught against the stored baseline (``memory_tolerance``)."""
    memory_tolerance: float = 0.05
    step_time_tolerance: float | None = None
    """None: the device's default (STEP_TIME_TOLERANCE): each mode's step time is judged against its
    own stored baseline, measured in another process, so the tolerance must cover the spread between
    processes, which a CPU VM shows far more of than a ratio within one run (docs/baseline-gates.md)."""
    peak_memory_tolerance: float = 0.05
    """Each mode's peak memory against its own stored baseline: the memory pass is deterministic
    (the same figure in two processes), so 5% leaves room for library versions' workspaces only."""
    check_step_time: bool = True
    accuracy_tolerance: float = 0.02
    same_run_tolerance: float | None = None
    """None: the metric's default (0.08 absolute for a share such as accuracy, 0.10 relative for loss,
    mse or perplexity; see metrics.py and BENCHMARKS.md).  Its limits follow the metric."""
    same_run_loss_tolerance: float = 0.25
    max_skipped_fraction: float = 0.05
    min_loss_scale: float = 1.0
    min_low_precision_share: float = 0.9
    check_speed: bool | None = None
    check_memory: bool | None = None
    missing_baseline: str = "warn"
    confirm: bool = True
    confirm_runs: int = 4
    """The most measurements an undecided speedup gets, the first included: under load that comes and
    goes one run's interval can straddle a real drop that the pooled rounds of a few resolve."""
    baseline_runs: int = 3
    """Measurements pooled into a recorded baseline where timing is gated: one run's error is what a
    baseline judged against many times must not carry (BENCHMARKS.md, gate quality)."""
    baseline_recordings: int = 5
    """Recent ``--ampgate-update`` runs (each its own process) whose timing a baseline pools: one
    process's offset is what the rounds inside it cannot show (:mod:`pytest_ampgate.recordings`)."""
    strict: bool = False
    warmup_steps: int = MeasureConfig.warmup_steps
    rounds: int = MeasureConfig.rounds
    steps_per_block: int = MeasureConfig.steps_per_block
    memory_steps: int = MeasureConfig.memory_steps
    confidence: float = MeasureConfig.confidence
    noise_threshold: float = MeasureConfig.noise_threshold
    world_size: int | None = None
    distributed_timeout: float = 300.0
    compile: Any = None
    """None: eager.  Otherwise a compiled.CompileSpec (from true, "backend[:mode]" or a dict)."""
    max_graph_breaks: int | None = None
    max_compile_time_ratio: float = 3.0
    also_eager: bool = False

    def __post_init__(self):
        if self.also_eager and self.compile is None:
            raise ConfigError(
                "also_eager=True measures each mode eager and compiled, so it needs compile set too "
                "(e.g. compile=True for Inductor, or compile='aot_eager'); without compile every mode is eager already"
            )
        if self.also_eager and self.world_size is not None:
            raise ConfigError(
                "also_eager=True is not supported with world_size (the distributed merge compares every row with eager fp32); "
                "gate the compiled and eager runs in two tests, or drop world_size"
            )

    def to_dict(self) -> dict:
        return to_dict(self)

    def measure_config(self, **overrides):
        """The engine's MeasureConfig for this gate's protocol settings."""
        return MeasureConfig(
            **{n: getattr(self, n) for n in PROTOCOL}, **{"compile": self.compile, "also_eager": self.also_eager, **overrides}
        )

    def speedup_tolerance_on(self, device_type: str) -> float:
        """The speedup tolerance in force on this device."""
        return on_device(self.speedup_tolerance, SPEEDUP_TOLERANCE, device_type)

    def step_time_tolerance_on(self, device_type: str) -> float:
        """The step-time tolerance in force on this device."""
        return on_device(self.step_time_tolerance, STEP_TIME_TOLERANCE, device_type)

    def timing_applies(self, device_type: str) -> bool:
        return self.check_speed if self.check_speed is not None else device_type == "cuda"

    def memory_applies(self, device_type: str) -> bool:
        return self.check_memory if self.check_memory is not None else device_type == "cuda"


SETTINGS: dict[str, tuple[Callable[[str, Any], Any], str]] = {
    "modes": (_modes, "precision modes compared with fp32 (names or Apex aliases), e.g. 'amp_fp16 amp_bf16'"),
    "min_speedup": (
        _number(0, low_open=True),
        "least speedup over fp32 (fp32 step time / mode step time); 1.2 = 20% more steps per second",
    ),
    "speedup_tolerance": (
        _number(0, 1),
        "how far (relative) the speedup may fall below the stored baseline's "
        "(default 0.10 on CUDA, 0.25 on the CPU, from the spread measured between processes)",
    ),
    "max_memory_ratio": (_number(0, low_open=True), "largest peak-memory ratio mode / fp32"),
    "memory_tolerance": (_number(0), "how far (absolute) the memory ratio may rise above the stored baseline's"),
    "step_time_tolerance": (
        _number(0),
        "how far (relative) each mode's step time may rise above that mode's stored baseline (timed where speed is gated; "
        "default 0.25 on CUDA, 1.0 on the CPU, from the spread measured between processes)",
    ),
    "peak_memory_tolerance": (
        _number(0),
        "how far (relative) each mode's peak memory may rise above that mode's stored baseline (where memory is gated)",
    ),
    "check_step_time": (
        _flag,
        "gate each mode's step time against its stored baseline; turn off on shared runners whose runs land on different machines",
    ),
    "accuracy_tolerance": (
        _number(0, 1),
        "how far (absolute) held-out accuracy, or another share, may fall below the stored baseline's",
    ),
    "same_run_tolerance": (
        _number(0),
        "how far a mode's held-out metric may fall behind fp32's in the same run: absolute (at most 1) for a share "
        "such as accuracy (default 0.08), relative for loss, mse or perplexity (default 0.10 = 10%)",
    ),
    "same_run_loss_tolerance": (_number(0), "how far (relative) a mode's mean loss over the last block may exceed fp32's in the same run"),
    "max_skipped_fraction": (
        _number(0, 1),
        "largest fraction of steps that a dynamic loss scaler (amp_fp16, fp16_master) may skip for inf/NaN gradients",
    ),
    "min_loss_scale": (_number(0), "smallest final GradScaler loss scale before it counts as collapsed"),
    "min_low_precision_share": (_number(0, 1), "least share of matmul/conv FLOPs that must run in low precision under AMP"),
    "check_speed": (_auto_flag, "gate the speedup (auto: on CUDA only)"),
    "check_memory": (_auto_flag, "gate the peak-memory ratio (auto: on CUDA only)"),
    "missing_baseline": (_choice(MISSING_BASELINE_POLICIES), "what a missing baseline does: warn (default), fail, or ignore"),
    "confirm": (
        _flag,
        "measure again where a timing check fails or is undecided and judge both runs' rounds together, "
        "so one noisy run cannot fail the build",
    ),
    "confirm_runs": (
        _whole(2),
        "the most measurements (the first included) a speedup left undecided gets, judged on their rounds together; 2: one fresh run",
    ),
    "baseline_runs": (
        _whole(1),
        "measurements pooled into a baseline recorded with --ampgate-update (where timing is gated), so the baseline is surer than one run",
    ),
    "baseline_recordings": (
        _whole(1),
        "recent --ampgate-update runs (each a fresh process) whose median timing the baseline stores; 1 replaces it each time",
    ),
    "strict": (_flag, "treat inconclusive verdicts as failures"),
    "warmup_steps": (_whole(0), "untimed steps per mode before timing"),
    "rounds": (_whole(1), "timed rounds (ABBA-interleaved across modes)"),
    "steps_per_block": (_whole(1), "training steps in each timed block"),
    "memory_steps": (_whole(0), "steps in each mode's peak-memory pass (CUDA)"),
    "confidence": (_number(0, 1, low_open=True, high_open=True), "coverage of the speedup's interval"),
    "noise_threshold": (_number(0, 1, low_open=True), "interval width (relative to the median) above which a speedup is flagged noisy"),
    "world_size": (
        _whole(1),
        "train on this many ranks under torch.distributed (DDP/FSDP2, started by torchrun; gloo on cpu, NCCL on cuda)",
    ),
    "distributed_timeout": (
        _number(0, low_open=True),
        "seconds a distributed run may take before its ranks are stopped and the test fails",
    ),
    "compile": (
        _compile,
        "run every mode (fp32 too) under torch.compile: true (Inductor), 'backend[:mode]' (e.g. 'inductor:reduce-overhead')",
    ),
    "max_graph_breaks": (_whole(0), "most graph breaks a compiled mode may have (unset: report only)"),
    "max_compile_time_ratio": (
        _number(1),
        "compile time may grow to this many times the baseline's before the compile_time check fails (generous: compiling is noisy)",
    ),
    "also_eager": (
        _flag,
        "with compile: measure every mode eager and compiled in the same test; compiled rows are '<mode>+compiled', "
        "compared with a compiled fp32, and a launch-bound step's statement says what compiling gained",
    ),
}

assert set(SETTINGS) == {f.name for f in fields(GateConfig)}


def build_config(*layers: tuple[str, Mapping[str, Any]]) -> GateConfig:
    """Defaults, then each (source, values) layer in order; errors name the source and the setting.

    ``source`` reads like "marker amp_regression on tests/test_x.py::test_y" or "ini option
    ampgate_<name>" (``<name>`` becomes the setting at fault, so the message names the ini key).
    Values of ``None`` in a layer mean "not set here".
    """
    values: dict[str, Any] = {}
    for source, layer in layers:
        unknown = sorted(set(layer) - set(SETTINGS))
        if unknown:
            raise ConfigError(
                f"{source}: unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; valid: {', '.join(SETTINGS)}"
            )
        for name, value in layer.items():
            if value is None:
                continue
            try:
                values[name] = SETTINGS[name][0](name, value)
            except ConfigError as exc:
                raise ConfigError(f"{source.replace('<name>', name)}: {exc}") from None
    return GateConfig(**values)
