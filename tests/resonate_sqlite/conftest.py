"""Fixtures of the resonate-sqlite tests. Nothing here imports Tether."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.resonate_sqlite.protocol_server import GROUP, ME, Server


@pytest.fixture
def server(tmp_path: Path) -> Server:
    """An engine on ``tmp_path`` whose process receives ``GROUP`` and ``ME``."""
    return Server(tmp_path / "p.db", local={GROUP, ME})
