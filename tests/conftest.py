"""Shared fixtures: a real webhook receiver and a real Tether service, both
listening on 127.0.0.1.

Tests build the service with a fresh plugin manager (built-ins only, no entry
points) unless they ask for more, and with the settings they pass: the
environment of the machine never leaks in.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import uvicorn

from api.app import create_app
from api.http import SERVER_OPTIONS
from core.plugins import make_plugin_manager
from core.settings import Settings

PG_TEMPLATE_DSN = os.environ.get("TETHER_TEST_PG_DSN", "")
TEST_STORES = os.environ.get("TETHER_TEST_STORES", "sqlite")
for _name in [n for n in os.environ if n.startswith(("TETHER_", "DATABRICKS_"))]:
    del os.environ[_name]
os.environ["NO_PROXY"] = "127.0.0.1,localhost"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def eventually(check: Callable[[], Any], timeout: float = 10.0, every: float = 0.05) -> Any:
    """Await `check()` (sync or async) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last: {value!r})")
        await asyncio.sleep(every)


# ── a webhook receiver: a real HTTP server in a thread ─────────────────────────


@dataclass
class Hit:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class Receiver:
    """Records every request. `respond(hit)` decides the answer (status, body);
    with `callback` set (a body, or a function of the hit returning one or None),
    each trigger is followed by a POST of that body to the callback URL it
    carried, from another thread, as a real external system would."""

    respond: Callable[[Hit], tuple[int, Any]] = lambda hit: (202, {"accepted": True})
    callback: Any = None
    hits: list[Hit] = field(default_factory=list)
    callback_answers: list[int] = field(default_factory=list)
    port: int = 0

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def on(self, path: str) -> list[Hit]:
        return [h for h in self.hits if h.path == path]


def _serve_receiver(receiver: Receiver) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def _handle(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = raw.decode(errors="replace")
            hit = Hit(
                self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body
            )
            receiver.hits.append(hit)
            status, answer = receiver.respond(hit)
            data = json.dumps(answer).encode()
            try:
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except OSError:  # the service died mid-request (crash tests)
                return
            answer = receiver.callback(hit) if callable(receiver.callback) else receiver.callback
            if answer is not None and isinstance(body, dict) and "callback_url" in body:
                threading.Thread(
                    target=_call_back, args=(receiver, body["callback_url"], answer), daemon=True
                ).start()

        do_GET = do_POST = _handle

        def log_message(self, *args: Any) -> None:
            pass

    class Server(ThreadingHTTPServer):
        request_queue_size = 1024  # the default of 5 resets connections under load
        daemon_threads = True

    server = Server(("127.0.0.1", 0), Handler)
    receiver.port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _call_back(receiver: Receiver, url: str, answer: Any) -> None:
    for _ in range(50):  # retried as a real external system would
        try:
            status = httpx.post(url, json=answer, timeout=5, trust_env=False).status_code
            receiver.callback_answers.append(status)
            if status < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver()
    server = _serve_receiver(rec)
    yield rec
    server.shutdown()
    server.server_close()


# ── the Tether service, in this process, on a real port ───────────────────────


@dataclass
class Service:
    settings: Settings
    client: httpx.AsyncClient
    app: Any

    @property
    def tether(self) -> Any:
        return self.app.state.tether

    async def job(self, job_id: str) -> dict[str, Any]:
        response = await self.client.get(f"/jobs/{job_id}")
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    async def wait_state(self, job_id: str, *states: str, timeout: float = 10) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            job = await self.job(job_id)
            return job if job["state"] in states else None

        return await eventually(check, timeout)  # type: ignore[no-any-return]


def test_settings(**overrides: Any) -> Settings:
    port = overrides.pop("port", None) or free_port()
    values: dict[str, Any] = {
        "store": "memory://",
        "port": port,
        "public_url": f"http://127.0.0.1:{port}",
        "watchdog_interval": 0.1,
        "trigger_backoff": 0.05,
        "callback_secret": "test-secret",
    }
    values.update(overrides)
    return Settings.from_env({}, **values)


test_settings.__test__ = False  # type: ignore[attr-defined]


STORES = TEST_STORES.split(",")
"""The stores every test that starts a service runs on: the embedded store by
default; `TETHER_TEST_STORES=sqlite,memory` adds the in-memory one. Set
TETHER_TEST_PG_DSN (`postgresql://user@host:port/db`, a database with
resonate-pg's resonate.sql applied, whose user may CREATE DATABASE) to add
Postgres: each test then gets a fresh database copied from it as a template."""
if PG_TEMPLATE_DSN and "postgres" not in STORES:
    STORES.append("postgres")


def _fresh_pg_database(template_dsn: str, name: str) -> str:
    """A new database copied from the one `template_dsn` names; its URL."""
    from urllib.parse import urlsplit, urlunsplit

    import psycopg

    parts = urlsplit(template_dsn)
    template = parts.path.lstrip("/")
    with psycopg.connect(urlunsplit(parts._replace(path="/postgres")), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture
def fresh_pg_url() -> str:
    """A new database copied from TETHER_TEST_PG_DSN; skips the test without it."""
    if not PG_TEMPLATE_DSN:
        pytest.skip("set TETHER_TEST_PG_DSN to a Postgres with resonate-pg's schema to run")
    return _fresh_pg_database(PG_TEMPLATE_DSN, f"tether_test_{os.getpid()}_{free_port()}")


@pytest.fixture(params=STORES)
def store_url(request: pytest.FixtureRequest, tmp_path: Any) -> Callable[[], str]:
    """A function making a new, empty store URL of this test's store kind."""
    count = iter(range(1000))

    def make() -> str:
        n = next(count)
        if request.param == "sqlite":
            return f"sqlite:///{tmp_path}/tether-{n}.db"
        if request.param == "postgres":
            return _fresh_pg_database(PG_TEMPLATE_DSN, f"tether_test_{os.getpid()}_{n}")
        return "memory://"

    return make


@pytest.fixture
async def start_service(store_url: Callable[[], str]) -> AsyncIterator[Callable[..., Any]]:
    """`await start_service(plugins=[...], **settings)` → a running `Service`,
    on a new store of the test's kind unless `store=` is given."""
    running: list[tuple[uvicorn.Server, asyncio.Task[None], httpx.AsyncClient]] = []

    async def start(plugins: tuple[Any, ...] = (), **overrides: Any) -> Service:
        overrides.setdefault("store", store_url())
        settings = test_settings(**overrides)
        app = create_app(settings, make_plugin_manager(entry_points=False, extra=plugins))
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=settings.port,
            log_level="warning",
            lifespan="on",
            http=SERVER_OPTIONS["http"],  # the loop is the test's own
        )
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        await eventually(lambda: server.started or task.done(), timeout=10)
        if task.done():
            task.result()
        client = httpx.AsyncClient(base_url=settings.base_url, trust_env=False, timeout=10)
        running.append((server, task, client))
        return Service(settings, client, app)

    yield start
    for server, task, client in running:
        await client.aclose()
        server.should_exit = True
        await task
