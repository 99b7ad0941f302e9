"""The access log: one line per request on the `tether.access` logger.

`GET /jobs 200 3.1 ms`: method, path *without* the query string (callback
tokens travel in it as `?token=`), status, milliseconds. A callback refused
with 401 or 404 gets a warning naming the promise id and the client's address,
so an operator can tell a misconfigured caller from a probe; the token is never
logged (neither the query string nor the `Authorization` header is read here).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("tether.access")

CALLBACKS = "/callbacks/"


def access_log(app: ASGIApp) -> ASGIApp:
    """`app` logging one line per HTTP request once its answer is sent."""

    async def logged(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # if the app fails before answering, the server answers 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await app(scope, receive, sending)
        finally:
            _log(scope, status, (time.perf_counter() - started) * 1000)

    return logged


def _log(scope: Any, status: int, ms: float) -> None:
    path: str = scope["path"]
    log.info("%s %s %d %.1f ms", scope["method"], path, status, ms)
    if status in (401, 404) and path.startswith(CALLBACKS):
        promise_id = path[len(CALLBACKS) :].split("/", 1)[0]
        log.warning(
            "callback for promise %r refused (%d) from %s",
            promise_id,
            status,
            _client(scope),
            extra={"promise_id": promise_id},
        )


def _client(scope: Any) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "unknown address"
