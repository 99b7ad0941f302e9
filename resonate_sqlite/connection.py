"""Embedded durable store: the Resonate server protocol on a SQLite file.

:class:`SqliteConnection` plugs into resonate-sdk through its connector seam
(:class:`resonate_base.Network` + :class:`resonate_base.Source`), so a process
needs no Resonate server and no Postgres::

    conn = SqliteConnection(".tether/tether.db", group="tether", pid=pid)
    await conn.start()                      # optional: fail fast on a bad file
    r = Resonate(network=conn, group="tether", pid=pid)   # same group, same pid

Several processes on one host may share one file: work pushed to a group is
claimed by exactly one of its processes, timers run in every process (each
transition is rechecked under the write lock, so it happens once), and a
process that dies is noticed through its liveness heartbeat. Design notes,
schema and semantics: ``README.md`` beside this file.

An idle connection does not poll. Its pump sleeps until the next thing it has
to do: the next timer due in the file (it reads the earliest one from the
timer indexes), its liveness beat (every 10 s), or a wake-up. A process whose
commit wrote a message for other processes wakes them through
:class:`resonate_sqlite.wake.Doorbell` (one byte on a unix datagram socket
beside the file), so such a message is claimed within milliseconds rather than
at the next poll. The only periodic look left is a safety net: every
``max_poll_interval`` (2 s) the pump checks ``PRAGMA data_version``, which
covers a lost signal, a process without one, and timers other processes set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final, NamedTuple

import msgspec
from resonate_base import ConnectorError

from resonate_sqlite.busy import DEFAULT_LOCK_TIMEOUT, BusyBackoff
from resonate_sqlite.engine import (
    DEFAULT_RETRY_MS,
    Answer,
    Engine,
    StoreBusy,
    StoreFailure,
    now_ms,
)
from resonate_sqlite.wake import Doorbell, next_due, outbox_hook

__all__ = ["SqliteConnection", "SqliteStoreError"]

logger = logging.getLogger(__name__)

#: Interval between outbox looks (messages other processes wrote for us)
#: right after work was about.
DEFAULT_POLL_INTERVAL: Final = 0.02
#: The longest an idle process naps between outbox looks: each round that
#: finds nothing doubles the nap from ``poll_interval`` up to this. With the
#: doorbell (``wake=True``) a safety net; without it, the poll itself.
DEFAULT_MAX_POLL_INTERVAL: Final = 2.0
DEFAULT_MAX_POLL_INTERVAL_UNWOKEN: Final = 0.2
#: The least time between timer sweeps while requests come (their commits may
#: have set earlier timers); an idle process sweeps when the next timer is due.
DEFAULT_TIMER_INTERVAL: Final = 0.1
#: The longest an idle process sleeps on a timer far away (a wall clock that
#: jumps is noticed within this).
MAX_TIMER_SLEEP: Final = 60.0
#: Liveness heartbeat of this process, and when a silent process counts as
#: dead. Reaping only drops a dead process's listeners and unicast messages;
#: its tasks move on when their leases (the SDK's ttl) run out, whatever these.
DEFAULT_PROCESS_HEARTBEAT: Final = 10.0
DEFAULT_PROCESS_TIMEOUT: Final = 60.0
#: See ``max_inflight``; the SDK's default ``max_concurrent_tasks``.
DEFAULT_MAX_INFLIGHT: Final = 64
#: Most requests one group-commit transaction carries.
DEFAULT_MAX_BATCH: Final = 64
#: Rows one claim or one timer batch takes.
BATCH: Final = 256
#: An execute the SDK never answers for stops counting after this long.
INFLIGHT_FORGET_SECS: Final = 300.0


class SqliteStoreError(ConnectorError):
    """The embedded store failed: the file is damaged, locked, unwritable, or an
    I/O error happened. The message names the file and the problem."""


class _ExecTask(msgspec.Struct):
    id: str


class _ExecData(msgspec.Struct):
    task: _ExecTask


class _ExecMsg(msgspec.Struct):
    data: _ExecData


_decode_execute = msgspec.json.Decoder(_ExecMsg).decode
_EXECUTE_PREFIX: Final = '{"kind":"execute"'


class SqliteConnection:
    """A Resonate connector whose server is a SQLite file in this process.

    Implements both :class:`~resonate_base.connections.Network` (``send``) and
    :class:`~resonate_base.connections.Source` (``unicast``,
    ``resolve_target``, ``recv``), so ``Resonate(network=conn)`` uses it as the
    sole source. Pass the same ``group`` and ``pid`` to ``Resonate``: the SDK
    leases tasks under its pid, this connection advertises its unicast address
    and its liveness row under ``pid``; keeping them equal keeps the two views
    of "this process" the same. A pid must be unique among live processes.

    Parameters (all but ``path`` keyword-only):

    ``path``
        The database file (created if missing; its directory must exist).
    ``group``
        The routing group this process serves (``poll://any@{group}``).
    ``pid``
        This process's id; a random hex id when omitted.
    ``poll_interval``
        Seconds between looks at the outbox (``PRAGMA data_version``, then the
        messages) right after work was about (something was found, claimed or
        requested here).
    ``max_poll_interval``
        The longest nap between looks: each look that finds nothing doubles
        the nap from ``poll_interval`` up to this (never below
        ``poll_interval``); a local request or a find goes back to
        ``poll_interval``. Default: 2 s with the doorbell, where it is only a
        safety net (a message for this process rings it awake at once), 0.2 s
        without.
    ``wake``
        Use the doorbell (:class:`resonate_sqlite.wake.Doorbell`): processes
        sharing the file wake each other when a commit wrote messages for
        others. Off, or when its socket cannot be bound: polling only (with
        the 0.2 s ``max_poll_interval`` unless one was given).
    ``timer_interval``
        The least time between timer sweeps while requests come. Otherwise
        the pump sleeps until the next timer in the file is due (at most 60 s)
        and fires it then.
    ``retry_ms``
        How often a still-pending task is pushed again (resonate-pg: 5 s).
    ``lock_timeout``
        Seconds ``start`` and each request (or ``atomic`` write) wait for
        another connection's write lock before failing with
        :class:`SqliteStoreError`; a queued one, from when it was queued.
    ``process_heartbeat`` / ``process_timeout``
        Liveness heartbeat interval, and the silence after which a process is
        considered dead (its listeners and unicast messages are dropped).
    ``max_inflight``
        Executes this process may hold at once (delivered, not yet
        suspended, fulfilled or released) before it stops claiming group work
        from the outbox, leaving it to the group's other processes. Work this
        process produces itself is always run here (the fast path). Match
        ``Resonate(max_concurrent_tasks=...)`` (64 by default).
    ``group_commit``
        Requests that arrive in the same event-loop turn share one
        transaction, each inside its own SAVEPOINT (so each stays atomic), and
        are answered after the COMMIT. Off: one transaction per request.
    ``max_batch``
        Most requests one group-commit transaction carries.
    ``verify``
        Run ``PRAGMA quick_check`` at start (reads the whole file).
    ``clock``
        Milliseconds since the epoch; tests may inject one.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        group: str = "default",
        pid: str | None = None,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        max_poll_interval: float | None = None,
        wake: bool = True,
        timer_interval: float = DEFAULT_TIMER_INTERVAL,
        retry_ms: int = DEFAULT_RETRY_MS,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
        process_heartbeat: float = DEFAULT_PROCESS_HEARTBEAT,
        process_timeout: float = DEFAULT_PROCESS_TIMEOUT,
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
        group_commit: bool = True,
        max_batch: int = DEFAULT_MAX_BATCH,
        verify: bool = False,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        if not group or "/" in group or "@" in group:
            msg = f"invalid group {group!r}: must be non-empty, without '/' or '@'"
            raise ValueError(msg)
        if poll_interval <= 0 or timer_interval <= 0:
            msg = "poll_interval and timer_interval must be positive"
            raise ValueError(msg)
        if max_inflight < 1 or max_batch < 1:
            msg = "max_inflight and max_batch must be at least 1"
            raise ValueError(msg)
        self._path = Path(path)
        self._group = group
        self._pid = pid if pid is not None else uuid.uuid4().hex
        self._unicast = f"poll://uni@{group}/{self._pid}"
        self._anycast = f"poll://any@{group}"
        self._poll_interval = poll_interval
        #: without a working doorbell, a default nap is the short one
        self._unwoken_nap = max_poll_interval is None
        if max_poll_interval is None:
            max_poll_interval = (
                DEFAULT_MAX_POLL_INTERVAL if wake else DEFAULT_MAX_POLL_INTERVAL_UNWOKEN
            )
        self._max_poll_interval = max(max_poll_interval, poll_interval)
        #: the pump's nap: poll_interval while work is about, doubling while
        #: idle; _stirred: a local request came since the nap began
        self._nap_for = poll_interval
        self._stirred = False
        #: the pump's other deadline (timers, beat, reap; monotonic): a nap
        #: ends there at the latest; _nap_end: when the current nap ends
        self._until = 0.0
        self._nap_end = 0.0
        self._timer_interval = timer_interval
        #: when the pump sweeps timers next, and last did (monotonic);
        #: _dirty: a local request since (it may have set an earlier timer)
        self._timer_at = 0.0
        self._swept_at = -timer_interval
        self._dirty = False
        #: a request was answered inside an extra (`request_in`) of the batch
        #: being run: stirred as a batch's own once it committed
        self._asked_in = False
        self._doorbell = Doorbell(self._path) if wake else None
        self._ring_loop: asyncio.AbstractEventLoop | None = None  # where it is watched
        #: a ring came, or a commit of ours wrote to the outbox (to ring)
        self._rung = False
        self._outbox_written = False
        self._lock_timeout = lock_timeout
        self._beat_interval = process_heartbeat
        self._dead_after_ms = int(process_timeout * 1000)
        self._verify = verify
        self._max_batch = max_batch if group_commit else 1

        self._engine = Engine(self._path, clock=clock, retry_ms=retry_ms)
        self._subscribers: list[Callable[[str], None]] = []
        self._open_lock: asyncio.Lock | None = None
        self._checkpointer: _Checkpointer | None = None

        #: requests waiting for the next transaction, and its scheduling state
        self._queue: list[_Request] = []
        #: the host's own writes waiting for the next transaction (`atomic`)
        self._extras: list[_Extra] = []
        self._flush_handle: asyncio.Handle | asyncio.TimerHandle | None = None
        #: paces the batch's retries while the lock is taken; how long each
        #: entry waits is its own (its `deadline`, `_give_up_waiting`)
        self._busy = BusyBackoff()
        self._reopening: asyncio.Task[None] | None = None

        #: task id -> monotonic deadline: executes handed to the SDK that it
        #: has not yet suspended, fulfilled or released (see _note_*).
        self._inflight: dict[str, float] = {}
        self.on_failure: Callable[[BaseException], object] | None = None
        """Told of each failure of the engine's own (a request's, a batch's,
        the pump's), so that its owner may tell a damaged file from the
        rest (Tether's `SqliteDriver`); what it raises is dropped."""
        self._max_inflight = max_inflight
        self._full = False

        self._pump: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[None] | None = None
        self._recheck = False
        self._registered = False
        self._started = False
        self._stopped = False
        self._idle_close: asyncio.TimerHandle | None = None
        self._registering: asyncio.Task[None] | None = None

    # -- identity ------------------------------------------------------------------

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    @property
    def pid(self) -> str:
        return self._pid

    @property
    def group(self) -> str:
        return self._group

    def shared_db(self) -> sqlite3.Connection | None:
        """The engine's own SQLite connection while the file is open, for a
        caller in this process to run its own tables' SQL on (the job index):
        one connection keeps one page cache, where another connection's
        commits would empty it. The caller runs on this connection's event
        loop and never leaves a transaction open across a turn of it; the
        engine waits out one that is open as it waits for a taken lock. None
        while the file is closed: then ``reopen_db``."""
        return self._engine.db

    async def reopen_db(self) -> sqlite3.Connection:
        """The engine's connection, the file opened again if ``stop`` closed
        it, as for a request sent after ``stop`` (the SDK joins its steps
        after stopping its connections: their index writes come late too),
        and closed again once idle."""
        await self._ensure_open()
        if self._stopped:
            self._close_when_idle()
        db = self._engine.db
        if db is None:  # closed again while this waited for the open
            raise SqliteStoreError(StoreFailure(f"sqlite store {self._path}: closed"))
        return db

    def _told(self, exc: BaseException) -> None:
        """`on_failure(exc)`, if set; never raises."""
        if self.on_failure is not None:
            try:
                self.on_failure(exc)
            except Exception:
                logger.exception("sqlite store: on_failure failed")

    @contextlib.contextmanager
    def room_lent(self) -> Iterator[None]:
        """Room for one execute more while the block runs: a task this
        process holds lends its room back while it waits on nothing of the
        store's (Tether's trigger between two tries), as it lends the SDK's
        slot back, so that a job created meanwhile runs here at once, and
        group work is claimed (see ``max_inflight``)."""
        self._max_inflight += 1
        self._update_room()
        try:
            yield
        finally:
            self._max_inflight -= 1
            self._update_room()

    @property
    def inflight(self) -> int:
        """Executes handed to the SDK and not yet finished with (see ``max_inflight``)."""
        return len(self._inflight)

    def unicast(self) -> str:
        """The address that reaches this process alone: ``poll://uni@{group}/{pid}``."""
        return self._unicast

    def resolve_target(self, target: str) -> str:
        """The address any one process of ``target`` claims: ``poll://any@{target}``.

        The same shape resonate-pg and the SDK's fallback resolver mint, so a
        send-only process (``Resonate(network=conn, sources=[])``) stamps
        addresses the workers of that group recognise."""
        return f"poll://any@{target}"

    def recv(self, callback: Callable[[str], None]) -> None:
        """Register a receiver for ``execute`` / ``unblock`` messages (before ``start``)."""
        self._subscribers.append(callback)
        self._engine.local_addresses.update((self._unicast, self._anycast))
        if self._started:  # started before the SDK wired its receivers
            loop = asyncio.get_running_loop()
            if not self._registered:
                self._registering = loop.create_task(self._register_logged())
            self._listen()
            if self._pump is None:
                self._spawn_pump()

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Open the file (WAL, schema) and start the pump and the timers.

        Idempotent; safe to await before handing the connection to
        ``Resonate`` (which starts it again in the background). Raises
        :class:`SqliteStoreError` naming the file when it is damaged, locked
        for longer than ``lock_timeout``, or not writable.
        """
        await self._ensure_open()
        self._stopped = False
        if self._checkpointer is None:
            self._checkpointer = _Checkpointer(self._path, self._engine)
        if self._subscribers and not self._registered:
            await self._register()
        self._started = True
        self._listen()
        if self._pump is None:
            self._spawn_pump()

    async def _register(self) -> None:
        """Join the process table: our liveness row and unicast address."""
        if self._registered:
            return
        self._registered = True
        try:
            await self._call(
                self._engine.register_process, self._pid, self._group, self._unicast, self._anycast
            )
        except ConnectorError:
            self._registered = False
            raise

    async def _register_logged(self) -> None:
        try:
            await self._register()
        except ConnectorError as exc:  # the heartbeat re-registers later
            logger.warning("sqlite store: could not register %s: %s", self._pid, exc)

    async def stop(self) -> None:
        """Stop the pump and the timers, leave the process table, close the file.

        The SDK stops its connections *before* joining its in-flight work, so a
        request sent after ``stop`` is still answered (the file is reopened
        for it, send-only); messages it produces go to the outbox for the
        group's other (or next) processes.
        """
        self._started = False
        pump, self._pump = self._pump, None
        if pump is not None:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
        self._unlisten()
        self._subscribers.clear()
        self._inflight.clear()
        self._engine.local_addresses.clear()
        # What is queued: the flushes already scheduled run it, their retries
        # paced while another connection holds the lock. (A flush called from
        # here besides would start one more chain of retries at every turn.)
        loop = asyncio.get_running_loop()
        while (self._queue or self._extras) and self._engine.db is not None:
            if self._flush_handle is None:
                self._flush_handle = loop.call_soon(self._flush)
            await asyncio.sleep(0.001)
        if self._registered and self._engine.db is not None:
            self._registered = False
            try:
                await self._call(self._engine.unregister_process, self._pid, self._unicast)
            except ConnectorError as exc:
                logger.warning("sqlite store: could not unregister %s: %s", self._pid, exc)
        await asyncio.to_thread(self._stop_checkpointer)
        self._engine.close()
        self._stopped = True

    def close(self) -> None:
        """Close the file handle now (synchronous; ``stop`` already does)."""
        self._stop_checkpointer()
        self._engine.close()
        self._unlisten()

    def _stop_checkpointer(self) -> None:
        ckpt, self._checkpointer = self._checkpointer, None
        if ckpt is not None:
            ckpt.stop()

    async def _ensure_open(self) -> None:
        if self._engine.db is not None:
            return
        if self._open_lock is None:
            self._open_lock = asyncio.Lock()
        async with self._open_lock:
            if self._engine.db is not None:
                return
            try:
                await asyncio.to_thread(self._open_blocking)
            except StoreFailure as exc:
                raise SqliteStoreError(exc) from exc
            except OSError as exc:
                raise SqliteStoreError(StoreFailure(f"sqlite store {self._path}: {exc}")) from exc

    def _open_blocking(self) -> None:
        self._engine.open(timeout=self._lock_timeout)
        try:
            if self._verify:
                self._engine.verify()
            if self._doorbell is not None and self._engine.db is not None:
                outbox_hook(self._engine.db, self._note_outbox)
        except BaseException:
            self._engine.close()
            raise

    # -- the doorbell ----------------------------------------------------------------

    def _listen(self) -> None:
        """Bind our doorbell once we have receivers, then look at the outbox
        once: what was written before the socket existed rang nobody."""
        bell = self._doorbell
        if bell is None or bell.bound or not self._subscribers:
            return
        if bell.open():
            self._ring_loop = asyncio.get_running_loop()
            self._ring_loop.add_reader(bell.fileno(), self._on_ring)
        elif self._unwoken_nap:
            self._max_poll_interval = max(DEFAULT_MAX_POLL_INTERVAL_UNWOKEN, self._poll_interval)
            logger.info("sqlite store: no doorbell in %s: polling", bell.dir)
        self._on_ring()

    def _unlisten(self) -> None:
        bell, loop = self._doorbell, self._ring_loop
        self._ring_loop = None
        if bell is None:
            return
        if bell.bound and loop is not None and not loop.is_closed():
            loop.remove_reader(bell.fileno())
        bell.close()

    def _on_ring(self) -> None:
        """Another process wrote messages: look at the outbox now."""
        if self._doorbell is not None:
            self._doorbell.drain()
        self._rung = True
        if self._wake is not None:
            _wake(self._wake)

    def _note_outbox(self) -> None:
        """(TEMP trigger, inside a statement) this connection wrote to the outbox."""
        self._outbox_written = True

    def _ring(self) -> None:
        """After a commit: wake the other processes if it wrote them messages."""
        if self._outbox_written:
            self._outbox_written = False
            if self._doorbell is not None:
                self._doorbell.ring()

    # -- requests ------------------------------------------------------------------

    async def send(self, req: str, headers: dict[str, str] | None = None) -> str:
        """Answer one protocol request; atomic, durable once answered.

        ``headers`` (the routing origin) are unused: one file, one partition.
        Storage failures raise :class:`SqliteStoreError` (a ConnectorError);
        a malformed or unsupported request is answered (4xx, 501).
        """
        if self._engine.db is None:
            await self._ensure_open()
        if self._stopped:
            self._close_when_idle()
        self._stir()
        if self._max_batch == 1:  # one transaction per request, run inline
            answer = await self._call(self._engine.handle, req)
            self._stir()  # committed now: a sweep since may have missed a timer it set
            self._answer_one(answer)
            return answer[0].decode()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[str] = loop.create_future()
        self._queue.append(_Request(req, fut, time.monotonic() + self._lock_timeout))
        if self._flush_handle is None:
            self._flush_handle = loop.call_soon(self._flush)
        return await fut

    async def atomic[T](
        self, fn: Callable[[sqlite3.Connection], T], after: Callable[[T], None] | None = None
    ) -> T:
        """Run ``fn`` in the next group-commit transaction, after that
        batch's protocol requests, under a savepoint of its own: the host's
        writes to its own tables in this file (Tether's job index) share the
        batch's lock and commit instead of taking their own. Returns once
        committed; an exception ``fn`` raised rolls back its writes alone and
        is raised here. ``fn`` runs on the event loop, inside the transaction:
        it must not wait on anything. ``after(result)`` runs right after the
        commit, whatever became of the caller meanwhile (what must follow a
        committed write, such as telling others of it). A caller cancelled
        while its ``fn`` waits for the batch is not run. Storage failures
        raise :class:`SqliteStoreError`."""
        if self._engine.db is None:
            await self._ensure_open()
        if self._stopped:
            self._close_when_idle()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._extras.append(_Extra(fn, fut, after, time.monotonic() + self._lock_timeout))
        if self._flush_handle is None:
            self._flush_handle = loop.call_soon(self._flush)
        return await fut

    def request_in(
        self, db: sqlite3.Connection, kind: str, data: dict[str, Any]
    ) -> tuple[int, Any, list[str]]:
        """Answer one protocol request inside the transaction an
        :meth:`atomic` ``fn`` runs in (``db``, the one it was handed): its
        writes are ``fn``'s, committed with the host's own or rolled back
        with them when ``fn`` raises. Returns the status, the answer's data
        (the reason, for a status >= 400) and the messages it made, for
        :meth:`deliver` from ``fn``'s ``after`` (once committed)."""
        self._asked_in = True
        return self._engine.request_in(db, kind, data)

    def deliver(self, msgs: list[str]) -> None:
        """Hand the messages of committed :meth:`request_in` calls to this
        process's receivers."""
        if msgs:
            self._deliver_soon(msgs)

    def _close_when_idle(self) -> None:
        """After ``stop``, a late request reopened the file: close it again
        once nothing has been sent for a second."""
        if self._idle_close is not None:
            self._idle_close.cancel()

        def close() -> None:
            self._idle_close = None
            if not self._stopped:
                return
            if self._queue or self._extras:  # still waiting for the lock: look again
                self._close_when_idle()
            else:
                self._engine.close()

        self._idle_close = asyncio.get_running_loop().call_later(1.0, close)

    def _flush(self) -> None:
        """Run the queued requests (up to ``max_batch``) in one transaction."""
        self._flush_handle = None
        if not self._queue and not self._extras:
            return
        loop = asyncio.get_running_loop()
        if self._engine.db is None:  # closed by stop() with requests in flight
            self._reopening = loop.create_task(self._reopen_and_flush())
            return
        batch = self._queue[: self._max_batch]
        extras = self._extras[: self._max_batch]
        # a caller cancelled while its write waited here: not run (as a
        # transaction cancelled before its BEGIN), so nothing is committed
        # that its caller will never follow up on
        live = [extra for extra in extras if not extra.fut.done()]
        self._asked_in = False
        try:
            self._engine.local_room = self._room()
            answers, done = self._engine.run_batch(
                [entry.req for entry in batch], [extra.fn for extra in live]
            )
        except StoreBusy as exc:
            self._give_up_waiting(exc)
            if self._queue or self._extras:
                self._flush_handle = loop.call_later(self._busy.pace(), self._flush)
            else:  # all gave up: whatever comes next starts a new wait
                self._busy.reset()
            return
        except StoreFailure as exc:
            self._busy.reset()
            self._fail(batch, SqliteStoreError(exc), extras)
        except Exception as exc:  # a bug must not strand the SDK's requests
            logger.exception("sqlite store: internal error")
            self._busy.reset()
            self._fail(batch, SqliteStoreError(exc), extras)
        except BaseException as exc:  # KeyboardInterrupt: answer the batch, then go
            self._fail(batch, SqliteStoreError(RuntimeError(repr(exc))), extras)
            raise
        else:
            self._busy.reset()
            del self._queue[: len(batch)]
            del self._extras[: len(extras)]
            self._ring()
            # committed now: a sweep since may have missed a timer a request
            # set (the batch's, or one made inside an extra: `request_in`)
            if batch or self._asked_in:
                self._stir()
            self._answer(batch, answers)
            for extra, (ok, result) in zip(live, done, strict=True):
                extra.settle(ok, result)
        if (self._queue or self._extras) and self._flush_handle is None:
            self._flush_handle = loop.call_soon(self._flush)

    async def _reopen_and_flush(self) -> None:
        try:
            await self._ensure_open()
        except SqliteStoreError as exc:
            batch, self._queue = self._queue, []
            extras, self._extras = self._extras, []
            self._fail(batch, exc, extras, drop=False)
            return
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def _give_up_waiting(self, exc: StoreBusy) -> None:
        """The write lock is still taken: fail the queued requests and writes
        that have waited ``lock_timeout`` since they were queued; the others
        stay queued, each until it runs or its own wait runs out too.

        Each list is in the order of its deadlines (queued, plus the same
        ``lock_timeout``): those run out are at its head, and only they are
        looked at, not all that queued up behind them while the lock stays
        taken (this runs at every retry, up to one every 5 ms)."""
        now = time.monotonic()
        requests, extras = _run_out(self._queue, now), _run_out(self._extras, now)
        if not requests and not extras:
            return
        expired: list[asyncio.Future[Any]] = [entry.fut for entry in self._queue[:requests]]
        expired += [extra.fut for extra in self._extras[:extras]]
        del self._queue[:requests]
        del self._extras[:extras]
        msg = f"{exc} (gave up after {self._lock_timeout:g} s)"
        error = SqliteStoreError(StoreFailure(msg))
        for fut in expired:
            if not fut.done():
                fut.set_exception(error)

    def _fail(
        self,
        batch: list[_Request],
        exc: Exception,
        extras: list[_Extra],
        *,
        drop: bool = True,
    ) -> None:
        self._told(exc)
        if drop:
            del self._queue[: len(batch)]
            del self._extras[: len(extras)]
        for fut in [entry.fut for entry in batch] + [extra.fut for extra in extras]:
            if not fut.done():
                fut.set_exception(exc)

    def _answer(self, batch: list[_Request], answers: list[Answer | Exception]) -> None:
        out: list[str] = []
        for (_, fut, _), answer in zip(batch, answers, strict=True):
            if isinstance(answer, Exception):
                logger.error("sqlite store: request failed: %r", answer)
                self._told(answer)
                if not fut.done():
                    fut.set_exception(SqliteStoreError(answer))
                continue
            resp, msgs, released = answer
            if released is not None:
                self._inflight.pop(released, None)
            out += msgs
            if not fut.done():
                fut.set_result(resp.decode())
        if out:
            self._deliver_soon(out)
        self._update_room()

    def _answer_one(self, answer: Answer) -> None:
        _, msgs, released = answer
        if released is not None:
            self._inflight.pop(released, None)
        if msgs:
            self._deliver_soon(msgs)
        self._update_room()

    async def _call[T](self, fn: Callable[..., T], *args: Any) -> T:
        """Run an engine call of the pump (or gc) in its own transaction,
        retrying while another connection holds the write lock."""
        backoff = BusyBackoff(self._lock_timeout)
        while True:
            if self._engine.db is None:
                await self._ensure_open()
            try:
                self._engine.local_room = self._room()
                result = fn(*args)
            except StoreBusy as exc:
                delay = backoff.next_delay()
                if delay is None:
                    msg = f"{exc} (gave up after {self._lock_timeout:g} s)"
                    raise SqliteStoreError(StoreFailure(msg)) from exc
                await asyncio.sleep(delay)
            except StoreFailure as exc:
                self._told(exc)
                raise SqliteStoreError(exc) from exc
            except Exception as exc:  # a bug must not kill the SDK's worker
                logger.exception("sqlite store: internal error")
                raise SqliteStoreError(exc) from exc
            else:
                self._ring()
                return result

    def _quietly[T](self, fn: Callable[..., T]) -> Callable[..., T]:
        """``fn``, its commit not worth a checkpoint of its own (a liveness beat)."""

        def run(*args: Any) -> T:
            ckpt = self._checkpointer
            if ckpt is None:
                return fn(*args)
            ckpt.quiet = True
            try:
                return fn(*args)
            finally:
                ckpt.quiet = False

        return run

    # -- delivery -----------------------------------------------------------------

    def _deliver_soon(self, msgs: list[str]) -> None:
        if not self._subscribers:
            return
        self._note_delivered(msgs)
        asyncio.get_running_loop().call_soon(self._deliver, msgs)

    def _deliver(self, msgs: list[str]) -> None:
        for msg in msgs:
            for cb in list(self._subscribers):
                try:
                    cb(msg)
                except Exception:
                    logger.exception("sqlite store: receiver failed")

    def _note_delivered(self, msgs: list[str]) -> None:
        deadline = time.monotonic() + INFLIGHT_FORGET_SECS
        for msg in msgs:
            if msg.startswith(_EXECUTE_PREFIX):
                try:
                    self._inflight[_decode_execute(msg).data.task.id] = deadline
                except msgspec.MsgspecError:
                    continue
        self._update_room()

    def _room(self) -> int:
        """Executes this process may still take on."""
        return max(self._max_inflight - len(self._inflight), 0)

    def _update_room(self) -> None:
        """When room frees up after we were full, look at the outbox at once:
        group work may be waiting there that we declined to claim."""
        full = len(self._inflight) >= self._max_inflight
        if self._full and not full:
            self._recheck = True
            self._nap_for = self._poll_interval
            if self._wake is not None:
                _wake(self._wake)
        self._full = full

    def _stir(self) -> None:
        """Work is about (a local request): look every ``poll_interval`` again,
        ending a longer idle nap now, and sweep the timers within
        ``timer_interval`` (the request may have set an earlier one)."""
        self._stirred = True
        wake = self._nap_for > self._poll_interval
        if not self._dirty:
            self._dirty = True
            soon = self._swept_at + self._timer_interval
            if soon < self._timer_at:
                self._timer_at = soon
                wake = wake or self._nap_end > soon
        if wake and self._wake is not None:
            _wake(self._wake)

    def _forget_stale(self) -> None:
        now = time.monotonic()
        stale = [tid for tid, deadline in self._inflight.items() if deadline < now]
        for tid in stale:
            del self._inflight[tid]
        if stale:
            self._update_room()

    # -- the pump -------------------------------------------------------------------

    def _spawn_pump(self) -> None:
        self._pump = asyncio.get_running_loop().create_task(
            self._run_pump(), name=f"sqlite-store-{self._pid}"
        )

    async def _run_pump(self) -> None:
        """Claim messages other processes wrote for us, fire due timers, keep
        our liveness row fresh, reap dead processes; between rounds, nap
        until the next of these is due or something wakes us."""
        engine = self._engine
        now = time.monotonic()
        next_beat = next_reap = now
        next_prune = now + 1.0
        self._timer_at = now
        first = True
        more = False
        while True:
            busy = found = False
            try:
                now = time.monotonic()
                found = self._recheck
                more = await self._claim(first or more or self._recheck or self._rung)
                if self._subscribers and self._inflight and now >= next_prune:
                    self._forget_stale()
                    next_prune = now + 1.0
                if now >= self._timer_at:
                    fired, busy = await self._sweep(now)
                    found = found or fired
                if self._subscribers and now >= next_beat:
                    # (re)joins the process table if we were never in it or reaped
                    await self._call(
                        self._quietly(engine.beat_process),
                        self._pid,
                        self._group,
                        self._unicast,
                        self._anycast,
                    )
                    self._registered = True
                    next_beat = now + self._beat_interval
                if now >= next_reap:
                    reaped = await self._call(
                        self._quietly(engine.reap_processes), self._dead_after_ms
                    )
                    if reaped:
                        logger.info("sqlite store: reaped dead processes %s", reaped)
                    next_reap = now + max(self._beat_interval, 1.0)
                first = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the pump is the runtime: never die
                logger.warning("sqlite store: pump failed: %s", exc)
                self._told(exc)
                # look at everything again after a nap; retry what failed in a second
                first, more, self._rung, self._recheck = True, False, False, False
                next_beat, next_reap = max(next_beat, now + 1.0), max(next_reap, now + 1.0)
                self._timer_at = max(self._timer_at, now + self._timer_interval)
            if busy or more:
                self._nap_for = self._poll_interval
                await asyncio.sleep(0)
                continue
            if found:
                self._nap_for = self._poll_interval
            until = min(self._timer_at, next_reap)
            if self._subscribers:
                until = min(until, next_beat)
                if self._inflight:
                    until = min(until, next_prune)
            self._until = until
            await self._nap()

    async def _nap(self) -> None:
        """Sleep the current nap, or less: until the pump's next deadline, or
        a wake (a ring, ``_update_room``, ``_stir``); the next nap is twice as
        long unless something wakes or finds work first (up to
        ``max_poll_interval``)."""
        if self._rung or self._recheck:
            return
        loop = asyncio.get_running_loop()
        waiter = self._wake = loop.create_future()
        delay = max(min(self._nap_for, self._until - time.monotonic()), 0.0)
        self._nap_end = time.monotonic() + delay
        timer = loop.call_later(delay, _wake, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._wake = None
        if self._stirred:
            self._stirred = False
            self._nap_for = self._poll_interval
        else:
            self._nap_for = min(self._nap_for * 2, self._max_poll_interval)

    async def _claim(self, force: bool) -> bool:
        """Take the messages other processes left for us: every unicast one,
        and group work while we have room. True when more may be waiting.
        Without receivers, only notice other processes' commits (they may
        have set timers: sweep soon)."""
        engine = self._engine
        self._rung = False
        changed = await self._call(engine.changed)
        if changed:
            self._timers_moved()
        if not self._subscribers or not (force or changed):
            return False
        self._recheck = False
        room = self._room()
        addrs = (self._unicast, self._anycast) if room > 0 else (self._unicast,)
        if not await self._call(engine.peek, addrs):
            return False
        claims = [(self._unicast, BATCH), (self._anycast, min(room, BATCH))]
        msgs = await self._call(engine.claim, claims[: len(addrs)])
        if msgs:
            self._note_delivered(msgs)
            self._deliver(msgs)
        return bool(msgs)

    def _timers_moved(self) -> None:
        """Timers may have changed (another connection committed): sweep
        within ``timer_interval`` of the last sweep."""
        self._timer_at = min(self._timer_at, self._swept_at + self._timer_interval)

    def _next_due(self) -> int | None:
        try:
            return next_due(self._engine.db) if self._engine.db is not None else None
        except sqlite3.Error as exc:
            raise StoreFailure(f"sqlite store {self._path}: {exc}") from exc

    async def _sweep(self, now: float) -> tuple[bool, bool]:
        """Fire the timers that are due, and set when to sweep next: when the
        next timer in the file is due (a read of the timer indexes), sooner
        if a local request may have set an earlier one. (Anything fired, a
        full batch was due: sweep again at once.)"""
        self._swept_at = now
        self._dirty = False
        clock = self._engine.clock
        fired = False
        due = await self._call(self._next_due)
        if due is not None and due <= clock():
            fired, full = await self._fire_timers()
            if full:
                self._timer_at = now
                return True, True
            due = await self._call(self._next_due)
        wait = MAX_TIMER_SLEEP if due is None else (due - clock() + 1) / 1000
        if fired:  # never sweep in a loop on a timer that stays due
            wait = max(wait, self._timer_interval)
        self._timer_at = now + min(max(wait, 0.0), MAX_TIMER_SLEEP)
        if self._dirty:  # a request came while we read
            self._timers_moved()
        return fired, False

    async def _fire_timers(self) -> tuple[bool, bool]:
        """Apply due promise timeouts, task retries and lease expiries, and
        schedule runs. (Anything was due, a full batch was due: more may be.)"""
        ps, ts, ss = await self._call(self._engine.due, BATCH)
        if not (ps or ts or ss):
            return False, False
        _, out = await self._call(self._engine.fire, ps, ts, ss)
        if out:
            self._deliver_soon(out)
        return True, max(len(ps), len(ts), len(ss)) >= BATCH

    # -- retention -------------------------------------------------------------------

    async def gc(
        self,
        older_than_ms: int,
        *,
        batch: int = 100,
        keep: Callable[[sqlite3.Connection, str], bool] | None = None,
    ) -> int:
        """Delete finished work: every promise (with its task, callbacks,
        listeners and undelivered messages) of a lineage whose root promise
        settled at least ``older_than_ms`` ago, provided nothing in that
        lineage is still pending. Never touches pending work. Runs in short
        transactions of ``batch`` lineages. Returns the number of promises
        deleted. Ids become reusable: keep ``older_than_ms`` longer than any
        window in which a duplicate start must still reattach.

        ``keep(db, root_id)``, if given, is asked about each lineage due, on
        the store's connection inside the transaction that deletes it: true
        keeps the whole lineage. An application with tables of its own in
        the file reads them there, consistent with the deletion (a root that
        timed out is settled, yet the application may still need its
        lineage). It must only read, and be quick: the write lock is held.
        """
        if older_than_ms < 0:
            msg = "older_than_ms must be >= 0"
            raise ValueError(msg)
        await self._ensure_open()
        cutoff = self._engine.clock() - older_than_ms
        cursor: tuple[int, str] | None = (-1, "")
        total = 0
        while cursor is not None:
            deleted, cursor = await self._call(self._engine.gc_batch, cutoff, cursor, batch, keep)
            total += deleted
            await asyncio.sleep(0)  # let requests through between batches
        return total


class _Request(NamedTuple):
    """A protocol request waiting for the next batch (`SqliteConnection.send`)."""

    req: str
    fut: asyncio.Future[str]
    #: when it stops waiting for the write lock (monotonic: queued + lock_timeout)
    deadline: float


class _Extra(NamedTuple):
    """The host's write waiting for the next batch (`SqliteConnection.atomic`)."""

    fn: Callable[[sqlite3.Connection], Any]
    fut: asyncio.Future[Any]
    after: Callable[[Any], None] | None
    #: when it stops waiting for the write lock (monotonic: queued + lock_timeout)
    deadline: float

    def settle(self, ok: bool, result: Any) -> None:
        """After the batch committed: ``after``, then the caller's answer."""
        if not ok:
            if not self.fut.done():
                self.fut.set_exception(result)
            return
        if self.after is not None:
            try:
                self.after(result)
            except Exception:
                logger.exception("sqlite store: what follows a committed write failed")
        if not self.fut.done():
            self.fut.set_result(result)


def _run_out(entries: Sequence[_Request | _Extra], now: float) -> int:
    """How many of the queue's first entries have waited past their deadline."""
    count = 0
    for entry in entries:
        if entry.deadline > now:
            break
        count += 1
    return count


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _Checkpointer:
    """Copies the WAL back into the database on its own thread and connection.

    A checkpoint is file I/O plus two fsyncs; on the request path it stalled
    one commit in a few hundred for milliseconds. Here it runs with the GIL
    released (the sqlite3 module drops it around every step) on the other
    core, as a PASSIVE checkpoint that never blocks readers or writers.

    It runs ``period`` after the first commit worth it, or as soon as the
    engine has committed ``every`` transactions, whichever comes first, and
    sleeps without a timeout while there is nothing to copy. A commit made
    while ``quiet`` is set (a liveness beat: no data anyone would miss) is not
    worth one on its own: it waits for the next commit that is, or for
    ``every`` of them. The request path keeps a large auto-checkpoint as a
    safety net, which also lets the WAL restart once this thread has copied it.
    """

    def __init__(self, path: Path, engine: Engine, *, every: int = 64, period: float = 1.0) -> None:
        self._path = path
        self._engine = engine
        self._every = every
        self._period = period
        #: set around a commit not worth a checkpoint (the event loop's thread)
        self.quiet = False
        #: commits since the last checkpoint (approximate: two threads count)
        self._pending = 0
        #: checkpoints done (tests and diagnostics)
        self.checkpoints = 0
        self._stop = threading.Event()
        self._kick = threading.Event()  # a commit worth a checkpoint came
        self._full = threading.Event()  # `every` commits came
        engine.on_commits = (1, self._committed)
        self._thread = threading.Thread(target=self._main, name="sqlite-checkpoint", daemon=True)
        self._thread.start()

    def _committed(self) -> None:
        """After every commit, on the committing thread: cheap unless it kicks."""
        self._pending += 1
        if self._pending >= self._every:
            if not self._full.is_set():
                self._full.set()
                self._kick.set()
        elif not self.quiet and not self._kick.is_set():
            self._kick.set()

    def _main(self) -> None:
        try:
            db = sqlite3.connect(str(self._path), timeout=0, isolation_level=None)
        except sqlite3.Error as exc:
            logger.warning("sqlite store: checkpointer cannot open %s: %s", self._path, exc)
            return
        try:
            while True:
                self._kick.wait()
                if self._stop.is_set():
                    return
                self._full.wait(self._period)  # let a burst of commits gather
                if self._stop.is_set():
                    return
                self._kick.clear()
                self._full.clear()
                self._pending = 0
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    self.checkpoints += 1
                except sqlite3.Error as exc:  # busy: another checkpointer runs
                    logger.debug("sqlite store: checkpoint skipped: %s", exc)
        finally:
            db.close()

    def stop(self) -> None:
        self._engine.on_commits = None
        self._stop.set()
        self._kick.set()
        self._full.set()
        self._thread.join(timeout=5)
