"""How `tether serve` speaks HTTP: uvicorn on uvloop and httptools.

httptools parses requests at about twice h11's speed, but unlike h11 it puts no
bound on a request's head: one connection could make the server buffer a
header of any size. `HttpProtocol` adds h11's kind of bound.
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 64 * 1024
"""A request line and headers longer than this get 400 and the connection closes."""


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

    def _count(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > MAX_HEAD_BYTES:
            # Raised inside a parser callback: the parser stops, and uvicorn
            # answers 400 and closes the connection.
            raise ValueError("request head too large")


SERVER_OPTIONS: dict[str, Any] = {"loop": "uvloop", "http": HttpProtocol}
"""uvicorn options `tether serve` and the tests' in-process services share."""
