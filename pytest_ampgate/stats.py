"""Statistics for verdicts people can trust: pure functions over plain lists of numbers.

The speedup of a mode is estimated from per-round ratios (reference block time / mode block time,
both timed in the same round, so slow drift of clocks or temperature cancels) as their median with a
distribution-free confidence interval from order statistics.  No normality is assumed: GPU timings
have long right tails, and an interval that pretends otherwise makes an A/A comparison fail.

Per-mode step-time summaries reuse ``pytest_benchmark.stats.Stats`` (median, IQR, outliers), so
numbers read the same as in pytest-benchmark's own tables.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .records import from_dict, to_dict

MIN_ROUNDS_FOR_CONFIDENCE = 6
"""With fewer rounds even (min, max) covers the median less than 95% of the time (5 rounds: 93.75%)."""


def median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("median of no values")
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _binomial_cdf(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2)."""
    return sum(math.comb(n, i) for i in range(0, k + 1)) / 2**n


def median_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Distribution-free interval for the median: (low, high, achieved coverage).

    The interval between the k-th smallest and k-th largest sample covers the true median with
    probability 1 - 2 P(Binomial(n, 1/2) <= k - 1), whatever the distribution.  We take the
    narrowest such interval whose coverage is at least ``confidence``; when even (min, max) falls
    short (too few rounds), it is returned with its real, lower coverage so callers can say so.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        raise ValueError("interval of no values")
    if n == 1:
        return ordered[0], ordered[0], 0.0
    best_k, best_cover = 1, 1 - 2 * _binomial_cdf(0, n)
    for k in range(2, n // 2 + 1):
        cover = 1 - 2 * _binomial_cdf(k - 1, n)
        if cover < confidence:
            break
        best_k, best_cover = k, cover
    return ordered[best_k - 1], ordered[n - best_k], best_cover


@dataclass(frozen=True)
class Estimate:
    """A ratio with its own spread and warnings, like ``torch.utils.benchmark.Measurement``."""

    median: float
    low: float
    high: float
    confidence: float
    """Achieved coverage of [low, high]; below the requested confidence when there were too few rounds."""
    rounds: int
    samples: tuple[float, ...]
    noisy: bool
    note: str = ""

    @property
    def relative_width(self) -> float:
        return (self.high - self.low) / self.median if self.median else math.inf

    def describe(self) -> str:
        text = f"{self.median:.2f}x [{self.confidence:.0%} CI {self.low:.2f}-{self.high:.2f}]"
        return f"{text} (noisy: {self.note})" if self.noisy else text

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Estimate:
        return from_dict(cls, d)


def round_ratios(reference_times: Sequence[float], mode_times: Sequence[float]) -> list[float]:
    """Per-round speedups: reference time over mode time, pairing blocks timed in the same round."""
    if len(reference_times) != len(mode_times):
        raise ValueError(f"rounds differ: {len(reference_times)} reference vs {len(mode_times)} mode block times")
    return [r / m for r, m in zip(reference_times, mode_times) if m > 0]


def estimate_ratio(samples: Sequence[float], confidence: float = 0.95, noise_threshold: float = 0.10) -> Estimate:
    """Median ratio with its interval; flagged noisy when the interval is wide or rests on too few rounds.

    ``noise_threshold`` is the largest interval width, relative to the median, that still counts
    as a clean measurement.
    """
    if not samples:
        raise ValueError("no ratio samples to estimate from")
    mid = median(samples)
    low, high, cover = median_interval(samples, confidence)
    notes = []
    if len(samples) < MIN_ROUNDS_FOR_CONFIDENCE:
        notes.append(f"only {len(samples)} rounds: the interval covers {cover:.0%}, not {confidence:.0%}")
    width = (high - low) / mid if mid else math.inf
    if width > noise_threshold:
        notes.append(f"interval spans {width:.0%} of the median (limit {noise_threshold:.0%})")
    return Estimate(mid, low, high, cover, len(samples), tuple(samples), bool(notes), "; ".join(notes))


def summarize_times(times: Sequence[float]) -> dict:
    """pytest-benchmark's summary of per-step times (seconds): min, max, mean, stddev, median, iqr, outliers...

    Imported here, not at the top: the engine runs without pytest-benchmark loaded (a script, a
    torchrun worker), and only the report's per-step summary needs it."""
    from pytest_benchmark.stats import Stats

    stats = Stats()
    for t in times:
        stats.update(t)
    return stats.as_dict() if stats else {}


def abba_order(labels: Sequence[str], rounds: int) -> list[list[str]]:
    """The order in which modes run in each timed round: forward, then reversed, alternately.

    Over a pair of rounds every mode sits at the same average position, so a linear drift (a GPU
    warming up, clocks settling) adds the same time to each and cancels out of the ratios.

    With three or more modes, plain ABC CBA would keep B in the middle for ever: never first, never
    last, never run twice back to back (where it would meet warm caches).  So each pair of rounds
    starts from the next rotation (ABC CBA, BCA ACB, CAB BAC, ...): over ``2 * len(labels)`` rounds
    every mode is first twice, last twice and back to back once (at the turn inside its pair).
    """
    forward = list(labels)
    n = len(forward)
    if n <= 2:
        return [forward if r % 2 == 0 else forward[::-1] for r in range(rounds)]
    order = []
    for r in range(rounds):
        rotated = forward[(r // 2) % n :] + forward[: (r // 2) % n]
        order.append(rotated if r % 2 == 0 else rotated[::-1])
    return order


def balance_counts(order: Sequence[Sequence[str]]) -> dict[str, tuple[int, int, int]]:
    """Per label: (times first in a round, times last, times run twice in a row across a turn)."""
    counts = {label: [0, 0, 0] for positions in order for label in positions}
    for r, positions in enumerate(order):
        if not positions:
            continue
        counts[positions[0]][0] += 1
        counts[positions[-1]][1] += 1
        if r + 1 < len(order) and order[r + 1] and order[r + 1][0] == positions[-1]:
            counts[positions[-1]][2] += 1
    return {label: tuple(c) for label, c in counts.items()}
