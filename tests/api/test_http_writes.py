"""`api.http`: an answer of known length goes out in one socket write, head
and body together; a stream (server-sent events) has its head written at once,
before its first event.

The write counts are read off the protocol's transport (a recording stand-in,
as uvicorn's own tests do: a real socket does not show how many writes made
its bytes); the streams are read through the real service."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any
from uuid import UUID

import httpx
from litestar import Litestar, get
from litestar.response import ServerSentEvent, ServerSentEventMessage
from uvicorn.config import Config
from uvicorn.server import ServerState

from api.errors import tether_error, too_deep
from api.http import SERVER_OPTIONS, JsonAnswer
from core.errors import StoreUnavailable

SSE = {"accept": "text/event-stream"}


class Recorder:
    """The transport uvicorn's protocol writes to: each write kept apart."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def writelines(self, parts: Any) -> None:
        self.writes.append(b"".join(parts))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8000)}.get(
            name, default
        )

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


gates: dict[str, asyncio.Event] = {}
"""The stream's first event waits for `gates["opened"]` (made by the test, on its loop)."""


@get("/small")
async def small() -> dict[str, str]:
    return {"hello": "world"}


VALUE = {"hello": "world", "at": datetime(2026, 12, 5, 2, 30, tzinfo=UTC), "id": UUID(int=7)}


@get("/litestars", status_code=201)
async def litestars() -> dict[str, Any]:
    return VALUE


@get("/ours")
async def ours() -> JsonAnswer:
    return JsonAnswer(VALUE, 201)


@get("/stream")
async def stream() -> ServerSentEvent:
    async def events() -> AsyncIterator[ServerSentEventMessage]:
        await gates["opened"].wait()  # the first event comes only when the test says so
        yield ServerSentEventMessage(data="first", event="tick")

    return ServerSentEvent(events())


def connect() -> tuple[Any, Recorder]:
    config = Config(
        Litestar([small, litestars, ours, stream]),
        http=SERVER_OPTIONS["http"],
        log_config=None,
        access_log=False,
    )
    config.load()
    protocol = config.http_protocol_class(config=config, server_state=ServerState(), app_state={})
    transport = Recorder()
    protocol.connection_made(transport)
    return protocol, transport


def request(method: str, path: str, *headers: str) -> bytes:
    return "\r\n".join([f"{method} {path} HTTP/1.1", "host: t", *headers, "", ""]).encode()


async def answered(protocol: Any, count: int = 1) -> None:
    """Until `count` answers on this connection are complete."""
    for _ in range(1000):
        if protocol.server_state.total_requests >= count:
            return
        await asyncio.sleep(0)
    raise AssertionError("no complete answer")


async def test_a_json_answer_is_one_write_of_head_and_body():
    protocol, transport = connect()
    protocol.data_received(request("GET", "/small"))
    await answered(protocol)
    assert len(transport.writes) == 1
    head, _, body = transport.writes[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"content-length: 17" in head.lower()
    assert body == b'{"hello":"world"}'


async def test_a_json_answer_made_by_its_handler_is_the_answer_litestar_makes():
    """`JsonAnswer` (the routes every job passes through) sends what
    Litestar's own answer for the same value sends: status, headers, bytes
    (a date-time and a UUID encoded as Litestar encodes them)."""
    answers = []
    for path in ("/litestars", "/ours"):
        protocol, transport = connect()
        protocol.data_received(request("GET", path))
        await answered(protocol)
        assert len(transport.writes) == 1
        lines = transport.writes[0].split(b"\r\n")
        answers.append([line for line in lines if not line.lower().startswith(b"date:")])
    assert answers[0] == answers[1]
    assert answers[1][0] == b"HTTP/1.1 201 Created"
    assert b"content-type: application/json" in answers[1]
    assert answers[1][-1] == (
        b'{"hello":"world","at":"2026-12-05T02:30:00Z","id":"00000000-0000-0000-0000-000000000007"}'
    )


async def test_pipelined_answers_are_one_write_each_in_order():
    protocol, transport = connect()
    protocol.data_received(request("GET", "/small") + request("GET", "/nothing-here"))
    await answered(protocol, 2)
    assert len(transport.writes) == 2
    assert transport.writes[0].startswith(b"HTTP/1.1 200 ")
    assert transport.writes[1].startswith(b"HTTP/1.1 404 ")
    assert all(w.count(b"HTTP/1.1") == 1 for w in transport.writes)


async def test_a_head_request_and_a_closing_answer_are_one_write_too():
    protocol, transport = connect()
    protocol.data_received(request("HEAD", "/small"))
    await answered(protocol)
    assert len(transport.writes) == 1  # (405 here: the route takes GET)
    assert b"content-length: 49" in transport.writes[0].lower()
    assert transport.writes[0].endswith(b"\r\n\r\n")  # a head, no body

    protocol, transport = connect()
    protocol.data_received(request("GET", "/small", "connection: close"))
    await answered(protocol)
    assert len(transport.writes) == 1 and transport.closed
    assert transport.writes[0].endswith(b'{"hello":"world"}')


async def test_a_stream_is_opened_before_its_first_event_and_the_event_follows_at_once():
    gates["opened"] = opened = asyncio.Event()
    protocol, transport = connect()
    protocol.data_received(request("GET", "/stream", "accept: text/event-stream"))
    for _ in range(200):  # the app runs until its generator waits
        await asyncio.sleep(0)
    assert len(transport.writes) == 1, "the head of a stream is written at once"
    head = transport.writes[0].lower()
    assert head.startswith(b"http/1.1 200 ") and b"transfer-encoding: chunked" in head
    assert b"event: tick" not in head
    opened.set()
    for _ in range(200):
        if len(transport.writes) > 1:
            break
        await asyncio.sleep(0)
    assert b"event: tick" in transport.writes[1]
    assert b"data: first" in transport.writes[1]


async def test_streams_of_the_real_service_open_at_once(start_service):
    """The job list's changes stream on an empty store sends nothing for 15 s
    (a keep-alive): its head must arrive anyway. A job's history stream sends
    the events recorded so far at once."""
    svc = await start_service()
    async with httpx.AsyncClient(base_url=svc.settings.base_url, trust_env=False) as client:
        started = time.monotonic()
        async with client.stream("GET", "/jobs", headers=SSE, timeout=5) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
        assert time.monotonic() - started < 2
        created = await client.post(
            "/jobs",
            json={"id": "w1", "backend": "http_webhook", "params": {"url": "http://127.0.0.1:9/"}},
        )
        assert created.status_code == 201
        started = time.monotonic()
        async with client.stream("GET", "/jobs/w1/events", headers=SSE, timeout=5) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("event:"):
                    assert line == "event: accepted"
                    break
        assert time.monotonic() - started < 2


def test_a_503_to_a_post_the_store_may_apply_late_says_so_and_asks_for_a_wait():
    late = StoreUnavailable("the store did not answer: TimeoutError")
    late.unknown_effect = True
    refused = StoreUnavailable("the index refused the write")
    post, get = SimpleNamespace(method="POST"), SimpleNamespace(method="GET")
    for request, exc, says in ((post, late, True), (get, late, False), (post, refused, False)):
        answer = tether_error(request, exc)  # type: ignore[arg-type]
        assert answer.status_code == 503 and answer.headers["Retry-After"] == "1"
        message = answer.content.error.message
        assert ("may have taken effect all the same" in message) is says, (request, message)


def test_only_a_body_too_deep_for_the_decoder_is_the_clients_400(caplog):
    """msgspec's RecursionError decoding a body is the client's: 400. Any
    other is the service's own fault, never blamed on the request: 500, logged."""
    request = SimpleNamespace(method="POST", url=SimpleNamespace(path="/jobs"))
    decoder = RecursionError("maximum recursion depth exceeded while deserializing an object")
    answer = too_deep(request, decoder)  # type: ignore[arg-type]
    assert answer.status_code == 400 and answer.content.error.details["field"] == "body"
    assert caplog.records == []
    ours = RecursionError("maximum recursion depth exceeded")
    answer = too_deep(request, ours)  # type: ignore[arg-type]
    assert answer.status_code == 500 and answer.content.error.code == "internal"
    assert "unhandled RecursionError on POST /jobs" in caplog.text
