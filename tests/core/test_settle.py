"""Settling (`core.settle`), in process, on real parts: the embedded engine and
its job index (`memory://`), or Postgres with resonate-pg's schema when
TETHER_TEST_PG_DSN is set, and a Resonate client on them. First settle wins;
the others are told how they compare; a job whose promise is not born yet is
ended in the index alone."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import psycopg
import pytest
from aiohttp import web
from resonate.connections.http import HttpConnection
from resonate.error import ConnectorError
from resonate.resonate import Resonate
from resonate.types import Value

import core.settle
from core.aside import ASIDE_BYTES
from core.bounds import MAX_DEPTH, bound_result
from core.errors import NotFound, StoreUnavailable
from core.models import ErrorInfo, Outcome
from core.redact import MASK, MIN_CUT
from core.settle import (
    Settler,
    judge,
    noted,
    outcome_of,
    outcome_of_record,
    settled_data,
    settled_value,
    store_call,
    store_timeout,
)
from core.store.embedded import _Inline
from core.store.jobs import JobRecord, NewEvent, now_ms
from core.store.postgres import PgSession
from core.store.sql import HISTORY_HEAD, HISTORY_LIMIT
from core.tokens import CallbackSigner
from core.workflow import callback_promise_id, root_promise_id
from tests.conftest import aiohttp_serving, eventually, threads_of
from tests.core.parts import Parts, logs_of, open_parts

DONE = Outcome(status="succeeded", result={"rows": 3})
OTHER = Outcome(status="succeeded", result={"rows": 4})
FAILED = Outcome(status="failed", error=ErrorInfo(message="boom", type="external"))
CANCELED = Outcome(status="canceled")
TIMED_OUT = Outcome(status="timed_out", error=ErrorInfo(message="late", type="timeout"))


def call_note(verdict: str) -> NewEvent:
    """A callback's note of its settle (`Settler.settle`'s `note`), as the
    callback endpoint files it."""
    return NewEvent("callback", {"verdict": verdict, "status": "succeeded"})


@pytest.fixture(params=["together", "step by step", "postgres"])
async def parts(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Parts]:
    """The embedded store's parts; each test runs twice: with a settle that
    wins settling the promise and ending the job in one transaction (the
    embedded store's), and step by step (a Resonate server's). And a third
    time on Postgres (resonate-pg's schema: one transaction too) when
    TETHER_TEST_PG_DSN names one."""
    on = {"store": request.getfixturevalue("fresh_pg_url")} if request.param == "postgres" else {}
    async with open_parts(**on) as p:
        if request.param == "step by step":
            p.step_by_step(monkeypatch)
        yield p


# ── the pure parts ───────────────────────────────────────────────────────────


def test_settled_data_reads_the_value_of_both_stores_answers():
    value = {"headers": {}, "data": "eyJhIjoxfQ=="}
    as_pg = {"promise": {"id": "p", "state": "resolved", "value": value}}
    as_engine = {"promise": {"id": "p", "value": msgspec.Raw(msgspec.json.encode(value))}}
    assert settled_data(as_pg) == settled_data(as_engine) == "eyJhIjoxfQ=="


async def test_store_call_passes_answers_and_errors_that_are_not_the_stores():
    async def answer() -> int:
        return 7

    async def refuse() -> None:
        raise ValueError("not the store's")

    assert await store_call(answer()) == 7
    with pytest.raises(ValueError, match="not the store's"):
        await store_call(refuse())


@pytest.mark.parametrize(
    ("error", "name"),
    [(OSError("disk"), "OSError"), (ConnectorError("gone"), "ConnectorError")],
)
async def test_a_store_that_fails_is_unavailable(error: Exception, name: str):
    async def fail() -> None:
        raise error

    with pytest.raises(StoreUnavailable) as raised:
        await store_call(fail())
    assert raised.value.message == f"the store did not answer: {name}"
    assert raised.value.__suppress_context__


async def test_a_store_that_stalls_is_unavailable(monkeypatch):
    monkeypatch.setattr(core.settle, "STORE_CALL_TIMEOUT", 0.05)
    with pytest.raises(StoreUnavailable) as raised:
        await store_call(asyncio.sleep(5))
    assert raised.value.message == "the store did not answer: TimeoutError"
    assert raised.value.unknown_effect  # asked, not refused: it may apply it late
    assert not StoreUnavailable("the index refused").unknown_effect


async def test_a_store_call_within_its_time_is_awaited_to_the_end(monkeypatch):
    monkeypatch.setattr(core.settle, "STORE_CALL_TIMEOUT", 1.0)

    async def slow() -> str:
        await asyncio.sleep(0.1)
        return "done"

    assert await store_call(slow()) == "done"


def test_a_settled_value_is_the_outcome_who_and_the_nonce():
    assert settled_value(FAILED, "callback", "n1") == {
        "status": "failed",
        "error": {"message": "boom", "type": "external"},
        "by": "callback",
        "nonce": "n1",
    }
    assert settled_value(DONE, "timeout", "n2") == {
        "status": "succeeded",
        "result": {"rows": 3},
        "by": "timeout",
        "nonce": "n2",
    }


@pytest.mark.parametrize(
    "note",
    [{"type": "callback", "data": "text"}, {"type": "exploded", "data": {}}, "callback", None],
)
def test_a_note_that_is_not_an_event_with_its_data_is_none(note: Any):
    assert noted({"status": "failed", "note": note}) == []
    assert noted({"note": {"type": "callback", "data": {"a": 1}}}) == [
        NewEvent("callback", {"a": 1})
    ]


def test_the_outcome_of_a_settled_value_is_read_back():
    assert outcome_of(settled_value(FAILED, "callback", "n")) == FAILED
    assert outcome_of({"status": "timed_out", "by": "store"}) == Outcome(status="timed_out")


@pytest.mark.parametrize(
    "value", [None, "garbage", 7, [], {"status": "exploded"}, {"result": 1}, {"status": 1}]
)
def test_an_unreadable_outcome_is_a_failure_saying_so(value: Any):
    assert outcome_of(value) == Outcome(
        status="failed", error=ErrorInfo(message="unreadable outcome", type="tether")
    )


def test_the_outcome_of_a_finished_row():
    rec = JobRecord(
        id="j",
        backend="b",
        state="failed",
        params={},
        metadata={},
        timeout=1,
        fingerprint="f",
        deadline=0,
        created_at=0,
        updated_at=0,
        result={"partial": True},
        error=ErrorInfo(message="m", type="t"),
    )
    assert outcome_of_record(rec) == Outcome(
        status="failed", result={"partial": True}, error=ErrorInfo(message="m", type="t")
    )


@pytest.mark.parametrize(
    ("status", "same", "result"),
    [
        ("canceled", True, "gone"),
        ("canceled", False, "gone"),
        ("timed_out", True, "gone"),
        ("timed_out", False, "gone"),
        ("succeeded", True, "duplicate"),
        ("succeeded", False, "conflict"),
        ("failed", True, "duplicate"),
        ("failed", False, "conflict"),
    ],
)
def test_judging_a_settle_that_lost(status: str, same: bool, result: str):
    assert judge(status, same) == result


# ── settling a job whose promise exists ──────────────────────────────────────


async def test_the_first_settle_wins_and_is_recorded(parts: Parts):
    await parts.add_job("j", state="running")
    await parts.add_promise("j")

    result, rec = await parts.settler.settle("j", FAILED, by="callback")

    assert result == "accepted"
    assert (rec.state, rec.result, rec.error) == ("failed", None, FAILED.error)
    assert rec.finished_at is not None
    assert await parts.row("j") == rec
    promise = await parts.promise("j")
    assert promise.state == "resolved"
    value = promise.value.data
    assert {k: v for k, v in value.items() if k != "nonce"} == {
        "status": "failed",
        "error": {"message": "boom", "type": "external"},
        "by": "callback",
    }
    assert isinstance(value["nonce"], str) and len(value["nonce"]) == 32


async def test_each_settle_has_its_own_nonce(parts: Parts):
    for job_id in ("a", "b"):
        await parts.add_job(job_id, state="running")
        await parts.add_promise(job_id)
        assert (await parts.settler.settle(job_id, DONE, by="callback"))[0] == "accepted"
    nonces = {(await parts.promise(j)).value.data["nonce"] for j in ("a", "b")}
    assert len(nonces) == 2


async def test_a_later_settle_is_told_how_it_compares_and_changes_nothing(parts: Parts):
    await parts.add_job("j", state="running")
    await parts.add_promise("j")
    _, first = await parts.settler.settle("j", DONE, by="callback")

    assert (await parts.settler.settle("j", DONE, by="callback"))[0] == "duplicate"
    result, rec = await parts.settler.settle("j", OTHER, by="callback")
    assert result == "conflict"
    assert rec == first == await parts.row("j")
    assert rec.result == {"rows": 3}
    assert (await parts.promise("j")).value.data["result"] == {"rows": 3}


@pytest.mark.parametrize("first", [CANCELED, TIMED_OUT])
async def test_a_settle_after_a_cancel_or_timeout_is_gone(parts: Parts, first: Outcome):
    await parts.add_job("j", state="running")
    await parts.add_promise("j")
    assert (await parts.settler.settle("j", first, by="cancel"))[0] == "accepted"

    for late in (DONE, first):
        result, rec = await parts.settler.settle("j", late, by="callback")
        assert result == "gone"
        assert rec.state == first.status


async def test_a_promise_the_store_timed_out_ends_the_job_timed_out(parts: Parts):
    await parts.add_job("j", state="running")
    await parts.add_promise("j", timeout_ms=1)
    await asyncio.sleep(0.05)

    def watchdogs(result: str) -> NewEvent | None:  # as the watchdog's deadline note
        return NewEvent("timed_out", {"timeout": 1}) if result == "accepted" else None

    result, rec = await parts.settler.settle("j", DONE, by="timeout", note=watchdogs)

    assert result == "gone"
    assert rec.state == "timed_out"
    assert rec.error == store_timeout(rec.timeout).error and rec.error.type == "timeout"
    assert rec.error.message.startswith(f"not finished within {rec.timeout:g} seconds")
    assert (await parts.promise("j")).state == "rejected_timedout"
    _, events = await parts.jobs.events_after("j", 0, 10)
    # the history says why, as a timeout by the watchdog's does
    assert [(e.type, e.data) for e in events][-2:] == [
        ("timed_out", {"timeout": rec.timeout, "by": "store"}),
        ("finished", {"state": "timed_out", "error_type": "timeout"}),
    ]


@pytest.mark.parametrize("how", ["reject", "cancel"])
async def test_a_promise_rejected_whatever_its_value_ends_the_job_timed_out(parts: Parts, how):
    """Tether only resolves: a rejected or canceled promise (the store's, or
    anyone's) counts as a timeout, whatever value it carries."""
    await parts.add_job("j", state="running")
    await parts.add_promise("j")
    settle = getattr(parts.resonate.promises, how)
    await settle(callback_promise_id("j"), Value(data=settled_value(DONE, "x", "n")))

    result, rec = await parts.settler.settle("j", DONE, by="callback")

    assert result == "gone"
    assert rec.state == "timed_out"


async def test_a_promise_settled_with_an_unreadable_value_fails_the_job(parts: Parts):
    await parts.add_job("j", state="running")
    await parts.add_promise("j")
    await parts.resonate.promises.resolve(callback_promise_id("j"), Value(data="garbage"))

    result, rec = await parts.settler.settle("j", DONE, by="callback")

    assert result == "conflict"
    assert (rec.state, rec.error) == (
        "failed",
        ErrorInfo(message="unreadable outcome", type="tether"),
    )


async def test_an_outcome_settled_by_another_settler_is_a_duplicate_not_a_win(parts: Parts):
    """Only the nonce tells a win: the same outcome settled by someone else is not ours."""
    await parts.add_job("j", state="running")
    await parts.add_promise("j")
    await parts.settler.resolve_quietly(callback_promise_id("j"), DONE, "index")

    result, rec = await parts.settler.settle("j", DONE, by="callback")

    assert result == "duplicate"
    assert rec.state == "succeeded"


async def test_a_promise_without_a_job_row_is_not_found(parts: Parts):
    await parts.add_promise("ghost")
    with pytest.raises(NotFound) as raised:
        await parts.settler.settle("ghost", DONE, by="callback")
    assert raised.value.message == "no job 'ghost'"


async def test_resolve_quietly_settles_with_the_outcome_and_first_settle_wins(parts: Parts):
    await parts.add_job("j", state="running")
    await parts.add_promise("j")
    promise_id = callback_promise_id("j")

    await parts.settler.resolve_quietly(promise_id, CANCELED, "index")
    await parts.settler.resolve_quietly(promise_id, DONE, "index")

    value = (await parts.promise("j")).value.data
    assert (value["status"], value["by"], len(value["nonce"])) == ("canceled", "index", 32)
    assert (await parts.row("j")).state == "running"  # the index is the caller's business


# ── one transaction: the embedded store and Postgres ──────────────────────────


async def together_only(parts: Parts, monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK's own settle request fails from now on (`StoreUnavailable`, a
    503): a settle that comes through used the index's transaction."""
    if not parts.jobs.settles_together:
        pytest.skip("step by step: the settle is the SDK's request")

    async def refused(promise_id: str, value: Value) -> Any:
        raise ConnectorError("the settle was not to be asked on its own")

    monkeypatch.setattr(parts.resonate.promises, "resolve", refused)


async def test_a_winning_settle_settles_the_promise_and_ends_the_job_in_one_transaction(
    parts: Parts, monkeypatch: pytest.MonkeyPatch
):
    await parts.add_job("j", state="running")
    await parts.add_promise("j")
    await together_only(parts, monkeypatch)

    result, rec = await parts.settler.settle("j", DONE, by="callback", note=call_note, attempt=1)

    assert (result, rec.state, rec.result) == ("accepted", "succeeded", {"rows": 3})
    promise = await parts.promise("j")
    assert (promise.state, promise.value.data["by"]) == ("resolved", "callback")
    assert promise.value.data["note"] == {"type": "callback", "data": call_note("accepted").data}
    assert [t for t, _ in await types_and_results(parts)][-2:] == ["callback", "finished"]
    assert await parts.row("j") == rec


async def test_a_settle_of_a_job_ended_in_the_index_alone_keeps_nothing_of_its_transaction(
    parts: Parts, monkeypatch: pytest.MonkeyPatch
):
    """The job was ended in the index while its promise is pending (a cancel
    of the unborn promise, whose trigger settles it): the transaction that
    settled the promise finds no open row to end, and takes the settle back;
    the settle goes on step by step (here refused: the promise stays pending)."""
    await parts.add_job("j", state="running")
    await parts.add_promise("j")
    ended, _ = await parts.jobs.end("j", CANCELED, now_ms(), attempt=1)
    await together_only(parts, monkeypatch)

    with pytest.raises(StoreUnavailable):
        await parts.settler.settle("j", DONE, by="callback", note=call_note, attempt=1)

    assert (await parts.promise("j")).state == "pending"
    assert await parts.row("j") == ended


async def protocol(parts: Parts, kind: str, data: dict[str, Any]) -> tuple[int, Any]:
    """One protocol request to the embedded store, as the SDK sends it."""
    req = {"kind": kind, "head": {"corrId": "t", "version": "v"}, "data": data}
    answer = json.loads(await parts.store.connection.send(json.dumps(req)))  # type: ignore[attr-defined]
    return answer["head"]["status"], answer["data"]


async def waiting_workflow(
    parts: Parts, job_id: str, attempt: int = 1, suspend: bool = True, timeout_ms: int = 60_000
) -> str:
    """Attempt `attempt` of `job_id`'s workflow as a worker leaves it: its
    root promise with a task (sent to a group nobody serves), acquired, its
    callback promise made (timing out in `timeout_ms`), then (`suspend`)
    suspended on it. Returns the root's id."""
    root = root_promise_id(job_id, attempt)
    tags = {"resonate:target": "poll://any@nobody", "resonate:scope": "global"}
    await parts.resonate.promises.create(root, now_ms() + 60_000, Value(data={"w": 1}), tags)
    status, _ = await protocol(
        parts, "task.acquire", {"id": root, "version": 0, "pid": "w", "ttl": 60_000}
    )
    assert status == 200
    external = {"resonate:external": "true"}  # as `ctx.promise` tags it: awaitable
    await parts.resonate.promises.create(
        callback_promise_id(job_id, attempt), now_ms() + timeout_ms, Value(data=None), external
    )
    if suspend:
        awaited = {"awaited": callback_promise_id(job_id, attempt), "awaiter": root}
        action = {"kind": "promise.register_callback", "data": awaited}
        status, _ = await protocol(
            parts, "task.suspend", {"id": root, "version": 1, "actions": [action]}
        )
        assert status == 200
    return root


async def task_state(parts: Parts, root: str) -> str:
    status, answer = await protocol(parts, "task.get", {"id": root})
    assert status == 200
    return str(answer["task"]["state"])


@pytest.mark.parametrize("attempt", [1, 2])
async def test_a_settle_ends_a_waiting_workflow_with_nothing_to_finish_in_its_transaction(
    parts: Parts, monkeypatch: pytest.MonkeyPatch, attempt: int
):
    if not parts.jobs.settles_together:
        pytest.skip("step by step: the workflow finishes the job")
    await parts.add_job("j", state="running")
    if attempt == 2:
        await parts.jobs.end("j", FAILED, now_ms(), attempt=1)
        again = NewEvent("retried", {"previous": {"state": "failed"}})
        assert await parts.jobs.retry("j", 1, now_ms() + 60_000, now_ms(), again)
    root = await waiting_workflow(parts, "j", attempt)
    asked: list[tuple[str, Any]] = []

    def alone(state: str, value: Any) -> bool:
        asked.append((state, value["by"]))
        return True

    parts.settler.finishes_alone = alone
    with logs_of("tether") as logs:
        result, rec = await parts.settler.settle(
            "j", DONE, by="callback", note=call_note, attempt=attempt
        )

    assert (result, rec.state, rec.attempt) == ("accepted", "succeeded", attempt)
    assert asked == [("succeeded", "callback")]
    promises = parts.resonate.promises
    waited = await promises.get(callback_promise_id("j", attempt))
    returned = await promises.get(root)
    assert (waited.state, returned.state) == ("resolved", "resolved")
    assert returned.value.data == waited.value.data  # what the workflow returns
    assert await task_state(parts, root) == "fulfilled"
    assert logs.fields() == [("job j finished: succeeded", "j", None)]
    assert [t for t, _ in await types_and_results(parts)][-2:] == ["callback", "finished"]


@pytest.mark.parametrize("why", ["its finish has work", "it is not waiting"])
async def test_a_workflow_with_a_finish_to_run_or_not_waiting_is_left_to_run(
    parts: Parts, why: str
):
    """Its promise settled and the job ended all the same, in one transaction."""
    await parts.add_job("j", state="running")
    root = await waiting_workflow(parts, "j", suspend=why != "it is not waiting")
    parts.settler.finishes_alone = lambda state, value: why != "its finish has work"
    with logs_of("tether") as logs:
        result, rec = await parts.settler.settle("j", DONE, by="callback", attempt=1)

    assert (result, rec.state) == ("accepted", "succeeded")
    assert (await parts.promise("j")).state == "resolved"
    assert (await parts.resonate.promises.get(root)).state == "pending"
    resumed = "pending" if why == "its finish has work" else "acquired"
    assert await task_state(parts, root) == resumed  # the workflow finishes the job
    assert logs.fields() == []


@pytest.mark.parametrize("alone", [True, False])
async def test_settles_of_a_waiting_workflow_at_once_end_it_once_with_the_winners_value(
    parts: Parts, alone: bool
):
    """Eight settles at once (callbacks, cancels): on Postgres each in a
    transaction of its own connection, racing for the promise's lock after
    all read it pending. One wins; the job, the promise and (`alone`) the
    workflow's root end with its value; every other settle is told so."""
    await parts.add_job("j", state="running")
    root = await waiting_workflow(parts, "j")
    parts.settler.finishes_alone = lambda state, value: alone
    outcomes = [DONE, CANCELED, OTHER, FAILED] * 2

    settled = await asyncio.gather(
        *(
            parts.settler.settle("j", o, by="cancel" if o is CANCELED else "callback", attempt=1)
            for o in outcomes
        )
    )

    results = [result for result, _ in settled]
    assert results.count("accepted") == 1
    won = outcomes[results.index("accepted")]
    rec = await parts.row("j")
    assert (rec.state, rec.result) == (won.status, won.result)
    waited = await parts.promise("j")
    assert outcome_of(waited.value.data) == outcome_of_record(rec)
    returned = await parts.resonate.promises.get(root)
    if alone and parts.jobs.settles_together:
        assert (returned.state, returned.value.data) == ("resolved", waited.value.data)
        assert await task_state(parts, root) == "fulfilled"
    else:  # resumed: its finish ends it
        assert returned.state == "pending"
        assert await task_state(parts, root) == "pending"
    assert [t for t, _ in await types_and_results(parts)].count("finished") == 1


async def deadlocks_of(parts: Parts) -> int:
    """On Postgres, the deadlocks it broke in the test's database (0 on
    another store). A victim's request was run again out of sight, and the
    end state was right all the same, so only the count tells: read once the
    store's connections closed, when their backends have written it."""
    if parts.store.kind != "postgresql":
        return 0
    await parts.resonate.stop()
    await parts.store.close()
    # In autocommit: each read its own transaction, so a fresh look at the statistics
    dsn = parts.settings.store
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cursor = await conn.execute(  # any left (a pool's connection opening as it closed)
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
        )
        ended = [pid for (pid,) in await cursor.fetchall()]
        await conn.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) pid", (ended,))

        async def exited() -> bool:  # then each has written its counts
            cursor = await conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (ended,)
            )
            return (await cursor.fetchone()) == (0,)

        await eventually(exited, timeout=10)
        cursor = await conn.execute(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
        )
        row = await cursor.fetchone()
        return int(row[0]) if row else 0


async def test_a_callback_ending_the_workflow_and_a_cancel_at_once_do_not_deadlock(
    parts: Parts,
):
    """A callback whose settle also ends the waiting workflow (`alone`)
    racing a cancel's (whose finish has work: it settles the promise only),
    on many jobs at once. On Postgres the first settled the root, then the
    promise, and the second the promise, then (resonate-pg's cascade) the
    root: the same two locks the other way round, a deadlock that Postgres
    broke after a second, and 503s (found in an audit, 2026-12-04). Every
    settle now answers, one of each pair wins, and every job ends once."""
    parts.settler.finishes_alone = lambda state, value: value["by"] == "callback"
    ids = [f"j{i}" for i in range(12)]
    for job_id in ids:
        await parts.add_job(job_id, state="running")
        await waiting_workflow(parts, job_id)

    settled = await asyncio.gather(
        *(
            parts.settler.settle(job_id, outcome, by=by, attempt=1)
            for job_id in ids
            for outcome, by in ((DONE, "callback"), (CANCELED, "cancel"), (FAILED, "callback"))
        )
    )

    results = [result for result, _ in settled]
    for i, job_id in enumerate(ids):
        assert results[3 * i : 3 * i + 3].count("accepted") == 1, (job_id, results)
        assert (await parts.row(job_id)).finished
        kinds = [t for t, _ in await types_and_results(parts, job_id)]
        assert kinds.count("finished") == 1, (job_id, kinds)
    assert await deadlocks_of(parts) == 0


async def test_on_postgres_a_settle_from_elsewhere_during_a_workflows_end_waits_its_turn(
    parts: Parts, monkeypatch: pytest.MonkeyPatch
):
    """Another transaction (the SDK's connection: a cancel's, a host's of an
    earlier release) settles the promise while a settle that ends the
    waiting workflow is under way. resonate-pg's settle locks the promise,
    then the root awaiting it; the settle here settled the root first, so
    the two took the same locks the other way round: a deadlock, which
    Postgres broke after a second (a 503 when it hit the callback's;
    found in an audit, 2026-12-04). It now settles the promise first: the
    other waits its turn or goes first, nothing is broken off, and the
    promise and the row agree."""
    if parts.store.kind != "postgresql":
        pytest.skip("resonate-pg's locks")
    await parts.add_job("j", state="running")
    await waiting_workflow(parts, "j")
    parts.settler.finishes_alone = lambda state, value: True
    other = Value(data=msgspec.json.encode(settled_value(OTHER, "cancel", "n" * 32)).decode())
    elsewhere: list[asyncio.Task[Any]] = []

    async def meanwhile(tx: Any, request: Any) -> None:
        if not elsewhere:  # once: the step-by-step settle that may follow settles "j:1" too
            elsewhere.append(asyncio.create_task(parts.resonate.promises.resolve("j:1", other)))
            await asyncio.sleep(0.5)  # it waits on a lock this transaction holds, if any

    before_the_settle(monkeypatch, meanwhile)
    await parts.settler.settle("j", DONE, by="callback", attempt=1)
    await elsewhere[0]

    rec = await parts.row("j")
    assert rec.finished
    assert outcome_of((await parts.promise("j")).value.data) == outcome_of_record(rec)
    assert await deadlocks_of(parts) == 0  # (last: it closes the store)


def before_the_settle(
    monkeypatch: pytest.MonkeyPatch, then: Callable[[Any, Any], Awaitable[None]]
) -> None:
    """From now on, inside a settle's transaction, right before it settles
    the callback promise ("j:1"), `then(tx, request)` runs: `tx` the
    transaction (the embedded store's `_Inline`, Postgres's `PgSession`),
    `request` its store's own request."""
    for kind_of_tx in (_Inline, PgSession):

        def settling(request: Any) -> Any:
            async def settled(self: Any, kind: str, data: dict[str, Any]) -> Any:
                if kind == "promise.settle" and data.get("id") == "j:1":
                    await then(self, request)
                return await request(self, kind, data)

            return settled

        monkeypatch.setattr(kind_of_tx, "request", settling(kind_of_tx.request))


async def test_a_promise_settled_by_another_inside_the_transaction_is_not_taken_as_won(
    parts: Parts, monkeypatch: pytest.MonkeyPatch
):
    """Postgres: after the transaction began (the promise pending) and
    before its settle, another process settles it on its own (a host of an earlier
    release settles step by step). resonate-pg answers that settle 200 with
    the other's value: the transaction is taken back, and the settle goes on
    step by step, which finds the other's value the winner."""
    if parts.store.kind != "postgresql":
        pytest.skip("the embedded store runs one transaction at a time")
    await parts.add_job("j", state="running")
    await parts.add_promise("j")

    async def settled_by_another(tx: Any, request: Any) -> None:
        value = settled_value(OTHER, "callback", "n" * 32)
        await parts.resonate.promises.resolve("j:1", Value(data=value))

    before_the_settle(monkeypatch, settled_by_another)
    result, rec = await parts.settler.settle("j", DONE, by="callback", attempt=1)

    assert (result, rec.state, rec.result) == ("conflict", "succeeded", {"rows": 4})
    assert outcome_of((await parts.promise("j")).value.data) == OTHER


@pytest.mark.parametrize("alone", [False, True])
async def test_a_promise_settled_another_way_inside_the_transaction_is_taken_back_with_it(
    parts: Parts, monkeypatch: pytest.MonkeyPatch, alone: bool
):
    """The embedded store: its transactions do not interleave, so the promise
    is settled here with another value inside the transaction, right
    before its own settle (what another process does on
    Postgres). The settle's answer carries that other value: the transaction
    is taken back whole (the other settle with it, and with `alone` the
    waiting workflow's end, settled first), and the settle goes on step by
    step. The promise and the row end with one and the same value, and the
    workflow, never ended, is resumed to finish the job."""
    if parts.store.kind == "postgresql" or not parts.jobs.settles_together:
        pytest.skip("the embedded store's transaction")
    await parts.add_job("j", state="running")
    root = await waiting_workflow(parts, "j")
    parts.settler.finishes_alone = lambda state, value: alone
    other = msgspec.to_builtins(
        parts.resonate.promises.codec.encode(settled_value(OTHER, "callback", "n" * 32))
    )

    async def settled_inside(tx: Any, request: Any) -> None:
        settle = {"id": "j:1", "state": "resolved", "value": other}
        assert (await request(tx, "promise.settle", settle))[0] == 200

    before_the_settle(monkeypatch, settled_inside)
    result, rec = await parts.settler.settle("j", DONE, by="callback", attempt=1)

    assert (result, rec.state, rec.result) == ("accepted", "succeeded", {"rows": 3})
    assert outcome_of((await parts.promise("j")).value.data) == DONE
    assert (await parts.resonate.promises.get(root)).state == "pending"
    assert await task_state(parts, root) == "pending"  # resumed: its finish ends it


@pytest.mark.parametrize("alone", [False, True])
async def test_a_promise_that_times_out_inside_the_transaction_is_not_taken_as_won(
    parts: Parts, monkeypatch: pytest.MonkeyPatch, alone: bool
):
    """The promise is pending when the transaction begins, and past its
    timeout when it settles it (each request reads the clock): the store
    answers that settle 200 with the timed-out promise and writes nothing.
    The transaction is taken back, and the settle, step by step, finds the
    store's timeout the winner: the job does not end as the callback said
    while its promise says otherwise (found in review, 2026-12-03). With
    `alone` the waiting workflow's root, settled first in the transaction,
    is taken back with it: the workflow is not ended with an outcome the
    job did not have, and finishes the job itself once resumed."""
    if not parts.jobs.settles_together:
        pytest.skip("step by step: the settle is the SDK's request")
    await parts.add_job("j", state="running")
    root = await waiting_workflow(parts, "j", timeout_ms=300)
    parts.settler.finishes_alone = lambda state, value: alone
    due = (await parts.promise("j")).timeout_at

    async def past_its_timeout(tx: Any, request: Any) -> None:
        seconds = max(due - now_ms(), 0) / 1000 + 0.05
        if isinstance(tx, _Inline):  # inside the engine's batch: nothing may wait on the loop
            time.sleep(seconds)
        else:
            await asyncio.sleep(seconds)

    before_the_settle(monkeypatch, past_its_timeout)
    result, rec = await parts.settler.settle("j", DONE, by="callback", attempt=1)

    promise = await parts.promise("j")
    assert promise.state == "rejected_timedout"
    assert result != "accepted"
    assert (rec.state, rec.result) == ("timed_out", None)
    assert (await parts.resonate.promises.get(root)).state == "pending"
    assert await task_state(parts, root) != "fulfilled"


async def test_a_late_settle_of_an_attempt_ended_alone_leaves_the_next_attempt_be(parts: Parts):
    """Attempt 1 was ended in the index alone (its promise still pending, as
    a cancel of its unborn promise leaves it) and retried: a settle of
    attempt 1 settles its promise, and ends nothing of attempt 2."""
    await parts.add_job("j")
    await parts.add_promise("j")
    await parts.jobs.end("j", CANCELED, now_ms(), attempt=1)
    again = NewEvent("retried", {"previous": {"state": "canceled"}})
    retried = await parts.jobs.retry("j", 1, now_ms() + 60_000, now_ms(), again)
    assert retried is not None

    _, rec = await parts.settler.settle("j", DONE, by="callback", attempt=1)

    assert (rec.attempt, rec.state) == (2, "pending")
    assert await parts.row("j") == retried
    assert (await parts.promise("j")).state == "resolved"


# ── the unborn promise: the workflow has not created it yet ──────────────────


async def test_a_pending_job_without_its_promise_is_ended_in_the_index(parts: Parts):
    await parts.add_job("j")

    result, rec = await parts.settler.settle("j", CANCELED, by="cancel")

    assert result == "accepted"
    assert rec.state == "canceled" and rec.finished_at is not None
    assert await parts.row("j") == rec
    with pytest.raises(Exception, match="not found"):
        await parts.promise("j")  # the trigger step settles it when the workflow runs


async def test_a_second_settle_of_an_unborn_promise_compares_with_the_index(parts: Parts):
    await parts.add_job("j")
    await parts.settler.settle("j", FAILED, by="trigger")

    assert (await parts.settler.settle("j", FAILED, by="trigger"))[0] == "duplicate"
    assert (await parts.settler.settle("j", DONE, by="callback"))[0] == "conflict"
    assert (await parts.settler.settle("j", CANCELED, by="cancel"))[0] == "conflict"
    assert (await parts.settler.settle("j", Outcome(status="failed"), by="x"))[0] == "conflict"
    assert (await parts.row("j")).error == FAILED.error


@pytest.mark.parametrize("state", ["queued", "pending"])
async def test_of_settles_at_once_of_an_unborn_promise_one_wins(parts: Parts, state: str):
    """Cancels (or timeouts) of a job without its promise, at once: one is
    `accepted` and records its event; the rest are `gone`, as on a promise."""
    await parts.add_job("j")
    await parts.jobs.db.execute("UPDATE tether_jobs SET state = ? WHERE id = 'j'", (state,))
    said: list[str] = []
    results = await asyncio.gather(
        *(parts.settler.settle("j", CANCELED, by="cancel", note=noting(said)) for _ in range(4))
    )
    assert sorted(r for r, _ in results) == ["accepted", "gone", "gone", "gone"]
    recorded = [r for t, r in await types_and_results(parts) if t == "callback"]
    assert recorded.count("accepted") == 1 and recorded.index("accepted") == 0


async def test_settling_an_unborn_promise_after_a_cancel_is_gone(parts: Parts):
    await parts.add_job("j")
    await parts.settler.settle("j", CANCELED, by="cancel")

    result, rec = await parts.settler.settle("j", DONE, by="callback")

    assert result == "gone"
    assert rec.state == "canceled"


async def test_an_unknown_job_is_not_found(parts: Parts):
    with pytest.raises(NotFound) as raised:
        await parts.settler.settle("nobody", DONE, by="callback")
    assert raised.value.message == "no job 'nobody'"


async def test_a_running_job_whose_promise_comes_late_is_settled_through_it(parts: Parts):
    """Past `pending` the workflow is creating the promise: the settle waits for it."""
    await parts.add_job("j", state="running")
    await parts.add_root("j")  # its workflow runs
    settle = asyncio.create_task(parts.settler.settle("j", DONE, by="callback"))
    await asyncio.sleep(0.3)
    assert not settle.done()
    await parts.add_promise("j")

    result, rec = await settle

    assert result == "accepted"
    assert rec.state == "succeeded"
    assert (await parts.promise("j")).value.data["by"] == "callback"


async def test_a_promise_that_never_comes_is_the_store_not_keeping_up(parts: Parts, monkeypatch):
    monkeypatch.setattr(core.settle, "UNBORN_PROMISE_WAIT", 0.001)
    await parts.add_job("j", state="running")
    await parts.add_root("j")  # its workflow runs

    with pytest.raises(StoreUnavailable) as raised:
        await parts.settler.settle("j", DONE, by="callback")

    assert raised.value.message == "job 'j' did not create its promise in time"
    assert (await parts.row("j")).state == "running"


async def test_the_unborn_promise_is_looked_for_the_set_number_of_times(parts: Parts, monkeypatch):
    monkeypatch.setattr(core.settle, "UNBORN_PROMISE_WAIT", 0.001)
    monkeypatch.setattr(core.settle, "UNBORN_PROMISE_TRIES", 3)
    await parts.add_job("j", state="running")
    await parts.add_root("j")  # its workflow runs
    asked: list[str] = []
    resolve = parts.resonate.promises.resolve

    async def counting(promise_id: str, value: Value) -> Any:
        asked.append(promise_id)
        return await resolve(promise_id, value)

    parts.step_by_step(monkeypatch)  # (together, a transaction that rolls back first)
    monkeypatch.setattr(parts.resonate.promises, "resolve", counting)
    with pytest.raises(StoreUnavailable):
        await parts.settler.settle("j", DONE, by="callback")
    assert asked == ["j:1"] * 3


# ── a store that refuses ─────────────────────────────────────────────────────


async def test_a_store_that_refuses_the_settle_is_unavailable(caplog: pytest.LogCaptureFixture):
    refusal = "disk on fire; " * 20
    """A store answering 500 (over HTTP, as resonate's server would)."""

    async def refuse(request: web.Request) -> web.Response:
        body = await request.json()
        head = {"corrId": body["head"]["corrId"], "status": 500, "version": "v"}
        return web.json_response({"kind": body["kind"], "head": head, "data": refusal})

    async with aiohttp_serving(refuse) as port, open_parts() as parts:
        resonate = Resonate(
            network=HttpConnection(f"http://127.0.0.1:{port}"),
            sources=[],
            subscription_refresh_secs=0,
        )
        await parts.add_job("j", state="running")
        try:
            with pytest.raises(StoreUnavailable) as raised:
                await Settler(resonate, parts.jobs).settle("j", DONE, by="callback")
        finally:
            await resonate.stop()
        said = f"the store refused the settle (status 500: {refusal[:200]})"  # cut: it may be long
        assert raised.value.message == said
        [record] = [r for r in caplog.records if r.levelname == "WARNING"]
        assert record.getMessage() == f"job j: {said}" and record.__dict__["job_id"] == "j"
        assert (await parts.row("j")).state == "running"


# ── what made the settle (`note`), attempts, the result's bound ──────────────


def noting(said: list[str]) -> Any:
    """A note recording each result it is asked about, as an event naming it."""

    def note(result: str) -> NewEvent | None:
        said.append(result)
        return None if result == "duplicate" else NewEvent("callback", {"result": result})

    return note


async def types_and_results(parts: Parts, job_id: str = "j") -> list[tuple[str, Any]]:
    _, events = await parts.jobs.events_after(job_id, 0, 100)
    return [(e.type, e.data.get("result")) for e in events]


async def test_the_note_of_the_settle_that_won_comes_before_finished(parts: Parts):
    await parts.add_job("j", state="running")
    await parts.add_promise("j")
    said: list[str] = []

    result, rec = await parts.settler.settle("j", DONE, by="callback", note=noting(said))

    assert (result, said) == ("accepted", ["accepted"])
    assert (await types_and_results(parts))[-2:] == [("callback", "accepted"), ("finished", None)]
    assert rec == await parts.row("j")


AFTER_THE_END = [
    NewEvent("callback", {"verdict": "duplicate", "status": "succeeded", "body_sha256": "b"}),
    NewEvent("notify_failed", {"try": 1, "error": "status 503"}),
    NewEvent("cancel_failed", {"error": "the run could not be stopped"}),
] * 4
"""Twelve events a job may get once it ended (late callbacks, notification
tries, a run's stop that failed): more than the settle's look at the history
once took in (8)."""


@pytest.mark.parametrize("page", [core.settle.FILED_PAGE, 1])
@pytest.mark.parametrize("from_its_value", [True, False])
async def test_a_settle_that_won_files_its_note_once_however_many_events_followed_the_end(
    parts: Parts, monkeypatch: pytest.MonkeyPatch, page: int, from_its_value: bool
):
    """Between the winner's settle and its index write, the job was ended
    and a dozen events filed after its `finished`. Ended from the winner's
    value (the workflow's finish: `noted`), the winner's note is there
    already, just before `finished`: not filed again. Ended otherwise (not
    from its value), the winner files its note after all of them, and is
    told how it compares (it ended nothing). Whether the look reads the
    history a page at a time or an event at a time."""
    monkeypatch.setattr(core.settle, "FILED_PAGE", page)
    await parts.add_job("j", state="running")
    await parts.add_promise("j")
    parts.ended_as_it_settles(monkeypatch, from_its_value=from_its_value, after=AFTER_THE_END)

    result, rec = await parts.settler.settle("j", DONE, by="callback", note=call_note, attempt=1)

    assert (result, rec.state) == ("accepted" if from_its_value else "duplicate", "succeeded")
    _, events = await parts.jobs.events_after("j", 0, 100)
    mine = [
        (e.seq, e.data["verdict"])
        for e in events
        if e.type == "callback" and "body_sha256" not in e.data
    ]
    [end] = [e.seq for e in events if e.type == "finished"]
    if from_its_value:
        assert mine == [(end - 1, "accepted")]  # once, filed with the end
        assert rec.events == end + len(AFTER_THE_END)
    else:  # after what came after the end, as a settle that found the job ended
        assert mine == [(end + len(AFTER_THE_END) + 1, "duplicate")]
        assert rec.events == end + len(AFTER_THE_END) + 1


async def test_the_look_for_a_winners_note_reads_no_more_than_the_history_keeps(
    parts: Parts, monkeypatch: pytest.MonkeyPatch
):
    """Three thousand events came after the end (late callbacks, say): the
    history keeps its first `HISTORY_HEAD` events (the end among them,
    with the winner's note) and its last ones, `HISTORY_LIMIT` in all.
    The look reads the kept tail and the head, a page at a time, never the
    trimmed middle: not a page for every 64 events ever filed (a range
    read past the gap returns the tail's first events again, each time)."""
    await parts.add_job("j", state="running")
    await parts.add_promise("j")
    promises = parts.settler.resonate.promises
    resolve = promises.resolve
    after = 3000

    async def then_end(promise_id: str, value: Value) -> Any:
        record = await resolve(promise_id, value)
        events = core.settle.noted(value.data)
        await parts.jobs.end("j", outcome_of(value.data), now_ms(), events=events, attempt=1)
        for _ in range(after // len(AFTER_THE_END)):
            await parts.jobs.record("j", AFTER_THE_END, now_ms())
        return record

    reads: list[tuple[int, int]] = []
    events_after = parts.jobs.events_after

    async def counted(job_id: str, first: int, limit: int) -> Any:
        reads.append((first, limit))
        return await events_after(job_id, first, limit)

    parts.step_by_step(monkeypatch)
    monkeypatch.setattr(promises, "resolve", then_end)
    monkeypatch.setattr(parts.jobs, "events_after", counted)
    result, rec = await parts.settler.settle("j", DONE, by="callback", note=call_note, attempt=1)

    assert (result, rec.state) == ("accepted", "succeeded")
    monkeypatch.undo()
    _, events = await parts.jobs.events_after("j", 0, HISTORY_LIMIT + 1)
    assert len(events) == HISTORY_LIMIT
    [end] = [e.seq for e in events if e.type == "finished"]
    assert end <= HISTORY_HEAD  # kept, as the first events always are
    mine = [e.seq for e in events if e.type == "callback" and "body_sha256" not in e.data]
    assert mine == [end - 1]  # found, not filed again
    pages = -(-(HISTORY_LIMIT - HISTORY_HEAD) // core.settle.FILED_PAGE) + 1  # the tail, the head
    assert len(reads) <= pages, reads
    # each kept event asked for once: the tail down to where trimming began, then the head
    assert sum(limit for _, limit in reads) == HISTORY_LIMIT, reads
    assert reads[-1] == (0, HISTORY_HEAD) and min(first for first, _ in reads[:-1]) == (
        rec.events - (HISTORY_LIMIT - HISTORY_HEAD)
    )


async def test_the_look_for_a_winners_note_overtaken_by_the_historys_trimming_still_finds_it(
    parts: Parts, monkeypatch: pytest.MonkeyPatch
):
    """The job was ended from the winner's value (its note just before
    `finished`, in the history's tail) and filled its history up to the
    limit; then, as the winner looks, five more events come and trim the
    tail's oldest five. The page that holds the end is read past the gap:
    the events it returns beyond the page are passed over, the end and the
    note in it still found, and the note not filed again."""
    await parts.add_job("j", state="running")
    await parts.add_promise("j")
    before = [NewEvent("heartbeat", {"n": n}) for n in range(20)]  # the end past the head
    await parts.jobs.record("j", before, now_ms())
    promises = parts.settler.resonate.promises
    resolve = promises.resolve

    async def then_end(promise_id: str, value: Value) -> Any:
        record = await resolve(promise_id, value)
        events = core.settle.noted(value.data)
        rec, _ = await parts.jobs.end("j", DONE, now_ms(), events=events, attempt=1)
        assert rec is not None
        late = [NewEvent("heartbeat", {"n": n}) for n in range(HISTORY_LIMIT - rec.events)]
        await parts.jobs.record("j", late, now_ms())  # the history full, nothing trimmed yet
        return record

    events_after = parts.jobs.events_after
    overtaken = False

    async def overtaking(job_id: str, first: int, limit: int) -> Any:
        nonlocal overtaken
        if not overtaken:
            overtaken = True
            await parts.jobs.record("j", AFTER_THE_END[:5], now_ms())
        return await events_after(job_id, first, limit)

    parts.step_by_step(monkeypatch)
    monkeypatch.setattr(promises, "resolve", then_end)
    monkeypatch.setattr(parts.jobs, "events_after", overtaking)
    result, rec = await parts.settler.settle("j", DONE, by="callback", note=call_note, attempt=1)

    assert (result, rec.state, overtaken) == ("accepted", "succeeded", True)
    monkeypatch.undo()
    _, events = await parts.jobs.events_after("j", 0, HISTORY_LIMIT + 1)
    assert len(events) == HISTORY_LIMIT and events[HISTORY_HEAD].seq == HISTORY_HEAD + 6
    mine = [e.seq for e in events if e.type == "callback" and "body_sha256" not in e.data]
    [end] = [e.seq for e in events if e.type == "finished"]
    assert mine == [end - 1] == [len(before) + 1]  # found, not filed again


async def test_a_winners_note_is_looked_for_only_in_the_write_that_ended_its_attempt(
    parts: Parts, monkeypatch: pytest.MonkeyPatch
):
    """The job was ended, not from the winner's value, with no event of its
    own: what comes before its `finished` is an earlier write's (an event
    filed a second before) or, when the end came in the millisecond of the
    retry that started the attempt, that retry's `retried` and then the
    previous attempt's events. Neither is the winner's note: it is filed
    after the end, as a settle that lost files it, and told how it compares."""
    then = now_ms() - 1_000
    await parts.add_job("j", state="running")
    await parts.jobs.record("j", [NewEvent("heartbeat", {})], then)  # a second before
    await parts.add_job("k", state="running")
    await parts.jobs.end("k", FAILED, then, attempt=1)
    again = NewEvent("retried", {"previous": {"state": "failed"}})
    assert await parts.jobs.retry("k", 1, now_ms() + 60_000, then, again)
    for job_id, attempt in (("j", 1), ("k", 2)):
        await parts.resonate.promises.create(
            callback_promise_id(job_id, attempt), now_ms() + 60_000, Value(data=None), {}
        )
    promises = parts.settler.resonate.promises
    resolve = promises.resolve

    async def then_end(promise_id: str, value: Value) -> Any:
        record = await resolve(promise_id, value)
        job_id, attempt = ("j", 1) if promise_id == callback_promise_id("j") else ("k", 2)
        at = now_ms() if job_id == "j" else then  # k: in the retry's millisecond
        await parts.jobs.end(job_id, DONE, at, attempt=attempt)
        return record

    parts.step_by_step(monkeypatch)
    monkeypatch.setattr(promises, "resolve", then_end)
    for job_id, attempt in (("j", 1), ("k", 2)):
        said: list[str] = []
        result, rec = await parts.settler.settle(
            job_id, DONE, by="callback", note=noting(said), attempt=attempt
        )
        assert (result, rec.state, said) == ("duplicate", "succeeded", ["accepted", "duplicate"])
        assert (await types_and_results(parts, job_id))[-1] == ("finished", None)  # None: none


async def test_a_winner_that_notes_nothing_for_a_win_is_told_how_it_compares(
    parts: Parts, monkeypatch: pytest.MonkeyPatch
):
    """Its value won, but the job was ended by another (not from its value):
    with no event of a win to look for, it is judged against the row and
    files the event it has for that."""
    await parts.add_job("j", state="running")
    await parts.add_promise("j")
    parts.ended_as_it_settles(monkeypatch, from_its_value=False)

    def note(result: str) -> NewEvent | None:
        return None if result == "accepted" else NewEvent("callback", {"result": result})

    result, rec = await parts.settler.settle("j", DONE, by="callback", note=note, attempt=1)
    assert (result, rec.state) == ("duplicate", "succeeded")
    assert (await types_and_results(parts))[-2:] == [("finished", None), ("callback", "duplicate")]


async def test_the_note_of_a_settle_that_lost_comes_after_and_none_is_recorded_for_none(
    parts: Parts,
):
    await parts.add_job("j", state="running")
    await parts.add_promise("j")
    await parts.settler.settle("j", DONE, by="callback")
    before = await types_and_results(parts)
    said: list[str] = []

    result, rec = await parts.settler.settle("j", OTHER, by="callback", note=noting(said))
    assert result == "conflict"
    assert await types_and_results(parts) == [*before, ("callback", "conflict")]
    assert rec == await parts.row("j") and rec.events == len(before) + 1

    assert (await parts.settler.settle("j", DONE, by="callback", note=noting(said)))[0] == (
        "duplicate"
    )
    assert await types_and_results(parts) == [*before, ("callback", "conflict")]  # None: nothing
    # asked what a win records (kept in the value), then how it compared
    assert said == ["accepted", "conflict", "accepted", "duplicate"]


async def test_the_note_of_a_second_settle_of_an_unborn_promise_compares_with_the_index(
    parts: Parts,
):
    await parts.add_job("j")
    await parts.settler.settle("j", CANCELED, by="cancel")
    said: list[str] = []

    result, rec = await parts.settler.settle("j", DONE, by="callback", note=noting(said))

    assert result == "gone"
    assert said == ["accepted", "gone"]
    assert (await types_and_results(parts))[-1] == ("callback", "gone")
    assert rec == await parts.row("j")

    said.clear()  # the same cancel again lost as well, as it does once the promise exists
    assert (await parts.settler.settle("j", CANCELED, by="x", note=noting(said)))[0] == "gone"
    assert said == ["accepted", "gone"]


async def test_a_settle_of_an_unborn_promise_that_differs_from_the_first_is_a_conflict(
    parts: Parts,
):
    """The first ended the job in the index with its note; a second, with
    another result and the same note, is told it conflicts and files its
    note for that after the end (the first's note is not its own)."""
    await parts.add_job("j")
    said: list[str] = []
    await parts.settler.settle("j", DONE, by="callback", note=noting(said))
    said.clear()

    result, rec = await parts.settler.settle("j", OTHER, by="callback", note=noting(said))

    assert (result, rec.result) == ("conflict", DONE.result)
    assert said == ["accepted", "conflict"]
    assert await types_and_results(parts) == [
        ("callback", "accepted"),
        ("finished", None),
        ("callback", "conflict"),
    ]


async def test_a_settle_whose_caller_saw_the_job_ended_leaves_its_promise_to_the_trigger(
    parts: Parts,
):
    """A cancel ended the job before its promise was born (the index alone,
    its note before `finished`); the promise born since, a callback that
    read the ended row (`seen`) repeats that note: it ended nothing, so it
    is told how it compares and files its note after the end (the one
    before `finished` is not its own), and the promise is left pending for
    the workflow's trigger, which settles it from the row (saying whether
    it tried a run: a callback's value winning it said not)."""
    await parts.add_job("j")

    def note(result: str) -> NewEvent:
        return NewEvent("callback", {"status": "canceled", "result": result})

    await parts.settler.settle("j", CANCELED, by="cancel", note=note)
    seen = await parts.row("j")
    await parts.add_promise("j")

    result, rec = await parts.settler.settle(
        "j", CANCELED, by="callback", note=note, attempt=1, seen=seen
    )

    assert (result, rec.state) == ("gone", "canceled")
    assert (await parts.promise("j")).state == "pending"
    assert await types_and_results(parts) == [
        ("callback", "accepted"),
        ("finished", None),
        ("callback", "gone"),
    ]


@pytest.mark.parametrize(
    ("second", "result"), [(DONE, "duplicate"), (OTHER, "conflict"), (FAILED, "conflict")]
)
async def test_a_settle_whose_caller_saw_the_job_ended_is_judged_by_the_row_alone(
    parts: Parts, monkeypatch: pytest.MonkeyPatch, second: Outcome, result: str
):
    """A callback that read the job ended at its attempt (a duplicate, a
    conflict) is judged against the row it read, its note filed after the
    end, and asks nothing of the promise: the SDK's answer to a settle of
    a settled promise is its value, decoded on the loop (0.5 s a megabyte
    of floats at the double's ends). The promise keeps the first value."""
    await parts.add_job("j", state="running")
    await parts.add_promise("j")
    await parts.settler.settle("j", DONE, by="callback", note=call_note)
    seen = await parts.row("j")
    asked: list[str] = []
    for name in ("resolve", "get"):
        real = getattr(parts.resonate.promises, name)

        async def watched(*args: Any, _real: Any = real, _name: str = name, **kw: Any) -> Any:
            asked.append(_name)
            return await _real(*args, **kw)

        monkeypatch.setattr(parts.resonate.promises, name, watched)

    got, rec = await parts.settler.settle(
        "j", second, by="callback", note=call_note, attempt=1, seen=seen
    )

    assert (got, rec.state, rec.result) == (result, "succeeded", {"rows": 3})
    assert asked == []
    monkeypatch.undo()
    assert (await parts.promise("j")).value.data["result"] == {"rows": 3}
    assert await types_and_verdicts(parts) == [
        ("callback", "accepted"),
        ("finished", None),
        ("callback", result),
    ]


async def test_a_settle_after_the_end_with_nothing_to_file_reads_the_attempt_alone(
    parts: Parts, monkeypatch: pytest.MonkeyPatch
):
    """A repeat the callback endpoint leaves out (no note) writes nothing,
    and, the job still at the attempt its caller read, reads nothing of the
    row but its attempt: the row it returns is the one it was given (a
    large row's decode, again, was most of such a repeat's time)."""
    await parts.add_job("j", state="running")
    await parts.add_promise("j")
    await parts.settler.settle("j", DONE, by="callback", note=call_note)
    seen = await parts.row("j")
    rows: list[str] = []
    monkeypatch.setattr(parts.jobs, "get", lambda job_id: rows.append(job_id))

    got, rec = await parts.settler.settle(
        "j", OTHER, by="callback", note=lambda _: None, attempt=1, seen=seen
    )

    assert (got, rows) == ("conflict", [])
    assert rec is seen
    monkeypatch.undo()
    assert (await parts.row("j")).events == seen.events


@pytest.mark.parametrize("left_out", [False, True])
async def test_a_settle_whose_caller_saw_an_attempt_ended_that_was_retried_files_nothing(
    parts: Parts, left_out: bool
):
    """Retried between the callback's read and its settle: the settle of the
    ended attempt files no note under the new one, and returns the row as
    it is now, so that its caller answers `gone`; also when it has no note
    to file (a repeat the endpoint leaves out: found by a review). The note
    is not even asked how the settle compared: asking counts a repeat left
    out as its verdict (`tether_callbacks_total`), and the caller answers
    and counts `gone`."""
    await parts.add_job("j", state="running")
    await parts.add_promise("j")
    await parts.settler.settle("j", FAILED, by="callback", note=call_note)
    seen = await parts.row("j")
    retried = await parts.jobs.retry("j", 1, now_ms() + 60_000, now_ms(), NewEvent("retried", {}))
    assert retried is not None and retried.attempt == 2
    asked: list[str] = []

    def note(result: str) -> NewEvent | None:
        asked.append(result)
        return None if left_out else call_note(result)

    got, rec = await parts.settler.settle(
        "j", FAILED, by="callback", note=note, attempt=1, seen=seen
    )

    assert (got, rec.attempt, rec.state) == ("duplicate", 2, retried.state)
    assert asked == ["accepted"]  # (what a win would note: asked first, counting nothing)
    assert [e for e in await types_and_verdicts(parts) if e[0] == "callback"] == [
        ("callback", "accepted")
    ]


@pytest.mark.parametrize("left_out", [False, True])
async def test_a_settle_whose_caller_saw_a_job_since_made_again_under_its_id_finds_none(
    parts: Parts, left_out: bool
):
    """The job ended, was deleted (retention) and made again under its id
    between a callback's read and its settle: the old URL's settle is not
    found, and shows nothing of the new job (a review: it returned the new
    job's row, which the callback answers with)."""
    await parts.add_job("j", state="running", external={"who": "old"})
    await parts.add_promise("j")
    await parts.settler.settle("j", DONE, by="callback", note=call_note)
    seen = await parts.row("j")
    assert await parts.jobs.delete_finished(now_ms() + 1, 10)
    await parts.add_job(
        "j", state="running", external={"who": "new"}, created_at=seen.created_at + 1
    )
    note = (lambda _: None) if left_out else call_note

    with pytest.raises(NotFound):
        await parts.settler.settle("j", DONE, by="callback", note=note, attempt=1, seen=seen)

    assert (await parts.row("j")).state == "running"
    assert await types_and_verdicts(parts) == []


async def types_and_verdicts(parts: Parts) -> list[tuple[str, Any]]:
    _, events = await parts.jobs.events_after("j", 0, 100)
    return [(e.type, e.data.get("verdict")) for e in events]


async def test_a_queued_job_is_ended_in_the_index(parts: Parts):
    await parts.add_job("j")
    await parts.jobs.db.execute("UPDATE tether_jobs SET state = 'queued' WHERE id = 'j'", ())

    result, rec = await parts.settler.settle("j", CANCELED, by="cancel")

    assert (result, rec.state) == ("accepted", "canceled")


async def test_a_settle_of_an_earlier_attempt_leaves_the_retried_job_alone(parts: Parts):
    """Attempt 1's settle, late: the job is at attempt 2 (its promise not yet
    made), so attempt 1's promise is settled and the row is left alone."""
    await parts.add_job("j", state="running")
    await parts.add_promise("j")
    await parts.settler.settle("j", FAILED, by="callback")
    again = NewEvent("retried", {"previous": {"state": "failed"}})
    assert await parts.jobs.retry("j", 1, now_ms() + 60_000, now_ms(), again)
    said: list[str] = []

    result, rec = await parts.settler.settle("j", DONE, by="callback", note=noting(said), attempt=1)
    assert result == "conflict"
    assert (rec.attempt, rec.state) == (2, "pending")
    assert said == ["accepted", "conflict"]  # no late note: the job is at another attempt

    # attempt 2, whose promise is not born: ended in the index, as attempt 2
    result, rec = await parts.settler.settle("j", FAILED, by="trigger", attempt=2)
    assert (result, rec.attempt, rec.state) == ("accepted", 2, "failed")
    # and attempt 2's settle of its unborn promise is gone once the job moved on
    assert await parts.jobs.retry("j", 2, now_ms() + 60_000, now_ms(), again)
    result, rec = await parts.settler.settle("j", CANCELED, by="cancel", attempt=2)
    assert (result, rec.attempt, rec.state) == ("gone", 3, "pending")


async def test_a_settle_of_attempt_two_settles_its_own_promise(parts: Parts):
    await parts.add_job("j", state="running")
    await parts.add_promise("j")
    await parts.settler.settle("j", FAILED, by="callback")
    again = NewEvent("retried", {"previous": {"state": "failed"}})
    await parts.jobs.retry("j", 1, now_ms() + 60_000, now_ms(), again)
    second = callback_promise_id("j", 2)
    await parts.resonate.promises.create(second, now_ms() + 60_000, Value(data=None), {})

    result, rec = await parts.settler.settle("j", DONE, by="callback")  # the attempt it is at

    assert (result, rec.attempt, rec.state) == ("accepted", 2, "succeeded")
    assert (await parts.resonate.promises.get(second)).value.data["status"] == "succeeded"
    assert (await parts.promise("j")).value.data["status"] == "failed"


async def test_a_result_nested_past_the_bound_is_kept_as_its_marker_masked(parts: Parts):
    """From a backend's status check, say: deeper than `MAX_DEPTH` it was
    masked recursively, past Python's limit (found in an audit, 2026-12-04)."""
    signer = CallbackSigner("s" * 32, "http://t")
    settler = Settler(parts.resonate, parts.jobs, tokens=signer.job_tokens)
    await parts.add_job("j", state="running")
    await parts.add_promise("j")
    token = signer.token(callback_promise_id("j", 1))
    value: Any = f"sent {token}"
    for _ in range(2_000):
        value = {"v": [value]}

    result, rec = await settler.settle("j", Outcome(status="succeeded", result=value), "check")

    assert (result, rec.state) == ("accepted", "succeeded")
    assert rec.result["truncated"] is True and rec.result["nested_deeper_than"] == MAX_DEPTH
    assert token[:8] not in str(rec.result) and "sent" not in rec.result["preview"]
    stored = (await parts.promise("j")).value.data
    assert stored["result"] == rec.result


async def test_every_outcome_is_cut_to_the_result_bound_before_it_is_stored(parts: Parts):
    settler = Settler(parts.resonate, parts.jobs, max_result_bytes=64)
    await parts.add_job("j", state="running")
    await parts.add_promise("j")
    big = Outcome(status="succeeded", result={"rows": "x" * 1000})

    result, rec = await settler.settle("j", big, by="callback")

    assert result == "accepted"
    assert rec.result == bound_result(big.result, 64) != big.result
    assert (await parts.promise("j")).value.data["result"] == rec.result


async def test_no_outcome_keeps_a_callback_token_whole_or_cut(parts: Parts):
    """A run's error may quote the callback URL it was given (a notebook's
    `HTTPError … for url: <callback_url>`), under the current secret or a
    previous one; a result's preview may end inside a token. Every outcome is
    stored without them, whoever reports it."""
    signer = CallbackSigner("new-secret", "http://t", previous=["old-secret"])
    settler = Settler(parts.resonate, parts.jobs, max_result_bytes=400, tokens=signer.job_tokens)
    await parts.add_job("j", state="running")
    await parts.add_promise("j")
    new, old = signer.tokens(callback_promise_id("j", 1))
    url = signer.url(callback_promise_id("j", 1))
    failed = Outcome(
        status="failed",
        result={"failed_tasks": [{"error": f"502 for url: {url}", old: ["a", old[:20]]}]},
        error=ErrorInfo(message=f"HTTPError for url: {url}, then ...?token={old}", type=new),
    )

    result, rec = await settler.settle("j", failed, by="status_check")

    assert result == "accepted"
    stored = [rec.result, rec.error, (await parts.promise("j")).value.data]
    text = str(stored)
    assert new[:MIN_CUT] not in text and old[:MIN_CUT] not in text
    assert rec.error == ErrorInfo(
        message="HTTPError for url: http://t/callbacks/j%3A1?token=***, then ...?token=***",
        type="***",
    )
    assert rec.result == {
        "failed_tasks": [
            {"error": "502 for url: http://t/callbacks/j%3A1?token=***", "***": ["a", "***"]}
        ]
    }
    # A long result is bounded after its token is masked: its preview shows the mask.
    await parts.add_job("k", state="running")
    await parts.add_promise("k")
    token = signer.token(callback_promise_id("k", 1))
    long = Outcome(status="succeeded", result="x" * 120 + token + "y" * 1000)
    _, cut = await settler.settle("k", long, by="callback")
    assert cut.result["truncated"] and token[:MIN_CUT] not in str(cut.result)
    assert cut.result["preview"].startswith("x" * 120 + "***y"), cut.result


async def test_a_cancels_reason_that_quotes_the_callback_url_is_kept_without_its_token(
    parts: Parts,
):
    """A settle's event (a cancel's reason) is filed in the history and kept
    in the promise's value (`settled_value`'s note): both without the token."""
    signer = CallbackSigner("new-secret", "http://t")
    settler = Settler(parts.resonate, parts.jobs, tokens=signer.job_tokens)
    await parts.add_job("j", state="running")
    await parts.add_promise("j")
    url = signer.url(callback_promise_id("j", 1))
    token = signer.token(callback_promise_id("j", 1))
    asked = NewEvent("cancel_requested", {"reason": f"stuck; it was told {url}"})
    canceled = Outcome(status="canceled", error=ErrorInfo(message="canceled", type="canceled"))

    result, _ = await settler.settle(
        "j", canceled, by="cancel", note=lambda r: asked if r == "accepted" else None
    )

    assert result == "accepted"
    _, events = await parts.jobs.events_after("j", 0, 10)
    value = (await parts.promise("j")).value.data
    assert token[:MIN_CUT] not in str([e.data for e in events]) + str(value)
    [filed] = [e for e in events if e.type == "cancel_requested"]
    assert filed.data["reason"] == "stuck; it was told http://t/callbacks/j%3A1?token=***"
    assert value["note"]["data"] == filed.data


# ── jobs no workflow will finish ─────────────────────────────────────────────


def orphans_of(parts: Parts) -> list[tuple[str, str]]:
    """Record `Settler.on_orphan`'s calls on `parts.settler`: (job, state)."""
    seen: list[tuple[str, str]] = []

    async def orphan(rec: JobRecord) -> None:
        seen.append((rec.id, rec.state))

    parts.settler.on_orphan = orphan
    return seen


async def test_a_job_ended_before_its_workflow_made_its_promise_is_finished_here(parts: Parts):
    """A start lost to a crash, then a cancel: no workflow will ever finish the
    job, so the settle hands it to `on_orphan` (the service runs the finish)."""
    seen = orphans_of(parts)
    await parts.add_job("j", state="pending")
    result, rec = await parts.settler.settle("j", CANCELED, by="cancel")
    assert (result, rec.state) == ("accepted", "canceled")
    assert seen == [("j", "canceled")]
    again, _ = await parts.settler.settle("j", CANCELED, by="cancel")  # ended already
    assert again == "gone" and seen == [("j", "canceled")]


async def test_a_job_whose_workflow_is_slow_to_make_its_promise_is_not_finished_here(
    parts: Parts,
):
    """Its root waits (the workflow runs, or will after a restart): the
    trigger finds the job ended and the workflow's finish tells the plugins.
    Finishing it here too told them twice (a 0.3 s timeout under a slow CI)."""
    seen = orphans_of(parts)
    await parts.add_job("j", state="pending")
    await parts.resonate.promises.create("j", now_ms() + 60_000, Value(data=None), {})
    result, rec = await parts.settler.settle("j", TIMED_OUT, by="timeout")
    assert (result, rec.state) == ("accepted", "timed_out")
    assert seen == []


async def test_a_job_with_its_promise_or_queued_is_not_finished_here(parts: Parts):
    seen = orphans_of(parts)
    await parts.add_job("p", state="running")
    await parts.add_promise("p")  # its workflow waits on it and finishes the job
    await parts.settler.settle("p", DONE, by="callback")
    await parts.add_job("q", state="queued")
    await parts.jobs.db.execute("UPDATE tether_jobs SET queued_at = 1 WHERE id = 'q'", ())
    await parts.settler.settle("q", CANCELED, by="cancel")  # the service's listener tells
    assert (await parts.row("q")).state == "canceled"
    assert seen == []


@pytest.mark.parametrize("root", ["gone", "timed out", "waiting"])
async def test_a_job_the_store_timed_out_is_finished_here_when_its_workflow_is_over(
    parts: Parts, root: str
):
    """The service was down past the deadline and the root's grace: the store
    timed out the callback promise and the workflow's root, which will never
    run the finish. With the root still waiting, the workflow finishes it."""
    seen = orphans_of(parts)
    await parts.add_job("j", state="running", external={"run": 1})
    await parts.add_promise("j", timeout_ms=1)
    if root != "gone":
        await parts.resonate.promises.create(
            "j", now_ms() + (1 if root == "timed out" else 60_000), Value(data=None), {}
        )
    await asyncio.sleep(0.05)
    _, rec = await parts.settler.settle("j", TIMED_OUT, by="timeout")
    assert rec.state == "timed_out"
    assert seen == ([] if root == "waiting" else [("j", "timed_out")])
    assert (rec.stop_due is None) == (root == "waiting")  # its workflow's finish stops the run


@pytest.mark.parametrize("wait_stop", [False, True])
async def test_an_orphans_run_stop_is_due_a_lease_from_its_end_and_run_apart(
    parts: Parts, monkeypatch: pytest.MonkeyPatch, wait_stop: bool
):
    """A job the store timed out, its workflow over: the write that ends it
    makes its run's stop due a lease from now (`stop_lease_ms`, 30 s
    unless wired), held by this process, and its finish runs in a task of
    the service's (`spawn`), unless the caller awaits it (`wait_stop`, the
    watchdog). A job with no run has no stop due, and its finish is awaited."""
    seen = orphans_of(parts)
    spawned: list[Any] = []
    parts.settler.spawn = spawned.append
    now = now_ms()
    monkeypatch.setattr(core.settle, "now_ms", lambda: now)
    await parts.add_job("j", state="running", external={"run": 1})
    await parts.add_promise("j", timeout_ms=1)
    await asyncio.sleep(0.05)
    given = {"wait_stop": True} if wait_stop else {}  # False is the default
    _, rec = await parts.settler.settle("j", TIMED_OUT, by="timeout", **given)
    assert rec.stop_due == now + 30_000 == (await parts.row("j")).stop_due
    if wait_stop:
        assert (spawned, seen) == ([], [("j", "timed_out")])
    else:
        assert seen == [] and len(spawned) == 1
        await spawned[0]
        assert seen == [("j", "timed_out")]

    await parts.add_job("p", state="pending")  # no run: nothing due, the finish awaited
    _, rec = await parts.settler.settle("p", CANCELED, by="cancel")
    assert rec.stop_due is None and seen[-1] == ("p", "canceled")
    assert len(spawned) == (0 if wait_stop else 1)


async def test_an_unborn_attempts_end_awaits_its_finish_for_the_watchdog_whatever_is_due(
    parts: Parts,
):
    """Attempt 1 was finished here with its run's stop due (held by a task
    of the service's, still under way) when the job was retried (by a host
    of an earlier release: a retry now waits for the stop); attempt 2
    times out before its workflow made its promise. The row still carries
    attempt 1's stop (`stop_due`), but the watchdog (`wait_stop`) awaits
    the finish it hands over, as it does any other."""
    seen = orphans_of(parts)
    spawned: list[Any] = []
    parts.settler.spawn = spawned.append
    await parts.add_job("j", state="running", external={"run": 1})
    await parts.add_promise("j", timeout_ms=1)
    await asyncio.sleep(0.05)
    _, rec = await parts.settler.settle("j", TIMED_OUT, by="timeout")
    assert rec.stop_due is not None and len(spawned) == 1 and seen == []
    again = NewEvent("retried", {"previous": {"state": "timed_out"}})
    assert await parts.retry_as_before("j", 1, again)  # (a retry now waits for the stop)

    _, rec = await parts.settler.settle("j", TIMED_OUT, by="timeout", attempt=2, wait_stop=True)

    assert (rec.attempt, rec.state, rec.stop_due) == (2, "timed_out", rec.stop_due)
    assert rec.stop_due is not None and rec.stop_attempt == 1  # attempt 1's, still
    assert (len(spawned), seen) == (1, [("j", "timed_out")])
    spawned[0].close()


@pytest.mark.parametrize("root", ["gone", "waiting"])
async def test_a_later_attempt_the_store_timed_out_is_asked_of_its_own_workflow(
    parts: Parts, root: str
):
    """Attempt 2's wait timed out by the store: whether a workflow will finish
    it is its own root's to say ("j~2"), not attempt 1's ("j", long over).
    Asking attempt 1's finished the job here while attempt 2's workflow
    finished it too: the backend's cancel and `tether_job_finished` twice."""
    seen = orphans_of(parts)
    await parts.add_job("j", state="running", external={"run": 1})
    await parts.jobs.db.execute("UPDATE tether_jobs SET attempt = 2 WHERE id = 'j'", ())
    await parts.resonate.promises.create("j", now_ms() + 60_000, Value(data=None), {})
    await parts.resonate.promises.resolve("j", Value(data={"status": "failed"}))
    await parts.resonate.promises.create(
        callback_promise_id("j", 2), now_ms() + 1, Value(data=None), {}
    )
    if root == "waiting":
        await parts.resonate.promises.create(
            root_promise_id("j", 2), now_ms() + 60_000, Value(data=None), {}
        )
    await asyncio.sleep(0.05)
    _, rec = await parts.settler.settle("j", TIMED_OUT, by="timeout", attempt=2)
    assert (rec.state, rec.attempt) == ("timed_out", 2)
    assert seen == ([] if root == "waiting" else [("j", "timed_out")])


async def test_a_finish_without_a_workflow_that_fails_is_logged_and_the_end_stands(
    parts: Parts, caplog: pytest.LogCaptureFixture
):
    errors = iter([StoreUnavailable("the index did not answer"), RuntimeError("a plugin bug")])

    async def broken(rec: JobRecord) -> None:
        raise next(errors)

    parts.settler.on_orphan = broken
    for job_id in ("j", "k"):
        await parts.add_job(job_id, state="pending")
        with logs_of("tether") as logs:
            result, rec = await parts.settler.settle(job_id, CANCELED, by="cancel")
        assert (result, rec.state) == ("accepted", "canceled")
        said = "the index did not answer" if job_id == "j" else "RuntimeError"  # never its text
        assert logs.lines == [
            f"WARNING job {job_id}: finishing it without its workflow failed: {said}"
        ]
    assert [getattr(r, "job_id", None) for r in caplog.records] == ["j", "k"]
    # None wired (a process that runs no workflow, the default): nothing to say
    settler = Settler(parts.resonate, parts.jobs)
    await parts.add_job("n", state="pending")
    with logs_of("tether") as logs:
        await settler.settle("n", CANCELED, by="cancel")
    assert logs.lines == []


async def test_only_a_timeout_by_the_store_files_a_timed_out_event(parts: Parts):
    await parts.add_job("j", state="running")
    await parts.add_promise("j")
    await parts.settler.settle("j", DONE, by="callback")
    _, events = await parts.jobs.events_after("j", 0, 10)
    assert [e.type for e in events] == ["finished"]


async def test_a_salted_jobs_tokens_are_masked_when_its_salt_is_given(parts: Parts):
    signer = CallbackSigner("a-secret", "http://t")
    settler = Settler(parts.resonate, parts.jobs, tokens=signer.job_tokens)
    for job_id, salt in (("plain", None), ("salted", "s4lt")):
        await parts.add_job(job_id, state="running")
        await parts.add_promise(job_id)
        url = signer.url(callback_promise_id(job_id), salt)
        failed = Outcome(status="failed", error=ErrorInfo(message=f"for url: {url}", type="x"))
        _, rec = await settler.settle(job_id, failed, by="callback", attempt=1, salt=salt)
        assert rec.error is not None and rec.error.message.endswith("?token=***"), rec.error


async def test_a_large_result_is_kept_aside_and_a_repeat_of_it_is_a_duplicate(
    parts: Parts, monkeypatch
):
    """A result over `ASIDE_BYTES` that quotes the token in `\\u` escapes
    is worked on the aside thread (`core.aside`: its depth, its mask, its
    bound), not on the event loop; kept masked; and the same callback again
    is judged against what was kept: a duplicate. A small one is worked
    where it stands."""
    ran_on = threads_of(monkeypatch, core.settle, "_kept")
    signer = CallbackSigner("a-secret", "http://t")
    settler = Settler(parts.resonate, parts.jobs, tokens=signer.job_tokens)
    await parts.add_job("j", state="running")
    await parts.add_promise("j")
    [token] = signer.job_tokens("j", 1, None)
    escaped = "".join(f"\\u{ord(c):04x}" for c in token)
    lines = 2 * ASIDE_BYTES // len(escaped)
    big = Outcome(status="succeeded", result={"log": "\n".join([f"sent {escaped}"] * lines)})
    result, rec = await settler.settle("j", big, by="callback", attempt=1)
    assert (result, rec.state) == ("accepted", "succeeded")
    assert rec.result == {"log": "\n".join([f"sent {MASK}"] * lines)}
    again, rec = await settler.settle("j", big, by="callback", attempt=1, seen=rec)
    assert again == "duplicate"
    assert ran_on == ["tether-aside_0"] * 2
    await parts.add_job("k", state="running")
    await parts.add_promise("k")
    await settler.settle("k", DONE, by="callback", attempt=1)
    assert ran_on[-1] == threading.current_thread().name


async def test_a_settle_that_notes_nothing_is_masked_as_any(parts: Parts):
    """A note that files nothing for a result, with the job's tokens to mask."""
    signer = CallbackSigner("a-secret", "http://t")
    settler = Settler(parts.resonate, parts.jobs, tokens=signer.job_tokens)
    await parts.add_job("j", state="running")
    await parts.add_promise("j")
    result, rec = await settler.settle("j", DONE, by="callback", note=lambda result: None)
    assert (result, rec.state) == ("accepted", "succeeded")
    assert [e.type for e in (await parts.jobs.events_after("j", 0, 10))[1]] == ["finished"]


async def test_a_settle_that_lost_and_ends_the_job_files_the_winners_note_first(parts: Parts):
    """The winner's index write never happened (it answered too late): the
    settle that lost ends the job from the winner's value, its note first."""
    await parts.add_job("j", state="running")
    await parts.add_promise("j")
    note = NewEvent("callback", {"status": "succeeded"})
    won = Value(data=settled_value(DONE, "callback", "n", note))
    await parts.resonate.promises.resolve(callback_promise_id("j"), won)
    result, rec = await parts.settler.settle("j", CANCELED, by="cancel", attempt=1)
    assert (result, rec.state) == ("conflict", "succeeded")
    _, events = await parts.jobs.events_after("j", 0, 10)
    assert [(e.type, e.data) for e in events] == [
        ("callback", {"status": "succeeded"}),
        ("finished", {"state": "succeeded"}),
    ]


async def test_a_settle_that_finds_the_job_ended_otherwise_is_noted_as_gone(parts: Parts):
    """Before its promise existed, the job was canceled with another reason:
    a cancel now is `gone`, and its note says so."""
    await parts.add_job("j", state="pending")
    other = Outcome(status="canceled", error=ErrorInfo(message="by someone", type="canceled"))
    await parts.jobs.end("j", other, now_ms(), ("pending",), attempt=1)

    def note(result: str) -> NewEvent:
        return NewEvent("cancel_requested", {"verdict": result})

    mine = Outcome(status="canceled", error=ErrorInfo(message="by me", type="canceled"))
    result, _ = await parts.settler.settle("j", mine, by="cancel", note=note, attempt=1)
    assert result == "gone"
    _, events = await parts.jobs.events_after("j", 0, 10)
    assert [(e.type, e.data) for e in events][-1] == ("cancel_requested", {"verdict": "gone"})


async def test_a_settle_of_a_job_that_is_not_there_names_it(parts: Parts):
    with pytest.raises(NotFound, match=r"^no job 'nope'$"):
        await parts.settler.settle("nope", DONE, by="callback", attempt=1)
