"""Tether's use cases, the ones the API calls: start, read, list and cancel
jobs, read their history, take callbacks, report health.

`Tether.open` builds the application's parts in one place, for the HTTP
service and the command line alike: the store (`core.store`), the Resonate
worker running the workflow (`core.workflow`) and its steps (`core.steps`),
the one way jobs end (`core.settle`), and the watchdog (`core.watchdog`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Coroutine, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, NamedTuple

import msgspec
from resonate.error import DecodingError, ServerError
from resonate.resonate import Resonate

from core import metrics, version, workflow
from core.bounds import MAX_DEPTH, deeper_than
from core.callbacks import CallbackResult, Callbacks, Heartbeat, HeartbeatGone
from core.errors import (
    Conflict,
    InvalidRequest,
    MalformedBody,
    NotFound,
    StoreUnavailable,
    reason,
    shown,
)
from core.events import JobHistory
from core.health import Health, store_answers
from core.models import (
    JOB_ID_PATTERN,
    JOB_ID_RULE,
    LIST_BACKENDS_MAX,
    RETRYABLE_STATES,
    TAG_PATTERN,
    TAG_RULE,
    ErrorInfo,
    EventPage,
    Job,
    JobEvent,
    JobPage,
    JobRequest,
    Outcome,
    url_fault,
)
from core.notices import NoticeResult, Notices
from core.notify import Notifier
from core.plugins import PLUGIN_FAULTS, Plugins, cancelling
from core.requests import NormalRequest, stored_request
from core.settings import Settings, describe
from core.settle import Settler, store_call
from core.steps import JobSteps, Slots
from core.store import Store, open_store
from core.store.base import LAST_HOST, STOP_GRACE
from core.store.jobs import Event, JobRecord, NewEvent, now_ms
from core.store.sql import SqlJobIndex
from core.tokens import CallbackSigner, agree, notify_fingerprints
from core.views import decode_cursor, duration, encode_cursor, finished_message, view
from core.watchdog import Watchdog, collect_garbage

log = logging.getLogger("tether")

MAX_PAGE = 1000
ATTEMPT_END_WAIT = 10.0
"""Seconds a retry waits for the ended attempt's workflow to finish winding up
(the backend's cancel) before answering 409."""
BACKEND_CLOSE_TIMEOUT = 10.0
"""Seconds a backend's `close` may take when the service (or a command that
opened it) stops: one that hung held up start-up and shutdown silently
(found by a QA pass)."""
RESUME_PAGE = 500
STALE_PENDING_MS = 10_000
"""A job pending this long may have lost its workflow start (`resume_stale`)."""


def unix_ms(at: datetime, *, up: bool = False) -> int:
    """`at` as Unix milliseconds, as the store keeps times (UTC without a
    zone): the millisecond it falls in, or with `up` the first at or after
    it. Exclusive bounds in whole milliseconds: `> t` is `> unix_ms(t)`,
    `< t` is `< unix_ms(t, up=True)`."""
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    micros = (at - EPOCH) // timedelta(microseconds=1)
    return -(-micros // 1000) if up else micros // 1000


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class ListQuery(NamedTuple):
    """A job list's filters, checked (`Tether.list_query`): what the index's
    `pages` is asked."""

    pairs: list[tuple[str | None, str | None]]
    limit: int
    before: int | None
    tags: list[str]
    after: int | None
    until: int | None


def _still_winding_up(rec: JobRecord) -> Conflict:
    """A retry's 409 for an ended attempt still winding up (`_wound_up`)."""
    at = f"job {shown(rec.id)}: attempt {rec.attempt} is {rec.state} but still winding up"
    details: dict[str, Any] = {"attempt": rec.attempt, "state": rec.state}
    if rec.stop_due is not None and rec.external is None:  # a late trigger call's hold
        due = datetime.fromtimestamp(rec.stop_due / 1000, UTC).isoformat(timespec="seconds")
        return Conflict(
            f"{at}: a call of its trigger, left to answer late, may still start a run, which"
            " is to be stopped before another attempt begins: the call may take up to 15"
            " minutes from its start (TRIGGER_TIMEOUT), its stop a watchdog sweep after a"
            " restart; retry after that",
            {**details, "stop_due": due},
        )
    if rec.external is None:  # no run to stop: its workflow has yet to return
        return Conflict(
            f"{at}: its workflow has yet to end (one its host held as it died is taken over"
            " once its lease runs out, TETHER_TASK_TTL); retry again in a moment",
            details,
        )
    return Conflict(f"{at} (stopping its external run); retry again in a moment", details)


class Tether:
    """The service: its use cases, and the parts `open` put together."""

    def __init__(self, settings: Settings, plugins: Plugins, store: Store, pid: str) -> None:
        self.settings = settings
        self.plugins = plugins
        self.store = store
        self.jobs = store.jobs
        self.events = JobHistory(store.jobs)
        self.events.listeners.append(metrics.on_event)
        """Jobs' history; `events.listeners` hear of each event this process records."""
        self.pid = pid
        self.signer = CallbackSigner(
            store.callback_secret, settings.base_url, store.callback_secret_previous
        )
        self.resonate: Resonate | None = None
        self.watchdog: Watchdog | None = None
        self._settler: Settler | None = None
        self._steps: JobSteps | None = None
        self._target = ""
        self.checks = Health(plugins, self.jobs, settings.readiness_interval)
        self.jobs.limits = settings.limits
        self.jobs.on_ready = self._on_ready
        self.jobs.message = finished_message
        self.events.listeners.append(self._ended_in_queue)
        self._starting: set[asyncio.Task[None]] = set()
        self._stopping: set[asyncio.Task[None]] = set()
        """The stops of runs of jobs no workflow finishes under way (`_spawn_stop`)."""
        self.notifier: Notifier | None = None
        self._signals = 0
        self._hurry = asyncio.Event()
        """Set by a second SIGTERM or SIGINT: the stop waits no more for the
        steps still running (`close`)."""

    def __repr__(self) -> str:
        return f"Tether(store={self.store.kind!r}, pid={self.pid!r})"

    # ── lifecycle ────────────────────────────────────────────────────────────

    @classmethod
    async def open(
        cls, settings: Settings, plugins: Plugins, *, worker: bool = True, pid: str | None = None
    ) -> Tether:
        """Open the store named by the settings; with `worker`, also join it as
        a worker (run the workflow, the watchdog). Needs a running loop.
        Raises `StoreConfigError` or `StoreUnavailable` when the store cannot be
        used. A worker in another group than the store's (`take_group`: `tether
        serve` refuses to start so) logs why as an error and runs all the same:
        a worker the supervisor starts again must not take its host down."""
        pid = pid or uuid.uuid4().hex
        tether = cls(settings, plugins, await open_store(settings, pid), pid)
        if worker:
            try:
                refused = await tether.take_group()
            except BaseException:
                await tether.close()
                raise
            if refused:
                log.error("%s", refused)
            tether._join()
            await tether.checks.count_missing()  # `/health` says so from its first answer
            try:
                await tether.resume_pending()
            except (ServerError, DecodingError) as exc:  # a store answering 5xx, a proxy's page
                await tether.close()
                raise StoreUnavailable(f"the store did not answer: {type(exc).__name__}") from None
        return tether

    def _join(self) -> None:
        conn = self.store.connection
        self.resonate = r = Resonate(
            network=conn,
            group=self.settings.group,
            pid=self.pid,
            ttl=timedelta(seconds=self.settings.task_ttl),
            max_concurrent_tasks=self.settings.max_concurrent_tasks,
            subscription_refresh_secs=0,
            observer=workflow.observe,
        )
        bound = self.settings.max_result_bytes
        self._settler = Settler(r, self.jobs, bound, self.signer.job_tokens)
        steps = JobSteps(
            self.settings,
            self.plugins,
            self.jobs,
            self.signer,
            self._settler,
            slots=Slots.of(r, conn, self.settings.max_concurrent_tasks),
        )
        self._steps = steps
        self._settler.on_orphan = steps.finish_orphan
        self._settler.spawn = self._spawn_stop
        self._settler.finishes_alone = steps.finishes_alone
        self._settler.stop_lease_ms = steps.stop_lease_ms()
        workflow.register(r, steps)
        self.events.attempt_running = functools.partial(workflow.attempt_running, r)
        self._target = conn.resolve_target(self.settings.group)
        self.watchdog = Watchdog(
            self.settings, self.plugins, self.store, self._settler, resume=self.resume_stale
        )
        self.events.listeners.append(self.watchdog.on_event)  # a job due soon wakes it
        self.watchdog.start()
        if self.store.notify_secrets:
            self.notifier = Notifier(self.settings, self.jobs, self.store.notify_secrets)
            self.events.listeners.append(self.notifier.on_event)
            self.notifier.start()
        self.checks.start()
        self.events.stop_on_signals(self._signalled)

    async def take_group(self) -> str | None:
        """Why this process may not serve in its `TETHER_GROUP`, or None.

        A workflow runs only on processes of the group its job was started
        in, so a store's jobs in flight wait for that group: a host restarted
        in another would leave them waiting for good (one host), and the jobs
        it starts would wait for it alone. So a group other than the one the
        store records is refused while any job is pending or running; once
        none is, it becomes the store's group (every host is then to start in
        it). The first start on a store records its group: on a shared store
        that earlier releases ran, the group of the host that started last
        (`compare_with_last_host`'s record), else its own."""
        jobs = self.jobs
        if not isinstance(jobs, SqlJobIndex):
            return None
        group = self.settings.group
        try:
            assumed = str(msgspec.json.decode(await jobs.meta(LAST_HOST) or "null")["group"])
        except (msgspec.DecodeError, KeyError, TypeError):
            assumed = None
        recorded, running = await store_call(jobs.take_group(group, assumed))
        if not running:
            if recorded not in (None, group):
                log.warning(
                    "TETHER_GROUP is now %r (the store's jobs ran in %r; none is in flight):"
                    " every host on this store must start in %r from now on",
                    group,
                    recorded,
                    group,
                )
            return None
        return (
            f"TETHER_GROUP={group!r}, but this store's group is {recorded!r} and {running} job(s)"
            " are pending or running: a job's workflow runs only on processes of the group it"
            " started in, so jobs of that group would wait for a host in it, and the jobs"
            " this host started would wait for this host alone. Start it with"
            f" TETHER_GROUP={recorded!r}; to change the store's group, let the jobs in flight"
            f" end first (or cancel them) with the hosts still in {recorded!r}"
        )

    @staticmethod
    def _notify_disagreement(
        mine: list[str], theirs: list[str], other: str, shared: bool
    ) -> list[str]:
        """`compare_with_last_host`'s line on the notification secrets, as
        fingerprints (current first), if any. Hosts up together: none signs
        with a secret the other does, so no receiver verifies both hosts'
        messages (during a rotation's restarts they share the old one). The
        last start of a store no other host shares: the secret it signed
        with (the one receivers were given) is not signed with now."""
        if shared and not set(mine) & set(theirs):
            return [
                f"TETHER_NOTIFY_SECRET disagrees with {other}: no secret signs the completion"
                " notifications of both, so a receiver refuses one host's or the other's."
                " Every host must have the same (rotate as docs/operations.md says)"
            ]
        if not shared and theirs[0] not in mine:
            return [
                f"the notification secret disagrees with {other}: receivers given the old one"
                " refuse the completion notifications signed now. Give it in"
                " TETHER_NOTIFY_SECRET_PREVIOUS until every receiver has the new one"
                " (docs/operations.md, changing the secret)"
            ]
        return []

    async def compare_with_last_host(self) -> list[str]:
        """Compare this process's shared settings with those of the host that
        started last on the shared store, and leave this one's in their place
        (`tether_meta`; the callback secrets as one-way fingerprints). What to
        tell the operator, one line each: callback secrets that disagree (URLs
        one signs answer 401 on the other; a rotation done as
        docs/operations.md says agrees at every step), another
        `TETHER_PUBLIC_URL` (the callback URLs handed out name the other),
        another `TETHER_GROUP` (each host's workflows wait on its own group
        alone), notification secrets that disagree (`_notify_disagreement`).
        On a store no other host shares, the same record is this
        store's last start: another callback secret or public URL there
        strands the jobs that were waiting (`take_group` refuses another
        group itself). Nothing for the first start, or a record this release
        did not write."""
        jobs = self.jobs
        if not isinstance(jobs, SqlJobIndex):
            return []
        signs, accepts = self.signer.fingerprints()
        group, url = self.settings.group, self.settings.base_url
        notify = notify_fingerprints(self.store.notify_secrets)
        mine = {"signs": signs, "accepts": accepts, "group": group, "at": now_ms(), "url": url}
        mine |= {"notify": notify, "host": f"{socket.gethostname()}, pid {os.getpid()}"}
        before = await jobs.swap_meta(LAST_HOST, msgspec.json.encode(mine).decode())
        try:
            theirs = msgspec.json.decode(before or "null")
            at = datetime.fromtimestamp(int(theirs["at"]) / 1000, UTC).isoformat(timespec="seconds")
            shared = self.settings.shared
            # Which machine and process, where the record says (not before 2026-12-06):
            # every host has the same public URL, which names none of them.
            on = f" on {shown(str(theirs['host']))}," if theirs.get("host") else ""
            other = (
                f"the host that started before this one on the same store (at {at},{on} public URL"
                if shared
                else f"this store's last start (at {at},{on} with public URL"
            ) + f" {theirs['url']!r})"
            if shared:  # hosts up together: each takes the other's URLs
                secrets_agree = agree((signs, accepts), (theirs["signs"], list(theirs["accepts"])))
            else:  # the last start is over: its URLs are what must still work
                secrets_agree = theirs["signs"] in accepts
            their_group = str(theirs["group"])
            their_notify = [str(f) for f in theirs.get("notify") or []]  # (not before 2026-12-06)
        except (msgspec.DecodeError, KeyError, TypeError, ValueError, AttributeError):
            return []
        said = []
        if not secrets_agree:
            said.append(
                "TETHER_CALLBACK_SECRET (or TETHER_CALLBACK_SECRET_PREVIOUS) disagrees with"
                f" {other}: callback URLs signed by one are refused (401) by the other."
                " Every host must have the same secrets (rotate as docs/operations.md says)."
                " If every host was stopped and the secret replaced on purpose, this goes away"
                " once they all run the new one"
                if shared
                else f"the callback secret disagrees with {other}: the callback URLs handed out"
                " before are refused (401) now, so jobs waiting since then cannot be called"
                " back. Give the old secret in TETHER_CALLBACK_SECRET_PREVIOUS until they end"
                " (docs/operations.md, rotating the callback secret); if none was waiting,"
                " this goes away at the next start"
            )
        if not self.settings.public_url and not shared and theirs["url"] != url:
            # One host, its URLs made of TETHER_HOST and TETHER_PORT (found by an
            # exploratory QA pass): said only with jobs waiting, which a new port
            # strands (`./dev serve --port 9000` on a store of another port is fine).
            waiting = sum((await jobs.waiting_backends((), queued=False)).values())
            if waiting:
                # Which address a waiting job was given is not kept (its URL
                # holds its token): it may be this one, when the service is
                # back where it served before (found by a QA pass, 2026-12-06:
                # the advice was to point TETHER_PUBLIC_URL at the other).
                said.append(
                    f"callback URLs now begin {url!r} (TETHER_PUBLIC_URL is not set: made of"
                    f" TETHER_HOST and TETHER_PORT), which differs from {other}: the jobs"
                    " triggered while it ran were handed callback URLs at its address, and"
                    f" {waiting} job(s) are waiting now (given that address, an earlier one,"
                    " or this one). Until they end, a job's callbacks must reach this service"
                    " at the address it was given: serve at it again, or forward it here."
                    " Nothing is wrong if they were given this address (the service is back"
                    " where it served before). Said at this start only: the next takes this"
                    " address as the last"
                )
        if self.settings.public_url and theirs["url"] != url:  # unset, shared: warned of already
            said.append(
                f"TETHER_PUBLIC_URL={url!r} differs from {other}: each job's callback URL"
                " names the public URL of the host that triggered it, so jobs waiting now are"
                " called back at the other. Every host on one store should have the same (the"
                " load balancer's), and a URL once handed out must keep reaching a host of this"
                " store until the jobs that got it end"
                if shared
                else f"TETHER_PUBLIC_URL={url!r} differs from {other}: the jobs waiting since"
                " then are called back at the old URL, which must keep reaching this service"
                " until they end"
            )
        if notify and their_notify:
            said += self._notify_disagreement(notify, their_notify, other, shared)
        if their_group != group and shared:
            said.append(
                f"TETHER_GROUP={group!r} differs from {other}, in {their_group!r}: a workflow is"
                " run only by processes of its group, so the jobs a host took wait for its own"
                " group alone when it dies. Every host on one store must have the same"
                " TETHER_GROUP"
            )
        return said

    async def close(self) -> None:
        """End open event streams, cut short the stops under way (each gives
        its lease up for the next watchdog sweep: `_spawn_stop`) and the
        trigger calls answering late (`JobSteps.close`), stop the watchdog
        and the worker, close the backends and the store."""
        self.events.stop()
        await self.checks.stop()
        for task in list(self._starting):
            with contextlib.suppress(Exception):
                await task
        await self._cut_stops()
        if self._steps is not None:
            await self._steps.close()
        if self.watchdog is not None:
            await self.watchdog.stop()
        if self.notifier is not None:
            await self.notifier.stop()
        if self.resonate is not None:
            stopping = asyncio.ensure_future(self.resonate.stop())
            await asyncio.sleep(0)  # its first step: the SDK runs no task pushed to it from here
            if self._steps is not None:
                self._steps.hand_back()  # the tasks of the waits cut short
            hurry = asyncio.ensure_future(self._hurry.wait())
            try:
                await asyncio.wait(
                    (stopping, hurry), timeout=STOP_GRACE, return_when="FIRST_COMPLETED"
                )
            finally:
                hurry.cancel()  # (also when the close itself is cancelled)
            if not stopping.done():
                stopping.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await stopping
                log.warning(
                    "steps still running %s (a backend's request not yet answered, or the"
                    " store): stopped anyway; another worker takes them over when their"
                    " leases run out (TETHER_TASK_TTL)",
                    "at a second signal" if self._hurry.is_set() else f"after {STOP_GRACE:g}s",
                )
        await self._cut_stops()  # spawned meanwhile (a late callback, a step's settle)
        if self._steps is not None:
            await self._steps.close()  # left by a step that ran on meanwhile
        for backend in self.plugins.backends.values():
            try:
                await asyncio.wait_for(backend.close(), BACKEND_CLOSE_TIMEOUT)
            except TimeoutError:
                log.warning(
                    "backend %s: close did not end within %g s; going on without it",
                    backend.name,
                    BACKEND_CLOSE_TIMEOUT,
                )
            except PLUGIN_FAULTS as exc:
                if isinstance(exc, asyncio.CancelledError) and cancelling():
                    raise  # the stop's own
                log.warning("backend %s: close failed: %s", backend.name, type(exc).__name__)
        await self.store.close()

    def _signalled(self) -> None:
        """A SIGTERM or SIGINT: the second one hurries the stop (`_hurry`)."""
        self._signals += 1
        if self._signals == 2:
            self._hurry.set()

    @property
    def settler(self) -> Settler:
        assert self._settler is not None, "Tether.open(worker=True) did not run"
        return self._settler

    @functools.cached_property
    def callbacks(self) -> Callbacks:
        """The callback, heartbeat and backend-notification use cases, made
        once (they hold no state of their own)."""
        return Callbacks(self.plugins, self.jobs, self.signer, self.settler)

    @functools.cached_property
    def notices(self) -> Notices:
        return Notices(self.plugins, self.jobs, self.callbacks)

    # ── the API's use cases ──────────────────────────────────────────────────

    async def create_job(self, req: JobRequest) -> tuple[Job, bool]:
        """Accept a job and start its workflow. Returns the job and whether it is
        new; the same id with the same request (compared in normal form, see
        `NormalRequest`) reattaches, nothing re-triggered; with a different
        request it is a `Conflict` naming the fields that differ.

        A malformed id or timeout (outside what the OpenAPI document states) is
        `MalformedBody` (400); an unknown backend or params its plugin refuses
        are `InvalidRequest` (422)."""
        self._in_service()
        if req.id is not None and not JOB_ID_PATTERN.fullmatch(req.id):  # ($ passes a last \n)
            raise MalformedBody(f"invalid job id: use {JOB_ID_RULE}", {"field": "id"})
        timeout = float(self.settings.default_timeout if req.timeout is None else req.timeout)
        if not 0 < timeout <= self.settings.max_timeout:
            raise MalformedBody(
                f"timeout must be more than 0 seconds and at most"
                f" {duration(self.settings.max_timeout)}",
                {"field": "timeout"},
            )
        # A heartbeat_timeout past the job's timeout is taken (the document
        # cannot state that bound, and a schema-valid request is never
        # refused): the deadline comes first, no heartbeat is ever missed.
        beat = None if req.heartbeat_timeout is None else float(req.heartbeat_timeout)
        if beat is not None and beat > self.settings.max_timeout:
            raise MalformedBody(
                f"heartbeat_timeout must be at most {duration(self.settings.max_timeout)}",
                {"field": "heartbeat_timeout"},
            )
        for name, value in (("params", req.params), ("metadata", req.metadata)):
            if deeper_than(value, MAX_DEPTH - 1):  # (one level: the body's own object)
                raise MalformedBody(
                    f"invalid {name}: JSON nested more than {MAX_DEPTH} levels deep",
                    {"field": name, "limit_depth": MAX_DEPTH},
                )
        # msgspec cannot check `uniqueItems`, and the pattern is stated, not checked
        # (msgspec's `re.search` would pass a trailing newline and quote the regex).
        for at, tag in enumerate(req.tags):
            if not TAG_PATTERN.fullmatch(tag):
                said = f"invalid tags: tags[{at}] {shown(tag)} is not a tag; a tag is {TAG_RULE}"
                raise MalformedBody(said, {"field": f"tags[{at}]"})
            if tag in req.tags[:at]:
                said = f"invalid tags: tags[{at}] {shown(tag)} is given twice; no two alike"
                raise MalformedBody(said, {"field": f"tags[{at}]"})
        tags = sorted(req.tags)
        notify = None if req.notify is None else req.notify.url
        if notify is not None and (fault := url_fault(notify)):
            raise MalformedBody(f"invalid notify.url: it {fault}", {"field": "notify.url"})
        if notify is not None and not self.store.notify_secrets:
            raise InvalidRequest(
                "notify needs a notification secret, and this service has none: set"
                " TETHER_NOTIFY_SECRET (the same on every host sharing the store)",
                {"field": "notify.url"},
            )
        backend = self.plugins.backend(req.backend)
        params = self.plugins.convert_params(backend, req.params)
        normal = NormalRequest(
            req.backend,
            msgspec.to_builtins(params),
            timeout,
            req.metadata,
            beat,
            tuple(tags),
            notify,
        )
        now = now_ms()
        rec = JobRecord(
            id=req.id or uuid.uuid4().hex,
            backend=req.backend,
            state="pending",
            params=req.params,
            metadata=req.metadata,
            timeout=timeout,
            fingerprint=normal.fingerprint(),
            deadline=now + int(timeout * 1000),
            created_at=now,
            updated_at=now,
            heartbeat_timeout=beat,
            tags=tags,
            notify_url=notify,
        )
        accepted = NewEvent("accepted", {"backend": rec.backend, "timeout": timeout})
        if beat is not None:
            accepted.data["heartbeat_timeout"] = beat
        stored, created = await store_call(self.jobs.insert(rec, [accepted]))
        if not created and stored.fingerprint != rec.fingerprint:
            # Rows written before requests were normalised carry a fingerprint
            # of the raw request: compare field by field, which also names them.
            differ = stored_request(self.plugins, stored).differences(normal)
            if differ:
                verb = "differs" if len(differ) == 1 else "differ"
                raise Conflict(
                    f"job {stored.id!r} exists with a different request ({', '.join(differ)}"
                    f" {verb}); use another id",
                    {"field": "id", "differs": differ},
                )
        try:
            # A new job, or one whose start may have been lost (pending). Not a
            # running one (its workflow triggered it: a repeat only reattaches,
            # and need not wait on the store), nor a finished one: retention
            # may have deleted its workflow's promises (an hour before its
            # row), and a start would make it again.
            if stored.state == "pending":
                await self._start(stored)
        except (StoreUnavailable, ServerError, DecodingError) as exc:
            # The job is recorded: its workflow is started once the store
            # answers (`resume_pending`). An error here would have a client
            # that sent no id make a second job when it tries again.
            log.warning(
                "job %s: its workflow starts once the store answers (%s)",
                stored.id,
                reason(exc),
                extra=stored.log_extra(),
            )
        if created:
            log.info(
                "job %s accepted (backend %s)%s",
                stored.id,
                stored.backend,
                ", queued" if stored.state == "queued" else "",
                extra=stored.log_extra(),
            )
        return view(stored), created

    async def retry_job(self, job_id: str, attempt: float | None = None) -> Job:
        """Start the next attempt of a failed, timed-out or canceled job: a new
        trigger, callback URL and idempotency key, and a fresh deadline
        (docs/lifecycle.md). With `attempt`, the attempt the caller wants to
        exist afterwards: a job already at it is answered as it is (and, if it
        is still `pending`, its workflow started again: a repair after a crash
        between the index write and the start); a job one short starts it.
        Anything else is a `Conflict` naming the current attempt and state."""
        self._in_service()
        wanted = None if attempt is None else int(attempt)
        if attempt is not None and wanted != attempt:
            raise MalformedBody("attempt must be a whole number", {"field": "attempt"})
        rec = await store_call(self.jobs.get(job_id))
        if rec is None:
            raise NotFound.job(job_id)
        if wanted is not None and wanted == rec.attempt:
            if rec.state == "pending":
                await self._start(rec)
            return view(rec)
        if (wanted is not None and wanted != rec.attempt + 1) or rec.state not in RETRYABLE_STATES:
            raise self._not_retryable(rec, wanted)
        if rec.backend not in self.plugins.backends:  # its trigger would fail at once
            raise Conflict(
                f"job {shown(rec.id)} runs on backend {rec.backend!r}, which is not installed here:"
                " install its plugin (`tether install`), restart, then retry",
                {"backend": rec.backend, "valid": sorted(self.plugins.backends)},
            )
        rec = await self._wound_up(rec) or await self._await_attempt(rec)
        previous: dict[str, Any] = {"state": rec.state}
        if rec.error is not None:
            previous["error"] = msgspec.to_builtins(rec.error)
        if rec.external is not None:
            previous["external"] = rec.external
        now = now_ms()
        retried = NewEvent("retried", {"previous": previous, "timeout": rec.timeout})
        deadline = now + int(rec.timeout * 1000)
        started = await store_call(self.jobs.retry(job_id, rec.attempt, deadline, now, retried))
        if started is None:  # another retry got there first, or a stop is due since
            latest = await store_call(self.jobs.get(job_id))
            if latest is not None and latest.attempt == rec.attempt and latest.stop_due is not None:
                raise _still_winding_up(latest)
            if wanted is not None:
                return await self.retry_job(job_id, wanted)
            return await self._refuse_now(job_id)
        await self._start(started)
        log.info("job %s: attempt %d started", job_id, started.attempt, extra=started.log_extra())
        return view(started)

    def _not_retryable(self, rec: JobRecord, wanted: int | None) -> Conflict:
        at = f"job {shown(rec.id)} is at attempt {rec.attempt} ({rec.state})"
        details: dict[str, Any] = {"attempt": rec.attempt, "state": rec.state}
        if wanted is not None and wanted != rec.attempt + 1:
            return Conflict(f"{at}: attempt {wanted} cannot start from there", details)
        return Conflict(f"{at}; only a failed, timed-out or canceled job can be retried", details)

    async def _refuse_now(self, job_id: str) -> Job:
        rec = await store_call(self.jobs.get(job_id))
        if rec is None:
            raise NotFound.job(job_id)
        raise self._not_retryable(rec, None)

    async def _wound_up(self, rec: JobRecord) -> JobRecord | None:
        """The ended attempt `rec` is at, read again once it has wound up (what
        it recorded while it did, a late run's `external`, goes into the
        retry's `previous`); None while it still winds up: its workflow has
        yet to return, or a stop is due (`stop_due`): of the run of a job no
        workflow finishes, or of what a trigger call left to answer late may
        start (held before its workflow returns: read again once it has).
        `rec` itself when the row is gone or at another attempt: the retry's
        conditional write then says."""
        if rec.stop_due is not None:
            return None
        if await store_call(workflow.attempt_running(self._worker(), rec.id, rec.attempt)):
            return None
        now = await store_call(self.jobs.get(rec.id))
        if now is None or now.attempt != rec.attempt:
            return rec
        return None if now.stop_due is not None else now

    async def _await_attempt(self, rec: JobRecord) -> JobRecord:
        """Wait (at most `ATTEMPT_END_WAIT` seconds) for the ended attempt's
        workflow to return, or its run's stop to be recorded: its finish
        stops the external run of a canceled or timed-out attempt and tells
        the plugins, and must see the job still at that attempt. The row
        then (`_wound_up`); `Conflict` if it does not end in time."""
        deadline = time.monotonic() + ATTEMPT_END_WAIT
        while time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            latest = await store_call(self.jobs.get(rec.id))
            if latest is None or latest.attempt != rec.attempt:
                return rec  # deleted, or retried by another: the retry's update says
            wound_up = await self._wound_up(latest)
            if wound_up is not None:
                return wound_up
            rec = latest
        raise _still_winding_up(rec)

    async def _start(self, rec: JobRecord) -> None:
        """Start the workflow of the job's current attempt, unless it is
        queued: its workflow starts when a slot frees (`_on_ready`)."""
        if rec.state != "queued":
            self._in_service()
            await store_call(workflow.start(self._worker(), self._target, rec))

    def _in_service(self) -> None:
        """`StoreUnavailable` when this process must start no workflow (its
        Resonate server was re-paired with another index: `Store.out_of_service`)."""
        why = self.store.out_of_service()
        if why:
            raise StoreUnavailable(why)

    def _ended_in_queue(self, rec: JobRecord, event: Event) -> None:
        """Tell the plugins of a job that ended while queued (canceled, timed
        out): it never had a workflow, whose finish tells them of the rest."""
        if event.type == "finished" and rec.queued_at is not None:
            log.info("job %s finished: %s (while queued)", rec.id, rec.state, extra=rec.log_extra())
            self.plugins.job_finished(view(rec))

    async def _cut_stops(self) -> None:
        """Cancel the stops under way (`_spawn_stop`) and wait for them: each
        gives its lease up, within seconds. Again until none is left: one
        spawned while the others gave up (a settle that came meanwhile) is
        cut short too, before the backends and the store close."""
        while self._stopping:
            stops = list(self._stopping)
            for stop in stops:
                stop.cancel()
            await asyncio.gather(*stops, return_exceptions=True)

    def _spawn_stop(self, finish: Coroutine[Any, Any, None]) -> None:
        """Run the finish of a job no workflow finishes, its run's stop
        recorded as due (`Settler.spawn`), in a task of this process's,
        not the request that ended the job: the backend's `cancel` and its
        retries may take minutes. Cancelled as the service stops (`close`),
        which gives the stop's lease up for the next watchdog sweep."""
        task = asyncio.get_running_loop().create_task(finish)
        self._stopping.add(task)  # (a strong reference: the loop keeps a weak one)
        task.add_done_callback(self._stopping.discard)

    def _on_ready(self, promoted: list[JobRecord]) -> None:
        """Start the workflows of jobs a write just moved out of the queue.
        A start lost to a crash is made again by `resume_pending`."""
        if self.resonate is None:
            return  # a process that runs no workflow (`tether gc`) promotes no job
        task = asyncio.get_running_loop().create_task(self._start_ready(promoted))
        self._starting.add(task)
        task.add_done_callback(self._starting.discard)

    async def _start_ready(self, promoted: list[JobRecord]) -> None:
        for rec in promoted:
            try:
                await self._start(rec)
            except Exception as exc:
                log.warning(
                    "job %s: starting it after the queue failed (%s); it starts when a"
                    " service starts",
                    rec.id,
                    reason(exc),
                    extra=rec.log_extra(),
                )

    async def resume_pending(self) -> int:
        """Start the workflow of every pending job again (creating an existing
        one changes nothing): a process killed between writing a job's new
        attempt (or a new job) to the index and starting its workflow leaves
        one pending with none. Run once at start-up; returns how many it started.
        First, queued jobs take the slots free under today's limits (they
        may have changed, or gone)."""
        for backend in await store_call(self.jobs.queued_backends()):
            while await store_call(self.jobs.promote(backend, now_ms())):
                if backend in self.jobs.limits:
                    break
        return await self._start_pending(None)

    async def resume_stale(self) -> int:
        """Start the workflow of every job pending for over `STALE_PENDING_MS`
        (creating an existing one changes nothing): the watchdog's repair for a
        process that died between writing a job `pending` and starting its
        workflow, and never came back. Returns how many it started."""
        return await self._start_pending(now_ms() - STALE_PENDING_MS)

    async def _start_pending(self, updated_before: int | None) -> int:
        """Start the workflow of each pending job (last changed before
        `updated_before`, if given), a page at time; how many."""
        before, started = None, 0
        while True:
            listed = await store_call(self.jobs.pages([("pending", None)], RESUME_PAGE, before))
            for rec in listed.rows:
                if updated_before is None or rec.updated_at < updated_before:
                    await self._start(rec)
                    started += 1
            if listed.resume_before is not None:  # a page cut short (its jobs' bytes)
                before = listed.resume_before
            elif len(listed.rows) < RESUME_PAGE:
                return started
            else:
                before = listed.rows[-1].seq

    def _worker(self) -> Resonate:
        assert self.resonate is not None, "Tether.open(worker=True) did not run"
        return self.resonate

    async def get_job(self, job_id: str) -> Job:
        rec = await store_call(self.jobs.get(job_id))
        if rec is None:
            raise NotFound.job(job_id)
        return view(rec)

    async def list_jobs(self, *filters: Any, **named: Any) -> JobPage:
        """A page of jobs as `list_query`'s filters name it: `list_page` of
        `list_query`."""
        return await self.list_page(self.list_query(*filters, **named))

    def list_query(
        self,
        states: Sequence[str] = (),
        backends: Sequence[str] = (),
        limit: int = 100,
        cursor: str | None = None,
        *,
        tags: Sequence[str] = (),
        created_after: datetime | None = None,
        created_before: datetime | None = None,
    ) -> ListQuery:
        """Jobs newest first, in any of `states` and of any of `backends` (each
        empty: all), having every one of `tags`, created strictly after
        `created_after` and before `created_before` (a time without a zone is
        UTC), at most `limit`, after the place `cursor` names: the filters
        checked (`MalformedBody` names a bad one), nothing read; a page of
        them is `list_page`."""
        if not 1 <= limit <= MAX_PAGE:
            raise MalformedBody(f"limit must be from 1 to {MAX_PAGE}", {"field": "limit"})
        bad = next((tag for tag in tags if not TAG_PATTERN.fullmatch(tag)), None)
        if bad is not None:  # no job has it: say so rather than list none
            raise MalformedBody(f"invalid tag {shown(bad)}: a tag is {TAG_RULE}", {"field": "tag"})
        if "" in backends:  # no backend has an empty name: a filter that matches nothing
            raise MalformedBody("invalid backend '': name one", {"field": "backend"})
        if len(set(backends)) > LIST_BACKENDS_MAX:
            raise MalformedBody(
                f"at most {LIST_BACKENDS_MAX} backends in one list", {"field": "backend"}
            )
        # The index reads each (state, backend) pair's newest `limit + 1` rows,
        # all in one snapshot, and keeps the newest `limit + 1` of them.
        any_of: list[str | None] = [None]
        return ListQuery(
            pairs=[
                (state, backend)
                for state in (list(dict.fromkeys(states)) or any_of)
                for backend in (list(dict.fromkeys(backends)) or any_of)
            ],
            limit=limit,
            before=decode_cursor(cursor) if cursor else None,
            tags=list(dict.fromkeys(tags)),
            after=None if created_after is None else unix_ms(created_after),
            until=None if created_before is None else unix_ms(created_before, up=True),
        )

    async def list_page(self, q: ListQuery) -> JobPage:
        """The page of jobs `q` (of `list_query`) names, as the store has it now."""
        listed = await store_call(
            self.jobs.pages(q.pairs, q.limit + 1, q.before, q.tags, q.after, q.until)
        )
        rows = listed.rows[: q.limit]
        if len(listed.rows) > q.limit:
            next_cursor: str | None = encode_cursor(rows[-1].seq)
        elif listed.resume_before is not None:  # filters that rarely meet: go on there
            next_cursor = encode_cursor(listed.resume_before)
        else:
            next_cursor = None
        return JobPage(items=[view(r) for r in rows], next_cursor=next_cursor)

    async def cancel_job(self, job_id: str, reason: str | None = None) -> Job:
        """Cancel a waiting job; `Conflict` when it already finished. The
        reason, if any, is kept in the job's `error.message`."""
        rec = await store_call(self.jobs.get(job_id))
        if rec is None:
            raise NotFound.job(job_id)
        if not rec.finished:
            message = "canceled by request"
            if reason and reason.strip():
                message += f": {reason.strip()}"
            message += self.plugins.not_stopped(rec.backend, rec.external)
            outcome = Outcome(status="canceled", error=ErrorInfo(message=message, type="canceled"))
            asked = NewEvent("cancel_requested", {"reason": (reason or "").strip() or None})
            result, rec = await self.settler.settle(
                job_id, outcome, by="cancel", note=lambda r: asked if r == "accepted" else None
            )
            if result == "accepted":
                log.info("job %s canceled", job_id, extra=rec.log_extra())
                return view(rec)
        raise Conflict(f"job {shown(job_id)} already finished ({rec.state})", {"state": rec.state})

    async def job_events(
        self, job_id: str, limit: int = 100, cursor: str | None = None
    ) -> EventPage:
        """A job's history, oldest first (see `core.events`)."""
        return await self.events.page(job_id, limit, cursor)

    async def follow_job(
        self, job_id: str, after: int = 0, until: float | None = None
    ) -> AsyncIterator[JobEvent | Literal["end"] | None]:
        """A job's events after `seq` `after`, then live ones until it finishes
        and nothing more is due, then `"end"`; or until `until` (Unix
        seconds), without `"end"` (`JobHistory.follow`)."""
        return await self.events.follow(job_id, after, until)

    async def callback(self, promise_id: str, token: str | None, body: bytes) -> CallbackResult:
        """Settle a job's wait from its callback URL (see `core.callbacks`)."""
        return await self.callbacks.take(promise_id, token, body)

    async def callback_too_large(
        self, promise_id: str, token: str | None, size: int | None
    ) -> None:
        """A callback refused 413, filed on its job (see `core.callbacks`)."""
        await self.callbacks.too_large(promise_id, token, size)

    async def heartbeat(
        self, promise_id: str, token: str | None, body: bytes
    ) -> tuple[Heartbeat, HeartbeatGone | None]:
        """A run saying it is alive, and how far along; with why it changed
        nothing when it came too late (see `core.callbacks`). Its next miss
        wakes this process's watchdog, should it be due before its look."""
        beat, gone = await self.callbacks.heartbeat(promise_id, token, body)
        if gone is None and beat.heartbeat_due is not None and self.watchdog is not None:
            self.watchdog.due_by(round(beat.heartbeat_due.timestamp() * 1000))
        return beat, gone

    async def backend_notification(
        self,
        name: str,
        headers: Mapping[str, str],
        query: Mapping[str, list[str]],
        body: bytes,
    ) -> NoticeResult:
        """A notification the external system of backend `name` posted to its
        one endpoint: the backend authenticates and reads it, Tether finds the
        jobs of the runs it names and asks the backend about them (see
        `core.notices`)."""
        return await self.notices.take(name, headers, query, body)

    async def health(self) -> dict[str, Any]:
        """Liveness: raises when the store does not answer, whatever the
        backends say. The body adds each backend's cached readiness and the
        backends waiting jobs need but no plugin offers (see `core.health`)."""
        await store_answers(self.jobs, describe(self.settings.store))
        return {
            "status": "ok",
            "version": version(),
            "store": self.store.kind,
            "backends": sorted(self.plugins.backends),
            **self.checks.body(),
        }

    async def collect_garbage(self, older_than: float) -> tuple[int, int]:
        """Retention now (`tether gc`): see `core.watchdog.collect_garbage`."""
        return await collect_garbage(self.store, older_than)
