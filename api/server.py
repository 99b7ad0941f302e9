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
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import os
import signal
import socket
import time
from multiprocessing.connection import wait
from types import FrameType

from uvicorn import Server
from uvicorn.config import STARTUP_FAILURE, Config
from uvicorn.supervisors.multiprocess import SIGNALS, Multiprocess, Process, logger

TICK = 1.0
"""Seconds between a worker's ticks (`date` header, request limit)."""
PING_INTERVAL = 5.0
"""Seconds between the supervisor's health pings of its workers. A dead
worker needs none (its sentinel wakes the supervisor); a hung one is killed
after this plus `timeout_worker_healthcheck` (5 s) at most, as uvicorn's was
after 0.5 s plus that."""


RESTART_GAP = 0.5
"""Seconds the supervisor waits before replacing a worker that exited."""


class TetherServer(Server):
    """uvicorn's server, waking once a second rather than ten times, and at
    once on a signal."""

    _wake: asyncio.Event | None = None
    _loop: asyncio.AbstractEventLoop | None = None

    async def main_loop(self) -> None:
        # Start-up is over (the app and the service are open): its objects
        # (~76,000) live as long as the process, so the collector stops
        # scanning them. A full collection then takes 11-45 ms instead of
        # 55-163, and one that lands inside a write transaction holds the
        # other worker's writes up that much less (bench/README.md).
        gc.collect()
        gc.freeze()
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        while not await self.on_tick(0):  # 0: refresh the date header every tick
            # On the next whole second, when the date header changes.
            now = time.time()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), math.floor(now / TICK + 1) * TICK - now)
            self._wake.clear()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        # A signal handler runs between two bytecodes, perhaps inside the
        # loop's own code: hand the wake to the loop the thread-safe way.
        if self._loop is not None and self._wake is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake.set)


class TetherProcess(Process):
    """A supervised worker that runs `TetherServer`."""

    @property
    def server(self) -> Server:
        if self._server is None:
            self._server = TetherServer(config=self.config)
        return self._server


class Supervisor(Multiprocess):
    """uvicorn's `Multiprocess` with `TetherServer` workers, woken by a
    worker's exit or a signal rather than polling every 0.5 s."""

    def __init__(self, config: Config, sockets: list[socket.socket]) -> None:
        super().__init__(config, sockets)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        for sig in SIGNALS:
            signal.signal(sig, self._signalled)

    def _signalled(self, sig: int, frame: FrameType | None) -> None:
        self.signal_queue.append(sig)
        with contextlib.suppress(OSError):  # full (a wake is pending anyway), or closed
            os.write(self._wake_w, b"\0")  # ends the wait in `run`

    def _process(self) -> Process:
        return TetherProcess(self.config, self.sockets)

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
            process = self._process()
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
            if not self._replace(idx):  # hung: killed and replaced
                return

    def _replace(self, idx: int) -> bool:
        """Kill (a no-op if it exited) and replace worker `idx`; False when
        the supervisor must stop instead."""
        process = self.processes[idx]
        process.kill()
        process.join()
        if process.exitcode == STARTUP_FAILURE:
            # It failed before it served (the app or the socket is broken),
            # and would fail the same way again.
            logger.error(
                f"Child process [{process.pid}] failed to start, stopping the parent process."
            )
            self.should_exit.set()
            return False
        if self.should_exit.is_set():
            return False
        logger.info(f"Child process [{process.pid}] died")
        process = self._process()
        process.start()
        self.processes[idx] = process
        return True

    def restart_all(self) -> None:
        for idx, old in enumerate(self.processes):
            if self.should_exit.is_set():
                return
            new = self._process()
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
        process = self._process()
        process.start()
        self.processes.append(process)
