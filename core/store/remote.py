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
import sqlite3
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
from core.store.base import STORE_WAIT, Store, signing_secrets
from core.store.embedded import SqliteDriver, SqliteIndex
from core.store.jobs import JobIndex
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

PROBE_ID = "tether-probe"
"""The promise `promise.get` asks for when the store opens: any answer in the
protocol (404, normally) shows the server is there and takes the token."""


class RemoteConnection:
    """resonate-sdk's HTTP network and SSE message source to one Resonate
    server, as one object: a `Network` that is also the process's `Source`.

    After `stop()` (the SDK stops its connections before it waits for its
    in-flight work) the message stream is closed and requests still go for
    `STORE_WAIT` seconds, so steps under way can fulfil or suspend their
    tasks; then, or at `close()`, the HTTP half stops and a request still
    waiting for the server fails (`ConnectorError`) instead of retrying."""

    def __init__(self, url: str, *, group: str, pid: str, token: str | None = None) -> None:
        self.url = url
        self.group = group
        self.pid = pid
        self.http = HttpConnection(url, auth=token, backoff=RECONNECT)
        self.sse = SSEConnection(url, pid=pid, group=group, auth=token, backoff=RECONNECT)
        self._token = token
        self._winding_down: asyncio.Task[None] | None = None
        self._probes: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"RemoteConnection(url={self.url!r}, group={self.group!r}, pid={self.pid!r})"

    async def start(self) -> None:
        await self.http.start()
        await self.sse.start()

    async def stop(self) -> None:
        """Stop receiving work; requests still go for `STORE_WAIT` seconds."""
        await self.sse.stop()
        if self._winding_down is None:
            self._winding_down = asyncio.create_task(self._stop_http(after=STORE_WAIT))

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
        so, never showing the token. Bounded by `STORE_WAIT`."""
        problem = await self._probe()
        if problem:
            raise StoreConfigError(problem)

    async def ping(self) -> None:
        """The health check's question to the server (as `check`);
        `StoreUnavailable` saying what is wrong. Bounded by `STORE_WAIT`."""
        problem = await self._probe()
        if problem:
            raise StoreUnavailable(problem)

    async def _probe(self) -> str:
        """Ask the server for one promise; what is wrong with the answer, or ''."""
        where = f"the Resonate server at {describe(self.url)}"
        envelope = {
            "kind": "promise.get",
            "head": {"corrId": "tether-probe", "version": PROTOCOL_VERSION},
            "data": {"id": PROBE_ID},
        }
        headers = {"Content-Type": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        if self._probes is None:
            self._probes = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=STORE_WAIT))
        try:
            async with self._probes.post(
                self.url + "/", data=msgspec.json.encode(envelope), headers=headers
            ) as resp:
                http_status, text = resp.status, await resp.text()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            reason = "" if isinstance(exc, TimeoutError) else str(exc)
            return f"{where} did not answer: {reason or type(exc).__name__}"
        status = _protocol_status(text)
        if http_status in (401, 403) or status in (401, 403):
            given = "TETHER_STORE_TOKEN was refused" if self._token else "set TETHER_STORE_TOKEN"
            return f"{where} refused Tether ({status or http_status}, unauthorized): {given}"
        if status is None or status >= 500:
            what = f"HTTP {http_status}" if status is None else f"status {status}"
            return f"{where} did not answer as a Resonate server ({what} to promise.get)"
        return ""


def _protocol_status(text: str) -> int | None:
    """`head.status` of a protocol response, or None when `text` is not one."""
    try:
        resp = msgspec.json.decode(text)
    except msgspec.DecodeError:
        return None
    head = resp.get("head") if isinstance(resp, dict) else None
    status = head.get("status") if isinstance(head, dict) else None
    return status if isinstance(status, int) and resp.get("kind") == "promise.get" else None


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

    @classmethod
    async def open(cls, settings: Settings, pid: str) -> RemoteStore:
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
        await connection.check()
        try:
            jobs = await open_index(connection)
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

    async def delete_promises(self, older_than_ms: int) -> int:
        raise InvalidRequest(
            "the Resonate server store does not support retention: the Resonate protocol"
            " has no request that deletes promises"
        )

    async def close(self) -> None:
        try:
            await self.jobs.close()
        finally:
            await self.connection.close()


def _loopback(url: str) -> bool:
    return (urlsplit(url).hostname or "") in ("127.0.0.1", "::1", "localhost")


def index_opener(index: str) -> Callable[[RemoteConnection], Awaitable[JobIndex]]:
    """What opens the job index `TETHER_INDEX` names (its tables migrated, or
    `StoreConfigError` saying why not); `StoreConfigError` at once when it
    names no index Tether can keep."""
    scheme = urlsplit(index).scheme
    if scheme == "sqlite":
        if not index.startswith("sqlite:///") or len(index) == len("sqlite:///"):
            raise StoreConfigError(
                f"TETHER_INDEX={index!r}: write sqlite:///PATH (four slashes for an absolute path)"
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
        await self.server.ping()


class PostgresIndexBeside(SqlJobIndex):
    """The job index on Postgres beside a Resonate server; its health check
    asks both."""

    def __init__(self, driver: PostgresDriver, server: RemoteConnection) -> None:
        super().__init__(driver)
        self.server = server

    async def ping(self) -> None:
        await super().ping()
        await self.server.ping()


async def _sqlite_index(path: Path, server: RemoteConnection) -> JobIndex:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
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


async def _postgres_index(index: str, server: RemoteConnection) -> JobIndex:
    from core.store.postgres import PostgresDriver

    driver = PostgresDriver(index)
    try:
        await driver.open()
    except StoreUnavailable as exc:
        await driver.close()
        raise StoreConfigError(
            f"cannot open the job index {describe(index)}: {exc.message}"
        ) from None
    await _migrate(driver, f"the job index {describe(index)}")
    return PostgresIndexBeside(driver, server)


async def _migrate(driver: Any, where: str) -> None:
    try:
        await migrate(driver)
    except BaseException as exc:
        await driver.close()
        if isinstance(exc, StoreUnavailable | StoreConfigError):
            reason = exc.message if isinstance(exc, StoreUnavailable) else str(exc)
            raise StoreConfigError(f"cannot open {where}: {reason}") from None
        raise
