"""Shared test set-up.

The suite runs inner ``pytest --ampgate`` sessions (pytester); on a GitHub Actions runner they must
not append their throwaway summaries to the real job summary.
"""

import pytest


@pytest.fixture(autouse=True)
def _no_github_step_summary(monkeypatch):
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
