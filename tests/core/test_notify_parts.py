"""The parts of completion notifications (`core/notify.py`), in this process
and without a service: one try's request (`Notifier.post`), how each outcome
of a try is recorded and logged (`_tried`, `_deliver`), the loop's waits
(`round`, `_run`), its start and stop, against a receiver of our own
(aiohttp's server on 127.0.0.1) and the memory store. Whole deliveries
through the service are in test_notify.py."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import itertools
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
from aiohttp import web
from standardwebhooks import Webhook

import core.notify
from core.models import Outcome
from core.notify import (
    LEASE_MARGIN,
    PAUSED_SITES_MAX,
    REQUEST_TIMEOUT,
    UNSENDABLE,
    Notifier,
    failure,
    notify_site,
    signature,
)
from core.store.jobs import Event, JobIndex, Notification, now_ms
from tests.conftest import aiohttp_serving, eventually
from tests.core.parts import Parts, logs_of, open_parts
from tests.core.store.test_index_writes import job
from tests.core.test_notify import SECRET, TOKEN
from tests.core.test_watchdog import HOUR

Answer = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Hook:
    """A receiver on 127.0.0.1: each request's path, headers and body are
    kept; `answer` makes the answers (200 unless set)."""

    port: int = 0
    got: list[tuple[str, dict[str, str], str]] = field(default_factory=list)
    answer: Answer | None = None

    def url(self, host: str = "127.0.0.1", path: str = f"/hooks/{TOKEN}") -> str:
        return f"http://{host}:{self.port}{path}"

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.got.append((request.path, headers, await request.text()))
        if self.answer is not None:
            return await self.answer(request)
        return web.Response(status=200)


@contextlib.asynccontextmanager
async def hook() -> AsyncIterator[Hook]:
    receiver = Hook()
    async with aiohttp_serving(receiver.handle) as receiver.port:
        yield receiver


@contextlib.asynccontextmanager
async def notifier(
    concurrency: int = 16, loop: bool = True, per_site: int = 8, **given: Any
) -> AsyncIterator[tuple[Parts, Notifier]]:
    """The memory store and a started Notifier on it (`notify_backoff` 5 s,
    `notify_retry_for` 60 s unless set; its loop looks at the outbox as it
    starts, then once a minute, unless woken; with `loop` False there is
    none: the test makes the rounds)."""
    settings = {"notify_backoff": 5.0, "notify_retry_for": 60.0, "watchdog_interval": 60.0}
    settings.update(given)
    async with open_parts(**settings) as parts:
        parts.jobs.message = lambda rec: '{"type": "job.finished"}'
        sender = Notifier(parts.settings, parts.jobs, [SECRET], concurrency, per_site)
        sender.start()
        if not loop:
            assert sender._task is not None
            sender._task.cancel()
        try:
            yield parts, sender
        finally:
            await sender.stop()


async def ended(jobs: JobIndex, url: str, job_id: str, at: int) -> None:
    """Job `job_id`, with a notify URL, ended at `at`: its notification is due then."""
    await jobs.insert(msgspec.structs.replace(job(job_id, at=at), notify_url=url))
    await jobs.end(job_id, Outcome(status="canceled"), at)


async def claimed(jobs: JobIndex, url: str, job_id: str = "n") -> Notification:
    """The notification of job `job_id`'s end, claimed for its first try
    (for a minute: the Notifier's own loop leaves it be)."""
    at = now_ms()
    await ended(jobs, url, job_id, at)
    return await claim(jobs, job_id, now_ms() + 60_000, at)


async def claim(jobs: JobIndex, job_id: str, until: int, now: int | None = None) -> Notification:
    """A claim of `job_id`'s notification, due at `now` (another process's
    claim may have run out by then), until `until`."""
    due = await jobs.notifications_due(now_ms() if now is None else now, 10)
    [note] = [n for n in due if n.job_id == job_id]
    assert await jobs.claim_notification(note, until)
    return msgspec.structs.replace(note, due_at=until, tries=note.tries + 1)


def signed(secret: str, msg_id: str, seconds: int, body: str) -> str:
    """A Standard Webhooks `v1,` signature, by hand."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{seconds}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], None]:
    """`clock(ms)`: the time the Notifier reads from now on."""

    def at(ms: int) -> None:
        monkeypatch.setattr(core.notify, "now_ms", lambda: ms)

    return at


@pytest.fixture
def kathmandu(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The host's local time 5:45 ahead of UTC (a POSIX TZ, no tzdata needed)."""
    monkeypatch.setenv("TZ", "NPT-5:45")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


# ── one try ───────────────────────────────────────────────────────────────────


async def test_a_try_posts_the_stored_body_signed_under_the_notifications_own_headers():
    async with hook() as receiver, notifier() as (parts, sender):
        note = await claimed(parts.jobs, receiver.url())
        before = int(time.time())
        assert await sender.post(note) == (200, None, None)
    [(path, headers, body)] = receiver.got
    assert (path, body) == (f"/hooks/{TOKEN}", note.body)
    assert headers["user-agent"] == "tether-notify"
    assert headers["content-type"] == "application/json"
    assert headers["webhook-id"] == note.id
    seconds = int(headers["webhook-timestamp"])
    assert before <= seconds <= int(time.time())
    assert headers["webhook-signature"] == signed(SECRET, note.id, seconds, note.body)


def test_a_signature_is_of_the_unix_time_whatever_the_hosts_time_zone(kathmandu):
    assert time.localtime(0).tm_hour == 5  # the zone is in effect
    [one] = [Webhook(SECRET)]
    assert signature([one], "msg_1", 1_700_000_000, "{}") == signed(
        SECRET, "msg_1", 1_700_000_000, "{}"
    )


async def test_only_a_2xx_answer_delivers_and_a_redirect_is_not_followed():
    async with hook() as receiver, notifier() as (parts, sender):
        note = await claimed(parts.jobs, receiver.url())
        answers = {"/hooks/204": 204, "/hooks/299": 299, "/hooks/300": 300}

        async def answer(request: web.Request) -> web.StreamResponse:
            if request.path == "/hooks/302":
                return web.Response(status=302, headers={"location": "/hooks/204"})
            return web.Response(status=answers[request.path])

        receiver.answer = answer
        tries = {
            path: await sender.post(msgspec.structs.replace(note, url=receiver.url(path=path)))
            for path in ("/hooks/204", "/hooks/299", "/hooks/300", "/hooks/302")
        }
    assert tries == {
        "/hooks/204": (204, None, None),
        "/hooks/299": (299, None, None),
        "/hooks/300": (300, "answered 300", None),
        "/hooks/302": (302, "answered 302", None),
    }
    assert [path for path, _, _ in receiver.got] == list(tries)  # /hooks/204 once


async def test_a_throttled_answer_says_how_long_it_asked_to_wait():
    """A 429 or 503's `Retry-After` in seconds is handed on (the next try
    comes no sooner: `_tried`); another status's, or a date, is not."""
    async with hook() as receiver, notifier() as (parts, sender):
        note = await claimed(parts.jobs, receiver.url())
        answers = {
            "/hooks/429": (429, "8"),
            "/hooks/503": (503, "120.5"),
            "/hooks/500": (500, "8"),
            "/hooks/date": (429, "Wed, 21 Oct 2015 07:28:00 GMT"),
        }

        async def answer(request: web.Request) -> web.StreamResponse:
            status, after = answers[request.path]
            return web.Response(status=status, headers={"retry-after": after})

        receiver.answer = answer
        tries = {
            path: await sender.post(msgspec.structs.replace(note, url=receiver.url(path=path)))
            for path in answers
        }
    assert tries == {
        "/hooks/429": (429, "answered 429", 8.0),
        "/hooks/503": (503, "answered 503", 120.5),
        "/hooks/500": (500, "answered 500", None),
        "/hooks/date": (429, "answered 429", None),
    }


async def test_a_try_past_its_timeout_fails_as_timed_out(monkeypatch):
    monkeypatch.setattr(core.notify, "REQUEST_TIMEOUT", 0.1)
    async with hook() as receiver, notifier() as (parts, sender):

        async def slow(request: web.Request) -> web.StreamResponse:
            await asyncio.sleep(0.5)
            return web.Response(status=200)

        receiver.answer = slow
        note = await claimed(parts.jobs, receiver.url())
        assert await sender.post(note) == (None, "timed out after 0.1s", None)


async def test_a_try_keeps_no_cookie_and_takes_no_proxy_from_the_environment(monkeypatch):
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{closed.getsockname()[1]}"
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, nowhere)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    async with hook() as receiver, notifier() as (parts, sender):

        async def cookie(request: web.Request) -> web.StreamResponse:
            answer = web.Response(status=200)
            answer.set_cookie("session", "s1")
            return answer

        receiver.answer = cookie
        note = await claimed(parts.jobs, receiver.url(host="localhost"))
        assert await sender.post(note) == (200, None, None)
        assert await sender.post(note) == (200, None, None)
    assert [headers.get("cookie") for _, headers, _ in receiver.got] == [None, None]


def test_a_failure_names_the_errno_of_any_exception_it_came_from():
    refused = ConnectionRefusedError(111, f"connect to /hooks/{TOKEN}")
    caused, context = ValueError(f"/hooks/{TOKEN}"), ValueError(f"/hooks/{TOKEN}")
    caused.__cause__ = refused
    context.__context__ = refused
    assert failure(caused) == "ValueError: connection refused"
    assert failure(context) == "ValueError: connection refused"
    assert failure(PermissionError(1, "x")) == "PermissionError: operation not permitted"
    assert failure(OSError(0, "x")) == "OSError"  # errno 0 is no error's


async def test_https_to_a_plain_http_port_is_said_a_tls_failure_in_the_service_and_the_cli():
    """OpenSSL's error code 1, read as the OS's errno, said `operation not
    permitted` (found by a security QA pass)."""
    import aiohttp
    import httpx

    from api.client import unreachable

    async def plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        writer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(plain, "127.0.0.1", 0)
    url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}/hooks/{TOKEN}"
    try:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientError) as sent:
                await session.post(url)
        assert failure(sent.value) == "ClientConnectorSSLError: TLS failed (wrong version number)"
        callback = url.replace(f"/hooks/{TOKEN}", f"/callbacks/j%3A1?token={TOKEN}")
        async with httpx.AsyncClient() as client:
            with pytest.raises(httpx.TransportError) as called:
                await client.post(callback)
        said = str(unreachable(callback, called.value))
        assert said.endswith(": TLS failed (wrong version number)") and TOKEN not in said
    finally:
        server.close()


# ── recording a try ───────────────────────────────────────────────────────────


async def test_each_outcome_of_a_try_is_recorded_and_logged_with_its_job_and_origin(clock):
    """Delivered; failed, due again after the backoff; failed at the very end
    of the retry window, given up. Logs name the job (also as a field) and
    the URL's origin, never its path."""
    async with hook() as receiver, notifier() as (parts, sender):
        jobs, where = parts.jobs, receiver.origin
        delivered = await claimed(jobs, receiver.url(), "d")
        note = await claimed(jobs, receiver.url(), "n")
        with logs_of("tether.notify") as logs:
            await sender._tried(delivered, 204, None)
            clock(note.created_at + 1_000)
            await sender._tried(note, 503, "answered 503")
            again = await jobs.next_notification_at()
            retried = await claim(jobs, "n", now_ms() + 60_000, note.created_at + 6_000)
            clock(note.created_at + 60_000)  # the window's end, to the millisecond
            await sender._tried(retried, 502, "answered 502")
        assert await jobs.next_notification_at() is None  # both out of the outbox
        _, history, _ = await jobs.history("n", 0, 10)
    assert again == note.created_at + 6_000
    assert logs.fields() == [
        (f"job d: notification {delivered.id} delivered to {where} (try 1, HTTP 204)", "d", None),
        (
            f"job n: notification {note.id} to {where} failed (try 1: answered 503); again in 5s",
            "n",
            None,
        ),
        (
            f"job n: notification {note.id} to {where} given up after 2 tries: answered 502",
            "n",
            None,
        ),
    ]
    assert [r.levelname for r in logs.records] == ["INFO", "WARNING", "WARNING"]
    assert [(e.type, e.data) for e in history[1:]] == [
        ("notified", {"webhook_id": note.id, "try": 1, "status": 503, "error": "answered 503"}),
        ("notified", {"webhook_id": note.id, "try": 2, "status": 502, "error": "answered 502"}),
        ("notify_failed", {"webhook_id": note.id, "tries": 2, "error": "answered 502"}),
    ]


async def test_a_failed_try_whose_claim_another_process_took_is_not_rescheduled():
    async with hook() as receiver, notifier() as (parts, sender):
        jobs = parts.jobs
        lost = await claimed(jobs, receiver.url())
        held = await claim(jobs, "n", lost.due_at + 60_000, lost.due_at)  # this one's ran out
        with logs_of("tether.notify") as logs:
            await sender._tried(lost, 503, "answered 503")
        assert await jobs.next_notification_at() == held.due_at  # the holder's, untouched
    assert logs.fields() == [
        (
            f"job n: notification {lost.id} to {receiver.origin} failed (try 1: answered 503);"
            " its claim ran out meanwhile, so another process has it (or delivered it)",
            "n",
            None,
        )
    ]


async def test_a_try_whose_record_fails_is_logged_and_left_to_its_claim():
    async with hook() as receiver, notifier() as (parts, sender):
        note = await claimed(parts.jobs, receiver.url())

        async def fails(*args: Any, **kwargs: Any) -> bool:
            raise OSError("the store did not answer")

        parts.jobs.notification_tried = fails  # type: ignore[method-assign]
        with logs_of("tether.notify") as logs:
            # a delivery this process did not claim: none in flight
            await sender._deliver(note, notify_site(note.url))
    assert len(receiver.got) == 1
    assert logs.fields() == [
        (
            f"job n: notification {note.id} to {receiver.origin}: recording the try failed"
            " (OSError); it is tried again once its claim runs out",
            "n",
            None,
        )
    ]
    assert TOKEN not in logs.lines[0]


# ── the loop ──────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(("interval", "poll"), [(0.0, 10.0), (0.5, 0.5)])
async def test_an_empty_outbox_is_looked_at_again_every_watchdog_interval(interval, poll):
    async with notifier(watchdog_interval=interval) as (_, sender):
        assert await sender.round(now_ms()) == poll


async def test_a_store_that_does_not_answer_is_asked_again_within_a_second(monkeypatch):
    monkeypatch.setattr(core.notify, "RETRY_AFTER", 0.05)
    async with open_parts(watchdog_interval=0) as parts:
        looked: list[int] = []

        async def fails(now: int, limit: int, skipping: Any = ()) -> list[Notification]:
            looked.append(now)
            raise OSError("the store did not answer")

        parts.jobs.notifications_due = fails  # type: ignore[method-assign]
        sender = Notifier(parts.settings, parts.jobs, [SECRET])
        with logs_of("tether.notify") as logs:
            sender.start()
            try:
                await eventually(lambda: len(looked) >= 3, timeout=2)
            finally:
                await sender.stop()
    assert logs.lines[0] == "WARNING notifications: the store did not answer: OSError"


CLAIM = int((REQUEST_TIMEOUT + LEASE_MARGIN) * 1000)
"""How long a round claims a notification for, in ms."""


def held(receiver: Hook) -> Callable[[], None]:
    """The receiver holds each try until the function returned is called."""
    release = asyncio.Event()

    async def holds(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.Response(status=200)

    receiver.answer = holds
    return release.set


async def test_a_round_claims_what_it_has_room_for_each_for_a_try_and_its_margin(clock):
    """Three notifications due and room for two: the round claims two, for a
    try's time and a margin, and says more may be due; the next, with no
    room, reads nothing; once both are delivered, the third is claimed, and
    the loop is to look again when that claim runs out."""
    async with hook() as receiver, notifier(concurrency=2, loop=False) as (parts, sender):
        jobs, release = parts.jobs, held(receiver)
        at = now_ms()
        for i, job_id in enumerate("abc"):
            await ended(jobs, receiver.url(), job_id, at + i)
        now = at + 1_000
        clock(now)
        assert await sender.round(now) == 0.0
        await eventually(lambda: len(receiver.got) == 2)
        outbox = {n.job_id: n.due_at for n in await jobs.notifications_due(now + HOUR, 10)}
        assert outbox == {"a": now + CLAIM, "b": now + CLAIM, "c": at + 2}
        assert await sender.round(now) == sender.poll == 60.0
        assert len(await jobs.notifications_due(now, 10)) == 1  # c, still unclaimed

        release()
        await eventually(lambda: not sender._inflight)
        release = held(receiver)
        assert await sender.round(now) == CLAIM / 1000
        await eventually(lambda: len(receiver.got) == 3)
        assert await jobs.next_notification_at() == now + CLAIM
        release()


async def test_a_hung_receiver_holds_only_its_sites_places(clock):
    """48 notifications to a receiver that hangs held every place, and a
    healthy receiver's waited behind them, round after round (found by an
    exploratory QA pass). A site takes `per_site` places at most, and the
    outbox's read passes over a site whose places are taken."""
    async with (
        hook() as hung,
        hook() as healthy,
        notifier(concurrency=4, per_site=2, loop=False) as (parts, sender),
    ):
        jobs, release = parts.jobs, held(hung)
        at = now_ms()
        for i in range(5):  # the longest due
            await ended(jobs, hung.url(), f"hung-{i}", at + i)
        await ended(jobs, healthy.url(path="/h?x=1"), "ok", at + 10)
        now = at + 1_000
        clock(now)
        assert await sender.round(now) == 0.0  # two of the hung site's claimed; more may be due
        assert await sender.round(now) == CLAIM / 1000  # its site full: the healthy one claimed
        await eventually(lambda: len(healthy.got) == 1 and len(hung.got) == 2)
        await eventually(lambda: len(sender._inflight) == 2)  # the healthy one delivered
        assert dict(sender._per_site) == {hung.origin: 2}
        assert await sender.round(now) == sender.poll  # room, but only the hung site is due
        assert len(hung.got) == 2
        release()
        await eventually(lambda: not sender._inflight)
        assert not sender._per_site
    assert notify_site("https://h.example:8443/p?q#f") == "https://h.example:8443"
    assert notify_site("http://h?token=x") == "http://h"


async def test_hung_sites_leave_places_to_others_and_a_timed_out_one_gets_one(clock, monkeypatch):
    """Two receivers that hang took all 16 places, their backlogs before any
    other site's (found by a review). A site with tries in flight takes
    another only while more than a quarter of the places are free; a site
    whose last try timed out gets one place, until a try to it ends in time."""
    monkeypatch.setattr(core.notify, "REQUEST_TIMEOUT", 1.5)  # the healthy site answers in it
    async with (
        hook() as a,
        hook() as b,
        hook() as healthy,
        notifier(concurrency=8, per_site=4, loop=False) as (parts, sender),
    ):
        jobs, release_a, release_b = parts.jobs, held(a), held(b)
        at = now_ms()
        for i in range(6):  # the longest due: a's, then b's, then the healthy site's
            await ended(jobs, a.url(), f"a-{i}", at + i)
            await ended(jobs, b.url(), f"b-{i}", at + 10 + i)
            await ended(jobs, healthy.url(), f"h-{i}", at + 20 + i)
        now = at + 1_000
        clock(now)
        await sender.round(now)  # a: its four; b: two, till a quarter is left
        assert dict(sender._per_site) == {a.origin: 4, b.origin: 2}
        await sender.round(now)  # the quarter: one place to the healthy site
        await eventually(lambda: len(healthy.got) == 1)
        assert len(a.got) == 4 and len(b.got) == 2

        # Every try to a and b timed out (due again after the backoff): each
        # gets one place now, and the healthy site the rest.
        await eventually(lambda: not sender._inflight)
        assert set(sender._slow) == {a.origin, b.origin}
        monkeypatch.setattr(core.notify, "REQUEST_TIMEOUT", 60.0)  # held till released now
        await sender.round(now)
        assert sender._per_site[a.origin] == sender._per_site[b.origin] == 1
        for _ in range(5):  # (no loop: the test makes the rounds)
            await eventually(lambda: len(sender._inflight) == 2)
            await sender.round(now)
        assert len(healthy.got) == 6
        assert len(a.got) == 5 and len(b.got) == 3

        # a answers again: in time, so no longer slow.
        release_a()
        await eventually(lambda: a.origin not in sender._slow)
        assert set(sender._slow) == {b.origin}
        release_b()
        await eventually(lambda: not sender._inflight)


@pytest.mark.parametrize("site_full", [True, False])
async def test_slow_reads_past_a_full_site_take_a_fifth_of_the_time_at_most(monkeypatch, site_full):
    """Each delivery that ends begins a round; a read that passes over a full
    site's backlog took 80 ms at 100,000 (`_skipping`), so rounds back to
    back held the store's connection all the time. After such a read the
    next round waits till those reads took `ROUND_SHARE` of the time; reads
    that pass over no site are not held back (a review: timing the whole
    round slowed a healthy backlog's claims)."""
    async with notifier() as (parts, sender):
        reads: list[float] = []
        real = parts.jobs.notifications_due

        async def slow(*args: Any) -> list[Notification]:
            reads.append(time.monotonic())
            await asyncio.sleep(0.05)
            return await real(*args)

        monkeypatch.setattr(parts.jobs, "notifications_due", slow)
        if site_full:  # its places taken (by tries this test does not make)
            sender._per_site["http://hung.example"] = sender.per_site
        sender._wake.set()
        await eventually(lambda: reads)
        first = len(reads)
        until = time.monotonic() + 3
        while time.monotonic() < until:  # deliveries ending, one after another
            sender._wake.set()
            await asyncio.sleep(0.005)
        sender._per_site.clear()
        # back to back: ~50 reads; a fifth of 3 s: 12 (and one begun)
        if site_full:
            assert 1 <= len(reads) - first <= 14, reads
            assert all(b - a >= 0.2 for a, b in itertools.pairwise(reads[first:]))
        else:
            assert len(reads) - first > 14


async def test_a_try_a_stop_cut_short_is_filed_and_due_again_at_once(clock):
    """SIGTERM during a try: the receiver may have the message, and the try
    was missing from the history while its claim held it 20 s (found by an
    exploratory QA pass). It is filed, `status` null, and due at once."""
    async with hook() as receiver, notifier(loop=False) as (parts, sender):
        release = held(receiver)  # answers only once the service stopped
        at = now_ms()
        await ended(parts.jobs, receiver.url(), "a", at)
        clock(at)
        await sender.round(at)
        await eventually(lambda: receiver.got)
        await sender.stop()
        release()
        stopped = now_ms()
        [note] = await parts.jobs.notifications_due(stopped, 10)
        assert at <= note.due_at <= stopped and note.tries == 1
        _, history, _ = await parts.jobs.history("a", 0, 10)
    assert [(e.type, e.data) for e in history[1:]] == [
        (
            "notified",
            {"webhook_id": note.id, "try": 1, "status": None, "error": core.notify.INTERRUPTED},
        )
    ]


async def test_a_try_a_round_started_is_recorded_as_the_claims_try(clock):
    """Room for one, and one due: the round claims it and says more may be
    due; the try fails, and is filed as try 1, due again after the backoff
    (the claim the round made holds, so the try's outcome is written)."""
    async with hook() as receiver, notifier(concurrency=1, loop=False) as (parts, sender):

        async def unavailable(request: web.Request) -> web.StreamResponse:
            return web.Response(status=503)

        receiver.answer = unavailable
        at = now_ms()
        await ended(parts.jobs, receiver.url(), "a", at)
        clock(at)
        assert await sender.round(at) == 0.0
        await eventually(lambda: receiver.got and not sender._inflight)
        assert await parts.jobs.next_notification_at() == at + 5_000
        _, history, _ = await parts.jobs.history("a", 0, 10)
    [note_id] = {e.data["webhook_id"] for e in history[1:]}
    assert [(e.type, e.data) for e in history[1:]] == [
        ("notified", {"webhook_id": note_id, "try": 1, "status": 503, "error": "answered 503"})
    ]


async def test_a_round_passes_over_what_this_process_still_delivers(clock):
    """A delivery still going on here past its claim: the next round claims
    the notifications due after it, not it again; with room to read it alone,
    the round starts nothing and looks again after the poll."""
    async with hook() as receiver, notifier(concurrency=3, loop=False) as (parts, sender):
        jobs, release = parts.jobs, held(receiver)
        at = now_ms()
        await ended(jobs, receiver.url(), "a", at)
        clock(at)
        assert await sender.round(at) == CLAIM / 1000  # room for more: looks when it runs out
        await ended(jobs, receiver.url(), "b", at + CLAIM + 1)
        clock(at + CLAIM + 1)
        assert await sender.round(at + CLAIM + 1) == 0.0  # a passed over, b claimed
        await eventually(lambda: len(receiver.got) == 2)
        assert len(sender._inflight) == 2
        assert await jobs.next_notification_at() == at + CLAIM  # a's claim, not moved
        assert await sender.round(at + CLAIM + 1) == sender.poll  # room for one: a
        assert len(receiver.got) == 2
        release()


async def test_a_notification_due_while_a_round_ran_is_looked_at_at_once(clock):
    """Due after the round read the outbox but before it ended: look again
    now. Due, but another process claimed it first: look after the poll."""
    async with notifier(loop=False) as (parts, sender):
        at = now_ms()
        await ended(parts.jobs, "http://127.0.0.1:9/h", "a", at)
        clock(at + 500)
        assert await sender.round(at - 500) == 0.0

        async def taken(note: Notification, until: int) -> bool:
            return False

        parts.jobs.claim_notification = taken  # type: ignore[method-assign]
        assert await sender.round(at + 500) == sender.poll


def test_only_an_attempt_that_ended_with_a_notify_url_wakes_the_loop():
    sender = Notifier(core.notify.Settings.from_env({}), None, [SECRET])  # type: ignore[arg-type]
    with_url = msgspec.structs.replace(job("n"), notify_url="http://127.0.0.1:1/h")
    woken = []
    for rec, kind in [(with_url, "finished"), (with_url, "started"), (job("n"), "finished")]:
        sender._wake.clear()
        sender.on_event(rec, Event(job_id="n", seq=1, at=0, type=kind, attempt=1, data={}))
        woken.append(sender._wake.is_set())
    assert woken == [True, False, False]


async def test_a_notifier_needs_a_secret_and_stops_its_loop_and_deliveries():
    async with open_parts() as parts:
        with pytest.raises(ValueError, match=r"^a Notifier needs a notification secret$"):
            Notifier(parts.settings, parts.jobs, [])
        idle = Notifier(parts.settings, parts.jobs, [SECRET])
        with pytest.raises(AssertionError, match=r"^Notifier\.start did not run$"):
            await idle.post(
                Notification(id="m", job_id="n", attempt=1, url="", body="", created_at=0, due_at=0)
            )
        await idle.stop()  # never started: nothing to stop

    async with hook() as receiver, notifier() as (parts, sender):
        hung, release = asyncio.Event(), asyncio.Event()

        async def hangs(request: web.Request) -> web.StreamResponse:
            hung.set()
            await release.wait()
            return web.Response(status=200)

        receiver.answer = hangs
        at = now_ms()
        url = receiver.url()
        await parts.jobs.insert(msgspec.structs.replace(job("n", at=at), notify_url=url))
        await parts.jobs.end("n", Outcome(status="canceled"), at)
        sender._wake.set()
        await asyncio.wait_for(hung.wait(), 5)
        tasks = {t.get_name(): t for t in asyncio.all_tasks()}
        assert "tether-notifier" in tasks
        [delivery] = [t for name, t in tasks.items() if name.startswith("tether-notify-")]
        session = sender._session
        await asyncio.wait_for(sender.stop(), 5)
        release.set()
        assert tasks["tether-notifier"].cancelled() and delivery.cancelled()
        assert session is not None and session.closed


async def test_a_url_the_http_client_refuses_is_given_up_at_its_first_try():
    """A notification stored before hosts of digits and dots had to be an
    IPv4 address (`999.0.0.1`): aiohttp refuses to send it, which no later
    try mends. Given up at once (`notify_failed`), not retried for the whole
    window with a warning at every try (found by an exploratory QA pass)."""
    async with notifier() as (parts, sender):
        note = await claimed(parts.jobs, "http://999.0.0.1/hooks")
        assert await sender.post(note) == (None, UNSENDABLE, None)
        await sender._tried(note, None, UNSENDABLE)
        assert await parts.jobs.next_notification_at() is None  # out of the outbox
        _, history, _ = await parts.jobs.history("n", 0, 10)
    assert [(e.type, e.data) for e in history[1:]] == [
        ("notified", {"webhook_id": note.id, "try": 1, "status": None, "error": UNSENDABLE}),
        ("notify_failed", {"webhook_id": note.id, "tries": 1, "error": UNSENDABLE}),
    ]


async def test_the_outbox_backlog_is_a_gauge():
    """A hung receiver's backlog grew for its whole retry window and nothing
    showed it (found by a QA pass): `/metrics` says how many notifications
    are due and not being tried, and since when the oldest is."""
    from core.metrics import JobsCollector, job_gauges

    async with open_parts() as parts:
        parts.jobs.message = lambda rec: "{}"
        jobs, at = parts.jobs, now_ms() - 5_000
        gauges = await job_gauges(jobs, now_ms())
        assert (gauges.notes_due, gauges.notes_oldest_due) == (0, None)
        for i in range(3):
            await ended(jobs, "http://hung.example/hook", f"n{i}", at + i)
        await claim(jobs, "n0", now_ms() + 60_000)  # a try in flight: not waiting
        gauges = await job_gauges(jobs, now_ms())
        assert (gauges.notes_due, gauges.notes_oldest_due) == (2, at + 1)
        shown = {f.name: f.samples[0].value for f in JobsCollector(gauges).collect() if f.samples}
        assert shown["tether_notifications_due"] == 2
        assert shown["tether_notifications_oldest_due_timestamp_seconds"] == (at + 1) / 1000


async def test_a_wait_that_ended_while_every_place_was_taken_does_not_spin_the_loop():
    """One place: site A asks 1 s (429), then a try to site B holds the place
    for 2.5 s. A's wait ended meanwhile, was counted as due now, and the loop
    went round tens of thousands of times until B answered (a review,
    2026-12-07); a delivery that ends wakes it, so it may sleep."""

    async def throttled(request: web.Request) -> web.StreamResponse:
        return web.Response(status=429, headers={"Retry-After": "1"})

    async def hangs(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(2.5)
        return web.Response(status=200)

    async with hook() as a, hook() as b, notifier(concurrency=1) as (parts, sender):
        a.answer, b.answer = throttled, hangs
        rounds = 0
        real = sender.round

        async def counted(now: int) -> float:
            nonlocal rounds
            rounds += 1
            return await real(now)

        sender.round = counted  # type: ignore[method-assign]
        await ended(parts.jobs, a.url(), "asks", now_ms())
        sender._wake.set()
        await eventually(lambda: a.got)
        await ended(parts.jobs, b.url(), "hangs", now_ms())
        sender._wake.set()
        await eventually(lambda: b.got)
        before = rounds
        await asyncio.sleep(2.0)  # A's wait ends while B holds the place
        assert rounds - before < 10, rounds - before
        assert len(a.got) == 1  # and A waits for the place, as asked


async def test_sites_that_asked_to_wait_are_remembered_up_to_a_bound_and_others_go_on():
    """Each site that asked to wait is a clause of the outbox's read: with
    1,000 of them SQLite refused it, and no notification went out for up to
    an hour (a review, 2026-12-07). At most `PAUSED_SITES_MAX` are kept, the
    waits that end first forgotten."""
    async with hook() as receiver, notifier(loop=False) as (parts, sender):
        for i in range(1_000):
            sender._pause(f"http://127.0.{i // 250}.{i % 250 + 2}:{receiver.port}", 3600 - i)
        assert len(sender._paused) == PAUSED_SITES_MAX
        assert f"http://127.0.0.2:{receiver.port}" in sender._paused  # the longest kept
        await ended(parts.jobs, receiver.url(), "healthy", now_ms() - 10)
        await sender.round(now_ms())
        await eventually(lambda: receiver.got)


async def test_a_wait_that_ends_during_a_round_is_looked_at_when_it_ends():
    """A site asked to wait 0.5 s with a notification due; the loop is woken
    just before the wait ends, and the round's reads take 20 ms: the round
    leaves the site out, and the wait, ended by then, was forgotten, so the
    notification waited for the next poll (a minute here: a review,
    2026-12-07)."""
    async with hook() as receiver, notifier(concurrency=4) as (parts, sender):
        await asyncio.sleep(0.2)  # the first round: nothing due
        real = sender.jobs.next_notification_at

        async def slow(full: Any) -> Any:
            await asyncio.sleep(0.02)
            return await real(full)

        sender.jobs.next_notification_at = slow  # type: ignore[method-assign]
        site = notify_site(receiver.url())
        sender._pause(site, 0.5)
        await ended(parts.jobs, receiver.url(), "held", now_ms())
        asyncio.get_running_loop().call_at(sender._paused[site] - 0.01, sender._wake.set)
        began = time.monotonic()
        await eventually(lambda: receiver.got, timeout=5)
        assert time.monotonic() - began < 1.5
