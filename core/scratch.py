"""Private directories under the temporary directory that live as long as
the process that made them: a `memory://` store's file, `tether serve`'s
metric files. A process killed without a chance to clean up (SIGKILL, the
OOM killer, a container's stop timeout) leaves its directory behind; the next
process that makes one of the same kind deletes those no process holds.

Each directory holds `LOCK`, on which its maker keeps a shared `flock` until
it removes the directory. The kernel lets go of the lock when the process
ends, however it ends, and the lock is seen from any process on the machine
(pid namespaces, containers sharing the directory, included).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

LOCK = "in-use.lock"
ORPHAN_AGE = 3600.0
"""Seconds after which a directory without `LOCK` (made by a release before
it, or caught in the moment before its lock file was made) counts as left
behind."""


class Scratch:
    """A new private directory (mode 0700) named `prefix` + a random part,
    held by this process until `remove`. Making it deletes the directories
    of the same `prefix` that dead processes left (`sweep`, with
    `unlocked_in_use`)."""

    def __init__(self, prefix: str, unlocked_in_use: Callable[[Path], bool] | None = None) -> None:
        self.path = Path(tempfile.mkdtemp(prefix=prefix))
        self._held = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._held, fcntl.LOCK_SH)
        sweep(self.path.parent, prefix, unlocked_in_use)

    def remove(self) -> None:
        """Delete the directory and let go of it (again: nothing)."""
        shutil.rmtree(self.path, ignore_errors=True)
        if self._held >= 0:
            os.close(self._held)
            self._held = -1


def sweep(
    where: Path, prefix: str, unlocked_in_use: Callable[[Path], bool] | None = None
) -> list[Path]:
    """Delete the directories named `prefix`… in `where` that are this user's
    and that no process holds: `LOCK` free, or missing and older than
    `ORPHAN_AGE` and, when `unlocked_in_use` is given, not in use by what it
    tells (a directory of a release before `LOCK` may still be in use).
    Those deleted."""
    swept = []
    for scratch in where.glob(prefix + "*"):
        try:
            if scratch.is_symlink() or scratch.stat().st_uid != os.getuid():
                continue
            if not _abandoned(scratch, unlocked_in_use):
                continue
        except OSError:
            continue
        shutil.rmtree(scratch, ignore_errors=True)
        swept.append(scratch)
    return swept


def _abandoned(scratch: Path, unlocked_in_use: Callable[[Path], bool] | None) -> bool:
    try:
        fd = os.open(scratch / LOCK, os.O_RDONLY)
    except FileNotFoundError:
        if time.time() - scratch.stat().st_mtime < ORPHAN_AGE:
            return False
        return unlocked_in_use is None or not unlocked_in_use(scratch)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # its process has it open
    finally:
        os.close(fd)  # lets go of the lock taken, if any
    return True
