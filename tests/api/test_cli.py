"""The `tether` command's answers speak its flags' units."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("days", ["0.5", "0", "-3", "nan"])
def test_gc_refuses_too_short_a_retention_in_days(tmp_path: Path, days: str) -> None:
    env = {**os.environ, "TETHER_STORE": f"sqlite:///{tmp_path}/tether.db"}
    done = subprocess.run(
        [sys.executable, "-m", "api.cli", "gc", "--older-than", days],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == "tether: keep finished jobs at least 1 day"
    assert not (tmp_path / "tether.db").exists()  # refused before the store was opened
