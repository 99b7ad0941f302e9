"""How `tether serve` speaks HTTP: uvicorn on uvloop and httptools.

httptools parses requests at about twice h11's speed, but unlike h11 it puts no
bound on a request's head: one connection could make the server buffer a
header of any size. `HttpProtocol` adds h11's kind of bound, and one on time:
a request must arrive whole within `READ_TIMEOUT` (uvicorn bounds only the
idle time between requests, so a client sending a head a byte at a time, or
nothing at all, held its connection for ever). What it refuses before the
app sees the request is answered as the app's errors are, in JSON.

It also answers with one socket write where uvicorn makes two: uvicorn writes
a response's head as soon as the app starts it and the body when it comes, two
`send` calls (each a TCP segment, and on loopback the receiver's work done in
the sender's system call). An answer of known length (`content-length`: every
JSON answer) has its head held and written with its first body chunk; a stream
(chunked: server-sent events, the job-list changes) has its head written at
once, as before, so a client sees it open before the first event.
"""

from __future__ import annotations

import asyncio
import ipaddress
from typing import TYPE_CHECKING, Any

import msgspec
from litestar.serialization import encode_json
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from api.errors import ErrorBody, ErrorResponse
from core.settings import listed

if TYPE_CHECKING:
    from uvicorn._types import ASGISendEvent

MAX_HEAD_BYTES = 64 * 1024
"""A request line and headers longer than this get 400 and the connection closes."""
READ_TIMEOUT = 30.0
"""Seconds a request may take to arrive whole, head and body, from its first
byte (a new connection's from its opening): past it, a request whose head is
incomplete gets 408, one whose body is incomplete is dropped (the app sees the
client leave, 499), and the connection closes. Time the service itself holds
the body back (its reads paused) does not count."""


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a bound on each request's head.

    Two counts: the head's parsed parts (request target and headers), exact;
    and the bytes received while a head is still incomplete, which bounds what
    the parser buffers of a header that never ends. Either past the bound
    answers 400 and closes the connection."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True
        self._head_bytes = 0  # parsed parts of the current head
        self._raw_bytes = 0  # received while the current head is incomplete
        self._reading: asyncio.TimerHandle | None = None  # a request still arriving

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._read_from_now()

    def connection_lost(self, exc: Exception | None) -> None:
        self._read_done()
        super().connection_lost(exc)

    def on_message_complete(self) -> None:
        self._read_done()
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        self._refuse(400, "Bad Request", "invalid_request", msg)

    def _read_from_now(self) -> None:
        self._read_done()
        self._reading = self.loop.call_later(READ_TIMEOUT, self._read_timed_out)

    def _read_done(self) -> None:
        if self._reading is not None:
            self._reading.cancel()
            self._reading = None

    def _read_timed_out(self) -> None:
        self._reading = None
        if self.transport.is_closing():
            return
        if self._in_head:
            message = f"the request did not arrive whole within {READ_TIMEOUT:g} seconds"
            self._refuse(408, "Request Timeout", "request_timeout", message)
        elif self.flow.read_paused:  # the app holds its body back: not the client's time
            self._read_from_now()
        else:
            self.transport.close()  # the app is running: it sees the client leave

    def _refuse(self, status: int, reason: str, code: str, message: str) -> None:
        """Answer `status` with an error as the app's are, and close."""
        body = msgspec.json.encode(ErrorResponse(ErrorBody(code, message)))
        head = [f"HTTP/1.1 {status} {reason}".encode(), b"\r\n"]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join([*head, body]))
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._in_head and not self.transport.is_closing():
            # All of `data` was head (or the pipelined end of the previous
            # request: counted on the safe side).
            self._raw_bytes += len(data)
            if self._raw_bytes > MAX_HEAD_BYTES:
                self.send_400_response("Request head too large.")

    def on_message_begin(self) -> None:
        self._in_head, self._head_bytes, self._raw_bytes = True, 0, 0
        if self._reading is None:  # (a new connection's clock runs from its opening)
            self._read_from_now()
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.__class__ is RequestResponseCycle:
            # The cycle uvicorn just made for this request (its task has not
            # run yet): the same object, answering with `OneWriteCycle.send`.
            cycle.__class__ = OneWriteCycle

    def _count(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > MAX_HEAD_BYTES:
            # Raised inside a parser callback: the parser stops, and uvicorn
            # answers 400 and closes the connection.
            raise ValueError("request head too large")


class _Held:
    """Stands in for the transport while uvicorn writes a response's head."""

    __slots__ = ("parts",)

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.parts.append(data)


class _HeadFirst:
    """Stands in for the transport while uvicorn writes the first body chunk:
    the held head goes out in the same write (one `writev`, no copy)."""

    __slots__ = ("head", "transport")

    def __init__(self, transport: Any, head: bytes) -> None:
        self.transport, self.head = transport, head

    def write(self, data: bytes) -> None:
        head, self.head = self.head, b""
        if not head:
            self.transport.write(data)
        elif data:
            self.transport.writelines((head, data))
        else:
            self.transport.write(head)

    def flush(self) -> None:
        if self.head:
            self.write(b"")

    def close(self) -> None:  # a `connection: close` answer, once complete
        self.flush()
        self.transport.close()


class OneWriteCycle(RequestResponseCycle):
    """uvicorn's request/response cycle, writing a response of known length
    with one socket write (see the module's docstring). uvicorn's own `send`
    does all the checking and framing; only its writes are gathered."""

    held: bytes | None = None
    """The response's head, not yet written."""

    async def send(self, message: ASGISendEvent) -> None:
        if self.flow.write_paused and not self.disconnected:
            # uvicorn's `send` would wait here: waited first, so that the
            # transport is swapped below only while nothing can interleave.
            await self.flow.drain()
        if not self.response_started and message["type"] == "http.response.start":
            transport, held = self.transport, _Held()
            self.transport = held  # type: ignore[assignment]
            try:
                await super().send(message)
            finally:
                self.transport = transport
            written = b"".join(held.parts)
            if self.chunked_encoding is False:  # content-length: the body follows at once
                self.held = written
            elif written:  # a stream: open it now
                transport.write(written)
            return
        head = self.held
        if head is None:
            await super().send(message)
            return
        self.held = None
        transport, first = self.transport, _HeadFirst(self.transport, head)
        self.transport = first  # type: ignore[assignment]
        try:
            await super().send(message)
        finally:
            self.transport = transport
        if not transport.is_closing():
            first.flush()  # nothing written (a HEAD request, an empty body)


JSON = b"application/json"


class JsonAnswer:
    """A JSON answer encoded by its handler, returned as it is: Litestar sends
    an ASGI app a handler returns without building a `Response` around it.
    For the routes every job passes through (`POST /jobs`, `GET
    /jobs/{id}`, `POST /callbacks/{id}`): Litestar's `Response` (its
    headers, cookies, `ASGIResponse`, encoding hooks looked up per request)
    costs about 20 µs a request more than this, a fifth of a `GET
    /jobs/{id}` (bench/HISTORY.md, twenty-ninth pass). The bytes and headers
    are those Litestar sends: the body encoded by its `encode_json`,
    `content-type: application/json` and `content-length`. What the handler
    raises is still answered by the app's exception handlers; the route's
    OpenAPI answers are declared in its `responses=`."""

    __slots__ = ("body", "status")

    def __init__(self, value: Any, status: int = 200) -> None:
        self.body, self.status = encode_json(value), status

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        body = self.body
        await send(
            {
                "type": "http.response.start",
                "status": self.status,
                "headers": [(b"content-type", JSON), (b"content-length", b"%d" % len(body))],
            }
        )
        await send({"type": "http.response.body", "body": body})


SERVER_OPTIONS: dict[str, Any] = {"loop": "uvloop", "http": HttpProtocol}
"""uvicorn options `tether serve` and the tests' in-process services share."""


def proxy_options(trusted_proxies: str) -> dict[str, Any]:
    """The uvicorn options that believe `X-Forwarded-For` and `-Proto` from
    the proxies `TETHER_TRUSTED_PROXIES` lists, and from no one else:
    uvicorn's default believes them from 127.0.0.1 and ::1, so that any
    client of a proxy on the same host that passes the header on could name
    any address (and guess tokens past `TETHER_WRONG_TOKENS_PER_MINUTE`:
    found by a review)."""
    # As networks written plain (`10.1.2.3/16` is 10.1.0.0/16): uvicorn reads
    # one with host bits set as a name no client has, and believed no one
    # (found by a review). `Settings` refused what is no address or network.
    proxies = [str(ipaddress.ip_network(p, strict=False)) for p in listed(trusted_proxies)]
    if not proxies:
        return {"proxy_headers": False}
    return {"proxy_headers": True, "forwarded_allow_ips": ",".join(proxies)}
