"""The `tether` command's client verbs: a thin client of the HTTP API.

Each verb is one request (or a few) to a running service at `--url`, with the
API token from `$TETHER_API_TOKEN`; it prints a table, or with `--json`
exactly what the service answered. Exit codes mean something to scripts:

- 0: done (for `watch` and `submit --wait`: the job `succeeded`);
- 1: the job `failed` or `timed_out` (`watch`, `submit --wait`);
- 2: usage error (click's own);
- 3: the job was `canceled` (`watch`, `submit --wait`);
- 4: the service could not be reached, or answered with an error (its
  message on stderr, nothing on stdout).

The verbs are mounted into the main `tether` group with `add_client_commands`;
`main()` runs them alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import IO, Any, NoReturn, get_args
from urllib.parse import urlsplit, urlunsplit

import click
import httpx
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from core.errors import near_hint, os_reason
from core.models import (
    CANCEL_REASON_MAX,
    FINAL_STATES,
    HEARTBEAT_TIMEOUT_MIN,
    JobState,
    attempt_began,
    job_segment,
)
from core.settings import listed, unsendable

DEFAULT_URL = "http://127.0.0.1:8000"

EXIT_CODES = {"succeeded": 0, "failed": 1, "timed_out": 1, "canceled": 3}
"""`watch` and `submit --wait`: how the job ended, as an exit status."""
SERVICE_ERROR = 4

POLL = 0.5
"""Seconds between reads of a watched job when its service streams no events."""
SAFETY_POLL = 5.0
"""Seconds between reads of a watched job while its events stream: each event
rereads it at once, this only covers a state change that brings no event."""
RECONNECT_DELAYS = (0.2, 0.5, 1.0, 2.0, 4.0)
"""Pauses before each new try once a service stops answering mid-watch or
mid-stream (a restart), the last repeated until `OUTAGE_FOR` has passed:
then the command gives up with exit status 4."""
OUTAGE_FOR = 120.0
"""Seconds `watch`, `submit --wait` and `events --follow` go on trying while
their service cannot be reached or answers `RESTARTING` (a restart, a deploy:
they gave up after about 8 s, and a CI job waiting on a job that then
succeeded reported a service error; found by an exploratory QA pass), as
`tether complete` goes on for `RETRY_FOR`."""
RETRY_FOR = 120.0
"""Seconds `tether complete` (and `tether heartbeat`) go on trying when the
service cannot be reached or answers `RESTARTING` (`--retry-for`): an
external job's outcome is worth a wait through a restart, and repeating a
callback or a heartbeat is safe (a repeated outcome is a duplicate)."""


RETRY_FOR_MAX = 7 * 86400.0
"""The most `--retry-for` takes (a week; `nan` and `inf` are refused too)."""


def finite(seconds: float) -> float:
    """`seconds`, unless it is `nan` (which every range lets through)."""
    if math.isnan(seconds):
        raise click.BadParameter("not a number of seconds")
    return seconds


def finite_or_none(seconds: float | None) -> float | None:
    """`finite`, for an option that may be left out; `inf` is refused too:
    JSON has no such number, so the request could not be sent."""
    if seconds is not None and not math.isfinite(seconds):
        raise click.BadParameter("not a finite number of seconds")
    return seconds


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


retry_for_option = click.option(
    "--retry-for",
    type=click.FloatRange(min=0, max=RETRY_FOR_MAX),
    callback=lambda ctx, param, value: finite(value),
    default=RETRY_FOR,
    show_default=True,
    metavar="SECONDS",
    help="Go on trying this long while the service cannot be reached or is restarting"
    " (502-504); 0: one try.",
)
"""`--retry-for` of the commands an external job runs (`post_to`)."""


FULL = "too_many_streams"
"""A service's answer (503) when it holds as many streams as it may: it is
up, so a stream asked for is waited for, never given up (`events --follow`
gave up after `OUTAGE_FOR` while `watch` went on: a QA pass), asking again
every `FULL_PAUSE` seconds."""
FULL_PAUSE = 5.0
HEALTHY_STREAM = 5.0
"""Seconds a stream that brought no event must have stayed open to count as
a service that answers (a stream waiting past `finished` for a notification
is quiet for a long time, and a restart closes it): its close is then not
one of the `RECONNECT_DELAYS` tries."""
STREAM_TIMEOUT = httpx.Timeout(10.0, read=45.0)
"""The event stream sends a comment every 15 s: 45 s of silence is a dead connection."""
PAGE = 1000
"""Jobs or events asked for at once: the most the service gives."""
SHOWN_EVENTS = 10
"""Events `watch` shows: the latest ones."""

STATE_STYLES = {
    "succeeded": "green",
    "failed": "red",
    "timed_out": "red",
    "canceled": "yellow",
    "running": "cyan",
}

# ── errors: one line on stderr, exit status 4 ─────────────────────────────────


class ServiceError(click.ClickException):
    """The service answered with an error, or could not be reached."""

    exit_code = SERVICE_ERROR

    def __init__(
        self,
        message: str,
        status: int | None = None,
        *,
        reached: bool = True,
        retry_after: float = 0.0,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        """The service's `error.code`, when it gave one."""
        self.reached = reached
        """False: no answer came (`unreachable`)."""
        self.retry_after = retry_after
        """Seconds a 429 asked to wait before the next try (`Retry-After`)."""

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"tether: {printable(self.message)}", err=True)


def checked(url: str, hint: str) -> str:
    """`url`, if it is an http:// or https:// URL whose host and port can be
    read; else `click.BadParameter` for the option or argument `hint`,
    without the URL (a callback URL's token is in it)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (it raises for a port out of range)
    except ValueError:
        raise click.BadParameter(
            "not a URL: its host or port cannot be read", param_hint=hint
        ) from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise click.BadParameter("not an http:// or https:// URL", param_hint=hint)
    return url


def public(url: str) -> str:
    """`url` as it may be shown: no query string (a callback URL's token is
    there) and no user or password."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def unreachable(
    url: str, exc: httpx.TransportError, method: str = "GET", repeatable: bool = False
) -> ServiceError:
    """`cannot reach URL: why`. The reason is chosen here, never the exception's
    own text, which may quote the URL with its token. A change (`method`
    other than GET) that was sent and not answered in time may have been
    made: said so, where "cannot reach" said it was not (found by a QA
    pass), with whether to look first or send it again (`repeatable`: a
    callback's or heartbeat's report, which is a duplicate the second time)."""
    sent = not isinstance(exc, (httpx.ConnectTimeout, httpx.PoolTimeout))
    if isinstance(exc, httpx.TimeoutException) and sent and method not in ("GET", "HEAD"):
        then = (
            "sending it again is safe (the same report again is a duplicate)"
            if repeatable
            else "look (tether get ID) before sending it again"
        )
        return ServiceError(
            f"{public(url)} took the request and did not answer in time: it may have been"
            f" made; {then}",
            reached=False,
        )
    if isinstance(exc, httpx.TimeoutException):
        why = "no answer in time"
    elif isinstance(exc, httpx.UnsupportedProtocol):
        why = "not an http:// or https:// URL"
    elif isinstance(exc, httpx.ConnectError):
        why = os_reason(exc) or "could not connect"
    else:
        why = os_reason(exc) or "the connection broke"
    return ServiceError(f"cannot reach {public(url)}: {why}", reached=False)


def error_answer(response: httpx.Response) -> ServiceError:
    """The service's own message (`{"error": {"message"}}`), with the status."""
    code = None
    try:
        error = response.json()["error"]
        message = str(error["message"])
        code = error.get("code") if isinstance(error.get("code"), str) else None
    except (ValueError, KeyError, TypeError, AttributeError):
        message = response.reason_phrase or "error"
    status = response.status_code
    wait = _retry_after(response) if status == 429 else 0.0
    return ServiceError(f"{message} (HTTP {status})", status, retry_after=wait, code=code)


# ── the service ───────────────────────────────────────────────────────────────


def api_token() -> str:
    """The first token of `$TETHER_API_TOKEN` (the service takes several,
    comma-separated, while one replaces another)."""
    token = next(iter(listed(os.environ.get("TETHER_API_TOKEN", ""))), "")
    if unsendable(token):  # httpx refused it as the request went out: "the connection broke"
        raise click.UsageError(
            "TETHER_API_TOKEN holds a control character (a line break?) or one past ASCII,"
            " which no Authorization header can carry; set the token alone"
        )
    return token


def an_id(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """A job ID argument as given: an empty one names no job (its requests
    would go to the list's route, `/jobs/`, and be answered confusingly)."""
    if not value:
        raise click.BadParameter("an empty ID names no job", ctx=ctx, param=param)
    return value


def job_path(job_id: str, *rest: str) -> str:
    return "/".join(("/jobs", job_segment(job_id), *rest))


URL_HINT = "'--url' (or $TETHER_URL)"
"""Where a bad service URL came from, as an error names it: the option, or
the environment it defaults to (a bad $TETHER_URL was called a bad
'--url', which no one had given: a QA pass, 2026-12-07)."""


class Api:
    """One service, reached over HTTP with the API token."""

    def __init__(self, url: str) -> None:
        self.url = checked(url, URL_HINT).rstrip("/")
        if "?" in url or "#" in url or "@" in urlsplit(self.url).netloc:
            raise click.BadParameter(
                "give the service's base URL alone, with no ?query, #fragment or"
                " user:password@ (the API token goes in $TETHER_API_TOKEN)",
                param_hint=URL_HINT,
            )
        token = api_token()
        try:
            self.http = httpx.AsyncClient(
                base_url=self.url,
                headers={"authorization": f"Bearer {token}"} if token else {},
                timeout=30,
            )
        except httpx.InvalidURL:
            raise click.BadParameter(f"not a URL: {public(url)}", param_hint=URL_HINT) from None

    async def send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """The answer to one request; `ServiceError` when there is none or it is an error."""
        try:
            response = await self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise unreachable(self.url, exc, method) from None
        except httpx.DecodingError:
            raise undecodable(self.url) from None
        if response.is_error:
            raise error_answer(response)
        return response

    async def call(self, method: str, path: str, shape: tuple[str, ...], **kwargs: Any) -> Any:
        """The JSON object the service answered one request with, which has
        the fields `shape` names (A_JOB, A_PAGE)."""
        return payload(await self.send(method, path, **kwargs), shape)


A_JOB = ("id", "state")
"""The fields the commands read of a job, as `GET /jobs/ID` answers it."""
A_PAGE = ("items", "next_cursor")
"""... of a page of jobs or events."""
A_SETTLE = ("outcome", "message", "job")
"""... of a callback's answer."""
A_BEAT = ("state", "deadline")
"""... of a heartbeat's answer."""


def undecodable(url: str) -> ServiceError:
    """An answer whose body its own `Content-Encoding` cannot undo (not a
    Tether there): said in one line, not an `httpx.DecodingError`'s
    traceback (found by a review, 2026-12-07)."""
    return ServiceError(
        f"{public(url)} answered with a body its Content-Encoding cannot undo:"
        " is it a Tether service?"
    )


def payload(response: httpx.Response, shape: tuple[str, ...]) -> Any:
    """A success's JSON object, with the fields `shape` names; `ServiceError`
    when it is something else (not a Tether there: another service on that
    port answering 200)."""
    where = public(str(response.url))
    try:
        data = response.json()
    except ValueError:
        raise ServiceError(f"{where} answered {response.status_code} without JSON") from None
    missing = [field for field in shape if not isinstance(data, dict) or field not in data]
    if missing:
        raise ServiceError(
            f"{where} answered {response.status_code} with JSON that is not Tether's"
            f" (no {missing[0]!r}): is it a Tether service?"
        )
    return data


def run[T](work: Callable[[Api], Awaitable[T]], url: str) -> T:
    """Run one command's requests against the service at `url`."""

    async def session() -> T:
        api = Api(url)
        _SAID_WAITING[0] = -math.inf  # (a command's own: tests run many in one process)
        async with api.http:
            return await work(api)

    return asyncio.run(session())


RESTARTING = (502, 503, 504)
"""Answers that mean a service (or the proxy in front of it) is restarting
or briefly without its store: tried again, as silence is."""
WAITED_OUT = (*RESTARTING, 429)
"""What `watch`, `submit --wait` and `events --follow` wait out within
`OUTAGE_FOR`: a restart, and a 429 the address's wrong tokens (another
client's, since a wrong token of their own is a 401 first) made (found by
a review)."""


async def patiently[T](call: Callable[[], Awaitable[T]]) -> T:
    """`call()`, tried again while the service cannot be reached or answers
    `WAITED_OUT` (it may be restarting), pausing `RECONNECT_DELAYS`; its
    `ServiceError` once they are spent and `OUTAGE_FOR` has passed."""
    tries, since = 0, time.monotonic()
    while True:
        try:
            return await call()
        except ServiceError as exc:
            if exc.reached and exc.status not in WAITED_OUT:  # an answer (another
                raise  # service's 200 too: it was read as an outage, a QA pass)
            if given_up(tries, since):
                raise
            asked = exc.retry_after  # a 429's: its wrong tokens are read no sooner
            if tries == 0:
                say_waiting(exc)
        await asyncio.sleep(max(RECONNECT_DELAYS[min(tries, len(RECONNECT_DELAYS) - 1)], asked))
        tries += 1


_SAID_WAITING = [-math.inf]
"""When (`time.monotonic`) `say_waiting` last said so."""


def say_waiting(failure: ServiceError) -> None:
    """Say on stderr, once an outage begins, that the command waits it out
    (`events --follow` at an address that never answers said nothing for
    two minutes: a QA pass, 2026-12-07); once for a watch's stream and its
    reads together, which meet the same outage (at most once in
    `OUTAGE_FOR`)."""
    now = time.monotonic()
    if now - _SAID_WAITING[0] < OUTAGE_FOR:
        return
    _SAID_WAITING[0] = now
    said = printable(failure.message)
    click.echo(f"tether: {said}; trying again for up to {OUTAGE_FOR:g}s", err=True)


def given_up(tries: int, since: float) -> bool:
    """Whether an outage is given up after `tries` tries again since the
    monotonic time `since`: every pause of `RECONNECT_DELAYS` made, and
    `OUTAGE_FOR` passed."""
    return tries >= len(RECONNECT_DELAYS) and time.monotonic() - since >= OUTAGE_FOR


# ── events: pages, or a server-sent event stream ──────────────────────────────


async def event_pages(api: Api, job_id: str) -> dict[str, Any]:
    """Every recorded event of a job, oldest first, following `next_cursor`;
    the last page's other fields (`dropped`)."""
    items: list[Any] = []
    params: dict[str, Any] = {"limit": PAGE}
    while True:
        page: dict[str, Any] = await api.call(
            "GET", job_path(job_id, "events"), A_PAGE, params=params
        )
        items += page["items"]
        if not page.get("next_cursor"):
            return {**page, "items": items}
        params = {"limit": PAGE, "cursor": page["next_cursor"]}


STREAM_ENDS = "tether-stream-ends"
"""The header of an event stream that ends with `event: end` (`data:
{"type": "end"}`, no `id`) once nothing more will be filed that it waits
for; a stream closed without it was dropped or its service stopped."""
PING = "ping"
"""The event a quiet stream sends every 15 s (`core.events.PING`; the CLI
does not import the service's modules)."""


SSE_LINE_END = re.compile(r"\r\n|\r|\n")
"""Where a line of an event stream ends: CR LF, or CR or LF alone."""


async def sse_lines(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """An event stream's lines, ended as the SSE format ends them and
    nowhere else. httpx's `aiter_lines` also splits at U+2028, U+2029 and
    U+0085, as `str.splitlines` does, and an event whose data held one (a
    cancel's reason, a webhook's answer) broke `tether events --follow` for
    good: "not JSON" (found by a QA pass, 2026-12-07). Each chunk is read
    once (a long line in many chunks is not read again at each: a review),
    and a CR last in a chunk ends its line, an LF first in the next then
    being the rest of that CR LF."""
    partial: list[str] = []
    after_cr = False
    async for chunk in chunks:
        if not chunk:
            continue
        if after_cr and chunk[0] == "\n":
            chunk = chunk[1:]
        after_cr = chunk.endswith("\r")
        *ended, rest = SSE_LINE_END.split(chunk)
        for piece in ended:
            partial.append(piece)
            yield "".join(partial)
            partial = []
        if rest:
            partial.append(rest)
    if partial:
        yield "".join(partial)


async def sse_items(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str | None, Any]]:
    """Server-sent events as (`id`, `data` parsed as JSON). The `event:` field
    repeats the item's `type`; keep-alives (`event: ping`, or a comment from
    a service older than it) carry nothing."""
    event_id: str | None = None
    event = ""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data and event != PING:
                try:
                    yield event_id, json.loads("\n".join(data))
                except ValueError:
                    raise ServiceError("the event stream sent data that is not JSON") from None
            event_id, event, data = None, "", []
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "id":
            event_id = value
        elif name == "event":
            event = value
        elif name == "data":
            data.append(value)


async def stream_events(api: Api, job_id: str, on_event: Callable[[dict[str, Any]], None]) -> None:
    """Every event of a job, recorded then live, handed to `on_event` until
    the service says the stream has ended (`event: end`, after the `finished`
    of the job's attempt and the events filed after it: the service keeps the
    stream open while one is due, such as the completion notification's tries
    or the stop of a canceled job's run). A stream that closes without it (a
    dropped connection, a service or proxy restarting: `RESTARTING`) is
    resumed after the last event seen (`Last-Event-ID`), so none is missed or
    repeated; after `RECONNECT_DELAYS` tries in a row that brought no event
    and lasted less than `HEALTHY_STREAM`, and `OUTAGE_FOR` since the first
    of them, `ServiceError`. A service older
    than `end` (its stream has no `STREAM_ENDS` header) ends a stream after
    `finished`, saying nothing: that close is the end. `ServiceError` too
    when the job was deleted before its `finished` was seen."""
    last_id: str | None = None
    tries, since = 0, time.monotonic()
    said_full = False
    finished: int | None = None
    """The attempt of the last `finished` seen, unless a later attempt's event
    followed it (a retry, which the stream follows)."""
    while True:
        headers = {"accept": "text/event-stream"}
        if last_id is not None:
            headers["last-event-id"] = last_id
        got_one, opened = False, time.monotonic()
        try:
            async with api.http.stream(
                "GET", job_path(job_id, "events"), headers=headers, timeout=STREAM_TIMEOUT
            ) as response:
                if response.is_error:
                    await response.aread()
                    raise error_answer(response)
                if not response.headers.get("content-type", "").startswith("text/event-stream"):
                    raise ServiceError("the service answered the event stream with something else")
                says_end = response.headers.get(STREAM_ENDS) == "end"
                async for event_id, item in sse_items(sse_lines(response.aiter_text())):
                    if event_id is None and item.get("type") == "end":
                        if finished is None:
                            raise ServiceError(f"job {job_id!r} was deleted", 404)
                        return
                    last_id, got_one = event_id or last_id, True
                    on_event(item)
                    attempt = item.get("attempt")
                    if item.get("type") == "finished":
                        finished = attempt if isinstance(attempt, int) else 0
                    elif finished is not None and isinstance(attempt, int) and attempt > finished:
                        finished = None
                if finished is not None and not says_end:
                    return  # an older service: its stream ends after `finished`
        except httpx.TransportError as exc:
            failure = unreachable(api.url, exc)
        except httpx.DecodingError:
            raise undecodable(api.url) from None
        except ServiceError as exc:
            if exc.status == 404 and finished is not None:
                return  # deleted after its end was seen (retention)
            if exc.status not in WAITED_OUT:
                raise
            failure = exc
        else:  # closed without its end: a dropped connection, a service stopping
            failure = ServiceError(f"the event stream from {public(api.url)} keeps ending early")
        healthy = got_one or time.monotonic() - opened >= HEALTHY_STREAM
        if failure.code == FULL:  # the service answers: waited for, never given up
            if not said_full:
                click.echo(f"tether: {printable(failure.message)}; waiting for room", err=True)
                said_full = True
            tries, since = 0, time.monotonic()
            await asyncio.sleep(FULL_PAUSE)
            continue
        if healthy:
            tries, since = 0, time.monotonic()
        elif given_up(tries, since):
            raise failure
        else:
            if tries == 0:
                say_waiting(failure)
            tries += 1
        pause = RECONNECT_DELAYS[min(tries, len(RECONNECT_DELAYS)) - 1] if tries else 0
        await asyncio.sleep(max(pause, failure.retry_after))  # a 429 asks for a wait


async def explained[T](api: Api, job_id: str, work: Awaitable[T]) -> T:
    """`work`, with its 404 explained: an unknown job, or a service that
    records no events (a Tether older than the events route)."""
    try:
        return await work
    except ServiceError as exc:
        if exc.status != 404:
            raise
        await api.call("GET", job_path(job_id), A_JOB)  # "no job 'x'" when that is what it meant
        raise ServiceError(f"{public(api.url)} records no events (HTTP 404)", 404) from None


# ── watching a job ────────────────────────────────────────────────────────────


async def watch_job(
    api: Api, job_id: str, show: Callable[[dict[str, Any], list[dict[str, Any]]], None]
) -> dict[str, Any]:
    """Follow a job until it ends, calling `show(job, events)` on each change;
    the ended job. Events come from the job's event stream; a service without
    one (404 for a job that exists) shows none, and the state is read every
    `POLL` seconds instead."""
    # waited out as every later read is (a watch begun during a restart, or
    # behind an address another client's wrong tokens locked out, gave up at
    # once: a QA pass, 2026-12-07)
    job: dict[str, Any] = await patiently(lambda: api.call("GET", job_path(job_id), A_JOB))
    events: list[dict[str, Any]] = []
    changed = asyncio.Event()

    ended = asyncio.Event()
    """The `finished` of the job's attempt came: the stream goes on after it
    (what is filed after the end), the watch does not."""
    finished_at = 0
    """The attempt of the last `finished` seen (a retry's is later)."""

    def got(item: dict[str, Any]) -> None:
        nonlocal finished_at
        events.append(item)
        if item.get("type") == "finished":
            finished_at = max(finished_at, item.get("attempt", 0))
            if finished_at >= job.get("attempt", 1):
                ended.set()
        changed.set()

    async def follow() -> None:
        try:
            await stream_events(api, job_id, got)
        except ServiceError:
            pass  # no stream: the state is read every POLL seconds instead
        finally:
            changed.set()  # the wait below takes its next pace from here

    stream = asyncio.create_task(follow())
    try:
        while job["state"] not in FINAL_STATES:
            show(job, events)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), POLL if stream.done() else SAFETY_POLL)
            changed.clear()
            job = await patiently(lambda: api.call("GET", job_path(job_id), A_JOB))
        if finished_at < job.get("attempt", 1):
            ended.clear()  # an earlier attempt's: the job was retried since
        last = asyncio.ensure_future(ended.wait())
        try:  # its last events, `finished` among them
            await asyncio.wait([stream, last], timeout=2, return_when=asyncio.FIRST_COMPLETED)
        finally:
            last.cancel()
    finally:
        stream.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stream
    show(job, events)
    return job


def watch(url: str, job_id: str, as_json: bool, started: dict[str, Any] | None = None) -> NoReturn:
    """`watch`, and `submit --wait` once submitted: a live display on a
    terminal, a line per change in a log or pipe, with `--json` only the ended
    job; then the exit status of how the job ended."""
    console = Console()
    if as_json:
        job = run(lambda api: watch_job(api, job_id, lambda job, events: None), url)
        click.echo(json.dumps(job))
    elif console.is_terminal and not console.is_dumb_terminal:
        now: list[Any] = [started, []]

        def view() -> RenderableType:
            return watch_view(*now) if now[0] else Text(f"job {job_id}")

        def show(job: dict[str, Any], events: list[dict[str, Any]]) -> None:
            now[:] = [job, events]

        with Live(console=console, get_renderable=view, refresh_per_second=2):
            job = run(lambda api: watch_job(api, job_id, show), url)
    else:  # a line per change, never wrapped (`line`)
        job = run(lambda api: watch_job(api, job_id, changes(console)), url)
    raise click.exceptions.Exit(EXIT_CODES.get(job["state"], SERVICE_ERROR))


def changes(console: Console) -> Callable[[dict[str, Any], list[dict[str, Any]]], None]:
    """A `show` for `watch_job` that prints each new event and state as a line."""
    seen: dict[str, Any] = {"events": 0, "state": None}

    def show(job: dict[str, Any], events: list[dict[str, Any]]) -> None:
        for event in events[seen["events"] :]:
            line(console, event_line(event))
        seen["events"] = len(events)
        if job["state"] != seen["state"]:
            seen["state"] = job["state"]
            line(console, headline(job))
            if job["state"] in FINAL_STATES and job.get("error"):
                line(console, error_line(job))

    return show


# ── what is printed ───────────────────────────────────────────────────────────


def cell(value: Any) -> Text:
    """A value as plain text (never read as Rich markup): JSON for structures."""
    if value is None:
        return Text("-", style="dim")
    if isinstance(value, str):
        return Text(printable(value))
    return Text(printable(json.dumps(value, ensure_ascii=False)))


_CONTROLS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """`text` with its control characters (but tab) written as escapes
    (`\\x1b`, `\\x0a`), and its format and line-separator characters too
    (`\\u202e`, a bidirectional override; `\\u200b`, zero width). What a job
    holds came from outside (an error message a callback sent, a backend's
    answer): a terminal obeys an escape sequence (it could clear the line,
    recolour it, or set the title), a newline would print a line of the
    sender's choosing (`FAKE: job … succeeded`), and an override would show
    text other than what is there (found by an exploratory QA pass)."""
    text = _CONTROLS.sub(lambda found: f"\\x{ord(found[0]):02x}", text)
    if text.replace("\t", " ").isprintable():
        return text
    return "".join(c if c.isprintable() or c == "\t" else _escaped(c) for c in text)


def _escaped(char: str) -> str:
    code = ord(char)
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def moment(value: str | None) -> str | None:
    """A time of the service's, to the second, for a table (--json has it
    whole); one that is no time, as written (escaped where shown: only an
    impostor at `--url` sends one, and it made a traceback, a QA pass)."""
    if not value:
        return value
    try:
        return datetime.fromisoformat(value).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (ValueError, TypeError):
        return str(value)


def state_text(state: str) -> Text:
    """A job's state, coloured; escaped as every field is (an impostor's
    `state` with control characters reached the terminal: a QA pass)."""
    return Text(printable(str(state)), style=STATE_STYLES.get(state, ""))


def widest(cells: Iterable[RenderableType]) -> int:
    return max((c.cell_len for c in cells if isinstance(c, Text)), default=1)


def keep_whole(table: Table, *names: str) -> Table:
    """Size `table`'s columns so that the named ones are never wrapped, folded
    or cut, however narrow the output: ids and times are copied, grepped and
    split on blanks. The others fold, down to their heading's width (`shown`
    makes the output at least that wide)."""
    for column in table.columns:
        heading = Text(str(column.header))
        if column.header in names:
            column.no_wrap = True
            column.min_width = widest([heading, *column.cells])
        else:
            column.min_width = max(heading.cell_len, 1)
    return table


def job_table(job: dict[str, Any]) -> Table:
    """Every field of a job, one per row, in the service's order."""
    table = Table(show_header=False, box=None, padding=(0, 2, 0, 0))
    table.add_column(style="bold", no_wrap=True, min_width=widest(map(Text, job)))
    table.add_column(overflow="fold")
    kept: list[Text] = []
    for name, value in job.items():
        text = state_text(value) if name == "state" else cell(value)
        if name in WHOLE_FIELDS or is_time(value):
            kept.append(text)
        table.add_row(name, text)
    table.columns[1].min_width = widest(kept)  # whole: the others (params, URLs) fold to it
    return table


WHOLE_FIELDS = {"id", "backend", "state", "attempt"}
"""A job's fields `job_table` shows whole, beside its times."""


def is_time(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


def jobs_table(jobs: Iterable[dict[str, Any]]) -> Table:
    table = Table(box=None)
    for name in JOBS_COLUMNS:
        table.add_column(name)
    for job in jobs:
        table.add_row(
            cell(job["id"]),
            cell(job["backend"]),
            state_text(job["state"]),
            cell(moment(job.get("created_at"))),
            cell(moment(job.get("finished_at"))),
        )
    return keep_whole(table, *JOBS_COLUMNS)  # ids, names, times: all whole


JOBS_COLUMNS = ("id", "backend", "state", "created_at", "finished_at")


EVENT_FIELDS = ("seq", "at", "type", "attempt", "data")


def events_table(events: Iterable[dict[str, Any]]) -> Table:
    """The events, a row each; where the history's bound dropped some from
    the middle, a row saying how many, at the gap (it was said after the
    table only, seq jumping from 10 to 351 unmarked: found by a QA pass)."""
    table = Table(box=None)
    for name in EVENT_FIELDS:
        table.add_column(name, overflow="fold")
    last = None
    for event in events:
        seq = event.get("seq")
        if isinstance(seq, int) and isinstance(last, int) and seq > last + 1:
            gap = Text(f"… {seq - last - 1} events no longer kept …", "dim")
            table.add_row(Text("…", "dim"), Text(""), gap, Text(""), Text(""))
        table.add_row(*event_cells(event))
        last = seq
    return keep_whole(table, "seq", "at", "type", "attempt")  # `data` folds


def event_cells(event: dict[str, Any]) -> list[Text]:
    return [cell(moment(event[k]) if k == "at" else event.get(k)) for k in EVENT_FIELDS]


def event_line(event: dict[str, Any]) -> Text:
    return Text("  ").join(event_cells(event))


def elapsed(job: dict[str, Any]) -> str:
    """Time since the job's attempt began (its creation, or the retry that
    began it: its `deadline` less its `timeout`), up to when it finished. (A
    retry's run showed the time since the job's creation: a day at once,
    found by a QA pass, 2026-12-07.)"""
    try:
        end = datetime.fromisoformat(job["finished_at"]) if job.get("finished_at") else None
        seconds = int(((end or datetime.now(UTC)) - attempt_began(job)).total_seconds())
    except (ValueError, TypeError, KeyError):  # no times (an impostor's answer: `moment`)
        return "?"
    minutes, secs = divmod(max(seconds, 0), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def headline(job: dict[str, Any]) -> Text:
    return Text.assemble(
        ("job ", "dim"),
        printable(job["id"]),
        "  ",
        state_text(job["state"]),
        ("  elapsed ", "dim"),
        elapsed(job),
    )


def error_line(job: dict[str, Any]) -> Text:
    return Text(f"error: {printable(str(job['error'].get('message', '')))}", style="red")


def watch_view(job: dict[str, Any], events: list[dict[str, Any]]) -> RenderableType:
    parts: list[RenderableType] = [headline(job)]
    if job.get("error"):
        parts.append(error_line(job))
    if events:
        parts.append(events_table(events[-SHOWN_EVENTS:]))
    return Group(*parts)


def emit(payload: Any, as_json: bool, table: Callable[[], RenderableType]) -> None:
    """The service's payload as JSON, or a table of it."""
    if as_json:
        click.echo(json.dumps(payload))
    else:
        shown(Console(), table())


def shown(console: Console, renderable: RenderableType) -> None:
    """Print a table (or a group of them) with no id or time wrapped or cut.

    Into a pipe or a file it is as wide as its widest row, whatever width Rich
    would assume there (80 columns, or $COLUMNS): one row a line, for grep,
    awk and copying. On a terminal its other columns fold to fit (`keep_whole`);
    a terminal narrower than that leaves rows past its edge, for it to wrap,
    rather than cut."""
    if console.is_terminal:
        console.width = max(console.width, least_width(renderable))
        console.print(renderable, crop=False)
        return
    unbounded = console.options.update_width(sys.maxsize)
    console.width = max(console.width, Measurement.get(console, unbounded, renderable).maximum)
    with console.capture() as captured:
        console.print(renderable, crop=False)
    # without the padding to the widest row (a megabyte-wide result would pad every line)
    console.file.write("".join(f"{row.rstrip()}\n" for row in captured.get().splitlines()))


def least_width(renderable: RenderableType) -> int:
    """The narrowest output in which Rich squeezes no column of `renderable`
    below its `min_width` (these tables have no box: columns and padding)."""
    if isinstance(renderable, Table):
        _, right, _, left = renderable.padding
        return sum((column.min_width or 1) + left + right for column in renderable.columns)
    if isinstance(renderable, Group):
        return max(map(least_width, renderable.renderables), default=0)
    return 0


def line(console: Console, text: Text) -> None:
    """Print one line of a log of changes (`watch` into a pipe, `events
    --follow`) as one line, however long: the terminal, if any, wraps it."""
    console.print(text, soft_wrap=True)


# ── options ───────────────────────────────────────────────────────────────────


class JsonValue(click.ParamType[Any]):
    """JSON text, or `@FILE` for the JSON in a file (`@-`: standard input). A
    value that is not JSON (or not an object, with `objects`) is a usage error
    naming the option."""

    name = "JSON|@FILE"

    def __init__(self, objects: bool = True) -> None:
        self.objects = objects

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        text, where = value, ""
        if value.startswith("@"):
            try:
                with click.open_file(value[1:], encoding="utf-8") as file:
                    text, where = file.read(), f" in {value[1:]}"
            except OSError as exc:
                self.fail(f"cannot read {value[1:]}: {exc.strerror}", param, ctx)
        try:
            parsed = json.loads(text, parse_constant=_no_constant)  # NaN, Infinity
        except ValueError as exc:
            self.fail(f"not valid JSON{where}: {exc}", param, ctx)
        if self.objects and not isinstance(parsed, dict):
            self.fail(f"must be a JSON object{where}, not {type(parsed).__name__}", param, ctx)
        return parsed


def json_option[F: Callable[..., Any]](function: F) -> F:
    return click.option(
        "--json",
        "as_json",
        is_flag=True,
        help="Print the service's answer as JSON (for scripts) instead of a table.",
    )(function)


def service_options[F: Callable[..., Any]](function: F) -> F:
    """`--url` and `--json`, which every verb that talks to the service takes."""
    return click.option(
        "--url",
        envvar="TETHER_URL",
        default=DEFAULT_URL,
        show_default=True,
        show_envvar=True,
        metavar="URL",
        help="The Tether service. The API token, if it needs one, comes from"
        " $TETHER_API_TOKEN (the first, if it holds several, comma-separated).",
    )(json_option(function))


# ── the verbs ─────────────────────────────────────────────────────────────────


@click.command()
@click.argument("backend")
@click.option("--id", "job_id", metavar="ID", help="The job's id (a new unique one if absent).")
@click.option(
    "--params",
    type=JsonValue(),
    default=None,
    help="The backend's parameters: a JSON object, or @FILE to read it from a file.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    callback=lambda ctx, param, value: finite_or_none(value),
    metavar="S",
    help="Seconds the job may wait for its outcome (the service's default if absent).",
)
@click.option(
    "--metadata",
    type=JsonValue(),
    default=None,
    help="Anything to keep with the job: a JSON object, or @FILE.",
)
@click.option(
    "--heartbeat-timeout",
    type=click.FloatRange(min=HEARTBEAT_TIMEOUT_MIN),
    callback=lambda ctx, param, value: finite_or_none(value),
    metavar="S",
    help=f"Seconds (at least {HEARTBEAT_TIMEOUT_MIN:g}) the run may go without a heartbeat"
    " before Tether asks its backend.",
)
@click.option(
    "--tag",
    "tags",
    multiple=True,
    metavar="TAG",
    help="A tag to find the job by (`tether list --tag`); repeat for several.",
)
@click.option(
    "--notify",
    metavar="URL",
    help="POST a signed `job.finished` message to this http(s) URL each time the job"
    " ends (`tether notify-secret` prints the key receivers verify it with).",
)
@click.option(
    "--wait",
    is_flag=True,
    help="Then watch the job until it ends, with the exit status of `tether watch`.",
)
@service_options
def submit(
    backend: str,
    job_id: str | None,
    params: dict[str, Any] | None,
    timeout: float | None,
    metadata: dict[str, Any] | None,
    heartbeat_timeout: float | None,
    tags: tuple[str, ...],
    notify: str | None,
    wait: bool,
    url: str,
    as_json: bool,
) -> None:
    """Start a job on BACKEND (POST /jobs).

    Submitting the same --id with the same request again reattaches to the
    job; a different request under a used id is refused."""
    body: dict[str, Any] = {"backend": backend}
    given = {
        "id": job_id,
        "params": params,
        "timeout": timeout,
        "metadata": metadata,
        "heartbeat_timeout": heartbeat_timeout,
        "tags": list(tags) or None,
        "notify": None if notify is None else {"url": notify},
    }
    body.update((name, value) for name, value in given.items() if value is not None)

    async def post(api: Api) -> tuple[dict[str, Any], int]:
        response = await api.send("POST", "/jobs", json=body)
        return payload(response, A_JOB), response.status_code

    job, status = run(post, url)
    if status == 200:  # the API's reattach: it looked like a new job (found by a QA pass)
        click.echo(
            f"tether: job {printable(str(job['id']))} already existed with this request:"
            " nothing new was started",
            err=True,
        )
    if wait:
        watch(url, job["id"], as_json, started=job)
    emit(job, as_json, lambda: job_table(job))


@click.command()
@click.argument("job_id", metavar="ID", callback=an_id)
@service_options
def get(job_id: str, url: str, as_json: bool) -> None:
    """Show one job (GET /jobs/ID)."""
    job = run(lambda api: api.call("GET", job_path(job_id), A_JOB), url)
    emit(job, as_json, lambda: job_table(job))


@click.command("list")
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice(get_args(JobState)),
    help="Only jobs in this state; repeat for any of several.",
)
@click.option(
    "--backend", "backends", multiple=True, help="Only jobs of this backend; repeat for several."
)
@click.option(
    "--tag", "tags", multiple=True, help="Only jobs having this tag; repeat for jobs having all."
)
@click.option(
    "--created-after",
    metavar="TIME",
    help="Only jobs created after this ISO 8601 time (UTC when it has no offset).",
)
@click.option(
    "--created-before",
    metavar="TIME",
    help="Only jobs created before this ISO 8601 time (UTC when it has no offset).",
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="At most this many jobs, fetched page by page.",
)
@click.option(
    "--cursor",
    help="Go on where a listing stopped: the `next_cursor` it printed, with the same filters.",
)
@click.option(
    "--ids",
    "ids_only",
    is_flag=True,
    help="Print only the jobs' IDs, one a line, for another command:"
    " `tether list --state failed --tag nightly --ids | xargs -r tether retry`.",
)
@service_options
def list_jobs(
    states: tuple[str, ...],
    backends: tuple[str, ...],
    tags: tuple[str, ...],
    created_after: str | None,
    created_before: str | None,
    limit: int,
    cursor: str | None,
    ids_only: bool,
    url: str,
    as_json: bool,
) -> None:
    """List jobs, newest first (GET /jobs).

    With --json, one `{"items", "next_cursor"}` document holding every page
    fetched; `next_cursor`, given back as --cursor with the same filters,
    continues past --limit. With --ids, the IDs alone, one a line; where
    more jobs match past --limit, a note on stderr gives the cursor. A
    backend no job has lists none: when none is found, a note on stderr says
    whether the service has that backend."""
    if ids_only and as_json:
        raise click.UsageError("give --ids or --json, not both")
    window = {"created_after": created_after, "created_before": created_before}

    async def pages(api: Api) -> dict[str, Any]:
        items: list[Any] = []
        at = cursor
        while True:
            params: dict[str, Any] = {"state": states, "backend": backends, "tag": tags}
            params |= {name: value for name, value in window.items() if value}
            params["limit"] = min(limit - len(items), PAGE)
            if at:
                params["cursor"] = at
            page = await api.call("GET", "/jobs", A_PAGE, params=params)
            items += page["items"]
            at = page["next_cursor"]
            if not at or len(items) >= limit:
                if not items and backends:
                    await note_unknown_backends(api, backends)
                return {**page, "items": items}

    try:
        found = run(pages, url)
    except ServiceError as exc:  # named as the user wrote it (a QA pass, 2026-12-06)
        said = as_options(exc.message, ("state", "backend", "tag", *window, "cursor"))
        raise ServiceError(said, exc.status, reached=exc.reached) from None
    # what a service answered, written as escapes where a terminal would
    # obey it (a proxy, or a service that is not Tether: a QA pass, 2026-12-07)
    cursor_after = printable(str(found["next_cursor"])) if found["next_cursor"] else ""
    if ids_only:
        for job in found["items"]:
            click.echo(printable(str(job["id"])))
        if cursor_after:
            click.echo(f"tether: more jobs match: --cursor {cursor_after}", err=True)
        return

    def table() -> RenderableType:
        more = f"  (more: --cursor {cursor_after})" if cursor_after else ""
        count = len(found["items"])
        return Group(jobs_table(found["items"]), Text(f"{count} job(s){more}", "dim"))

    emit(found, as_json, table)


def as_options(message: str, names: Sequence[str]) -> str:
    """The service's words of a query parameter (`invalid query parameter
    'created_after': …`) as the command's option (`invalid --created-after:
    …`): the user typed the option."""
    for name in names:
        message = message.replace(
            f"invalid query parameter {name!r}", f"invalid --{name.replace('_', '-')}"
        )
    return message


async def note_unknown_backends(api: Api, backends: Sequence[str]) -> None:
    """Say on stderr which of `backends` the service has no plugin for (a
    typo lists no job, as a backend with none does), with the nearest name."""
    try:
        offered = (await api.send("GET", "/health")).json().get("backends", [])
    except (ServiceError, ValueError, AttributeError):  # a note only: nothing to say
        return
    for name in backends:
        if name not in offered:
            hint = near_hint(name, offered)
            click.echo(f"tether: the service has no backend '{printable(name)}'{hint}", err=True)


@click.command()
@click.argument("job_id", metavar="ID", callback=an_id)
@click.option(
    "--follow",
    is_flag=True,
    help="Stream the events as they happen until the job finishes and nothing more is due"
    " after it (its notification's tries, a run that could not be stopped); with --json,"
    " one JSON object a line.",
)
@service_options
def events(job_id: str, follow: bool, url: str, as_json: bool) -> None:
    """Show a job's history, oldest first (GET /jobs/ID/events)."""
    if follow:
        console = Console()

        def printed(item: dict[str, Any]) -> None:
            if as_json:
                click.echo(json.dumps(item))
            else:
                line(console, event_line(item))

        run(lambda api: explained(api, job_id, stream_events(api, job_id, printed)), url)
        return
    found = run(lambda api: explained(api, job_id, event_pages(api, job_id)), url)

    def table() -> RenderableType:
        dropped = found.get("dropped")
        note = f"{dropped} events from the middle are no longer kept" if dropped else ""
        return Group(events_table(found["items"]), Text(note, "dim"))

    emit(found, as_json, table)


@click.command("watch")
@click.argument("job_id", metavar="ID", callback=an_id)
@service_options
def watch_command(job_id: str, url: str, as_json: bool) -> None:
    """Follow a job live until it ends: its state, elapsed time and latest events.

    Exit status: 0 succeeded, 1 failed or timed_out, 3 canceled, 4 the service
    could not be reached or answered an error, 130 Ctrl-C (the job goes on).
    With --json, prints the ended job instead of the live display. It ends
    with the job: what is filed after the end (the completion notification's
    tries, a run the backend could not stop) is shown by `tether events ID
    --follow`."""
    watch(url, job_id, as_json)


def some_ids(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    """Job ID arguments, none of them empty (`an_id`)."""
    return tuple(an_id(ctx, param, job_id) for job_id in value)


def on_each(
    job_ids: Sequence[str], action: str, body: Any, url: str, as_json: bool, done_as: str
) -> None:
    """`POST /jobs/ID/<action>` for each of several jobs, in order: the jobs
    as they became, a table or one `{"items", "refused"}` document (each
    refusal `{"id", "error", "status"}`, also said on stderr); exit 4 when any
    was refused. A service that cannot be reached stops the rest (each then
    refused, status null)."""

    async def work(api: Api) -> tuple[list[Any], list[dict[str, Any]]]:
        done: list[Any] = []
        refused: list[dict[str, Any]] = []
        for n, job_id in enumerate(job_ids):
            try:
                done.append(await api.call("POST", job_path(job_id, action), A_JOB, json=body))
            except ServiceError as exc:
                refused.append({"id": job_id, "error": exc.message, "status": exc.status})
                if not exc.reached:  # no answer: the rest would have none either
                    why = "not tried: the service could not be reached"
                    refused += [{"id": i, "error": why, "status": None} for i in job_ids[n + 1 :]]
                    break
        return done, refused

    done, refused = run(work, url)
    for failure in refused:
        click.echo(f"tether: {printable(failure['id'])}: {printable(failure['error'])}", err=True)

    def table() -> RenderableType:
        said = f"{len(done)} {done_as}" + (f", {len(refused)} refused" if refused else "")
        return Group(jobs_table(done), Text(said, "dim"))

    emit({"items": done, "refused": refused}, as_json, table)
    if refused:
        sys.exit(SERVICE_ERROR)


def reason_kept(_ctx: click.Context, _param: click.Parameter, reason: str | None) -> str | None:
    """`--reason`, refused before anything is sent when longer than the
    service keeps (its error named the API's body field: a QA pass,
    2026-12-07)."""
    if reason is not None and len(reason) > CANCEL_REASON_MAX:
        raise click.BadParameter(
            f"at most {CANCEL_REASON_MAX} characters, this one has {len(reason)}"
        )
    return reason


@click.command()
@click.argument("job_ids", metavar="ID...", nargs=-1, required=True, callback=some_ids)
@click.option(
    "--reason",
    callback=reason_kept,
    help=f"Why; kept in the job's error message (at most {CANCEL_REASON_MAX} characters).",
)
@service_options
def cancel(job_ids: tuple[str, ...], reason: str | None, url: str, as_json: bool) -> None:
    """Cancel a waiting job (POST /jobs/ID/cancel); its backend is asked to
    stop the external run. A job that already finished is an error (exit 4).

    Several IDs are cancelled one after another, each whatever the others
    did: a table of those cancelled (with --json, `{"items", "refused"}`),
    each refusal on stderr, and exit 4 if there was any."""
    body = {"reason": reason} if reason is not None else None
    if len(job_ids) > 1:
        return on_each(job_ids, "cancel", body, url, as_json, "canceled")
    [job_id] = job_ids
    job = run(lambda api: api.call("POST", job_path(job_id, "cancel"), A_JOB, json=body), url)
    emit(job, as_json, lambda: job_table(job))


@click.command()
@click.argument("callback_url")
@click.option(
    "--status",
    type=click.Choice(["succeeded", "failed"]),
    required=True,
    help="How the external job ended.",
)
@click.option("--result", type=JsonValue(objects=False), help="Its result: JSON, or @FILE.")
@click.option("--error", "message", metavar="MESSAGE", help="Why it failed (with --status failed).")
@retry_for_option
@json_option
def complete(
    callback_url: str,
    status: str,
    result: Any,
    message: str | None,
    retry_for: float,
    as_json: bool,
) -> None:
    """Report an external job's outcome to its CALLBACK_URL, as the external
    system would (POST CALLBACK_URL).

    The URL carries its own token: the API token is not sent, and the token is
    never printed. A different outcome recorded first, or a job canceled or
    timed out, is an error (exit 4). A service that cannot be reached or is
    restarting is tried again for up to --retry-for seconds (a repeat is
    safe: the same outcome again is a duplicate)."""
    if message is not None and status != "failed":
        raise click.BadParameter("goes with --status failed", param_hint="'--error'")
    body: dict[str, Any] = {"status": status}
    if result is not None:
        body["result"] = result
    if message is not None:
        body["error"] = {"message": message}

    answer = asyncio.run(post_to(callback_url, body, A_SETTLE, retry_for))

    def table() -> RenderableType:
        said = Text(printable(f"{answer['outcome']}: {answer['message']}"))
        return Group(said, job_table(answer["job"]))

    emit(answer, as_json, table)


async def post_to(url: str, body: Any, shape: tuple[str, ...], retry_for: float = RETRY_FOR) -> Any:
    """POST `body` to a URL that carries its own token (a callback URL): the
    API token is not sent, and no error shows the token. Tried again while
    the service cannot be reached or answers 502-504 (its `Retry-After`, or
    0.5 s doubling to 10 s), for up to `retry_for` seconds; each wait is said
    on stderr."""
    checked(url, "'CALLBACK_URL'")
    deadline = time.monotonic() + retry_for
    delay = 0.5
    async with httpx.AsyncClient(timeout=30) as http:
        while True:
            try:
                response = await http.post(url, json=body)
            except (httpx.InvalidURL, httpx.UnsupportedProtocol):
                raise click.BadParameter(
                    "not an http:// or https:// URL", param_hint="'CALLBACK_URL'"
                ) from None  # no text of its own: it may quote the token
            except httpx.TransportError as exc:
                failure, wait = unreachable(url, exc, "POST", repeatable=True), delay
            else:
                if response.status_code not in RESTARTING:
                    break
                failure, wait = error_answer(response), max(delay, _retry_after(response))
            if time.monotonic() + wait > deadline:
                raise failure
            said = printable(failure.message)
            click.echo(f"tether: {said}; trying again in {wait:g}s", err=True)
            await asyncio.sleep(wait)
            delay = min(delay * 2, 10.0)
    if response.is_error:
        raise error_answer(response)
    return payload(response, shape)


def _retry_after(response: httpx.Response) -> float:
    """The seconds a `Retry-After` asks for (0 when it asks none, or as a date)."""
    try:
        return min(max(float(response.headers.get("retry-after", 0)), 0.0), 60.0)
    except ValueError:
        return 0.0


def heartbeat_url(callback_url: str) -> str:
    """The heartbeat URL of a callback URL: its path and `/heartbeat`, the same
    query (the token). A heartbeat URL (the trigger hands out both) as it is:
    a callback URL's path ends in its promise id, whose last part is the
    attempt's number."""
    parts = urlsplit(checked(callback_url, "'CALLBACK_URL'"))
    path = parts.path.rstrip("/")
    if path.endswith("/heartbeat"):
        return urlunsplit(parts._replace(path=path))
    return urlunsplit(parts._replace(path=path + "/heartbeat"))


@click.command()
@click.argument("callback_url")
@click.option(
    "--progress",
    type=JsonValue(objects=False),
    help="How far along the run is: any JSON, or @FILE; shown as the job's `progress`.",
)
@retry_for_option
@json_option
def heartbeat(callback_url: str, progress: Any, retry_for: float, as_json: bool) -> None:
    """Tell Tether the external job at CALLBACK_URL is alive, and how far along
    it is, as the external system would (POST CALLBACK_URL/heartbeat). The
    heartbeat URL the trigger hands out works too.

    The URL carries its own token: the API token is not sent, and the token is
    never printed. A job that has ended is an error (exit 4)."""
    body = {"progress": progress} if progress is not None else None
    answer = asyncio.run(post_to(heartbeat_url(callback_url), body, A_BEAT, retry_for))

    def table() -> RenderableType:
        return job_table(answer)

    emit(answer, as_json, table)


@click.command()
@click.argument("job_ids", metavar="ID...", nargs=-1, required=True, callback=some_ids)
@click.option(
    "--attempt",
    type=click.IntRange(min=1),
    metavar="N",
    help="The attempt that should exist afterwards: repeating the command is then safe"
    " (a job already at N is shown as it is; nothing new starts).",
)
@click.option(
    "--wait",
    is_flag=True,
    help="Then watch the job until it ends, with the exit status of `tether watch`.",
)
@service_options
def retry(
    job_ids: tuple[str, ...], attempt: int | None, wait: bool, url: str, as_json: bool
) -> None:
    """Run a failed, timed-out or canceled job again (POST /jobs/ID/retry): its
    next attempt, with a new callback URL and a fresh deadline. A job that is
    waiting or succeeded is an error (exit 4).

    Several IDs are retried one after another, as `cancel` does them
    (without --attempt or --wait, which name one job)."""
    if len(job_ids) > 1:
        for option, given in (("--attempt", attempt is not None), ("--wait", wait)):
            if given:
                raise click.BadParameter("names one job: give one ID", param_hint=f"'{option}'")
        return on_each(job_ids, "retry", None, url, as_json, "retried")
    [job_id] = job_ids
    body = {"attempt": attempt} if attempt is not None else None
    job = run(lambda api: api.call("POST", job_path(job_id, "retry"), A_JOB, json=body), url)
    if wait:
        watch(url, job["id"], as_json, started=job)
    emit(job, as_json, lambda: job_table(job))


COMMANDS = (submit, get, list_jobs, events, watch_command, cancel, retry, complete, heartbeat)


def add_client_commands(group: click.Group) -> None:
    """Mount the client verbs into the main `tether` group."""
    for command in COMMANDS:
        group.add_command(command)


@click.group("tether")
def client() -> None:
    """Talk to a running Tether service."""


add_client_commands(client)


def main() -> None:
    """The client verbs alone (`python -m api.client`)."""
    client(prog_name="tether")


if __name__ == "__main__":
    main()
