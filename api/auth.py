"""Who may do what: API and read tokens (`TETHER_API_TOKEN`,
`TETHER_READ_TOKEN`) as bearer tokens, and the dashboard's session cookies a
token is traded for. The API's guard (`api_token_guard`) and the dashboard's
sign-in (`api.ui`) both take their answers from here.

Tokens are compared as SHA-256 digests, every configured one each time, so the
time taken tells neither which token matched nor how long any is. An address
that gives too many wrong ones is refused for a while (`WrongTokens`).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import ipaddress
import logging
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, Literal
from urllib.parse import urlsplit

import msgspec
from litestar.connection import ASGIConnection
from litestar.exceptions import (
    NotAuthorizedException,
    PermissionDeniedException,
    TooManyRequestsException,
)
from litestar.handlers import BaseRouteHandler
from litestar.types import ASGIApp, Receive, Scope, Send

from core.errors import SHOWN_MAX, escaped
from core.settings import Settings, listed

Guard = Callable[[ASGIConnection[Any, Any, Any, Any], BaseRouteHandler], Awaitable[None]]

log = logging.getLogger("tether.api")

WRONG_SLICE = 10.0
"""Seconds of each slice `WrongTokens` counts in: six make its minute."""
WRONG_SLICES = 6
ADDRESSES_KEPT = 10_000
"""Addresses `WrongTokens` remembers at most (those heard from longest ago
are forgotten first): its memory is bounded whoever calls, each address
taking six counts whatever the limit."""


class _Wrong:
    """An address's wrong tokens: a count for each of the last
    `WRONG_SLICES` slices of `WRONG_SLICE` seconds (by slice number modulo
    their number), the newest counted, and whether the address was said to
    have reached the limit since it last had none counted."""

    __slots__ = ("counts", "newest", "warned")

    def __init__(self, now: int) -> None:
        self.counts = [0] * WRONG_SLICES
        self.newest = now
        self.warned = False

    def total(self, now: int) -> int:
        """The wrong tokens of the slices still counted at slice `now`."""
        for gone in range(self.newest + 1, min(now, self.newest + WRONG_SLICES) + 1):
            self.counts[gone % WRONG_SLICES] = 0
        self.newest = max(self.newest, now)
        return sum(self.counts)


class WrongTokens:
    """Wrong tokens, bearer or signed in with, from each client address (an
    IPv6 one by its /64: `address_of`) over the last minute, counted in six
    slices of ten seconds. An address that gave `limit` of them gets 429 for
    any token it gives, unread (`wait`), until enough slices have passed: a
    right token too, or the limit would slow no guessing. A session cookie
    is not a token given (its MAC is checked, and no one guesses it), so a
    signed-in dashboard goes on. Counted in each worker process; `limit` 0
    counts nothing."""

    def __init__(self, limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self._clock = clock
        self._wrong: OrderedDict[str, _Wrong] = OrderedDict()

    def _slice(self) -> tuple[float, int]:
        now = self._clock()
        return now, int(now // WRONG_SLICE)

    def _counted(self, address: str, at: int) -> tuple[_Wrong | None, int]:
        """The address's counts at slice `at` and their total; None (and
        forgotten) once none is left."""
        wrong = self._wrong.get(address)
        total = 0 if wrong is None else wrong.total(at)
        if wrong is not None and not total:
            del self._wrong[address]
            return None, 0
        return wrong, total

    def wait(self, connection: ASGIConnection[Any, Any, Any, Any]) -> int:
        """Seconds until a token from the request's address is read again
        (0: now). Nothing is looked up while no address has a wrong token
        counted: the common case costs one test. Addresses with none left
        are forgotten, those quiet longest first."""
        if not self._wrong:
            return 0
        now, at = self._slice()
        while self._wrong and not next(iter(self._wrong.values())).total(at):
            self._wrong.popitem(last=False)  # the longest quiet: those with none left go
        wrong, left = self._counted(address_of(connection), at) if self._wrong else (None, 0)
        if wrong is None or left < self.limit:
            return 0
        for oldest in range(at - WRONG_SLICES + 1, at + 1):  # the oldest slice first
            left -= wrong.counts[oldest % WRONG_SLICES]
            if left < self.limit:  # counted no more from its slice's end a minute on
                return max(math.ceil((oldest + WRONG_SLICES) * WRONG_SLICE - now), 1)
        raise AssertionError("a limit of at least 1 is reached before no count is left")

    def check(self, connection: ASGIConnection[Any, Any, Any, Any]) -> None:
        """Refuse (429, `Retry-After`) a token from an address that gave
        too many wrong ones; before the token is compared."""
        wait = self.wait(connection)
        if wait:
            raise TooManyRequestsException(
                f"{self.limit} wrong tokens from this address (yours or another client's"
                f" at the same address) in the last minute: no token from it is read for"
                f" {wait} s more",
                headers={"Retry-After": str(wait)},
            )

    def wrong(self, connection: ASGIConnection[Any, Any, Any, Any]) -> None:
        """Count a wrong token from the request's address; say once, as the
        address reaches the limit, that its tokens are refused (once until
        it has had none counted for a minute: a client that goes on guessing
        at the limit is not said again at each guess)."""
        if not self.limit:
            return
        address = address_of(connection)
        _, at = self._slice()
        wrong, _ = self._counted(address, at)
        if wrong is None:
            wrong = self._wrong[address] = _Wrong(at)
            if len(self._wrong) > ADDRESSES_KEPT:
                self._wrong.popitem(last=False)
        self._wrong.move_to_end(address)
        wrong.counts[at % WRONG_SLICES] += 1
        if not wrong.warned and wrong.total(at) >= self.limit:
            wrong.warned = True
            log.warning(
                "%d wrong API tokens from %s in a minute: its tokens are refused (429) until"
                " it gave fewer in the last minute (TETHER_WRONG_TOKENS_PER_MINUTE)",
                self.limit,
                address,
            )


def address_of(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    """The address the request came from as `WrongTokens` counts it: a
    proxy's unless `TETHER_TRUSTED_PROXIES` names it; an IPv6 address by
    its /64 (a client often has a whole one), an IPv4 one mapped into IPv6
    as itself; what is no IP address (a Unix socket) as one address."""
    client = connection.scope.get("client")
    try:
        ip = ipaddress.ip_address(client[0] if client else "")
    except ValueError:
        return "(no IP address)"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def guarding(*guards: Guard) -> Callable[[ASGIApp], ASGIApp]:
    """Route middleware (a router's or a handler's `middleware=`) that runs
    `guards` in order, before the route's handler, as Litestar's `guards=`
    would: what one raises is answered by the app's exception handlers, and
    middleware of every layer adds up, so a handler's own cannot drop its
    router's. Cheaper than `guards=`: Litestar copies the route handler for
    every guard of every request (`authorize_connection`, ~9 µs a copy)."""

    def middleware(app: ASGIApp) -> ASGIApp:
        async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
            # Every scope a route sees (HTTP, and a websocket route's too).
            connection: ASGIConnection[Any, Any, Any, Any] = ASGIConnection(scope, receive, send)
            handler = scope["route_handler"]
            for guard in guards:
                await guard(connection, handler)
            await app(scope, receive, send)

        return guarded

    return middleware


Access = Literal["read", "write"]

READ: dict[str, Access] = {"access": "read"}
"""`opt=READ` on a GET route behind `api_token_guard`: a read token
(`TETHER_READ_TOKEN`) may use it. Every other route behind the guard needs an
API token, so a route that forgets to say what it is stays closed to read
tokens. Reads (`/jobs/{id}/events`, `/metrics`) go on the guarded router and
declare `opt=READ`; the dashboard (`api.ui`) signs people in itself."""

READ_METHODS = frozenset({"GET", "HEAD"})
"""A read token is refused on any other method, whatever the route declares."""


def api_token_guard(settings: Settings, sessions: Sessions | None = None) -> Guard:
    """When TETHER_API_TOKEN is set, the routes behind this guard need
    `Authorization: Bearer <token>`, or the dashboard's session cookie
    (`Sessions`, which a token was traded for): any API token, or a
    read token on a route declared `opt=READ` and reached with GET. None or a
    wrong one is 401; a read token anywhere else is 403, naming what it would
    need. A bearer token, when given, is what counts, cookie or not."""
    api, read = digests(settings.api_token), digests(settings.read_token)
    public = public_host(settings)

    async def require_api_token(  # async: Litestar runs a sync guard in a thread
        connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
    ) -> None:
        method = connection.scope.get("method", "")
        if not api:
            # Every route open: a page of another site must not change jobs. (With
            # tokens, a bearer token no page holds, or the session's SameSite
            # cookie and its CSRF header, stop it already.)
            if method not in READ_METHODS and another_sites(connection, public):
                raise PermissionDeniedException(
                    f"a change asked by a page of another site ({CROSS_SITE_WHY}) is"
                    " refused: without TETHER_API_TOKEN, a web page's script may not start,"
                    " cancel or retry jobs; call the API from a program, or from the dashboard"
                )
            return
        given = bearer(connection)
        if given is None:
            writes, reads = session_access(connection, sessions)
        else:
            if sessions is not None:
                sessions.wrong.check(connection)
            digest = token_digest(given)
            # Both lists in full, whatever matched: the time taken tells nothing
            # about which token matched, or how far along the list it is.
            writes, reads = matches(digest, api), matches(digest, read)
        if writes:
            return
        if not reads:
            if given is not None and sessions is not None:
                sessions.wrong.wrong(connection)
            raise NotAuthorizedException("missing or invalid API token")
        method = connection.scope.get("method", "")
        if handler.opt.get("access") != "read" or method not in READ_METHODS:
            tried = escaped(f"{method} {connection.url.path}")  # echoed back: escaped, cut
            tried = tried if len(tried) <= SHOWN_MAX else f"{tried[:SHOWN_MAX]}…"
            raise PermissionDeniedException(
                f"this token may only read; {tried} needs the API token (TETHER_API_TOKEN)"
            )

    return require_api_token


CROSS_SITE_WHY = "its browser says so in Sec-Fetch-Site or Origin"


def public_host(settings: Settings) -> str:
    """TETHER_PUBLIC_URL's host and port (`another_sites`' `public`)."""
    return urlsplit(settings.public_url).netloc.lower() if settings.public_url else ""


def another_sites(connection: ASGIConnection[Any, Any, Any, Any], public: str = "") -> bool:
    """Whether a browser says a page of another origin made this request:
    `Sec-Fetch-Site` other than `same-origin` (or `none`: typed by its user),
    or, where it sends none (a plain-http address other than localhost, an
    older browser), an `Origin` whose host is neither the request's `Host`,
    nor `X-Forwarded-Host` (a proxy that rewrites `Host`), nor `public`'s
    (TETHER_PUBLIC_URL's host and port). A program (curl, the CLI, an SDK)
    sends neither header. Without an API token every route is open, and a
    page anyone opens in a browser on the service's host could start, cancel
    and retry jobs by a POST no CORS preflight stops (found by an
    exploratory QA pass of the dashboard)."""
    headers = connection.headers
    fetched = headers.get("sec-fetch-site")
    if fetched is not None:
        return fetched.lower() not in ("same-origin", "none")
    origin = headers.get("origin")
    if origin is None:
        return False
    ours = {headers.get("host", "").lower(), headers.get("x-forwarded-host", "").lower(), public}
    return origin.lower().partition("://")[2] not in ours - {""}


def known_hosts_guard(settings: Settings) -> Guard | None:
    """Without TETHER_API_TOKEN (every route open): a request for a host the
    service is not known by is 403, whoever sends it. Known: an IP address,
    `localhost` and its subdomains (browsers resolve them to loopback
    themselves), TETHER_PUBLIC_URL's host, and TETHER_ALLOWED_HOSTS (`*`:
    any). A page of a site whose name is made to lead here (DNS rebinding)
    is the same origin to the browser: it could read, start, cancel and
    retry every job (found by a QA pass of the dashboard, 2026-12-07). It
    cannot be told from a program by its headers (a browser sends no
    `Sec-Fetch-Site` to a plain-http name, and no `Origin` with a GET: a
    review found the first version, which looked for them, let every read
    through). `X-Forwarded-Host` must name a known host too: a proxy that
    sends its upstream's address as `Host` passes the client's there.
    Callbacks and heartbeats (their own token), a backend's notifications
    (its plugin authenticates them) and `/health` (probes, often by a
    name of the platform's) are not checked. With tokens, such a page holds
    no token and the session cookie is the real host's: `None`, no guard."""
    if listed(settings.api_token):
        return None
    allowed = {_bare(name) for name in listed(settings.allowed_hosts)}
    if "*" in allowed:
        return None
    if settings.public_url:
        allowed.add(_bare(urlsplit(settings.public_url).hostname or ""))

    @functools.lru_cache(maxsize=256)  # a few names come again and again
    def known(given: str) -> bool:
        try:
            host = urlsplit(f"//{given.strip()}").hostname
        except ValueError:
            return False
        return host is not None and ((bare := _bare(host)) in allowed or _local_name(bare))

    async def known_host(
        connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
    ) -> None:
        if connection.scope["path"].startswith(UNCHECKED_PATHS):
            return
        headers = connection.headers
        forwarded = headers.get("x-forwarded-host")
        named = [headers.get("host", ""), *(forwarded.split(",") if forwarded else ())]
        unknown = next((given for given in named if not known(given)), None)
        if unknown is None:
            return
        shown = escaped(unknown.strip())
        shown = shown if len(shown) <= SHOWN_MAX else f"{shown[:SHOWN_MAX]}…"
        raise PermissionDeniedException(
            f"a request for host {shown!r} is refused: without TETHER_API_TOKEN the service"
            " answers only at an IP address, localhost, TETHER_PUBLIC_URL's host and"
            " TETHER_ALLOWED_HOSTS, so that a web page of a site whose name leads here cannot"
            " read or change jobs; use one of those, list this name in TETHER_ALLOWED_HOSTS,"
            " or set TETHER_API_TOKEN"
        )

    return known_host


UNCHECKED_PATHS = ("/callbacks/", "/backends/", "/health")
"""What `known_hosts_guard` lets through at any host: what carries its own
authentication, and the probes' route."""


def _bare(host: str) -> str:
    """A host name as compared: lower case, without a last dot."""
    return host.lower().removesuffix(".")


def _local_name(host: str) -> bool:
    """An IP address, or `localhost` and its subdomains."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def session_access(
    connection: ASGIConnection[Any, Any, Any, Any], sessions: Sessions | None
) -> tuple[bool, bool]:
    """(may write, may read) by the dashboard's session cookie; neither
    without a valid one. A request that is not a read must also carry the
    session's CSRF token in `X-CSRF-Token` (a page of another site can make
    the browser send the cookie, never that header): else 403."""
    session = sessions.read(connection) if sessions is not None else None
    if session is None or sessions is None:
        return False, False
    connection.scope["state"][SESSION_ENDS] = session.expires
    method = connection.scope.get("method", "")
    if method not in READ_METHODS and not sessions.csrf_ok(
        connection.headers.get(CSRF_HEADER, ""), session
    ):
        raise PermissionDeniedException(
            "missing or wrong X-CSRF-Token: a request with the dashboard's session cookie"
            " that changes something must carry the CSRF token of its page"
        )
    return session.kind == "api", session.kind == "read"


SESSION_ENDS = "tether_session_ends"
"""Where `session_access` leaves, in the request's scope state, when the
session a request came with ends (Unix seconds)."""


def session_ends(connection: ASGIConnection[Any, Any, Any, Any]) -> float | None:
    """When the session a request was let in with ends; None when it came
    with a bearer token, or the service has no tokens. A stream opened with
    the cookie ends then (`GET /jobs` and `GET /jobs/{id}/events`): read once
    at the opening, so it costs the stream nothing after. A page left open
    past its session's end went on receiving every job change, saying
    "live", until the service stopped (found by an exploratory QA pass of
    the dashboard)."""
    ends = connection.scope["state"].get(SESSION_ENDS)
    return float(ends) if ends is not None else None


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def digests(setting: str) -> tuple[bytes, ...]:
    """The SHA-256 of each token of a comma-separated setting: compared as
    digests, tokens of different lengths take the same time to refuse."""
    return tuple(token_digest(token) for token in listed(setting))


def matches(digest: bytes, tokens: tuple[bytes, ...]) -> bool:
    """Whether `digest` is one of `tokens`, each compared in constant time and
    none skipped once one matched."""
    found = False
    for token in tokens:
        found |= hmac.compare_digest(digest, token)
    return found


def bearer(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, if there is one."""
    scheme, _, given = connection.headers.get("authorization", "").partition(" ")
    return given if scheme.lower() == "bearer" else None


# ── dashboard sessions ───────────────────────────────────────────────────────

SESSION_COOKIE = "tether_session"
SESSION_TTL = 12 * 3600
"""Seconds a sign-in lasts."""
SESSION_LABEL = b"tether-ui-session"
"""The session key is HMAC(callback secret, this label): the same in every
worker and after a restart, and never a key that signs callback URLs."""
CSRF_HEADER = "x-csrf-token"
"""Where a change made with the session cookie carries its CSRF token."""


class Session(msgspec.Struct, frozen=True):
    """What the session cookie holds, signed: never the token itself."""

    kind: Literal["api", "read"]
    """Signed in with an API token (may change jobs) or a read token."""
    token: str
    """A keyed digest naming the token signed in with: the session ends when
    that token leaves the settings."""
    expires: int
    """Unix seconds."""
    nonce: str
    """Random per sign-in: the session's CSRF token is derived from it."""


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Sessions:
    """Signed, stateless session cookies for the dashboard: `kind`, `expires`
    and a digest naming the token, under a key derived from the store's
    callback secret (`SESSION_LABEL`), so every worker and every restart
    accepts them; rotating the callback secret signs everyone out."""

    def __init__(self, settings: Settings, secret: Callable[[], str]) -> None:
        self.required = bool(listed(settings.api_token))
        """Whether the service has tokens at all (else every route is open)."""
        self.secure = settings.base_url.startswith("https:")
        self.public = public_host(settings)
        """The service's own host and port as clients know it (`another_sites`)."""
        self._tokens = {"api": digests(settings.api_token), "read": digests(settings.read_token)}
        self.wrong = WrongTokens(settings.wrong_tokens_per_minute)
        """Wrong tokens by address, bearer and signed in with alike."""
        self._secret = secret
        self._key: bytes | None = None
        self._ids: dict[str, tuple[str, ...]] = {}

    @property
    def key(self) -> bytes:
        """Derived once the store is open (it holds the secret)."""
        if self._key is None:
            secret = self._secret().encode()
            self._key = hmac.new(secret, SESSION_LABEL, hashlib.sha256).digest()
        return self._key

    def _mac(self, purpose: bytes, data: bytes) -> bytes:
        return hmac.new(self.key, purpose + b":" + data, hashlib.sha256).digest()

    def _token_id(self, digest: bytes) -> str:
        return self._mac(b"token", digest).hex()[:32]

    def sign_in(self, token: str) -> Session | None:
        """A new session for `token`, or None when it is no configured token."""
        digest = token_digest(token)
        writes, reads = matches(digest, self._tokens["api"]), matches(digest, self._tokens["read"])
        if not (writes or reads):
            return None
        return Session(
            kind="api" if writes else "read",
            token=self._token_id(digest),
            expires=int(time.time()) + SESSION_TTL,
            nonce=secrets.token_urlsafe(16),
        )

    def cookie(self, session: Session) -> str:
        payload = msgspec.json.encode(session)
        return f"{b64(payload)}.{b64(self._mac(b'session', payload))}"

    def read(self, connection: ASGIConnection[Any, Any, Any, Any]) -> Session | None:
        """The request's session: None without a cookie, or with one that is
        forged, expired, or names a token no longer configured."""
        value = connection.cookies.get(SESSION_COOKIE)
        if not value or not self.required:
            return None
        payload_text, _, mac_text = value.partition(".")
        try:
            payload, mac = unb64(payload_text), unb64(mac_text)
        except (ValueError, binascii.Error):
            return None
        if not hmac.compare_digest(mac, self._mac(b"session", payload)):
            return None
        try:
            session = msgspec.json.decode(payload, type=Session)
        except msgspec.DecodeError:
            return None
        if session.expires <= time.time():
            return None
        if session.kind not in self._ids:
            self._ids[session.kind] = tuple(self._token_id(d) for d in self._tokens[session.kind])
        if not any(hmac.compare_digest(session.token, known) for known in self._ids[session.kind]):
            return None
        return session

    def csrf(self, session: Session) -> str:
        """The CSRF token of a session: rendered into its pages, sent back by
        their scripts as `X-CSRF-Token`, and never in the cookie."""
        return b64(self._mac(b"csrf", session.nonce.encode()))

    def csrf_ok(self, given: str, session: Session) -> bool:
        return hmac.compare_digest(given.encode(), self.csrf(session).encode())
