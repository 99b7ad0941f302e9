"""Thin controllers: each is a docstring, one call into `core.service`, a response."""

from __future__ import annotations

import asyncio
import contextlib
import re
import resource
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Annotated, Any, Literal, get_args, overload

import msgspec
from litestar import Controller, HttpMethod, Request, Response, get, head, post
from litestar import route as any_route
from litestar.connection import ASGIConnection
from litestar.di import NamedDependency
from litestar.exceptions import HTTPException
from litestar.handlers import BaseRouteHandler
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec.enums import OpenAPIFormat
from litestar.params import FromPath, FromQuery, HeaderParameter, QueryParameter
from litestar.response import ServerSentEvent, ServerSentEventMessage

from api.auth import READ, Guard, bearer, guarding, session_ends
from api.errors import ErrorBody, ErrorResponse, bad_request, error_response
from api.http import JsonAnswer
from core.callbacks import Heartbeat, not_json
from core.errors import MalformedBody, NotFound, StoreUnavailable
from core.errors import shown as shown_value
from core.events import END, KEEP_ALIVE, PING
from core.models import (
    JSON_SPACE,
    LIST_BACKENDS_MAX,
    TAGS_MAX,
    CancelRequest,
    EventPage,
    Job,
    JobEvent,
    JobPage,
    JobRequest,
    JobState,
    RetryRequest,
    far_number_field,
    field_of,
    read_json,
)
from core.notices import NoticeResult
from core.service import Tether
from core.views import CURSOR_PATTERN, decode_cursor, read_time


def errors(*codes: int) -> dict[int, ResponseSpec]:
    """OpenAPI entries for the error answers a route may give (their examples
    are written in `api.openapi`, not generated)."""
    return {
        c: ResponseSpec(ErrorResponse, description=ERROR_TEXT[c], generate_examples=False)
        for c in codes
    }


ERROR_TEXT = {
    400: "Malformed: not JSON, a wrong type, an unknown field or query parameter, a"
    " single-valued parameter given twice, or a value outside what this document states;"
    " `details.field` names it. Nothing changed",
    401: "Missing or wrong token",
    403: "A read token (`TETHER_READ_TOKEN`) on a route that changes something; it needs"
    " an API token (`TETHER_API_TOKEN`). Nothing changed",
    404: "Not found",
    410: "The job has ended; nothing changed",
    409: "Conflicts with what is recorded; nothing changed",
    413: "The body is larger than the service takes (`TETHER_MAX_BODY_BYTES`); the message"
    " names the limit",
    415: "The body is not sent as application/json",
    422: "Well formed, but it cannot be done; the message says why and `details.field` names"
    " the field. Nothing changed",
    429: "This client address gave too many wrong tokens in the last minute"
    " (`TETHER_WRONG_TOKENS_PER_MINUTE`): its tokens are not read until `Retry-After` has"
    " passed. Nothing changed",
    503: "The store did not answer; nothing is retried on the caller's behalf",
}


class QueryRule(msgspec.Struct, frozen=True):
    """The query parameters one route takes, which of them may repeat, and
    which are integers."""

    names: frozenset[str]
    repeatable: frozenset[str]
    integers: frozenset[str] = frozenset()


DECIMAL = re.compile(r"0|[1-9][0-9]*")
"""How an integer query parameter is written: ASCII decimal digits, no
sign, no leading zero. Litestar alone would also read `1e0`, `1.0` or `1e2`
as integers (msgspec's lax conversion of a string)."""
INTEGER_RULE = "written in decimal digits only (`1e0`, `1.0`, `+1`, `01` are refused)"
"""The rule as the OpenAPI document states it on each integer query parameter."""


def takes_integer(field: Any) -> bool:
    """Whether a handler's parameter (a Litestar `FieldDefinition`) is an
    integer, or optional or a list of integers."""
    return field.annotation is int or any(takes_integer(t) for t in field.inner_types)


QueryRules = dict[Any, QueryRule]
"""Each route handler's `QueryRule`, by the handler's function (a route holds
a copy of the handler, with the same function): `query_rules` fills it once
the app has its routes."""


def query_rules(routes: Any) -> QueryRules:
    """The query parameters each handler declares, read from what Litestar
    parses for it, so that the rule and the signature cannot drift apart."""
    rules: QueryRules = {}
    for route in routes:
        for handler, kwargs_model in getattr(route, "route_handler_map", {}).values():
            params = kwargs_model.expected_query_params
            fields = handler.parsed_fn_signature.parameters
            rules[handler.fn] = QueryRule(
                frozenset(p.field_alias for p in params),
                frozenset(p.field_alias for p in params if p.is_sequence),
                frozenset(p.field_alias for p in params if takes_integer(fields[p.field_name])),
            )
    return rules


def strict_query(rules: QueryRules) -> Guard:
    """Refuse (400) a query parameter the route does not take, a
    single-valued one given more than once, and an integer one not written
    in decimal digits (`DECIMAL`)."""

    async def refuse_unknown_query(  # async: Litestar runs a sync guard in a thread
        connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
    ) -> None:
        rule = rules.get(getattr(handler, "fn", None))
        if rule is None:
            return
        given = connection.query_params
        for name in given:
            shown = name[:100]  # it is echoed back
            if name not in rule.names:
                takes = ", ".join(sorted(rule.names)) or "none"
                raise bad_request(
                    f"unknown query parameter {shown!r} (this route takes: {takes})", shown
                )
            count = len(given.getall(name))
            if count > 1 and name not in rule.repeatable:
                raise bad_request(
                    f"query parameter {shown!r} given {count} times; give it once", shown
                )
            if name in rule.integers:
                for value in given.getall(name):
                    if DECIMAL.fullmatch(value):
                        continue
                    # -1 is a whole number: what is wrong with it is its sign (found
                    # by a QA pass, which read "write a whole number" as wrong)
                    signed = value[:1] == "-" and value != "-0" and DECIMAL.fullmatch(value[1:])
                    raise bad_request(
                        f"invalid query parameter {shown!r}: "
                        + (
                            f"{value} is negative"
                            if signed
                            else "write a whole number in decimal digits, such as 100"
                        ),
                        shown,
                    )

    return refuse_unknown_query


def moment(value: str | None, name: str, *, up: bool = False) -> datetime | None:
    """A date-time query parameter (`read_time`). Not declared as a
    `datetime`: Litestar would read `null` as absent."""
    if value is None:
        return None
    try:
        return read_time(value, up=up)
    except msgspec.ValidationError:
        # quoted, so that the space a `+` of an offset became in the query shows
        plus = " (a + in a query string is read as a space: write it %2B)" if " " in value else ""
        raise bad_request(
            f"invalid query parameter {name!r}: {shown_value(value)} is no ISO 8601"
            f" date-time such as 2026-11-24T02:14:07Z{plus}",
            name,
        ) from None


KEEP_ALIVE_MESSAGE = ServerSentEventMessage(data='{"type": "ping"}', event=PING)
"""What a quiet stream sends every `KEEP_ALIVE` seconds: an event a page can
see (`core.events.PING`), where a comment was."""


def wants_stream(request: Request[Any, Any, Any]) -> bool:
    """Whether the request asks for `text/event-stream` (in any case: media
    types are case-insensitive)."""
    return "text/event-stream" in request.headers.get("accept", "").lower()


async def require_json(
    connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
) -> None:
    """A body sent as something other than JSON is refused (415), not guessed at.
    A request without a body (an optional one, as cancel's) passes."""
    headers = connection.headers
    if headers.get("content-length", "0") == "0" and "transfer-encoding" not in headers:
        return
    given = connection.headers.get("content-type", "application/json").split(";")[0].strip()
    media = given.lower()  # media types are case-insensitive (RFC 9110)
    if media != "application/json" and not media.endswith("+json"):
        raise HTTPException(
            status_code=415, detail=f"send the body as application/json, not {given[:100]!r}"
        )


JSON_ONLY = guarding(require_json)
"""A route's `middleware=`: its body must be JSON (`require_json`)."""


@overload
async def strict_body[T](request: Request[Any, Any, Any], kind: type[T], empty: str) -> T: ...
@overload
async def strict_body[T](
    request: Request[Any, Any, Any], kind: type[T], empty: None
) -> T | None: ...
async def strict_body[T](
    request: Request[Any, Any, Any], kind: type[T], empty: str | None
) -> T | None:
    """The request's JSON body as `kind`, decoded strictly, as the schema
    states it: a number sent as a string (`"timeout": "10"`) is refused
    (400), where Litestar's own decoding would convert it. With `empty`, the
    body is required (one of white space only is refused, saying `empty`);
    without, it is optional: none, or `null`, is None. Errors name the field,
    as Litestar's do."""
    raw = await request.body()
    if not raw.strip(JSON_SPACE):
        if empty is not None:
            raise MalformedBody(f"the body is empty: {empty}", {"field": "body", "in": "body"})
        return None
    try:
        body: T | None = read_json(raw, kind if empty is not None else kind | None)
        return body
    except msgspec.ValidationError as exc:
        text = str(exc)
        field = far_number_field(raw, text) or field_of(text)
        about = "invalid body" if field is None else f"invalid body field {field!r}"
        details = {"field": field or "body", "in": "body"}
        raise MalformedBody(f"{about}: {text.split(' - at `')[0]}", details) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # bad UTF-8 in a string: the latter
        details = {"field": "body", "in": "body"}
        raise MalformedBody(f"the body is not valid JSON: {not_json(exc, raw)}", details) from None


LINE_LIKE = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})
"""An event's JSON as a stream sends it: the characters many line readers
end a line at, though the SSE format does not (httpx's, Python's
`splitlines`), written as JSON escapes. They stand only inside strings."""


def line_safe(data: str) -> str:
    """`data` with `LINE_LIKE`'s characters escaped (most is ASCII: as it is)."""
    return data if data.isascii() else data.translate(LINE_LIKE)


CHANGES_POLL = 1.0
"""Seconds between a job-list stream's reads of its page, for changes made by
other processes (this process's own wake it at once)."""
CHANGES_SETTLE = 0.1
"""Seconds a job-list stream waits after each read, so a burst of changes
costs one read."""
LIST_STREAMS_MAX = 100
"""Job-list streams a worker keeps open at once; one more is answered 503.
Each reads its page on every change and every `CHANGES_POLL`: a thousand
open made the service answer nothing else (found in an audit, 2026-12-04).
A dashboard open in a browser holds one."""
STREAMS_SHARE = 0.5
"""Of the files a worker may have open (its `RLIMIT_NOFILE`, which `tether
serve` raises to the hard limit), the share its streams, job lists' and
histories' together, may hold; one more is answered 503. A thousand
history streams open under the usual limit of 1,024 left the worker no file
for anything else: a trigger's request failed with "too many open files",
and its job failed (found by a QA pass's note, 2026-12-08)."""


def streams_max() -> int:
    """The streams this worker may hold open at once (`STREAMS_SHARE`)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 1 << 20 if soft == resource.RLIM_INFINITY else max(int(soft * STREAMS_SHARE), 1)


class _StreamSlot:
    """A stream's place in `open`, and a job-list one's in `lists` too,
    taken before the stream reads anything (a stream refused for want of
    room reads nothing, and many opened at once never overrun the limits:
    found by a security QA pass) and given back once: when the stream ends,
    when its first read fails, or when a stream never begun is let go."""

    open = 0
    """Streams open in this process, or being opened."""
    lists = 0
    """Job-list streams among them."""

    def __init__(self, listing: bool) -> None:
        self._listing = listing
        _StreamSlot.open += 1
        _StreamSlot.lists += listing
        self._held = True

    @classmethod
    async def take[T](
        cls, listing: bool, first: Callable[[], Awaitable[T]]
    ) -> tuple[_StreamSlot, T] | Response[Any]:
        """A place for a stream and `first()`, what it reads before it
        begins (the place given back if that fails); or the 503 for a
        stream this process has no room for (`refusal`), `first` not read."""
        refused = cls.refusal(listing)
        if refused is not None:
            return refused
        slot = cls(listing)
        try:
            return slot, await first()
        except BaseException:
            slot.release()
            raise

    @classmethod
    def refusal(cls, listing: bool) -> Response[Any] | None:
        """The 503 for a stream this process has no room for, or None."""
        if listing and cls.lists >= LIST_STREAMS_MAX:
            most, which = LIST_STREAMS_MAX, "job-list streams"
        elif cls.open >= (most := streams_max()):
            which = "streams (job lists' and histories')"
        else:
            return None
        message = (
            f"{most} {which} are open on this worker, the most it keeps; close one,"
            " or read pages without the stream"
        )
        refused = error_response(503, "too_many_streams", message, {"limit": most})
        # And the connection closed: kept alive (30 s), each refused client
        # held a file all the same, asking again on it every second, and a
        # thousand of them left none for a trigger (a QA pass, HIGH).
        refused.headers["Connection"] = "close"
        return refused

    def release(self) -> None:
        if self._held:
            self._held = False
            _StreamSlot.open -= 1
            _StreamSlot.lists -= self._listing

    def __del__(self) -> None:
        self.release()


class JobController(Controller):
    path = "/jobs"
    tags = ["jobs"]  # noqa: RUF012

    @post(
        "/",
        status_code=201,
        middleware=[JSON_ONLY],
        operation_id="createJob",
        summary="Start a job",
        responses={
            201: ResponseSpec(Job, description="A new job", generate_examples=False),
            200: ResponseSpec(
                Job, description="The same request again: the existing job", generate_examples=False
            ),
            **errors(400, 401, 403, 409, 413, 415, 422, 429, 503),
        },
    )
    async def create(
        self, tether: NamedDependency[Tether], request: Request[Any, Any, Any]
    ) -> JsonAnswer:
        """Start a job on a backend: Tether triggers it, hands the external
        system a callback URL, and waits for that URL to be called.

        - **201**: a new job (`pending`, then `running` once triggered).
        - **200**: the same `id` came with the same request before; nothing is
          triggered again. Requests are compared with their defaults spelled out
          (`timeout` equal to the default, a backend param at its default value).
        - **409**: the same `id` with a different request; `details.differs`
          names the fields.
        - **400**: malformed (an `id` outside 1 to 128 of `A-Z a-z 0-9 . _ -`, a
          `timeout` outside the bounds stated here, an unknown field).
        - **422**: an unknown backend, or params its plugin refuses (the plugin
          may check more than its schema says, e.g. that a URL is http(s))."""
        data = await strict_body(
            request, JobRequest, empty='send a JSON object: {"backend": ..., "params": {...}}'
        )
        job, created = await tether.create_job(data)
        return JsonAnswer(job, 201 if created else 200)

    @get(
        "/",
        opt=READ,
        operation_id="listJobs",
        summary="List jobs",
        responses={
            200: ResponseSpec(
                JobPage,
                description="A page of jobs, newest first; with `Accept: text/event-stream`,"
                " a stream of the page's changes instead",
                generate_examples=False,
            ),
            **errors(400, 401, 429, 503),
        },
    )
    async def list_jobs(
        self,
        request: Request[Any, Any, Any],
        tether: NamedDependency[Tether],
        job_state: Annotated[
            list[JobState] | None,
            QueryParameter(
                name="state",
                max_items=len(get_args(JobState)),
                description="Only jobs in one of these states",
            ),
        ] = None,
        backend: Annotated[
            list[str] | None,
            QueryParameter(
                max_items=LIST_BACKENDS_MAX,
                description="Only jobs of one of these backends (any name: a removed"
                " backend's jobs are listed too)",
            ),
        ] = None,
        tag: Annotated[
            list[str] | None,
            QueryParameter(
                max_items=TAGS_MAX,
                description="Only jobs having every one of these tags",
            ),
        ] = None,
        created_after: Annotated[
            str | None,
            QueryParameter(
                format=OpenAPIFormat.DATE_TIME,
                description="Only jobs created after this time (ISO 8601, e.g."
                " `2026-11-24T02:14:07Z`)",
            ),
        ] = None,
        created_before: Annotated[
            str | None,
            QueryParameter(
                format=OpenAPIFormat.DATE_TIME,
                description="Only jobs created before this time (ISO 8601, e.g."
                " `2026-11-24T02:14:07Z`)",
            ),
        ] = None,
        limit: Annotated[
            int, QueryParameter(ge=1, le=1000, description="At most this many jobs")
        ] = 100,
        cursor: Annotated[
            str | None,
            QueryParameter(
                pattern=CURSOR_PATTERN,
                description="The `next_cursor` of the previous page, unchanged",
            ),
        ] = None,
    ) -> Response[Any]:
        """Jobs, newest first. `state` and `backend` may each be given several
        times (a job matches any of them); `tag` too (a job matches when it has
        them all); `created_after` and `created_before` are exclusive, and UTC
        when they carry no offset. Pass `next_cursor` back as `cursor` for the
        next page, until it is null: a page may hold fewer than `limit` jobs,
        none even, and still have one, when its filters rarely meet (a page
        reads at most 10,000 jobs of the shortest list its filters name, then
        says where the next one goes on), or when its jobs are large (a page
        holds about 8 MB of jobs at most, one job at least). An unknown query parameter, or
        `limit` or `cursor` given twice, is refused (400).

        With `Accept: text/event-stream`: the jobs of the page these parameters
        name, then each job again whenever it changes while on that page (its
        `updated_at` moves), joins it (a new job), or leaves it by changing (no
        longer matching the filters). Each message is `event: job`, `data: <the
        job's JSON>`. After the first page comes `event: page`, `data: {"ids":
        [...]}`: the ids on it (a client that reconnects drops what else it
        shows). A job that leaves the page for any reason (it changed, it was
        pushed off by newer jobs, it was deleted) is then named in `event:
        left`, `data: {"id": <its id>}`. After 15 s of silence comes `event:
        ping`, `data: {"type": "ping"}` (a client ignores it). The service
        reads the page about once a second while a stream is open, and at once
        when a job changes in the process serving it. A stream opened with the
        dashboard's session cookie ends when the session does."""

        query = tether.list_query(  # a bad filter is refused (400) before anything is read
            job_state or (),
            backend or (),
            limit,
            cursor,
            tags=tag or (),
            created_after=moment(created_after, "created_after"),
            created_before=moment(created_before, "created_before", up=True),
        )

        async def page() -> JobPage:
            return await tether.list_page(query)

        if not wants_stream(request):
            return Response(await page())
        taken = await _StreamSlot.take(True, page)
        if isinstance(taken, Response):
            return taken
        slot, first = taken
        return self.changes(tether, page, first, slot, session_ends(request))

    def changes(
        self,
        tether: Tether,
        page: Callable[[], Awaitable[JobPage]],
        first: JobPage,
        slot: _StreamSlot,
        until: float | None = None,
    ) -> ServerSentEvent:
        """`GET /jobs` as a stream of job changes (see `list_jobs`): the page is
        read only while a stream is open, so with none open it costs nothing. A
        job is sent when its `updated_at` differs from the one last seen; a job
        that left the page is read once more, sent if it changed, and named as
        gone (`left`). `first`: the page as read when the stream was asked
        for; `slot`: its place, given back when it ends. A read the store
        fails is tried again at the next poll (the stream goes on). Ends when
        the service stops, as the job history streams do, and at `until`
        (Unix seconds): when the session it was opened with ends, so that a
        browser's EventSource reconnects, is refused and says so."""

        async def jobs() -> AsyncIterator[Job | str | list[str] | None]:
            wake = asyncio.Event()

            def recorded(rec: Any, event: Any) -> None:
                wake.set()

            tether.events.listeners.append(recorded)
            seen: dict[str, Any] = {}
            quiet_since = time.monotonic()
            try:
                read: JobPage | None = first
                announced = False
                mark: object = None  # the index's `change_mark` before the last read
                # `stopping`: set by `JobHistory.stop` (SIGTERM)
                while not tether.events.stopping and (until is None or time.time() < until):
                    wake.clear()
                    changed: list[Job | str] = []
                    try:  # the store busy or down: this round again at the next poll
                        if read is None:
                            # Nothing committed since the last read: the page is
                            # as it was, and not read again (each open stream
                            # read its page every second: up to 8 MB of jobs,
                            # 4% of a core a stream while nothing changed;
                            # found by a QA pass).
                            was, mark = mark, await tether.jobs.change_mark()
                            if mark is None or mark != was:
                                read = await page()
                        if read is not None:
                            items = read.items
                            read = None
                            changed = [job for job in items if seen.get(job.id) != job.updated_at]
                            for job_id in seen.keys() - {job.id for job in items}:
                                with contextlib.suppress(NotFound):  # deleted: only gone
                                    left = await tether.get_job(job_id)
                                    if left.updated_at != seen[job_id]:
                                        changed.append(left)
                                # off the page (changed, pushed off, deleted)
                                changed.append(job_id)
                            seen = {job.id: job.updated_at for job in items}
                    except StoreUnavailable:
                        mark = None  # read again next time
                        await asyncio.sleep(CHANGES_POLL)
                        continue
                    for job in changed:
                        yield job
                    if not announced:  # the page as it is: a client drops what else it shows
                        yield list(seen)
                        announced = True
                    if changed:
                        quiet_since = time.monotonic()
                    elif time.monotonic() - quiet_since >= KEEP_ALIVE:
                        yield None
                        quiet_since = time.monotonic()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wake.wait(), CHANGES_POLL)
                    await asyncio.sleep(CHANGES_SETTLE)  # one read for a burst of changes
            finally:
                slot.release()
                tether.events.listeners.remove(recorded)

        async def messages() -> AsyncIterator[ServerSentEventMessage]:
            async for job in jobs():
                if job is None:
                    yield KEEP_ALIVE_MESSAGE
                elif isinstance(job, str):
                    data = msgspec.json.encode({"id": job}).decode()
                    yield ServerSentEventMessage(data=data, event="left")
                elif isinstance(job, list):
                    data = msgspec.json.encode({"ids": job}).decode()
                    yield ServerSentEventMessage(data=data, event="page")
                else:
                    data = line_safe(msgspec.json.encode(job).decode())
                    yield ServerSentEventMessage(data=data, event="job")

        return ServerSentEvent(messages())

    @get(
        "/{job_id:str}",
        opt=READ,
        operation_id="getJob",
        summary="Read a job",
        responses={
            200: ResponseSpec(Job, description="The job", generate_examples=False),
            **errors(400, 401, 404, 429, 503),
        },
    )
    async def get_job(self, tether: NamedDependency[Tether], job_id: FromPath[str]) -> JsonAnswer:
        """One job: its state, what its backend returned when triggered
        (`external`), and once it ended, its `result` or `error`."""
        return JsonAnswer(await tether.get_job(job_id))

    @get(
        "/{job_id:str}/events",
        opt=READ,
        operation_id="jobEvents",
        summary="Read a job's history",
        responses={
            200: ResponseSpec(
                EventPage,
                description="The history, oldest first; with `Accept: text/event-stream`,"
                " a stream of server-sent events instead",
                generate_examples=False,
            ),
            **errors(400, 401, 404, 429, 503),
        },
    )
    async def events(
        self,
        request: Request[Any, Any, Any],
        tether: NamedDependency[Tether],
        job_id: FromPath[str],
        limit: Annotated[
            int, QueryParameter(ge=1, le=1000, description="At most this many events")
        ] = 100,
        cursor: Annotated[
            str | None,
            QueryParameter(
                pattern=CURSOR_PATTERN,
                description="The `next_cursor` of the previous page, unchanged",
            ),
        ] = None,
        last_event_id: Annotated[
            str | None,
            HeaderParameter(
                name="last-event-id",
                pattern=r"^[0-9]{1,18}$",
                description="With `text/event-stream`: the `seq` of the last event received;"
                " the stream goes on after it",
            ),
        ] = None,
    ) -> Response[Any]:
        """What happened to the job, oldest first: `{"items": [{"seq", "at",
        "type", "attempt", "data"}], "next_cursor", "dropped"}` (`dropped`:
        events no longer kept, from the middle of a long history). Pass
        `next_cursor` back as `cursor` for the next page.

        With `Accept: text/event-stream`: the events recorded (after
        `Last-Event-ID`, or `cursor`, if given), then each new one as it
        happens, in any process sharing the store; after `finished`, the stream
        goes on while something that files an event is still due (the
        completion notification, not yet delivered or given up; the stop of a
        canceled or timed-out job's run), and ends once nothing is and every
        event was sent: at once when nothing was (docs/lifecycle.md, "Following
        a job"). Each message is `id: <seq>`, `event: <type>`, `data: <the
        item's JSON>`; after 15 s of silence comes `event: ping`, `data:
        {"type": "ping"}`, with no `id` (a client ignores it). The stream's
        last message, once it has ended (nothing more due, or the job deleted;
        not when the service stops: reconnect then, with `Last-Event-ID`), is
        `event: end` with `data: {"type": "end"}` and no `id`; the response's
        `Tether-Stream-Ends: end` header says so (a service without it ends a
        finished job's stream without a word). A stream opened with the
        dashboard's session cookie ends, without `end`, when the session
        does."""
        if not wants_stream(request):
            return Response(await tether.job_events(job_id, limit, cursor))
        if last_event_id is not None:
            after = int(last_event_id)
        else:
            after = decode_cursor(cursor) if cursor else 0
        taken = await _StreamSlot.take(
            False, lambda: tether.follow_job(job_id, after, session_ends(request))
        )
        if isinstance(taken, Response):
            return taken
        slot, followed = taken

        async def messages(
            events: AsyncIterator[JobEvent | Literal["end"] | None],
        ) -> AsyncIterator[ServerSentEventMessage]:
            try:
                async for event in events:
                    if event is None:
                        yield KEEP_ALIVE_MESSAGE
                    elif event == END:
                        yield ServerSentEventMessage(data='{"type": "end"}', event=END)
                    else:
                        data = line_safe(msgspec.json.encode(event).decode())
                        yield ServerSentEventMessage(data=data, event=event.type, id=event.seq)
            finally:
                slot.release()

        return ServerSentEvent(messages(followed), headers={"tether-stream-ends": "end"})

    @post(
        "/{job_id:str}/cancel",
        status_code=200,
        middleware=[JSON_ONLY],
        operation_id="cancelJob",
        summary="Cancel a job",
        responses=errors(400, 401, 403, 404, 409, 413, 415, 429, 503),
    )
    async def cancel(
        self,
        tether: NamedDependency[Tether],
        job_id: FromPath[str],
        request: Request[Any, Any, Any],
    ) -> Job:
        """Cancel a waiting job: it becomes `canceled` and its backend is asked
        to stop the external run. The body is optional; a `reason` is kept in
        the job's `error.message` (`canceled by request: <reason>`). 409 when
        the job already finished."""
        data = await strict_body(request, CancelRequest, empty=None)
        return await tether.cancel_job(job_id, data.reason if data else None)

    @post(
        "/{job_id:str}/retry",
        status_code=200,
        middleware=[JSON_ONLY],
        operation_id="retryJob",
        summary="Run a job again",
        responses=errors(400, 401, 403, 404, 409, 413, 415, 429, 503),
    )
    async def retry(
        self,
        tether: NamedDependency[Tether],
        job_id: FromPath[str],
        request: Request[Any, Any, Any],
    ) -> Job:
        """Start the next attempt of a `failed`, `timed_out` or `canceled` job:
        it is `pending` again, with `attempt` one more, a new trigger, a new
        callback URL and idempotency key, and a fresh deadline (`timeout` from
        now). The previous attempt's callback URL answers 410 from then on; the
        job's history keeps every attempt. 409 for a `pending`, `running` or
        `succeeded` job, and for one whose backend is not installed (its
        plugin was removed since).

        The body is optional. `{"attempt": N}` names the attempt that should
        exist afterwards, so a repeated request is safe: a job already at
        attempt N is answered as it is (nothing new starts), a job at N-1
        starts N, anything else is 409 naming the current attempt and state."""
        data = await strict_body(request, RetryRequest, empty=None)
        return await tether.retry_job(job_id, data.attempt if data else None)


class CallbackResponse(msgspec.Struct, frozen=True, omit_defaults=True):
    outcome: Literal["accepted", "duplicate", "noted", "conflict", "gone"]
    """`accepted`, `duplicate`, `noted` (a hint: the backend was asked), `conflict` or `gone`."""
    message: str
    job: Job | None = None
    """The job as the callback left it; left out of a `gone` for an earlier
    attempt's URL (`error.details`: `attempt`, `current_attempt`)."""
    error: ErrorBody | None = None


CALLBACK_STATUS = {
    "accepted": 200,
    "duplicate": 200,
    "noted": 202,
    "conflict": 409,
    "gone": 410,
}


class CallbackController(Controller):
    path = "/callbacks"
    tags = ["callbacks"]  # noqa: RUF012

    @post(
        "/{promise_id:str}",
        status_code=200,
        operation_id="settleJob",
        summary="Report how an external job ended",
        responses={
            200: ResponseSpec(
                CallbackResponse,
                description="`accepted` (this outcome ended the job) or `duplicate` (the same"
                " outcome was recorded before; nothing changed)",
                generate_examples=False,
            ),
            202: ResponseSpec(
                CallbackResponse,
                description="`noted`: a backend-native hint; the backend was asked about the"
                " run at once and only its answer settles the job",
                generate_examples=False,
            ),
            409: ResponseSpec(
                CallbackResponse,
                description="`conflict`: a different outcome was recorded first; nothing changed",
                generate_examples=False,
            ),
            410: ResponseSpec(
                CallbackResponse,
                description="`gone`: the job was canceled or timed out; nothing changed",
                generate_examples=False,
            ),
            **errors(400, 401, 404, 413, 422, 503),
        },
    )
    async def settle(
        self,
        request: Request[Any, Any, Any],
        tether: NamedDependency[Tether],
        promise_id: FromPath[str],
        token: FromQuery[str | None] = None,
    ) -> JsonAnswer:
        """The callback URL a backend hands the external system. The token
        comes from the URL (`?token=`) or as `Authorization: Bearer`; a missing
        or wrong one is 401, whether or not the promise exists.

        Body: `{"status": "succeeded"|"failed", "result"?: any, "error"?:
        {"message", "type"?}}`, or the backend's own native shape. `status` is
        required: a body without it (an empty body included) is 422 and changes
        nothing, unless the backend recognises it. Not JSON is 400; JSON that is
        neither the uniform body nor the backend's is 422."""
        if not token:  # none, or `?token=` empty: the header's
            token = bearer(request)
        try:
            body = await request.body()
        except HTTPException as exc:
            if exc.status_code == 413:  # filed on the job, then the 413 as it was
                length = request.headers.get("content-length", "")
                size = int(length) if DECIMAL.fullmatch(length) else None
                with contextlib.suppress(Exception):
                    await tether.callback_too_large(promise_id, token, size)
            raise
        result = await tether.callback(promise_id, token, body)
        error = None
        if result.outcome in ("conflict", "gone"):
            error = ErrorBody(code=result.outcome, message=result.message, details=result.details)
        return JsonAnswer(
            CallbackResponse(result.outcome, result.message, result.job, error),
            CALLBACK_STATUS[result.outcome],
        )

    @post(
        "/{promise_id:str}/heartbeat",
        status_code=200,
        operation_id="heartbeat",
        summary="Report that an external job is alive, and its progress",
        responses={
            200: ResponseSpec(
                Heartbeat,
                description="Noted: the job's `heartbeat_at` (and `progress`, if given) moved",
                generate_examples=False,
            ),
            **errors(400, 401, 404, 410, 413, 422, 503),
        },
    )
    async def heartbeat(
        self,
        request: Request[Any, Any, Any],
        tether: NamedDependency[Tether],
        promise_id: FromPath[str],
        token: FromQuery[str | None] = None,
    ) -> Response[Any]:
        """The callback URL with `/heartbeat`: the external run says it is
        alive, and may say how far along it is. Same token as the callback
        URL (`?token=` or `Authorization: Bearer`); 401 without it.

        Body (optional): `{"progress"?: any JSON of at most 16 KiB}`; it
        becomes the job's `progress` (absent or null keeps the one it has).
        Answers the job's `state`, its `deadline`, and `heartbeat_due`: by
        when the next heartbeat must come when the job has a
        `heartbeat_timeout`. 410 once the job has ended (`details`: the
        URL's `attempt` and how it ended, `state`), or once a retry replaced
        the URL's attempt (`details`: its `attempt` and the job's
        `current_attempt`); nothing changes."""
        if not token:  # none, or `?token=` empty: the header's
            token = bearer(request)
        result, gone = await tether.heartbeat(promise_id, token, await request.body())
        if gone is not None:
            return error_response(410, "gone", gone.message, gone.details)
        return Response(result)


class BackendController(Controller):
    path = "/backends"
    tags = ["backends"]  # noqa: RUF012

    @post(
        "/{name:str}/notifications",
        status_code=200,
        operation_id="backendNotification",
        summary="Take a backend system's own notification",
        responses={
            200: ResponseSpec(
                NoticeResult,
                description="Taken: the jobs whose runs it is about (none for a run this"
                " service did not start: nothing changed), each checked with its backend",
                generate_examples=False,
            ),
            **errors(400, 401, 404, 413, 422, 503),
        },
    )
    async def notification(
        self,
        request: Request[Any, Any, Any],
        tether: NamedDependency[Tether],
        name: FromPath[str],
        token: Annotated[
            str | None,
            QueryParameter(
                description="A token, for a backend that takes one in the URL (Databricks:"
                " `TETHER_DATABRICKS_NOTIFY_TOKEN`); every query parameter goes to the backend"
            ),
        ] = None,
    ) -> NoticeResult:
        """One endpoint per backend for its external system's own notifications,
        such as a Databricks workspace's notification destination (one URL for
        every job, unlike callback URLs). Not behind the API token: the
        backend's plugin authenticates each request from credentials it is
        configured with (Databricks: basic auth or `?token=`), and 401 changes
        and records nothing.

        The body is the system's own JSON. The backend reads which runs it is
        about; for each run a job of this service started, the job's history
        gets a `notification` event and the backend's status check is asked at
        once: only what it says settles the job. A run no job here started is
        200 with no jobs, and nothing is written. Not JSON is 400; a body the
        backend cannot read is 422; an unknown backend, or one that takes no
        notifications (or has none configured), is 404 naming it."""
        del token  # declared for the document; the backend reads the whole query
        headers: dict[str, str] = {}
        for key, value in request.headers.multi_items():
            key = key.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        given = request.query_params
        query = {key: list(given.getall(key)) for key in given}
        return await tether.backend_notification(name, headers, query, await request.body())


@get(
    "/health",
    tags=["health"],
    operation_id="health",
    summary="Is the service up",
    responses=errors(400, 503),
)
async def health(tether: NamedDependency[Tether]) -> dict[str, Any]:
    """200 `{"status": "ok", "store": ..., "backends": [...]}` when the store
    answers, else 503: also when it takes over 2 s (probe with a timeout of
    3 s or more). Needs no token: it is for probes."""
    return await tether.health()


@head("/health", include_in_schema=False)
async def health_head(tether: NamedDependency[Tether]) -> Response[None]:
    """`GET /health`'s status, without its body: a probe sent as `HEAD` was
    answered 405 (found by an exploratory QA pass)."""
    await tether.health()
    return Response(None, media_type="text/plain")  # (as JSON, None is `null`: 4 bytes)


@any_route("/health", http_method=[HttpMethod.OPTIONS], include_in_schema=False)
async def health_options(tether: NamedDependency[Tether]) -> dict[str, Any]:
    """`GET /health`, for HAProxy's `option httpchk /health`, which probes
    with OPTIONS: Litestar answered every OPTIONS 204, a dead store's too
    (found by an exploratory QA pass)."""
    return await tether.health()
