"""Private directories under the temporary directory, deleted by their
process when it ends (`core.scratch`): `memory://` keeps its store in one,
`tether serve --workers N` its metric files. A process killed without a
chance to clean up (SIGKILL, the OOM killer) left them behind, a whole store
file each time: the next process that makes one deletes those no process
holds open."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from api.metrics import METRICS_PREFIX, multiprocess_dir, workers_alive
from core.scratch import LOCK, ORPHAN_AGE, sweep
from core.settings import Settings
from core.store import open_store
from core.store.embedded import SCRATCH_PREFIX
from tests.process import TetherProcess


def _scratch(where: Path, name: str, locked: bool | None, age: float = 0.0) -> Path:
    """A directory as a `memory://` process leaves it: with its lock file held
    by a live process (`locked`), left by a dead one (not `locked`), or
    without a lock file (None)."""
    scratch = where / f"{SCRATCH_PREFIX}{name}"
    scratch.mkdir()
    (scratch / "tether.db").write_bytes(b"x" * 4096)
    if locked is not None:
        lock = scratch / LOCK
        lock.touch()
        if locked:
            HELD.append(subprocess.Popen([*HOLDER, str(lock)], stdout=subprocess.PIPE))
            assert HELD[-1].stdout is not None and HELD[-1].stdout.readline() == b"held\n"
    if age:
        then = time.time() - age
        os.utime(scratch, (then, then))
    return scratch


HOLDER = [
    sys.executable,
    "-c",
    "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY);"
    " fcntl.flock(fd, fcntl.LOCK_SH); print('held', flush=True); time.sleep(60)",
]
HELD: list[subprocess.Popen[bytes]] = []


def test_only_directories_no_process_holds_are_deleted(tmp_path):
    try:
        gone = _scratch(tmp_path, "gone", locked=False, age=5)
        live = _scratch(tmp_path, "live", locked=True, age=ORPHAN_AGE + 60)
        young = _scratch(tmp_path, "young", locked=None)  # caught before its lock file
        old = _scratch(tmp_path, "old", locked=None, age=ORPHAN_AGE + 60)
        other = tmp_path / "tether-other"
        other.mkdir()
        assert sorted(sweep(tmp_path, SCRATCH_PREFIX)) == sorted([gone, old])
        assert not gone.exists() and not old.exists()
        assert live.exists() and young.exists() and other.exists()
        assert sweep(tmp_path, SCRATCH_PREFIX) == []  # the look let go of nothing it found held
        HELD[-1].kill()
        HELD[-1].wait()
        assert sweep(tmp_path, SCRATCH_PREFIX) == [live]  # its holder gone, however it ended
    finally:
        for holder in HELD:
            holder.kill()
            holder.wait()
        HELD.clear()


async def test_a_memory_store_of_this_process_is_never_swept(tmp_path, monkeypatch):
    """Two `memory://` stores open in one process (tests do it): opening the
    second must not take the first's directory."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    settings = Settings.from_env({}, store="memory://", callback_secret="s")
    first = await open_store(settings, "p1")
    second = await open_store(settings, "p2")
    try:
        assert first.scratch.path.exists() and second.scratch.path.exists()
        assert await first.jobs.get("nothing") is None
    finally:
        await second.close()
        await first.close()
    assert list(tmp_path.glob(SCRATCH_PREFIX + "*")) == []


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


def test_the_next_service_deletes_the_metric_files_a_killed_one_left(tmp_path, monkeypatch):
    """`tether serve --workers 2` keeps its workers' metric files in a
    directory of its own, left behind by a SIGKILL as a `memory://` store's
    is; the next `tether serve --workers N` deletes it as it makes its own
    (`multiprocess_dir`, which `tether serve` enters before its workers start)."""
    scratch_root = tmp_path / "tmp"
    scratch_root.mkdir()
    env = {"TETHER_STORE": f"sqlite:///{tmp_path}/t.db", "TMPDIR": str(scratch_root)}
    first = TetherProcess(tmp_path, env, args=("--workers", "2")).start()
    try:
        (left,) = scratch_root.glob(METRICS_PREFIX + "*")
        assert (left / LOCK).exists()
    finally:
        first.kill()
    assert left.exists()  # SIGKILL: nothing cleaned up
    monkeypatch.setenv("TMPDIR", str(scratch_root))
    monkeypatch.setattr("tempfile.tempdir", None)
    with multiprocess_dir(2):
        assert not left.exists()
        (kept,) = scratch_root.glob(METRICS_PREFIX + "*")
    assert not kept.exists()
    assert list(scratch_root.iterdir()) == []


def test_a_metric_directory_of_an_older_release_is_swept_only_once_its_workers_are_gone(
    tmp_path,
):
    """Directories made before the lock file existed have none: an old one
    goes only when no worker named in its files (`counter_<pid>.db`) lives."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    made = {}
    for name, pid in [("live", os.getpid()), ("dead", dead.pid), ("huge", 10**30)]:
        made[name] = tmp_path / f"{METRICS_PREFIX}{name}"
        made[name].mkdir()
        (made[name] / f"counter_{pid}.db").write_bytes(b"x")
        old = time.time() - ORPHAN_AGE - 60
        os.utime(made[name], (old, old))
    young = tmp_path / f"{METRICS_PREFIX}young"
    young.mkdir()
    swept = sweep(tmp_path, METRICS_PREFIX, workers_alive)
    assert sorted(swept) == sorted([made["dead"], made["huge"]])
    assert made["live"].exists() and young.exists()
