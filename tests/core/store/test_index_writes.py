"""Writes of the job index that other tests reach only through a service:
per-backend slots (a job over its backend's limit is queued, the end of one
promotes the oldest queued job in the same transaction), and what a status
check learns merged into a running job's `external`. On SQLite and Postgres."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec
import pytest

from core.errors import StoreUnavailable
from core.models import Outcome
from core.settings import Settings
from core.store import open_store
from core.store.embedded import SqliteDriver
from core.store.jobs import JobRecord, NewEvent, Notification
from core.store.migrations import migrate
from core.store.sql import COLUMNS, COUNTS_REUSE_S, NOTE_CLOCK_SLACK_MS, SqlJobIndex
from tests.conftest import eventually


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


async def test_a_queued_job_past_its_deadline_is_never_promoted_and_holds_up_no_other(database):
    """A slot that frees after a queued job's deadline, before the watchdog's
    look, goes to the next job queued after it (docs/lifecycle.md: a job
    queued past its timeout is never triggered). The others keep their order,
    each slot is taken once, a new job does not queue behind an expired one,
    and the watchdog finds the expired ones through the deadlines' index and
    ends them without a promotion."""
    jobs = await index_on(database)
    jobs.limits = {"b": 2}
    ready: list[list[str]] = []
    jobs.on_ready = lambda promoted: ready.append([r.id for r in promoted])
    for job_id in ("h1", "h2"):
        await jobs.insert(job(job_id))
    for job_id, expires in (("q1", 2_000), ("q2", None), ("q3", 2_500), ("q4", None)):
        rec = (
            job(job_id)
            if expires is None
            else msgspec.structs.replace(job(job_id), deadline=expires)
        )
        assert (await jobs.insert(rec))[0].state == "queued"
    await jobs.insert(job("q5"))

    await jobs.end("h1", Outcome("succeeded"), 3_000)
    assert ready == [["q2"]]
    jobs.limits = {"b": 4}  # two more slots: the next two live ones, in queue order
    assert [r.id for r in await jobs.promote("b", 3_100)] == ["q4", "q5"]
    assert ready == [["q2"], ["q4", "q5"]]
    assert await jobs.promote("b", 3_200) == []  # h2, q2, q4, q5: the four slots
    states = {j: (await jobs.get(j)).state for j in ("q1", "q2", "q3", "q4", "q5")}  # type: ignore[union-attr]
    assert states == {
        "q1": "queued",
        "q2": "pending",
        "q3": "queued",
        "q4": "pending",
        "q5": "pending",
    }

    await jobs.end("h2", Outcome("succeeded"), 3_300)  # a slot free; only expired jobs queued
    assert ready == [["q2"], ["q4", "q5"]]  # nothing more
    new, _ = await jobs.insert(job("n", at=3_400))
    assert new.state == "pending"  # not queued behind q1 and q3, which never start
    assert [r.id for r in await jobs.due(3_500, 10)] == ["q1", "q3"]
    for job_id in ("q1", "q3"):
        ended, _ = await jobs.end(job_id, Outcome("timed_out"), 3_500, from_states=("queued",))
        assert ended is not None and ended.state == "timed_out"
    assert ready == [["q2"], ["q4", "q5"]] and await jobs.queued_backends() == []
    _, events = await jobs.events_after("q1", 0, 10)
    assert [e.type for e in events] == ["queued", "finished"]


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


async def test_a_note_for_an_ended_attempt_is_filed_only_while_the_job_is_ended_at_it(database):
    """`record(..., ended_at=)`: a late callback's note, filed only while the
    job is ended at the attempt its caller read; neither while it is open
    nor once a retry moved it to the next attempt (None, nothing filed)."""
    jobs = await index_on(database)
    await jobs.insert(job("j"))
    late = NewEvent("callback", {"verdict": "duplicate"})
    assert await jobs.record("j", [late], 1_500, ended_at=1) is None  # open
    await jobs.end("j", Outcome("failed"), 2_000)
    filed = await jobs.record("j", [late], 2_100, ended_at=1)
    assert filed is not None and (filed.events, filed.state) == (2, "failed")
    await jobs.retry("j", 1, 90_000, 2_200, NewEvent("retried", {}))
    assert await jobs.record("j", [late], 2_300, ended_at=1) is None  # at attempt 2
    assert await jobs.record("gone", [late], 2_300, ended_at=1) is None
    assert (await jobs.attempt_of("j"), await jobs.attempt_of("gone")) == ((2, 1_000), None)
    rec, events = await jobs.events_after("j", 0, 10)
    assert rec is not None and rec.events == 3
    assert [(e.type, e.attempt) for e in events] == [
        ("finished", 1),
        ("callback", 1),
        ("retried", 2),
    ]


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
    # the jobs holding a callback URL (a start on a new port strands them): not the queued
    assert await jobs.waiting_backends((), queued=False) == {"gone": 1, "kept": 1, "other": 1}


async def test_the_counts_per_state_follow_every_write_of_a_jobs_state(database):
    """`state_counts` (the `tether_jobs` gauge), read aside from the
    index's connection, sees every write that connection committed: an
    insert (pending, or queued over the limit), an insert of an id already
    there, the trigger (running), an end that promotes a queued job, a retry
    into the queue, retention's delete of several at once."""
    jobs = await index_on(database)
    jobs.limits = {"b": 2}

    async def agree() -> dict[str, int]:
        counted = await jobs.state_counts()
        rows = await database.fetch("SELECT state, count(*) FROM tether_jobs GROUP BY state")
        assert {state: n for state, n in counted.items() if n} == dict(rows)
        return counted

    for i in ("j1", "j2", "j3", "j4"):
        await jobs.insert(job(i))
    await jobs.insert(job("j1"))  # already there: nothing written
    assert await agree() == {"pending": 2, "queued": 2}
    await jobs.set_external("j1", {"run": 1}, 2_000, None, NewEvent("triggered", {}))
    await jobs.set_external("j1", {"run": 1, "seen": True}, 2_100, None)  # still running
    assert await agree() == {"pending": 1, "queued": 2, "running": 1}
    await jobs.end("j1", Outcome("failed"), 3_000)  # j3 promoted
    await jobs.end("j2", Outcome("succeeded"), 3_000)  # j4 promoted
    assert await agree() == {"pending": 2, "failed": 1, "succeeded": 1}
    assert await jobs.retry("j1", 1, 90_000, 3_500, NewEvent("retried", {})) is not None
    assert await agree() == {"pending": 2, "queued": 1, "succeeded": 1}
    await jobs.end("j3", Outcome("canceled"), 4_000)
    await jobs.end("j4", Outcome("timed_out"), 4_000)
    assert sorted(await jobs.delete_finished(5_000, 10)) == ["j2", "j3", "j4"]
    assert await agree() == {"pending": 1}


async def test_a_heartbeat_is_written_only_onto_the_attempt_it_was_read_at(database):
    """A heartbeat read at attempt 1; the attempt ended and a retry started
    attempt 2 (queued behind the backend's limit, no run yet) before its
    write: the write changes nothing, so attempt 2 gets no `heartbeat_due`
    for the watchdog to time it out by."""
    jobs = await index_on(database)
    jobs.limits = {"b": 1}
    await jobs.insert(job("j"))
    assert await jobs.beat("j", 1, 1_500, "half", 30_000, 60_000) is not None
    await jobs.end("j", Outcome("failed"), 2_000)
    await jobs.insert(job("holder", at=2_100))
    retried = await jobs.retry("j", 1, 90_000, 2_200, NewEvent("retried", {}))
    assert retried is not None and (retried.state, retried.attempt) == ("queued", 2)

    assert await jobs.beat("j", 1, 2_300, "late", 32_300, 60_000) is None
    rec = await jobs.get("j")
    assert rec is not None
    assert (rec.heartbeat_due, rec.heartbeat_at, rec.progress) == (None, None, None)
    assert await jobs.due(40_000, 10) == []
    beaten = await jobs.beat("j", 2, 2_400, "new", 32_400, 60_000)  # its own attempt's
    assert beaten is not None and (beaten.heartbeat_due, beaten.progress) == (32_400, "new")


async def _behind_a_row_lock(database: Any, job_id: str, *writes: Any) -> list[Any]:
    """Run `writes` (coroutines) one after another into the wait for `job_id`'s
    row, held by another transaction, each queued before the next starts; then
    let the row go. Their results. Postgres only: SQLite has one writer, and a
    write there never waits for a row another changed."""
    holder, watcher = await database.driver(), await database.driver()
    let_go = asyncio.Event()
    held = asyncio.Event()

    async def hold() -> None:
        async with holder.transaction() as tx:
            await tx.fetch("SELECT id FROM tether_jobs WHERE id = ? FOR UPDATE", (job_id,))
            held.set()
            await let_go.wait()

    async def waiting(n: int) -> bool:
        rows = await watcher.fetch(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock'",
            (),
        )
        return int(rows[0][0]) == n

    holding = asyncio.create_task(hold())
    await held.wait()
    tasks: list[asyncio.Task[Any]] = []
    for write in writes:
        tasks.append(asyncio.create_task(write))
        await eventually(functools.partial(waiting, len(tasks)), timeout=10)
    let_go.set()
    await holding
    return [await task for task in tasks]


async def test_retention_keeps_a_job_retried_while_it_waited_for_the_row(database):
    if database.kind != "postgres":
        pytest.skip("a row another transaction changed while a write waited: Postgres only")
    jobs, sweeper = await index_on(database), await index_on(database)
    for job_id in ("g0", "g1"):
        await jobs.insert(job(job_id))
        await jobs.end(job_id, Outcome("failed"), 2_000)
    retried, deleted = await _behind_a_row_lock(
        database,
        "g0",
        jobs.retry("g0", 1, 90_000, 3_000, NewEvent("retried", {})),
        sweeper.delete_finished(before=10_000, limit=10),
    )
    assert retried is not None and (retried.state, retried.attempt) == ("pending", 2)
    assert deleted == ["g1"]  # g0 was open again when the sweep got its row
    kept = await jobs.get("g0")
    assert kept is not None and (kept.state, kept.attempt, kept.finished_at) == ("pending", 2, None)
    assert [e.type for e in (await jobs.events_after("g0", 0, 10))[1]][-1] == "retried"


async def test_a_job_canceled_while_queued_is_not_promoted_by_a_host_without_the_limit(database):
    if database.kind != "postgres":
        pytest.skip("a row another transaction changed while a write waited: Postgres only")
    limited, unlimited = await index_on(database), await index_on(database)
    limited.limits = {"b": 1}  # a host with the limit; the other (restarted) without it
    for job_id in ("p0", "q1", "q2"):
        await limited.insert(job(job_id))
    ended, promoted = await _behind_a_row_lock(
        database,
        "q2",
        limited.end("q2", Outcome("canceled"), 3_000, from_states=("queued",)),
        unlimited.promote("b", 3_100),
    )
    assert ended[0] is not None and ended[0].state == "canceled"
    assert [r.id for r in promoted] == ["q1"]  # not q2, canceled while the promotion waited
    q2 = await limited.get("q2")
    assert q2 is not None and q2.state == "canceled"
    finished = [e for e in (await limited.events_after("q2", 0, 10))[1] if e.type == "finished"]
    assert len(finished) == 1


async def notified_job(
    database: Any, job_id: str, made: int, ended: int
) -> tuple[SqlJobIndex, Notification]:
    """An index with job `job_id`, asking for a notification, made at `made`
    and succeeded at `ended` (each by some host's clock); its message."""
    jobs = await index_on(database)
    jobs.message = lambda rec: "{}"
    asked = msgspec.structs.replace(job(job_id, at=made), notify_url="http://hooks.test/x")
    await jobs.insert(asked)
    await jobs.end(job_id, Outcome("succeeded"), ended)
    [note] = await jobs.notifications_due(10_000_000_000_000, 10)
    return jobs, note


async def test_a_deleted_jobs_notification_is_not_filed_on_a_new_job_of_its_id(database):
    """Retention deleted a job whose notification was still being tried; a new
    job took its id. The old message's tries are not the new job's."""
    jobs, note = await notified_job(database, "r2", made=1_000, ended=2_000)
    assert await jobs.delete_finished(before=3_000, limit=10) == ["r2"]
    await jobs.insert(job("r2", at=2_000 + 25 * 3_600_000))  # a day later at least: the same id

    tried = NewEvent("notified", {"webhook_id": note.id, "try": 1, "status": 200})
    await jobs.notification_tried(note, None, [tried], 5_000)
    new = await jobs.get("r2")
    assert new is not None and new.events == 0  # nothing counted on it
    _, events = await jobs.events_after("r2", 0, 10)
    assert "notified" not in [e.type for e in events]
    assert await jobs.notifications_due(10_000_000_000_000, 10) == []  # delivered: gone


async def test_a_notifications_tries_are_filed_though_the_hosts_clocks_disagree(database):
    """The job made at 2,500 by one host's clock, its notification at 2,000
    by another's (behind): still the same job."""
    jobs, note = await notified_job(database, "j", made=2_500, ended=2_000)
    tried = NewEvent("notified", {"webhook_id": note.id, "try": 1, "status": 200})
    await jobs.notification_tried(note, None, [tried], 3_000)
    _, events = await jobs.events_after("j", 0, 10)
    assert [e.type for e in events] == ["finished", "notified"]


async def test_whether_a_jobs_notification_waits_is_one_read_of_the_outbox_by_job(database):
    """What a job's event stream asks after `finished` (`JobHistory.follow`):
    a notification of the job is in the outbox until delivered or given up;
    not another job's, nor a deleted job's of the same id. One index range."""
    jobs, note = await notified_job(database, "w", made=1_000, ended=2_000)
    await jobs.insert(job("other", at=1_000))
    assert await jobs.notification_waiting("w", 1_000)
    assert not await jobs.notification_waiting("other", 1_000)
    later = 2_000 + NOTE_CLOCK_SLACK_MS + 1  # a new job of the id, after retention
    assert await jobs.notification_waiting("w", later - 1)  # within the hosts' clock slack
    assert not await jobs.notification_waiting("w", later)
    if database.kind == "sqlite":
        sql = "SELECT 1 FROM tether_notifications WHERE job_id = ? AND created_at >= ? LIMIT 1"
        plan = [r[3] for r in await jobs.db.fetch(f"EXPLAIN QUERY PLAN {sql}", ("w", 0))]
        assert plan == [
            "SEARCH tether_notifications USING COVERING INDEX tether_notifications_job"
            " (job_id=? AND created_at>?)"
        ], plan

    tried = NewEvent("notified", {"webhook_id": note.id, "try": 1, "status": 200})
    await jobs.notification_tried(note, None, [tried], 3_000)
    assert not await jobs.notification_waiting("w", 1_000)  # delivered: out of the outbox


async def test_a_tries_outcome_is_written_only_while_its_claim_holds(database):
    """A try's outcome moves the outbox only while the try's claim holds (its
    `due_at` and `tries`): a claim that ran out and was taken over neither
    reschedules nor gives up the notification, its try filed alone; a
    delivery takes it out of the outbox whoever holds it."""
    jobs, note = await notified_job(database, "c", made=1_000, ended=2_000)
    claims = []
    for until in (30_000, 60_000):  # the second once the first ran out
        [due] = await jobs.notifications_due(until, 10)
        assert await jobs.claim_notification(due, until)
        claims.append(msgspec.structs.replace(due, due_at=until, tries=due.tries + 1))
    lost, held = claims

    def tried(n: int, status: int) -> NewEvent:
        return NewEvent("notified", {"webhook_id": note.id, "try": n, "status": status})

    given_up = NewEvent("notify_failed", {"webhook_id": note.id, "tries": 1})
    assert not await jobs.notification_tried(lost, 40_000, [tried(1, 503)], 45_000)
    assert not await jobs.notification_tried(lost, None, [], 45_000, given_up)
    assert await jobs.next_notification_at() == 60_000  # the holder's claim, as it was
    assert await jobs.notification_tried(held, 70_000, [tried(2, 502)], 61_000)
    assert await jobs.next_notification_at() == 70_000
    [again] = await jobs.notifications_due(70_000, 10)
    assert await jobs.claim_notification(again, 90_000)
    assert await jobs.notification_tried(lost, None, [tried(1, 200)], 71_000)  # delivered late
    assert await jobs.next_notification_at() is None
    third = msgspec.structs.replace(again, due_at=90_000, tries=3)
    assert not await jobs.notification_tried(third, None, [tried(3, 500)], 91_000, given_up)
    _, events = await jobs.events_after("c", 0, 10)
    assert [(e.type, e.data.get("try"), e.data.get("status")) for e in events] == [
        ("finished", None, None),
        ("notified", 1, 503),
        ("notified", 2, 502),
        ("notified", 1, 200),
        ("notified", 3, 500),
    ]


async def test_a_runs_stop_is_due_from_the_write_that_ends_its_job_until_its_outcome(database):
    """The stop of the run of a job no workflow finishes (`stop_due`): set by
    the write that ends the job (with a run recorded only), found by the
    watchdog's look through its own partial index, claimed by one
    compare-and-set at a time, and cleared by the write that files the
    stop's outcome, which only the holder of the claim makes."""
    jobs = await index_on(database)
    for job_id in ("r", "p", "w"):
        await jobs.insert(job(job_id))
    for job_id in ("r", "w"):
        await jobs.set_external(job_id, {"run": job_id}, 1_500, None)
    ended, _ = await jobs.end("r", Outcome("timed_out"), 2_000, stop_due=5_000)
    unrun, _ = await jobs.end("p", Outcome("timed_out"), 2_000, stop_due=5_000)  # nothing to stop
    normal, _ = await jobs.end("w", Outcome("timed_out"), 2_000)  # its workflow stops the run
    assert [r.stop_due if r else 0 for r in (ended, unrun, normal)] == [5_000, None, None]
    assert [r.stop_attempt if r else 0 for r in (ended, unrun, normal)] == [1, None, None]
    assert [r.id for r in await jobs.due(4_999, 10)] == []
    assert [r.id for r in await jobs.due(5_000, 10)] == ["r"]
    assert await jobs.next_due(0) == 5_000 and await jobs.next_due(5_000) is None

    assert await jobs.claim_stop("r", 4_000, 9_000) is None  # not its stop_due
    claims = await asyncio.gather(*(jobs.claim_stop("r", 5_000, 9_000 + n) for n in range(3)))
    [claimed] = [c for c in claims if c is not None]  # one of three at once
    assert claimed.stop_due in (9_000, 9_001, 9_002)
    assert [r.id for r in await jobs.due(8_999, 10)] == []

    failed = NewEvent("cancel_failed", {"tries": 1})
    assert await jobs.stopped("r", 1, 5_000, [failed], 6_000) is None  # its claim was taken over
    assert await jobs.stopped("r", 2, claimed.stop_due, [failed], 6_000) is None  # not attempt 2's
    done = await jobs.stopped("r", 1, claimed.stop_due, [failed], 6_000)
    assert done is not None and (done.stop_due, done.stop_attempt, done.events) == (None, None, 2)
    assert await jobs.stopped("r", 1, claimed.stop_due, [failed], 6_100) is None  # once
    _, events = await jobs.events_after("r", 0, 10)
    assert [e.type for e in events] == ["finished", "cancel_failed"]
    assert await jobs.due(99_999, 10) == [] and await jobs.next_due(0) is None
    if database.kind == "sqlite":
        sql = f"SELECT {COLUMNS} FROM tether_jobs WHERE stop_due IS NOT NULL AND stop_due <= ?"
        plan = [r[3] for r in await jobs.db.fetch(f"EXPLAIN QUERY PLAN {sql}", (0,))]
        assert plan == [
            "SEARCH tether_jobs USING INDEX tether_jobs_stop (stop_due>? AND stop_due<?)"
        ], plan


async def test_a_late_trigger_calls_stop_is_held_only_where_a_finish_would_look_for_its_run(
    database,
):
    """`hold_stop`: only a job at that attempt, canceled or timed out, with
    no run recorded and no stop due; the hold is then a stop as any other
    (due, claimed, given up at a later time, recorded)."""
    jobs = await index_on(database)
    for job_id in ("c", "s", "r", "open", "twice"):
        await jobs.insert(job(job_id))
    await jobs.set_external("r", {"run": "r"}, 1_500, None)
    for job_id in ("c", "r"):
        await jobs.end(job_id, Outcome("canceled"), 2_000)
    await jobs.end("twice", Outcome("timed_out"), 2_000)
    await jobs.end("s", Outcome("succeeded"), 2_000)

    assert await jobs.hold_stop("c", 2, 9_000) is None  # not its attempt
    assert await jobs.hold_stop("s", 1, 9_000) is None  # its run ended it: nothing to stop
    assert await jobs.hold_stop("r", 1, 9_000) is None  # a run recorded: `cancel` stops it
    assert await jobs.hold_stop("open", 1, 9_000) is None  # its workflow waits for the call
    assert await jobs.hold_stop("gone", 1, 9_000) is None
    held = await jobs.hold_stop("c", 1, 9_000)
    assert held is not None and (held.stop_due, held.stop_attempt) == (9_000, 1)
    assert await jobs.hold_stop("c", 1, 9_500) is None  # once: held already
    assert [r.id for r in await jobs.due(9_000, 10)] == ["c"]

    assert await jobs.release_stop("c", 1, 9_000, 900_000)  # the service stopping: due later
    assert "c" not in [r.id for r in await jobs.due(899_999, 10)]
    assert "c" in [r.id for r in await jobs.due(900_000, 10)]
    claimed = await jobs.claim_stop("c", 900_000, 990_000)
    assert claimed is not None and claimed.external is None
    done = await jobs.stopped("c", 1, 990_000, [], 991_000)
    assert done is not None and (done.stop_due, done.stop_attempt) == (None, None)
    assert await jobs.hold_stop("twice", 1, 5_000) is not None  # timed out: held too
    again = NewEvent("retried", {})
    assert await jobs.retry("twice", 1, 90_000, 3_000, again) is None  # winding up: not yet
    assert await jobs.stopped("twice", 1, 5_000, [], 4_000) is not None
    retried = await jobs.retry("twice", 1, 90_000, 4_000, again)
    assert retried is not None and retried.attempt == 2


async def test_a_stop_given_up_is_due_at_once_only_for_the_holder_of_its_lease(database):
    """A process shutting down mid-stop gives its lease up (`release_stop`):
    `stop_due` becomes now, so the next sweep of any watchdog claims it,
    but only while the row still holds that lease (the same `stop_due`,
    for that attempt): a stop taken over, or recorded, is left as it is."""
    jobs = await index_on(database)
    await jobs.insert(job("r"))
    await jobs.set_external("r", {"run": "r"}, 1_500, None)
    await jobs.end("r", Outcome("timed_out"), 2_000, stop_due=50_000)
    assert [r.id for r in await jobs.due(3_000, 10)] == []

    assert not await jobs.release_stop("r", 1, 40_000, 3_000)  # not its lease
    assert not await jobs.release_stop("r", 2, 50_000, 3_000)  # not attempt 2's
    assert not await jobs.release_stop("gone", 1, 50_000, 3_000)
    assert await jobs.release_stop("r", 1, 50_000, 3_000)
    assert [(r.id, r.stop_due, r.stop_attempt) for r in await jobs.due(3_000, 10)] == [
        ("r", 3_000, 1)
    ]
    assert await jobs.next_due(0) == 3_000
    assert not await jobs.release_stop("r", 1, 50_000, 3_100)  # once

    claimed = await jobs.claim_stop("r", 3_000, 90_000)  # the next sweep's
    assert claimed is not None and claimed.stop_due == 90_000
    assert not await jobs.release_stop("r", 1, 3_000, 4_000)  # the claim's now
    assert await jobs.stopped("r", 1, 90_000, [], 5_000) is not None
    assert not await jobs.release_stop("r", 1, 90_000, 6_000)  # recorded: nothing to give up
    assert (await jobs.get("r")).stop_due is None  # type: ignore[union-attr]


@contextlib.contextmanager
def statements(jobs: SqlJobIndex) -> Iterator[list[tuple[str, Any]]]:
    """The statements (with their arguments) `jobs` reads with, meanwhile."""
    ran: list[tuple[str, Any]] = []
    fetch = jobs.db.fetch

    async def recording(sql: str, args: Any) -> list[tuple[Any, ...]]:
        ran.append((sql, args))
        return await fetch(sql, args)

    jobs.db.fetch = recording  # type: ignore[method-assign]
    try:
        yield ran
    finally:
        jobs.db.fetch = fetch  # type: ignore[method-assign]


async def plan(jobs: SqlJobIndex, sql: str, args: Any) -> list[str]:
    """SQLite's plan of a statement: its steps' words."""
    return [r[3] for r in await jobs.db.fetch(f"EXPLAIN QUERY PLAN {sql}", args)]


async def test_the_watchdogs_looks_read_index_ranges_only(database):
    """Every statement of a sweep's look (`due`) and of the next due time
    (`next_due`), the run's stop among them, reads its partial index: no
    scan of the job table, however many ended jobs it holds."""
    if database.kind != "sqlite":
        pytest.skip("the plans are SQLite's (EXPLAIN QUERY PLAN)")
    jobs = await index_on(database)
    with statements(jobs) as ran:
        await jobs.due(5_000, 10)
        await jobs.next_due(5_000)
    stops = ("stop_due <=", "stop_due >")  # (every row read names the column)
    assert len(ran) == 5 and all(any(s in sql for sql, _ in ran) for s in stops), ran
    for sql, args in ran:
        steps = await plan(jobs, sql, args)
        reads = [step for step in steps if "tether_jobs" in step]
        assert len(reads) == (4 if "(SELECT" in sql else 1), steps
        assert all(step.startswith("SEARCH tether_jobs USING") for step in reads), steps
        if any(s in sql for s in stops):
            assert any("tether_jobs_stop" in step for step in reads), steps


async def test_the_missing_backends_count_reads_the_open_jobs_partial_indexes_only(database):
    """`waiting_backends` (at `tether serve`'s start and each readiness
    refresh) skips through the partial indexes of open and queued jobs:
    SQLite's planner read every entry of the state index instead, 0.8-4.5 s
    at a million waiting jobs (the scale benchmark, 2026-12-04)."""
    if database.kind != "sqlite":
        pytest.skip("the plans are SQLite's (EXPLAIN QUERY PLAN)")
    jobs = await index_on(database)
    jobs.limits = {"gone": 1}
    for i in ("j1", "j2", "j3"):
        await jobs.insert(job(i, backend="gone"))
    await jobs.insert(job("k", backend="here"))
    with statements(jobs) as ran:
        assert await jobs.waiting_backends(["here"]) == {"gone": 3}
    assert len(ran) == 4, ran  # the open jobs' backends, their count; the queue's, its count
    for sql, args in ran:
        steps = await plan(jobs, sql, args)
        reads = [step for step in steps if "tether_jobs" in step]
        assert reads and all(
            step.startswith("SEARCH tether_jobs USING")
            and ("tether_jobs_active" in step or "tether_jobs_queue" in step)
            for step in reads
        ), steps


async def test_the_counts_per_state_are_read_aside_from_the_event_loops_connection(
    database, tmp_path
):
    """The `tether_jobs` gauge (every `/metrics` scrape and dashboard
    summary) reads the whole state index: 78-100 ms at a million jobs. On
    SQLite that read runs on a connection of its own that only reads, on a thread,
    not on the connection the event loop runs its statements on; a store
    that cannot be read is the store's error, not a crash."""
    if database.kind != "sqlite":
        pytest.skip("Postgres counts on its server")
    jobs = await index_on(database)
    for i in ("j1", "j2"):
        await jobs.insert(job(i))
    with statements(jobs) as ran:
        assert await jobs.state_counts() == {"pending": 2}
    assert ran == []
    gone = SqliteDriver(tmp_path / "nowhere" / "tether.db")
    with pytest.raises(StoreUnavailable, match="the embedded store failed"):
        await gone.fetch_aside("SELECT 1", ())


async def test_a_store_closed_after_reads_aside_leaves_no_wal(tmp_path):
    """The service stops its store engine first (`Resonate.stop` closes the
    engine's connection), then the store, whose index closes its aside
    connection last. The last connection to close checkpoints the WAL and
    removes it; a read-only one could not, and every service that had
    listed a page or counted jobs left its WAL behind at a clean stop."""
    settings = Settings.from_env({}, store=f"sqlite:///{tmp_path}/tether.db")
    store = await open_store(settings, "p")
    await store.jobs.insert(job("j1"))
    assert [j.id for j in (await store.jobs.pages([(None, None)], 10, None)).rows] == ["j1"]
    assert await store.jobs.state_counts() == {"pending": 1}
    assert store.jobs.db._aside is not None  # type: ignore[attr-defined]
    await store.connection.stop()  # type: ignore[attr-defined]  # as `Resonate.stop` does
    await store.close()
    assert not (tmp_path / "tether.db-wal").exists()
    assert not (tmp_path / "tether.db-shm").exists()
    # A read asked once it is closed (a late scrape) fails, and opens nothing.
    with pytest.raises(StoreUnavailable):
        await store.jobs.state_counts()
    assert not (tmp_path / "tether.db-wal").exists()


async def test_reads_waiting_aside_hold_no_thread_of_the_loops_default_executor(database):
    """Reads aside queue for the driver's own thread, not on the loop's
    default executor, which other work needs meanwhile (aiohttp resolves a
    trigger's host name there): while one read is held, however many more
    are asked, a call handed to the default executor still runs."""
    if database.kind != "sqlite":
        pytest.skip("Postgres reads on its server")
    jobs = await index_on(database)
    await jobs.insert(job("j1"))
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(2))
    driver = jobs.db
    driver._aside_lock.acquire()  # type: ignore[attr-defined]  # a read in progress
    try:
        waiting = [asyncio.create_task(jobs.state_counts()) for _ in range(4)]
        waiting += [asyncio.create_task(jobs.pages([(None, None)], 10, None)) for _ in range(4)]
        await asyncio.sleep(0.05)
        assert await asyncio.wait_for(asyncio.to_thread(lambda: "ran"), 5) == "ran"
        assert not any(task.done() for task in waiting)
    finally:
        driver._aside_lock.release()  # type: ignore[attr-defined]
    done = await asyncio.gather(*waiting)
    assert done[0] == {"pending": 1}
    assert [j.id for j in done[-1].rows] == ["j1"]


async def test_a_count_is_read_again_only_after_a_commit_of_any_connection(database):
    """Between commits, the count per state is the last one read (an idle
    store's scrapes cost a pragma, not a read of the whole state index); a
    commit of the index's own connection or of another one (another worker
    on the same file) makes the next count read the index again."""
    if database.kind != "sqlite":
        pytest.skip("Postgres counts on its server, every time")
    jobs, other = await index_on(database), await index_on(database)
    await jobs.insert(job("j1"))
    assert await jobs.state_counts() == {"pending": 1}
    aside = jobs.db._aside  # type: ignore[attr-defined]
    read: list[str] = []
    aside.set_trace_callback(read.append)
    assert await jobs.state_counts() == {"pending": 1}
    assert read == ["PRAGMA data_version"]  # nothing committed: kept

    await other.insert(job("j2"))  # the other worker
    assert await jobs.state_counts() == {"pending": 2}
    await jobs.end("j1", Outcome("succeeded"), 3_000)  # its own connection
    assert await jobs.state_counts() == {"pending": 1, "succeeded": 1}
    assert sum("GROUP BY state" in sql for sql in read) == 2
    await other.end("j2", Outcome("failed"), 3_000)
    assert await other.state_counts() == {"failed": 1, "succeeded": 1}
    assert await jobs.state_counts() == {"failed": 1, "succeeded": 1}


async def test_with_many_jobs_a_count_is_reused_for_a_few_seconds_whatever_changed(database):
    """From `counts_many` jobs stored, a count per state is the answer for
    `COUNTS_REUSE_S` even after writes (a dashboard's summary reloads every
    1.5 s while jobs change: each would read the whole state index); then
    it is read again. Below that, each count is exact (the test above)."""
    jobs = await index_on(database)
    jobs.counts_many = 2
    now = [100.0]
    jobs.clock = lambda: now[0]
    await jobs.insert(job("j1"))
    assert await jobs.state_counts() == {"pending": 1}  # 1 job: not kept
    await jobs.insert(job("j2"))
    assert await jobs.state_counts() == {"pending": 2}  # 2 jobs: kept
    await jobs.insert(job("j3"))
    got = await jobs.state_counts()
    assert got == {"pending": 2}
    got["pending"] = 99  # the caller's copy
    now[0] = 100.0 + COUNTS_REUSE_S - 0.5
    assert await jobs.state_counts() == {"pending": 2}
    now[0] = 100.0 + COUNTS_REUSE_S  # kept for exactly that long
    assert await jobs.state_counts() == {"pending": 3}


async def test_a_promotion_reads_the_backends_queue_and_its_jobs_by_id_only(database):
    """However many jobs are queued (of any backend), a promotion reads the
    oldest few of its backend's queue, then those rows by id: SQLite read the
    state index's every queued job to find them."""
    if database.kind != "sqlite":
        pytest.skip("the plans are SQLite's (EXPLAIN QUERY PLAN)")
    jobs = await index_on(database)
    jobs.limits = {"b": 1}
    for i in ("j1", "j2", "j3"):
        await jobs.insert(job(i, backend="b"))
    with statements(jobs) as ran:
        await jobs.end("j1", Outcome("succeeded"), 3_000)
    [(sql, args)] = [(sql, args) for sql, args in ran if "SET state = 'pending'" in sql]
    steps = await plan(jobs, sql, args)
    reads = [step for step in steps if "tether_jobs" in step]
    assert reads == [
        "SEARCH tether_jobs USING INDEX sqlite_autoindex_tether_jobs_1 (id=?)",
        "SEARCH tether_jobs USING INDEX tether_jobs_queue (backend=?)",
    ], steps
    assert (await jobs.get("j2")).state == "pending"  # type: ignore[union-attr]


async def test_a_jobs_history_never_goes_back_in_time(database):
    """An event's time is taken before its write's transaction, and another
    write with a later time may commit first (another process, or the same
    group commit): the later-filed event is timed at its predecessor's, so a
    history read by `seq` is also in time order (audit, 2026-12-04)."""
    jobs = await index_on(database)
    await jobs.insert(job("t", at=5_000), [NewEvent("accepted", {})])
    await jobs.record("t", [NewEvent("heartbeat", {})], 9_000)
    await jobs.record("t", [NewEvent("heartbeat", {}), NewEvent("heartbeat", {})], 7_000)
    await jobs.end("t", Outcome("succeeded"), 8_000)
    await jobs.record("t", [NewEvent("callback", {})], 12_000)
    _, events = await jobs.events_after("t", 0, 100)
    assert [(e.seq, e.at) for e in events] == [
        (1, 5_000),
        (2, 9_000),
        (3, 9_000),
        (4, 9_000),
        (5, 9_000),
        (6, 12_000),
    ]


async def test_a_trigger_marks_its_tries_where_the_row_is_as_it_read_it(database):
    """`mark_tries` writes a run's mark only over the one its caller read
    (or over its own, a write made again after its answer was lost), and
    only for the attempt the row is at and the job it read (not one created
    under its id since): a second run that read the row before the first
    marked it is told so (False), and learns it is not alone."""
    jobs = await index_on(database)
    await jobs.insert(job("m"))
    assert await jobs.mark_tries("m", 1_000, 1, None, "1:a")
    assert await jobs.mark_tries("m", 1_000, 1, None, "1:a")  # made again: its own mark
    assert not await jobs.mark_tries("m", 1_000, 1, None, "1:b")  # read before "1:a" was written
    assert not await jobs.mark_tries("m", 1_000, 2, "1:a", "2:b")  # not the row's attempt
    assert not await jobs.mark_tries("m", 999, 1, "1:a", "1:b")  # another job under its id
    assert not await jobs.mark_tries("gone", 1_000, 1, None, "1:b")
    assert (await jobs.get("m")).tries_run == "1:a"  # type: ignore[union-attr]
    assert await jobs.mark_tries("m", 1_000, 1, "1:a", "1:b")  # a replay, having read "1:a"
    assert (await jobs.get("m")).tries_run == "1:b"  # type: ignore[union-attr]


async def test_a_large_rows_listeners_are_told_once_it_is_decoded_aside(
    database, caplog, monkeypatch
):
    """A write's row over `ASIDE_BYTES` is decoded on the aside thread,
    once for its caller and its listeners; they are told once it is, before
    `close` ends; a listener's error is logged, not lost in a task nobody
    reads."""
    import core.store.sql
    from core.aside import ASIDE_BYTES
    from tests.conftest import threads_of

    jobs = await index_on(database)
    told: list[tuple[str, int]] = []
    jobs.on_event = lambda rec, event: told.append((event.type, event.seq))
    decoded = threads_of(monkeypatch, core.store.sql, "_row")
    large = msgspec.structs.replace(job("big"), params={"words": ["w"] * ASIDE_BYTES})
    rec, created = await jobs.insert(large, [NewEvent("accepted", {})])
    assert created and rec.params == large.params
    await eventually(lambda: told == [("accepted", 1)])
    assert decoded == ["tether-aside_0"]
    again = await jobs.record("big", [NewEvent("status_check", {})], 2_000)
    assert again is not None and again.events == 2
    await eventually(lambda: told == [("accepted", 1), ("status_check", 2)])
    assert decoded == ["tether-aside_0"] * 2

    def broken(rec: Any, event: Any) -> None:
        raise RuntimeError("a listener's bug")

    jobs.on_event = broken
    await jobs.record("big", [NewEvent("status_check", {})], 3_000)
    await jobs.close()  # waits for the tell
    assert "telling of a job's events failed: RuntimeError" in caplog.text
    assert not jobs._telling
