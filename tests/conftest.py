"""Session-wide test setup: a private model home, and one Ray instance shared by every test."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Set before anything starts Ray, so its workers inherit it: packaged models convert once per session.
os.environ.setdefault("MMEMBED_HOME", tempfile.mkdtemp(prefix="mmembed-home-"))
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole session (started on first use)."""
    from pipelines import embed

    embed.start()
    yield
    import ray

    ray.shutdown()
