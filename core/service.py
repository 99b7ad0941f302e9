"""Tether's use cases, the ones the API calls: start, read, list and cancel
jobs, take callbacks, report health.

`Tether.open` builds the application's parts in one place, for the HTTP
service and the command line alike: the store (`core.store`), the Resonate
worker running the workflow (`core.workflow`) and its steps (`core.steps`),
the one way jobs end (`core.settle`), and the watchdog (`core.watchdog`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from datetime import timedelta
from typing import Any, Literal

import msgspec
from resonate.resonate import Resonate

from core import workflow
from core.errors import Conflict, InvalidRequest, MalformedBody, NotFound, Unauthorized
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
)
from core.plugins import Plugins
from core.settings import Settings
from core.settle import Settler, SettleResult, store_call
from core.steps import JobSteps
from core.store import Store, open_store
from core.store.jobs import JobRecord, now_ms
from core.tokens import CallbackSigner
from core.views import decode_cursor, encode_cursor, view
from core.watchdog import Watchdog, collect_garbage

log = logging.getLogger("tether")

CallbackOutcome = Literal[SettleResult, "noted"]

MAX_PAGE = 1000
CHECK_NOW_TIMEOUT = 30.0
"""Seconds a backend may take to answer the status check a hint asks for."""

CALLBACK_MESSAGES = {
    "accepted": "outcome recorded",
    "duplicate": "the same outcome was already recorded; nothing changed",
    "conflict": "a different outcome was already recorded ({state}); nothing changed",
    "gone": "the job is {state}; its wait accepts nothing more",
}


class CallbackResult(msgspec.Struct, frozen=True):
    outcome: CallbackOutcome
    job: Job
    message: str = ""


def _fingerprint(req: JobRequest) -> str:
    body = {
        "backend": req.backend,
        "params": req.params,
        "timeout": req.timeout,
        "metadata": req.metadata,
    }
    return hashlib.sha256(msgspec.json.encode(body, order="sorted")).hexdigest()


class Tether:
    """The service: its use cases, and the parts `open` put together."""

    def __init__(self, settings: Settings, plugins: Plugins, store: Store, pid: str) -> None:
        self.settings = settings
        self.plugins = plugins
        self.store = store
        self.jobs = store.jobs
        self.pid = pid
        self.signer = CallbackSigner(store.callback_secret, settings.base_url)
        self.resonate: Resonate | None = None
        self.watchdog: Watchdog | None = None
        self._settler: Settler | None = None
        self._target = ""

    def __repr__(self) -> str:
        return f"Tether(store={self.store.kind!r}, pid={self.pid!r})"

    # ── lifecycle ────────────────────────────────────────────────────────────

    @classmethod
    async def open(
        cls, settings: Settings, plugins: Plugins, *, worker: bool = True, pid: str | None = None
    ) -> Tether:
        """Open the store named by the settings; with `worker`, also join it as
        a worker (run the workflow, the watchdog). Needs a running loop.
        Raises `StoreConfigError` or `StoreUnavailable` when the store cannot be used."""
        pid = pid or uuid.uuid4().hex
        tether = cls(settings, plugins, await open_store(settings, pid), pid)
        if worker:
            tether._join()
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
        )
        self._settler = Settler(r, self.jobs)
        steps = JobSteps(self.settings, self.plugins, self.jobs, self.signer, self._settler)
        workflow.register(r, steps)
        self._target = conn.resolve_target(self.settings.group)
        self.watchdog = Watchdog(self.settings, self.plugins, self.store, self._settler)
        self.watchdog.start()

    async def close(self) -> None:
        """Stop the watchdog and the worker, close the backends and the store."""
        if self.watchdog is not None:
            await self.watchdog.stop()
        if self.resonate is not None:
            await self.resonate.stop()
        for backend in self.plugins.backends.values():
            try:
                await backend.close()
            except Exception as exc:
                log.warning("backend %s: close failed: %s", backend.name, type(exc).__name__)
        await self.store.close()

    @property
    def settler(self) -> Settler:
        assert self._settler is not None, "Tether.open(worker=True) did not run"
        return self._settler

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
        stored, created = await store_call(self.jobs.insert(rec))
        if not created and stored.fingerprint != rec.fingerprint:
            raise Conflict(
                f"job {stored.id!r} exists with a different request; use another id",
                {"field": "id"},
            )
        assert self.resonate is not None, "Tether.open(worker=True) did not run"
        await store_call(workflow.start(self.resonate, self._target, stored))
        if created:
            log.info("job %s accepted (backend %s)", stored.id, stored.backend)
        return view(stored), created

    async def get_job(self, job_id: str) -> Job:
        rec = await store_call(self.jobs.get(job_id))
        if rec is None:
            raise NotFound(f"no job {job_id!r}")
        return view(rec)

    async def list_jobs(
        self, state: str | None, backend: str | None, limit: int, cursor: str | None
    ) -> JobPage:
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidRequest(f"limit must be from 1 to {MAX_PAGE}", {"field": "limit"})
        before = decode_cursor(cursor) if cursor else None
        rows = await store_call(self.jobs.page(state, backend, limit + 1, before))
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = encode_cursor(rows[-1].seq) if more else None
        return JobPage(items=[view(r) for r in rows], next_cursor=next_cursor)

    async def cancel_job(self, job_id: str) -> Job:
        """Cancel a waiting job; `Conflict` when it already finished."""
        rec = await store_call(self.jobs.get(job_id))
        if rec is None:
            raise NotFound(f"no job {job_id!r}")
        if not rec.finished:
            outcome = Outcome(
                status="canceled", error=ErrorInfo(message="canceled by request", type="canceled")
            )
            result, rec = await self.settler.settle(job_id, outcome, by="cancel")
            if result == "accepted":
                log.info("job %s canceled", job_id)
                return view(rec)
        raise Conflict(f"job {job_id!r} already finished ({rec.state})", {"state": rec.state})

    async def callback(self, promise_id: str, token: str | None, body: bytes) -> CallbackResult:
        """Settle a job's wait from its callback URL."""
        if not self.signer.verify(promise_id, token):
            raise Unauthorized("missing or invalid callback token")
        job_id = workflow.job_id_of(promise_id)
        rec = None if job_id is None else await store_call(self.jobs.get(job_id))
        if job_id is None or rec is None:
            raise NotFound(f"no promise {promise_id!r}")
        outcome = self._parse_callback(rec, body)
        if isinstance(outcome, CheckNow):
            return await self._check_now(rec, outcome.reason)
        result, rec = await self.settler.settle(job_id, outcome, by="callback")
        if result == "accepted":
            log.info("job %s %s by callback", job_id, outcome.status)
        message = CALLBACK_MESSAGES[result].format(state=rec.state)
        return CallbackResult(outcome=result, job=view(rec), message=message)

    async def health(self) -> dict[str, Any]:
        await store_call(self.jobs.ping())
        return {"status": "ok", "store": self.store.kind, "backends": sorted(self.plugins.backends)}

    async def collect_garbage(self, older_than: float) -> tuple[int, int]:
        """Retention now (`tether gc`): see `core.watchdog.collect_garbage`."""
        return await collect_garbage(self.store, older_than)

    # ── callbacks ────────────────────────────────────────────────────────────

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
        _, now = await self.settler.settle(rec.id, found, by="hint")
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
