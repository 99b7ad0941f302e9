"""Tether's settings: one typed object read from `TETHER_*` environment variables.

Each field reads the variable named `TETHER_<FIELD>` (upper case). Backend
credentials are not here: they keep their own conventions (`DATABRICKS_HOST`,
`DATABRICKS_TOKEN`, config profiles) and never reach a log or a job record.
"""

from __future__ import annotations

import difflib
import functools
import ipaddress
import math
import os
import re
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import msgspec
import msgspec.inspect

PREFIX = "TETHER_"

HOST_NAME = re.compile(r"[A-Za-z0-9_-]{1,63}(?:\.[A-Za-z0-9_-]{1,63})*\.?")
"""A host name as `TETHER_ALLOWED_HOSTS` lists it: no port, no address."""

OTHER_KNOWN = frozenset(
    {"TETHER_URL", "TETHER_TEST_PG_DSN", "TETHER_TEST_STORES", "TETHER_TEST_WORKERS"}
)
"""`TETHER_*` variables that are not settings of the service but are expected:
the command line's own (`TETHER_URL`, the service a client command talks to)
and the test suite's (`TETHER_TEST_*`)."""

MIN_RETENTION = 86_400.0
"""The shortest `TETHER_RETENTION` (and `tether gc --older-than`): a day."""
MAX_RETENTION = 100 * 365 * 86_400.0
"""The longest: a hundred years (past it, a time in milliseconds overflows the store)."""
MAX_SECONDS = MAX_RETENTION
"""The most seconds any setting takes (a timeout, an interval, a backoff): a
`TETHER_MAX_TIMEOUT` past it let a job's deadline overflow the dates it is
read as, and every list holding the job failed (found by an exploratory QA
pass)."""
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", "[::]", ""})
"""Hosts that listen on every interface: no external system can call back to them."""


KEY_SECRET = re.compile(
    r"(?i)\b(\w*(?:password|passfile|token|secret)\w*)\s*=\s*(?:'(?:[^'\\]|\\.)*'?|\S*)"
)
"""`password=…` in a libpq key/value string (`host=h password='a b'`)."""


def describe(url: str) -> str:
    """`url` without credentials, fit for logs and errors: everything up to
    the last `@` masked (`user:password@`, whatever the password holds: a
    `/`, a `?`), the whole `?query` masked (libpq takes `?password=`), a
    `#fragment` dropped. Read as text, so a URL Python's parser refuses
    (several hosts, a broken `[`) is masked the same. Not a URL (a libpq
    `key=value` string): each secret-named key's value masked."""
    if "://" not in url:
        return KEY_SECRET.sub(r"\1=***", url)
    scheme, _, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    rest, query, _ = rest.partition("#")[0].partition("?")
    return f"{scheme}://{rest}" + ("?***" if query else "")


def _public_url_ok(url: str) -> bool:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  # a port that is not a number raises
    except ValueError:
        return False
    return (
        parts.scheme in ("http", "https")
        and bool(parts.hostname)
        and parts.port != 0
        and "@" not in parts.netloc
        and not (parts.query or parts.fragment or "?" in url or "#" in url)
        and not any(c.isspace() or ord(c) < 32 for c in url)
    )


SECRET_FIELDS = (
    "callback_secret",
    "callback_secret_previous",
    "api_token",
    "read_token",
    "notify_secret",
    "notify_secret_previous",
    "store_token",
)
"""Settings never shown: masked in `repr`, never logged."""


def listed(value: str) -> tuple[str, ...]:
    """The items of a comma-separated setting, blanks dropped."""
    return tuple(item for item in (part.strip() for part in value.split(",")) if item)


def unsendable(token: str, *, ascii_only: bool = True) -> bool:
    """Whether `token` holds a control character (a line break, pasted with
    it), which no HTTP header carries, or (`ascii_only`) a character past
    ASCII, which a bearer client cannot send as it is: a client could not
    send it."""
    return any(
        ord(char) < 32 or ord(char) == 127 or (ascii_only and ord(char) > 127) for char in token
    )


MAX_RUNNING_MOST = 1_000_000
"""The largest limit `TETHER_MAX_RUNNING` takes for a backend (a backend left
out has none). 2**63 or more was taken, then failed every job end of its
backend in the store, and the start-up with jobs queued (a QA pass,
2026-12-07)."""


def limits_of(value: str) -> dict[str, int]:
    """`TETHER_MAX_RUNNING`'s `backend=N,...` as a dict; `ValueError` naming
    the item that is not `name=N` with N a whole number from 1 to
    `MAX_RUNNING_MOST`."""
    limits: dict[str, int] = {}
    for item in listed(value):
        name, sep, number = (part.strip() for part in item.partition("="))
        whole = number.isascii() and number.isdigit() and len(number) <= 12  # (before `int`)
        if not (sep and name and whole and 1 <= int(number) <= MAX_RUNNING_MOST):
            raise ValueError(
                f"invalid setting TETHER_MAX_RUNNING: {item!r} is not backend=N"
                f" (N a whole number from 1 to {MAX_RUNNING_MOST:,}; leave a backend out"
                " for no limit)"
            )
        if name in limits:
            raise ValueError(f"invalid setting TETHER_MAX_RUNNING: {name!r} is named twice")
        limits[name] = int(number)
    return limits


GROUP = re.compile(r"(?=.*\S)[^/@\x00-\x1f\x7f]+")
"""What `TETHER_GROUP` may be (fullmatch): a Resonate group is part of
addresses (`poll://any@{group}`) and of the poll path (`/poll/{group}/{pid}`),
so no `/` or `@` (the embedded store refused them with a traceback), no
control character, not empty or blank. Nothing more is refused: a store's
group cannot change while jobs are in flight, so a rule stricter than
earlier releases' would strand a deployment's jobs at its upgrade."""


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    store: str = "sqlite:///.tether/tether.db"
    """Durable store URL: `sqlite:///PATH` (default, embedded), `memory://`
    (tests and demos: the embedded store on a temporary file, deleted when the
    service stops), `postgresql://...` (resonate-pg), `http(s)://HOST:PORT` (a
    Resonate server; needs `index`)."""

    index: str = ""
    """Where the job index lives when `store` is a Resonate server (required
    then, refused with any other store): `sqlite:///PATH` (one host) or
    `postgresql://...` (several hosts)."""

    store_token: str = ""
    """Bearer token Tether presents to a Resonate server store (`Authorization:
    Bearer`, on requests and on the message stream). Empty: none."""

    host: str = "127.0.0.1"
    """Interface `tether serve` listens on."""

    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8000
    """Port `tether serve` listens on."""

    public_url: str = ""
    """Base of the callback URLs handed to external systems; must be reachable
    from them. Empty means `http://{host}:{port}`."""

    callback_secret: str = ""
    """Key of the HMAC that signs callback URLs. Empty: on the embedded store one
    is generated once and kept beside the database (on `memory://`, beside its
    temporary file, so per process); other stores refuse to start without it."""

    callback_secret_previous: str = ""
    """Earlier callback secrets, comma-separated, during a rotation: callback
    URLs signed with any of them are still accepted, new ones are signed with
    `callback_secret` (docs/operations.md). On the embedded store,
    `tether rotate-secret` keeps them in the secret file instead."""

    api_token: str = ""
    """When set, `/jobs*` require `Authorization: Bearer <token>`. Several
    tokens, comma-separated, are all accepted (to replace one without
    downtime)."""

    read_token: str = ""
    """Tokens, comma-separated, that may read jobs, their history, `/metrics`
    and the dashboard but change nothing. Needs `api_token`."""

    wrong_tokens_per_minute: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = 30
    """Wrong API or read tokens (bearer, or at the dashboard's sign-in) a
    client address (an IPv6 one by its /64) may give in a minute, in each
    worker process; past it, any token it gives is 429 unread for up to a
    minute. 0: no limit. Behind a proxy every client has the proxy's
    address, unless `trusted_proxies` names it."""

    trusted_proxies: str = ""
    """Addresses or networks (comma-separated: `10.0.0.5,10.1.0.0/16`) of
    proxies whose `X-Forwarded-For` and `X-Forwarded-Proto` are believed: a
    request from one of them is counted (`wrong_tokens_per_minute`) and
    logged as from the client the header names. Empty: no header is
    believed, every request is from the address it came from."""

    allowed_hosts: str = ""
    """Without `api_token`: host names (comma-separated, `*` for any) the
    service answers at besides an IP address, `localhost` and
    `public_url`'s host (`api.auth.known_hosts_guard`: DNS rebinding).
    Unused with tokens."""

    max_body_bytes: Annotated[int, msgspec.Meta(ge=1)] = 1_048_576
    """Requests with a larger body are refused with 413."""

    max_result_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 1_048_576
    """Bytes of JSON a job's `result` (and its `error.message`) may take,
    however it came: a callback or a backend's status check, of any backend.
    A larger result is stored cut, as `{"truncated": true, "bytes": N,
    "sha256": ..., "preview": ...}` (docs/operations.md); never whole. At
    least 1024."""

    default_timeout: Annotated[float, msgspec.Meta(gt=0)] = 7 * 24 * 3600.0
    """Seconds a job waits for its callback when the request names no `timeout`."""

    max_timeout: Annotated[float, msgspec.Meta(gt=0)] = 366 * 24 * 3600.0
    """Largest `timeout` a request may ask for, in seconds."""

    trigger_attempts: Annotated[int, msgspec.Meta(ge=0)] = 4
    """How many times a trigger that failed with a retryable error is tried."""

    trigger_backoff: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    """Seconds before the second trigger attempt; doubles for each later one."""

    watchdog_interval: Annotated[float, msgspec.Meta(ge=0)] = 10.0
    """Seconds at most between one process's looks at the store for jobs due
    (past their timeout, due a status check, a heartbeat overdue) and
    notifications due that other processes or hosts wrote; what this process
    writes it handles on time. 0 turns the watchdog off."""

    task_ttl: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    """Seconds a worker's lease on a running workflow step lasts; the worker
    renews it every half of that while alive. After a crash, another worker
    takes the step over within this time. Also the lease on the stop of the
    run of a job no workflow finishes (`core.lease`, renewed every third)."""

    max_concurrent_tasks: Annotated[int, msgspec.Meta(ge=1)] = 64
    """Workflow steps (triggers, finishes) one process runs at once; past it,
    new work waits in the store while reads and callbacks are still answered."""

    retention: float = 0.0
    """Seconds a finished job is kept; older ones are deleted with their
    promises by the watchdog (hourly) and by `tether gc`. 0 keeps them forever.
    At least a day when set: within it, a duplicate start still reattaches."""

    group: str = "tether"
    """Resonate group the service's workers join; processes sharing a store and a
    group share the work."""

    log_level: str = "INFO"
    """Python logging level of the service: one of `LOG_LEVELS`, in any case."""

    log_format: Literal["text", "json"] = "text"
    """`text`: readable lines; `json`: one JSON object per line (`ts`,
    `level`, `logger`, `msg`, and `job_id`, `promise_id`, `backend` where they
    apply), for log collectors."""

    access_log: bool = True
    """One log line per request (`tether.access`): method, path without the
    query string (callback tokens travel there), status, milliseconds, the
    client's address. `0` turns it off."""

    max_running: str = ""
    """Per-backend limits, `databricks=20,http_webhook=200`: at most that many
    jobs of the backend triggered and not yet finished, across every process
    sharing the store; more wait `queued`, first come first served
    (docs/lifecycle.md). Backends not named have no limit."""

    notify_secret: str = ""
    """Key that signs completion notifications (Standard Webhooks,
    `whsec_<base64>`). Empty: on the embedded store one is generated once and
    kept beside the database (`tether notify-secret` prints it); other stores
    refuse jobs asking for notifications without it."""

    notify_secret_previous: str = ""
    """Earlier notification secrets, comma-separated, during a rotation: each
    message is signed with `notify_secret` and with each of these too (one
    `webhook-signature` entry per secret, current first), so receivers that
    know any of them verify it (docs/operations.md, "Changing the secret").
    Each is checked as `notify_secret` is. On the embedded store,
    `tether rotate-notify-secret` keeps them in the secret file instead."""

    notify_retry_for: Annotated[float, msgspec.Meta(ge=0)] = 86400.0
    """Seconds a completion notification is retried after the job ended
    before it is given up (`notify_failed`)."""

    notify_backoff: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    """Seconds before the second try of a notification; doubles for each
    later one, up to an hour."""

    readiness_interval: Annotated[float, msgspec.Meta(gt=0)] = 300.0
    """Seconds between background checks of each backend's readiness (shown
    in `GET /health`); the first runs in the background at the first `GET
    /health` or 10 s after start-up, whichever comes first."""

    def __post_init__(self) -> None:
        limits_of(self.max_running)  # refuse a malformed limit at start-up
        for name in self.__struct_fields__:  # the types refuse NaN and what is out of range
            value = getattr(self, name)
            if isinstance(value, float) and math.isinf(value):
                raise ValueError(
                    f"invalid setting {PREFIX}{name.upper()}: {value}; use a finite number"
                )
            if isinstance(value, float) and value > MAX_SECONDS and name != "retention":
                # (each float is seconds; the retention's check below says more)
                raise ValueError(
                    f"invalid setting {PREFIX}{name.upper()}: {value:g}; at most"
                    f" {MAX_SECONDS:g} seconds (a hundred years: past it, a time in"
                    " milliseconds overflows the store)"
                )
        if self.default_timeout > self.max_timeout:
            raise ValueError(
                f"invalid settings: TETHER_DEFAULT_TIMEOUT ({self.default_timeout:g} s) is more"
                f" than TETHER_MAX_TIMEOUT ({self.max_timeout:g} s); every job that names no"
                " timeout would be refused"
            )
        if self.retention and not MIN_RETENTION <= self.retention <= MAX_RETENTION:  # NaN too
            raise ValueError(
                f"invalid setting TETHER_RETENTION: {self.retention:g}; keep finished jobs at"
                f" least {MIN_RETENTION:g} seconds (a day: within it, a duplicate start still"
                f" reattaches) and at most {MAX_RETENTION:g} (a hundred years), or 0 to keep"
                " them forever"
            )
        if self.public_url and not _public_url_ok(self.public_url):
            raise ValueError(
                f"invalid setting TETHER_PUBLIC_URL: {describe(self.public_url)!r}; use the URL"
                " external systems reach this service at: http(s)://HOST[:PORT][/PATH] (PORT"
                " 1-65535), with no user:password@, ?query or #fragment"
            )
        if unsendable(self.store_token, ascii_only=False):  # never the value
            raise ValueError(
                "invalid setting TETHER_STORE_TOKEN: it holds a control character (a line"
                " break?), which no HTTP header can carry; set the token alone"
            )
        for name, value in (
            ("TETHER_API_TOKEN", self.api_token),
            ("TETHER_READ_TOKEN", self.read_token),
        ):
            if any(unsendable(token) for token in listed(value)):  # (each stripped)
                raise ValueError(
                    f"invalid setting {name}: a token holds a control character (a line"
                    " break?) or one past ASCII, which clients cannot send in an"
                    " Authorization header (the dashboard's sign-in could, the API not);"
                    " use printable ASCII"
                )
        for name in listed(self.allowed_hosts):
            if name != "*" and not HOST_NAME.fullmatch(name):
                raise ValueError(
                    f"invalid setting TETHER_ALLOWED_HOSTS: {name[:64]!r} is not a host name"
                    " (dot-separated labels of A-Z a-z 0-9 _ -, no port), nor `*`; list them"
                    " comma-separated"
                )
        for proxy in listed(self.trusted_proxies):
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ValueError(
                    f"invalid setting TETHER_TRUSTED_PROXIES: {proxy!r} is neither an IP"
                    " address nor a network (10.0.0.5, 10.1.0.0/16, fd00::/8); list them"
                    " comma-separated"
                ) from None
        if not GROUP.fullmatch(self.group):
            raise ValueError(
                f"invalid setting TETHER_GROUP: {self.group!r}; give a name without '/', '@'"
                " or control characters (every host on one store the same)"
            )
        if self.log_level.upper() not in LOG_LEVELS:
            raise ValueError(
                f"invalid setting TETHER_LOG_LEVEL: {self.log_level!r}; use one of"
                f" {', '.join(LOG_LEVELS)} (in any case)"
            )

    @property
    def limits(self) -> dict[str, int]:
        """`max_running` read: each limited backend's slots."""
        return limits_of(self.max_running)

    @property
    def shared(self) -> bool:
        """Whether other hosts may serve this store's jobs: a Postgres store,
        or a Resonate server with its job index in Postgres."""
        return any(url.startswith(("postgresql:", "postgres:")) for url in (self.store, self.index))

    @property
    def base_url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")

    def __repr__(self) -> str:
        """Every field, with the secrets masked (settings get logged and printed)."""
        shown = {f: getattr(self, f) for f in self.__struct_fields__}
        shown["store"] = describe(self.store)
        shown["index"] = describe(self.index)
        for secret in SECRET_FIELDS:
            shown[secret] = "***" if shown[secret] else ""
        return "Settings(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read `TETHER_*` variables from `env` (default `os.environ`); `overrides`
        (command-line flags) win over them."""
        return from_env(cls, PREFIX, env, **overrides)


NOT_READ = {
    "Expected `int`, got `str`": "not a whole number",
    "Expected `float`, got `str`": "not a number",
    "Expected `bool`, got `str`": "not 0, 1, true or false",
}
"""msgspec's words for a variable it could not read as its field's type
(an environment variable is always a string), and what is said instead."""


def from_env[S: msgspec.Struct](
    cls: type[S], prefix: str, env: Mapping[str, str] | None = None, **overrides: Any
) -> S:
    """A settings Struct read from environment variables: each field `name`
    from `{prefix}{NAME}` in `env` (default `os.environ`), converted to the
    field's type; `overrides` win over the environment.

    A value that does not fit its field raises `ValueError` naming the
    variable, not its value (it may be a secret). Plugins read their own
    settings with it (`core.plugin.settings_from_env`).
    """
    env = os.environ if env is None else env
    types = _field_types(cls)
    raw: dict[str, Any] = {}
    for name in cls.__struct_fields__:
        value = env.get(prefix + name.upper())
        if value is None:
            continue
        kind = types[name]
        if isinstance(kind, msgspec.inspect.IntType) and not WHOLE.fullmatch(value):
            # msgspec reads `1e3` and `8000.0` as whole numbers (TETHER_PORT=1e3
            # listened on port 1000: an exploratory QA pass)
            raise ValueError(f"invalid setting {prefix}{name.upper()}: not a whole number")
        if isinstance(kind, msgspec.inspect.FloatType) and not _finite(value):
            # `nan` and `-inf` were said to be out of range (a QA pass, 2026-12-06)
            raise ValueError(f"invalid setting {prefix}{name.upper()}: not a finite number")
        if isinstance(kind, msgspec.inspect.LiteralType) and all(
            isinstance(v, str) and v == v.lower() for v in kind.values
        ):
            value = value.lower()  # `TETHER_LOG_FORMAT=JSON`, as TETHER_LOG_LEVEL takes any case
        raw[name] = value
    raw.update(overrides)
    try:
        return msgspec.convert(raw, cls, strict=False)
    except msgspec.ValidationError as exc:
        if "$." not in str(exc):  # raised by the Struct's own check, which names it
            raise ValueError(str(exc)) from None
        field = str(exc).rsplit("$.", 1)[-1].rstrip("`")
        said = str(exc).split(" - ")[0]
        said = NOT_READ.get(said, said)  # every variable's value is a string
        kind = types.get(field)
        if isinstance(kind, msgspec.inspect.LiteralType):  # (not msgspec's "Invalid enum value")
            said = f"not one of {', '.join(map(str, kind.values))}"
        elif (bound := BOUND.fullmatch(said)) is not None:
            whole = "a whole number" if bound[1] == "int" else "a number"
            said = f"must be {whole} {bound[2]} {float(bound[3]):g}"
        raise ValueError(f"invalid setting {prefix}{field.upper()}: {said}") from None


WHOLE = re.compile(r"\s*[+-]?[0-9]+\s*")
"""A whole-number setting as written: decimal digits only."""


def _finite(value: str) -> bool:
    """Whether a number setting as written is finite, or no number at all
    (which msgspec then names)."""
    try:
        return math.isfinite(float(value))
    except ValueError:
        return True


BOUND = re.compile(r"Expected `(int|float)` ([<>]=?) (\S+)")
"""msgspec's words for a number out of its field's range."""


@functools.cache
def _field_types(cls: type[msgspec.Struct]) -> dict[str, Any]:
    """Each field's type as `msgspec.inspect` describes it."""
    info = msgspec.inspect.type_info(cls)
    assert isinstance(info, msgspec.inspect.StructType)
    return {field.name: field.type for field in info.fields}


SECRET = msgspec.Meta(extra={"secret": True})
"""The mark of a settings field whose variable holds a secret: a plugin
writes `password: core.plugin.Secret = ""` (`Annotated[str, SECRET]`).
Tether then masks the variable's value wherever it stands whole in what it
logs, keeps or reports (`core.redact.environment_secrets`), whatever the
variable is called, when it is at least `core.redact.ENV_SECRET_MIN` (8)
characters long; a name that ends as a secret's (`_TOKEN`, `_PASSWORD`,
...) is masked without the mark. Declared through a backend's
`settings_type`: a plugin with hooks alone marks none."""

type Secret = Annotated[str, SECRET]
"""A settings field holding a secret (`SECRET`)."""


def secret_env_names(cls: type[msgspec.Struct], prefix: str) -> set[str]:
    """The variables of `cls`'s fields marked `SECRET`."""
    return {
        prefix + name.upper() for name, kind in _field_types(cls).items() if _marked_secret(kind)
    }


def _marked_secret(kind: Any) -> bool:
    if isinstance(kind, msgspec.inspect.Metadata):
        return bool((kind.extra or {}).get("secret")) or _marked_secret(kind.type)
    if isinstance(kind, msgspec.inspect.UnionType):  # `Secret | None`
        return any(_marked_secret(member) for member in kind.types)
    return False


def env_names(cls: type[msgspec.Struct], prefix: str) -> set[str]:
    """The variables `from_env(cls, prefix)` reads."""
    return {prefix + name.upper() for name in cls.__struct_fields__}


def unknown_env(
    known: Iterable[str], env: Mapping[str, str] | None = None
) -> list[tuple[str, str | None]]:
    """Each `TETHER_*` variable in `env` (default `os.environ`) that is not in
    `known`, with the closest known name (or None): a misspelt setting would
    otherwise be ignored without a word. Every setting's name is upper case
    (a webhook credential's NAME too): one that is not is given upper-cased,
    known or not. Names only, never values."""
    env = os.environ if env is None else env
    known = set(known)
    # Compared without the prefix every name shares, which would make any two alike.
    tails = {name.removeprefix(PREFIX): name for name in known}

    def closest(name: str) -> str | None:
        if name != name.upper():
            return name.upper()
        found = difflib.get_close_matches(name.removeprefix(PREFIX), tails, n=1, cutoff=0.6)
        return tails[found[0]] if found else None

    return [
        (name, closest(name))
        for name in sorted(env)
        if name.startswith(PREFIX) and name not in known
    ]


@functools.cache
def get_settings() -> Settings:
    """The process's settings, read once from the environment."""
    return Settings.from_env()
