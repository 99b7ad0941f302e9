"""The Databricks side of the backend: settings, the lazily built SDK client, the
calls made in worker threads, and their errors turned into `BackendError`s with
no secret in them.

`databricks.sdk` takes seconds to import, so it is imported only here and only
inside the worker threads: starting Tether and validating params never pay it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import os
import re
import threading
import typing
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import is_dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

import msgspec

from core.plugin import (
    USERINFO,
    BackendError,
    Readiness,
    redact,
    settings_from_env,
    without_whole,
)

if TYPE_CHECKING:
    from databricks.sdk import WorkspaceClient

log = logging.getLogger("tether.databricks")

ENV_PREFIX = "TETHER_DATABRICKS_"

MAX_RETRY_AFTER = 300.0
"""A `Retry-After` longer than this (seconds) is cut to it."""

MAX_MESSAGE = 1000

SECRET_ATTRIBUTES = (
    "token",
    "password",
    "client_secret",
    "azure_client_secret",
    "google_credentials",
)
WORKSPACE_ENV = (
    "DATABRICKS_HOST",
    "DATABRICKS_CONFIG_PROFILE",
    "DATABRICKS_CONFIG_FILE",
    "DATABRICKS_AZURE_RESOURCE_ID",  # Azure auth looks the host up from it
    "DATABRICKS_RUNTIME_VERSION",  # inside Databricks: the runtime's own auth names it
    "DATABRICKS_MODEL_SERVING_HOST_URL",  # inside a model serving endpoint
    "DB_MODEL_SERVING_HOST_URL",
)
"""The SDK's variables that name a workspace, or that it finds one from (its
other auth variables need one of these). Without any, and with no profile or
`~/.databrickscfg`, a trigger fails at once (`NO_WORKSPACE`) and the readiness
check says `unconfigured`."""
NO_WORKSPACE = (
    "Databricks client configuration: no workspace is named; set DATABRICKS_HOST and"
    " DATABRICKS_TOKEN, a profile in ~/.databrickscfg, or TETHER_DATABRICKS_PROFILE"
)
"""What a trigger and the readiness check say when nothing names a workspace."""
SECRET_ENV = (
    "DATABRICKS_TOKEN",
    "DATABRICKS_PASSWORD",
    "DATABRICKS_CLIENT_SECRET",
    "ARM_CLIENT_SECRET",
    "GOOGLE_CREDENTIALS",
)


HTTP_TIMEOUT_MAX = 3600.0
"""The longest `TETHER_DATABRICKS_HTTP_TIMEOUT`, an hour (the HTTP client
cannot wait for ever: `inf` failed every call)."""
RETRY_TIMEOUT_MAX = 3600
"""The longest `TETHER_DATABRICKS_RETRY_TIMEOUT`, an hour: past the SDK's
dates it failed every call (`OverflowError`), and a trigger's call is bounded
at 15 minutes anyway."""
THREADS_MAX = 256
"""The most `TETHER_DATABRICKS_THREADS`: each is a thread of the process."""


OAUTH_TRANSIENT = frozenset({"temporarily_unavailable", "server_error"})
"""OAuth error codes (RFC 6749, 5.2 and 4.1.2.1) by which a token endpoint
says it cannot answer for now: a call failing so is retried, not taken for
a configuration error."""


class DatabricksSettings(msgspec.Struct, frozen=True, kw_only=True):
    """The plugin's own settings, from `TETHER_DATABRICKS_<FIELD>` variables.
    Credentials are not here: they come from databricks-sdk's unified auth."""

    profile: str = ""
    """`TETHER_DATABRICKS_PROFILE`: a profile of `~/.databrickscfg` (or of the file
    `DATABRICKS_CONFIG_FILE` names). Empty: the SDK's own chain (`DATABRICKS_HOST`
    + `DATABRICKS_TOKEN` or another auth method's variables, then
    `DATABRICKS_CONFIG_PROFILE`, then the `DEFAULT` profile)."""

    retry_timeout: int = 60
    """`TETHER_DATABRICKS_RETRY_TIMEOUT`: seconds one API call may spend on the
    SDK's own retries of connection errors and timeouts. After that the call
    fails with a retryable error and Tether tries again with backoff. (429
    and 503 are not the SDK's to retry: Tether does, visibly.)"""

    http_timeout: float = 30.0
    """`TETHER_DATABRICKS_HTTP_TIMEOUT`: seconds one HTTP request may take,
    more than 0 and at most `HTTP_TIMEOUT_MAX`."""

    threads: int = 8
    """`TETHER_DATABRICKS_THREADS`: the SDK is synchronous; at most this many calls
    run at once, in the plugin's own threads."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> DatabricksSettings:
        settings = settings_from_env(cls, ENV_PREFIX, env)
        for name, ok, most in (
            ("retry_timeout", 1 <= settings.retry_timeout <= RETRY_TIMEOUT_MAX, RETRY_TIMEOUT_MAX),
            ("http_timeout", 0 < settings.http_timeout <= HTTP_TIMEOUT_MAX, HTTP_TIMEOUT_MAX),
            ("threads", 1 <= settings.threads <= THREADS_MAX, THREADS_MAX),
        ):
            if not ok:  # (`inf` was taken, and every call failed: an audit, 2026-12-04; a
                # retry timeout of 1e23 failed every call too: an exploratory QA pass)
                raise ValueError(
                    f"invalid setting {ENV_PREFIX}{name.upper()}: must be positive, at most"
                    f" {most:g}"
                )
        return settings


class Workspace:
    """One Databricks workspace client, built on first use, shared by every job.

    `call(fn)` runs `fn(client)` in the plugin's threads and raises only
    `BackendError`, its message cleaned of credentials."""

    def __init__(self, settings: DatabricksSettings) -> None:
        self.settings = settings
        # At DEBUG the SDK logs every request and answer in full: the job
        # parameters (callback URLs and their tokens), and with debug_headers
        # the credentials. Never let it.
        sdk_log = logging.getLogger("databricks.sdk")
        if sdk_log.getEffectiveLevel() < logging.INFO:
            sdk_log.setLevel(logging.INFO)
        hide_userinfo_in_sdk_logs()  # its warnings name the host
        self._client: WorkspaceClient | None = None
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(settings.threads, thread_name_prefix="tether-databricks")

    def __repr__(self) -> str:  # never show the client's config
        return f"Workspace(profile={self.settings.profile!r})"

    async def call[T](
        self, fn: Callable[[WorkspaceClient], T], *secrets: str, once: bool = False
    ) -> T:
        """`fn(client)` in a worker thread. `secrets` are scrubbed from errors
        besides the client's own credentials. `once`: the SDK sends each
        request once, never again after a dropped connection or a timeout
        once it may have left (for a request that starts something and
        takes no idempotency token: the caller looks before it tries
        again); a connection never made is tried again as usual."""
        loop = asyncio.get_running_loop()
        run = functools.partial(self._run, fn, secrets, once)
        return await loop.run_in_executor(self._pool, run)

    def _run[T](
        self, fn: Callable[[WorkspaceClient], T], secrets: tuple[str, ...], once: bool
    ) -> T:
        try:
            _sending.once = once
            return fn(self.client())
        except BackendError as exc:
            message = self.scrub(exc.message, secrets)
            raise BackendError(
                message, retryable=exc.retryable, code=exc.code, retry_after=exc.retry_after
            ) from None
        except Exception as exc:
            raise self.translate(exc, secrets) from None
        finally:
            _sending.once = False

    def client(self) -> WorkspaceClient:
        """The client, built on first use (in a worker thread: building it makes
        one request, and importing the SDK takes seconds)."""
        with self._lock:
            if self._client is None:
                if not self.names_a_workspace():  # the SDK would say so at length
                    raise BackendError(NO_WORKSPACE, code="databricks_config")
                from databricks.sdk import WorkspaceClient
                from databricks.sdk.config import Config

                # A host written with a user and password is handed to the SDK
                # without them (it never signs in with them): a password with a
                # `/`, `?`, `#` or space made the SDK read part of it as the port
                # or the host, quoted in the job's error, the log and /health,
                # and looked up in DNS (a QA pass).
                written = os.environ.get("DATABRICKS_HOST", "")
                host = without_userinfo(written)
                if host is None:
                    raise BackendError(UNREADABLE_HOST, code="databricks_config")
                given: dict[str, Any] = {"host": host} if host != written else {}
                config = Config(
                    **given,
                    profile=self.settings.profile or None,
                    retry_timeout_seconds=self.settings.retry_timeout,
                    http_timeout_seconds=self.settings.http_timeout,
                    debug_headers=False,  # never put credentials in an error message or log
                    product="tether",
                    product_version=_version(),
                )
                self._client = WorkspaceClient(config=config)
                hand_back_throttling(self._client)
                hide_userinfo_in_sdk_logs()  # the child loggers the SDK made on import
                shown = shown_host(config.host)
                log.info("databricks: using workspace %s", shown)
                if shown != config.host or host != written:
                    log.warning(
                        "databricks: the workspace's host names a user or a password"
                        " (user:password@): the SDK does not sign in with them (it uses its"
                        " own credentials), and Tether never shows them; take them out"
                    )
            return self._client

    def names_a_workspace(self) -> bool:
        """Whether anything names a workspace (a profile setting, the SDK's
        variables, `~/.databrickscfg`), asked without importing the SDK: that
        takes seconds and tens of MB, which a service with no Databricks jobs
        must not pay for a readiness check."""
        if self.settings.profile or any(os.environ.get(name) for name in WORKSPACE_ENV):
            return True
        return os.path.exists(os.path.expanduser("~/.databrickscfg"))

    async def readiness(self) -> Readiness:
        """Whether the workspace accepts the credentials: one read-only call
        (`current_user.me`). Reasons are scrubbed like every error message."""
        if not self.names_a_workspace():
            return Readiness("unconfigured", NO_WORKSPACE)
        try:
            await self.call(lambda w: w.current_user.me())
        except BackendError as exc:
            if exc.code == "databricks_config":
                return Readiness("unconfigured", exc.message)
            return Readiness("error", exc.message)
        return Readiness("ok")

    # ── errors ───────────────────────────────────────────────────────────────

    def translate(self, exc: BaseException, secrets: Iterable[str] = ()) -> BackendError:
        """A `BackendError` saying what Databricks answered, with no secret in it:
        its `error_code` as `code` and its message. Retryable: 429, 500, 503,
        504, `ABORTED`, statuses the SDK does not map, a 400 whose words the SDK
        itself takes for a passing fault (`_transient`), and a retry budget
        spent on any of these or on connection errors (`Retry-After` kept). Not
        retryable: 400, 401, 403, 404, 409, 501, and a client the SDK could not
        configure (`databricks_config`)."""
        from databricks.sdk import errors
        from databricks.sdk.errors.base import DatabricksError

        if isinstance(exc, TimeoutError):  # the SDK's retry budget ran out
            last = exc.__cause__
            budget = f"after retrying for {self.settings.retry_timeout}s"
            if isinstance(last, DatabricksError):
                inner = self.translate(last, secrets)
                return BackendError(
                    f"{inner.message} ({budget})",
                    retryable=True,
                    code=inner.code,
                    retry_after=inner.retry_after,
                )
            reason = type(last).__name__ if last is not None else "timeout"
            return BackendError(
                f"Databricks did not answer ({reason}, {budget})", retryable=True, code="timeout"
            )
        if isinstance(exc, DatabricksError):
            kind = type(exc).__name__
            retryable = (
                type(exc) is DatabricksError
                or isinstance(
                    exc,
                    (
                        errors.TooManyRequests,
                        errors.TemporarilyUnavailable,
                        errors.InternalError,
                        errors.DeadlineExceeded,
                        errors.Aborted,
                    ),
                )
                or _transient(exc)
            )
            retry_after = exc.retry_after_secs
            if retry_after is None:  # kept from the SDK's retries (`hand_back_throttling`)
                retry_after = exc.kwargs.get(RETRY_AFTER_KEY)
            # A 429 itself: the SDK maps its error codes for throttling
            # (`REQUEST_LIMIT_EXCEEDED`) to `TooManyRequests` whatever the status.
            status = exc.kwargs.get(STATUS_KEY)
            throttled = status == 429 if status else isinstance(exc, errors.TooManyRequests)
            refused = Throttled if throttled else BackendError
            return refused(
                self.scrub(str(exc) or kind, secrets),
                retryable=retryable,
                code=exc.error_code or _screaming(kind),
                retry_after=None if retry_after is None else min(retry_after, MAX_RETRY_AFTER),
            )
        from requests.exceptions import JSONDecodeError  # on json's or simplejson's

        if isinstance(exc, json.JSONDecodeError | JSONDecodeError):
            # A 200 whose body is not JSON (an answer cut short; a proxy's or a
            # sign-in page): the same call again, with the same idempotency
            # token, gets the same run back. Its words name a position only.
            said = str(getattr(exc, "msg", None) or type(exc).__name__)
            return BackendError(
                f"Databricks' answer was not JSON ({said})", retryable=True, code="bad_answer"
            )
        if isinstance(exc, ValueError) and str(exc).partition(":")[0] in OAUTH_TRANSIENT:
            # The token endpoint's own error (the SDK wraps it in a ValueError):
            # down for now, as a 503 from the API is (found in an audit,
            # 2026-12-04: it failed the job at once as a configuration error)
            return BackendError(
                f"Databricks' token endpoint: {self.scrub(str(exc), secrets)}",
                retryable=True,
                code="timeout",
            )
        if isinstance(exc, ValueError):  # the SDK could not configure itself (auth, profile)
            return BackendError(
                f"Databricks client configuration: {self.scrub(str(exc), secrets)}",
                code="databricks_config",
            )
        if isinstance(exc, OSError):  # connection errors the SDK did not retry
            return BackendError(
                f"cannot reach Databricks: {type(exc).__name__}", retryable=True, code="connection"
            )
        return BackendError(
            f"Databricks call failed: {type(exc).__name__}: {self.scrub(str(exc), secrets)}",
            retryable=True,
            code="databricks",
        )

    def scrub(self, text: str, secrets: Iterable[str] = ()) -> str:
        """`text` without credentials or callback tokens, and short. Each in
        every form `redact` knows (percent-encoded, JSON-escaped): a
        workspace's error quoting the token percent-encoded kept it whole
        (found by a QA pass, 2026-12-07). Random ones (callback tokens,
        the workspace's token) also where a cut left a piece of them, as
        `redact` masks a callback token's; a password, a client secret or
        a credentials file whole alone, since such a value may hold words an
        error holds too."""
        text = text.split("Request log:", 1)[0]  # the SDK's dump of an unreadable answer
        tokens, others = self._secrets()
        text = redact(text, [s for s in (*secrets, *tokens) if s and len(s) >= 4])
        # (not `forms`: a password's word after a space is no secret)
        text = without_whole(text, [s for s in others if len(s) >= 4])
        for pattern, replacement in _SCRUB:
            text = pattern.sub(replacement, text)
        text = text.strip()
        return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 1] + "…"

    def _secrets(self) -> tuple[list[str], list[str]]:
        """The workspace's credentials, from the environment and the SDK's
        configuration (a profile's): its tokens, and the others."""
        tokens, others = [os.environ.get("DATABRICKS_TOKEN", "")], list[str]()
        others += [os.environ.get(name, "") for name in SECRET_ENV if name != "DATABRICKS_TOKEN"]
        others += _userinfo(os.environ.get("DATABRICKS_HOST", ""))
        config = self._client.config if self._client is not None else None
        for name in SECRET_ATTRIBUTES if config is not None else ():
            value = getattr(config, name, None)
            if isinstance(value, str):
                (tokens if name == "token" else others).append(value)
        return tokens, [s for s in others if s]


_SCRUB = (
    (USERINFO, r"\1***@"),  # a workspace host written with them: the SDK quotes its host
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+"), r"\1 ***"),
    (re.compile(r"(?i)([?&]token=)[^&\s\"'<>]+"), r"\1***"),
    (re.compile(r"\bdapi[0-9a-f]{16,}(-\d+)?\b"), "***"),
    (
        re.compile(
            r"(?i)(\"?(?:token|password|client_secret|authorization)\"?\s*[:=]\s*\"?)[^\s\"',&]+"
        ),
        r"\1***",
    ),
)


_sending = threading.local()
"""`once`: the call this worker thread runs must not be sent again by the SDK."""


class Throttled(BackendError):
    """A 429: Databricks read the request and did nothing, for now (retryable).
    Unlike a 5xx or a lost answer, no statement or run can have started."""


RETRY_AFTER_KEY = "tether_retry_after"
"""Where an error's `Retry-After` is kept, out of the SDK's sight."""
STATUS_KEY = "tether_status"
"""Where an error's HTTP status is kept (`Throttled` is a 429's alone)."""


def hand_back_throttling(client: WorkspaceClient) -> None:
    """Make 429 and 503 answers the caller's to retry, not the SDK's.

    databricks-sdk (0.162) retries any answer with a `Retry-After` (it sets
    one, 1 s, on every 429 and 503 without one) until `retry_timeout_seconds`
    run out, sleeping in between: throttling and a workspace at its limit of
    concurrent runs would stall a call unseen for that long. No setting turns
    this off, so: the error's `Retry-After` is moved where the SDK's retry
    loop does not look (`RETRY_AFTER_KEY` in the error's `kwargs`;
    `Workspace.translate` reads it back), and the loop's own test keeps only
    connection errors and timeouts. The call then fails at once with a
    retryable `BackendError` carrying `retry_after`, and Tether's retries
    (each a `trigger_failed` event) or the next status check take over.
    tests/plugins/databricks/test_big_runs.py proves it against the SDK."""
    from databricks.sdk.errors.base import DatabricksError
    from databricks.sdk.errors.customizer import _ErrorCustomizer

    class HandBack(_ErrorCustomizer):
        def customize_error(self, response: Any, kwargs: dict[str, Any]) -> None:
            seconds = kwargs.pop("retry_after_secs", None)
            if seconds is not None:
                kwargs[RETRY_AFTER_KEY] = seconds
            kwargs[STATUS_KEY] = getattr(response, "status_code", None)

    base = client.api_client._api_client
    base._error_parser._error_customizers.append(HandBack())
    sdk_test = base._is_retryable

    def connection_errors_only(err: BaseException) -> str | None:
        if getattr(_sending, "once", False) and not _never_sent(err):
            return None  # `Workspace.call(..., once=True)`
        return None if isinstance(err, DatabricksError) else sdk_test(err)

    base._is_retryable = connection_errors_only  # type: ignore[method-assign]  # see above


def _userinfo(host: str) -> list[str]:
    """A host's `user:password` and its password, as written and decoded: a
    password with a `/`, `?`, `#` or space (pasted base64) is no URL's
    userinfo to `USERINFO`, and the SDK then quotes the whole host in its
    configuration error (a review, 2026-12-06)."""
    from urllib.parse import unquote

    authority = host.partition("://")[2] or host  # (the SDK adds `https://` to a bare host)
    info = authority.rpartition("@")[0] if "@" in authority else ""
    if not info:
        return []
    password = info.partition(":")[2]
    # a short password alone is not masked: "pass" would mask "password" in Databricks' words
    alone = [p for p in (password, unquote(password)) if len(p) >= 8]
    return [s for s in {info, unquote(info), *alone} if s]


UNREADABLE_HOST = (
    "DATABRICKS_HOST holds a user and password, and where its host ends cannot be"
    " told for sure (a `/`, `?`, `#` or `\\` in them, or a character that is another"
    " once normalised), so no request is sent: take the user and password out (the"
    " SDK never signs in with them; its own credentials do)"
)
"""Why no client is built for such a host (`without_userinfo`); names none of it."""


def without_userinfo(host: str) -> str | None:
    """`host` without a `user:password@` written into its authority, or None
    when where its host ends cannot be told for sure, to which no request
    may be sent. The SDK adds `https://` to a host without a scheme, and its
    HTTP client (urllib3) and Python's `urlsplit` must agree on the host it
    names, before and after: a password with a `/`, `?` or `#` (`u:p/w@h`
    reads as host `u`, port `p`), a `\\` (urllib3 ends the authority there,
    `urlsplit` does not), a character that is another once normalised (a
    fullwidth at sign or solidus: the SDK quoted such a host whole), or an
    `@` past an authority that had userinfo. Taking the host from after the last `@`
    sent the token to one a copied URL's path named (`…/Users/alice@
    example.com`), and a `\\` to one after it (QA passes, HIGH). A host
    with no userinfo is returned as written, an `@` in its path included."""
    if "@" not in unicodedata.normalize("NFKC", host):
        return host
    full = host if "://" in host else "https://" + host
    if not full.isascii():
        return None
    seen = _destination(full)
    if seen is None:
        return None
    scheme, netloc, rest = seen
    if "@" not in netloc:
        hostport = netloc.rpartition("]")[2]
        port = hostport.rpartition(":")[2] if ":" in hostport else "0"
        return host if port.isdigit() or "@" not in rest else None
    if "@" in rest:
        return None
    hostport = netloc.rpartition("@")[2]
    bare = f"{scheme}://{hostport}{rest}"
    after = _destination(bare)
    return bare if after is not None and after[1] == hostport else None


def _destination(url: str) -> tuple[str, str, str] | None:
    """`url`'s scheme, authority and the rest, when `urlsplit` and urllib3
    read the same host and port in it; else None."""
    from urllib.parse import urlsplit

    from urllib3.util import parse_url

    try:
        split, read = urlsplit(url), parse_url(url)
        same = (split.hostname or "") == (read.host or "").strip("[]").lower()
        same = same and split.port == read.port
    except ValueError:  # (urllib3's LocationParseError is one)
        return None
    if not same or not split.hostname:
        return None
    rest = url[len(split.scheme) + 3 + len(split.netloc) :]
    return split.scheme, split.netloc, rest


def shown_host(host: str | None) -> str | None:
    """The workspace's host as Tether shows it (a log line, a run's page
    when Databricks gave none): without a `user:password@` written into it."""
    return USERINFO.sub(r"\1", host) if host else host


class HideUserinfo(logging.Filter):
    """On the SDK's loggers (`databricks.sdk`, where nearly all of its lines
    are made, and each of its children: a logger's filter sees only its own
    records, `hide_userinfo_in_sdk_logs`): a URL's `user:password@` in a line
    is written `***@`. Found by a review (2026-12-06): a host written with
    them reached the SDK's warning that its host metadata could not be
    fetched."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "@" in message and USERINFO.search(message):
            record.msg, record.args = USERINFO.sub(r"\1***@", message), ()
        return True


def hide_userinfo_in_sdk_logs() -> None:
    """`HideUserinfo` on `databricks.sdk` and each of its child loggers made
    so far (the SDK makes them as its modules are imported: called again
    once the client is built)."""
    manager = logging.Logger.manager
    names = [n for n in list(manager.loggerDict) if n.startswith("databricks.sdk.")]
    for name in ("databricks.sdk", *names):
        logger = logging.getLogger(name)
        if not any(isinstance(f, HideUserinfo) for f in logger.filters):
            logger.addFilter(HideUserinfo())


def _transient(exc: BaseException) -> bool:
    """Whether the SDK itself would have retried this answer as a passing
    fault, by its words (its `_is_retryable`: "RPC token bucket limit has
    been exceeded", "ClusterNotReadyException", "Please try again later…",
    "Unexpected error"), for a 400 alone. `hand_back_throttling` takes every
    answer out of the SDK's retries, so these are Tether's to retry (found by
    a review, 2026-12-06: sent as a 400 they failed the job at once, where
    the SDK's own client retried and succeeded). Not a 401, 403 or 404,
    though the SDK would: their words may quote what a client chose (a
    notebook path "…/Unexpected error"), which would make a refusal tried
    again and again."""
    from databricks.sdk import errors
    from databricks.sdk._base_client import _BaseClient

    if not isinstance(exc, errors.BadRequest):
        return False
    try:
        return _BaseClient._is_retryable(exc) is not None
    except Exception:  # a later SDK's test: never a reason to fail a job
        return False


def _never_sent(err: BaseException) -> bool:
    """Whether the request failed before any of it left: no connection was
    made (refused, unresolved, its connect timed out). Sending it again
    cannot repeat it."""
    import requests
    from urllib3.exceptions import NewConnectionError

    if isinstance(err, requests.exceptions.ConnectTimeout):
        return True
    if not isinstance(err, requests.exceptions.ConnectionError) or not err.args:
        return False
    return isinstance(getattr(err.args[0], "reason", None), NewConnectionError)


def _screaming(name: str) -> str:
    """`PermissionDenied` → `PERMISSION_DENIED`."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper()


@functools.cache
def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tether")
    except PackageNotFoundError:
        return "0"


# ── one-time runs: Tether's params → the SDK's `jobs.submit` arguments ────────


@functools.cache
def _submit_hints() -> dict[str, Any]:
    """The types of `jobs.submit`'s arguments (resolving them costs ~1 ms)."""
    from databricks.sdk.service.jobs import JobsAPI

    return typing.get_type_hints(JobsAPI.submit)


def submit_arguments(spec: Mapping[str, Any]) -> dict[str, Any]:
    """`jobs.submit` keyword arguments built from a one-time run spec in its JSON
    shape (as the Jobs API documents it), each value converted to its SDK type.

    The SDK's `from_dict` silently drops fields it does not know: a field lost on
    the way (a misspelt `notebook_task` key, say) raises `ValueError` naming it,
    instead of starting a run without it.
    """
    hints = _submit_hints()
    out: dict[str, Any] = {}
    for name, value in spec.items():
        if value is None:
            continue
        if name not in hints or name == "idempotency_token":
            raise ValueError(f"`submit.{name}` is not a field of a one-time run")
        converted = _to_sdk(hints[name], value, f"submit.{name}")
        lost = _lost_field(value, _to_json(converted), f"submit.{name}", converted)
        if lost:
            raise ValueError(f"unknown field `{lost}`")
        out[name] = converted
    return out


def _to_sdk(hint: Any, value: Any, path: str) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin is typing.Union and len(args) == 1:
        return _to_sdk(args[0], value, path)
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"`{path}` must be a list")
        return [_to_sdk(args[0], item, f"{path}[{i}]") for i, item in enumerate(value)]
    if isinstance(hint, type) and issubclass(hint, Enum):
        try:
            return hint(value)
        except ValueError:
            valid = ", ".join(str(m.value) for m in hint)
            raise ValueError(f"`{path}` must be one of {valid}") from None
    if isinstance(hint, type) and is_dataclass(hint):
        if not isinstance(value, dict):
            raise ValueError(f"`{path}` must be an object")
        try:
            return hint.from_dict(value)  # type: ignore[attr-defined]  # every SDK dataclass has it
        except (TypeError, ValueError, AttributeError, KeyError) as exc:
            raise ValueError(f"`{path}` does not fit the Jobs API: {exc}") from None
    return value


def _to_json(value: Any) -> Any:
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    if isinstance(value, Enum):
        return value.value
    as_dict = getattr(value, "as_dict", None)
    return as_dict() if callable(as_dict) else value


def _lost_field(given: Any, kept: Any, path: str, sdk: Any = None) -> str | None:
    """The first field of `given` missing from `kept` (its SDK object `sdk`
    as JSON). An empty value (`null`, `{}`, `[]`) the SDK leaves out on
    purpose is not lost, but `{}` or `[]` under a name the SDK's class there
    has no field of is (a misspelt `base_paramters: {}`, dropped unsaid)."""
    if isinstance(given, dict) and isinstance(kept, dict):
        names = {f.name for f in dataclasses.fields(sdk)} if _is_record(sdk) else None
        for key, value in given.items():
            inner = getattr(sdk, key, None) if names else None
            if key not in kept:
                if value is None or (value in ({}, []) and (names is None or key in names)):
                    continue
                return f"{path}.{key}"
            lost = _lost_field(value, kept[key], f"{path}.{key}", inner)
            if lost:
                return lost
    elif isinstance(given, list) and isinstance(kept, list):
        items = sdk if isinstance(sdk, list) else [None] * len(given)
        for i, (g, k, o) in enumerate(zip(given, kept, items, strict=False)):
            lost = _lost_field(g, k, f"{path}[{i}]", o)
            if lost:
                return lost
    return None


def _is_record(value: Any) -> bool:
    """Whether `value` is an SDK dataclass instance (not the class)."""
    return dataclasses.is_dataclass(value) and not isinstance(value, type)
