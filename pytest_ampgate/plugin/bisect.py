"""``--ampgate-bisect``: an exit status that ``git bisect run`` reads as the gate meant it.

``git bisect run`` takes 0 as good, 125 as "cannot test this commit" (skip it), any other status
from 1 to 127 as bad, and anything above 127 as a reason to stop bisecting (git-bisect(1), "Bisect
run").  pytest's own statuses would blame a commit for what is not a regression: an INCONCLUSIVE
verdict on a noisy machine passes (0) or, under ``--ampgate-strict``, fails (1) like a regression,
and an interrupted run (2) or a usage error (4) would count as bad.  So a bisect run maps them.
"""

from __future__ import annotations

from collections.abc import Sequence

GOOD, BAD, CANNOT_JUDGE, STOP = 0, 1, 125, 128

BROKEN_OFF = (2, 3, 4)
"""pytest's INTERRUPTED, INTERNAL_ERROR and USAGE_ERROR: the run itself did not finish."""


def bisect_status(exitstatus: int, results: Sequence, unjudged: Sequence[str]) -> tuple[int, str]:
    """The status for ``git bisect run`` and the line that says why.

    ``results`` are the gated results (:class:`~pytest_ampgate.gate.GateResult`); ``unjudged`` names
    the gated tests that ended without a verdict of their own (skipped, errored, failed outside the
    gate, or never called ``ampgate.run()``).
    """
    from ..verdict import FAIL, INCONCLUSIVE, PASS

    if int(exitstatus) in BROKEN_OFF:
        return STOP, f"the run broke off (pytest exit status {int(exitstatus)}): stop bisecting"
    regressed = [r.test_id for r in results if r.verdict.outcome == FAIL and not r.verdict.workload_at_fault]
    if regressed:
        return BAD, f"AMP regression in {', '.join(regressed)}: bad commit"
    broken = [r.test_id for r in results if r.verdict.outcome == FAIL]
    if broken:
        return CANNOT_JUDGE, f"the workload itself is broken in {', '.join(broken)} (its fp32 reference failed): cannot judge AMP"
    doubtful = [r.test_id for r in results if r.verdict.outcome == INCONCLUSIVE]
    if doubtful:
        return CANNOT_JUDGE, f"INCONCLUSIVE: {', '.join(doubtful)}: cannot judge here"
    if unjudged:
        return CANNOT_JUDGE, f"no verdict for {', '.join(unjudged)}: cannot judge here"
    if not results or not all(r.verdict.outcome == PASS for r in results):
        return CANNOT_JUDGE, "no gated test measured anything here: cannot judge"
    return GOOD, f"{len(results)} gated test{'s' * (len(results) != 1)} passed: good commit"
