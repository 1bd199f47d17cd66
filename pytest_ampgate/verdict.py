"""What a gate decides and how it says so: the outcomes, the checks' names, a Check, a Verdict, the hints.

Outcomes and check names are string enums whose values are the strings the JSON report, JUnit
and stored results have always carried, so files written before and after read the same; they
compare equal to (and hash like) those plain strings.  The hints that tell a user what to run next
live here once, for the failure text, the plugin's summary and the baseline store's messages alike.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .records import from_dict, to_dict


class _StrEnum(str, enum.Enum):
    """A str enum that formats, prints and hashes as its value (``enum.StrEnum`` needs Python 3.11)."""

    __hash__ = str.__hash__
    __format__ = str.__format__

    def __str__(self) -> str:
        return self.value


class Outcome(_StrEnum):
    """The outcome of one check, and of a whole verdict."""

    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"
    SKIPPED = "skipped"

    @property
    def word(self) -> str:
        """How a check line says it: ``ok``, ``FAILED``, ``INCONCLUSIVE``, ``skipped``."""
        return _WORDS[self]


PASS, FAIL, INCONCLUSIVE, SKIPPED = Outcome.PASS, Outcome.FAIL, Outcome.INCONCLUSIVE, Outcome.SKIPPED
_WORDS = {PASS: "ok", FAIL: "FAILED", INCONCLUSIVE: "INCONCLUSIVE", SKIPPED: "skipped"}
SEVERITY = (FAIL, INCONCLUSIVE, PASS, SKIPPED)
"""Outcomes from the most to the least pressing: the order of a failure text's lines."""
HEADLINES = {FAIL: "AMP REGRESSION", INCONCLUSIVE: "AMP GATE INCONCLUSIVE", PASS: "AMP GATE PASSED", SKIPPED: "AMP GATE SKIPPED"}


class CheckName(_StrEnum):
    """The gate's checks, in the order :func:`pytest_ampgate.gate.evaluate` runs them for a mode.

    A workload's own held-out metric is checked under its own name (``accuracy`` by default), so
    ``Check.metric`` is one of these or that name.
    """

    SUPPORTED = "supported"
    RAN = "ran"
    FINITE_LOSS = "finite_loss"
    SKIPPED_STEPS = "skipped_steps"
    LOSS_SCALE = "loss_scale"
    PRECISION_COVERAGE = "precision_coverage"
    ACCURACY = "accuracy"
    SAME_RUN = "same_run"
    SAME_RUN_LOSS = "same_run_loss"
    SPEEDUP = "speedup"
    MEMORY = "memory"
    STEP_TIME = "step_time"
    PEAK_MEMORY = "peak_memory"
    BASELINE_NOISE = "baseline_noise"
    GRAPH_BREAKS = "graph_breaks"
    RECOMPILES = "recompiles"
    COMPILE_TIME = "compile_time"
    KNOWN_STATE = "known_state"


WORKLOAD_METRICS = (CheckName.RAN, CheckName.FINITE_LOSS)
"""Checks that, failing in the full-precision reference, mean the workload itself is broken."""
TIMING_METRICS = (CheckName.SPEEDUP, CheckName.STEP_TIME)
"""Checks that meet timing noise: confirmed by a fresh measurement before a failure stands."""
MARGIN_SETTING = {
    CheckName.SPEEDUP: "min_speedup",
    CheckName.MEMORY: "max_memory_ratio",
    CheckName.SKIPPED_STEPS: "max_skipped_fraction",
    CheckName.LOSS_SCALE: "min_loss_scale",
    CheckName.PRECISION_COVERAGE: "min_low_precision_share",
    CheckName.SAME_RUN: "same_run_tolerance",
    CheckName.SAME_RUN_LOSS: "same_run_loss_tolerance",
}
"""The marker setting behind each check that a fixed margin (not a stored baseline) can fail."""
ANY_MODE = "*"
"""The mode of a check about the whole run (e.g. leaked global state), not one precision mode."""

UPDATE_COMMAND = "pytest --ampgate --ampgate-update"
"""The one command that records or refreshes baselines (the baseline store's messages say it too)."""
UPDATE_HINT = f"accept a deliberate change with: {UPDATE_COMMAND}"
RECORD_HINT = f"record one with: {UPDATE_COMMAND}"
STRICT_NOTHING_GATED = (
    "--ampgate-strict fails a gated test that gated nothing: request a mode this device supports "
    "(see the reasons above), or run the gate on a device that has the mode"
)


@dataclass(frozen=True)
class Check:
    """One gated property of one mode: what was measured, against what, and the outcome."""

    mode: str
    metric: str
    outcome: Outcome
    why: str
    measured: float | None = None
    threshold: float | None = None
    baseline: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "outcome", Outcome(self.outcome))

    def line(self) -> str:
        if self.mode == ANY_MODE:  # a note about the whole run, not a gated property
            return f"NOTE: {self.why}"
        word = self.outcome.word
        return f"{self.why} {word}" if self.outcome in (PASS, FAIL) else f"{self.why} [{word}]"

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Check:
        return from_dict(cls, d)


@dataclass
class Verdict:
    checks: list[Check] = field(default_factory=list)
    confirmed: bool = False
    """A timing failure was re-measured before being reported."""
    reference: str = "fp32"
    """The reference mode: its failures are the workload's fault, not AMP's."""

    def of(self, outcome: Outcome) -> list[Check]:
        return [c for c in self.checks if c.outcome == outcome]

    @property
    def outcome(self) -> Outcome:
        if self.of(FAIL):
            return FAIL
        if self.no_mode_ran:
            return SKIPPED
        for outcome in (INCONCLUSIVE, PASS):
            if self.of(outcome):
                return outcome
        return SKIPPED

    @property
    def workload_at_fault(self) -> bool:
        """The reference itself failed: the workload (model, data, loss) is broken in full precision."""
        return any(c.mode == self.reference and c.metric in WORKLOAD_METRICS for c in self.of(FAIL))

    @property
    def no_mode_ran(self) -> bool:
        """Every compared mode was unsupported here: nothing about AMP was gated, so nothing passed."""
        compared = {c.mode for c in self.checks if c.mode not in (self.reference, ANY_MODE)}
        return bool(compared) and all(c.metric == CheckName.SUPPORTED for c in self.checks if c.mode in compared)

    def headline(self) -> str:
        if self.outcome == FAIL and self.workload_at_fault:
            return f"WORKLOAD ERROR: the {self.reference} reference itself failed, so AMP is not to blame: fix the workload"
        if self.outcome == SKIPPED and self.no_mode_ran:
            return "AMP GATE SKIPPED: no requested precision mode can run here, so nothing was gated"
        return HEADLINES[self.outcome]

    def explain(self, test_id: str = "", strict: bool = False) -> str:
        """The failure text of DESIGN.md: one line per check, failures first, then what to run next."""
        head = self.headline()
        lines = [f"{test_id} - {head}" if test_id else head]
        lines += ["  " + c.line() for c in sorted(self.checks, key=lambda c: SEVERITY.index(c.outcome))]
        failed = self.of(FAIL)
        if self.no_mode_ran and strict:
            lines.append(f"  {STRICT_NOTHING_GATED}")
        if self.workload_at_fault:
            return "\n".join(lines)  # a broken workload is not cured by a new baseline or a relaxed margin
        if any(c.baseline is not None for c in failed):
            lines.append("  " + UPDATE_HINT)
        margins = sorted({MARGIN_SETTING[c.metric] for c in failed if c.baseline is None and c.metric in MARGIN_SETTING})
        if margins:
            lines.append(f"  a fixed margin failed: fix the regression, or relax {', '.join(margins)} in @pytest.mark.amp_regression(...)")
        if not failed and self.of(INCONCLUSIVE):
            # Only a timing doubt is cured by a quiet GPU; a missing baseline's line already says how to record one.
            timing = any(c.metric in TIMING_METRICS for c in self.of(INCONCLUSIVE))
            advice = ["--ampgate-strict treats this as a failure"] if strict else []
            advice += ["rerun on a quiet GPU, or raise rounds"] if timing else []
            if advice:
                lines.append("  " + "; ".join(advice))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Its fields, with the outcome they add up to for readers of the JSON."""
        return {"outcome": to_dict(self.outcome), **to_dict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> Verdict:
        return from_dict(cls, d)
