"""The `http_webhook` backend: run a job on any HTTP service.

Triggering POSTs JSON to `params.url`:

```json
{"job_id": "...", "promise_id": "...", "callback_url": "...", "idempotency_key": "...",
 "payload": <params.payload>}
```

with the headers `Tether-Callback-Url` (the same URL) and `Idempotency-Key`. Any
2xx answer means the job started; the service later POSTs the outcome to the
callback URL. 4xx answers (but 408 and 429) fail the job at once; 408, 429, 5xx,
timeouts and connection errors are retried by Tether with backoff.

Optional: `cancel_url` is POSTed `{"job_id", "promise_id", "reason"}` when the
job is canceled or times out; `status_url` is polled with GET every
`status_interval` seconds (default 30) while the job waits, and answers with the callback
body shape (`{"status": "running"|"succeeded"|"failed", "result"?, "error"?}`),
so a lost callback is noticed.

Requests go through one pooled aiohttp session, closed when the service stops. Redirects are
not followed (a 3xx answer is an error), proxy environment variables are
ignored, and `params.timeout` bounds each whole request, body included.
Answer bodies are read only up to a bound: a trigger's answer is kept as its
receipt's `response` if it is JSON of at most 4 KiB.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple
from urllib.parse import urlsplit

import aiohttp
import msgspec

from core.plugin import (
    Backend,
    BackendError,
    ErrorInfo,
    Job,
    Outcome,
    Trigger,
    callback_promise_id,
    hookimpl,
)

RETRYABLE_STATUS = frozenset({408, 425, 429})
RECEIPT_LIMIT = 4096
"""A trigger's answer is kept in its receipt if it is at most this many bytes."""
STATUS_LIMIT = 1 << 20
"""A status_url answer longer than this is not understood."""
REASON_LIMIT = 1024
"""Of a trigger refused with a 4xx, this many bytes of the answer go into the
job's error: the receiver's reason."""
DRAIN_LIMIT = 1 << 16
"""An answer longer than its limit is read on (and dropped) up to this many bytes
more, so its connection can be reused; past that the connection is closed."""


class WebhookParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    url: str
    """Where the job is triggered (http or https)."""
    payload: Any = None
    """Any JSON, passed on as `payload`."""
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    """Extra request headers. They are stored with the job: put no secrets here."""
    timeout: float = 10.0
    """Seconds one request may take."""
    cancel_url: str | None = None
    """POSTed `{"job_id", "promise_id", "reason"}` when the job is canceled or times out."""
    status_url: str | None = None
    """Polled with GET while the job waits, to notice a lost callback."""
    status_interval: float = 30.0
    """Seconds between polls of `status_url`."""

    def __post_init__(self) -> None:
        for name in ("url", "cancel_url", "status_url"):
            value = getattr(self, name)
            if value is not None and not _is_http_url(value):
                raise ValueError(f"{name} must be an absolute http(s) URL")
        if not 0 < self.timeout <= 300:
            raise ValueError("timeout must be more than 0 and at most 300 seconds")
        if self.status_interval < 0.1:
            raise ValueError("status_interval must be at least 0.1 seconds")


class StatusBody(msgspec.Struct, frozen=True):
    status: Literal["running", "succeeded", "failed"]
    result: Any = None
    error: ErrorInfo | None = None


def _is_http_url(value: str) -> bool:
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


class _Answer(NamedTuple):
    status: int
    body: bytes | None
    """None if it was longer than the limit it was read with."""


class HttpWebhook(Backend):
    name = "http_webhook"
    params_type = WebhookParams

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def session(self) -> aiohttp.ClientSession:
        """The pooled session, made on first use: it must live on the running
        loop. A session left from another loop (a test's earlier service) is
        dropped."""
        session, loop = self._session, asyncio.get_running_loop()
        if session is None or session.closed or self._loop is not loop:
            self._loop = loop
            session = self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=256, limit_per_host=0, ttl_dns_cache=10),
                cookie_jar=aiohttp.DummyCookieJar(),  # no cookies from one job to another's
                trust_env=False,
                json_serialize_bytes=msgspec.json.encode,
            )
        return session

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None and self._loop is asyncio.get_running_loop():
            await session.close()

    def check_interval(self, params: WebhookParams) -> float | None:
        return params.status_interval if params.status_url else None

    async def trigger(self, trigger: Trigger) -> dict[str, Any]:
        params: WebhookParams = trigger.params
        body = {
            "job_id": trigger.job.id,
            "promise_id": trigger.promise_id,
            "callback_url": trigger.callback_url,
            "idempotency_key": trigger.idempotency_key,
            "payload": params.payload,
        }
        headers = {
            **params.headers,
            "Tether-Callback-Url": trigger.callback_url,
            "Idempotency-Key": trigger.idempotency_key,
        }
        answer = await self._send(
            "POST",
            params.url,
            params.timeout,
            RECEIPT_LIMIT,
            json=body,
            headers=headers,
            reason_on_4xx=True,  # Tether scrubs the callback token from trigger errors
        )
        return {"status_code": answer.status, "response": _small_json(answer.body)}

    async def cancel(self, job: Job) -> None:
        params = msgspec.convert(job.params, WebhookParams)
        if params.cancel_url is None:
            return
        body = {"job_id": job.id, "promise_id": callback_promise_id(job.id), "reason": job.state}
        await self._send(
            "POST", params.cancel_url, params.timeout, 0, json=body, headers=params.headers
        )

    async def check_status(self, job: Job) -> Outcome | None:
        params = msgspec.convert(job.params, WebhookParams)
        if params.status_url is None:
            return None
        answer = await self._send(
            "GET", params.status_url, params.timeout, STATUS_LIMIT, headers=params.headers
        )
        if answer.body is None:
            return None  # too long to be an answer we understand: keep waiting
        try:
            status = msgspec.json.decode(answer.body, type=StatusBody)
        except msgspec.MsgspecError:
            return None  # not an answer we understand: keep waiting
        if status.status == "running":
            return None
        error = status.error or (
            ErrorInfo(message="the service reported a failure")
            if status.status == "failed"
            else None
        )
        return Outcome(status=status.status, result=status.result, error=error)

    async def _send(
        self,
        method: str,
        url: str,
        timeout: float,
        limit: int,
        *,
        headers: Mapping[str, str],
        json: Any = None,
        reason_on_4xx: bool = False,
    ) -> _Answer:
        """Send a request; its answer, with a body of at most `limit` bytes kept.
        Errors never name more of the URL than its host: paths and query strings
        may carry secrets, and so may answer bodies."""
        host = _host(url)
        session = self.session()
        try:
            async with session.request(
                method,
                url,
                json=json,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout),
                allow_redirects=False,
            ) as response:
                code = response.status
                body = await _read_body(response, max(limit, REASON_LIMIT))
                retry_after = _retry_after(response.headers)
        except TimeoutError:  # also aiohttp's ServerTimeoutError and ConnectionTimeoutError
            raise BackendError(
                f"{method} {host}: timed out after {timeout:g}s", retryable=True, code="timeout"
            ) from None
        except (aiohttp.ClientError, OSError, ValueError) as exc:  # ValueError: a bad header
            raise BackendError(
                f"{method} {host}: {type(exc).__name__}", retryable=True, code="connection"
            ) from None
        if 200 <= code < 300:
            return _Answer(code, body if body is not None and len(body) <= limit else None)
        reason = ""
        if reason_on_4xx and 400 <= code < 500 and body:
            text = " ".join(body[:REASON_LIMIT].decode("utf-8", "replace").split())
            reason = f": {text}" if text else ""
        raise BackendError(
            f"{method} {host} answered {code}{reason}",
            code=f"http_{code}",
            retryable=code >= 500 or code in RETRYABLE_STATUS,
            retry_after=retry_after,
        )


async def _read_body(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body, or its first `limit + 1` bytes when it is longer than `limit`
    (so a caller can tell). At most `limit + 1` bytes are kept in memory; a
    longer body is read on up to DRAIN_LIMIT bytes, so the connection can be
    reused, else closed."""
    content = response.content
    data = bytearray()
    while len(data) <= limit:
        chunk = await content.read(limit + 1 - len(data))
        if not chunk:
            return bytes(data)
        data += chunk
    skipped = 0
    while skipped < DRAIN_LIMIT:
        chunk = await content.read(DRAIN_LIMIT - skipped)
        if not chunk:
            return bytes(data)
        skipped += len(chunk)
    response.close()
    return bytes(data)


def _host(url: str) -> str:
    """`host[:port]` of `url`, without any `user:password@`."""
    parts = urlsplit(url)
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else str(parts.hostname)
    return f"{host}:{parts.port}" if parts.port else host


def _small_json(body: bytes | None) -> Any:
    """The JSON of a body read with RECEIPT_LIMIT, else None (kept in the job record)."""
    if body is None:
        return None
    try:
        return msgspec.json.decode(body)
    except msgspec.DecodeError:
        return None


def _retry_after(headers: Mapping[str, str]) -> float | None:
    try:
        return min(float(headers.get("retry-after", "")), 60.0)
    except ValueError:
        return None


@hookimpl
def tether_backends() -> list[Backend]:
    return [HttpWebhook()]
