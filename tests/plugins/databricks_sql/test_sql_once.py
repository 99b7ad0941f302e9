"""A statement is submitted once, even when the answer to its submission is
lost: the Statement Execution API takes no idempotency token, so each
statement carries a query tag naming its attempt, and before each try (and
to cancel an unrecorded statement) Tether looks for it in the warehouse's
query history. The real service and the real databricks-sdk client against
the fake API (tests/plugins/databricks_sql/fake_sql.py); the crash case
kills the real `tether serve` process."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from core.errors import BackendError
from core.models import Job, Trigger
from core.workflow import callback_promise_id
from plugins import databricks_sql
from plugins.databricks_sql import DatabricksSql, tag_value
from tests.conftest import HOLD, eventually
from tests.plugins.databricks_sql.fake_sql import HISTORY, STATEMENTS, WAREHOUSE, FakeSqlApi
from tests.plugins.databricks_sql.test_databricks_sql import (
    FAST,
    events_of,
    start_job,
    statement_of,
)
from tests.process import Hold, TetherProcess, killed_inside, wait_for

PARAMS = {"warehouse_id": WAREHOUSE, "statement": "MERGE INTO t USING s ON t.k = s.k", **FAST}


async def test_a_statement_whose_answer_was_lost_is_found_not_run_again(
    start_sql, sql_api: FakeSqlApi
):
    """Databricks accepted the statement and the connection dropped before
    its answer: the SDK does not send it again, Tether's next try finds it
    in the query history by its tag, and the job follows that statement."""
    dropped = sql_api.drop()
    svc = await start_sql()
    await start_job(svc, "merge", PARAMS)

    statement_id = await statement_of(svc, sql_api, "merge")
    assert dropped.reached.is_set()
    assert len(sql_api.calls(STATEMENTS)) == 1
    assert list(sql_api.statements) == [statement_id]
    assert len(sql_api.calls(HISTORY, "GET")) == 2  # before each try
    [failed] = [e for e in await events_of(svc, "merge") if e["type"] == "trigger_failed"]
    assert failed["data"]["retry_in"] is not None  # a lost answer is tried again

    sql_api.succeed(statement_id, [("rows", "BIGINT")], [["3"]])
    job = await svc.wait_state("merge", "succeeded")
    assert (job["result"]["statement_id"], job["result"]["rows"]) == (statement_id, [["3"]])
    await eventually(lambda: len(sql_api.statements) == 1, holds=HOLD)


async def test_a_statement_of_another_job_is_not_taken(start_sql, sql_api: FakeSqlApi):
    """Only a statement tagged with this attempt's key counts: an earlier
    job's statement, with the same text on the same warehouse, does not."""
    svc = await start_sql()
    await start_job(svc, "first", PARAMS)
    first = await statement_of(svc, sql_api, "first")
    await start_job(svc, "second", PARAMS)
    second = await statement_of(svc, sql_api, "second")
    assert first != second and len(sql_api.statements) == 2
    tags = [s.request["query_tags"][0] for s in sql_api.statements.values()]
    assert tags == [
        {"key": "tether", "value": tag_value(callback_promise_id("first"))},
        {"key": "tether", "value": tag_value(callback_promise_id("second"))},
    ]


async def test_a_retried_job_runs_a_new_statement_not_the_failed_attempts(
    start_sql, sql_api: FakeSqlApi
):
    """`POST /jobs/{id}/retry` of a failed job: attempt 2 carries its own tag,
    so the look does not take attempt 1's statement for it."""
    svc = await start_sql()
    await start_job(svc, "again", PARAMS)
    first = await statement_of(svc, sql_api, "again")
    sql_api.fail(first, "[DELTA_CONCURRENT_APPEND] try again", "CONCURRENT_APPEND")
    await svc.wait_state("again", "failed")

    response = await svc.client.post("/jobs/again/retry")
    assert response.status_code == 200, response.text

    async def second_recorded() -> Any:
        job = await svc.job("again")
        return job["attempt"] == 2 and (job["external"] or {}).get("statement_id")

    second = await eventually(second_recorded)
    assert second != first and len(sql_api.statements) == 2
    assert sql_api.statements[second].request["query_tags"][0] == {
        "key": "tether",
        "value": tag_value(callback_promise_id("again", 2)),
    }
    sql_api.succeed(second, [("n", "INT")], [["1"]])
    job = await svc.wait_state("again", "succeeded")
    assert job["attempt"] == 2


@pytest.mark.parametrize(
    ("status", "code", "waits"),
    [
        (429, "REQUEST_LIMIT_EXCEEDED", False),
        (503, "TEMPORARILY_UNAVAILABLE", True),
        (503, "REQUEST_LIMIT_EXCEEDED", True),  # a throttling code on a 5xx: past the API, perhaps
    ],
)
async def test_a_throttled_submit_is_tried_again_without_waiting_for_the_history(
    start_sql,
    sql_api: FakeSqlApi,
    monkeypatch: pytest.MonkeyPatch,
    status: int,
    code: str,
    waits: bool,
):
    """A 429 is Databricks refusing the request, nothing started: the next
    try submits at once. It was read as a lost answer, and the job waited
    `TETHER_DATABRICKS_SQL_SETTLE` (30 s) for the query history, with a
    `statement_unsure` event (found by an exploratory QA pass). A 503 may
    come from past the API: still waited for."""
    monkeypatch.setenv("TETHER_DATABRICKS_SQL_SETTLE", "3")  # past the 1 s Retry-After
    sql_api.refuse(STATEMENTS, status, code, method="POST")
    svc = await start_sql()
    await start_job(svc, "busy", PARAMS)

    await statement_of(svc, sql_api, "busy")
    failed = [e["data"] for e in await events_of(svc, "busy") if e["type"] == "trigger_failed"]
    assert failed[0]["error"]["type"] == code
    assert ("statement_unsure" in [f["error"]["type"] for f in failed]) is waits, failed
    assert len(sql_api.statements) == 1


async def test_a_lost_statement_the_history_lists_late_is_waited_for_not_run_again(
    start_sql, sql_api: FakeSqlApi, monkeypatch: pytest.MonkeyPatch
):
    """The query history lists a statement a while after it was made: a try
    after a lost answer that does not find it yet fails with `retry_after`
    rather than submit again, until `TETHER_DATABRICKS_SQL_SETTLE` is over; the next finds it,
    pages through newer statements of other jobs to reach it (the page
    token alone, which Databricks wants), and takes it."""
    monkeypatch.setenv("TETHER_DATABRICKS_SQL_SETTLE", "2")
    monkeypatch.setattr(databricks_sql, "HISTORY_PAGE", 1)
    sql_api.history_delay = 0.5
    dropped = sql_api.drop()
    svc = await start_sql()
    await start_job(svc, "late", PARAMS)
    await eventually(dropped.reached.is_set)
    for other in ("a", "b"):  # newer: the late one's is on the third page
        await start_job(svc, other, PARAMS)
        await statement_of(svc, sql_api, other)

    statement_id = await statement_of(svc, sql_api, "late")
    assert len(sql_api.statements) == 3
    assert len(sql_api.calls(STATEMENTS)) == 3  # one each
    failed = [e for e in await events_of(svc, "late") if e["type"] == "trigger_failed"]
    assert [e["data"]["error"]["type"] for e in failed][-1] == "statement_unsure"
    pages = [c.query for c in sql_api.calls(HISTORY, "GET") if "page_token" in c.query]
    assert pages and not any(k.startswith("filter_by.") for q in pages for k in q)
    sql_api.succeed(statement_id, [("n", "INT")], [["1"]])
    await svc.wait_state("late", "succeeded")


async def test_a_repeat_is_canceled_and_a_statement_stamped_minutes_early_is_found(
    start_sql, sql_api: FakeSqlApi
):
    """Two statements carry the job's tag (one was repeated before anything
    could find it): the first is the job's, the repeat is canceled. The
    first was stamped four minutes before the job was made (Databricks'
    clock behind this host's): still found."""
    tag = {"key": "tether", "value": tag_value(callback_promise_id("twice"))}
    request = {"warehouse_id": WAREHOUSE, "statement": PARAMS["statement"], "query_tags": [tag]}
    now_ms = int(time.time() * 1000)
    first = sql_api.add_statement(request, started_ms=now_ms - 240_000)
    repeat = sql_api.add_statement(request, started_ms=now_ms - 1_000)
    svc = await start_sql()
    await start_job(svc, "twice", PARAMS)

    assert await statement_of(svc, sql_api, "twice") == first.statement_id
    await eventually(lambda: repeat.state == "CANCELED")
    assert first.state == "PENDING"
    assert sql_api.calls(STATEMENTS) == []  # nothing submitted


async def test_an_unrecorded_statement_is_canceled_when_the_job_fails(
    start_sql, sql_api: FakeSqlApi
):
    """The only try's answer was lost: the job fails by its trigger, and its
    finish finds the statement by its tag and cancels it, rather than leave
    it running with no job to show it."""
    sql_api.drop()
    svc = await start_sql(trigger_attempts=1)
    await start_job(svc, "once", PARAMS)

    job = await svc.wait_state("once", "failed", timeout=30)
    assert job["external"] is None
    [statement] = sql_api.statements.values()
    await eventually(lambda: statement.state == "CANCELED", timeout=20)
    assert len(sql_api.calls(f"{STATEMENTS}/{statement.statement_id}/cancel")) >= 1
    assert len(sql_api.calls(STATEMENTS)) == 1


async def test_a_query_history_that_cannot_be_read_does_not_stop_the_job(
    start_sql, sql_api: FakeSqlApi, logs: Any
):
    """A refusal of the look (no permission, no such API) submits the
    statement as before and says so in the log; a failure worth retrying
    fails the try, which is tried again (looking again first)."""
    sql_api.refuse(HISTORY, 403, "PERMISSION_DENIED")
    svc = await start_sql()
    await start_job(svc, "blind", PARAMS)
    await statement_of(svc, sql_api, "blind")
    assert "the query history cannot be read" in logs.text
    assert len(sql_api.calls(HISTORY, "GET")) == 1

    sql_api.refuse(HISTORY, 503, "TEMPORARILY_UNAVAILABLE")
    await start_job(svc, "later", PARAMS)
    await statement_of(svc, sql_api, "later")
    assert len(sql_api.calls(HISTORY, "GET")) == 3  # refused once, then read
    assert len(sql_api.statements) == 2
    [failed] = [e for e in await events_of(svc, "later") if e["type"] == "trigger_failed"]
    assert failed["data"]["error"]["type"] == "TEMPORARILY_UNAVAILABLE"


async def test_a_workspace_that_drops_query_tags_is_said_once(
    start_sql, sql_api: FakeSqlApi, logs: Any
):
    """Where the query history lists Tether's statements without their tags
    (a workspace without the feature), nothing can be found again: the log
    says so, once, as soon as a look lists a statement this process sent."""
    sql_api.drop_tags = True
    svc = await start_sql()
    for job_id in ("one", "two", "three"):
        await start_job(svc, job_id, PARAMS)
        await statement_of(svc, sql_api, job_id)
    assert logs.text.count("this workspace does not keep query tags") == 1


async def test_a_workspace_that_keeps_them_says_nothing(start_sql, sql_api: FakeSqlApi, logs: Any):
    svc = await start_sql()
    for job_id in ("one", "two"):
        await start_job(svc, job_id, PARAMS)
        await statement_of(svc, sql_api, job_id)
    assert "query tags" not in logs.text
    assert "databricks_sql: job two started statement" in logs.text


def a_trigger(job_id: str, *, replayed: bool, created: datetime | None = None) -> Trigger:
    """What the core hands `databricks_sql`'s trigger for attempt 1 of a job
    made now (or at `created`)."""
    now = (created or datetime.now(UTC)).isoformat()
    job = {"id": job_id, "backend": "databricks_sql", "state": "pending", "params": PARAMS}
    job |= {"metadata": {}, "timeout": 60.0, "created_at": now, "updated_at": now}
    job |= {"external": None, "result": None, "error": None, "finished_at": None}
    promise_id = callback_promise_id(job_id)
    return Trigger(
        job=msgspec.convert(job, Job),
        params=msgspec.convert(PARAMS, DatabricksSql().params_type),
        promise_id=promise_id,
        callback_url="http://tether.test/callbacks/x",
        idempotency_key=promise_id,
        replayed=replayed,
    )


async def test_another_deployments_statement_under_the_same_job_id_is_not_taken(
    sql_api: FakeSqlApi,
):
    """Two Tether deployments sharing a warehouse (and its user) both have a
    job `nightly`: their statements carry the same key tag, and only the
    job's mark (`tether_mark`: its creation time) tells them apart. Each
    submits its own statement; neither takes the other's for its own. A
    statement with no mark (sent by a release before the mark) is still
    taken by the job its key names."""
    backend = DatabricksSql()
    now = datetime.now(UTC)  # to the millisecond, as a job's time is stored: with
    # 500 µs past an odd one, it and the next rounded alike (a CI run, 2026-12-07)
    made = now.replace(microsecond=now.microsecond // 1000 * 1000)
    theirs = (await backend.trigger(a_trigger("nightly", replayed=False, created=made)))[
        "statement_id"
    ]
    later = made + timedelta(milliseconds=1)
    ours = (await backend.trigger(a_trigger("nightly", replayed=False, created=later)))[
        "statement_id"
    ]
    assert ours != theirs and len(sql_api.statements) == 2
    assert await backend._find(a_trigger("nightly", replayed=False, created=made), WAREHOUSE) == [
        theirs
    ]
    assert await backend._find(a_trigger("nightly", replayed=False, created=later), WAREHOUSE) == [
        ours
    ]

    # (the same as a release before the mark sent it)
    tags = sql_api.statements[theirs].request["query_tags"]
    tags[:] = [t for t in tags if t["key"] != "tether_mark"]
    found = await backend._find(a_trigger("nightly", replayed=False, created=later), WAREHOUSE)
    assert found == [theirs, ours]


async def test_a_replay_waits_for_the_history_without_a_counted_try(sql_api: FakeSqlApi):
    """Told it is a replay, the trigger finds nothing in the history and
    sends nothing: it asks to be called again (`tried` False: the core does
    not count it against `TETHER_TRIGGER_ATTEMPTS`). A first run submits."""
    backend = DatabricksSql()
    with pytest.raises(BackendError) as waited:
        await backend.trigger(a_trigger("replayed", replayed=True))
    assert (waited.value.code, waited.value.retryable, waited.value.tried) == (
        "statement_unsure",
        True,
        False,
    )
    assert 0 < (waited.value.retry_after or 0) <= 30
    assert sql_api.calls(STATEMENTS) == []

    receipt = await backend.trigger(a_trigger("fresh", replayed=False))
    assert list(sql_api.statements) == [receipt["statement_id"]]


async def test_a_statement_sent_after_a_wait_is_waited_for_again_on_the_next_replay(
    sql_api: FakeSqlApi, monkeypatch: pytest.MonkeyPatch
):
    """A replay waited its settling time, then sent the statement; its
    record failed, and the trigger is called again (a replay once more)
    while the history does not list the statement yet: it waits again,
    rather than take the earlier wait for this one and send it twice."""
    monkeypatch.setenv("TETHER_DATABRICKS_SQL_SETTLE", "0.3")
    sql_api.history_delay = 30
    backend = DatabricksSql()
    trigger = a_trigger("again", replayed=True)
    with pytest.raises(BackendError):
        await backend.trigger(trigger)  # the wait begins
    time.sleep(0.4)
    await backend.trigger(trigger)  # over: sent
    with pytest.raises(BackendError) as waited:
        await backend.trigger(trigger)
    assert waited.value.code == "statement_unsure"
    assert len(sql_api.statements) == 1


async def test_a_replay_that_cannot_read_the_history_submits_at_once(
    sql_api: FakeSqlApi, logs: Any
):
    """Waiting for a history that cannot be read would show nothing: the
    replay submits as a first run does, and the log says it could not look."""
    sql_api.refuse(HISTORY, 403, "PERMISSION_DENIED")
    receipt = await DatabricksSql().trigger(a_trigger("blind", replayed=True))
    assert list(sql_api.statements) == [receipt["statement_id"]]
    assert "the query history cannot be read" in logs.text


def killed_inside_the_submission(
    tmp_path: Path, sql_api: FakeSqlApi, job_id: str, **settings: str
) -> TetherProcess:
    """The real `tether serve`, killed with SIGKILL after Databricks accepted
    job `job_id`'s statement but before its answer came (`hold`): the
    process restarted on the same store and port."""

    def inside(client: httpx.Client) -> Hold:
        held = sql_api.hold()  # the statement is made; its answer never comes
        body = {"backend": "databricks_sql", "params": {**PARAMS, "check_interval": 0.5}}
        response = client.post("/jobs", json={"id": job_id, **body})
        assert response.status_code == 201, response.text
        assert held.reached.wait(60), "the statement never arrived"
        return held

    # DATABRICKS_HOST/TOKEN, HOME and TETHER_DATABRICKS_* come from the fixture
    return killed_inside(tmp_path, inside, **settings)[1]


def test_a_kill_after_the_statement_was_accepted_still_runs_it_once(
    tmp_path: Path, sql_api: FakeSqlApi
):
    """Killed between accept and record: on restart the replayed trigger
    finds the statement by its tag; still one statement."""
    second = killed_inside_the_submission(tmp_path, sql_api, "crash")
    [statement] = sql_api.statements.values()
    try:
        with second.client() as client:
            job = wait_for(client, "crash", "running", recorded=True)
            assert job["external"]["statement_id"] == statement.statement_id
            assert len(sql_api.calls(STATEMENTS)) == 1
            sql_api.succeed(statement.statement_id, [("n", "INT")], [["1"]])
            wait_for(client, "crash", "succeeded", recorded=True)
    finally:
        second.kill()
    assert len(sql_api.statements) == 1
    assert "was submitted by an earlier try" in second.log.read_text()


def test_after_a_kill_a_statement_the_history_lists_late_is_waited_for(
    tmp_path: Path, sql_api: FakeSqlApi
):
    """As above, and the query history lists the statement only 10 s after
    it was made, longer than the restart takes: the replayed trigger, told
    it is a replay (`Trigger.replayed`), waits for it (`statement_unsure`)
    rather than submit it again. With a single try allowed: the waits are
    not tries."""
    sql_api.history_delay = 10
    second = killed_inside_the_submission(
        tmp_path,
        sql_api,
        "slow",
        TETHER_TRIGGER_BACKOFF="0.2",
        TETHER_TRIGGER_ATTEMPTS="1",
        TETHER_DATABRICKS_SQL_SETTLE="12",
    )
    [statement] = sql_api.statements.values()
    try:
        with second.client() as client:
            job = wait_for(client, "slow", "running", recorded=True, timeout=60)
            assert job["external"]["statement_id"] == statement.statement_id
            assert len(sql_api.calls(STATEMENTS)) == 1
            events = client.get("/jobs/slow/events").json()["items"]
            unsure = [e["data"] for e in events if e["type"] == "trigger_failed"]
            assert {(e["error"]["type"], e["try"], e["counted"]) for e in unsure} == {
                ("statement_unsure", 1, False)
            }
            [triggered] = [e["data"] for e in events if e["type"] == "triggered"]
            assert triggered["try"] == 1
    finally:
        second.kill()
    assert len(sql_api.statements) == 1
