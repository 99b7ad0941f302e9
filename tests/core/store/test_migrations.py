"""The job index's schema version: reached from any start, once, and never
past what the code knows. Each test runs on SQLite and on Postgres."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from core.errors import StoreConfigError
from core.models import ErrorInfo
from core.store.jobs import JobRecord
from core.store.migrations import MIGRATIONS, Migration, migrate
from core.store.schema import JOBS, POSTGRES, SQLITE, Column, Dialect, Index, Table
from core.store.sql import SqlJobIndex
from tests.core.store.v1_layout import V1_INDEXES, V1_TABLE

LATEST = MIGRATIONS[-1].version


async def test_an_empty_database_gets_the_v1_layout_as_shipped(database):
    assert await migrate(await database.driver(), MIGRATIONS[:1]) == [1]
    assert await database.version() == 1
    made = await database.objects()
    # the statements Tether ran before versioning make the very same objects
    await database.run("DROP TABLE tether_jobs", V1_TABLE[database.kind], *V1_INDEXES)
    assert await database.objects() == made


async def test_a_database_written_before_versioning_is_version_1_unchanged(database):
    """No version row, the table there: read as version 1, nothing changed."""
    await database.ship_v1()
    objects, rows = await database.objects(), await database.fetch(_ALL_ROWS)

    driver = await database.driver()
    await migrate(driver, MIGRATIONS[:1])
    assert await database.version() == 1
    assert await database.objects() == objects
    assert await database.fetch(_ALL_ROWS) == rows

    # and the index reads what was there, and goes on numbering after it
    await migrate(driver)
    index = SqlJobIndex(driver)
    assert await index.get("done") == JobRecord(
        id="done",
        seq=1,
        backend="http_webhook",
        state="succeeded",
        params={"url": "http://x/y"},
        metadata={"team": "a"},
        timeout=60.5,
        fingerprint="fp-1",
        deadline=1700000060000,
        created_at=1700000000000,
        updated_at=1700000005000,
        external={"run": 7},
        result={"rows": [1, 2]},
        finished_at=1700000005000,
    )
    broke = await index.get("broke")
    assert broke is not None and broke.error == ErrorInfo(message="boom", type="E1")
    assert [r.id for r in await index.due(1700000070000, 10)] == ["busy"]
    new, created = await index.insert(_job("new"))
    assert created and new.seq == 4


async def test_old_and_new_databases_end_with_the_same_layout(database):
    await database.ship_v1()
    await migrate(await database.driver())
    upgraded = await database.layout()
    await database.drop_tables()
    assert await migrate(await database.driver()) == list(range(1, LATEST + 1))
    assert await database.layout() == upgraded


async def test_migrating_again_does_nothing(database):
    assert await migrate(await database.driver())
    objects = await database.objects()
    assert await migrate(await database.driver()) == []
    assert await database.objects() == objects
    assert await database.version() == LATEST


async def test_two_processes_starting_together_migrate_once(database):
    """Two connections, each on its own thread and event loop, at once; the
    migration they race for takes a while and could not run twice."""
    calls: list[str] = []
    start = threading.Barrier(2)

    def slow(dialect: Dialect) -> list[str]:
        calls.append(threading.current_thread().name)
        time.sleep(0.3)  # holding the lock
        return ["CREATE TABLE tether_once (x INTEGER)"]  # fails if run twice

    migrations = (*MIGRATIONS, Migration(LATEST + 1, "slow", slow))
    results: dict[str, Any] = {}

    def process(name: str) -> None:
        async def run() -> list[int]:
            driver = await database.open_driver()
            try:
                start.wait(timeout=10)
                return await migrate(driver, migrations)
            finally:
                await driver.close()

        try:
            results[name] = asyncio.run(run())
        except BaseException as exc:
            results[name] = exc

    threads = [threading.Thread(target=process, args=(n,), name=n) for n in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        await asyncio.to_thread(thread.join)
    assert all(isinstance(r, list) for r in results.values()), results
    assert sorted(results.values(), key=len) == [[], [*range(1, LATEST + 2)]]
    assert len(calls) == 1
    assert await database.version() == LATEST + 1


async def test_a_database_newer_than_the_code_is_refused(database):
    await migrate(await database.driver())
    await database.run(f"UPDATE tether_schema SET version = {LATEST + 7}")
    objects = await database.objects()
    with pytest.raises(StoreConfigError) as refused:
        await migrate(await database.driver())
    message = str(refused.value)
    assert f"version {LATEST + 7}" in message and f"({LATEST})" in message
    assert await database.objects() == objects


async def test_a_failing_migration_leaves_the_database_as_it_was(database):
    await database.ship_v1()
    objects = await database.objects()

    def broken(dialect: Dialect) -> list[str]:
        return ["CREATE TABLE tether_half (x INTEGER)", "THIS IS NOT SQL"]

    migrations = (*MIGRATIONS, Migration(LATEST + 1, "broken", broken))
    with pytest.raises(Exception, match="syntax"):
        await migrate(await database.driver(), migrations)
    assert await database.objects() == objects
    assert await database.version() is None
    assert await migrate(await database.driver()) == list(range(1, LATEST + 1))


async def test_the_next_schema_version_is_one_list_entry(database):
    """How a later issue adds a column, an index and a table: declared with
    `since=2`, applied by one `Migration(2, ...)`; a database upgraded to it
    has the same layout as one made at it."""
    jobs = JOBS._replace(
        columns=(*JOBS.columns, Column("tags", "json", null=True, since=2)),
        indexes=(*JOBS.indexes, Index("tether_jobs_tags", "tags", "tags IS NOT NULL", since=2)),
    )
    events = Table("tether_events", (Column("seq", "serial"), Column("job_id", "text")), since=2)
    v2 = (
        *MIGRATIONS[:1],
        Migration(2, "tags and events", lambda d: [*jobs.migrate(d, 2), *events.migrate(d, 2)]),
    )
    for dialect in (SQLITE, POSTGRES):  # what version 1 makes does not move
        assert jobs.migrate(dialect, 1) == JOBS.migrate(dialect, 1)

    await database.ship_v1()
    assert await migrate(await database.driver(), v2) == [1, 2]
    upgraded = await database.layout()
    assert ("tether_jobs", "tags") in {(r[0], r[2]) for r in upgraded}  # (table, column)

    await database.drop_tables()
    assert await migrate(await database.driver(), v2) == [1, 2]
    assert await database.layout() == upgraded


WITHDRAWN_12 = (
    "CREATE TABLE IF NOT EXISTS tether_job_counts (\n    state TEXT NOT NULL,\n"
    "    n INTEGER NOT NULL,\n    PRIMARY KEY (state)\n) WITHOUT ROWID",
    "INSERT INTO tether_job_counts (state, n)"
    " SELECT state, count(*) FROM tether_jobs GROUP BY state",
    "CREATE TRIGGER IF NOT EXISTS tether_jobs_count_insert AFTER INSERT ON tether_jobs BEGIN"
    " INSERT INTO tether_job_counts (state, n) VALUES (NEW.state, 1)"
    " ON CONFLICT (state) DO UPDATE SET n = n + 1; END",
    "CREATE TRIGGER IF NOT EXISTS tether_jobs_count_state AFTER UPDATE OF state ON tether_jobs"
    " WHEN NEW.state IS NOT OLD.state BEGIN"
    " UPDATE tether_job_counts SET n = n - 1 WHERE state = OLD.state;"
    " INSERT INTO tether_job_counts (state, n) VALUES (NEW.state, 1)"
    " ON CONFLICT (state) DO UPDATE SET n = n + 1; END",
    "CREATE TRIGGER IF NOT EXISTS tether_jobs_count_delete AFTER DELETE ON tether_jobs BEGIN"
    " UPDATE tether_job_counts SET n = n - 1 WHERE state = OLD.state; END",
)
"""What the withdrawn migration 12 of commit 7398711 (2026-12-04) ran on SQLite."""


async def test_a_database_at_the_withdrawn_version_12_is_cleaned_and_moves_on(database):
    """A build of 2026-12-04 shipped a migration 12 (counts per state kept by
    triggers, SQLite only) that was withdrawn the same day. A database it
    took to its version 12 gets the later migrations all the same, and
    loses that build's table and triggers: the same layout as a database
    made today."""
    await database.ship_v1()  # with rows: the counts were filled from them
    driver = await database.driver()
    await migrate(driver, MIGRATIONS[:11])
    if database.kind == "sqlite":
        await database.run(*WITHDRAWN_12)
    await database.run("UPDATE tether_schema SET version = 12")

    assert await migrate(driver) == list(range(13, LATEST + 1))
    upgraded = await database.layout()
    names = {str(row[1]) for row in await database.objects()}
    assert not any("count" in name for name in names), names
    index = SqlJobIndex(driver)
    busy = await index.get("busy")
    assert busy is not None and busy.tries_run is None
    assert await index.mark_tries("busy", busy.created_at, 1, None, "1:a")
    assert (await index.get("busy")).tries_run == "1:a"  # type: ignore[union-attr]

    await database.drop_tables()
    assert await migrate(await database.driver()) == list(range(1, LATEST + 1))
    assert await database.layout() == upgraded


_ALL_ROWS = "SELECT * FROM tether_jobs ORDER BY seq"


def _job(job_id: str) -> JobRecord:
    return JobRecord(
        id=job_id,
        backend="http_webhook",
        state="pending",
        params={},
        metadata={},
        timeout=1.0,
        fingerprint="f",
        deadline=2,
        created_at=1,
        updated_at=1,
    )
