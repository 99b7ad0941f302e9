"""The dashboard (docs/ui.md): server-rendered pages of the job list and of
one job, kept live by a little JavaScript (`static/ui.js`) over the API's own
streams, `GET /jobs` and `GET /jobs/{id}/events` with `Accept:
text/event-stream`.

The pages read through `core.service.Tether`, as the API's handlers do; every
change they offer (cancel, retry) is the browser calling the public API. With
API tokens set, a sign-in form trades a token for a signed session cookie
(`Sessions`): a browser's EventSource cannot send an `Authorization` header,
and a token must never sit in a URL.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, get_args
from urllib.parse import unquote, urlencode, urlsplit

import msgspec
from jinja2 import Environment, FileSystemLoader, select_autoescape
from litestar import Controller, Request, Response, Router, get, post
from litestar.datastructures import MultiDict, ResponseHeader
from litestar.di import NamedDependency, Provide
from litestar.exceptions import NotFoundException
from litestar.params import FromPath, FromQuery
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.response import Redirect, Template
from litestar.static_files import create_static_files_router
from litestar.template import TemplateConfig

from api.auth import SESSION_COOKIE, SESSION_TTL, Sessions, another_sites
from api.routers import AppRouter
from core.errors import MalformedBody, NotFound, shown
from core.metrics import job_gauges, longest_waiting
from core.models import (
    CANCEL_REASON_MAX,
    OPEN_STATES,
    RETRYABLE_STATES,
    EventType,
    JobPage,
    JobState,
    attempt_began,
    job_segment,
)
from core.service import Tether
from core.store.jobs import now_ms
from core.views import CURSOR_PATTERN, read_time

HERE = Path(__file__).parent
PAGE_SIZE = 50
"""Jobs on one page of the list."""
WAITING_SHOWN = 5
"""The jobs waiting longest the summary names."""
WAITING_SCAN = 1000
"""The summary names the jobs waiting longest only when at most this many
wait: the job index lists newest first, so naming the oldest reads them all."""
STATES: tuple[str, ...] = get_args(JobState)

SECURITY_HEADERS = [
    ResponseHeader(
        name="content-security-policy",
        value="default-src 'self'; img-src 'self' data:; object-src 'none';"
        " base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    ),
    ResponseHeader(name="x-content-type-options", value="nosniff"),
    ResponseHeader(name="referrer-policy", value="same-origin"),
    ResponseHeader(name="cache-control", value="no-store"),
]
"""Every page: no script, style or connection but the service's own (so no
inline script runs, whatever a job holds), never framed (no clickjacking of
Cancel), never cached (pages hold job data)."""


class Viewer(msgspec.Struct, frozen=True):
    """Who looks at a page: what it may offer them."""

    signed_in: bool
    can_write: bool
    csrf: str


def viewer(request: Request[Any, Any, Any], sessions: Sessions) -> Viewer | None:
    """The viewer of a page, or None when they must sign in first."""
    if not sessions.required:
        return Viewer(signed_in=False, can_write=True, csrf="")
    session = sessions.read(request)
    if session is None:
        return None
    return Viewer(signed_in=True, can_write=session.kind == "api", csrf=sessions.csrf(session))


def local_path(target: Any) -> str:
    """Where to go after signing in: a dashboard path, never another site,
    nor another path of the service's through a `..` (`/ui/../jobs`, which
    a browser follows to `/jobs`: a QA pass) or a name that only begins as
    the dashboard's (`/uix`)."""
    text = target if isinstance(target, str) else ""
    path = text.partition("?")[0].partition("#")[0]
    steps = set(unquote(path).split("/"))
    if (
        (path == "/ui" or path.startswith("/ui/"))
        and "\\" not in text
        and text.isprintable()
        and not steps & {".", ".."}
    ):
        return text
    return "/ui"


def another_page(request: Request[Any, Any, Any], sessions: Sessions) -> bool:
    """A form posted by a page of another origin, as the API's guard tells
    one (`another_sites`): a same-site page too (another port of the host,
    a sibling subdomain). Refusing only `cross-site` let such a page sign
    the browser in under a token of its own, and spend the address's
    wrong-token allowance until every client at it got 429 (found by a QA
    pass of the dashboard, 2026-12-07)."""
    return another_sites(request, sessions.public)


# ── rendering ─────────────────────────────────────────────────────────────────


def parse_time(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) else None


def span(seconds: float) -> str:
    """A time span as a dashboard shows it: `42s`, `5m 3s`, `2h 5m`, `3d 4h`
    (ui.js's `span` writes the same)."""
    s = max(0, int(seconds))
    for unit, size, sub, subsize in (("d", 86400, "h", 3600), ("h", 3600, "m", 60)):
        if s >= size:
            rest = (s % size) // subsize
            return f"{s // size}{unit}" + (f" {rest}{sub}" if rest else "")
    return f"{s // 60}m {s % 60}s" if s >= 60 else f"{s}s"


def age(value: Any) -> str:
    at = parse_time(value)
    return "" if at is None else span(time.time() - at.timestamp())


def took(job: dict[str, Any]) -> str:
    """How long a finished job's attempt took, from its start (`attempt_began`:
    a retried job's Duration counted from its creation, a day at once for a
    job retried the next day) to its end; blank while open."""
    end = parse_time(job.get("finished_at"))
    return "" if end is None else span((end - attempt_began(job)).total_seconds())


def json_escape(char: str) -> str:
    """`char` as a JSON string escape (a surrogate pair past U+FFFF)."""
    n = ord(char)
    if n <= 0xFFFF:
        return f"\\u{n:04x}"
    n -= 0x10000
    return f"\\u{0xD800 + (n >> 10):04x}\\u{0xDC00 + (n & 0x3FF):04x}"


def visible(text: str) -> str:
    """JSON text with each character `str.isprintable` refuses but the
    layout's newlines (a bidirectional override, a zero-width or tag
    character) written as its escape: still the same JSON, and caller text
    can neither reorder nor hide what the page shows (ui.js's `visible`)."""
    return "".join(c if c.isprintable() or c == "\n" else json_escape(c) for c in text)


SHOWN = 100_000
"""Characters of a JSON block the job page shows (`pretty`); the rest is
cut, saying so (`CUT_NOTE`), and the API has the value whole. Indented, a
megabyte nested 63 levels deep is 30 MB of text, and its page took 5 s of
the worker's event loop to write (a QA pass, 2026-12-07). ui.js cuts alike
(counting UTF-16 units: a block of characters past U+FFFF may end a few
characters apart)."""

CUT_NOTE = "\n… (cut: the page shows the first 100,000 characters; GET /jobs/{id} has it whole)"


def pretty(value: Any) -> str:
    """JSON as ui.js's `pretty` writes it (`JSON.stringify(value, null, 2)`),
    at most `SHOWN` characters of it: written piece by piece, and no more
    pieces than those."""
    pieces, size = [], 0
    for piece in json.JSONEncoder(ensure_ascii=False, indent=2).iterencode(value):
        pieces.append(piece)
        size += len(piece)
        if size > SHOWN:
            return visible("".join(pieces)[:SHOWN]) + CUT_NOTE
    return visible("".join(pieces))


def compact(value: Any) -> str:
    """JSON as ui.js's `compact` writes it (`JSON.stringify(value)`)."""
    return visible(json.dumps(value, ensure_ascii=False, separators=(",", ":")))


def outcome(event: dict[str, Any]) -> str:
    """What an event of the timeline says of the job, for its dot's colour
    (ui.js's `outcome`): a `finished` event's final state; a callback's
    status when it was taken (`accepted`, `duplicate`), else its verdict."""
    data = event.get("data") or {}
    if event.get("type") == "finished":
        return str(data.get("state", ""))
    if event.get("type") == "callback":
        verdict = data.get("verdict")
        return str(data.get("status", "")) if verdict in ("accepted", "duplicate") else str(verdict)
    return ""


def clock(value: Any) -> str:
    """A time in UTC, to the second (ui.js shows it in the browser's zone)."""
    at = parse_time(value)
    return "" if at is None else at.strftime("%Y-%m-%d %H:%M:%S UTC")


def run_url(job: dict[str, Any]) -> str | None:
    """The external run's page, where the backend gave one (Databricks'
    `run_page_url`): only an http(s) URL is made a link."""
    url = (job.get("external") or {}).get("run_page_url")
    if isinstance(url, str) and urlsplit(url).scheme in ("http", "https"):
        return url
    return None


BLOCKS = ("result", "error", "progress", "params", "metadata", "external", "notify")
"""A job's fields shown as JSON on its page, in this order."""
FIELDS = frozenset(
    {"id", "backend", "state", "timeout", "created_at", "updated_at", "finished_at"}
    | {"heartbeat_timeout", "heartbeat_at", "attempt", "tags", "deadline", "winding_up"}
)
"""A job's fields shown in its page's list; any other (one added later) is a
JSON block after `BLOCKS`."""
WINDING_UP = {
    "stopping_run": "Still winding up: its external run is being stopped. A retry waits for"
    " that (at most 10 s each time).",
    "late_trigger_call": "Still winding up: a call of its trigger, left to answer late, may"
    " still start a run, which is then stopped. A retry is refused until that is done (up to"
    " 15 minutes from the call's start).",
}
"""What a job page says of an ended job's `winding_up`."""


def query(filters: dict[str, list[str]], cursor: str | None = None) -> str:
    """The list's URL for these filters and page."""
    pairs = [(name, value) for name, values in filters.items() for value in values]
    if cursor:
        pairs.append(("cursor", cursor))
    return "/ui" + (f"?{urlencode(pairs)}" if pairs else "")


def count_urls(filters: dict[str, list[str]]) -> dict[str, str]:
    """Where each of the summary's counts leads: the list in that state, every
    other filter kept (a count's link dropped the backend, tag and time
    window: found by a QA pass of the dashboard), from its newest job."""
    kept = {name: values for name, values in filters.items() if name != "state"}
    return {state: query({"state": [state], **kept}) for state in STATES}


def environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
    )
    env.filters.update(age=age, took=took, pretty=pretty, compact=compact, clock=clock, span=span)
    env.filters.update(outcome=outcome)
    env.filters.update(segment=job_segment, visible=visible)
    env.globals.update(
        states=STATES, open_states=OPEN_STATES, retryable=RETRYABLE_STATES, winding_up=WINDING_UP
    )
    return env


TEMPLATES = TemplateConfig(instance=JinjaTemplateEngine.from_environment(environment()))
"""The dashboard's templates (`Litestar(template_config=...)`); autoescaped."""


def page(name: str, context: dict[str, Any], status: int = 200) -> Template:
    return Template(template_name=name, context={"status": status, **context}, status_code=status)


def sign_in_page(
    request: Request[Any, Any, Any], error: str = "", status: int = 401, then: str | None = None
) -> Template:
    """The sign-in form, in the place of the page asked for (or going on to `then`)."""
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    target = then or local_path(here)
    return page("sign_in.html", {"next": target, "error": error, "viewer": None}, status)


async def list_page(
    tether: Tether,
    states: Sequence[str],
    backends: Sequence[str],
    tags: Sequence[str],
    cursor: str | None,
    window: dict[str, datetime | None],
) -> JobPage:
    """One page of the job list, filtered as the URL says (`window`: its
    `created_after` and `created_before`)."""
    return await tether.list_jobs(states, backends, PAGE_SIZE, cursor, tags=tags, **window)


WINDOW = ("created_after", "created_before")
"""The time window's filters, as `GET /jobs` names them."""


def list_filters(params: MultiDict[Any]) -> dict[str, list[str]]:
    """The filters a list URL's query gives, as the list page and the
    summary's count links read them: each state, backend and tag, and the
    time window's first value; the form's empty values left out."""
    filters = {
        name: [v for v in params.getall(name, []) if v] for name in ("state", "backend", "tag")
    }
    return filters | {name: [params[name]] for name in WINDOW if params.get(name)}


def read_window(given: dict[str, str | None]) -> dict[str, datetime | None]:
    """The time window the URL gives, read as `GET /jobs` reads it; a value
    that is no date-time is `MalformedBody` naming the filter."""
    window: dict[str, datetime | None] = {}
    for name in WINDOW:
        value = given.get(name) or ""
        try:
            window[name] = read_time(value, up=name == "created_before") if value else None
        except msgspec.ValidationError:
            raise MalformedBody(
                f"invalid {name} {shown(value)}: give an ISO 8601 date-time such as"
                " 2026-11-24T02:14:07Z, with its seconds; UTC unless it names its offset"
                " (2026-11-24T03:14:07+01:00)",
                {"field": name},
            ) from None
    return window


async def summary(tether: Tether) -> dict[str, Any]:
    """Jobs per state, the waiting jobs past their deadline, and the jobs
    waiting longest: by name when at most `WAITING_SCAN` wait, else the age
    of the oldest in each waiting state."""
    now = now_ms()
    gauges = await job_gauges(tether.jobs, now)
    waiting = sum(gauges.counts.get(state, 0) for state in OPEN_STATES)
    longest: list[dict[str, Any]] | None = None
    if waiting <= WAITING_SCAN:
        longest = await longest_waiting(tether.jobs, WAITING_SHOWN)
        for job in longest:  # as the job's view writes it
            made = datetime.fromtimestamp(job["created_at"] / 1000, UTC)
            job["created_at"] = msgspec.to_builtins(made)
    oldest = {state: span((now - at) / 1000) for state, at in gauges.oldest.items()}
    return {
        "counts": gauges.counts,
        "overdue": gauges.overdue,
        "waiting": waiting,
        "longest": longest,
        "oldest": oldest,
    }


def bad_filter(
    message: str, viewer: Viewer, filters: dict[str, list[str]], backends: list[str]
) -> Template:
    """The 400 page of a list URL the service refuses, with the filter form
    as the URL filled it: a mistyped time is mended there, not by going
    Back (found by an exploratory QA pass of the dashboard)."""
    context = {"message": message, "viewer": viewer, "filters": filters, "backends": backends}
    return page("error.html", context, 400)


def is_page(path: str) -> bool:
    """Whether `path` is the dashboard's to answer, a page it lacks included
    (not its static files)."""
    return (path == "/ui" or path.startswith("/ui/")) and not path.startswith("/ui/static/")


def missing_page(path: str) -> Template:
    """The dashboard's 404 page for a path under `/ui` that no page has (the
    API's is JSON). `path`: as a log shows it (escaped, no token)."""
    message = f"no page at {path}"
    if path.startswith("/ui/jobs/"):
        message += " (a job's id holds no '/')"
    return error_page(message, 404)


def error_page(message: str, status: int) -> Template:
    """The dashboard's page for a refusal of a path under `/ui` made before
    any page's own code ran (the API's is JSON): a missing page, a host the
    service is not known by (`api.auth.known_hosts_guard`)."""
    context = {"message": message, "viewer": None, "status": status}
    headers = {header.name: header.value for header in SECURITY_HEADERS}
    return Template(
        template_name="error.html", context=context, status_code=status, headers=headers
    )


# ── routes ────────────────────────────────────────────────────────────────────

LIST_PARAMETERS = ("state", "backend", "tag", "created_after", "created_before", "cursor")
"""What the job list's URL may hold: any other name is refused, as `GET /jobs` refuses it."""


class Dashboard(Controller):
    path = "/ui"
    include_in_schema = False

    @get("/")
    async def jobs(
        self,
        request: Request[Any, Any, Any],
        tether: NamedDependency[Tether],
        sessions: NamedDependency[Sessions],
        cursor: FromQuery[str | None] = None,
    ) -> Template:
        """The job list, newest first, filtered as the URL says, with the summary."""
        who = viewer(request, sessions)
        if who is None:
            return sign_in_page(request)
        # (the form sends an empty tag and times: no filter)
        filters = list_filters(request.query_params)
        states, backends, tags = filters["state"], filters["backend"], filters["tag"]
        given = {name: filters[name][0] if name in filters else None for name in WINDOW}
        shown_backends = sorted(set(tether.plugins.backends) | set(backends))

        def bad(message: str) -> Template:
            return bad_filter(message, who, filters, shown_backends)

        odd = next((name for name in request.query_params if name not in LIST_PARAMETERS), None)
        if odd is not None:  # a mistyped bookmark (`?tags=`) showed every job, unfiltered
            takes = ", ".join(LIST_PARAMETERS)
            return bad(f"unknown query parameter {odd[:100]!r} (this page takes: {takes})")
        params = request.query_params
        for name in (*WINDOW, "cursor"):  # the first was used, silently (a QA pass)
            count = len(params.getall(name, []))
            if count > 1:  # as `GET /jobs` says it
                return bad(f"query parameter {name!r} given {count} times; give it once")
        unknown = [s for s in states if s not in STATES]
        if unknown:
            return bad(f"unknown state {unknown[0]!r}; one of: {', '.join(STATES)}")
        if cursor is not None and not re.match(CURSOR_PATTERN, cursor):
            return bad("invalid cursor: follow the page links")
        try:
            window = read_window(given)
            listed_jobs = await list_page(tether, states, backends, tags, cursor, window)
        except MalformedBody as exc:  # a tag no job could have, too many backends, no time
            return bad(exc.message)
        return page(
            "jobs.html",
            {
                "viewer": who,
                "jobs": [msgspec.to_builtins(j) for j in listed_jobs.items],
                "next_cursor": listed_jobs.next_cursor,
                "cursor": cursor,
                "filters": filters,
                "backends": shown_backends,
                "summary": await summary(tether),
                "count_urls": count_urls(filters),
                "newest_url": query(filters),
                "older_url": query(filters, listed_jobs.next_cursor),
                "live": {
                    "filters": filters,
                    "limit": PAGE_SIZE,
                    "cursor": cursor,
                    "retryable": RETRYABLE_STATES,
                },
            },
        )

    @get("/summary")
    async def summary_part(
        self,
        request: Request[Any, Any, Any],
        tether: NamedDependency[Tether],
        sessions: NamedDependency[Sessions],
    ) -> Response[Any]:
        """The list's summary alone, which the list page reloads as jobs change;
        its query is the list's, whose filters its counts' links keep."""
        if viewer(request, sessions) is None:
            return Response("sign in", status_code=401, media_type="text/plain")
        urls = count_urls(list_filters(request.query_params))
        return page("_summary.html", {"summary": await summary(tether), "count_urls": urls})

    @get("/jobs/{job_id:str}")
    async def job(
        self,
        request: Request[Any, Any, Any],
        tether: NamedDependency[Tether],
        sessions: NamedDependency[Sessions],
        job_id: FromPath[str],
    ) -> Template:
        """One job: its fields, its history (live), and what may be done to it."""
        who = viewer(request, sessions)
        if who is None:
            return sign_in_page(request)
        try:
            job = msgspec.to_builtins(await tether.get_job(job_id))
        except NotFound:
            return page("error.html", {"message": NotFound.job(job_id).message, "viewer": who}, 404)
        history = await tether.job_events(job_id, 1000)
        events = msgspec.to_builtins(history.items)
        return page(
            "job.html",
            {
                "viewer": who,
                "job": job,
                "blocks": [b for b in BLOCKS if b in job]
                + [f for f in job if f not in FIELDS and f not in BLOCKS],
                "run_url": run_url(job),
                "events": events,
                "dropped": history.dropped,
                "live": {
                    "job": job,
                    "after": events[-1]["seq"] if events else 0,
                    "event_types": get_args(EventType),
                    "cancelable": OPEN_STATES,
                    "retryable": RETRYABLE_STATES,
                    "winding_up": WINDING_UP,
                    "reason_max": CANCEL_REASON_MAX,
                },
            },
        )

    @get("/sign-in")
    async def sign_in_form(
        self, request: Request[Any, Any, Any], sessions: NamedDependency[Sessions]
    ) -> Response[Any]:
        """The sign-in form on its own (the pages show it in their place when needed)."""
        if viewer(request, sessions) is not None:
            return Redirect("/ui")
        return page("sign_in.html", {"next": "/ui", "error": "", "viewer": None})

    @post("/sign-in", status_code=303)
    async def sign_in(
        self, request: Request[Any, Any, Any], sessions: NamedDependency[Sessions]
    ) -> Response[Any]:
        """Trade a token (posted in a form, never in the URL) for the session cookie."""
        form = await request.form()
        target = local_path(form.get("next"))
        if not sessions.required:
            return Redirect(target, status_code=303)
        if another_page(request, sessions):
            return sign_in_page(request, "Sign in from this page.", 403)
        token = str(form.get("token", "")).strip()
        if not token:  # no guess: not counted
            return sign_in_page(request, "Give a token.", 401, target)
        wait = sessions.wrong.wait(request)
        if wait:
            said = sign_in_page(
                request,
                "Too many wrong tokens came from this address (yours or another's at the same"
                f" address) in the last minute: try again in {wait} s.",
                429,
                target,
            )
            said.headers["Retry-After"] = str(wait)
            return said
        session = sessions.sign_in(token)
        if session is None:
            sessions.wrong.wrong(request)
            return sign_in_page(request, "That token is not accepted.", 401, target)
        response = Redirect(target, status_code=303)
        response.set_cookie(
            SESSION_COOKIE,
            sessions.cookie(session),
            max_age=SESSION_TTL,
            path="/",
            httponly=True,
            samesite="strict",
            secure=sessions.secure,
        )
        return response

    @get("/sign-out")
    async def sign_out_form(
        self, request: Request[Any, Any, Any], sessions: NamedDependency[Sessions]
    ) -> Response[Any]:
        """The address of Sign out, typed or followed: a page whose button
        signs out (a GET changes nothing), or the list when there is no
        session to end. It was the API's JSON 405 (found by an exploratory QA
        pass of the dashboard)."""
        who = viewer(request, sessions)
        if who is None or not who.signed_in:
            return Redirect("/ui")
        return page("sign_out.html", {"viewer": who})

    @post("/sign-out", status_code=303)
    async def sign_out(
        self, request: Request[Any, Any, Any], sessions: NamedDependency[Sessions]
    ) -> Response[Any]:
        """Forget the session cookie (the form carries the session's CSRF token).
        A form posted from another site is refused: its request carries no
        cookie (`SameSite=Strict`), so no CSRF token is asked of it, and it
        signed the browser's user out (found by a security QA pass)."""
        if another_page(request, sessions):
            return Response(
                "sign out from this site's pages", status_code=403, media_type="text/plain"
            )
        session = sessions.read(request)
        form = await request.form()
        if session is not None and not sessions.csrf_ok(str(form.get("csrf", "")), session):
            return Response("missing or wrong CSRF token", status_code=403, media_type="text/plain")
        response = Redirect("/ui", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response


NAME_MAX = 255
"""The longest file name (in bytes) a Linux file system holds."""
PATH_MAX = 1024
"""The longest static path (in bytes) looked up: well past any of the
dashboard's files, well short of the 4,096 Linux looks up with the
directory's own path before it (a longer path of short names answered 500
too: a third QA pass)."""


def _a_file_name(request: Request[Any, Any, Any]) -> None:
    """Refuse, as a file that is not there (404), a static path the file
    system cannot look up: one with a NUL byte (`ValueError: embedded null
    byte`), a name longer than `NAME_MAX` or a path longer than `PATH_MAX`
    (`OSError`). Both answered
    500, the first with a traceback in the log at each request, for anyone
    (an exploratory QA pass of the dashboard)."""
    path = request.scope["path"]
    if (
        "\x00" in path
        or len(path.encode()) > PATH_MAX
        or any(len(part.encode()) > NAME_MAX for part in path.split("/"))
    ):
        raise NotFoundException(f"no static file at {shown(path)}")


@get("/", include_in_schema=False)
async def root() -> Redirect:
    return Redirect("/ui")


def ui_router(sessions: Sessions) -> Router:
    """The dashboard's routes and static files, outside the API's token guard:
    a page without a session answers the sign-in form instead of 401."""
    static = create_static_files_router(
        path="/ui/static", directories=[HERE / "static"], before_request=_a_file_name
    )
    return AppRouter(
        "/",
        route_handlers=[Dashboard, root, static],
        dependencies={"sessions": Provide(lambda: sessions, sync_to_thread=False)},
        response_headers=SECURITY_HEADERS,
    )
