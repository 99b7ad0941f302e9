"""Tether's use cases: start, read, list, cancel and settle jobs.

`Tether` owns the Resonate instance the workflow runs on, the job index and the
plugins. The API calls its public methods; the workflow's steps call `trigger`
and `finish`; the watchdog ends jobs past their deadline and asks backends about
jobs whose callback may be lost. See `core.orchestrator` for the workflow.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import logging
import time
import uuid
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import msgspec
from resonate.error import ServerError
from resonate.resonate import Resonate
from resonate.types import TaskData, Value
from resonate_base import ConnectorError

from core import orchestrator
from core.errors import (
    BackendError,
    Conflict,
    InvalidRequest,
    MalformedBody,
    NotFound,
    StoreUnavailable,
    Unauthorized,
)
from core.models import (
    JOB_ID_PATTERN,
    JOB_ID_RULE,
    CallbackBody,
    CheckNow,
    ErrorInfo,
    Job,
    JobPage,
    JobRequest,
    Outcome,
    Trigger,
)
from core.plugins import Plugins
from core.settings import Settings
from core.store import Store
from core.store.jobs import JobRecord, now_ms
from core.tokens import CallbackSigner, idempotency_key

log = logging.getLogger("tether")

SettleResult = Literal["accepted", "duplicate", "conflict", "gone"]
CallbackOutcome = Literal[SettleResult, "noted"]

MAX_PAGE = 1000
WATCHDOG_BATCH = 200
WATCHDOG_CONCURRENCY = 16
CHECK_NOW_TIMEOUT = 30.0
MIN_RETENTION = 86_400.0
GC_EVERY = 3600.0
STORE_TIMEOUT = 8.0
"""A store call of the API not answered by then is `StoreUnavailable` (503). The
stores' own bounds are 5 s (SQLite's wait for a lock, the Postgres pool's wait
for a connection); this is the backstop for calls with no bound of their own."""


class CallbackResult(msgspec.Struct, frozen=True):
    outcome: CallbackOutcome
    job: Job
    message: str = ""


def _dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def view(rec: JobRecord) -> Job:
    """The job as clients see it."""
    return Job(
        id=rec.id,
        backend=rec.backend,
        state=rec.state,
        params=rec.params,
        metadata=rec.metadata,
        timeout=rec.timeout,
        external=rec.external,
        result=rec.result,
        error=rec.error,
        created_at=_dt(rec.created_at),
        updated_at=_dt(rec.updated_at),
        finished_at=None if rec.finished_at is None else _dt(rec.finished_at),
    )


def _fingerprint(req: JobRequest) -> str:
    body = {
        "backend": req.backend,
        "params": req.params,
        "timeout": req.timeout,
        "metadata": req.metadata,
    }
    return hashlib.sha256(msgspec.json.encode(body, order="sorted")).hexdigest()


def _outcome_of(value: Any) -> Outcome:
    """The outcome a settled callback promise holds (a value Tether built)."""
    try:
        return msgspec.convert(value, Outcome)
    except (msgspec.ValidationError, TypeError):
        return Outcome(
            status="failed", error=ErrorInfo(message="unreadable outcome", type="tether")
        )


def _settled_value(outcome: Outcome, by: str, nonce: str) -> dict[str, Any]:
    """What a callback promise is settled with: the outcome, who ended the job,
    and a nonce that tells the settler it won."""
    return {**msgspec.to_builtins(outcome), "by": by, "nonce": nonce}


def _outcome_of_record(rec: JobRecord) -> Outcome:
    return Outcome(status=rec.state, result=rec.result, error=rec.error)  # type: ignore[arg-type]


class Tether:
    def __init__(self, settings: Settings, plugins: Plugins, store: Store, pid: str) -> None:
        self.settings = settings
        self.plugins = plugins
        self.store = store
        self.jobs = store.jobs
        self.pid = pid
        self.signer = CallbackSigner(store.callback_secret, settings.base_url)
        self.resonate: Resonate | None = None
        self._target = ""
        self._watchdog: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"Tether(store={self.store.kind!r}, pid={self.pid!r})"

    # ── lifecycle ────────────────────────────────────────────────────────────

    async def start(self) -> None:
        """Join the store as a worker and start the watchdog. Needs a running loop."""
        conn = self.store.connection
        r = Resonate(
            network=conn,
            group=self.settings.group,
            pid=self.pid,
            ttl=timedelta(seconds=self.settings.task_ttl),
            max_concurrent_tasks=self.settings.max_concurrent_tasks,
            subscription_refresh_secs=0,
        )
        orchestrator.register(r)
        r.with_dependency(self)
        self.resonate = r
        self._target = conn.resolve_target(self.settings.group)
        if self.settings.watchdog_interval > 0:
            self._watchdog = asyncio.create_task(self._watch(), name="tether-watchdog")

    async def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        if self.resonate is not None:
            await self.resonate.stop()
        for backend in self.plugins.backends.values():
            try:
                await backend.close()
            except Exception as exc:
                log.warning("backend %s: close failed: %s", backend.name, type(exc).__name__)
        await self.store.close()

    @property
    def r(self) -> Resonate:
        assert self.resonate is not None, "Tether.start() was not called"
        return self.resonate

    # ── the API's use cases ──────────────────────────────────────────────────

    async def create_job(self, req: JobRequest) -> tuple[Job, bool]:
        """Accept a job and start its workflow. Returns the job and whether it is
        new; the same id with the same request reattaches (nothing re-triggered),
        with a different request it is a `Conflict`."""
        backend = self.plugins.backend(req.backend)
        self.plugins.convert_params(backend, req.params)
        if req.id is not None and not JOB_ID_PATTERN.match(req.id):
            raise InvalidRequest(f"invalid job id: use {JOB_ID_RULE}", {"field": "id"})
        timeout = self.settings.default_timeout if req.timeout is None else req.timeout
        if not 0 < timeout <= self.settings.max_timeout:
            raise InvalidRequest(
                f"timeout must be more than 0 and at most {self.settings.max_timeout:g} seconds",
                {"field": "timeout"},
            )
        now = now_ms()
        rec = JobRecord(
            id=req.id or uuid.uuid4().hex,
            backend=req.backend,
            state="pending",
            params=req.params,
            metadata=req.metadata,
            timeout=timeout,
            fingerprint=_fingerprint(req),
            deadline=now + int(timeout * 1000),
            created_at=now,
            updated_at=now,
        )
        stored, created = await self._store_call(self.jobs.insert(rec))
        if not created and stored.fingerprint != rec.fingerprint:
            raise Conflict(
                f"job {stored.id!r} exists with a different request; use another id",
                {"field": "id"},
            )
        await self._start_workflow(stored)
        if created:
            log.info("job %s accepted (backend %s)", stored.id, stored.backend)
        return view(stored), created

    async def get_job(self, job_id: str) -> Job:
        rec = await self._store_call(self.jobs.get(job_id))
        if rec is None:
            raise NotFound(f"no job {job_id!r}")
        return view(rec)

    async def list_jobs(
        self, state: str | None, backend: str | None, limit: int, cursor: str | None
    ) -> JobPage:
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidRequest(f"limit must be from 1 to {MAX_PAGE}", {"field": "limit"})
        before = _decode_cursor(cursor) if cursor else None
        rows = await self._store_call(self.jobs.page(state, backend, limit + 1, before))
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = _encode_cursor(rows[-1].seq) if more else None
        return JobPage(items=[view(r) for r in rows], next_cursor=next_cursor)

    async def cancel_job(self, job_id: str) -> Job:
        """Cancel a waiting job; `Conflict` when it already finished."""
        rec = await self._store_call(self.jobs.get(job_id))
        if rec is None:
            raise NotFound(f"no job {job_id!r}")
        if not rec.finished:
            outcome = Outcome(
                status="canceled", error=ErrorInfo(message="canceled by request", type="canceled")
            )
            result, rec = await self.settle(job_id, outcome, by="cancel")
            if result == "accepted":
                log.info("job %s canceled", job_id)
                return view(rec)
        raise Conflict(f"job {job_id!r} already finished ({rec.state})", {"state": rec.state})

    async def callback(self, promise_id: str, token: str | None, body: bytes) -> CallbackResult:
        """Settle a job's wait from its callback URL."""
        if not self.signer.verify(promise_id, token):
            raise Unauthorized("missing or invalid callback token")
        job_id = orchestrator.job_id_of(promise_id)
        rec = None if job_id is None else await self._store_call(self.jobs.get(job_id))
        if job_id is None or rec is None:
            raise NotFound(f"no promise {promise_id!r}")
        outcome = self._parse_callback(rec, body)
        if isinstance(outcome, CheckNow):
            return await self._check_now(rec, outcome.reason)
        result, rec = await self.settle(job_id, outcome, by="callback")
        messages = {
            "accepted": "outcome recorded",
            "duplicate": "the same outcome was already recorded; nothing changed",
            "conflict": f"a different outcome was already recorded ({rec.state}); nothing changed",
            "gone": f"the job is {rec.state}; its wait accepts nothing more",
        }
        if result == "accepted":
            log.info("job %s %s by callback", job_id, outcome.status)
        return CallbackResult(outcome=result, job=view(rec), message=messages[result])

    async def health(self) -> dict[str, Any]:
        await self._store_call(self.jobs.ping())
        return {"status": "ok", "store": self.store.kind, "backends": sorted(self.plugins.backends)}

    # ── settling ─────────────────────────────────────────────────────────────

    async def settle(
        self, job_id: str, outcome: Outcome, by: str
    ) -> tuple[SettleResult, JobRecord]:
        """End job `job_id`'s wait with `outcome`, unless something ended it first.

        Settles the job's callback promise with a value Tether builds (never a
        rejection, never a caller's object), then records the outcome in the job
        index. The first settle wins; later ones learn whether they agreed with
        it (`duplicate`), disagreed (`conflict`), or came after a cancel or
        timeout (`gone`).
        """
        promise_id = orchestrator.callback_promise_id(job_id)
        nonce = uuid.uuid4().hex
        value = _settled_value(outcome, by, nonce)
        for _ in range(50):
            try:
                record = await self._store_call(
                    self.r.promises.resolve(promise_id, Value(data=value))
                )
                break
            except ServerError as exc:
                if exc.code != 404:
                    raise StoreUnavailable(f"the store refused the settle: {exc.message}") from None
            # The workflow has not created its promise yet: the job is pending.
            # Ending it in the index is enough (the trigger step reads it first),
            # but only while it is still pending; else the promise exists now.
            rec = await self._store_call(
                self.jobs.finish(job_id, outcome, now_ms(), from_states=("pending",))
            )
            if rec is None:
                raise NotFound(f"no job {job_id!r}")
            if rec.finished:
                same = rec.state == outcome.status and _outcome_of_record(rec).same_as(outcome)
                return ("accepted" if same else self._judge(rec.state, same)), rec
            await asyncio.sleep(0.05)
        else:
            raise StoreUnavailable(f"job {job_id!r} did not create its promise in time")
        data = record.value.data if record.state == "resolved" else None
        settled = _outcome_of(data) if data is not None else Outcome(status="timed_out")
        rec = await self._store_call(self.jobs.finish(job_id, settled, now_ms()))
        if rec is None:
            raise NotFound(f"no job {job_id!r}")
        if isinstance(data, dict) and data.get("nonce") == nonce:
            return "accepted", rec
        return self._judge(settled.status, settled.same_as(outcome)), rec

    @staticmethod
    def _judge(status: str, same: bool) -> SettleResult:
        if status in ("canceled", "timed_out"):
            return "gone"
        return "duplicate" if same else "conflict"

    async def _check_now(self, rec: JobRecord, reason: str) -> CallbackResult:
        """A callback that only hints the run ended: ask the backend, settle on
        its answer alone."""
        backend = self.plugins.backends.get(rec.backend)
        message = f"noted ({reason}); " if reason else "noted; "
        if rec.finished or backend is None or rec.external is None:
            return CallbackResult("noted", view(rec), message + f"the job is {rec.state}")
        try:
            found = await asyncio.wait_for(backend.check_status(view(rec)), CHECK_NOW_TIMEOUT)
        except Exception as exc:
            log.warning("job %s: status check on a hint failed: %s", rec.id, type(exc).__name__)
            found = None
        if found is None:
            return CallbackResult(
                "noted", view(rec), message + "the run has not ended; Tether keeps checking"
            )
        _, now = await self.settle(rec.id, found, by="hint")
        return CallbackResult("noted", view(now), message + f"the run's state says {now.state}")

    def _parse_callback(self, rec: JobRecord, body: bytes) -> Outcome | CheckNow:
        try:
            decoded = msgspec.json.decode(body) if body.strip() else {}
        except msgspec.DecodeError as exc:
            raise MalformedBody(f"the callback body is not valid JSON: {exc}") from None
        except RecursionError:
            raise MalformedBody("the callback body is JSON nested too deeply") from None
        backend = self.plugins.backends.get(rec.backend)
        if backend is not None:
            try:
                native = backend.parse_callback(view(rec), decoded)
            except ValueError as exc:
                raise InvalidRequest(f"invalid {rec.backend} callback: {exc}") from None
            if native is not None:
                return native
        try:
            return msgspec.convert(decoded, CallbackBody).outcome()
        except msgspec.ValidationError as exc:
            raise InvalidRequest(
                f"invalid callback body: {str(exc).replace('`$.', '`')};"
                ' expected {"status": "succeeded"|"failed", "result"?, "error"?: {"message"}}'
            ) from None

    # ── the workflow's steps ─────────────────────────────────────────────────

    async def _start_workflow(self, rec: JobRecord) -> None:
        """Create the job's root promise; the store hands its task to a worker.
        Creating an existing root promise changes nothing, so this is safe to
        repeat (a reattach after a crash between index and promise)."""
        data = TaskData(
            func=orchestrator.WORKFLOW,
            args=(rec.id, rec.deadline),
            kwargs={},
            version=orchestrator.VERSION,
        )
        tags = {
            "resonate:origin": rec.id,
            "resonate:branch": rec.id,
            "resonate:parent": rec.id,
            "resonate:scope": "global",
            "resonate:target": self._target,
        }
        await self._store_call(
            self.r.promises.create(
                rec.id, rec.deadline + orchestrator.ROOT_GRACE_MS, Value(data=data), tags
            )
        )

    async def trigger(self, job_id: str, promise_id: str) -> None:
        """The trigger step: start the external job through its backend, unless
        the job already ended (canceled before it was triggered)."""
        rec = await self.jobs.get(job_id)
        if rec is None:
            raise RuntimeError(f"job {job_id!r} has a workflow but no record")
        if rec.finished:
            await self._resolve_quietly(promise_id, _outcome_of_record(rec), "index")
            return
        try:
            receipt = await self._trigger_with_retries(rec, promise_id)
        except BackendError as exc:
            error = ErrorInfo(message=f"trigger failed: {exc.message}", type=exc.code or "trigger")
            log.warning("job %s: trigger failed: %s", job_id, exc.message)
            await self.settle(job_id, Outcome(status="failed", error=error), by="trigger")
            return
        interval = self._check_interval(rec)
        now = now_ms()
        next_check = None if not interval else now + int(interval * 1000)
        updated = await self.jobs.set_external(job_id, receipt, now, next_check)
        if updated is not None and updated.finished:
            # Canceled or timed out while the trigger was under way.
            await self._resolve_quietly(promise_id, _outcome_of_record(updated), "index")
        log.info("job %s triggered", job_id)

    async def _trigger_with_retries(self, rec: JobRecord, promise_id: str) -> dict[str, Any]:
        backend = self.plugins.backends.get(rec.backend)
        if backend is None:
            raise BackendError(f"backend {rec.backend!r} is not installed", code="unknown_backend")
        try:
            params = msgspec.convert(rec.params, backend.params_type)
        except msgspec.ValidationError as exc:
            raise BackendError(f"invalid params: {exc}", code="invalid_params") from None
        trigger = Trigger(
            job=view(rec),
            params=params,
            promise_id=promise_id,
            callback_url=self.signer.url(promise_id),
            idempotency_key=idempotency_key(promise_id),
        )
        attempts = max(self.settings.trigger_attempts, 1)
        delay = self.settings.trigger_backoff
        # An external system may echo the request back, and a plugin's error may
        # quote it: never keep the callback token in the job record or the log.
        token = self.signer.token(promise_id)
        for attempt in range(1, attempts + 1):
            try:
                receipt = msgspec.json.encode(dict(await backend.trigger(trigger)))
                redacted: dict[str, Any] = msgspec.json.decode(
                    receipt.replace(token.encode(), b"***")
                )
                return redacted
            except BackendError as exc:
                exc.message = exc.message.replace(token, "***")
                if not exc.retryable or attempt == attempts:
                    raise
                wait = max(delay, exc.retry_after or 0)
                reason = exc.message
            except Exception as exc:  # a plugin bug or a network error: retry, then fail
                if attempt == attempts:
                    message = f"{type(exc).__name__}: {exc}".replace(token, "***")
                    raise BackendError(message, code="trigger") from None
                wait, reason = delay, f"{type(exc).__name__}"
            log.warning(
                "job %s: trigger attempt %d/%d failed (%s); again in %.1fs",
                rec.id,
                attempt,
                attempts,
                reason,
                wait,
            )
            await asyncio.sleep(wait)
            delay *= 2
        raise AssertionError("unreachable")

    async def finish(self, job_id: str, value: Any) -> None:
        """The finish step: record the outcome, stop the external run of a
        canceled or timed-out job, tell the plugins."""
        rec = await self.jobs.get(job_id)  # usually the settle already recorded it
        if rec is not None and not rec.finished:
            rec = await self.jobs.finish(job_id, _outcome_of(value), now_ms())
        if rec is None:
            return
        backend = self.plugins.backends.get(rec.backend)
        if rec.state in ("canceled", "timed_out") and rec.external is not None and backend:
            try:
                await backend.cancel(view(rec))
            except Exception as exc:
                log.warning(
                    "job %s: cancelling the external run failed: %s",
                    job_id,
                    getattr(exc, "message", type(exc).__name__),
                )
        log.info("job %s finished: %s", job_id, rec.state)
        self.plugins.job_finished(view(rec))

    async def _resolve_quietly(self, promise_id: str, outcome: Outcome, by: str) -> None:
        value = _settled_value(outcome, by, uuid.uuid4().hex)
        await self.r.promises.resolve(promise_id, Value(data=value))

    # ── retention ────────────────────────────────────────────────────────────

    async def collect_garbage(self, older_than: float) -> tuple[int, int]:
        """Delete jobs finished more than `older_than` seconds ago, with their
        promises; nothing open is touched. Returns (jobs, promises) deleted.

        Promises go first and with an hour's more reach than the job rows
        (a job's workflow ends at most an hour after the job does): a job row
        is never gone while its workflow's promises remain, or a later start
        with the same id would find an old, finished workflow and never run.
        """
        if older_than < MIN_RETENTION:
            raise InvalidRequest(f"keep finished jobs at least {MIN_RETENTION:g} seconds")
        gc = getattr(self.store.connection, "gc", None)
        if gc is None:
            raise InvalidRequest(f"the {self.store.kind} store does not support retention yet")
        grace = orchestrator.ROOT_GRACE_MS
        promises = await gc(int(older_than * 1000) - grace)
        before, jobs = now_ms() - int(older_than * 1000), 0
        while ids := await self.jobs.delete_finished(before, 500):
            jobs += len(ids)
        if jobs or promises:
            log.info("retention: deleted %d finished jobs and %d promises", jobs, promises)
        return jobs, promises

    # ── the watchdog ─────────────────────────────────────────────────────────

    async def _watch(self) -> None:
        """Every `watchdog_interval`: time out jobs past their deadline and ask
        backends about running jobs due a status check. Runs in every process;
        settles are first-wins and checks are claimed, so processes don't clash."""
        sem = asyncio.Semaphore(WATCHDOG_CONCURRENCY)

        async def one(rec: JobRecord, now: int) -> None:
            async with sem:
                try:
                    await self._look_at(rec, now)
                except Exception as exc:
                    log.warning("watchdog: job %s: %s", rec.id, type(exc).__name__)

        last_gc = 0.0
        while True:
            await asyncio.sleep(self.settings.watchdog_interval)
            if self.settings.retention and time.monotonic() - last_gc > GC_EVERY:
                last_gc = time.monotonic()
                try:
                    await self.collect_garbage(self.settings.retention)
                except Exception as exc:
                    log.warning("retention: %s", getattr(exc, "message", type(exc).__name__))
            try:
                now = now_ms()
                due = await self.jobs.due(now, WATCHDOG_BATCH)
                await asyncio.gather(*(one(rec, now) for rec in due))
            except Exception as exc:
                log.warning("watchdog: the store did not answer: %s", type(exc).__name__)

    async def _look_at(self, rec: JobRecord, now: int) -> None:
        if rec.deadline <= now:
            outcome = Outcome(
                status="timed_out",
                error=ErrorInfo(
                    message=f"no callback within {rec.timeout:g} seconds", type="timeout"
                ),
            )
            result, _ = await self.settle(rec.id, outcome, by="timeout")
            if result == "accepted":
                log.info("job %s timed out", rec.id)
            return
        backend = self.plugins.backends.get(rec.backend)
        seconds = self._check_interval(rec)
        if rec.next_check_at is None or backend is None or not seconds:
            return
        interval = seconds * 1000
        delay = int(min(10 * interval, max(interval, (now - rec.updated_at) / 2)))
        if not await self.jobs.reschedule_check(rec.id, rec.next_check_at, now + delay):
            return  # another process took this check
        found = await backend.check_status(view(rec))
        if found is not None:
            result, _ = await self.settle(rec.id, found, by="status_check")
            if result == "accepted":
                log.info("job %s %s (found by status check)", rec.id, found.status)

    def _check_interval(self, rec: JobRecord) -> float | None:
        backend = self.plugins.backends.get(rec.backend)
        if backend is None:
            return None
        try:
            return backend.check_interval(msgspec.convert(rec.params, backend.params_type))
        except msgspec.ValidationError:
            return None

    async def _store_call[T](self, awaitable: Awaitable[T]) -> T:
        """Await a store operation; a store that fails becomes `StoreUnavailable`."""
        try:
            async with asyncio.timeout(STORE_TIMEOUT):
                return await awaitable
        except (ConnectorError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"the store did not answer: {type(exc).__name__}") from None


def _encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"s{seq}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if raw[:1] != "s":
            raise ValueError
        return int(raw[1:])
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise InvalidRequest(
            "invalid cursor: pass back a next_cursor unchanged", {"field": "cursor"}
        ) from None
