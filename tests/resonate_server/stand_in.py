"""A stand-in Resonate server for tests: the Resonate HTTP protocol, as
resonate-sdk's remote mode speaks it, served from the embedded engine.

The Resonate server itself cannot be installed here. This one is written
from the protocol (resonatehq/resonate-protocol's `spec/protocol.md` for the
requests, resonate-sdk 0.8's `HttpConnection` and `SSEConnection` for how
they travel) and answers with `resonate_sqlite.engine.Engine`, which follows
resonate-pg's `resonate.sql` (resonate_sqlite/README.md):

- `POST /`: one request envelope `{kind, head: {corrId, version}, data}` in
  the body; the answer envelope `{kind, head: {corrId, status, version},
  data}` in the response (HTTP 200; the SDK reads `head.status`).
- `GET /poll/{group}/{pid}`: a Server-Sent Events stream, one `data: <message
  JSON>` event per message (`execute`, `unblock`) for the addresses
  `poll://uni@{group}/{pid}` (this process) and `poll://any@{group}` (any one
  process of the group, taken in turn); `: keep-alive` comments in between.
- With a token, both answer 401 without `Authorization: Bearer <token>`.

Delivery is at most once, as a real server's push is: a message with no
stream to take it (its process gone, no process of its group connected) is
dropped, and the engine's timers make up for it (a pending task's `execute`
is pushed again every `retry_ms`, an expired lease returns the task to
pending). Timers (promise timeouts, task retries, lease expiries) run every
`timer_interval` seconds on the server's clock.

Run it in a thread (`StandIn(db).start()`, the tests' fixture) or as a
process: `python -m tests.resonate_server.stand_in --db PATH [--port N]
[--token T]`, which prints its URL once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import itertools
import json
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from resonate_sqlite.engine import DEFAULT_RETRY_MS, Engine, StoreFailure

KEEP_ALIVE = 1.0
"""Seconds between keep-alive comments on a quiet stream; a stream whose
process is gone is noticed at the next write."""
BATCH = 100
MAX_REQUEST_BYTES = 8 * 1024 * 1024
"""The largest request body taken (aiohttp's default is 1 MiB). Tether's
settles carry results up to `TETHER_MAX_RESULT_BYTES` (1 MiB) as base64, so
about 1.4 MiB; what a real server takes is its own setting."""


@dataclass(eq=False)
class Stream:
    """One open `GET /poll/{group}/{pid}`."""

    group: str
    pid: str
    request: web.Request
    queue: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)
    silent: bool = False
    """Left open but written to no more, keep-alives included (`silence`)."""

    @property
    def alive(self) -> bool:
        transport = self.request.transport
        return transport is not None and not transport.is_closing()


RUNNING: dict[str, StandIn] = {}
"""The stand-ins listening in this process, by URL."""


def index_beside(url: str) -> str:
    """`TETHER_INDEX` for a test on the stand-in at `url`: a SQLite file next
    to the stand-in's own (the same for every service a test starts on it)."""
    db = RUNNING[url].db
    return f"sqlite:///{db.with_name(db.stem + '-index.db')}"


class StandIn:
    """The stand-in server on `host:port` (0: a free port), its promises and
    tasks in the SQLite file `db`. What it saw is kept for tests: `kinds`
    (requests answered, by kind), `authorizations` (each `Authorization`
    header received), `delivered` and `dropped` (messages)."""

    def __init__(
        self,
        db: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        retry_ms: int = DEFAULT_RETRY_MS,
        timer_interval: float = 0.05,
    ) -> None:
        self.db = db
        self.host = host
        self.port = port
        self.token = token
        self.retry_ms = retry_ms
        self.timer_interval = timer_interval
        self.kinds: Counter[str] = Counter()
        self.authorizations: list[str] = []
        self.delivered = 0
        self.dropped = 0
        self.streams: list[Stream] = []
        self._silenced: list[Stream] = []
        """Streams `silence` took out of `streams`: ended only at `stop()`."""
        self._engine: Engine | None = None
        self._turn = itertools.count()
        self._wake: asyncio.Event | None = None
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._listening = threading.Event()
        self._failed: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # ── in a thread ─────────────────────────────────────────────────────────

    def start(self, timeout: float = 10) -> StandIn:
        """Serve from a thread of this process; return once it listens."""
        self._thread = threading.Thread(
            target=asyncio.run, args=(self.serve(),), name="resonate-stand-in", daemon=True
        )
        self._thread.start()
        if not self._listening.wait(timeout) or self._failed is not None:
            raise RuntimeError(f"the stand-in Resonate server did not start: {self._failed!r}")
        RUNNING[self.url] = self
        return self

    def stop(self, timeout: float = 10) -> None:
        """Close the streams and the port, and end the thread."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop just ended
                loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(timeout)
        if RUNNING.get(self.url) is self:
            del RUNNING[self.url]

    def silence(self, pid: str) -> int:
        """Stop writing to the streams of process `pid`, keep-alives
        included, and route nothing to them, while leaving their connections
        open: a server that lost track of a connection, or a middlebox that
        dropped it without a word, as the process sees it. How many there
        were."""
        loop = self._loop
        assert loop is not None

        async def mute() -> int:
            muted = [s for s in self.streams if s.pid == pid]
            for stream in muted:
                stream.silent = True
                self.streams.remove(stream)
                self._silenced.append(stream)
            return len(muted)

        return asyncio.run_coroutine_threadsafe(mute(), loop).result(5)

    # ── the server ──────────────────────────────────────────────────────────

    async def serve(self) -> None:
        """Listen until `stop()`."""
        self._loop = asyncio.get_running_loop()
        self._wake, self._stop = asyncio.Event(), asyncio.Event()
        engine = self._engine = Engine(self.db, retry_ms=self.retry_ms)
        runner: web.AppRunner | None = None
        try:
            engine.open(timeout=5)
            app = web.Application(client_max_size=MAX_REQUEST_BYTES)
            app.router.add_post("/", self._request)
            app.router.add_get("/poll/{group}/{pid}", self._poll)
            runner = web.AppRunner(app, handle_signals=False, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
            self.port = runner.addresses[0][1]
        except BaseException as exc:
            self._failed = exc
            self._listening.set()
            if runner is not None:
                await runner.cleanup()
            engine.close()
            raise
        self._listening.set()
        pump = asyncio.create_task(self._pump())
        try:
            await self._stop.wait()
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
            # silenced streams too: their handlers would hold up cleanup() (and
            # stop() for its whole timeout, 10 s) waiting on a queue nothing fills
            for stream in [*self.streams, *self._silenced]:
                stream.queue.put_nowait(None)
            await runner.cleanup()
            engine.close()

    def _authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization")
        if header is not None:
            self.authorizations.append(header)
        if self.token is None:
            return True
        return hmac.compare_digest((header or "").encode(), f"Bearer {self.token}".encode())

    async def _request(self, request: web.Request) -> web.Response:
        body = await request.read()
        if not self._authorized(request):
            return web.json_response(_refusal(body, 401, "unauthorized"), status=401)
        assert self._engine is not None and self._wake is not None
        try:
            raw, _, _ = self._engine.handle(body)
        except StoreFailure as exc:
            return web.json_response(_refusal(body, 500, str(exc)), status=500)
        self.kinds[json.loads(raw).get("kind") or "?"] += 1
        self._wake.set()  # it may have left messages to deliver
        return web.Response(body=raw, content_type="application/json")

    async def _poll(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return web.Response(status=401, text="unauthorized")
        stream = Stream(request.match_info["group"], request.match_info["pid"], request)
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        # A process that connects again replaces its earlier stream.
        for old in [s for s in self.streams if (s.group, s.pid) == (stream.group, stream.pid)]:
            self.streams.remove(old)
            old.queue.put_nowait(None)
        self.streams.append(stream)
        try:
            while True:
                try:
                    async with asyncio.timeout(KEEP_ALIVE):
                        message = await stream.queue.get()
                except TimeoutError:
                    if not stream.silent:
                        await response.write(b": keep-alive\n\n")
                    continue
                if message is None:
                    break
                await response.write(b"data: " + message + b"\n\n")
        except (OSError, asyncio.CancelledError):
            pass  # the process went away
        finally:
            with contextlib.suppress(ValueError):
                self.streams.remove(stream)
        return response

    async def _pump(self) -> None:
        """Fire due timers and hand out the messages the engine left, each
        `timer_interval` and at once after a request."""
        assert self._wake is not None and self._engine is not None
        engine = self._engine
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.timer_interval):
                    await self._wake.wait()
            self._wake.clear()
            try:
                promises, tasks, schedules = engine.due(BATCH)
                if promises or tasks or schedules:
                    engine.fire(promises, tasks, schedules)
                self._deliver(engine)
            except Exception as exc:  # pragma: no cover - a locked file, a bug of its own
                # Said and gone on: a pump that ended would look like a hang of Tether's.
                print(f"stand-in Resonate server: {type(exc).__name__}: {exc}", flush=True)

    def _deliver(self, engine: Engine) -> None:
        assert engine.db is not None
        addresses = [a for (a,) in engine.db.execute("SELECT DISTINCT address FROM r_outbox")]
        for address in addresses:
            for message in engine.claim([(address, BATCH)]):
                stream = self._route(address)
                if stream is None:
                    self.dropped += 1
                else:
                    stream.queue.put_nowait(message.encode())
                    self.delivered += 1

    def _route(self, address: str) -> Stream | None:
        """The stream a message for `address` goes to: the process's own for
        `poll://uni@{group}/{pid}`, the next of its group's for
        `poll://any@{group}`, else none."""
        live = [s for s in self.streams if s.alive]
        if address.startswith("poll://uni@"):
            group, _, pid = address.removeprefix("poll://uni@").partition("/")
            return next((s for s in live if (s.group, s.pid) == (group, pid)), None)
        if address.startswith("poll://any@"):
            members = [s for s in live if s.group == address.removeprefix("poll://any@")]
            return members[next(self._turn) % len(members)] if members else None
        return None


def _refusal(body: bytes, status: int, reason: str) -> dict[str, Any]:
    """An answer envelope refusing the request `body` (its kind and corrId
    echoed when it has them)."""
    try:
        req = json.loads(body)
        kind, corr = req.get("kind"), (req.get("head") or {}).get("corrId")
    except (ValueError, AttributeError):
        kind = corr = None
    return {"kind": kind, "head": {"corrId": corr, "status": status, "version": ""}, "data": reason}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", required=True, type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--token")
    args = parser.parse_args()
    server = StandIn(args.db, host=args.host, port=args.port, token=args.token)

    async def run() -> None:
        task = asyncio.create_task(server.serve())
        await asyncio.to_thread(server._listening.wait)
        print(server.url, flush=True)
        await task

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


if __name__ == "__main__":
    main()
