"""Waking the pump when there is something to do, instead of polling for it.

Two parts, both used by :class:`resonate_sqlite.connection.SqliteConnection`:

:class:`Doorbell`
    A wake-on-write signal between the processes that share one database
    file on one machine. Each process that receives messages binds a unix
    datagram socket in a directory beside the file (``app.db`` ->
    ``app.db-wake/<random>.sock``). A process whose commit wrote a message to
    the outbox (work for another process) sends one byte to every other socket
    there; the receiver's event loop wakes on it (``loop.add_reader``) and its
    pump looks at the outbox at once. A socket whose process died refuses the
    byte (``ECONNREFUSED``) and is removed by the sender; a full socket queue
    already holds a wake-up. Nothing depends on the signal for correctness:
    the messages are in the file, and every pump still looks at the outbox on
    a long safety-net interval (a missing, stale or unbindable socket, or a
    process of an older version that never rings, costs latency, not work).

:func:`next_due` / :func:`outbox_hook`
    The earliest timer in the file (one statement, three index lookups), so an
    idle pump sleeps until it is due instead of sweeping on a tick; and a
    per-connection TEMP trigger that tells the connection when one of its
    transactions wrote to ``r_outbox`` (what rings the doorbell). A TEMP
    trigger lives in the connection, not in the file: other connections, and
    the file's schema, are unchanged.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import sqlite3
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Final

__all__ = ["SQL_NEXT_DUE", "Doorbell", "next_due", "outbox_hook", "wake_dir"]

logger = logging.getLogger(__name__)

#: The earliest promise deadline, task timer (retry or lease) and schedule run:
#: the first entry of each timer's partial index (the sweep's own indexes).
SQL_NEXT_DUE: Final = (
    "SELECT "
    "(SELECT timeout_at FROM r_promises INDEXED BY r_promises_due "
    "WHERE state = 'pending' ORDER BY timeout_at LIMIT 1), "
    "(SELECT t_due FROM r_promises INDEXED BY r_tasks_due "
    "WHERE t_state IN ('pending', 'acquired') AND t_due IS NOT NULL ORDER BY t_due LIMIT 1), "
    "(SELECT next_run_at FROM r_schedules INDEXED BY r_schedules_due "
    "ORDER BY next_run_at LIMIT 1)"
)

_HOOK_FN: Final = "resonate_outbox_written"
_HOOK_SQL: Final = tuple(
    f"CREATE TEMP TRIGGER IF NOT EXISTS resonate_outbox_{event.lower()} "
    f"AFTER {event} ON main.r_outbox BEGIN SELECT {_HOOK_FN}(); END"
    for event in ("INSERT", "UPDATE")
)

#: Longest socket path the kernel takes (``sun_path`` is 108 bytes with its NUL);
#: a longer one is reached through ``/proc/self/fd/<directory fd>/``.
_MAX_SUN_PATH: Final = 107
_SUFFIX: Final = ".sock"


def next_due(db: sqlite3.Connection) -> int | None:
    """The earliest timer of any kind in ms since the epoch, or None (none)."""
    row = db.execute(SQL_NEXT_DUE).fetchone()
    dues = [d for d in row if d is not None]
    return min(dues) if dues else None


def outbox_hook(db: sqlite3.Connection, written: Callable[[], None]) -> None:
    """Call ``written()`` (inside the statement) whenever this connection
    inserts or updates a row of ``r_outbox``; the caller rings after COMMIT."""

    def fn() -> None:
        written()

    db.create_function(_HOOK_FN, 0, fn)
    for sql in _HOOK_SQL:
        db.execute(sql)


def wake_dir(path: Path) -> Path:
    """The directory of the doorbell sockets for database file ``path``."""
    return path.with_name(path.name + "-wake")


class Doorbell:
    """One process's end of the wake-on-write signal of one database file.

    ``open()`` binds this process's socket (only receivers need one);
    ``ring()`` wakes every other bound process (any process may ring);
    ``drain()`` empties this socket after a wake-up; ``close()`` unbinds.
    Every failure is logged at debug level and leaves polling to do the work:
    the doorbell only ever makes a wake-up sooner.
    """

    def __init__(self, db_path: Path) -> None:
        self.dir = wake_dir(db_path)
        self._name: str | None = None
        self._sock: socket.socket | None = None  # bound: receives
        self._out: socket.socket | None = None  # unbound: sends
        self._dirfd: int | None = None
        self._closed = False  # after close(): a late commit rings nobody (no socket to leak)
        #: rings sent, stale sockets removed (tests and diagnostics)
        self.rings = 0
        self.removed = 0

    @property
    def bound(self) -> bool:
        return self._sock is not None

    def fileno(self) -> int:
        assert self._sock is not None
        return self._sock.fileno()

    def _addr(self, name: str) -> str:
        full = os.path.join(self.dir, name)
        if len(os.fsencode(full)) <= _MAX_SUN_PATH:
            return full
        if self._dirfd is None:
            self._dirfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return f"/proc/self/fd/{self._dirfd}/{name}"

    def open(self) -> bool:
        """Bind this process's socket; False (and polling only) when it cannot."""
        if self._sock is not None:
            return True
        self._closed = False
        name = uuid.uuid4().hex[:16] + _SUFFIX
        for _ in range(3):  # the directory may be removed by a peer's close() meanwhile
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            try:
                self.dir.mkdir(mode=0o700, exist_ok=True)  # its doorbells: the owner's
                self._reset_dirfd()
                sock.bind(self._addr(name))
            except FileNotFoundError:
                sock.close()
                continue
            except OSError as exc:
                sock.close()
                logger.debug("sqlite store: no doorbell in %s (%s): polling only", self.dir, exc)
                return False
            sock.setblocking(False)
            self._sock, self._name = sock, name
            return True
        return False

    def _reset_dirfd(self) -> None:
        if self._dirfd is not None:
            os.close(self._dirfd)
            self._dirfd = None

    def drain(self) -> None:
        """Read every byte waiting (each is one wake-up; they coalesce)."""
        sock = self._sock
        if sock is None:
            return
        with contextlib.suppress(OSError):
            while sock.recv(64):
                pass

    def ring(self) -> None:
        """Send one byte to every other process's socket; remove dead ones."""
        if self._closed:
            return
        try:
            names = [e.name for e in os.scandir(self.dir) if e.name.endswith(_SUFFIX)]
        except OSError:
            return  # no directory: nobody is listening
        if self._out is None:
            self._out = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._out.setblocking(False)
        for name in names:
            if name == self._name:
                continue
            try:
                self._out.sendto(b"\0", self._addr(name))
                self.rings += 1
            except OSError as exc:
                if exc.errno in (errno.ECONNREFUSED, errno.ENOTSOCK):
                    # its process died without unbinding (SIGKILL): a stale socket
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(self.dir, name))
                        self.removed += 1
                elif exc.errno == errno.ENOENT:  # gone meanwhile, or our directory handle is
                    self._reset_dirfd()
                elif exc.errno != errno.EAGAIN:  # EAGAIN: its queue is full, it is woken
                    logger.debug("sqlite store: could not ring %s: %s", name, exc)

    def close(self) -> None:
        """Unbind and remove this process's socket (and the directory when empty)."""
        self._closed = True
        sock, self._sock = self._sock, None
        out, self._out = self._out, None
        for s in (sock, out):
            if s is not None:
                s.close()
        if sock is not None and self._name is not None:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.dir, self._name))
            with contextlib.suppress(OSError):
                self.dir.rmdir()  # fails while other sockets are there: fine
        self._name = None
        self._reset_dirfd()
