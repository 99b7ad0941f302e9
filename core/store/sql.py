"""The job index on SQL: one implementation for SQLite and Postgres.

Queries are written once with `?` placeholders; a driver runs them (the Postgres
driver swaps in `%s`). Each query uses an index: nothing scans all jobs. Writes
return the row they wrote (`RETURNING`, SQLite >= 3.35), so a write is one round
trip to the store, not a write and a read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from core.models import OPEN_STATES, Outcome
from core.store.jobs import JobRecord
from core.store.schema import JOB_ROWS, json_text


class Session(Protocol):
    """Runs SQL written with `?` placeholders."""

    async def fetch(self, sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]: ...
    async def execute(self, sql: str, args: Sequence[Any]) -> int:
        """Run a statement; return the number of rows it changed."""
        ...


class Driver(Session, Protocol):
    async def close(self) -> None: ...


COLUMNS = JOB_ROWS.columns
_row = JOB_ROWS.decode
_INSERT = f"{JOB_ROWS.insert} ON CONFLICT (id) DO NOTHING RETURNING {COLUMNS}"


class SqlJobIndex:
    def __init__(self, driver: Driver) -> None:
        self.db = driver

    async def insert(self, rec: JobRecord) -> tuple[JobRecord, bool]:
        rows = await self.db.fetch(_INSERT, JOB_ROWS.values(rec))
        if rows:
            return _row(rows[0]), True
        stored = await self.get(rec.id)
        assert stored is not None, "a job row vanished right after its insert"
        return stored, False

    async def get(self, job_id: str) -> JobRecord | None:
        rows = await self.db.fetch(f"SELECT {COLUMNS} FROM tether_jobs WHERE id = ?", (job_id,))
        return _row(rows[0]) if rows else None

    async def page(
        self, state: str | None, backend: str | None, limit: int, before_seq: int | None
    ) -> list[JobRecord]:
        where: list[str] = []
        args: list[Any] = []
        for column, value in (("state", state), ("backend", backend)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if before_seq is not None:
            where.append("seq < ?")
            args.append(before_seq)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        rows = await self.db.fetch(
            f"SELECT {COLUMNS} FROM tether_jobs{clause} ORDER BY seq DESC LIMIT ?",
            (*args, limit),
        )
        return [_row(r) for r in rows]

    async def set_external(
        self, job_id: str, external: dict[str, Any], now: int, next_check_at: int | None
    ) -> JobRecord | None:
        rows = await self.db.fetch(
            "UPDATE tether_jobs SET external = ?, updated_at = ?,"
            " next_check_at = CASE WHEN state = 'pending' THEN ? ELSE next_check_at END,"
            " state = CASE WHEN state = 'pending' THEN 'running' ELSE state END"
            f" WHERE id = ? RETURNING {COLUMNS}",
            (json_text(external), now, next_check_at, job_id),
        )
        return _row(rows[0]) if rows else None

    async def finish(
        self, job_id: str, outcome: Outcome, now: int, from_states: Sequence[str] = OPEN_STATES
    ) -> JobRecord | None:
        marks = ", ".join("?" for _ in from_states)
        rows = await self.db.fetch(
            "UPDATE tether_jobs SET state = ?, result = ?, error = ?, finished_at = ?,"
            f" updated_at = ?, next_check_at = NULL WHERE id = ? AND state IN ({marks})"
            f" RETURNING {COLUMNS}",
            (
                outcome.status,
                json_text(outcome.result),
                json_text(outcome.error),
                now,
                now,
                job_id,
                *from_states,
            ),
        )
        return _row(rows[0]) if rows else await self.get(job_id)

    async def due(self, now: int, limit: int) -> list[JobRecord]:
        late = await self.db.fetch(
            f"SELECT {COLUMNS} FROM tether_jobs WHERE finished_at IS NULL AND deadline <= ?"
            " ORDER BY deadline LIMIT ?",
            (now, limit),
        )
        checks = await self.db.fetch(
            f"SELECT {COLUMNS} FROM tether_jobs WHERE next_check_at IS NOT NULL"
            " AND next_check_at <= ? ORDER BY next_check_at LIMIT ?",
            (now, limit),
        )
        seen = {rec.id: rec for rec in map(_row, (*late, *checks))}
        return list(seen.values())

    async def reschedule_check(self, job_id: str, expected: int, next_check_at: int) -> bool:
        changed = await self.db.execute(
            "UPDATE tether_jobs SET next_check_at = ? WHERE id = ? AND next_check_at = ?",
            (next_check_at, job_id, expected),
        )
        return changed == 1

    async def delete_finished(self, before: int, limit: int) -> list[str]:
        rows = await self.db.fetch(
            "DELETE FROM tether_jobs WHERE id IN (SELECT id FROM tether_jobs"
            " WHERE finished_at IS NOT NULL AND finished_at < ? ORDER BY finished_at LIMIT ?)"
            " RETURNING id",
            (before, limit),
        )
        return [r[0] for r in rows]

    async def ping(self) -> None:
        await self.db.fetch("SELECT 1", ())

    async def close(self) -> None:
        await self.db.close()
