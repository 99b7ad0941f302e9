"""Each kind of store: what `open_store` gives for a URL, retention, closing,
and the job row stored and read back whole."""

from __future__ import annotations

import asyncio
import json
import sqlite3

import msgspec
import pytest

from core.errors import InvalidRequest, StoreConfigError
from core.models import ErrorInfo, Outcome
from core.settings import Settings
from core.store import open_store
from core.store.embedded import EmbeddedStore, MemoryStore
from core.store.jobs import JobRecord
from core.store.postgres import PostgresStore
from core.store.schema import JOB_ROWS, JOBS, Column, RowCodec, Table


def settings(store: str, **more: str) -> Settings:
    return Settings.from_env({}, store=store, **more)


async def test_the_embedded_store_deletes_promises_and_closes(tmp_path):
    store = await open_store(settings(f"sqlite:///{tmp_path}/t.db"), "p1")
    try:
        assert isinstance(store, EmbeddedStore) and store.kind == "sqlite"
        assert store.callback_secret == (tmp_path / "t.db.secret").read_text().strip()
        assert await store.delete_promises(0) == 0
    finally:
        await store.close()


async def test_the_memory_store_is_the_embedded_one_on_a_scratch_file():
    store = await open_store(settings("memory://", callback_secret="s"), "p1")
    assert isinstance(store, MemoryStore) and store.kind == "memory"
    assert store.callback_secret == "s"
    assert (store.scratch.path / "tether.db").exists()
    assert await store.delete_promises(0) == 0
    await store.close()
    assert not store.scratch.path.exists()


async def test_the_postgres_store_refuses_retention_without_resonate_gc(fresh_pg_url):
    store = await open_store(settings(fresh_pg_url, callback_secret="s"), "p1")
    try:
        assert await store.delete_promises(86_400_000) == 0  # resonate.gc is there
        await store.jobs.db.execute("DROP FUNCTION resonate.gc(bigint, integer)", ())  # type: ignore[attr-defined]
        with pytest.raises(InvalidRequest, match=r"needs resonate-pg's resonate\.gc"):
            await store.delete_promises(86_400_000)
    finally:
        await store.close()


async def test_a_database_without_resonate_pg_is_refused_and_left_as_it_was(fresh_pg_url):
    import psycopg

    with psycopg.connect(fresh_pg_url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA resonate CASCADE")
    with pytest.raises(StoreConfigError) as raised:
        await open_store(settings(fresh_pg_url, callback_secret="s"), "p1")
    assert str(raised.value).endswith(
        "the database lacks resonate-pg's schema (no resonate.dequeue_execute,"
        " resonate.dequeue_unblock, resonate.resonate_rpc): apply resonate.sql to it first"
        ' (docs/deploy.md, "The database")'
    )
    with psycopg.connect(fresh_pg_url) as conn:
        tables = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        assert tables.fetchall() == []  # nothing migrated


async def test_retention_by_a_user_that_may_not_run_resonate_gc_says_so(fresh_pg_url):
    import psycopg

    store = await open_store(settings(fresh_pg_url, callback_secret="s"), "p1")
    await store.close()
    role = f"t29_{abs(hash(fresh_pg_url)) % 10**8}"
    with psycopg.connect(fresh_pg_url, autocommit=True) as conn:
        conn.execute(f"DROP ROLE IF EXISTS {role}")
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f"GRANT CREATE, USAGE ON SCHEMA public TO {role}")
        conn.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}")
        conn.execute(f"GRANT USAGE ON SCHEMA resonate TO {role}")
        conn.execute(f"GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA resonate TO {role}")
    url = fresh_pg_url.replace("://postgres@", f"://{role}@", 1)
    try:
        store = await open_store(settings(url, callback_secret="s"), "p1")
        try:
            with pytest.raises(InvalidRequest, match=r"resonate.gc failed: permission denied"):
                await store.delete_promises(86_400_000)
        finally:
            await store.close()
    finally:
        with psycopg.connect(fresh_pg_url, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


async def test_the_postgres_store_opens_and_migrates(fresh_pg_url):
    store = await open_store(settings(fresh_pg_url, callback_secret="s"), "p1")
    try:
        assert isinstance(store, PostgresStore) and store.kind == "postgresql"
        rec, created = await store.jobs.insert(_job("a"))
        assert created and await store.jobs.get("a") == rec
    finally:
        await store.close()


async def test_postgres_without_a_shared_secret_is_refused():
    with pytest.raises(StoreConfigError, match="TETHER_CALLBACK_SECRET"):
        await open_store(settings("postgresql://nobody@127.0.0.1:1/x"), "p1")


async def test_a_store_newer_than_the_code_is_refused_naming_it(tmp_path):
    path = tmp_path / "t.db"
    store = await open_store(settings(f"sqlite:///{path}"), "p1")
    await store.close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE tether_schema SET version = 99")
    with pytest.raises(StoreConfigError) as refused:
        await open_store(settings(f"sqlite:///{path}"), "p2")
    assert str(path) in str(refused.value) and "version 99" in str(refused.value)


@pytest.mark.parametrize("url", ["redis://x", "sqlite://", "sqlite:///"])
async def test_a_url_naming_no_store_is_refused(url):
    with pytest.raises(StoreConfigError, match="TETHER_STORE"):
        await open_store(settings(url), "p1")


async def test_a_job_row_goes_in_and_comes_back_whole(tmp_path):
    """Every field of `JobRecord` survives the table, `json` ones decoded to
    their field's type."""
    store = await open_store(settings(f"sqlite:///{tmp_path}/t.db"), "p1")
    try:
        jobs = store.jobs
        rec, _ = await jobs.insert(_job("a"))
        rec = await jobs.set_external("a", {"run_id": 7}, 5, 9) or rec
        assert (rec.state, rec.external, rec.next_check_at) == ("running", {"run_id": 7}, 9)
        failed = Outcome(status="failed", error=ErrorInfo(message="boom", type="E"))
        rec = await jobs.finish("a", failed, 10) or rec
        assert rec == msgspec.structs.replace(
            _job("a"),
            seq=1,
            events=1,
            state="failed",
            external={"run_id": 7},
            error=ErrorInfo(message="boom", type="E"),
            updated_at=10,
            finished_at=10,
        )
        assert await jobs.get("a") == rec
        assert (await jobs.pages([("failed", "http_webhook")], 10, None)).rows == [rec]
    finally:
        await store.close()


async def test_the_job_index_runs_on_the_engines_own_connection(tmp_path):
    """One SQLite connection per process (`SqliteDriver`): the index's commits
    are the engine connection's own, so they do not count as another
    connection's change (which empties a connection's page cache), and an
    engine request that meets an index transaction still open waits for it
    and is answered, instead of failing."""
    store = await open_store(settings(f"sqlite:///{tmp_path}/t.db"), "p1")
    try:
        assert isinstance(store, EmbeddedStore)
        db = store.connection.shared_db()
        assert db is not None
        seen = db.execute("PRAGMA data_version").fetchone()[0]
        await store.jobs.insert(_job("a"))
        assert db.execute("PRAGMA data_version").fetchone()[0] == seen

        get = json.dumps(
            {"kind": "promise.get", "head": {"corrId": "1", "version": "v"}, "data": {"id": "x"}}
        )
        async with store.jobs.db.transaction() as tx:  # type: ignore[attr-defined]
            await tx.execute("UPDATE tether_jobs SET updated_at = 1 WHERE id = ?", ("a",))
            sent = asyncio.ensure_future(store.connection.send(get))
            await asyncio.sleep(0.05)  # the engine's batch runs now and finds it open
            assert not sent.done()
        answer = json.loads(await asyncio.wait_for(sent, 5))
        assert answer["head"]["status"] == 404
        assert (await store.jobs.get("a")).updated_at == 1  # type: ignore[union-attr]
    finally:
        await store.close()
    # A step still running at shutdown writes late (the SDK stops the store's
    # connection before it joins its steps): the file is opened again for it.
    assert store.connection.shared_db() is None
    try:
        assert await store.jobs.set_external("a", {"run_id": 7}, 5, 9) is not None
    finally:
        store.connection.close()


def test_the_job_table_and_the_job_record_have_the_same_fields():
    assert [c.name for c in JOBS.columns][:2] == ["seq", "id"]
    assert {c.name for c in JOBS.columns} == set(JobRecord.__struct_fields__)
    assert JOB_ROWS.insert.startswith("INSERT INTO tether_jobs (id, backend,")
    with pytest.raises(TypeError, match="not the columns"):
        RowCodec(Table("t", (*JOBS.columns, Column("extra", "text"))), JobRecord)


def test_migration_versions_count_up_from_one():
    from core.store.migrations import MIGRATIONS

    assert [m.version for m in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))


def _job(job_id: str) -> JobRecord:
    return JobRecord(
        id=job_id,
        backend="http_webhook",
        state="pending",
        params={"url": "http://x", "n": [1, 2.5, None]},
        metadata={"team": "a"},
        timeout=1.5,
        fingerprint="f",
        deadline=2000,
        created_at=1,
        updated_at=1,
    )
