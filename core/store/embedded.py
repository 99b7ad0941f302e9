"""`sqlite:///PATH`: the embedded store (placeholder until the SQLite protocol lands)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.settings import Settings


async def open_embedded(path: Path, settings: Settings, pid: str) -> Any:
    raise NotImplementedError("the embedded SQLite store is not there yet")
