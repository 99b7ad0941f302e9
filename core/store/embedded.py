"""`sqlite:///PATH`: the embedded store (placeholder until the SQLite protocol lands)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from core.settings import Settings

if TYPE_CHECKING:
    from core.store import Store


async def open_embedded(path: Path, settings: Settings, pid: str) -> Store:
    raise NotImplementedError("the embedded SQLite store is not there yet")
