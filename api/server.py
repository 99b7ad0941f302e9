"""How `tether serve` runs uvicorn: a server loop and a supervisor that sleep
while nothing happens.

uvicorn's `Server.main_loop` wakes every 100 ms in each worker (to refresh
the `date` header once a second and to notice a signal), and its
`Multiprocess` supervisor pings every worker every 0.5 s (to notice one that
died or hung). On an idle service that was ~30 wake-ups a second across the
processes. Here:

- `TetherServer` ticks once a second, on the second (the `date` header has a
  resolution of one second anyway), and `handle_exit` wakes it at once, so a
  SIGTERM or SIGINT stops a worker no later than before.
- `Supervisor` waits on the workers' process sentinels and on its own
  signals instead of polling: a worker that dies is replaced `RESTART_GAP`
  (0.5 s) later, as uvicorn's poll did at worst; a signal is handled at
  once; and the ping that finds a
  hung worker (alive, but its pong thread does not answer within
  `timeout_worker_healthcheck`) comes every `PING_INTERVAL` seconds.

Once a worker has started, `TetherServer` also freezes what start-up left in
memory (`gc.freeze`), so the garbage collector's full passes skip it.

With several workers, connections are spread evenly (`Balance`). The workers
share one listening socket, and asyncio accepts every connection waiting in
one go: the first worker to wake took most of a client's pool (28 of 32
keep-alive connections in one benchmark run), so one worker ran at 94% of a
core and the other at 31%. Here a worker
accepts one connection per turn of its loop, and leaves a new connection for
`DEFER` seconds to a worker holding fewer; past that it takes it anyway, so a
dead or stuck worker never keeps one waiting longer.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import multiprocessing
import os
import pickle
import resource
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import wait
from types import FrameType
from typing import Any

from uvicorn import Server
from uvicorn.config import STARTUP_FAILURE, Config
from uvicorn.supervisors.multiprocess import SIGNALS, Multiprocess, Process, logger

from api.logs import flush_logs

FEW_FILES = 4096
"""An open-file limit below this is named at start (`more_open_files`)."""


def more_open_files() -> None:
    """Raise this process's soft limit of open files (`RLIMIT_NOFILE`) to its
    hard limit, as Go's runtime does at start and nginx's
    `worker_rlimit_nofile` is set to: every connection is a file, and a
    stream (a dashboard page, a `tether watch`) holds one for hours. Under
    the usual soft limit of 1,024 a thousand history streams left a worker
    no file for a trigger's request, and its job failed ("too many open
    files"). Workers inherit it. A limit below `FEW_FILES` is logged, with
    how to raise it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):  # (a hard limit past the kernel's)
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    if soft != resource.RLIM_INFINITY and soft < FEW_FILES:
        logging.getLogger("tether").warning(
            "this process may open %d files at most (its hard RLIMIT_NOFILE): each"
            " connection is one, and a worker holds streams (job lists' and histories')"
            " on half of them at most; raise the limit (systemd: LimitNOFILE=65536;"
            " docker run --ulimit nofile=65536)",
            soft,
        )


TICK = 1.0
"""Seconds between a worker's ticks (`date` header, request limit)."""
PING_INTERVAL = 5.0
"""Seconds between the supervisor's health pings of its workers. A dead
worker needs none (its sentinel wakes the supervisor); a hung one is killed
after this plus `timeout_worker_healthcheck` (5 s) at most, as uvicorn's was
after 0.5 s plus that."""


RESTART_GAP = 0.5
"""Seconds the supervisor waits before replacing a worker that exited."""
RESTART_GAP_MAX = 30.0
"""The longest wait before replacing a worker that could not reach the store
as it started: the wait doubles from `RESTART_GAP` each time, and goes back
to it once every worker serves (its connection count is set)."""
STORE_DOWN_AT_START = 75
"""A worker's exit status when its start failed because the store did not
answer (EX_TEMPFAIL): the store answered `tether serve`'s own look before the
workers started, so it is down for now, and the worker is replaced (with a
growing wait) rather than the host stopped. Any other failed start stops
the supervisor, with uvicorn's `STARTUP_FAILURE` as `tether serve`'s exit
status."""
store_down_at_start = False
"""Set by the app's lifespan, in a worker, when the store did not answer as
it opened (`api.app`)."""


class StartupLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """The logger of a worker's lifespan (uvicorn's `uvicorn.error`), which
    logs a failed start-up as the app's traceback and "Application startup
    failed. Exiting.", both errors. With `quiet` (the supervisor saw the
    store down at an earlier try), those of a start that failed because the
    store did not answer go to DEBUG: the supervisor logs one line per try
    (`Supervisor._replace`), the traceback was logged at the first. Any other
    failed start keeps its traceback. A quieted traceback's last line (the
    store's own words: unreachable, a token refused, paired with another
    index) is still logged, as a warning: the reason may change between
    tries."""

    def __init__(self, logger: logging.Logger, quiet: bool) -> None:
        super().__init__(logger, {})
        self.quiet = quiet

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if self.quiet and store_down_at_start and level >= logging.ERROR:
            lines = str(msg).strip().splitlines()
            if len(lines) > 1:  # a traceback
                self.logger.warning("the store again: %s", lines[-1])
            level = logging.DEBUG
        self.logger.log(level, msg, *args, **kwargs)


DEFER = 0.002
"""Seconds a worker leaves a new connection to a worker holding fewer before
it takes it itself."""
SLOTS = 256
"""Workers whose connection counts are shared; more are not balanced."""
NO_WORKER = -1


class Balance:
    """One worker's side of spreading connections: its slot in a table the
    supervisor shares with every worker (each slot: the connections that
    worker holds, or `NO_WORKER`), and its own accepting of connections."""

    # set by `serve`, in the worker (a `Balance` is made in the supervisor)
    _loop: asyncio.AbstractEventLoop
    _factory: Callable[[], asyncio.Protocol]
    _held: Callable[[], int]
    _ssl: Any  # the server's TLS context, if it has one

    def __init__(self, counts: Any, slot: int) -> None:
        self.counts, self.slot = counts, slot
        self.stopped = False  # the server stopped accepting
        self.pending = 0  # accepted, not yet connected (a TLS handshake)

    def note(self, held: int) -> None:
        """Publish how many connections this worker holds (those still being
        set up too); once it stopped accepting, it holds none for the others."""
        if not self.stopped:
            self.counts[self.slot] = held + self.pending

    def stop(self) -> None:
        """No more accepting: while it drains, the others leave it out."""
        self.counts[self.slot] = NO_WORKER
        self.stopped = True

    def _fewer_elsewhere(self, held: int) -> bool:
        return any(
            NO_WORKER < count < held for i, count in enumerate(self.counts) if i != self.slot
        )

    def serve(
        self,
        listeners: list[socket.socket],
        factory: Callable[[], asyncio.Protocol],
        held: Callable[[], int],
        backlog: int,
        ssl: Any,
    ) -> Listening:
        """Accept the listeners' connections on this loop, one per turn:
        `factory` makes each one's protocol, `held` counts those connected."""
        self._loop, self._factory, self._held = asyncio.get_running_loop(), factory, held
        self._ssl = ssl
        for sock in listeners:
            sock.listen(backlog)  # as asyncio's create_server does
            sock.setblocking(False)
            self._loop.add_reader(sock.fileno(), self._ready, sock)
        self.note(held())
        return Listening(self, self._loop, listeners)

    def _ready(self, sock: socket.socket) -> None:
        if self._fewer_elsewhere(self._held() + self.pending):
            # Another worker holds fewer and was woken too: let it take this one.
            self._loop.remove_reader(sock.fileno())
            self._loop.call_later(DEFER, self._again, sock)
            return
        self._accept(sock)

    def _again(self, sock: socket.socket) -> None:
        """`DEFER` later: a connection still waiting is taken here, then back
        to watching the listener."""
        if self.stopped or sock.fileno() < 0:
            return
        if self._accept(sock):
            with contextlib.suppress(ValueError, OSError):  # the server stopped meanwhile
                self._loop.add_reader(sock.fileno(), self._ready, sock)

    def _accept(self, sock: socket.socket) -> bool:
        """Take one waiting connection, if any; False when the listener is
        left unwatched for a while (accepting failed for want of resources)."""
        try:
            conn, _ = sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return True  # none waits (another worker took it)
        except OSError as exc:  # out of descriptors or memory: look again in a second
            logger.warning(f"accepting a connection failed: {exc}")
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(sock.fileno())
            self._loop.call_later(1.0, self._again, sock)
            return False
        conn.setblocking(False)
        self.pending += 1
        self._loop.create_task(self._connect(conn))
        self.note(self._held())
        return True

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, conn, ssl=self._ssl)
        except (OSError, ValueError) as exc:  # gone before it was set up (a reset, a TLS error)
            conn.close()
            logger.debug(f"a connection ended before it was set up: {exc!r}")
        finally:
            self.pending -= 1
            self.note(self._held())


class Listening:
    """What uvicorn's shutdown needs of a server: `close` stops accepting
    (the sockets themselves uvicorn closes), `wait_closed` has nothing to wait
    for (uvicorn waits for the connections itself)."""

    def __init__(
        self, balance: Balance, loop: asyncio.AbstractEventLoop, listeners: list[socket.socket]
    ) -> None:
        self._balance, self._loop, self._listeners = balance, loop, listeners

    def close(self) -> None:
        self._balance.stop()
        for sock in self._listeners:
            if sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())

    async def wait_closed(self) -> None:
        return None


class TetherServer(Server):
    """uvicorn's server, waking once a second rather than ten times, and at
    once on a signal."""

    _wake: asyncio.Event | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    balance: Balance | None = None
    supervisor: int | None = None
    """The supervisor's pid, for a worker: when it is gone (SIGKILLed, so it
    could not stop its workers), the worker stops too, rather than go on
    serving unsupervised and holding the port a new `tether serve` needs."""
    store_down_before = False
    """The supervisor saw the store down as an earlier worker started (since
    every worker last served): a start that fails so again logs no traceback
    (`StartupLog`)."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        lifespan: Any = self.lifespan  # uvicorn's `LifespanOn` logs through `.logger`
        lifespan.logger = StartupLog(logging.getLogger("uvicorn.error"), self.store_down_before)
        if self.balance is None or not sockets:
            await super().startup(sockets)
            return
        # uvicorn's own start-up for shared sockets, but accepting through
        # `Balance`: uvloop accepts inside libuv, every waiting connection at once.
        await self.lifespan.startup()
        if self.lifespan.should_exit:
            sys.exit(STORE_DOWN_AT_START if store_down_at_start else STARTUP_FAILURE)
        config, state = self.config, self.server_state

        balance = self.balance

        def held() -> int:
            return len(state.connections)

        def protocol() -> asyncio.Protocol:  # as uvicorn's `startup` makes them
            made: asyncio.Protocol = config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=state, app_state=self.lifespan.state
            )
            lost = made.connection_lost

            def connection_lost(exc: Exception | None) -> None:
                lost(exc)
                balance.note(held())  # at once: a count left high skews the next accepts

            made.connection_lost = connection_lost  # type: ignore[method-assign]
            return made

        listening = balance.serve(sockets, protocol, held, config.backlog, config.ssl)
        self.servers = [listening]  # type: ignore[list-item]  # uvicorn closes and awaits it
        self.started = True

    async def main_loop(self) -> None:
        # Start-up is over (the app and the service are open): its objects
        # (~76,000) live as long as the process, so the collector stops
        # scanning them. A full collection then takes 11-45 ms instead of
        # 55-163, and one that lands inside a write transaction holds the
        # other worker's writes up that much less (bench/HISTORY.md).
        gc.collect()
        gc.freeze()
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        while not await self.on_tick(0):  # 0: refresh the date header every tick
            if self.balance is not None:  # connections that closed since
                self.balance.note(len(self.server_state.connections))
            if self.supervisor is not None and os.getppid() != self.supervisor:
                logger.warning(
                    "the supervisor [%d] is gone: worker [%d] stops", self.supervisor, os.getpid()
                )
                self.should_exit = True
                continue
            # On the next whole second, when the date header changes.
            now = time.time()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), math.floor(now / TICK + 1) * TICK - now)
            self._wake.clear()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's, and the log lines still queued written (`LogQueue`)
        before it raises the signal that stopped it again: that ends the
        process as the signal does, with no exit handler run (its last
        lines, "Application shutdown complete" among them, were lost)."""
        with super().capture_signals():
            try:
                yield
            finally:
                flush_logs()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        # A signal handler runs between two bytecodes, perhaps inside the
        # loop's own code: hand the wake to the loop the thread-safe way.
        if self._loop is not None and self._wake is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake.set)


class TetherProcess(Process):
    """A supervised worker that runs `TetherServer`."""

    def __init__(
        self,
        config: Config,
        sockets: list[socket.socket],
        balance: Balance | None,
        store_down_before: bool = False,
    ) -> None:
        self.balance = balance  # before uvicorn's __init__ hands `self` to the new process
        self.supervisor = os.getpid()  # made in the supervisor
        self.store_down_before = store_down_before
        super().__init__(config, sockets)

    def _healthcheck(self, timeout: float) -> bool | None:
        """uvicorn's ping, ended also by the worker's exit: the supervisor
        holds the pipe's other end too, so a worker killed before it answers
        would leave uvicorn's `poll` waiting the whole timeout (5 s), with
        its replacement and the supervisor's signals waiting behind it."""
        try:
            self.parent_conn.send(b"ping")
            if self.parent_conn in wait([self.parent_conn, self.process.sentinel], timeout):
                started: bool = self.parent_conn.recv()
                return started
            return None
        except (OSError, EOFError, pickle.UnpicklingError):
            return None

    @property
    def server(self) -> Server:
        if self._server is None:
            self._server = TetherServer(config=self.config)
            self._server.balance = self.balance
            self._server.supervisor = self.supervisor
            self._server.store_down_before = self.store_down_before
        return self._server


class Supervisor(Multiprocess):
    """uvicorn's `Multiprocess` with `TetherServer` workers, woken by a
    worker's exit or a signal rather than polling every 0.5 s."""

    def __init__(self, config: Config, sockets: list[socket.socket], store: str = "") -> None:
        super().__init__(config, sockets)
        self.store = store
        """The store, as the log may show it (no credentials: `describe`)."""
        self.store_down = 0
        """Workers that could not reach the store as they started, since
        every worker last served: after the first, a worker's failed start
        logs no traceback (`StartupLog`), the supervisor one line a try."""
        #: connections each worker holds, by its place in `processes` (`Balance`)
        self.counts = multiprocessing.get_context("spawn").RawArray("i", [NO_WORKER] * SLOTS)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        for sig in SIGNALS:
            signal.signal(sig, self._signalled)
        self.gap = RESTART_GAP
        """The wait before replacing a worker that exited (`RESTART_GAP_MAX`)."""
        self.failed = False
        """A worker failed to start for another reason than the store: the
        supervisor stopped (`tether serve` exits with `STARTUP_FAILURE`)."""

    def _signalled(self, sig: int, frame: FrameType | None) -> None:
        self.signal_queue.append(sig)
        with contextlib.suppress(OSError):  # full (a wake is pending anyway), or closed
            os.write(self._wake_w, b"\0")  # ends the wait in `run`

    def _process(self, slot: int) -> Process:
        """A new worker in place `slot` of `processes`."""
        if slot < SLOTS:
            self.counts[slot] = NO_WORKER  # until it says how many it holds
        balance = Balance(self.counts, slot) if slot < SLOTS else None
        return TetherProcess(self.config, self.sockets, balance, self.store_down > 0)

    def run(self) -> None:
        logger.info(f"Started parent process [{os.getpid()}]")
        self.init_processes()
        next_ping = time.monotonic() + PING_INTERVAL
        while not self.should_exit.is_set():
            sentinels = [p.process.sentinel for p in self.processes]
            ready = wait([self._wake_r, *sentinels], max(next_ping - time.monotonic(), 0))
            if self._wake_r in ready:
                os.read(self._wake_r, 4096)
            self.handle_signals()
            exited = [p for p in self.processes if p.process.sentinel in ready]
            for idx, process in enumerate(self.processes):
                if process in exited and idx < SLOTS:
                    self.counts[idx] = NO_WORKER  # no waiting on it for new connections
            if exited:
                # A worker that keeps dying (killed for memory, a crash at
                # import) is replaced at most every RESTART_GAP, as uvicorn's
                # poll did; a signal ends the pause.
                wait([self._wake_r], RESTART_GAP)
            if time.monotonic() >= next_ping:
                self.keep_subprocess_alive()
                next_ping = time.monotonic() + PING_INTERVAL
            elif exited:
                self.keep_subprocess_alive(ping=False)
        self.terminate_all()
        self.join_all()
        logger.info(f"Stopping parent process [{os.getpid()}]")
        # -1 first: a late signal's write fails rather than reach a reused fd.
        wake_r, wake_w, self._wake_w = self._wake_r, self._wake_w, -1
        os.close(wake_r)
        os.close(wake_w)

    # uvicorn's own, but making `TetherProcess`es.

    def init_processes(self) -> None:
        for _ in range(self.processes_num):
            process = self._process(len(self.processes))
            process.start()
            self.processes.append(process)

    def keep_subprocess_alive(self, ping: bool = True) -> None:
        """Replace each worker that exited; with `ping`, also each that does
        not answer a ping (hung). The exited go first: a ping of a worker
        still starting waits for its answer, up to 5 s."""
        if self.should_exit.is_set():
            return
        # A sentinel closes as its worker exits, a moment before the kernel
        # lets it be reaped: `is_alive` alone would ping the dead for 5 s.
        gone = [bool(wait([p.process.sentinel], 0)) for p in self.processes]
        for idx in [i for i, g in enumerate(gone) if g]:
            if not self._replace(idx):
                return
        if not ping:
            return
        for idx, process in enumerate(self.processes):
            if gone[idx] or process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                continue
            if not self._replace(idx, hung=True):  # killed and replaced
                return
        # Every worker serves (a worker still starting answers pings too: its
        # count is set only once it serves): the store is back.
        if not any(gone) and all(c != NO_WORKER for c in self.counts[: len(self.processes)]):
            self.gap, self.store_down = RESTART_GAP, 0

    def join_all(self) -> None:
        """Wait for every worker to exit. A signal meanwhile (a second
        SIGTERM or SIGINT) is passed on to those still running, whose stop
        then waits no more for their steps (`Tether.close`); uvicorn's join
        left it unhandled, so the workers waited out their 20 s."""
        while running := [p.process for p in self.processes if p.process.exitcode is None]:
            ready = wait([self._wake_r, *(p.sentinel for p in running)])
            if self._wake_r not in ready:
                continue
            os.read(self._wake_r, 4096)
            if not self.signal_queue:
                continue
            self.signal_queue.clear()
            logger.info("Received a second signal: the workers stop, waiting no more for steps")
            for process in running:
                if process.pid is not None and process.exitcode is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(process.pid, signal.SIGTERM)

    def _replace(self, idx: int, hung: bool = False) -> bool:
        """Kill (a no-op if it exited) and replace worker `idx` (`hung`: it
        did not answer a ping); False when the supervisor must stop instead."""
        process = self.processes[idx]
        exited = process.exitcode  # before the kill: how it ended by itself
        process.kill()
        process.join()
        if process.exitcode == STARTUP_FAILURE:
            # It failed before it served (the app or the socket is broken),
            # and would fail the same way again.
            logger.error(
                f"Child process [{process.pid}] failed to start, stopping the parent process."
            )
            self.failed = True
            self.should_exit.set()
            return False
        if self.should_exit.is_set():
            return False
        if process.exitcode == STORE_DOWN_AT_START:
            # One line a try; the worker logged its traceback at the first.
            store = f" {self.store}" if self.store else ""
            logger.error(
                f"Child process [{process.pid}] could not reach the store{store} as it"
                f" started; trying again in {self.gap:g}s (the other workers serve what they"
                " can)"
            )
            self.store_down += 1
            waited, self.gap = self.gap, min(self.gap * 2, RESTART_GAP_MAX)
            if wait([self._wake_r], waited):
                return True  # a signal: handled first (the exited worker is seen again)
        else:  # why, for the operator (uvicorn's line said only "died")
            logger.warning(
                f"worker [{process.pid}]"
                f" {_ended(exited, hung, self.config.timeout_worker_healthcheck)}; starting another"
            )
        process = self._process(idx)
        process.start()
        self.processes[idx] = process
        return True

    def restart_all(self) -> None:
        for idx, old in enumerate(self.processes):
            if self.should_exit.is_set():
                return
            new = self._process(idx)
            new.start()
            if not new.wait_until_ready(self.config.timeout_worker_healthcheck, self.should_exit):
                new.kill()
                new.join()
                if not self.should_exit.is_set():
                    logger.error(
                        f"New child process [{new.pid}] was not ready in time; "
                        f"keeping worker [{old.pid}] and aborting the restart."
                    )
                return
            old.terminate()
            old.join()
            self.processes[idx] = new

    def handle_ttin(self) -> None:
        logger.info("Received SIGTTIN, increasing the number of processes.")
        self.processes_num += 1
        process = self._process(len(self.processes))
        process.start()
        self.processes.append(process)

    def handle_ttou(self) -> None:
        super().handle_ttou()
        if len(self.processes) < SLOTS:
            self.counts[len(self.processes)] = NO_WORKER  # the worker it stopped


def _ended(exitcode: int | None, hung: bool, ping_timeout: float) -> str:
    """How a worker the supervisor replaces ended: by a signal (its name),
    with a status, or killed for want of an answer to a ping."""
    if hung or exitcode is None:
        return (
            f"did not answer a ping within {ping_timeout:g} s"
            " (a blocked event loop?) and was killed"
        )
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"was ended by {name}"
    return f"exited with status {exitcode}"
