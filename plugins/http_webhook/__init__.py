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
"""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
import msgspec

from core.plugin import Backend, BackendError, ErrorInfo, Job, Outcome, Trigger, hookimpl

RETRYABLE_STATUS = frozenset({408, 425, 429})


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


class HttpWebhook(Backend):
    name = "http_webhook"
    params_type = WebhookParams

    def __init__(self) -> None:
        self._client: httpx.AsyncClient | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:  # built lazily: it must live on the running loop
            self._client = httpx.AsyncClient(follow_redirects=False, trust_env=False)
        return self._client

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
        response = await self._send("POST", params.url, params.timeout, json=body, headers=headers)
        return {"status_code": response.status_code, "response": _small_json(response)}

    async def cancel(self, job: Job) -> None:
        params = msgspec.convert(job.params, WebhookParams)
        if params.cancel_url is None:
            return
        body = {"job_id": job.id, "promise_id": f"{job.id}:1", "reason": job.state}
        await self._send(
            "POST", params.cancel_url, params.timeout, json=body, headers=params.headers
        )

    async def check_status(self, job: Job) -> Outcome | None:
        params = msgspec.convert(job.params, WebhookParams)
        if params.status_url is None:
            return None
        response = await self._send(
            "GET", params.status_url, params.timeout, headers=params.headers
        )
        try:
            status = msgspec.json.decode(response.content, type=StatusBody)
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

    async def _send(self, method: str, url: str, timeout: float, **kwargs: Any) -> httpx.Response:
        host = urlsplit(url).netloc
        try:
            response = await self.client.request(method, url, timeout=timeout, **kwargs)
        except httpx.TimeoutException:
            raise BackendError(
                f"{method} {host}: timed out after {timeout:g}s", retryable=True, code="timeout"
            ) from None
        except httpx.HTTPError as exc:
            raise BackendError(
                f"{method} {host}: {type(exc).__name__}", retryable=True, code="connection"
            ) from None
        if response.is_success:
            return response
        code = response.status_code
        retry_after = _retry_after(response)
        raise BackendError(
            f"{method} {host} answered {code}",
            code=f"http_{code}",
            retryable=code >= 500 or code in RETRYABLE_STATUS,
            retry_after=retry_after,
        )


def _small_json(response: httpx.Response, limit: int = 4096) -> Any:
    """The response's JSON body if it is small, else None (kept in the job record)."""
    if len(response.content) > limit:
        return None
    try:
        return msgspec.json.decode(response.content)
    except msgspec.DecodeError:
        return None


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return min(float(response.headers.get("retry-after", "")), 60.0)
    except ValueError:
        return None


@hookimpl
def tether_backends() -> list[Backend]:
    return [HttpWebhook()]
