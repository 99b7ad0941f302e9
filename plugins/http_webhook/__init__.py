"""The `http_webhook` backend: run a job on any HTTP service.

Triggering POSTs JSON to `params.url`:

```json
{"job_id": "...", "promise_id": "...", "callback_url": "...", "heartbeat_url": "...",
 "idempotency_key": "...", "payload": <params.payload>}
```

with the headers `Tether-Callback-Url` (the same URL), `Idempotency-Key` and
`Tether-Promise-Id`. Any
2xx answer means the job started; the service later POSTs the outcome to the
callback URL. While it works it may POST `{"progress"?: ...}` to
`heartbeat_url` (the callback URL's path and `/heartbeat`, the same token): a
job started with a `heartbeat_timeout` needs one at least that often. 4xx
answers (but 408, 409, 425 and 429) fail the job at once; 408, 409 (the
Idempotency-Key draft's "still being processed"), 425, 429, 5xx, timeouts and
connection errors are retried by Tether with backoff.

The URLs (`url`, `cancel_url`, `status_url`) are absolute http(s) URLs with
no `user:password@`: params are stored and shown with the job, so a
credential in a URL is refused (422). Optional: `auth` names a credential
configured on the service: the variable
`TETHER_WEBHOOK_AUTH_<NAME>` holds a whole `Authorization` header value
(`Bearer ...`, `Basic ...`), read when the service starts. It is sent on every
request of the job (trigger, `cancel_url`, `status_url`); the job keeps only
the name, and the value is scrubbed from every answer Tether reads, so a
receiver echoing it puts it in no job record or error.

Every request of a job (trigger, `cancel_url`, `status_url`) carries the
header `Tether-Promise-Id`, naming the attempt's run, in place of any of the
job's own headers of that name.

`cancel_url` is POSTed `{"job_id", "promise_id", "reason"}` when the job is
canceled or times out (also when no answer of its trigger arrived: a try that
timed out or got a 5xx may have started the run, so the receiver may get a
cancel for a promise id it never saw, which it answers 2xx). `status_url` is
polled with GET every `status_interval` seconds (default 30) while the job
waits, and answers with the callback body shape (`{"status":
"running"|"succeeded"|"failed", "result"?, "error"?, "progress"?}`), so a lost
callback is noticed. `running` confirms the run is going (a missed heartbeat
then only delays); without a `status_url`, or with an answer it does not
understand, the backend cannot tell (a missed heartbeat then times the job
out).

Requests go through one pooled aiohttp session, closed when the service stops. Redirects are
not followed (a 3xx answer is an error), proxy environment variables are
ignored, and `params.timeout` bounds each whole request, body included.
Answer bodies are read only up to a bound: a trigger's answer is kept as its
receipt's `response` if it is JSON of at most 4 KiB.
"""

from __future__ import annotations

import asyncio
import base64
import math
import os
import re
from collections.abc import Collection, Mapping
from typing import Annotated, Any, ClassVar, Literal, NamedTuple
from urllib.parse import unquote, urlsplit

import aiohttp
import msgspec
from msgspec import Meta

from core.plugin import (
    HTTP_URL_SCHEMA,
    Backend,
    BackendError,
    ErrorInfo,
    Job,
    Outcome,
    Running,
    Trigger,
    aside,
    callback_promise_id,
    hookimpl,
    os_reason,
    read_json,
    redact,
    redact_bytes,
    retry_after_seconds,
    url_fault,
)

RETRYABLE_STATUS = frozenset({408, 409, 425, 429})
"""4xx answers tried again. 409: the IETF Idempotency-Key draft's answer to a
request whose key is still being processed (a try the service died inside,
answered after the restart's replay): the run may be going."""
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


HTTP_URL = re.compile(r"^[Hh][Tt][Tt][Pp][Ss]?://[^/?#\x00-\x20\x7f]+(?:[/?#]|$)")
"""An absolute http(s) URL: the scheme (any case), `://` and a host. What a
stored job's params convert with; a new job's URLs are held to `HttpUrl` (the
schema's pattern) by `HttpWebhook.check_new_params`: jobs stored before its
rules keep theirs for their requests (clients see `***@`)."""
MAX_INTERVAL = 86400.0
"""The longest `status_interval`, a day: checks back off to ten times it."""

AUTH_PREFIX = "TETHER_WEBHOOK_AUTH_"
CREDENTIAL_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")
"""What NAME in `TETHER_WEBHOOK_AUTH_<NAME>` may be."""

HttpUrl = Annotated[str, Meta(extra_json_schema={"pattern": HTTP_URL_SCHEMA})]
"""What a new job's URL may be, as the params' schema states it: a host and
port a request can be sent to, no `user:password@`, no space or control
character (`check_new_params`)."""


HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
"""A header's name: an HTTP token (RFC 9110, 5.1)."""
_CONTROLS = r"\x00-\x08\x0a-\x1f\x7f"
HEADER_VALUE_REFUSED = re.compile(f"[{_CONTROLS}]")
"""What a header's value may not hold: control characters but tab (RFC 9110, 5.5)."""
CREDENTIAL_HEADERS = ("authorization", "proxy-authorization")
"""Headers that carry a credential by definition: a new job's are refused, as
`user:password@` in its URLs is (params are stored and shown with the job;
found by a security QA pass). Jobs stored before keep theirs."""

FRAMING_HEADERS = ("content-length", "transfer-encoding")
"""Headers that say how the body is framed: the HTTP client sets them for the
body it sends, and another value would break every request."""
_FRAMING = "|".join(
    "".join(f"[{c.upper()}{c}]" if c.isalpha() else c for c in name) for name in FRAMING_HEADERS
)  # in any case, as a schema's pattern can say it (no flags)
HEADERS_SCHEMA = {"propertyNames": {"pattern": f"^(?!(?:{_FRAMING})$){HEADER_NAME.pattern}$"}}
"""What the schema says of `headers` and of each value (a new job's are
checked in `check_new_params`, so those of jobs stored before still convert)."""
HEADER_VALUE_SCHEMA = {"pattern": f"^[^{_CONTROLS}]*$"}


class WebhookParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    url: HttpUrl
    """Where the job is triggered (http or https)."""
    payload: Any = None
    """Any JSON, passed on as `payload`."""
    headers: Annotated[
        dict[str, Annotated[str, Meta(extra_json_schema=HEADER_VALUE_SCHEMA)]],
        Meta(extra_json_schema=HEADERS_SCHEMA),
    ] = msgspec.field(default_factory=dict)
    """Extra request headers. They are stored with the job: put no secrets here."""
    timeout: Annotated[float, Meta(gt=0, le=300)] = 10.0
    """Seconds one request may take."""
    cancel_url: HttpUrl | None = None
    """POSTed `{"job_id", "promise_id", "reason"}` when the job is canceled or times out."""
    status_url: HttpUrl | None = None
    """Polled with GET while the job waits, to notice a lost callback."""
    status_interval: Annotated[float, Meta(ge=0.1, le=MAX_INTERVAL)] = 30.0
    """Seconds between polls of `status_url`."""
    auth: str | None = None
    """Name of a credential of the service (`TETHER_WEBHOOK_AUTH_<NAME>`, any
    case) sent as the `Authorization` header. Only the name is stored."""

    credential_names: ClassVar[frozenset[str]] = frozenset()
    """The names `auth` may take, upper case: those of the service, in the
    type `HttpWebhook` makes (`params_type`); none in this one."""

    def __post_init__(self) -> None:
        for name in ("url", "cancel_url", "status_url"):
            value = getattr(self, name)
            if value is not None and not HTTP_URL.match(value):
                raise ValueError(f"{name} must be an absolute http(s) URL")

        if self.auth is not None and not (
            self.auth.isascii() and self.auth.upper() in self.credential_names
        ):
            known = ", ".join(sorted(self.credential_names)) or "none"
            raise ValueError(
                f"auth: unknown credential {self.auth!r}; this service's credentials: {known}"
                f" (each is a variable {AUTH_PREFIX}<NAME>)"
            )


def params_type(credentials: Collection[str]) -> type[WebhookParams]:
    """`WebhookParams` of a service with these credential names: `auth` must
    name one of them, in any case, and the schema says which."""
    if credentials:
        names = "|".join(
            "".join(f"[{c}{c.lower()}]" if c.isalpha() else c for c in name)
            for name in sorted(credentials)
        )
        auth_string: dict[str, Any] = {"pattern": f"^(?:{names})$"}
        about = f"one of {', '.join(sorted(credentials))}, in any case"
    else:
        auth_string, about = {"not": {}}, "none is configured on this service"
    auth = Annotated[
        Annotated[str, Meta(extra_json_schema=auth_string)] | None,
        Meta(
            description="The name of a credential configured on the service"
            f" (`{AUTH_PREFIX}<NAME>`): {about}. It is sent as the `Authorization`"
            " header of the job's requests; the job keeps only the name."
        ),
    ]
    made: type[WebhookParams] = msgspec.defstruct(  # type: ignore[assignment]  # a subclass
        "WebhookParams",
        [("auth", auth, None)],
        bases=(WebhookParams,),
        namespace={"credential_names": frozenset(credentials)},
        module=__name__,
    )
    return made


def credentials_from_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The service's webhook credentials, NAME → `Authorization` value, from the
    variables `TETHER_WEBHOOK_AUTH_<NAME>` of `env` (default `os.environ`).
    NAME is capitals, digits and `_`; an empty value is no credential."""
    return {name: value for name, value in declared_credentials(env).items() if value}


def declared_credentials(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Every `TETHER_WEBHOOK_AUTH_<NAME>` of `env` (default `os.environ`) with a
    NAME, empty or not (an empty one is declared, though no credential: not an
    "unknown setting"). A NAME that is none in any case (`1X`, `MY-CRED`), or
    a value with a control character or nothing but spaces, is a
    `ValueError` saying why, never the value. Lower-case names are left to
    the unknown-setting warning."""
    env = os.environ if env is None else env
    declared: dict[str, str] = {}
    for key, value in env.items():
        if not key.startswith(AUTH_PREFIX):
            continue
        name = key.removeprefix(AUTH_PREFIX)
        if not CREDENTIAL_NAME.fullmatch(name.upper()):
            # it was "unknown setting ... is ignored", which said nothing of why
            raise ValueError(
                f"invalid setting {key[:100]!r}: NAME in {AUTH_PREFIX}<NAME> is capitals,"
                " digits and _, not beginning with a digit"
            )
        if not CREDENTIAL_NAME.fullmatch(name):
            continue
        if any(ord(c) < 32 or ord(c) == 127 for c in value):  # never the value
            raise ValueError(
                f"invalid setting {key}: it holds a control character (a line"
                " break?), which no HTTP header can carry; set the Authorization value alone"
            )
        if value and not value.strip():  # never the value (nor its length)
            # it was taken, and its jobs' requests sent `Authorization: ` unauthenticated
            # (found by a QA pass)
            raise ValueError(
                f"invalid setting {key}: it holds nothing but spaces; set the Authorization"
                " value (such as `Bearer <token>`), or leave it empty to declare no credential"
            )
        declared[name] = value
    return declared


class StatusBody(msgspec.Struct, frozen=True):
    status: Literal["running", "succeeded", "failed"]
    result: Any = None
    error: ErrorInfo | None = None
    progress: Any = None
    """With `running`: how far along the run is."""


class _Answer(NamedTuple):
    status: int
    body: bytes | None
    """None if it was longer than the limit it was read with."""


class HttpWebhook(Backend):
    name = "http_webhook"
    params_type = WebhookParams
    settings_prefix = AUTH_PREFIX

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        declared = declared_credentials(env)
        self.credentials = {name: value for name, value in declared.items() if value}
        """NAME → `Authorization` value; read once, so a change needs a restart."""
        # Both depend on the credentials configured, though `Backend` declares
        # them class variables: the params' schema lists the names, and the
        # variables are declared so that start-up does not call them unknown.
        self.params_type = params_type(self.credentials)  # type: ignore[misc]
        self.settings_type = msgspec.defstruct(  # type: ignore[misc]
            "WebhookCredentials", [(name.lower(), str) for name in sorted(declared)]
        )
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

    def check_new_params(self, params: WebhookParams) -> None:
        """A new job's URLs carry no `user:password@`: params are stored and
        shown with the job (a credential goes in `auth`), nor do its headers
        (`CREDENTIAL_HEADERS`). Jobs stored before these rules keep theirs,
        and their requests still send them. Its headers
        are ones HTTP allows: a name that is a token, a value without control
        characters (a line break would end the header)."""
        for name in ("url", "cancel_url", "status_url"):
            value = getattr(params, name)
            # the whole URL as a notification's is checked: a space or a line
            # break in the path was taken (and sent percent-encoded: a QA pass)
            fault = "" if value is None else url_fault(value)
            if fault == "carries user:password@":
                raise ValueError(
                    f"{name} must not carry user:password@: params are stored and shown"
                    " with the job; name a credential of the service in `auth` instead"
                    f" ({AUTH_PREFIX}<NAME>)"
                )
            if fault:
                raise ValueError(f"{name} {fault}")
        for header, value in params.headers.items():  # as HTTP allows (else sent as is)
            if not HEADER_NAME.fullmatch(header):
                raise ValueError(
                    f"headers: {header[:64]!r} is not a header name (1 or more of A-Z a-z 0-9"
                    " and !#$%&'*+-.^_`|~)"
                )
            if header.lower() in CREDENTIAL_HEADERS:  # the value is not repeated
                raise ValueError(
                    f"headers: {header!r} would be stored and shown with the job; name a"
                    f" credential of the service in `auth` instead ({AUTH_PREFIX}<NAME>)"
                )
            if header.lower() in FRAMING_HEADERS:
                raise ValueError(
                    f"headers: {header!r} is set by the HTTP client for the body it sends;"
                    " leave it out"
                )
            if HEADER_VALUE_REFUSED.search(value):  # the value itself is not repeated
                raise ValueError(
                    f"headers: the value of {header[:64]!r} holds a control character (a line"
                    " break, NUL, ...), which HTTP does not allow"
                )

    def check_interval(self, params: WebhookParams) -> float | None:
        return params.status_interval if params.status_url else None

    async def trigger(self, trigger: Trigger) -> dict[str, Any]:
        params: WebhookParams = trigger.params
        body = {
            "job_id": trigger.job.id,
            "promise_id": trigger.promise_id,
            "callback_url": trigger.callback_url,
            "heartbeat_url": trigger.heartbeat_url,
            "idempotency_key": trigger.idempotency_key,
            "payload": params.payload,
        }
        ours = {
            "Tether-Callback-Url": trigger.callback_url,
            "Idempotency-Key": trigger.idempotency_key,
            "Tether-Promise-Id": trigger.promise_id,
        }
        answer = await self._send(
            "POST",
            params.url,
            params.timeout,
            RECEIPT_LIMIT,
            json=body,
            headers=self._headers(params, ours),
            reason_on_4xx=True,  # Tether scrubs the callback token from trigger errors
        )
        return {"status_code": answer.status, "response": _small_json(answer.body)}

    async def cancel(self, job: Job) -> None:
        params: WebhookParams = msgspec.convert(job.params, self.params_type)
        if params.cancel_url is None:
            return
        promise_id = callback_promise_id(job.id, job.attempt)
        body = {"job_id": job.id, "promise_id": promise_id, "reason": job.state}
        headers = self._headers(params, {"Tether-Promise-Id": promise_id})
        await self._send("POST", params.cancel_url, params.timeout, 0, json=body, headers=headers)

    async def cancel_unrecorded(self, trigger: Trigger) -> None:
        """`cancel_url` names the run by its promise id, whatever the
        trigger's answer was: the same POST as `cancel`."""
        await self.cancel(trigger.job)

    async def check_status(self, job: Job) -> Outcome | Running | None:
        params: WebhookParams = msgspec.convert(job.params, self.params_type)
        if params.status_url is None:
            return None
        # Which run is asked about: after a retry the same URL is polled for
        # the next attempt, whose run the endpoint may not know of yet (it
        # answered with the last attempt's end: found by a QA pass).
        ours = {"Tether-Promise-Id": callback_promise_id(job.id, job.attempt)}
        headers = self._headers(params, ours)
        answer = await self._send(
            "GET", params.status_url, params.timeout, STATUS_LIMIT, headers=headers
        )
        # read aside when large: the target writes it, up to `STATUS_LIMIT`
        size = len(answer.body or b"")
        status = await aside(size, _status_of, answer, _host(params.status_url))
        if status.status == "running":
            return Running(progress=status.progress)
        error = status.error or (
            ErrorInfo(message="the service reported a failure")
            if status.status == "failed"
            else None
        )
        return Outcome(status=status.status, result=status.result, error=error)

    def _headers(
        self, params: WebhookParams, ours: Mapping[str, str] | None = None
    ) -> dict[str, str]:
        """The job's headers with Tether's own, and its credential as
        `Authorization`, in place of any of the job's of those names (in
        whatever case)."""
        ours = dict(ours or {})
        if params.auth is not None:
            ours["Authorization"] = self.credentials[params.auth.upper()]
        taken = {name.lower() for name in ours}
        theirs = {k: v for k, v in params.headers.items() if k.lower() not in taken}
        return {**theirs, **ours}

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
        may carry secrets, and so may answer bodies. The `Authorization` value
        sent is scrubbed from the answer: a receiver may echo it."""
        host = _host(url)
        session = self.session()
        try:
            async with session.request(
                method,
                url,
                json=json,
                headers=headers,
                # exact: aiohttp rounds 5 s or more up to the next whole second
                timeout=aiohttp.ClientTimeout(total=timeout, ceil_threshold=math.inf),
                allow_redirects=False,
            ) as response:
                code = response.status
                raw = await _read_body(response, max(limit, REASON_LIMIT))
                retry_after = _retry_after(response.headers)
        except aiohttp.InvalidURL:
            raise BackendError(f"{method} {host}: not a valid URL", code="invalid_url") from None
        except TimeoutError:  # also aiohttp's ServerTimeoutError and ConnectionTimeoutError
            raise BackendError(
                f"{method} {host}: timed out after {timeout:g}s", retryable=True, code="timeout"
            ) from None
        except (aiohttp.ClientError, OSError, ValueError) as exc:  # ValueError: a bad header
            why = os_reason(exc)
            raise BackendError(
                f"{method} {host}: {type(exc).__name__}{f': {why}' if why else ''}",
                retryable=True,
                code="connection",
            ) from None
        # A receiver may echo the Authorization sent: the header's, or the
        # Basic one aiohttp makes of a stored URL's user:password.
        sent = [s for s in (headers.get("Authorization"), _url_credential(url)) if s]
        body = redact_bytes(raw, sent)
        if 200 <= code < 300:
            return _Answer(code, body if len(raw) <= limit else None)
        reason = ""
        if reason_on_4xx and 400 <= code < 500 and body:
            # masked as a text before it is cut (`redact`: what the read's 4 KiB
            # cut left of a credential at its end, its head, was kept whole)
            text = redact(body.decode("utf-8", "replace"), sent)
            said = text.encode()[:REASON_LIMIT].decode("utf-8", "replace")
            text = " ".join(said.split())
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


def _url_credential(url: str) -> str | None:
    """The `Authorization` aiohttp sends for a URL's `user:password@` (a job
    stored before new jobs' URLs were refused them): Basic, decoded."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.username is None and parts.password is None:
        return None
    pair = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
    return "Basic " + base64.b64encode(pair.encode()).decode()


def _status_of(answer: _Answer, host: str) -> StatusBody:
    """A `status_url`'s 2xx answer as a `StatusBody`. One it cannot read (no
    JSON, a `status` of another word, more than `STATUS_LIMIT` bytes) is a
    failed check (a `BackendError`, retryable: the job waits on, logged), not
    "cannot tell": the endpoint answered, so the run is not lost, and a
    missed heartbeat is not to stop a run that may be going. What is wrong is
    named by where, never by value (an answer may hold anything)."""
    expected = '{"status": "running"|"succeeded"|"failed", ...}'
    if answer.body is None:
        problem = f"more than {STATUS_LIMIT} bytes"
    else:
        try:
            status: StatusBody = read_json(answer.body, StatusBody)
            return status
        except msgspec.ValidationError as exc:
            at = str(exc).partition(" - at `$")[2].lstrip(".")  # where, never the value
            problem = "JSON of another shape" + (f" (at `{at})" if at else "")
        except (msgspec.DecodeError, UnicodeDecodeError):
            problem = "what is not JSON"
    raise BackendError(
        f"GET {host} answered {answer.status} with {problem}, not a status ({expected})",
        retryable=True,
        code="invalid_status",
    )


def _host(url: str) -> str:
    """`host[:port]` of `url`, without any `user:password@`."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # `http://[x`, a port out of range: aiohttp refuses it too
        return "(not a valid URL)"
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else str(parts.hostname)
    return f"{host}:{port}" if port else host


def _small_json(body: bytes | None) -> Any:
    """The JSON of a body read with RECEIPT_LIMIT, else None (kept in the job record)."""
    if body is None:
        return None
    try:
        return read_json(body)
    except (msgspec.DecodeError, UnicodeDecodeError):  # bad UTF-8 in a string: the latter
        return None


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """The seconds a `Retry-After` asks for (a date is not read), at most a minute."""
    seconds = retry_after_seconds(headers.get("retry-after"))
    return None if seconds is None else min(seconds, 60.0)


@hookimpl
def tether_backends() -> list[Backend]:
    return [HttpWebhook()]
