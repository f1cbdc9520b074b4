"""Fixtures shared by the integration tests: real ``meshd`` processes on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from meshd.demo import LocalCluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """A cluster whose processes (tracked by PID) are all stopped at teardown."""
    c = LocalCluster(tmp_path)
    try:
        yield c
    finally:
        c.stop_all()
