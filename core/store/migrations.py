"""The schema version of Tether's tables, and the migrations that move it on.

The version is one row of the `tether_schema` table, in the same database as
the tables. Every process runs `migrate` once when it opens the store: under
the driver's migration lock (SQLite: `BEGIN IMMEDIATE`; Postgres: a
transaction-scoped advisory lock), it reads the version, applies every newer
migration and records the last, all in one transaction: two processes starting
together migrate once, and a failed migration leaves the database as it was.
A database newer than this code is refused.

A database from before versioning (the job table, no version row) reads as
version 0 and goes through migration 1, which is written `IF NOT EXISTS`
throughout: it changes nothing there, and the database is then at version 1.

To change the schema, append a `Migration` (and declare what it adds in
`core.store.schema` with `since=` its version). Never edit a shipped one,
and never use a number again: a build that shipped a migration and was
withdrawn left databases at its version (migration 12 undoes one). (For
an hour on 2026-12-05, commits 835b637 and b23eb9f numbered `tries_run`'s
migration 12; no kept database ran them, and a database they made is
refused by migration 13's `ADD COLUMN`: start it afresh.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import NamedTuple, Protocol

from core.errors import StoreConfigError
from core.store.schema import (
    EVENTS,
    JOBS,
    META,
    NOTIFICATIONS,
    RUN_KEYS,
    SLOTS,
    TAGS,
    TOMBSTONES,
    Dialect,
)
from core.store.sql import Session


class Migratable(Protocol):
    dialect: Dialect

    def migration_lock(self) -> AbstractAsyncContextManager[Session]:
        """A transaction holding the lock that serialises migrations between
        processes: committed when the block ends, rolled back if it raises."""
        ...


class Migration(NamedTuple):
    version: int
    what: str
    statements: Callable[[Dialect], Sequence[str]]
    """The SQL that takes the schema from `version - 1` to `version`."""


def withdrawn_counts(dialect: Dialect) -> list[str]:
    """Drop what the withdrawn migration 12 of commit 7398711 (2026-12-04,
    removed by 434f069 the same day) made on SQLite: a table of counts per
    state and the triggers keeping it, which would otherwise go on running in
    every write of a job. Nothing where it made nothing (Postgres, or a
    database never opened by that build)."""
    if dialect.name != "sqlite":
        return []
    triggers = ("insert", "state", "delete")
    return [
        *(f"DROP TRIGGER IF EXISTS tether_jobs_count_{t}" for t in triggers),
        "DROP TABLE IF EXISTS tether_job_counts",
    ]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "the job index: tether_jobs and its indexes", lambda d: JOBS.migrate(d, 1)),
    Migration(
        2,
        "job history: tether_events, and each job's attempt and event counter",
        lambda d: [*JOBS.migrate(d, 2), *EVENTS.migrate(d, 2)],
    ),
    Migration(
        3,
        "heartbeats: each job's heartbeat_timeout, last heartbeat, progress and next"
        " heartbeat due (indexed)",
        lambda d: JOBS.migrate(d, 3),
    ),
    Migration(
        4,
        "tags: each job's tags, tether_job_tags indexing them, and an index on created_at",
        lambda d: [*JOBS.migrate(d, 4), *TAGS.migrate(d, 4)],
    ),
    Migration(
        5,
        "notifications and limits: each job's notify URL and queue time, the outbox"
        " tether_notifications, tether_slots, and indexes on each backend's queue and"
        " slots taken",
        lambda d: [*JOBS.migrate(d, 5), *NOTIFICATIONS.migrate(d, 5), *SLOTS.migrate(d, 5)],
    ),
    Migration(
        6,
        "the job list's time windows: an index on each job's day of creation, seq and"
        " creation time",
        lambda d: JOBS.migrate(d, 6),
    ),
    Migration(
        7,
        "backend notifications: tether_run_keys, each backend's external run keys to their"
        " job, indexed by job for retention",
        lambda d: RUN_KEYS.migrate(d, 7),
    ),
    Migration(
        8,
        "the index's identity: tether_meta, whose index_id a Resonate server is paired with",
        lambda d: META.migrate(d, 8),
    ),
    Migration(
        9,
        "ids used again after retention: tether_tombstones, the ids of deleted jobs, and"
        " each job's salt",
        lambda d: [*JOBS.migrate(d, 9), *TOMBSTONES.migrate(d, 9)],
    ),
    Migration(
        10,
        "event streams past `finished`: an index on the outbox by job and creation time",
        lambda d: NOTIFICATIONS.migrate(d, 10),
    ),
    Migration(
        11,
        "durable stops: each job's stop_due, when the stop of the run of a job no workflow"
        " finishes may be claimed (indexed), and stop_attempt, the attempt whose run it is",
        lambda d: JOBS.migrate(d, 11),
    ),
    Migration(
        12,
        "withdrawn: the counts per state a build of 2026-12-04 kept in tether_job_counts"
        " by triggers (SQLite), dropped where that build made them",
        withdrawn_counts,
    ),
    Migration(
        13,
        "replays told without clocks: each job's tries_run, the run of its workflow that"
        " began the attempt's trigger tries (and migration 12's drops, for a database"
        " that build took to its own version 12)",
        lambda d: [*withdrawn_counts(d), *JOBS.migrate(d, 13)],
    ),
)


SCHEMA_TABLE = """CREATE TABLE IF NOT EXISTS tether_schema (
    name TEXT PRIMARY KEY,
    version INTEGER NOT NULL
)"""
"""One row per versioned thing; today only `tether`, the tables of this package."""

SCHEMA_NAME = "tether"


async def migrate(db: Migratable, migrations: Sequence[Migration] = MIGRATIONS) -> list[int]:
    """Bring the database to the last of `migrations`; return the versions it
    applied (none when another process got there first). Raises
    `StoreConfigError` when the database is at a version this code does not know."""
    latest = migrations[-1].version if migrations else 0
    async with db.migration_lock() as tx:
        await tx.execute(SCHEMA_TABLE, ())
        rows = await tx.fetch("SELECT version FROM tether_schema WHERE name = ?", (SCHEMA_NAME,))
        current: int = rows[0][0] if rows else 0
        if current > latest:
            raise StoreConfigError(
                f"its tables are at schema version {current}, newer than the latest this"
                f" Tether knows ({latest}): run a newer Tether on it"
            )
        applied: list[int] = []
        for migration in migrations:
            if migration.version > current:
                for statement in migration.statements(db.dialect):
                    await tx.execute(statement, ())
                applied.append(migration.version)
        if applied:
            await tx.execute(
                "INSERT INTO tether_schema (name, version) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET version = excluded.version",
                (SCHEMA_NAME, latest),
            )
    return applied
