"""The job list's pages at a million jobs: fill a store, time `Tether.list_jobs`.

    python bench/_pages.py SPEC.json RESULT.json

Run by bench/run.py (`./dev bench --phases pages`) in a process of its own,
with the project's interpreter: it imports Tether's code.

**Fill.** The jobs go in through the job index's own insert
(`SqlJobIndex.insert`, each with its `accepted` event, as `POST /jobs` files
them) on a store opened by `open_store`, so the rows, the tag rows and the
migrations are the real ones. Only the transactions differ: a batch of
`BATCH` inserts shares one (`_InBatch`), which is what makes a million jobs
take minutes, not the hour and more that `POST /jobs` would at ~200 jobs/s.
The database is filled once per job count and `FILL_VERSION` and kept under
the cache directory (`spec["cache"]`) for later runs.

The jobs are spread over `SPAN_DAYS` days, inserted in time order (so `seq`
follows time), with `created_at` from three hosts whose clocks differ by a few
seconds, and one job in `OUTLIER_EVERY` from a host up to three hours off:
`created_at` is nearly, not exactly, in `seq` order. See `make_job` for the
states, backends and tags.

**Measure.** Each case of `cases()` is one `Tether.list_jobs` call (limit
100), the service's own listing, on a `Tether` opened without a worker; it
is timed `REPEATS` times (fewer for a slow one: at most `CASE_BUDGET` s) after
`WARMUP` untimed calls, and one untimed pass over all cases first: the
figures are with the database in the OS page cache. Every case's rows are
also checked against a scan of all rows in Python (the same filters, newest
first), so a fast plan that returns the wrong page is caught.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import shutil
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.dont_write_bytecode = True

from _common import percentile  # noqa: E402

from core.models import ErrorInfo  # noqa: E402
from core.plugins import Plugins, make_plugin_manager  # noqa: E402
from core.service import Tether  # noqa: E402
from core.settings import Settings  # noqa: E402
from core.store import open_store  # noqa: E402
from core.store.jobs import JobRecord, NewEvent  # noqa: E402
from core.store.sql import Session  # noqa: E402
from core.views import encode_cursor  # noqa: E402

FILL_VERSION = 1
"""Bump when `make_job` changes: a cached database of another version is not used."""
SECRET = "bench-callback-secret"
SEED = 16
SPAN_DAYS = 90
DAY = 86_400_000
HOUR = 3_600_000
HOSTS = (0, 1_500, -2_500)
"""Each host's clock offset (ms); job i comes from host i % 3."""
OUTLIER_EVERY = 10_000
OUTLIER_MS = 3 * HOUR
BATCH = 2_000
WARMUP = 3
REPEATS = 100
CASE_BUDGET = 15.0
LIMIT = 100
CUSTOMERS = 5_000


# ── the jobs ─────────────────────────────────────────────────────────────────


def make_job(i: int, n: int, end: int, rng: random.Random) -> JobRecord:
    """Job number `i` of `n`, the last created about at `end` (Unix ms).

    - backend: `databricks` 30%, else `http_webhook`;
    - state: jobs of the last 6 hours are `running` 30% of the time; older
      ones are final (succeeded 88%, failed 8%, canceled 2.5%, timed_out 1.5%),
      but one in 20,000 is still `running` (a long wait);
    - tags: `env:prod` 70% / `env:staging` 25%; `team-a` 40%, `team-b` 30%,
      `team-c` 10%; `nightly` 25%; `customer:<k>` 30% (k skewed over 5,000
      customers, customer:1 the most common); `backfill` 0.1%;
      `batch:<b>` 20% (groups of ~50 consecutive jobs): a few tags common,
      many rare."""
    span = SPAN_DAYS * DAY
    true = end - span + (i * span) // n
    offset = HOSTS[i % len(HOSTS)]
    if rng.randrange(OUTLIER_EVERY) == 0:
        offset = rng.randint(-OUTLIER_MS, OUTLIER_MS)
    created = true + offset
    backend = "databricks" if rng.random() < 0.3 else "http_webhook"
    age = end - true
    timeout = 3600.0
    if (age < 6 * HOUR and rng.random() < 0.3) or rng.randrange(20_000) == 0:
        state = "running"
        timeout = 10 * 365 * 86400.0  # no deadline passes while the benchmark runs
    else:
        r = rng.random()
        state = (
            "succeeded"
            if r < 0.88
            else "failed"
            if r < 0.96
            else "canceled"
            if r < 0.985
            else "timed_out"
        )
    tags = []
    r = rng.random()
    tags.append("env:prod" if r < 0.7 else "env:staging" if r < 0.95 else None)
    r = rng.random()
    tags.append("team-a" if r < 0.4 else "team-b" if r < 0.7 else "team-c" if r < 0.8 else None)
    tags.append("nightly" if rng.random() < 0.25 else None)
    if rng.random() < 0.3:
        tags.append(f"customer:{min(int(rng.paretovariate(1.0)), CUSTOMERS)}")
    tags.append("backfill" if rng.random() < 0.001 else None)
    if (i // 50) % 5 == 0:
        tags.append(f"batch:{i // 50}")
    team = next((t for t in tags if t and t.startswith("team-")), "ops")
    if backend == "databricks":
        params: dict[str, Any] = {
            "job_id": 1000 + i % 200,
            "notebook_params": {"date": f"d{true // DAY}", "shard": str(i % 16)},
        }
    else:
        params = {"url": f"https://hooks.example.com/jobs/{i % 1000}", "body": {"n": i}}
    finished = None if state == "running" else created + rng.randint(1_000, 600_000)
    result = {"rows": i % 10_000, "output": f"s3://bench/out/{i}"} if state == "succeeded" else None
    error = None
    if state in ("failed", "canceled", "timed_out"):
        error = ErrorInfo(message=f"{state}: run {i} did not succeed", type=state)
    return JobRecord(
        id=f"job-{i:07d}",
        backend=backend,
        state=state,  # type: ignore[arg-type]
        params=params,
        metadata={"team": team, "requested_by": f"user{i % 300}"},
        timeout=timeout,
        fingerprint=f"{i:032x}",
        deadline=created + int(timeout * 1000),
        created_at=created,
        updated_at=finished or created,
        finished_at=finished,
        result=result,
        error=error,
        tags=sorted(t for t in tags if t),
    )


class _InBatch:
    """The store's SQLite driver with its transactions left to the caller: the
    index's insert runs as written, inside the batch's one transaction."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver

    async def fetch(self, sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = await self.driver.fetch(sql, args)
        return rows

    async def execute(self, sql: str, args: Sequence[Any]) -> int:
        changed: int = await self.driver.execute(sql, args)
        return changed

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Session]:
        yield self

    async def atomic[T](
        self,
        body: Callable[[Session], Coroutine[Any, Any, T]],
        after: Callable[[T], None] | None = None,
    ) -> T:
        """`body` inside the batch's transaction; `after` at once, not after
        the batch's commit (the fill has nothing that waits for a commit)."""
        result = await body(self)
        if after is not None:
            after(result)
        return result

    async def close(self) -> None:
        pass


def settings(db: Path) -> Settings:
    return Settings.from_env({}, store=f"sqlite:///{db}", callback_secret=SECRET)


async def fill(db: Path, n: int, end: int) -> float:
    """Put `n` jobs into a new store at `db`; returns the seconds it took."""
    store = await open_store(settings(db), "bench-fill")
    started = time.perf_counter()
    try:
        index = store.jobs
        batched = type(index)(_InBatch(index.db))  # type: ignore[arg-type]
        rng = random.Random(SEED)
        for start in range(0, n, BATCH):
            async with index.db.transaction():
                for i in range(start, min(start + BATCH, n)):
                    rec = make_job(i, n, end, rng)
                    accepted = NewEvent(
                        "accepted", {"backend": rec.backend, "timeout": rec.timeout}
                    )
                    await batched.insert(rec, [accepted])
            if start and start % 100_000 == 0:
                took = time.perf_counter() - started
                print(f"    … {start:,} jobs in {took:.0f} s", flush=True)
    finally:
        await store.close()
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return time.perf_counter() - started


def cached(cache: Path, n: int) -> tuple[Path, dict[str, Any]]:
    """The filled database for `n` jobs (filling it when the cache has none)
    and its description."""
    home = cache / f"pages-{n}-v{FILL_VERSION}"
    meta_path = home / "meta.json"
    if meta_path.exists():
        return home / "tether.db", json.loads(meta_path.read_text())
    partial = cache / f"pages-{n}-v{FILL_VERSION}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    end = int(time.time() * 1000) // HOUR * HOUR
    print(f"    filling {n:,} jobs into {home} (kept for later runs)", flush=True)
    took = asyncio.run(fill(partial / "tether.db", n, end))
    meta = {
        "jobs": n,
        "end": end,
        "fill_s": took,
        "filled": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (partial / "meta.json").write_text(json.dumps(meta))
    partial.rename(home)
    return home / "tether.db", meta


# ── the cases ────────────────────────────────────────────────────────────────


@dataclass
class Case:
    name: str
    states: tuple[str, ...] = ()
    backends: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    after: int | None = None  # created_after, Unix ms
    before: int | None = None  # created_before, Unix ms
    cursor_seq: int | None = None  # start after this row (a deep cursor)
    second_page: bool = False  # time the page after the first one's cursor
    http: bool = False  # also timed through HTTP by run.py
    rows: int = 0
    ok: bool = True
    times: list[float] = field(default_factory=list)

    def query(self, cursor: str | None = None) -> dict[str, Any]:
        """The case as `GET /jobs` query parameters."""
        q: dict[str, Any] = {"limit": LIMIT}
        for key, values in (("state", self.states), ("backend", self.backends), ("tag", self.tags)):
            if values:
                q[key] = list(values)
        for key, at in (("created_after", self.after), ("created_before", self.before)):
            if at is not None:
                q[key] = iso(at)
        if cursor:
            q["cursor"] = cursor
        return q


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def moment(ms: int | None) -> datetime | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC)


def cases(n: int, end: int) -> list[Case]:
    ago = lambda days: end - int(days * DAY)  # noqa: E731
    return [
        Case("no filter", http=True),
        Case("state=failed (8%)", states=("failed",)),
        Case("state=running (recent, and 1 in 20,000 old)", states=("running",)),
        Case(
            "open states (queued, pending, running: 3 pages merged)",
            ("queued", "pending", "running"),
        ),
        Case("backend=databricks (30%)", backends=("databricks",)),
        Case("state=failed, backend=databricks", ("failed",), ("databricks",), http=True),
        Case("tag=nightly (25%)", tags=("nightly",)),
        Case("tag=customer:1 (~6%)", tags=("customer:1",)),
        Case("tag=backfill (0.1%)", tags=("backfill",), http=True),
        Case("tags team-a + nightly (both common)", tags=("team-a", "nightly")),
        Case("tags nightly + backfill (common + rare)", tags=("nightly", "backfill")),
        Case("tags backfill + nightly (rare first)", tags=("backfill", "nightly")),
        Case("tags env:staging + team-c + nightly", tags=("env:staging", "team-c", "nightly")),
        Case("tag=nightly, state=running", ("running",), tags=("nightly",)),
        Case("tag=backfill, state=failed", ("failed",), tags=("backfill",)),
        Case(
            "limit: tags env:prod + env:staging (never together)",
            tags=("env:prod", "env:staging"),
            http=True,
        ),
        Case("window: last hour", after=ago(1 / 24)),
        Case("window: last 7 days", after=ago(7)),
        Case("window: 1 hour, 60 days ago", after=ago(60), before=ago(60 - 1 / 24), http=True),
        Case("window: 1 day, 45 days ago", after=ago(45), before=ago(44)),
        Case("window: 80 to 10 days ago (wide)", after=ago(80), before=ago(10), http=True),
        Case("window: before 30 days ago", before=ago(30)),
        Case("window: after 89 days ago (nearly all)", after=ago(89)),
        Case("tag=nightly, last 7 days", tags=("nightly",), after=ago(7)),
        Case(
            "tag=nightly, 1 hour 60 days ago",
            tags=("nightly",),
            after=ago(60),
            before=ago(60 - 1 / 24),
        ),
        Case("tag=nightly, before 30 days ago", tags=("nightly",), before=ago(30), http=True),
        Case("tag=backfill, 80 to 10 days ago", tags=("backfill",), after=ago(80), before=ago(10)),
        Case("state=failed, 1 day 45 days ago", ("failed",), after=ago(45), before=ago(44)),
        Case("state=failed, before 30 days ago", ("failed",), before=ago(30)),
        Case(
            "backend=databricks, 1 hour 60 days ago",
            backends=("databricks",),
            after=ago(60),
            before=ago(60 - 1 / 24),
        ),
        Case(
            "state=running, backend=databricks, before 1 day ago",
            ("running",),
            ("databricks",),
            before=ago(1),
        ),
        Case(
            "state=running, tag=nightly, before 1 day ago",
            ("running",),
            tags=("nightly",),
            before=ago(1),
        ),
        Case(
            "state=failed, tag=team-a, before 30 days ago",
            ("failed",),
            tags=("team-a",),
            before=ago(30),
        ),
        Case("second page: no filter", second_page=True),
        Case("second page: tag=nightly", tags=("nightly",), second_page=True),
        Case("second page: 80 to 10 days ago", after=ago(80), before=ago(10), second_page=True),
        Case(
            "second page: tag=nightly, before 30 days ago",
            tags=("nightly",),
            before=ago(30),
            second_page=True,
        ),
        Case("deep cursor (half-way back): no filter", cursor_seq=n // 2),
        Case("deep cursor: tag=nightly", tags=("nightly",), cursor_seq=n // 2),
        Case("deep cursor: state=failed", ("failed",), cursor_seq=n // 2),
    ]


# ── the check: every row, in Python ──────────────────────────────────────────


class Scan:
    """Every job's (seq, id, state, backend, created_at) and each tag's set of
    seqs, read once: the expected page of any case."""

    def __init__(self, db: Path) -> None:
        with contextlib.closing(sqlite3.connect(db)) as conn:
            self.rows = conn.execute(
                "SELECT seq, id, state, backend, created_at FROM tether_jobs ORDER BY seq DESC"
            ).fetchall()
            self.tags: dict[str, set[int]] = {}
            for tag, seq in conn.execute("SELECT tag, seq FROM tether_job_tags"):
                self.tags.setdefault(tag, set()).add(seq)

    def expected(
        self, case: Case, before_seq: int | None, limit: int, floor: int | None = None
    ) -> list[str]:
        """The case's page below `before_seq`; with `floor`, of the jobs from
        that `seq` up only (a page that stopped short at its budget)."""
        sets = [self.tags.get(t, set()) for t in case.tags]
        out = []
        for seq, job_id, state, backend, created in self.rows:
            if before_seq is not None and seq >= before_seq:
                continue
            if floor is not None and seq < floor:
                break
            if case.states and state not in case.states:
                continue
            if case.backends and backend not in case.backends:
                continue
            if case.after is not None and not created > case.after:
                continue
            if case.before is not None and not created < case.before:
                continue
            if any(seq not in s for s in sets):
                continue
            out.append(job_id)
            if len(out) == limit:
                break
        return out


# ── timing ───────────────────────────────────────────────────────────────────


async def measure(db: Path, meta: dict[str, Any], check: bool) -> list[Case]:
    tether = await Tether.open(
        settings(db), Plugins(make_plugin_manager(entry_points=False)), worker=False
    )
    scan = Scan(db) if check else None
    n, end = meta["jobs"], meta["end"]
    todo = cases(n, end)
    try:
        for case in todo:  # one untimed pass first: the database's pages in the OS cache
            await list_page(tether, case, None)
        for case in todo:
            first = await list_page(tether, case, None)
            cursor = first["next_cursor"] if case.second_page else None
            if case.cursor_seq is not None:
                cursor = encode_cursor(case.cursor_seq)
            if case.second_page and cursor is None:
                case.ok = False  # no second page to time
            for _ in range(WARMUP):
                await list_page(tether, case, cursor)
            budget = time.perf_counter() + CASE_BUDGET
            while len(case.times) < REPEATS and (
                len(case.times) < 5 or time.perf_counter() < budget
            ):
                start = time.perf_counter()
                page = await list_page(tether, case, cursor)
                case.times.append((time.perf_counter() - start) * 1e3)
            case.rows = len(page["items"])
            if scan is not None:
                before_seq = int(cursor, 16) if cursor else None
                got = [job["id"] for job in page["items"]]
                short = len(got) < LIMIT and page["next_cursor"] is not None
                floor = int(page["next_cursor"], 16) if short else None
                case.ok = case.ok and got == scan.expected(case, before_seq, LIMIT, floor)
            print(
                f"    {case.name}: p50 {percentile(case.times, 50):.2f} ms,"
                f" p99 {percentile(case.times, 99):.2f} ms, {case.rows} rows"
                + ("" if case.ok else " — WRONG ROWS"),
                flush=True,
            )
    finally:
        await tether.close()
    return todo


async def list_page(tether: Tether, case: Case, cursor: str | None) -> dict[str, Any]:
    page = await tether.list_jobs(
        case.states,
        case.backends,
        LIMIT,
        cursor,
        tags=case.tags,
        created_after=moment(case.after),
        created_before=moment(case.before),
    )
    return {
        "items": [{"id": job.id} for job in page.items],
        "next_cursor": page.next_cursor,
    }


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    cache = Path(spec["cache"])
    db, meta = cached(cache, int(spec["jobs"]))
    size = sum(p.stat().st_size for p in db.parent.glob("tether.db*"))
    results = asyncio.run(measure(db, meta, bool(spec.get("check", True))))
    out = {
        "db": str(db),
        "db_bytes": size,
        "meta": meta,
        "cases": [
            {
                "name": c.name,
                "p50": percentile(c.times, 50),
                "p99": percentile(c.times, 99),
                "max": max(c.times),
                "n": len(c.times),
                "rows": c.rows,
                "ok": c.ok,
                "http": c.http,
                "query": c.query(),
                "second_page": c.second_page,
            }
            for c in results
        ],
    }
    Path(sys.argv[2]).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
