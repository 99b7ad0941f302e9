"""Completion notifications: deliver the outbox, in every worker process.

When an attempt of a job with a `notify.url` ends, the store puts a
`Notification` in the outbox in the transaction that ends it
(`core.store.sql`). A `Notifier` runs in each worker process and delivers
them: it claims a due one (moving its `due_at` past the request's time, so a
process killed mid-delivery leaves it to anyone once that lease runs out),
POSTs its stored body signed the Standard Webhooks way, and records the try in
the job's history (`notified`). A 2xx answer delivers it; anything else is
tried again after `notify_backoff` seconds, doubling up to an hour, until
`notify_retry_for` seconds after the attempt ended, when it is given up
(`notify_failed`). At least once: a redelivery keeps the `webhook-id`.
A failed try's outcome (due again, or given up) is written only while its
claim holds: once the claim ran out, another process has the notification,
or delivered it, and records the outcome; a delivery is written whoever
holds it (`JobIndex.notification_tried`).

During a rotation of the notification secret each try carries one signature
per secret, space-separated in `webhook-signature`, the current one first
(the spec's way to rotate: a receiver that knows any one of them verifies
it). The secrets are those the process started with (`Store.notify_secrets`),
applied when each try is sent, so a retry after a restart carries the new ones.

It wakes at once when this process ends an attempt of a job with a notify
URL (a listener of the job history), and otherwise sleeps until the outbox's
next due time (a retry, a claim running out: `next_notification_at`, the
first row of its index), looking at least every `watchdog_interval` seconds
for what other processes or hosts put there meanwhile. Logs name the job and
only the URL's origin: the full URL may carry a token (docs/lifecycle.md,
"Completion notifications")."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Awaitable, Sequence
from datetime import UTC, datetime

import aiohttp
import msgspec
from standardwebhooks import Webhook

from core.errors import os_reason, retry_after_seconds
from core.settings import Settings
from core.store.base import STORE_CALL_TIMEOUT
from core.store.jobs import Event, JobIndex, JobRecord, NewEvent, Notification, now_ms
from core.views import origin

log = logging.getLogger("tether.notify")

REQUEST_TIMEOUT = 10.0
"""Seconds one delivery may take, answer included."""
LEASE_MARGIN = STORE_CALL_TIMEOUT + 2.0
"""Seconds a claim lasts past the request's timeout: time to record the try."""
MAX_BACKOFF = 3600.0
"""The longest wait between two tries of a notification, in seconds."""
CONCURRENCY = 16
"""Notifications one process delivers at once."""
PER_SITE = 8
"""Of those, to one site (scheme and host, `notify_site`) at most: a
receiver that hangs (each try waits `REQUEST_TIMEOUT`) held every place, and
other receivers' notifications waited behind its backlog, round after round
of retries (48 to a hung receiver held a healthy one's 32 s: found by an
exploratory QA pass)."""
SLOW_SITES_MAX = 1024
"""Sites remembered as slow (`Notifier._slow`); past it, the one whose last
timeout is the oldest is forgotten."""
PAUSED_SITES_MAX = 64
"""Sites remembered as having asked to wait (`Notifier._paused`); past it,
the wait that ends first is forgotten (that site's other notifications go at
their own times again). Each is a clause of the outbox's read: with 1,000 of
them SQLite refused the read (its expression depth), and no notification
went out (a review, 2026-12-07)."""
DEFAULT_POLL = 10.0
"""Seconds between looks at the outbox when `watchdog_interval` is not positive."""
RETRY_AFTER = 1.0
"""Seconds (at most the poll) before looking again when the store did not answer."""
USER_AGENT = "tether-notify"
INTERRUPTED = "interrupted: the service stopped during the try"
"""A try's `error` when a stop (SIGTERM) cut it short."""
ROUND_SHARE = 0.2
"""At most this share of the time goes to the outbox's reads that pass over
full sites: after a round whose such reads took longer than `SLOW_READ`, the
next waits until they would have (at most the poll). A site whose places are
taken is read past, row by row (`_skipping`): 100,000 due to a hung receiver
took 80 ms a read, and each delivery to another site that ended began a
round, holding the store's connection from every request."""
SLOW_READ = 0.01
STOP_RECORD_WAIT = 2.0
"""Seconds a stop waits for the store to file the interrupted tries."""


def backoff(settings: Settings, tries: int) -> float:
    """Seconds before the next try after `tries` failed ones: `notify_backoff`
    doubling, at most an hour. (The doubling as a float, its power at most
    2**1023: from the 1,025th try the power of an int was too large to make a
    float, and each later try went unrecorded, 20 s apart: found by a QA
    pass, 2026-12-07.)"""
    return float(min(settings.notify_backoff * 2.0 ** min(tries - 1, 1023), MAX_BACKOFF))


THROTTLED = frozenset({429, 503})
"""Answers whose `Retry-After` says when to try again: the next try comes no
sooner (found by a QA pass, 2026-12-07: a receiver asking 8 s was tried
again after 1, 3 and 7), and until then this process sends its site
nothing else either (`Notifier._paused`)."""

UNSENDABLE = "the HTTP client refuses this URL (InvalidUrlClientError)"
"""A try's error that no later try mends (a host such as `999.0.0.1`,
stored before such URLs were refused): the notification is given up at once."""


TIMED_OUT = "timed out after "
"""How a try's error begins when the receiver did not answer in time."""


def failure(exc: BaseException) -> str:
    """A failed request, said briefly: never the exception's text, which may
    quote the URL's path and query."""
    if isinstance(exc, TimeoutError):  # aiohttp's timeouts are TimeoutErrors too
        return f"{TIMED_OUT}{REQUEST_TIMEOUT:g}s"
    reason = os_reason(exc)
    return f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__


def notify_site(url: str) -> str:
    """A notification URL's scheme and host as written (up to the path, the
    query or the fragment): what `PER_SITE` counts, and what the outbox's
    read skips by its text."""
    scheme, sep, rest = url.partition("://")
    end = min((i for i in map(rest.find, "/?#") if i >= 0), default=len(rest))
    return f"{scheme}{sep}{rest[:end]}"


def signature(webhooks: list[Webhook], msg_id: str, seconds: int, body: str) -> str:
    """The `webhook-signature` header: `v1,<base64>` under each key, current
    first, separated by spaces (Standard Webhooks)."""
    at = datetime.fromtimestamp(seconds, UTC)
    return " ".join(webhook.sign(msg_id, at, body) for webhook in webhooks)


class Notifier:
    """Delivers the outbox's notifications, at most `concurrency` at once.
    `secrets` are `Store.notify_secrets`: one key, or during a rotation
    several, current first, each message being signed with every one.

    Places are shared out so that a few receivers that hang do not hold
    them all (two hung sites took every place, and the others'
    notifications waited behind their backlogs: found by a review): a site
    takes at most `per_site`; a site whose last try timed out takes one,
    until a try to it ends in time; and a site that already has a try in
    flight takes another only while more than a quarter of the places are
    free, the rest kept for sites with none. So once their first tries timed
    out, hung sites hold one place each: sixteen of them still hold all."""

    def __init__(
        self,
        settings: Settings,
        jobs: JobIndex,
        secrets: Sequence[str],
        concurrency: int = CONCURRENCY,
        per_site: int = PER_SITE,
    ) -> None:
        self.settings = settings
        self.jobs = jobs
        self.webhooks = [Webhook(key) for key in secrets]
        if not self.webhooks:
            raise ValueError("a Notifier needs a notification secret")
        self.concurrency = concurrency
        self.per_site = per_site
        self.reserve = concurrency // 4
        """Places kept for sites with no try in flight."""
        self.poll = settings.watchdog_interval if settings.watchdog_interval > 0 else DEFAULT_POLL
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._claimed: dict[str, Notification] = {}
        """The notifications being tried now, as claimed, until their try is recorded."""
        self._sending: set[str] = set()
        """Of those, the ones whose request began."""
        self._per_site: Counter[str] = Counter()
        """Deliveries in flight to each site (`notify_site`)."""
        self._slow: dict[str, None] = {}
        """Sites whose last try timed out, the one whose last timeout is the
        oldest first (at most `SLOW_SITES_MAX`)."""
        self._paused: dict[str, float] = {}
        """Sites that asked to wait (a 429 or 503 with a `Retry-After`), and
        until when (`time.monotonic`): at most `PAUSED_SITES_MAX`. Held in
        each process: another process learns it from its own try."""
        self._read_for = 0.0
        """Seconds this round's reads passing over full sites took (`ROUND_SHARE`)."""
        self._session: aiohttp.ClientSession | None = None

    def start(self) -> None:
        """Start delivering (on the running loop)."""
        self._session = aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            headers={"user-agent": USER_AGENT},
        )
        self._task = asyncio.create_task(self._run(), name="tether-notifier")

    async def stop(self) -> None:
        """Stop looking and delivering. A delivery cut short is filed as a try
        (`notified`, `status` null, `error` `INTERRUPTED`: its message may have
        reached the receiver) and due again at once, for any process (its
        claim held it 20 s, and the try was missing from the history: found by
        an exploratory QA pass); one whose request had not begun is given
        back without an event. A store that does not answer within
        `STOP_RECORD_WAIT` leaves them to their claims, as a killed process does."""
        tasks = [t for t in (self._task, *self._inflight.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        cut = dict(self._claimed)  # (read now: a try that ended meanwhile left it)
        if self._session is not None:
            await self._session.close()
        now = now_ms()

        async def release(note: Notification) -> None:
            told = {"webhook_id": note.id, "try": note.tries, "status": None, "error": INTERRUPTED}
            # (a try never begun is only given back: there is nothing to file)
            events = [NewEvent("notified", told)] if note.id in self._sending else []
            await self.jobs.notification_tried(note, now, events, now)

        # all at once, under one bound (one after another, a store that hangs
        # held the stop STOP_RECORD_WAIT a notification: found by a review)
        releases = asyncio.gather(*(release(note) for note in cut.values()))
        try:
            await asyncio.wait_for(releases, STOP_RECORD_WAIT)
        except Exception as exc:
            if cut:
                log.warning(
                    "notifications: %d interrupted tries were not all recorded (%s); they are"
                    " tried again once their claims run out",
                    len(cut),
                    type(exc).__name__,
                )

    def on_event(self, rec: JobRecord, event: Event) -> None:
        """A `JobHistory` listener: an attempt of a job with a notify URL
        ended in this process, so its notification is due now."""
        if event.type == "finished" and rec.notify_url is not None:
            self._wake.set()

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            began, self._read_for = time.monotonic(), 0.0
            try:
                delay = min(await self.round(now_ms()), self._pause_left(began))
            except Exception as exc:
                log.warning("notifications: the store did not answer: %s", type(exc).__name__)
                delay, self._read_for = min(self.poll, RETRY_AFTER), 0.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            if self._read_for > SLOW_READ:
                pause = min(self._read_for / ROUND_SHARE, self.poll)
                await asyncio.sleep(began + pause - time.monotonic())

    async def round(self, now: int) -> float:
        """Claim and start the deliveries due at `now` that this process has
        room for; the seconds until it should look again (sooner if a
        delivery ends or an attempt ends here)."""
        free = self.concurrency - len(self._inflight)
        if free <= 0:
            return self.poll  # each delivery that ends wakes the loop
        full = [site for site in {**self._per_site, **self._paused} if not self._room(site)]
        due = await self._timed(full, self.jobs.notifications_due(now, free, full))
        until = now + int((REQUEST_TIMEOUT + LEASE_MARGIN) * 1000)
        started = 0
        for note in due:
            site = notify_site(note.url)
            if not self._room(site):
                continue  # its site's places filled in this round: a later one
            if note.id in self._inflight or not await self.jobs.claim_notification(note, until):
                continue  # another process took it (or this one still has it)
            claimed = msgspec.structs.replace(note, due_at=until, tries=note.tries + 1)
            task = asyncio.create_task(
                self._deliver(claimed, site), name=f"tether-notify-{note.id}"
            )
            self._inflight[note.id] = task
            self._claimed[note.id] = claimed
            self._per_site[site] += 1
            started += 1
        if started and len(due) == free:
            return 0.0  # more may be due
        if due and not started:
            return self.poll  # others have them now
        # (a site whose places are taken: a delivery that ends wakes the loop)
        at = await self._timed(full, self.jobs.next_notification_at(full))
        if at is None:
            return self.poll
        return min(self.poll, max(at - now_ms(), 0) / 1000)

    async def _timed[T](self, full: Sequence[str], read: Awaitable[T]) -> T:
        """`read` of the outbox, its time counted in `_read_for` when it
        passes over the `full` sites' rows (`ROUND_SHARE`)."""
        began = time.monotonic()
        try:
            return await read
        finally:
            if full:
                self._read_for += time.monotonic() - began

    def _room(self, site: str) -> bool:
        """Whether a try to `site` may start now (the class's rules, and no
        wait it asked for running)."""
        paused = self._paused.get(site)
        if paused is not None:
            if time.monotonic() < paused:
                return False
            del self._paused[site]
        held = self._per_site[site]
        if held >= (1 if site in self._slow else self.per_site):
            return False
        return held == 0 or self.concurrency - len(self._inflight) > self.reserve

    async def _deliver(self, note: Notification, site: str) -> None:
        self._sending.add(note.id)
        try:
            status, error, asked = await self.post(note)
            self._slow.pop(site, None)
            if error is not None and error.startswith(TIMED_OUT):
                self._slow[site] = None
                if len(self._slow) > SLOW_SITES_MAX:
                    del self._slow[next(iter(self._slow))]
            if asked:
                self._pause(site, asked)
            self._claimed.pop(note.id, None)  # tried: recorded below, or left to its claim
            await self._tried(note, status, error, asked)
        except Exception as exc:
            log.warning(
                "job %s: notification %s to %s: recording the try failed (%s); it is tried"
                " again once its claim runs out",
                note.job_id,
                note.id,
                origin(note.url),
                type(exc).__name__,
                extra={"job_id": note.job_id},
            )
        finally:
            self._inflight.pop(note.id, None)
            if not asyncio.current_task().cancelling():  # type: ignore[union-attr]
                self._claimed.pop(note.id, None)
                self._sending.discard(note.id)
            if self._per_site[site] > 1:
                self._per_site[site] -= 1
            else:
                self._per_site.pop(site, None)
            self._wake.set()

    def _pause(self, site: str, seconds: float) -> None:
        """`site` asked to be sent nothing for `seconds` (at most `MAX_BACKOFF`)."""
        until = time.monotonic() + min(seconds, MAX_BACKOFF)
        self._paused[site] = max(until, self._paused.get(site, until))
        if len(self._paused) > PAUSED_SITES_MAX:
            del self._paused[min(self._paused, key=self._paused.__getitem__)]

    def _pause_left(self, looked: float) -> float:
        """Seconds until the first site's wait ends (its notifications are due
        then; `math.inf` with none): 0 for one that ended during the round
        that began at `looked`, which left its notifications out (forgotten
        then, they waited for the next poll: a review, 2026-12-07). The waits
        that ended before `looked` are forgotten (counted as 0, a wait that
        a round had not looked at since spun the loop while every place was
        taken: the same review)."""
        for site in [site for site, until in self._paused.items() if until <= looked]:
            del self._paused[site]
        return max(min(self._paused.values(), default=math.inf) - time.monotonic(), 0.0)

    async def post(self, note: Notification) -> tuple[int | None, str | None, float | None]:
        """One try: POST the stored body, signed. Returns the status (None when
        there was no answer), unless it is 2xx a short reason, and the seconds
        a 429 or 503 asked to wait in its `Retry-After` (None: it asked none)."""
        assert self._session is not None, "Notifier.start did not run"
        seconds = int(time.time())
        headers = {
            "content-type": "application/json",
            "webhook-id": note.id,
            "webhook-timestamp": str(seconds),
            "webhook-signature": signature(self.webhooks, note.id, seconds, note.body),
        }
        try:
            async with self._session.post(
                note.url,
                data=note.body.encode(),
                headers=headers,
                # exact: aiohttp rounds a timeout of 5 s or more up to the next
                # whole second (an answer after 10.8 s counted as delivered)
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT, ceil_threshold=math.inf),
                allow_redirects=False,
            ) as response:
                status = response.status
                asked = response.headers.get("retry-after") if status in THROTTLED else None
        except aiohttp.InvalidURL:
            return None, UNSENDABLE, None
        except (aiohttp.ClientError, OSError, ValueError) as exc:  # timeouts are OSErrors
            return None, failure(exc), None
        if 200 <= status < 300:
            return status, None, None
        return status, f"answered {status}", retry_after_seconds(asked)

    async def _tried(
        self,
        note: Notification,
        status: int | None,
        error: str | None,
        asked: float | None = None,
    ) -> None:
        """Record a try: delivered, due again after the backoff (or the wait
        the receiver asked for, when longer, at most `MAX_BACKOFF`), or given
        up once the retry window has passed."""
        now = now_ms()
        where = origin(note.url)
        extra = {"job_id": note.job_id}
        told = {"webhook_id": note.id, "try": note.tries, "status": status}
        if error is None:
            await self.jobs.notification_tried(note, None, [NewEvent("notified", told)], now)
            log.info(
                "job %s: notification %s delivered to %s (try %d, HTTP %s)",
                note.job_id,
                note.id,
                where,
                note.tries,
                status,
                extra=extra,
            )
            return
        tried = NewEvent("notified", {**told, "error": error})
        window_end = note.created_at + int(self.settings.notify_retry_for * 1000)
        if now >= window_end or error == UNSENDABLE:
            given_up = {"webhook_id": note.id, "tries": note.tries, "error": error}
            failed = NewEvent("notify_failed", given_up)
            if not await self.jobs.notification_tried(note, None, [tried], now, failed):
                self._claim_lost(note, error)
                return
            log.warning(
                "job %s: notification %s to %s given up after %d tries: %s",
                note.job_id,
                note.id,
                where,
                note.tries,
                error,
                extra=extra,
            )
            return
        wait = max(backoff(self.settings, note.tries), min(asked or 0.0, MAX_BACKOFF))
        again = min(now + int(wait * 1000), window_end)
        if not await self.jobs.notification_tried(note, again, [tried], now):
            self._claim_lost(note, error)
            return
        log.warning(
            "job %s: notification %s to %s failed (try %d: %s); again in %gs",
            note.job_id,
            note.id,
            where,
            note.tries,
            error,
            (again - now) / 1000,
            extra=extra,
        )

    def _claim_lost(self, note: Notification, error: str) -> None:
        """A failed try recorded after its claim ran out: another process
        holds the notification now, or delivered (or gave up) it meanwhile,
        and records the outcome; this try is in the history, nothing more."""
        log.warning(
            "job %s: notification %s to %s failed (try %d: %s); its claim ran out meanwhile,"
            " so another process has it (or delivered it)",
            note.job_id,
            note.id,
            origin(note.url),
            note.tries,
            error,
            extra={"job_id": note.job_id},
        )
