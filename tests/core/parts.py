"""Real parts for the core's in-process tests: the embedded store (`memory://`,
the engine on a temporary file, with its job index), a Resonate client on it
and the settler. No service, no HTTP, no workflow running: a test drives the
module it tests directly, fast enough to judge mutants with."""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from resonate.resonate import Resonate
from resonate.types import PromiseRecord, Value

from core.models import JobState
from core.settings import Settings
from core.settle import Settler, noted, outcome_of
from core.store import JobIndex, Store, open_store
from core.store.jobs import JobRecord, NewEvent, now_ms
from core.workflow import callback_promise_id, job_id_of, root_promise_id


@dataclass
class Parts:
    settings: Settings
    store: Store
    resonate: Resonate
    settler: Settler

    @property
    def jobs(self) -> JobIndex:
        return self.store.jobs

    async def add_job(
        self,
        job_id: str,
        *,
        backend: str = "scripted",
        params: dict[str, Any] | None = None,
        state: JobState = "pending",
        timeout: float = 60.0,
        deadline: int | None = None,
        created_at: int | None = None,
        external: dict[str, Any] | None = None,
        next_check_at: int | None = None,
    ) -> JobRecord:
        """A job row; `running` ones through `set_external`, as a trigger leaves them."""
        now = now_ms() if created_at is None else created_at
        rec = JobRecord(
            id=job_id,
            backend=backend,
            state="pending",
            params=params or {},
            metadata={},
            timeout=timeout,
            fingerprint="f",
            deadline=now + int(timeout * 1000) if deadline is None else deadline,
            created_at=now,
            updated_at=now,
        )
        stored, created = await self.jobs.insert(rec)
        assert created
        if state == "running":
            got = await self.jobs.set_external(job_id, external or {}, now, next_check_at)
            assert got is not None
            stored = got
        return stored

    async def add_promise(self, job_id: str, timeout_ms: int = 60_000) -> None:
        """The job's callback promise, as its workflow creates it."""
        await self.resonate.promises.create(
            callback_promise_id(job_id), now_ms() + timeout_ms, Value(data=None), {}
        )

    async def add_root(self, job_id: str, timeout_ms: int = 60_000) -> None:
        """The job's workflow (attempt 1's root promise), as `POST /jobs`
        starts it: a job past `pending` always has one, unless something
        deleted it (a settle then ends the row itself)."""
        await self.resonate.promises.create(
            root_promise_id(job_id, 1), now_ms() + timeout_ms, Value(data=None), {}
        )

    def step_by_step(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """From now on a settle resolves the promise, then writes the index,
        as on a store whose index cannot settle promises in its own
        transactions (a Resonate server's): the embedded store's and
        Postgres's settle does both in one (`Settler._settle_together`)."""
        monkeypatch.setattr(type(self.jobs), "settles_together", False)

    def ended_as_it_settles(
        self,
        monkeypatch: pytest.MonkeyPatch,
        *,
        from_its_value: bool = True,
        after: Sequence[NewEvent] = (),
    ) -> None:
        """From now on, between a settle's resolve of a job's promise and its
        own index write, the job is ended (attempt 1): from the settle's
        value (its note filed with the end, `noted`, as the workflow's
        finish files it), or not; then `after` is filed. Step by step
        (`step_by_step`): in one transaction nothing comes between."""
        self.step_by_step(monkeypatch)
        promises = self.resonate.promises
        resolve = promises.resolve

        async def then_end(promise_id: str, value: Value) -> Any:
            record = await resolve(promise_id, value)
            job_id = job_id_of(promise_id)
            assert job_id is not None
            events = noted(value.data) if from_its_value else []
            await self.jobs.end(job_id, outcome_of(value.data), now_ms(), events=events, attempt=1)
            if after:
                await self.jobs.record(job_id, list(after), now_ms())
            return record

        monkeypatch.setattr(promises, "resolve", then_end)

    async def promise(self, job_id: str) -> PromiseRecord:
        return await self.resonate.promises.get(callback_promise_id(job_id))

    async def retry_as_before(self, job_id: str, attempt: int, event: NewEvent) -> JobRecord | None:
        """`jobs.retry` as a host of a release before `stop_due` did it: one
        due does not hold the retry back, and stays (for another attempt)."""
        held = await self.row(job_id)
        db = self.jobs.db  # type: ignore[attr-defined]
        await db.execute("UPDATE tether_jobs SET stop_due = NULL WHERE id = ?", (job_id,))
        retried = await self.jobs.retry(job_id, attempt, now_ms() + 3_600_000, now_ms(), event)
        await db.execute(
            "UPDATE tether_jobs SET stop_due = ?, stop_attempt = ? WHERE id = ?",
            (held.stop_due, held.stop_attempt, job_id),
        )
        return None if retried is None else await self.row(job_id)

    async def row(self, job_id: str) -> JobRecord:
        rec = await self.jobs.get(job_id)
        assert rec is not None
        return rec


@contextlib.asynccontextmanager
async def open_parts(**settings: Any) -> AsyncIterator[Parts]:
    values: dict[str, Any] = {"store": "memory://", "callback_secret": "test-secret"}
    values.update(settings)
    config = Settings.from_env({}, **values)
    pid = uuid.uuid4().hex
    store = await open_store(config, pid)
    resonate = Resonate(network=store.connection, pid=pid, subscription_refresh_secs=0)
    try:
        yield Parts(config, store, resonate, Settler(resonate, store.jobs))
    finally:
        await resonate.stop()
        await store.close()


class Logs(logging.Handler):
    """The records of one logger, formatted (`%(levelname)s %(message)s`)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.getMessage()}")
        self.records.append(record)

    def fields(self) -> list[tuple[str, str | None, str | None]]:
        """Each line with the job and promise it names (`extra`; None: none)."""
        return [
            (r.getMessage(), getattr(r, "job_id", None), getattr(r, "promise_id", None))
            for r in self.records
        ]


@contextlib.contextmanager
def logs_of(name: str) -> Iterator[Logs]:
    """What logger `name` logs meanwhile, at every level, seen at the logger
    itself (the app's logging config may stop it from propagating)."""
    handler, logger = Logs(), logging.getLogger(name)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
