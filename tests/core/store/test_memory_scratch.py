"""`memory://` keeps its store in a directory of its own under the temporary
directory, deleted on close. A process killed without a chance to close
(SIGKILL, the OOM killer) left it behind, a whole store file each time: the
next `memory://` process deletes those whose owner is gone."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from core.store.embedded import (
    SCRATCH_ORPHAN_AGE,
    SCRATCH_OWNER,
    SCRATCH_PREFIX,
    sweep_scratch,
)
from tests.process import TetherProcess


def _scratch(where: Path, name: str, owner: str | None, age: float = 0.0) -> Path:
    scratch = where / f"{SCRATCH_PREFIX}{name}"
    scratch.mkdir()
    (scratch / "tether.db").write_bytes(b"x" * 4096)
    if owner is not None:
        (scratch / SCRATCH_OWNER).write_text(owner)
    if age:
        then = time.time() - age
        os.utime(scratch, (then, then))
    return scratch


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_only_directories_whose_owner_is_gone_are_deleted(tmp_path):
    gone = _scratch(tmp_path, "gone", str(_dead_pid()))
    mine = _scratch(tmp_path, "mine", str(os.getpid()))
    young = _scratch(tmp_path, "young", None)  # being made: its owner not yet written
    old = _scratch(tmp_path, "old", None, age=SCRATCH_ORPHAN_AGE + 60)
    unreadable = _scratch(tmp_path, "garbled", "not a pid", age=SCRATCH_ORPHAN_AGE + 60)
    other = tmp_path / "tether-other"
    other.mkdir()
    assert sorted(sweep_scratch(tmp_path)) == sorted([gone, old, unreadable])
    assert not gone.exists() and not old.exists() and not unreadable.exists()
    assert mine.exists() and young.exists() and other.exists()


def test_the_next_memory_service_deletes_what_a_killed_one_left(tmp_path):
    scratch_root = tmp_path / "tmp"
    scratch_root.mkdir()
    env = {"TETHER_STORE": "memory://", "TMPDIR": str(scratch_root)}
    first = TetherProcess(tmp_path, env).start()
    try:
        (left,) = scratch_root.glob(SCRATCH_PREFIX + "*")
        assert (left / "tether.db").exists()
    finally:
        first.kill()
    assert left.exists()  # SIGKILL: nothing cleaned up
    second = TetherProcess(tmp_path, env).start()
    try:
        assert not left.exists()
        (kept,) = scratch_root.glob(SCRATCH_PREFIX + "*")
        assert (kept / "tether.db").exists()
    finally:
        second.terminate()
    assert list(scratch_root.glob(SCRATCH_PREFIX + "*")) == []
