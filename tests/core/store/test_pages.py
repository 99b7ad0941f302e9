"""The job list's pages (`SqlJobIndex.pages`): every filter combination gives
exactly the rows a scan of all jobs gives, newest first, page after page, with
`created_at` out of `seq` order as clocks make it; and each reads one index
range in order (SQLite's query plans), never a whole window sorted.

The exactness test runs on SQLite and on Postgres (with TETHER_TEST_PG_DSN)."""

from __future__ import annotations

import asyncio
import itertools
import random
from pathlib import Path
from typing import Any

import pytest

from core.models import Outcome
from core.store.embedded import SqliteDriver
from core.store.jobs import JobRecord, Listed
from core.store.migrations import migrate
from core.store.sql import SqlJobIndex
from tests.core.store.test_index_writes import job as pending_job

DAY = 86_400_000
HOUR = 3_600_000
START = 1_790_000_000_000 - 1_790_000_000_000 % DAY + 5 * HOUR  # a day begins 5 h earlier
STATES = ("succeeded", "failed", "running")
BACKENDS = ("http_webhook", "databricks")


def skewed_jobs(n: int, rng: random.Random) -> list[JobRecord]:
    """`n` jobs over 6 days in `seq` order, their `created_at` skewed: most
    by a few seconds, one in five by up to 3 hours, one in ten by up to 2 days
    (across day boundaries both ways). Tags: `a` half, `b` 30%, `c` 5%, `d`
    never with `a`; a few jobs created before 1970."""
    jobs = []
    for i in range(n):
        skew = rng.randint(-3_000, 3_000)
        roll = rng.random()
        if roll < 0.1:
            skew = rng.randint(-2 * DAY, 2 * DAY)
        elif roll < 0.3:
            skew = rng.randint(-3 * HOUR, 3 * HOUR)
        created = START + i * (6 * DAY // n) + skew
        if i in (3, 4):
            created = -DAY - i * HOUR  # before 1970: a negative day
        tags = {t for t, p in (("a", 0.5), ("b", 0.3), ("c", 0.05)) if rng.random() < p}
        if "a" not in tags and rng.random() < 0.3:
            tags.add("d")
        jobs.append(
            JobRecord(
                id=f"j{i:04d}",
                backend=rng.choice(BACKENDS),
                state=rng.choice(STATES),  # type: ignore[arg-type]
                params={},
                metadata={},
                timeout=60.0,
                fingerprint="f",
                deadline=created + 60_000,
                created_at=created,
                updated_at=created,
                tags=sorted(tags),
            )
        )
    return jobs


def expected(
    jobs: list[JobRecord], state: Any, backend: Any, tags: Any, after: Any, before: Any
) -> list[str]:
    """The list by brute force: every job, filtered, newest (greatest seq)
    first. `state`, `backend`: None (any), one, or a tuple of any of them."""
    states = (state,) if isinstance(state, str) else state
    backends = (backend,) if isinstance(backend, str) else backend
    return [
        job.id
        for job in sorted(jobs, key=lambda j: -j.seq)
        if (states is None or job.state in states)
        and (backends is None or job.backend in backends)
        and set(tags) <= set(job.tags)
        and (after is None or job.created_at > after)
        and (before is None or job.created_at < before)
    ]


async def filled(database: Any, n: int, seed: int) -> tuple[SqlJobIndex, list[JobRecord]]:
    driver = await database.driver()
    await migrate(driver)
    index = SqlJobIndex(driver)
    jobs = [(await index.insert(job))[0] for job in skewed_jobs(n, random.Random(seed))]
    return index, jobs


@pytest.mark.parametrize(
    "budget",
    [None, {"FIRST_STRETCH": 7, "SCAN": 40}, {"PAGE_BYTES": 400, "PAGE_CHUNK": 3}],
    ids=["whole", "stretches", "bytes"],
)
async def test_every_filter_combination_pages_exactly_as_a_scan_does(database, budget):
    """With `budget` (`FIRST_STRETCH`, `SCAN`) small, pages whose filters
    are checked on a driving list stop short and go on where they said; so
    do pages whose rows weigh `PAGE_BYTES` (about four rows here), read
    `PAGE_CHUNK` rows at a time."""
    index, jobs = await filled(database, 360, seed=16)
    for name, value in (budget or {}).items():
        setattr(index, name, value)
    short = 0
    assert any(
        a.seq < b.seq and a.created_at > b.created_at for a, b in itertools.pairwise(jobs)
    ), "created_at is out of seq order somewhere"
    times = [job.created_at for job in jobs]
    moments = [
        None,
        START + 2 * DAY,  # where a day begins
        START + 2 * DAY - 1,
        START + 3 * DAY + 7 * HOUR,  # mid-day
        START + 5 * DAY + 30 * 60_000,
        START - DAY,  # before the first job (but those of 1970)
        START + 9 * DAY,  # after the last
        -DAY - 3 * HOUR,  # between the two jobs of before 1970
        0,
        *random.Random(1).sample(times, 6),  # exactly a job's time: exclusive
    ]
    rng = random.Random(7)
    combos = [
        (
            rng.choice((None, None, *STATES)),
            rng.choice((None, None, *BACKENDS)),
            rng.sample(("a", "b", "c", "d", "zzz"), rng.choice((0, 0, 1, 1, 2, 3))),
            rng.choice(moments),
            rng.choice(moments),
        )
        for _ in range(220)
    ]
    combos += [(None, None, ["a", "d"], None, None), ("running", "databricks", ["c"], None, None)]
    # several states or backends at once (`pages`, the union of their pages)
    combos += [
        (
            tuple(rng.sample(STATES, rng.choice((1, 2, 3)))),
            rng.choice((None, BACKENDS, *BACKENDS)),
            rng.sample(("a", "b", "c"), rng.choice((0, 0, 1, 2))),
            rng.choice(moments),
            rng.choice((None, None, *moments)),
        )
        for _ in range(60)
    ]
    for state, backend, tags, after, before in combos:
        want = expected(jobs, state, backend, tags, after, before)
        limit = rng.choice((1, 7, 50, 500)) if len(want) < 40 else rng.choice((7, 50, 500))
        states = state if isinstance(state, tuple) else (state,)
        pairs = list(
            itertools.product(states, backend if isinstance(backend, tuple) else (backend,))
        )
        got: list[str] = []
        cursor = None
        while True:
            page = await index.pages(pairs, limit, cursor, tags, after, before)
            assert len(page.rows) <= limit
            got += [job.id for job in page.rows]
            if page.resume_before is not None:  # stopped short: from there on
                assert len(page.rows) < limit
                assert all(job.seq >= page.resume_before for job in page.rows)
                assert cursor is None or page.resume_before < cursor
                cursor = page.resume_before
                short += 1
            elif len(page.rows) < limit:
                break
            else:
                cursor = page.rows[-1].seq
        assert got == want, (state, backend, tags, after, before, limit)
    assert (short > 50) == (budget is not None), short


class Meddling:
    """A driver that, after the first page it reads, lets `meddle` write."""

    def __init__(self, driver: Any, meddle: Any) -> None:
        self.driver = driver
        self.meddle = meddle

    def __getattr__(self, name: str) -> Any:
        return getattr(self.driver, name)

    async def fetch(self, sql: str, args: Any) -> list[Any]:
        return await self._meddled(sql, await self.driver.fetch(sql, args))

    async def fetch_aside(self, sql: str, args: Any, *, keep: bool = True) -> list[Any]:
        return await self._meddled(sql, await self.driver.fetch_aside(sql, args, keep=keep))

    async def _meddled(self, sql: str, rows: list[Any]) -> list[Any]:
        if "DESC LIMIT" in sql and self.meddle is not None:
            meddle, self.meddle = self.meddle, None
            await meddle()
        return rows


class Counting:
    """A driver that counts the page reads (`... DESC LIMIT ?`) it runs."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver
        self.reads = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.driver, name)

    async def fetch_aside(self, sql: str, args: Any, *, keep: bool = True) -> list[Any]:
        self.reads += "DESC LIMIT" in sql
        return await self.driver.fetch_aside(sql, args, keep=keep)


async def test_a_page_of_a_hundred_is_one_read_and_one_of_large_jobs_several(database):
    """A page of 100 (and the row past it that says another follows) is one
    statement: `PAGE_CHUNK` at 100 made each such page read a second time
    for that row. A page of a thousand reads `PAGE_CHUNK` rows at a time."""
    await filled(database, 360, seed=3)
    counted = Counting(await database.driver())
    reader = SqlJobIndex(counted)  # type: ignore[arg-type]
    assert len((await reader.pages([(None, None)], 101, None)).rows) == 101
    assert counted.reads == 1
    assert len((await reader.pages([(None, None)], 1001, None)).rows) == 360
    assert counted.reads == 1 + 4  # 101 + 101 + 101 + 57


async def test_several_states_are_listed_in_one_snapshot(database):
    """A job that changes state while a list of several states is read (by
    another process) is in the list once: never in both states' pages, nor
    in neither."""
    writer, _ = await filled(database, 0, seed=0)
    for n in range(4):
        await writer.insert(pending_job(f"j{n}", at=1_000 + n))
    await writer.end("j1", Outcome("canceled"), 5_000)  # j0, j2, j3 pending

    async def cancel_j2() -> None:  # pending → canceled
        await writer.end("j2", Outcome("canceled"), 6_000)

    async def trigger_j3() -> None:  # pending → running
        await writer.set_external("j3", {"run": 3}, 6_000, None)

    cases = [
        (cancel_j2, ("pending", "canceled"), ["j0", "j1", "j2", "j3"]),
        (trigger_j3, ("running", "pending"), ["j0", "j3"]),
    ]
    for meddle, states, want in cases:
        reader = SqlJobIndex(Meddling(await database.driver(), meddle))  # type: ignore[arg-type]
        listed = await reader.pages([(state, None) for state in states], 10, None)
        assert sorted(job.id for job in listed.rows) == want, states
    final = {job.id: job.state for job in (await writer.pages([(None, None)], 10, None)).rows}
    assert final == {"j0": "pending", "j1": "canceled", "j2": "canceled", "j3": "running"}


async def test_a_window_with_no_job_is_an_empty_page(database):
    index, _ = await filled(database, 40, seed=3)
    nothing = Listed([])
    assert await index.pages([(None, None)], 10, None, (), START + 20 * DAY, None) == nothing
    assert await index.pages([(None, None)], 10, None, (), None, -10 * DAY) == nothing
    assert await index.pages([(None, None)], 10, None, ["a"], START + DAY, START + DAY) == nothing
    assert await index.pages([(None, None)], 10, None, (), START + 2 * DAY, START + DAY) == nothing


@pytest.fixture(scope="module")
def two_tags_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200,001 jobs; tag `a` on each even `seq`, `b` on each odd one: a page
    asking for both finds nothing, and only after walking a list whole."""
    path = tmp_path_factory.mktemp("two-tags") / "t.db"

    async def fill() -> None:
        driver = SqliteDriver(path)
        try:
            await migrate(driver)
            await SqlJobIndex(driver).insert(pending_job("seed", at=1_000))
            names = [r[1] for r in await driver.fetch("PRAGMA table_info(tether_jobs)", ())]
            copied = ", ".join("id || '-' || n" if c == "id" else c for c in names if c != "seq")
            await driver.execute(
                f"INSERT INTO tether_jobs ({', '.join(c for c in names if c != 'seq')})"
                " WITH RECURSIVE k(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM k WHERE n < 200000)"
                f" SELECT {copied} FROM tether_jobs, k",
                (),
            )
            await driver.execute(
                "INSERT INTO tether_job_tags (tag, seq, job_id)"
                " SELECT CASE seq % 2 WHEN 0 THEN 'a' ELSE 'b' END, seq, id FROM tether_jobs",
                (),
            )
        finally:
            await driver.close()

    asyncio.run(fill())
    return path


async def test_a_page_that_walks_a_long_list_leaves_the_event_loop_free(two_tags_db: Path) -> None:
    """The page for both tags, with no budget (`SCAN`) to stop it, walks one
    tag's list whole (at a million jobs, 0.27 s). The embedded store reads it
    on its aside connection's thread (`Driver.fetch_aside`), so the event
    loop goes on meanwhile: on the loop, that read held up every request and
    heartbeat of the process (a client asking for it in a loop kept
    `/health` at 255 ms). Counted in turns of the loop, not timed: read on
    the loop, the page lets no other task run until it is done."""
    driver = SqliteDriver(two_tags_db)
    index = SqlJobIndex(driver)
    index.SCAN = 10**9
    turns = 0
    reading = True

    async def turn() -> None:
        nonlocal turns
        while reading:
            turns += 1
            await asyncio.sleep(0)

    turning = asyncio.create_task(turn())
    await asyncio.sleep(0)
    try:
        page = await index.pages([(None, None)], 100, None, ["a", "b"])
    finally:
        reading = False
        await turning
        await driver.close()
    assert page == Listed([])
    assert turns > 50, f"the loop turned {turns} times while the page was read"


async def test_a_page_whose_filters_never_meet_stops_at_its_budget(two_tags_db: Path) -> None:
    """The same page, with the budget: it reads `SCAN` entries of the driving
    list (of `a`: the even seqs), no more, and says where the next page goes
    on; pages followed from there cover the list exactly once, to its end."""
    driver = SqliteDriver(two_tags_db)
    index = SqlJobIndex(driver)
    try:
        top = (await driver.fetch("SELECT max(seq) FROM tether_jobs", ()))[0][0]
        evens = list(range(top - top % 2, 0, -2))  # tag `a`, newest first
        walks: list[str] = []
        real_fetch_aside = driver.fetch_aside

        async def counted(sql: str, args: Any, *, keep: bool = True) -> list[Any]:
            walks.append(sql)
            return await real_fetch_aside(sql, args, keep=keep)

        driver.fetch_aside = counted  # type: ignore[method-assign]
        page = await index.pages([(None, None)], 100, None, ["a", "b"])
        assert page == Listed([], evens[index.SCAN - 1])
        # a stretch of FIRST_STRETCH, then the rest of SCAN: two floors, two reads
        assert len(walks) == 4, walks
        stops = [page.resume_before]
        while stops[-1] is not None:
            page = await index.pages([(None, None)], 100, stops[-1], ["a", "b"])
            assert page.rows == []
            stops.append(page.resume_before)
        assert stops[:-1] == evens[index.SCAN - 1 :: index.SCAN]
        # a page whose filters meet at once walks only its first stretch
        walks.clear()
        page = await index.pages([(None, None)], 100, None, ["a", "b"][:1])
        assert [job.seq for job in page.rows] == evens[:100]
        assert len(walks) == 1  # one list, nothing checked: no floor at all
        walks.clear()
        page = await index.pages([("pending", None)], 100, None, ["a"])
        assert [job.seq for job in page.rows] == evens[:100] and page.resume_before is None
        assert len(walks) == 2  # the first stretch's floor, then the read
    finally:
        await driver.close()


# ── the plans (SQLite) ───────────────────────────────────────────────────────


class Recorded(SqliteDriver):
    """The SQLite driver, keeping the statements it ran (`last`: the page query)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.ran: list[tuple[str, Any]] = []
        self.last: tuple[str, Any] = ("", ())

    async def fetch(self, sql: str, args: Any) -> list[tuple[Any, ...]]:
        self._record(sql, args)
        return await super().fetch(sql, args)

    async def fetch_aside(self, sql: str, args: Any, *, keep: bool = True) -> list[tuple[Any, ...]]:
        self._record(sql, args)
        return await super().fetch_aside(sql, args, keep=keep)

    def _record(self, sql: str, args: Any) -> None:
        self.ran.append((sql, args))
        if sql.startswith("SELECT j."):
            self.last = (sql, args)


@pytest.fixture(scope="module")
def plans_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 jobs, most `succeeded` and `http_webhook`, a few `running` (1 in
    40) and `databricks` (1 in 30); tag `a` half of them, `c` few."""
    path = tmp_path_factory.mktemp("plans") / "t.db"

    async def fill() -> None:
        driver = SqliteDriver(path)
        await migrate(driver)
        index = SqlJobIndex(driver)
        for job in skewed_jobs(300, random.Random(5)):
            await index.insert(job)
        await driver.execute("UPDATE tether_jobs SET state = 'succeeded' WHERE seq % 40 != 0", ())
        await driver.execute(
            "UPDATE tether_jobs SET backend = 'http_webhook' WHERE seq % 30 != 0", ()
        )
        await driver.close()

    asyncio.run(fill())
    return path


@pytest.fixture
async def recorded(plans_db: Path) -> Any:
    driver = Recorded(plans_db)
    yield SqlJobIndex(driver), driver
    await driver.close()


async def plan(index: SqlJobIndex, driver: Recorded, *args: Any) -> list[str]:
    """The page query's plan; the statements run before it (the window's
    range, the lists' counts) read nothing but index ranges."""
    driver.ran.clear()
    await index.pages([(args[0], args[1])], *args[2:])
    for sql, values in driver.ran[:-1]:
        steps = [row[3] for row in await driver.fetch(f"EXPLAIN QUERY PLAN {sql}", values)]
        reads = [step for step in steps if "tether_" in step]
        assert reads, steps
        for step in reads:
            # (tether_job_tags is its key: WITHOUT ROWID)
            assert step.startswith("SEARCH"), steps
            assert "COVERING INDEX" in step or "tether_job_tags USING PRIMARY KEY" in step, steps
            if sql.startswith("WITH"):
                assert "tether_jobs_created_day" in step, steps
    sql, values = driver.last
    rows = await driver.fetch(f"EXPLAIN QUERY PLAN {sql}", values)
    return [row[3] for row in rows]


@pytest.mark.parametrize(
    ("filters", "reads"),
    [
        ((None, None, ()), "SCAN j"),
        (("failed", None, ()), "tether_jobs_state (state=?)"),
        ((None, "databricks", ()), "tether_jobs_backend (backend=?)"),
        ((None, None, ["a"]), "SEARCH t USING PRIMARY KEY (tag=?)"),
        ((None, None, (), START + 2 * DAY, START + 3 * DAY), "(rowid>? AND rowid<?)"),
        ((None, None, (), None, START + 2 * DAY), "(rowid<?)"),
        ((None, None, (), START + 2 * DAY, None), "(rowid>?)"),
        ((None, None, ["a"], START, START + DAY), "PRIMARY KEY (tag=? AND seq>? AND seq<?)"),
        (("failed", None, (), START, START + DAY), "tether_jobs_state (state=? AND seq>? AND"),
        # the rarest list drives: `running` (1 in 40) over `http_webhook`, `c` over `a`
        (("running", "http_webhook", ()), "tether_jobs_state (state=?)"),
        (("succeeded", "databricks", ()), "tether_jobs_backend (backend=?)"),
        ((None, None, ["a", "c"]), "SEARCH t USING PRIMARY KEY (tag=?)"),
        (("running", None, ["a"]), "tether_jobs_state (state=?)"),
    ],
)
async def test_each_filter_reads_one_index_range_newest_first(recorded, filters, reads):
    index, driver = recorded
    state, backend, tags, *window = filters
    after, before = window or (None, None)
    steps = await plan(index, driver, state, backend, 10, None, tags, after, before)
    assert not any("TEMP B-TREE" in step for step in steps), steps
    assert any(reads in step for step in steps), steps
    assert not any("tether_jobs_created" in step for step in steps), steps


async def test_the_rarest_tag_drives_whatever_order_the_tags_come_in(recorded):
    index, driver = recorded
    for tags in (["a", "c"], ["c", "a"]):
        await index.pages([(None, None)], 10, None, tags)
        sql, values = driver.last
        assert "t.tag = ?" in sql and values[0] == "c", (sql, values)
