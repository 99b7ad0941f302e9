"""Domain errors. `api/errors.py` maps each one to an HTTP status; `core` never
speaks HTTP itself."""

from __future__ import annotations

import difflib
import os
import ssl
from collections.abc import Iterable
from typing import Any

from core.redact import without_environment_secrets

SHOWN_MAX = 160
"""At most this many characters of an id (or a name) from a request are
quoted back in an error message: every id this service makes fits whole (a
job id is at most 128 characters, a callback promise id adds its attempt);
a longer one is anything but an id, and is cut."""


def shown(value: str) -> str:
    """`value`, taken from a request (a path's job or promise id, a backend
    name), as an error message quotes it: `repr`, so a control character is
    an escape (`\\n`, `\\x1b`), never raw; past `SHOWN_MAX` characters cut,
    with its length said."""
    if len(value) <= SHOWN_MAX:
        return repr(value)
    return f"{value[:SHOWN_MAX]!r}… ({len(value)} characters)"


def escaped(text: str) -> str:
    """`text` with every character `repr` would escape (a control or format
    character: a newline, ESC, a bidirectional override) written as its
    escape, for a message that quotes text from a request without quotes."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def reason(exc: BaseException) -> str:
    """What a failure says in a log line: its `message` (Tether's own errors,
    the store's `ServerError`), else only its type (another library's words
    may quote a URL that holds a token)."""
    return getattr(exc, "message", None) or type(exc).__name__


class TetherError(Exception):
    """Base of every error Tether reports to a client."""

    code = "error"

    def __init__(self, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidRequest(TetherError):
    """The request is malformed or names something invalid; nothing changed."""

    code = "invalid_request"


class MalformedBody(InvalidRequest):
    """The body could not be read at all (not JSON)."""


class NotFound(TetherError):
    code = "not_found"

    @classmethod
    def job(cls, job_id: str) -> NotFound:
        """No job `job_id` (quoted as `shown` has it)."""
        return cls(f"no job {shown(job_id)}")

    @classmethod
    def promise(cls, promise_id: str) -> NotFound:
        """No promise `promise_id` (quoted as `shown` has it)."""
        return cls(f"no promise {shown(promise_id)}")


class Conflict(TetherError):
    """The request disagrees with what is already recorded; nothing changed."""

    code = "conflict"


class Unauthorized(TetherError):
    code = "unauthorized"


class StoreUnavailable(TetherError):
    """The durable store did not answer."""

    code = "store_unavailable"
    unknown_effect = False
    """The store was asked and did not answer in time (`core.settle.store_call`):
    it may have applied the request late. False where nothing was asked."""


RETRY_AFTER_MAX = 86_400.0
"""Seconds a `BackendError.retry_after` asks for at most: a longer one (an
infinite one) is read as this; the job's deadline ends the wait anyway."""


def _message(value: Any) -> str:
    """A `BackendError`'s message, with each of the environment's secrets
    masked where it stands whole (`without_environment_secrets`: as written,
    JSON-escaped or percent-encoded). The message is filed in the job's
    events and logged as it is: a workspace's error quoting the
    Databricks token percent-encoded was masked in the job's error alone
    (found by a QA pass, 2026-12-07)."""
    if value is None:
        return "the backend gave no message"
    return without_environment_secrets(value if isinstance(value, str) else str(value))


def _code(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


def retry_after_seconds(value: Any) -> float | None:
    """A `retry_after` as seconds to wait: a number, or a number's text (an
    HTTP `Retry-After` header as it came); None for anything else (a date,
    NaN, a flag), at least 0, at most `RETRY_AFTER_MAX`."""
    if isinstance(value, bool):
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), RETRY_AFTER_MAX)


class BackendError(Exception):
    """Raised by a backend's `trigger` or `cancel` when the external system refused.

    `retryable=True` (a timeout, a 5xx, a 429) lets Tether try again with backoff;
    `retryable=False` (bad parameters, permission denied, not found) fails the job
    at once. `code` is the external system's own error code, if it has one. Never
    put a credential in the message: it ends up in the job record.

    `tried=False`, with `retryable=True`, says the trigger sent nothing: it
    waits to see what an earlier try did (a run the external system lists
    late) and asks to be called again after `retry_after` seconds. Such a
    wait is recorded as a failed try but not counted against
    `TETHER_TRIGGER_ATTEMPTS`; the backend must end it (try, or fail) in a
    bounded time, else the job waits until its deadline.

    Each field is read as its type says whatever it is given, when given and
    when set later: a `code` of `resp.status_code` is its text (`"403"`), a
    `message` of None says there was none, a `retry_after` of a `Retry-After`
    header's text is its number of seconds (a date, or anything else, none),
    at most `RETRY_AFTER_MAX`. (Kept as given, they made the step that
    caught the error fail, and try again without end: found by a QA pass.)
    """

    message: str
    retryable: bool
    code: str | None
    retry_after: float | None
    tried: bool

    def __init__(
        self,
        message: str,
        *,
        retryable: bool = False,
        code: str | None = None,
        retry_after: float | None = None,
        tried: bool = True,
    ) -> None:
        super().__init__()
        self.message = message  # (and `args`, what `str()` and tracebacks show)
        self.retryable = retryable
        self.code = code
        self.retry_after = retry_after
        self.tried = tried

    def __setattr__(self, name: str, value: Any) -> None:
        read = _READ.get(name)
        value = value if read is None else read(value)
        super().__setattr__(name, value)
        if name == "message":  # one text: a message masked later is masked in both
            self.args = (value,)


_READ: dict[str, Any] = {
    "message": _message,
    "code": _code,
    "retry_after": retry_after_seconds,
    "retryable": bool,
    "tried": bool,
}
"""How `BackendError` reads each of its fields."""


class StoreConfigError(ValueError):
    """`TETHER_STORE` names a store Tether cannot open; the message says why."""


def tls_failure(exc: BaseException) -> str:
    """`TLS failed (wrong version number)` when an `ssl.SSLError` is in
    `exc`'s chain, else ''. Its `errno` is OpenSSL's code, not the OS's: read
    as the OS's, 1 said `operation not permitted` (found by a security QA
    pass, https:// sent to a plain http port)."""
    tls, why = False, ""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLError):  # (aiohttp's wrapper is one, without a reason)
            tls, why = True, why or str(getattr(cause, "reason", None) or "")
        cause = cause.__cause__ or cause.__context__
    return f"TLS failed ({(why or 'handshake').replace('_', ' ').lower()})" if tls else ""


def os_reason(exc: BaseException) -> str:
    """Why a connection failed, as the operating system or TLS said it,
    deepest in `exc`'s chain (`connection refused`, `name or service not
    known`, `TLS failed (…)`), or '' when neither said anything. Never the
    exception's text, which may quote a URL's path and query."""
    reason = tls_failure(exc)
    cause: BaseException | None = None if reason else exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno:
            said = os.strerror(cause.errno) if cause.errno > 0 else str(cause.strerror)
            reason = said.lower()
        cause = cause.__cause__ or cause.__context__
    return reason


def near_hint(name: str, known: Iterable[str]) -> str:
    """`; did you mean X?` naming the closest of `known` to `name`, or ''."""
    near = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return f"; did you mean {near[0]}?" if near else ""
