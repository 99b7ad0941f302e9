"""The access log: one line per request on the `tether.access` logger.

`GET /jobs 200 3.1 ms from 10.0.0.7`: method, path *without* the query string
(callback tokens travel in it as `?token=`; a `?` percent-encoded into the
path cuts it too, `shown_path`), status, milliseconds, and the client's address
(without its port: one client's connections differ only there), which a JSON
line also holds as `client`. Behind a proxy that address is the proxy's,
unless `TETHER_TRUSTED_PROXIES` lists it: then it is the client its
`X-Forwarded-For` names (uvicorn's reading). A callback refused
with 401 or 404 gets a warning naming the promise id and the client's address,
so an operator can tell a misconfigured caller from a probe; the token is never
logged (neither the query string nor the `Authorization` header is read here).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, ReceiveMessage, Scope, Send

log = logging.getLogger("tether.access")

CALLBACKS = "/callbacks/"
LINE = "%s %s %d %.1f ms from %s"


type Observer = Callable[[Any, int, float], None]
"""Told of each HTTP request once its answer is sent: its scope, the status,
and the seconds it took."""


CLIENT_GONE = 499
"""The status told for a request whose client closed the connection before
its answer (nginx's "client closed request"): no answer was sent, and it is
no error of the service's (it was told as a 500: found in an audit,
2026-12-04)."""


def observed(app: ASGIApp, observers: Sequence[Observer]) -> ASGIApp:
    """`app`, telling `observers` of each HTTP request once its answer is sent.
    Around Litestar's whole handler, not a route middleware: answers of no
    route (404, 405) and errors are told too."""

    async def observing(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # if the app fails before answering, the server answers 500
        answered = gone = False

        async def receiving() -> ReceiveMessage:
            nonlocal gone
            message = await receive()
            gone = gone or message["type"] == "http.disconnect"
            return message

        async def sending(message: Message) -> None:
            nonlocal status, answered
            if message["type"] == "http.response.start" and not answered:
                # an answer made after its client left (Litestar's 500 for
                # the body it could not read) reaches no one
                status, answered = CLIENT_GONE if gone else message["status"], True
            await send(message)

        try:
            await app(scope, receiving, sending)
        finally:
            if gone and not answered:  # the client left, and no answer was begun
                status = CLIENT_GONE
            took = time.perf_counter() - started
            for observer in observers:
                observer(scope, status, took)

    return observing


def log_request(scope: Any, status: int, seconds: float) -> None:
    """The access log's line (an `Observer`)."""
    _log(scope, status, seconds * 1000)


def _log(scope: Any, status: int, ms: float) -> None:
    raw = scope["path"]
    path = shown_path(raw)
    address = _client(scope)
    # no caller lookup: api.logs.lean_records
    log.info(LINE, scope["method"], path, status, ms, address, extra={"client": address})
    if status in (401, 404) and raw.startswith(CALLBACKS):
        # read from the path as it came, not as shown: a long id's cut took
        # the route's word with it, and a heartbeat was logged as a callback
        promise_id, _, route = raw[len(CALLBACKS) :].partition("/")
        promise_id = _printable(_cut(promise_id.partition("?")[0]))
        what = "heartbeat" if route.partition("?")[0] == "heartbeat" else "callback"
        log.warning(
            "%s for promise '%s' refused (%d) from %s",  # (`_printable` escaped it: not %r)
            what,
            promise_id,
            status,
            address,
            extra={"promise_id": promise_id},
        )


CALLBACK_ROUTES = ("", "heartbeat", "notifications")
"""What may follow `/callbacks/<id>/`: the routes' own words."""


def shown_path(path: str) -> str:
    """The (decoded) path as it is logged: cut at a `?` in it (a callback URL
    whose `?token=` was percent-encoded into the path: `%3Ftoken%3D…`), shown
    as `?…`; and under `/callbacks/`, anything past the id that is not a
    route's own word shown as `/…` (a token put in the path). Past
    `PATH_SHOWN` characters it is cut, shown as `…`. Control characters,
    invisible format characters (a bidirectional override, a tag character)
    and any other character `str.isprintable` refuses are written as escapes
    (`\\x0a`, `\\u202e`, `\\U000e0041`), after the cut, so that no escape
    is cut in two: a path is anyone's to choose, and a decoded `%0A` would
    start a forged line of the log."""
    path, query, _ = path.partition("?")
    tail = "?…" if query else ""
    if path.startswith(CALLBACKS):
        head, _, rest = path[len(CALLBACKS) :].partition("/")
        if rest not in CALLBACK_ROUTES:
            path, tail = f"{CALLBACKS}{head}", "/…"
    if len(path) > PATH_SHOWN:  # a request head may be 64 KiB, twice logged
        return f"{_printable(path[:PATH_SHOWN])}…"
    return _printable(path) + tail


def _cut(text: str) -> str:
    """`text`, or its first `PATH_SHOWN` characters and `…`."""
    return f"{text[:PATH_SHOWN]}…" if len(text) > PATH_SHOWN else text


def _printable(text: str) -> str:
    """`text` with the characters `str.isprintable` refuses as escapes."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


PATH_SHOWN = 300
"""The most characters of a path the log shows (every route's own is
shorter: an id is at most 128): a refused callback's path of 20,000
characters was logged whole twice, 40 KB of log a request (a QA pass,
2026-12-07)."""


def _escape(char: str) -> str:
    """A character `str.isprintable` refuses (a control or format character,
    a line or paragraph separator, a space other than the ASCII one) as its
    escape."""
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _client(scope: Any) -> str:
    """The client's address, without its port (one client's connections
    differ only there). Behind a trusted proxy it is what `X-Forwarded-For`
    said, text a client may have written: escaped as a path is, cut at 64
    characters (no address is longer)."""
    client = scope.get("client")
    if not client:
        return "unknown address"
    address = str(client[0])
    if len(address) > 64 or not address.isprintable() or " " in address:
        address = "".join(c if c.isprintable() and c != " " else _escape(c) for c in address[:64])
    return address
