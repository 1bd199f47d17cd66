"""Shared test set-up.

The suite runs inner ``pytest --ampgate`` sessions (pytester); on a GitHub Actions runner they must
not append their throwaway summaries to the real job summary.
"""

import pytest

# Imported once, before any in-process pytester run: pytester drops the modules first imported during
# a run, and torchvision's C extension (0.19 with torch 2.4) refuses to register its kernels a second
# time ("already a kernel registered ... roi_align"), so whichever module ran an inner session first
# would break every later torchvision user in this process.
import torchvision  # noqa: F401


@pytest.fixture(autouse=True)
def _no_github_step_summary(monkeypatch):
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
