"""The job index: one row per job, kept in the same store as the promises.

The durable promises decide how a job ends (the first settle wins); the index
records what clients list and read, and when the watchdog must look at a job
(its deadline, its next status check). Every write is a conditional update, so
a replayed step or two processes racing leave the same row behind.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Protocol

import msgspec

from core.models import FINAL_STATES, OPEN_STATES, ErrorInfo, JobState, Outcome


def now_ms() -> int:
    return int(time.time() * 1000)


class JobRecord(msgspec.Struct, kw_only=True):
    """A job row as stored. Times are Unix milliseconds."""

    id: str
    backend: str
    state: JobState
    params: dict[str, Any]
    metadata: dict[str, Any]
    timeout: float
    fingerprint: str
    deadline: int
    created_at: int
    updated_at: int
    seq: int = 0
    external: dict[str, Any] | None = None
    result: Any = None
    error: ErrorInfo | None = None
    finished_at: int | None = None
    next_check_at: int | None = None

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES


class JobIndex(Protocol):
    """What the service needs of a job index. The implementation: SQL
    (`core.store.sql`) on SQLite and Postgres."""

    async def insert(self, rec: JobRecord) -> tuple[JobRecord, bool]:
        """Insert `rec` unless its id exists; return the stored row and whether
        it was inserted. Atomic: of two racing inserts exactly one wins."""
        ...

    async def get(self, job_id: str) -> JobRecord | None: ...

    async def page(
        self, state: str | None, backend: str | None, limit: int, before_seq: int | None
    ) -> list[JobRecord]:
        """Newest first, at most `limit` rows with `seq < before_seq`."""
        ...

    async def set_external(
        self, job_id: str, external: dict[str, Any], now: int, next_check_at: int | None
    ) -> JobRecord | None:
        """Record what the trigger returned; a `pending` job becomes `running`
        (a job that ended meanwhile keeps its state). Returns the row."""
        ...

    async def finish(
        self, job_id: str, outcome: Outcome, now: int, from_states: Sequence[str] = OPEN_STATES
    ) -> JobRecord | None:
        """End the job with `outcome` if its state is one of `from_states` (by
        default any open state); else leave it. Returns the row as it now stands
        (None if unknown)."""
        ...

    async def due(self, now: int, limit: int) -> list[JobRecord]:
        """Open jobs past their deadline, and running jobs due a status check."""
        ...

    async def reschedule_check(self, job_id: str, expected: int, next_check_at: int) -> bool:
        """Move a running job's next check from `expected` to `next_check_at`;
        False if another process moved it first (it then owns this check)."""
        ...

    async def delete_finished(self, before: int, limit: int) -> list[str]:
        """Delete up to `limit` jobs finished before `before`; return their ids."""
        ...

    async def ping(self) -> None:
        """Raise if the store does not answer."""
        ...

    async def close(self) -> None: ...
