"""Shared fixtures: a real webhook receiver and a real Tether service, both
listening on 127.0.0.1.

Tests build the service with a fresh plugin manager (built-ins only, no entry
points) unless they ask for more, and with the settings they pass: the
environment of the machine never leaks in.

A test named for a hook or a backend method (`test_hook_<name>…`, or
`test_hook_…_and_<name>…`) fails unless that hook or method actually ran during
it: see `contract_calls`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import re
import socket
import ssl
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import CodeType
from typing import Any

import httpx
import pytest
import uvicorn
from aiohttp import web

from api.app import create_app
from api.http import SERVER_OPTIONS, proxy_options
from core.hookspecs import Backend, TetherHookSpecs, hookimpl
from core.plugins import make_plugin_manager
from core.settings import Settings

PG_TEMPLATE_DSN = os.environ.get("TETHER_TEST_PG_DSN", "")
TEST_STORES = os.environ.get("TETHER_TEST_STORES", "sqlite")
# Settings from the machine never reach a test's service; the suite's own
# (TETHER_TEST_*) stay for the worker processes pytest-xdist starts.
for _name in [
    n
    for n in os.environ
    if n.startswith(("TETHER_", "DATABRICKS_")) and not n.startswith("TETHER_TEST_")
]:
    del os.environ[_name]
os.environ["NO_PROXY"] = "127.0.0.1,localhost"


@contextlib.asynccontextmanager
async def aiohttp_serving(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[int]:
    """`handler` answering every method and path on 127.0.0.1 (aiohttp's
    server, in this loop), on a free port it yields; stopped on the way out."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def refused_url() -> Iterator[str]:
    """`http://127.0.0.1:PORT` where nothing listens, and nothing can while
    the test runs: the port is held by a bound socket that does not listen
    (a connection is refused). A port only picked (`free_port`) can be taken
    meanwhile by another test's server (pytest-xdist), which then answers."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{held.getsockname()[1]}"


def listening_socket(port: int = 0) -> socket.socket:
    """A socket listening on 127.0.0.1:`port` (0: a free one), for a server in
    this process to serve on. Bound here rather than by the server: a port
    picked first (`free_port`) may be taken before the server binds it, by
    another test's server while pytest-xdist runs two tests at once. With
    SO_REUSEADDR, as uvicorn binds: a port given again (a restart) binds
    though the connections its last server closed still linger (TIME_WAIT)."""
    sock = socket.socket()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()
    except OSError:
        sock.close()
        raise
    return sock


HOLD = 0.5
"""Seconds a condition must go on holding before "exactly once" is believed."""


def _judge(timeout: float, holds: float) -> Generator[None, Any, Any]:
    """What `eventually` and `wait_until` share: sent each value of the check,
    it stops (returning the first truthy value) once a truthy value has held
    for `holds` seconds, and raises when none came within `timeout` or a later
    one was falsy."""
    deadline = time.monotonic() + timeout
    value = yield
    while not value:
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last: {value!r})")
        value = yield
    first, until = value, time.monotonic() + holds
    while time.monotonic() < until:
        value = yield
        if not value:
            raise AssertionError(f"condition met ({first!r}), then broken within {holds}s")
    return first


def threads_of(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[str]:
    """The name of the thread each call of `module.<name>` runs on, from now
    on (`core.aside`'s work: its thread or the event loop's)."""
    ran_on: list[str] = []
    work = getattr(module, name)

    def watched(*args: Any) -> Any:
        ran_on.append(threading.current_thread().name)
        return work(*args)

    monkeypatch.setattr(module, name, watched)
    return ran_on


async def eventually(
    check: Callable[[], Any], timeout: float = 10.0, every: float = 0.05, holds: float = 0.0
) -> Any:
    """Await `check()` (sync or async) until it returns something truthy, and
    with `holds` until that has lasted `holds` seconds; the first truthy value."""
    judge = _judge(timeout, holds)
    next(judge)
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        try:
            judge.send(value)
        except StopIteration as done:
            return done.value
        await asyncio.sleep(every)


def wait_until(
    check: Callable[[], Any], timeout: float = 10.0, every: float = 0.05, holds: float = 0.0
) -> Any:
    """`eventually` for code with no event loop (tests of a `tether serve` process)."""
    judge = _judge(timeout, holds)
    next(judge)
    while True:
        try:
            judge.send(check())
        except StopIteration as done:
            return done.value
        time.sleep(every)


class Finished:
    """A plugin that records every `tether_job_finished`: (job id, state)."""

    def __init__(self) -> None:
        self.jobs: list[tuple[str, str]] = []

    @hookimpl
    def tether_job_finished(self, job: Any) -> None:
        self.jobs.append((job.id, job.state))


# ── a webhook receiver: a real HTTP server in a thread ─────────────────────────


@dataclass
class Hit:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    at: float = field(default_factory=time.monotonic)
    """When it arrived (`time.monotonic()`)."""


@dataclass
class Receiver:
    """Records every request. `respond(hit)` decides the answer: (status, body)
    or (status, body, headers); a body of bytes is sent as it is, anything else
    as JSON (`content-type` is JSON's unless the headers name another). With
    `callback` set (a body, or a function of the hit returning one or None),
    each trigger is followed by a POST of that body to the callback URL it
    carried, from another thread, as a real external system would."""

    respond: Callable[[Hit], tuple[Any, ...]] = lambda hit: (202, {"accepted": True})
    callback: Any = None
    hits: list[Hit] = field(default_factory=list)
    callback_answers: list[int] = field(default_factory=list)
    port: int = 0

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def on(self, path: str) -> list[Hit]:
        return [h for h in self.hits if h.path == path]


POLL = 0.02
"""The `poll_interval` of the suite's `serve_forever` threads: it looks for
shutdown() that often (every 0.5 s by default, up to half a second of each
teardown that stops a server)."""


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
            status, answer, *more = receiver.respond(hit)
            data = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
            headers = {"content-type": "application/json", **(more[0] if more else {})}
            try:
                self.send_response(status)
                self.send_header("content-length", str(len(data)))
                for name, value in headers.items():
                    self.send_header(name, value)
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
    threading.Thread(target=server.serve_forever, args=(POLL,), daemon=True).start()
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
        """The running `Tether`: what the API's handlers are given as `tether`."""
        return self.app.dependencies["tether"].dependency()

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
WITH_RESONATE = [*STORES, *(["resonate"] if "resonate" not in STORES else [])]
"""The stores of tests marked `resonate_server`: `STORES` and a Resonate server
(`tests/resonate_server/stand_in.py`, the job index in SQLite beside it).
`TETHER_TEST_STORES=resonate` runs the in-process service tests on it: all
pass but one, which expects a store that keeps its own notification secret."""


def _fresh_pg_database(template_dsn: str, name: str) -> str:
    """A new database copied from the one `template_dsn` names; its URL."""
    from tests.pg import fresh_pg_database

    return fresh_pg_database(template_dsn, name)


def _drop_pg_databases(names: list[str]) -> None:
    """Drop the databases a test made (each a copy of the template: a full
    run left a gigabyte of them behind); a server a test stopped keeps them."""
    from tests.pg import drop_pg_database

    for name in names:
        with contextlib.suppress(Exception):
            drop_pg_database(PG_TEMPLATE_DSN, name)


@pytest.fixture
def fresh_pg_url() -> Iterator[str]:
    """A new database copied from TETHER_TEST_PG_DSN, dropped after the test;
    skips the test without it."""
    if not PG_TEMPLATE_DSN:
        pytest.skip("set TETHER_TEST_PG_DSN to a Postgres with resonate-pg's schema to run")
    name = f"tether_test_{os.getpid()}_{free_port()}"
    yield _fresh_pg_database(PG_TEMPLATE_DSN, name)
    _drop_pg_databases([name])


@pytest.fixture(params=STORES)
def store_url(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Callable[[], str]]:
    """A function making a new, empty store URL of this test's store kind
    (Postgres databases dropped after the test)."""
    count = iter(range(1000))
    made: list[str] = []
    stand_ins = None
    if request.param == "resonate":
        stand_ins = request.getfixturevalue("resonate_stand_ins")

    def make() -> str:
        n = next(count)
        if request.param == "sqlite":
            return f"sqlite:///{tmp_path}/tether-{n}.db"
        if stand_ins is not None:
            return stand_ins(tmp_path / f"resonate-{n}.db").url
        if request.param == "postgres":
            made.append(f"tether_test_{os.getpid()}_{n}")
            return _fresh_pg_database(PG_TEMPLATE_DSN, made[-1])
        return "memory://"

    yield make
    _drop_pg_databases(made)


@pytest.fixture
def resonate_stand_ins() -> Iterator[Callable[..., Any]]:
    """`start(db, **options)` → a stand-in Resonate server (`StandIn`) serving
    from a thread on 127.0.0.1, its promises in the file `db`; stopped when
    the test ends, after the services of `start_service`."""
    from tests.resonate_server.stand_in import StandIn

    running: list[StandIn] = []

    def start(db: Any, **options: Any) -> StandIn:
        running.append(StandIn(db, **options).start())
        return running[-1]

    yield start
    for server in running:
        server.stop()


@pytest.hookimpl(tryfirst=True)  # before the parametrize marks are applied
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked `resonate_server` run on `WITH_RESONATE`; a test of a
    marked module marked `resonate_server(False)` does not."""
    test, mark = metafunc.definition, metafunc.definition.get_closest_marker("resonate_server")
    if "store_url" in metafunc.fixturenames and mark and (not mark.args or mark.args[0]):
        test.add_marker(pytest.mark.parametrize("store_url", WITH_RESONATE, indirect=True))


class QuickServer(uvicorn.Server):
    """uvicorn's server less its fixed waits at the end of each test: its main
    loop looks for `should_exit` every 0.1 s (`stop()` wakes it instead), and
    its shutdown waits 0.1 s for open connections to finish even when there
    are none (with connections or requests still there after a moment given to
    those clients closed, the shutdown is uvicorn's own). The app's own
    shutdown (the lifespan: `Tether.close`) always runs."""

    _stopping: asyncio.Event | None = None

    async def main_loop(self) -> None:  # uvicorn's, waiting on `_stopping`
        self._stopping = asyncio.Event()
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            counter = (counter + 1) % 864000
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), 0.1)
            should_exit = await self.on_tick(counter)

    def stop(self) -> None:
        self.should_exit = True
        if self._stopping is not None:
            self._stopping.set()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's, but an app whose own start-up failed (a store that will
        not open) raises `ServiceDidNotStart` with the app's error, not
        uvicorn's `SystemExit`, which would end the test's event loop."""
        failed: list[str] = []
        send = self.lifespan.send

        async def kept(message: Any) -> None:
            if message["type"] == "lifespan.startup.failed":
                failed.append(message.get("message") or "")
            await send(message)

        self.lifespan.send = kept  # type: ignore[method-assign]
        try:
            await super().startup(sockets)
        except SystemExit:
            said = [line for line in map(_traceback_text, "".join(failed).splitlines()) if line]
            raise ServiceDidNotStart(said[-1] if said else "see uvicorn's log") from None

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        state = self.server_state
        for _ in range(20):  # the connections of clients just closed go first
            if not state.connections:
                break
            await asyncio.sleep(0.005)
        if state.connections or state.tasks:
            await super().shutdown(sockets)
            return
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        if not self.force_exit:
            await self.lifespan.shutdown()


def _traceback_text(line: str) -> str:
    """A line of a formatted traceback (of an exception group too, whose lines
    start with `|`) without its frame: empty for a frame, a marker or a rule."""
    text = line.strip().lstrip("|").strip()
    if not text[:1].isalpha() or text.startswith(("File ", "Traceback ", "During ", "The ")):
        return ""
    return text


class ServiceDidNotStart(Exception):
    """The app's start-up failed: the message is its error's last line."""


TLS = ssl.create_default_context()
"""One TLS context for the tests' HTTP clients, which speak plain HTTP: httpx
made one for each client, loading the system's certificates (17 ms, at each
service a test starts)."""


@pytest.fixture
async def start_service(store_url: Callable[[], str]) -> AsyncIterator[Callable[..., Any]]:
    """`await start_service(plugins=[...], **settings)` → a running `Service`,
    on a new store of the test's kind unless `store=` is given, and on a port
    of its own (`listening_socket`) unless `port=` is given (a restart's)."""
    running: list[tuple[uvicorn.Server, asyncio.Task[None], httpx.AsyncClient]] = []
    sockets: list[socket.socket] = []

    async def start(plugins: tuple[Any, ...] = (), **overrides: Any) -> Service:
        if "store" not in overrides:  # a new database only when none is given
            overrides["store"] = store_url()
        if overrides["store"].startswith("http:"):
            from tests.resonate_server.stand_in import index_beside

            overrides.setdefault("index", index_beside(overrides["store"]))
        sock = listening_socket(overrides.pop("port", None) or 0)
        sockets.append(sock)
        settings = test_settings(port=sock.getsockname()[1], **overrides)
        app = create_app(settings, make_plugin_manager(entry_points=False, extra=plugins))
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=settings.port,
            log_level="warning",
            lifespan="on",
            http=SERVER_OPTIONS["http"],  # the loop is the test's own
            **proxy_options(settings.trusted_proxies),
        )
        server = QuickServer(config)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        await eventually(lambda: server.started or task.done(), timeout=10, every=0.01)
        if task.done():
            task.result()
        client = httpx.AsyncClient(
            base_url=settings.base_url, trust_env=False, timeout=10, verify=TLS
        )
        running.append((server, task, client))
        return Service(settings, client, app)

    yield start
    try:
        for server, task, client in running:
            await client.aclose()
            server.stop()
            await task
    finally:  # a server that stopped closed its socket; one that never started did not
        for sock in sockets:
            sock.close()


# ── a test named for a hook must run it ───────────────────────────────────────


def contract_names() -> list[str]:
    """Every hook and every public method of `Backend`: the plugin contract."""
    hooks = [n for n, _ in inspect.getmembers(TetherHookSpecs, inspect.isfunction)]
    methods = [
        n for n, _ in inspect.getmembers(Backend, inspect.isfunction) if not n.startswith("_")
    ]
    return hooks + methods


def claimed_by(test_name: str) -> set[str]:
    """The hooks and backend methods a test's name says it tests:
    `test_hook_<name>…` and `test_hook_…_and_<name>…`."""
    return {
        name
        for name in contract_names()
        if test_name.startswith(f"test_hook_{name}")
        or re.match(rf"test_hook_.*_and_{name}", test_name)
    }


MONITORING_TOOL = 4
"""A `sys.monitoring` tool id of our own (0, 1, 2 and 5 are the debugger's, coverage's,
the profiler's and the optimizer's)."""


def _contract_function(code: CodeType) -> bool:
    """Whether `code` is a hook implementation or a method of a `Backend` (the
    base class's own included: a default that ran was still called)."""
    if code.co_name in TetherHookSpecs.__dict__:
        return True
    classes: list[type] = [Backend]
    while classes:
        cls = classes.pop()
        if getattr(cls.__dict__.get(code.co_name), "__code__", None) is code:
            return True
        classes += cls.__subclasses__()
    return False


@contextlib.contextmanager
def contract_calls() -> Iterator[set[str]]:
    """The set of hooks and backend methods that ran, in any thread, while the
    block ran. Through `sys.monitoring`, so it sees calls the way they happen in
    the service, whatever calls them."""
    mon = sys.monitoring
    names = set(contract_names())
    called: set[str] = set()

    def started(code: CodeType, offset: int) -> Any:
        if code.co_name in names and _contract_function(code):
            called.add(code.co_name)
        return mon.DISABLE  # once per function and block is enough

    mon.use_tool_id(MONITORING_TOOL, "tether-contract-calls")
    try:
        mon.register_callback(MONITORING_TOOL, mon.events.PY_START, started)
        mon.restart_events()  # what an earlier block disabled counts again
        mon.set_events(MONITORING_TOOL, mon.events.PY_START)
        yield called
    finally:
        mon.set_events(MONITORING_TOOL, 0)
        mon.register_callback(MONITORING_TOOL, mon.events.PY_START, None)
        mon.free_tool_id(MONITORING_TOOL)


FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.stash[FAILED] = report.failed
    return report


@pytest.fixture(autouse=True)
def _tests_named_for_a_hook_run_it(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test named for a hook or backend method fails if it never ran it."""
    claims = claimed_by(request.node.originalname)
    if not claims:
        yield
        return
    with contract_calls() as called:
        yield
    if request.node.stash.get(FAILED, False):
        return  # its own failure says more
    missing = sorted(claims - called)
    assert not missing, f"{request.node.name} is named for {missing} but never called it"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--all",
        action="store_true",
        help="also run the tests marked heavy (the 10,000-job load test): `./dev test --all`",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "heavy: minutes long; only `./dev test --all` runs it")
    config.addinivalue_line(
        "markers",
        "postgres: needs TETHER_TEST_PG_DSN (given to every test that takes `fresh_pg_url`),"
        " so that `-k postgres` selects it",
    )
    config.addinivalue_line(
        "markers",
        "resonate_server: also run on a Resonate server store (the stand-in);"
        " resonate_server(False) opts a test of a marked module out",
    )


def starts_processes(item: pytest.Item) -> bool:
    """Whether the test's module starts processes (`tether serve`, the `tether`
    command, a subprocess, a browser): the tests that take seconds each."""
    import subprocess

    from tests.process import TetherProcess, tether

    if "browser" in getattr(item, "fixturenames", ()):
        return True
    module = getattr(item, "module", None)
    helpers = (TetherProcess, tether, subprocess)
    return module is not None and any(
        any(value is helper for helper in helpers) for value in vars(module).values()
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Heavy tests are deselected (not skipped) unless `--all` is given. The
    tests of modules that start processes (5-30 s each, some of them) run
    first, so that the last ones left, which keep one worker busy while the
    other has none, are short: `./dev test` has pytest-xdist's workers steal
    from each other's queues (--dist worksteal), the ends of the queues first.
    A test that takes `fresh_pg_url` is marked `postgres`, which `-k postgres`
    matches whatever the test is called."""
    for item in items:
        if "fresh_pg_url" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.postgres)
    if not config.getoption("--all"):
        heavy = [item for item in items if item.get_closest_marker("heavy")]
        if heavy:
            config.hook.pytest_deselected(items=heavy)
            items[:] = [item for item in items if not item.get_closest_marker("heavy")]
    items.sort(key=lambda item: not starts_processes(item))  # stable: modules stay in order
