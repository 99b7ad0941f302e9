"""`http(s)://HOST:PORT`: the workflow on a Resonate server, jobs in `TETHER_INDEX`.

Promises and tasks live on the Resonate server, reached the way resonate-sdk's
remote mode (`Resonate(url=...)`) reaches it: its `HttpConnection` sends each
request as a JSON envelope in a `POST /`, its `SSEConnection` receives the
server's messages (`execute`, `unblock`) on the Server-Sent Events stream
`GET /poll/{group}/{pid}`. `RemoteConnection` joins the two into the one
object (`Network` and `Source`) Tether's worker is built on, as the embedded
store's connection is.

A Resonate server keeps no table for Tether, so the job index lives where
`TETHER_INDEX` says: `sqlite:///PATH` (one host: every process of it shares
the file) or `postgresql://...` (several hosts; no resonate-pg schema needed).

Decisions (docs/operations.md, "Running on a Resonate server"):

- The server keeps none of Tether's secrets: `TETHER_CALLBACK_SECRET` is
  required (as on Postgres), and completion notifications need
  `TETHER_NOTIFY_SECRET` (rotated with `TETHER_NOTIFY_SECRET_PREVIOUS`). One
  rule whichever index, and hosts that share the server can never disagree on
  a secret kept in one host's file.
- Authentication is what resonate-sdk 0.8 offers: a bearer token
  (`TETHER_STORE_TOKEN`, sent as `Authorization: Bearer` on every request and
  on the message stream). `user:password@` in `TETHER_STORE` is refused: the
  SDK has no basic authentication, and it logs the stream's URL.
- Retention is refused: the Resonate protocol has no request that deletes a
  promise, and a job row must not go while its workflow's promises remain.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp
import msgspec
from resonate.connections import HttpConnection, SSEConnection
from resonate.retry import ExponentialBackoff
from resonate_base import PROTOCOL_VERSION

from core.errors import InvalidRequest, StoreConfigError, StoreUnavailable
from core.settings import Settings, describe, listed
from core.store.base import (
    STOP_GRACE,
    STORE_WAIT,
    Store,
    WorkflowIds,
    scheme_of,
    signing_secrets,
)
from core.store.embedded import SqliteDriver, SqliteIndex, private_database
from core.store.migrations import migrate
from core.store.sql import SqlJobIndex

if TYPE_CHECKING:
    from core.store.postgres import PostgresDriver  # psycopg is slow to import

log = logging.getLogger("tether")

SCHEMES = ("http", "https")

RECONNECT = ExponentialBackoff(initial=0.25, factor=2.0, max_delay=5.0)
"""How the SDK's connections wait between tries while the server does not
answer (a resend, a new message stream): from 0.25 s, doubling, at most 5 s,
so work resumes within seconds of the server's return (the SDK's own ladder
goes up to 60 s)."""

STREAM_SILENCE = 300.0
"""Seconds the message stream may bring nothing, not even a keep-alive
comment, before it is opened again. A connection the server no longer writes
to, or one a middlebox dropped without a word, looks open for good from this
side: the process would take no work ever again (a message for it is retried
by the server, but to the stream it believes is ours), while `/health`
stayed 200. A server that sends no keep-alives has its quiet stream reopened
this often, which costs one `GET`."""

STREAM_KEEPALIVE = (60, 10, 3)
"""TCP keep-alive on the message stream's socket: the first probe after
this many seconds without traffic, then one every so many, and the
connection given up after so many unanswered (about 90 s for a server host
that vanished). The probes also keep a NAT or firewall from forgetting a
quiet stream."""


def stream_timeout() -> aiohttp.ClientTimeout:
    """The message stream's timeouts: none on the whole response, which stays
    open for as long as the server keeps it (aiohttp's default, 300 s in all,
    ended it five minutes after each connect with a `TimeoutError`, which the
    SDK's listener does not retry: the process then took no work ever again),
    10 s to connect, and `STREAM_SILENCE` between two reads."""
    return aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=STREAM_SILENCE)


def keepalive_socket(addr_info: tuple[Any, ...]) -> socket.socket:
    """A socket for the message stream, with `STREAM_KEEPALIVE` (aiohttp's
    `socket_factory`; options a platform lacks are left at its defaults)."""
    family, kind, proto, _, _ = addr_info
    sock = socket.socket(family=family, type=kind, proto=proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    names = ("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT")
    for name, value in zip(names, STREAM_KEEPALIVE, strict=True):
        option = getattr(socket, name, None)
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
    return sock


LISTENER_RESTART = 1.0
"""Seconds before the message stream's listener starts again after it failed."""

STREAM_DOWN_GRACE = 15.0
"""Seconds the message stream may be down (reconnecting: at most 5 s between
tries) before the health check says so: the process takes no work meanwhile."""

PAIRING = "tether:index"
"""The server's pairing with one job index: its promises `tether:index.N` and
their tag (`RemoteConnection.pairing`). Every host on one server must use the
index it names: a host with another would take workflows whose jobs it
cannot see."""

SERVER_ID = "tether:server"
"""A Resonate server's id for Tether: a random one, the tag of the same name
on its promise `tether:server` (`RemoteConnection.identity`), kept in the
job index it is paired with (the fact `server_id`): an index serves one
server, as a server one index (found by an exploratory QA pass: a host with
the right TETHER_INDEX and another TETHER_STORE paired a second server with
the index, and ended its jobs there while their workflows waited on the
first)."""

PAIRING_UNTIL = 253_402_300_799_000
"""The pairing promises' deadline: the last millisecond of the year 9999."""

MAX_PAIRINGS = 1000

PROBE_ID = "tether-probe"
"""The promise `promise.get` asks for when the store opens: any answer in the
protocol (404, normally) shows the server is there and takes the token."""


class MessageStream(SSEConnection):
    """resonate-sdk's SSE message source (`GET /poll/{group}/{pid}`), with a
    stream that may stay open for good (`stream_timeout`) but is opened again
    when it falls silent, TCP keep-alive on its socket, and a listener that
    starts again, logged, if it ever fails: the SDK's reconnects only after
    an `aiohttp.ClientError`, and its task ends silently on anything else.
    Written against the SDK 0.8 listener's own parts (`_ensure_session`,
    `_sse_loop`), which the version pin in pyproject.toml holds still."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.down_since: float | None = time.monotonic()
        """`time.monotonic()` since when the stream has not been open (made,
        or last closed), or None while it is open."""

    async def _read_stream(self, resp: aiohttp.ClientResponse) -> None:
        self.down_since = None
        try:
            await super()._read_stream(resp)
        except aiohttp.ServerTimeoutError:
            # Nothing for `STREAM_SILENCE`: returning closes this response and
            # the SDK's loop connects again (after its first backoff step).
            log.info(
                "the Resonate server's message stream brought nothing for %g s: opening it again",
                STREAM_SILENCE,
            )
        finally:
            self.down_since = time.monotonic()

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None and not self._stopped:
            self._session = aiohttp.ClientSession(
                timeout=stream_timeout(),
                connector=aiohttp.TCPConnector(socket_factory=keepalive_socket),
            )
        return super()._ensure_session()

    async def _sse_loop(self) -> None:
        while self._running:
            try:
                # It returns only once stopped, or cancelled (it swallows the
                # cancellation): going round again would outlive the cancel.
                await super()._sse_loop()
                return
            except Exception as exc:
                log.error(
                    "the Resonate server's message stream failed (%s): listening again in %g s",
                    type(exc).__name__,
                    LISTENER_RESTART,
                )
                await asyncio.sleep(LISTENER_RESTART)


class RemoteConnection:
    """resonate-sdk's HTTP network and SSE message source to one Resonate
    server, as one object: a `Network` that is also the process's `Source`.

    After `stop()` (the SDK stops its connections before it waits for its
    in-flight work) the message stream is closed and requests still go for
    `STOP_GRACE` seconds, as long as the service waits for the steps under
    way, so they can fulfil or suspend their tasks (after `STORE_WAIT`, a
    trigger answering later failed its task's suspend with a traceback, and
    one answering past the service's wait was sent again by another host:
    found by an exploratory QA pass); then, or at `close()`, the HTTP half
    stops and a request still waiting for the server fails (`ConnectorError`)
    instead of retrying."""

    def __init__(self, url: str, *, group: str, pid: str, token: str | None = None) -> None:
        self.url = url
        self.group = group
        self.pid = pid
        self.http = HttpConnection(url, auth=token, backoff=RECONNECT)
        self.sse = MessageStream(url, pid=pid, group=group, auth=token, backoff=RECONNECT)
        self._token = token
        self._winding_down: asyncio.Task[None] | None = None
        self._probes: aiohttp.ClientSession | None = None
        self._unpaired = ""
        """Why this host stopped taking work (`still_paired`), or ''."""

    def __repr__(self) -> str:
        return f"RemoteConnection(url={self.url!r}, group={self.group!r}, pid={self.pid!r})"

    async def start(self) -> None:
        await self.http.start()
        await self.sse.start()

    async def stop(self) -> None:
        """Stop receiving work; requests still go for `STOP_GRACE` seconds."""
        await self.sse.stop()
        if self._winding_down is None:
            self._winding_down = asyncio.create_task(self._stop_http(after=STOP_GRACE))

    async def _stop_http(self, after: float) -> None:
        await asyncio.sleep(after)
        await self.http.stop()

    async def close(self) -> None:
        if self._winding_down is not None:
            self._winding_down.cancel()
        if self._probes is not None:
            await self._probes.close()
        await self.sse.stop()
        await self.http.stop()

    async def send(self, req: str, headers: dict[str, str] | None = None) -> str:
        return await self.http.send(req, headers)

    def unicast(self) -> str:
        return self.sse.unicast()

    def resolve_target(self, target: str) -> str:
        return self.sse.resolve_target(target)

    def recv(self, callback: Callable[[str], None]) -> None:
        self.sse.recv(callback)

    async def check(self) -> None:
        """One request (`promise.get`) to show the server is there, speaks the
        protocol and takes the token; `StoreConfigError` saying which is not
        so, never showing the token, or `StoreUnavailable` when it did not
        answer at all (down for now: a worker starting then is tried again,
        `api.server.STORE_DOWN_AT_START`). Bounded by `STORE_WAIT`."""
        problem = await self._probe()
        if problem.startswith(self._silent):
            raise StoreUnavailable(problem)
        if problem:
            raise StoreConfigError(problem)

    async def ping(self) -> None:
        """The health check's question to the server (as `check`);
        `StoreUnavailable` saying what is wrong. Bounded by `STORE_WAIT`."""
        problem = await self._probe()
        if problem:
            raise StoreUnavailable(problem)
        down = self.sse.down_since
        running = self.sse._running and not self._unpaired  # unpaired: closed on purpose
        if running and down is not None and time.monotonic() - down > STREAM_DOWN_GRACE:
            raise StoreUnavailable(
                f"{self._where} answers, but its message stream (GET /poll/{self.group}/"
                f"{self.pid}) has not been open for {time.monotonic() - down:.0f} s: this"
                " process takes no work meanwhile (the service log says why)"
            )

    @property
    def unpaired(self) -> str:
        """Why this process is out of service (`still_paired`), or ''."""
        return self._unpaired

    async def still_paired(self, mine: str) -> None:
        """The health check's look at the pairing, which `open` checked once:
        `StoreUnavailable` when the server is paired with an index other than
        `mine` (re-paired by `tether pair-index --force` while this process
        ran). This process would take, and start, workflows whose jobs the
        server's other hosts cannot see or it cannot: the first time it is
        seen it is logged as an error, the process stops receiving work (the
        message stream is closed) and starts no workflow (`unpaired`, read by
        `Tether`), and it stays out until it is restarted with the server's
        `TETHER_INDEX`. A server paired with none (its pairing promises gone
        with its database) is paired with `mine` again, as a start would."""
        if not self._unpaired:
            try:
                generation, theirs = await self.pairing()
                if theirs is None:
                    theirs = await self.pair(generation, mine)
                    if theirs == mine:
                        log.warning(
                            "%s was paired with no job index (its pairing promises are gone):"
                            " it is paired with this host's TETHER_INDEX again (id %s)",
                            self._where,
                            mine,
                        )
            except StoreConfigError as exc:
                raise StoreUnavailable(str(exc)) from None
            if theirs == mine:
                return
            if not self._unpaired:  # another check may have got here first
                self._unpaired = (
                    f"{self._where} is now paired with the job index with id {theirs}, not"
                    f" with this host's TETHER_INDEX (id {mine}): this process no longer"
                    " takes or starts work; restart it with the server's TETHER_INDEX"
                    " (docs/operations.md)"
                )
                log.error("%s", self._unpaired)
                await self.sse.stop()
        raise StoreUnavailable(self._unpaired)

    async def _probe(self) -> str:
        """Ask the server for one promise; what is wrong with the answer, or ''."""
        where = self._where
        try:
            http_status, text = await self._ask("promise.get", {"id": PROBE_ID})
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return self._unanswered(exc)
        answer = _protocol_answer(text, "promise.get")
        status = None if answer is None else answer[0]
        if http_status in (401, 403) or status in (401, 403):
            given = "TETHER_STORE_TOKEN was refused" if self._token else "set TETHER_STORE_TOKEN"
            return f"{where} refused Tether ({status or http_status}, unauthorized): {given}"
        if http_status in (502, 503, 504) or (status is not None and status >= 500):
            what = f"HTTP {http_status}" if status is None else f"status {status}"
            return f"{self._silent}{what} to promise.get"  # down for now (a proxy, its database)
        if status is None:
            what = f"HTTP {http_status} to promise.get"
            return f"{where} did not answer as a Resonate server ({what})"
        return ""

    async def _ask(self, kind: str, data: dict[str, Any]) -> tuple[int, str]:
        """One protocol request outside the SDK (no resends), bounded by
        `STORE_WAIT`: the HTTP status and the body of the answer."""
        envelope = {"kind": kind, "head": {"corrId": f"tether-{kind}", "version": PROTOCOL_VERSION}}
        headers = {"Content-Type": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        if self._probes is None:
            self._probes = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=STORE_WAIT))
        body = msgspec.json.encode({**envelope, "data": data})
        async with self._probes.post(self.url + "/", data=body, headers=headers) as resp:
            return resp.status, await resp.text()

    async def pairing(self) -> tuple[int, str | None]:
        """Which job index this server is paired with: the generation a new
        pairing would take, and the paired index's id (None: none yet).

        The pairing is a chain of promises on the server, `tether:index.1`,
        `tether:index.2`, ...: each made with an index's id as its tag
        `tether:index`, the last one made is the pairing. A re-pairing makes
        the next one first and only then resolves the one before (for a
        reader; nothing depends on it), so a crash or a process starting in
        between never finds the server paired with none."""
        paired = None
        for generation in range(1, MAX_PAIRINGS + 1):
            promise = await self._pairing_call("promise.get", {"id": f"{PAIRING}.{generation}"})
            if promise is None:
                return generation, paired
            paired = self._paired_id(promise)
        raise StoreConfigError(f"{self._where} was re-paired {MAX_PAIRINGS} times: refusing more")

    async def identity(self) -> str:
        """This server's id (`SERVER_ID`): made by the first process that
        asks (`promise.create` answers the promise already there, so processes
        starting together agree on the first one made)."""
        promise = await self._pairing_call("promise.get", {"id": SERVER_ID})
        if promise is None:
            create = {
                "id": SERVER_ID,
                "timeoutAt": PAIRING_UNTIL,
                "param": {},
                "tags": {SERVER_ID: uuid.uuid4().hex},
            }
            promise = await self._pairing_call("promise.create", create)
        found = None if promise is None else (promise.get("tags") or {}).get(SERVER_ID)
        if not isinstance(found, str):
            raise StoreConfigError(
                f"{self._where} keeps a promise {SERVER_ID!r} that Tether did not make"
                f" (no {SERVER_ID!r} tag): it cannot tell which server this is"
            )
        return found

    async def pair(self, generation: int, index_id: str) -> str:
        """Pair the server with the index `index_id` as pairing `generation`;
        the id it is paired with then: another process's, if one made that
        pairing first (`promise.create` answers the promise already there, so
        processes starting together agree on the first one made)."""
        create = {
            "id": f"{PAIRING}.{generation}",
            "timeoutAt": PAIRING_UNTIL,
            "param": {},
            "tags": {PAIRING: index_id},
        }
        promise = await self._pairing_call("promise.create", create)
        if promise is None:
            raise StoreConfigError(f"{self._where} answered promise.create with 404")
        return self._paired_id(promise)

    async def supersede(self, generation: int) -> None:
        """Mark pairing `generation` superseded (resolved) after a re-pairing."""
        value = {"headers": {}, "data": ""}
        settle = {"id": f"{PAIRING}.{generation}", "state": "resolved", "value": value}
        await self._pairing_call("promise.settle", settle)

    @property
    def _where(self) -> str:
        return f"the Resonate server at {describe(self.url)}"

    @property
    def _silent(self) -> str:
        """How `_unanswered` begins."""
        return f"{self._where} did not answer: "

    def _unanswered(self, exc: BaseException) -> str:
        """What to say of a request `_ask` could not make (a timeout says only so)."""
        reason = "" if isinstance(exc, TimeoutError) else str(exc)
        said = f"{self._silent}{reason or type(exc).__name__}"
        if isinstance(exc, aiohttp.ClientConnectorCertificateError):  # (found by a QA pass)
            said += (
                " (its certificate is not trusted here: a private CA's goes in SSL_CERT_FILE,"
                " docs/operations.md)"
            )
        elif isinstance(exc, aiohttp.ClientSSLError) and self.url.lower().startswith("https:"):
            said += " (no TLS there: does it serve plain http://?)"
        return said

    def _paired_id(self, promise: dict[str, Any]) -> str:
        paired = (promise.get("tags") or {}).get(PAIRING)
        if not isinstance(paired, str):
            raise StoreConfigError(
                f"{self._where} keeps a promise {promise.get('id')!r} that Tether did not make"
                f" (no {PAIRING!r} tag): it cannot tell which job index the server's jobs are in"
            )
        return paired

    async def _pairing_call(self, kind: str, data: dict[str, Any]) -> dict[str, Any] | None:
        """A request of the pairing: the promise answered, or None (404)."""
        try:
            http_status, text = await self._ask(kind, data)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(self._unanswered(exc)) from None
        answer = _protocol_answer(text, kind)
        if answer is not None and answer[0] == 404:
            return None
        promise = None if answer is None else answer[1].get("promise")
        if answer is None or answer[0] not in (200, 201) or not isinstance(promise, dict):
            what = f"HTTP {http_status}" if answer is None else f"status {answer[0]}"
            if http_status in (502, 503, 504) or (answer is not None and answer[0] >= 500):
                raise StoreUnavailable(f"{self._silent}{what} to {kind}")  # down for now
            raise StoreConfigError(f"{self._where} did not answer {kind} as expected ({what})")
        return promise


def _protocol_answer(text: str, kind: str) -> tuple[int, dict[str, Any]] | None:
    """`head.status` and `data` of a protocol response to `kind`, or None when
    `text` is not one."""
    try:
        resp = msgspec.json.decode(text)
    except msgspec.DecodeError:
        return None
    if not isinstance(resp, dict) or resp.get("kind") != kind:
        return None
    head, data = resp.get("head"), resp.get("data")
    status = head.get("status") if isinstance(head, dict) else None
    if not isinstance(status, int):
        return None
    return status, data if isinstance(data, dict) else {}


def server_url(store: str) -> str:
    """The Resonate server's base URL from `TETHER_STORE`, without a trailing
    slash; `StoreConfigError` naming what is wrong."""
    parts = urlsplit(store)
    if parts.scheme not in SCHEMES or not parts.hostname:
        raise StoreConfigError(
            f"TETHER_STORE={describe(store)!r}: a Resonate server is http(s)://HOST:PORT"
        )
    if parts.username is not None or parts.password is not None:
        raise StoreConfigError(
            f"TETHER_STORE={describe(store)!r}: put no user:password in the URL; resonate-sdk"
            " authenticates to a Resonate server with a bearer token: set TETHER_STORE_TOKEN"
        )
    if parts.query or parts.fragment:
        raise StoreConfigError(
            f"TETHER_STORE={describe(store)!r}: a Resonate server URL has no ?query or #fragment"
        )
    try:
        parts.port  # noqa: B018  (raises on a port that is not a number)
    except ValueError:
        raise StoreConfigError(
            f"TETHER_STORE={describe(store)!r}: the port is not a number"
        ) from None
    return store.rstrip("/")


class RemoteStore(Store):
    """`http(s)://...`: the workflow on a Resonate server, the job index in
    `TETHER_INDEX`."""

    kind = "resonate"
    connection: RemoteConnection
    jobs: SqlJobIndex

    @classmethod
    async def open(cls, settings: Settings, pid: str, *, repair: bool = False) -> RemoteStore:
        """Open it: the server asked once, the index opened (and migrated),
        and the two checked to be paired (`RemoteConnection.pairing`); with
        `repair`, the server is re-paired with this index if it was paired
        with another (`tether pair-index --force`)."""
        url = server_url(settings.store)
        if not settings.callback_secret:
            raise StoreConfigError(
                "TETHER_CALLBACK_SECRET must be set when TETHER_STORE is a Resonate server:"
                " the server keeps no secret for Tether, and every process using it must"
                " sign callback URLs with the same one"
            )
        if not settings.index:
            raise StoreConfigError(
                "TETHER_INDEX must be set when TETHER_STORE is a Resonate server: the job"
                " index lives beside it, in sqlite:///PATH (one host) or postgresql://..."
                " (several hosts)"
            )
        if settings.retention:
            raise StoreConfigError(
                "TETHER_RETENTION cannot be used when TETHER_STORE is a Resonate server: the"
                " Resonate protocol has no request that deletes promises, and a finished"
                " job's row must not go while its workflow's promises remain; leave it unset"
            )
        open_index = index_opener(settings.index)
        token = settings.store_token or None
        if token and urlsplit(url).scheme == "http" and not _loopback(url):
            log.warning("TETHER_STORE_TOKEN goes to %s in clear text: use https://", describe(url))
        connection = RemoteConnection(url, group=settings.group, pid=pid, token=token)
        try:
            await connection.check()
            jobs = await _paired_index(connection, settings.index, open_index, force=repair)
        except BaseException:
            await connection.close()
            raise
        return cls(
            connection,
            jobs,
            settings.callback_secret,
            listed(settings.callback_secret_previous),
            signing_secrets(settings.notify_secret, listed(settings.notify_secret_previous)),
        )

    def out_of_service(self) -> str:
        return self.connection.unpaired

    async def delete_promises(self, older_than_ms: int, ids: WorkflowIds | None = None) -> int:
        raise InvalidRequest(
            "the Resonate server store does not support retention: the Resonate protocol"
            " has no request that deletes promises"
        )

    async def close(self) -> None:
        try:
            await self.jobs.close()
        finally:
            await self.connection.close()


async def _paired_index(
    server: RemoteConnection,
    index: str,
    open_index: Callable[[RemoteConnection], Awaitable[SqlJobIndex]],
    *,
    force: bool,
) -> SqlJobIndex:
    """Open the job index `index` once the server is shown to be paired with
    it, pairing the two when the server is paired with none (or, `force`,
    with another index); `StoreConfigError` naming both indexes' ids when it
    is paired with another. An index file that does not exist yet is refused
    before it is made."""
    generation, theirs = await server.pairing()
    if theirs is not None and not force and _new_file(index):
        raise _not_paired(server, index, theirs, "it does not exist yet (nothing was made)")
    jobs = await open_index(server)
    try:
        mine = await jobs.identity()
        server_id, kept = await server.identity(), await jobs.meta("server_id")
        if kept is not None and kept != server_id and not force:  # before any pairing
            raise _another_server(server, index, f"another Resonate server (id {kept})", server_id)
        if kept is None and theirs is None and not force and await jobs.has_jobs():
            # An index with jobs, from before the server's id was kept, and a
            # server paired with none: the first host of this release to start
            # must not be one on a wrong TETHER_STORE (found by a review).
            other = "the Resonate server its jobs' workflows are on (this one is paired with none)"
            raise _another_server(server, index, other, server_id)
        if theirs is None or (theirs != mine and force):
            before, theirs = theirs, await server.pair(generation, mine)
            if before is not None and theirs == mine:
                log.warning(
                    "the Resonate server at %s was paired with the job index %s; it is now"
                    " paired with %s (id %s)",
                    describe(server.url),
                    before,
                    describe(index),
                    mine,
                )
                await server.supersede(generation - 1)
            elif before is not None:
                raise StoreConfigError(
                    f"the Resonate server at {describe(server.url)} was paired with the job"
                    f" index with id {theirs} by another process meanwhile: nothing was changed"
                )
        if theirs != mine:
            raise _not_paired(server, index, theirs, f"its id is {mine}")
        if force and kept != server_id:  # a re-pairing: the index moves to this server
            await jobs.swap_meta("server_id", server_id)
        elif kept is None:  # the first start since it is kept: hosts starting together agree
            claimed = await jobs.claim_meta("server_id", server_id)
            if claimed != server_id:
                raise _another_server(
                    server, index, f"another Resonate server (id {claimed})", server_id
                )
    except BaseException:
        await jobs.close()
        raise
    return jobs


def _another_server(
    server: RemoteConnection, index: str, other: str, server_id: str
) -> StoreConfigError:
    return StoreConfigError(
        f"TETHER_INDEX={describe(index)!r} is the job index of {other}, not of the one"
        f" at {describe(server.url)} (id {server_id}): its jobs' workflows are on that"
        " one. Every host of one index must use the same TETHER_STORE. If that server is"
        " gone for good and this one replaces it, run `tether pair-index --force`"
        " (docs/operations.md)"
    )


def _new_file(index: str) -> bool:
    """`index` names a SQLite file that does not exist."""
    return index.startswith("sqlite:///") and not Path(index.removeprefix("sqlite:///")).exists()


def _not_paired(server: RemoteConnection, index: str, theirs: str, why: str) -> StoreConfigError:
    return StoreConfigError(
        f"TETHER_INDEX={describe(index)!r} is not the job index of the Resonate server at"
        f" {describe(server.url)}, whose jobs are in the index with id {theirs}: {why}."
        " Every host on one Resonate server must use the same TETHER_INDEX"
        " (postgresql://... for several hosts): a host with another index would take"
        " workflows whose jobs it cannot see. If the server's index is lost for good and"
        " this one replaces it, run `tether pair-index --force` (docs/operations.md)"
    )


def _loopback(url: str) -> bool:
    return (urlsplit(url).hostname or "") in ("127.0.0.1", "::1", "localhost")


def index_opener(index: str) -> Callable[[RemoteConnection], Awaitable[SqlJobIndex]]:
    """What opens the job index `TETHER_INDEX` names (its tables migrated, or
    `StoreConfigError` saying why not); `StoreConfigError` at once when it
    names no index Tether can keep."""
    scheme = scheme_of("TETHER_INDEX", index)
    if scheme == "sqlite":
        if not index.startswith("sqlite:///") or len(index) == len("sqlite:///"):
            raise StoreConfigError(
                f"TETHER_INDEX={describe(index)!r}: write sqlite:///PATH (four slashes for an"
                " absolute path)"
            )
        return functools.partial(_sqlite_index, Path(index.removeprefix("sqlite:///")))
    if scheme in ("postgresql", "postgres"):
        return functools.partial(_postgres_index, index)
    raise StoreConfigError(
        f"TETHER_INDEX={describe(index)!r} is not supported; use sqlite:///PATH (one host)"
        " or postgresql://... (several hosts)"
    )


class SqliteIndexBeside(SqliteIndex):
    """The job index on SQLite beside a Resonate server: its health check
    asks both (the service is only as healthy as the store its workflows
    run on)."""

    def __init__(self, driver: SqliteDriver, server: RemoteConnection) -> None:
        super().__init__(driver)
        self.server = server

    async def ping(self) -> None:
        await super().ping()
        await _ping_beside(self, self.server)


class PostgresIndexBeside(SqlJobIndex):
    """The job index on Postgres beside a Resonate server; its health check
    asks both."""

    def __init__(self, driver: PostgresDriver, server: RemoteConnection) -> None:
        super().__init__(driver)
        self.server = server

    async def ping(self) -> None:
        await super().ping()
        await _ping_beside(self, self.server)


async def _ping_beside(index: SqlJobIndex, server: RemoteConnection) -> None:
    """The health check of an index beside a Resonate server: the server
    answers, and is still paired with this index."""
    await server.ping()
    await server.still_paired(await index.identity())


async def _sqlite_index(path: Path, server: RemoteConnection) -> SqlJobIndex:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        private_database(path)
        _wal(path)
    except (OSError, sqlite3.Error) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise StoreConfigError(f"cannot open the job index at {path}: {reason}") from None
    driver = SqliteDriver(path)
    await _migrate(driver, f"the job index at {path}")
    return SqliteIndexBeside(driver, server)


def _wal(path: Path) -> None:
    """Put the file in WAL mode (readers never wait for the writer), as the
    embedded store does; it stays so."""
    conn = sqlite3.connect(path, timeout=STORE_WAIT)
    try:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"cannot switch to WAL (journal_mode={mode})")
    finally:
        conn.close()


async def _postgres_index(index: str, server: RemoteConnection) -> SqlJobIndex:
    from core.store.postgres import PostgresDriver

    driver = PostgresDriver(index)
    try:
        await driver.open()
    except StoreUnavailable as exc:  # down for now, not a setting's fault
        await driver.close()
        raise StoreUnavailable(
            f"cannot open the job index {describe(index)}: {exc.message}"
        ) from None
    await _migrate(driver, f"the job index {describe(index)}")
    return PostgresIndexBeside(driver, server)


async def _migrate(driver: Any, where: str) -> None:
    try:
        await migrate(driver)
    except BaseException as exc:
        await driver.close()
        if isinstance(exc, StoreUnavailable):
            raise StoreUnavailable(f"cannot open {where}: {exc.message}") from None
        if isinstance(exc, StoreConfigError):
            raise StoreConfigError(f"cannot open {where}: {exc}") from None
        raise
