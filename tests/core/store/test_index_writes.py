"""Writes of the job index that other tests reach only through a service:
per-backend slots (a job over its backend's limit is queued, the end of one
promotes the oldest queued job in the same transaction), and what a status
check learns merged into a running job's `external`. On SQLite and Postgres."""

from __future__ import annotations

from typing import Any

from core.models import Outcome
from core.store.jobs import JobRecord, NewEvent
from core.store.migrations import migrate
from core.store.sql import SqlJobIndex


def job(job_id: str, backend: str = "b", at: int = 1_000) -> JobRecord:
    return JobRecord(
        id=job_id,
        backend=backend,
        state="pending",
        params={},
        metadata={},
        timeout=60.0,
        fingerprint="f",
        deadline=at + 60_000,
        created_at=at,
        updated_at=at,
    )


async def index_on(database: Any) -> SqlJobIndex:
    driver = await database.driver()
    await migrate(driver)
    return SqlJobIndex(driver)


async def test_slots_are_counted_from_the_jobs_and_the_queue_is_first_come_first_served(
    database,
):
    jobs = await index_on(database)
    jobs.limits = {"b": 2}
    ready: list[list[str]] = []
    jobs.on_ready = lambda promoted: ready.append([r.id for r in promoted])
    states = [(await jobs.insert(job(i)))[0].state for i in ("j1", "j2", "j3", "j4")]
    assert states == ["pending", "pending", "queued", "queued"]
    other, _ = await jobs.insert(job("x", backend="unlimited"))
    assert other.state == "pending"

    await jobs.set_external("j1", {"run": 1}, 2_000, None, NewEvent("triggered", {}))
    ended, _ = await jobs.end("j1", Outcome("succeeded"), 3_000)
    assert ended is not None and ended.state == "succeeded"
    assert ready == [["j3"]]
    assert (await jobs.get("j3")).state == "pending"  # type: ignore[union-attr]
    assert (await jobs.get("j4")).state == "queued"  # type: ignore[union-attr]

    # a queued job that ends frees nothing; a job joining a queue beside a free
    # slot (the limit was raised) starts the oldest at once
    await jobs.end("j4", Outcome("canceled"), 3_100)
    assert ready == [["j3"]]
    jobs.limits = {"b": 4}
    j5, _ = await jobs.insert(job("j5"))
    assert j5.state == "pending"


async def test_a_retry_over_the_limit_is_queued_behind_the_queue(database):
    jobs = await index_on(database)
    jobs.limits = {"b": 1}
    await jobs.insert(job("r"))
    await jobs.end("r", Outcome("failed"), 2_000)
    await jobs.insert(job("holder"))
    await jobs.insert(job("waiting"))
    retried = await jobs.retry("r", 1, 90_000, 3_000, NewEvent("retried", {}))
    assert retried is not None and (retried.state, retried.attempt) == ("queued", 2)
    ready: list[list[str]] = []
    jobs.on_ready = lambda promoted: ready.append([r.id for r in promoted])
    await jobs.end("holder", Outcome("succeeded"), 4_000)
    await jobs.end("waiting", Outcome("succeeded"), 5_000)
    assert ready == [["waiting"], ["r"]]


async def test_a_status_check_merges_what_it_learnt_into_a_running_jobs_external(database):
    jobs = await index_on(database)
    await jobs.insert(job("j"))
    await jobs.set_external("j", {"run_id": 7, "state": "QUEUED"}, 2_000, None)
    checked = NewEvent("status_check", {"said": "running"})
    rec = await jobs.record("j", [checked], 3_000, (1, {"state": "RUNNING"}))
    assert rec is not None and rec.external == {"run_id": 7, "state": "RUNNING"}
    stale = await jobs.record("j", [checked], 3_100, (2, {"state": "WRONG"}))  # another attempt
    assert stale is not None and stale.external == {"run_id": 7, "state": "RUNNING"}
    await jobs.end("j", Outcome("succeeded"), 4_000)
    after = await jobs.record("j", [checked], 4_100, (1, {"state": "LATE"}))  # ended
    assert after is not None and after.external == {"run_id": 7, "state": "RUNNING"}
    assert (after.events, after.state) == (4, "succeeded")  # three checks and `finished`


async def test_open_jobs_are_counted_by_backend_for_the_backends_not_excluded(database):
    jobs = await index_on(database)
    jobs.limits = {"gone": 1}
    for n, backend in enumerate(["gone", "gone", "gone", "kept", "other", "other"]):
        await jobs.insert(job(f"j{n}", backend=backend))  # j1 and j2 queued behind j0
    await jobs.set_external("j0", {"run": 0}, 2_000, None)
    await jobs.end("j5", Outcome("succeeded"), 3_000)  # ended: not waiting
    assert [(await jobs.get(f"j{n}")).state for n in range(3)] == [  # type: ignore[union-attr]
        "running",
        "queued",
        "queued",
    ]
    assert await jobs.waiting_backends({"kept"}) == {"gone": 3, "other": 1}
    assert await jobs.waiting_backends({"gone", "kept", "other"}) == {}
