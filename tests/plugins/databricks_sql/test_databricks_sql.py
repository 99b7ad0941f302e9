"""The `databricks_sql` backend through the real service and real HTTP: the
real databricks-sdk client against a fake Statement Execution API
(tests/plugins/databricks_sql/fake_sql.py) whose statements move on the
test's command. No callback ever comes: status checks end every job."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from typing import Any

import pytest

from core.models import job_mark
from core.workflow import callback_promise_id
from plugins.databricks_sql import tag_value
from plugins.databricks_sql.statements import MAX_RESULT_BYTES
from tests.conftest import HOLD, eventually
from tests.plugins.databricks_sql.fake_sql import HISTORY, STATEMENTS, TOKEN, WAREHOUSE, FakeSqlApi

FAST = {"check_interval": 0.1}
"""Status checks as often as the backend allows, so that tests take little time."""


async def start_job(svc: Any, job_id: str, params: dict[str, Any], **extra: Any) -> None:
    body = {"id": job_id, "backend": "databricks_sql", "params": params, **extra}
    response = await svc.client.post("/jobs", json=body)
    assert response.status_code == 201, response.text


async def statement_of(svc: Any, sql_api: FakeSqlApi, job_id: str) -> str:
    """The statement the job started, once its trigger recorded it."""

    async def recorded() -> Any:
        return (await svc.job(job_id))["external"]

    external = await eventually(recorded)
    statement_id = external["statement_id"]
    assert external == {"statement_id": statement_id, "warehouse_id": WAREHOUSE}
    assert statement_id in sql_api.statements
    return statement_id  # type: ignore[no-any-return]


async def events_of(svc: Any, job_id: str) -> list[dict[str, Any]]:
    response = await svc.client.get(f"/jobs/{job_id}/events")
    assert response.status_code == 200, response.text
    return response.json()["items"]  # type: ignore[no-any-return]


# ── a statement's life ───────────────────────────────────────────────────────


async def test_a_statement_succeeds_and_the_job_holds_its_rows_and_columns(
    start_sql, sql_api: FakeSqlApi
):
    svc = await start_sql()
    params = {
        "warehouse_id": WAREHOUSE,
        "statement": "SELECT day, orders FROM orders WHERE day >= :since AND shop = :shop LIMIT :n",
        "parameters": {
            "since": {"value": "2024-01-01", "type": "DATE"},
            "shop": "north",
            "n": 10,
            "rate": 0.5,
            "open": True,
            "gone": None,
        },
        "catalog": "main",
        "schema": "sales",
        "row_limit": 10,
        **FAST,
    }
    await start_job(svc, "daily", params)
    statement_id = await statement_of(svc, sql_api, "daily")

    created = datetime.fromisoformat((await svc.job("daily"))["created_at"])
    [request] = sql_api.calls(STATEMENTS)
    assert request.body == {
        "warehouse_id": WAREHOUSE,
        "statement": params["statement"],
        "wait_timeout": "0s",
        "parameters": [
            {"name": "since", "value": "2024-01-01", "type": "DATE"},
            {"name": "shop", "value": "north"},
            {"name": "n", "value": "10", "type": "INT"},
            {"name": "rate", "value": "0.5", "type": "DOUBLE"},
            {"name": "open", "value": "true", "type": "BOOLEAN"},
            {"name": "gone"},
        ],
        "catalog": "main",
        "schema": "sales",
        "row_limit": 10,
        "byte_limit": MAX_RESULT_BYTES,
        "disposition": "INLINE",
        "format": "JSON_ARRAY",
        # how a statement whose answer was lost is found again
        "query_tags": [
            {"key": "tether", "value": tag_value(callback_promise_id("daily"))},
            {"key": "tether_job", "value": "daily"},
            # and which job under that id: another deployment may have one
            {"key": "tether_mark", "value": job_mark("daily", created)},
        ],
    }
    # looked for first, in the query history of this warehouse and of Tether's user
    [look] = sql_api.calls(HISTORY, "GET")
    assert look.query["filter_by.warehouse_ids"] == [WAREHOUSE]
    assert look.query["filter_by.user_ids"] == ["1"]

    sql_api.run(statement_id)

    async def confirmed_running() -> bool:
        said = [e["data"] for e in await events_of(svc, "daily") if e["type"] == "status_check"]
        return {"said": "running", "progress": {"state": "RUNNING"}} in said

    await eventually(confirmed_running)
    assert (await svc.job("daily"))["state"] == "running"

    sql_api.succeed(
        statement_id,
        columns=[("day", "DATE"), ("orders", "BIGINT"), ("share", "DECIMAL(5,2)")],
        rows=[["2024-01-01", "3", "0.25"], ["2024-01-02", None, "1.00"]],
    )
    job = await svc.wait_state("daily", "succeeded", timeout=10)
    assert job["result"] == {
        "statement_id": statement_id,
        "state": "SUCCEEDED",
        "columns": ["day", "orders", "share"],
        "column_types": ["DATE", "BIGINT", "DECIMAL(5,2)"],
        "rows": [["2024-01-01", "3", "0.25"], ["2024-01-02", None, "1.00"]],
        "row_count": 2,
        "total_row_count": 2,
        "truncated": False,
    }
    assert job["error"] is None
    ended = [e["data"] for e in await events_of(svc, "daily") if e["type"] == "status_check"]
    assert ended[-1] == {"said": "ended", "status": "succeeded"}
    await asyncio.sleep(HOLD)  # and nothing more is asked of Databricks
    assert sql_api.calls(f"{STATEMENTS}/{statement_id}/cancel") == []


async def test_the_result_keeps_the_first_chunk_within_row_limit_and_1_mib(
    start_sql, sql_api: FakeSqlApi
):
    svc = await start_sql()
    columns = [("n", "INT"), ("text", "STRING")]
    for job_id, row_limit in (("limited", 3), ("chunked", 100), ("wide", 10_000)):
        params = {
            "warehouse_id": WAREHOUSE,
            "statement": "SELECT *",
            "row_limit": row_limit,
            **FAST,
        }
        await start_job(svc, job_id, params)
    limited, chunked, wide = [
        await statement_of(svc, sql_api, j) for j in ("limited", "chunked", "wide")
    ]
    sql_api.succeed(limited, columns, [[str(i), "x"] for i in range(5)])
    sql_api.succeed(chunked, columns, [[str(i), "y"] for i in range(10)], chunks=2)
    kib = "z" * 1024
    sql_api.succeed(wide, columns, [[str(i), kib] for i in range(2000)])  # ~2 MiB

    job = await svc.wait_state("limited", "succeeded")
    assert job["result"]["rows"] == [["0", "x"], ["1", "x"], ["2", "x"]]
    assert job["result"]["truncated"] is True  # the API cut it at row_limit

    job = await svc.wait_state("chunked", "succeeded")
    assert job["result"]["rows"] == [[str(i), "y"] for i in range(5)]  # the first chunk
    assert job["result"]["total_row_count"] == 10
    assert job["result"]["truncated"] is True

    job = await svc.wait_state("wide", "succeeded")
    result = job["result"]
    kept = result["rows"]
    assert 900 < len(kept) < 1024 and kept == [[str(i), kib] for i in range(len(kept))]
    assert result["row_count"] == len(kept)
    assert result["truncated"] is True
    assert len(json.dumps(result, separators=(",", ":"))) <= MAX_RESULT_BYTES


async def test_the_result_follows_the_cores_result_bound(
    start_sql, sql_api: FakeSqlApi, monkeypatch: pytest.MonkeyPatch
):
    bound = 16 * 1024
    monkeypatch.setenv("TETHER_MAX_RESULT_BYTES", str(bound))  # as `tether serve` reads it
    svc = await start_sql(max_result_bytes=bound)
    await start_job(svc, "small", {"warehouse_id": WAREHOUSE, "statement": "SELECT *", **FAST})
    statement_id = await statement_of(svc, sql_api, "small")
    assert sql_api.statements[statement_id].request["byte_limit"] == bound
    kib = "k" * 1024
    sql_api.succeed(
        statement_id, [("n", "INT"), ("text", "STRING")], [[str(i), kib] for i in range(100)]
    )

    result = (await svc.wait_state("small", "succeeded"))["result"]
    # whole rows cut by the backend: still a table, not the core's marker
    assert result["columns"] == ["n", "text"] and result["truncated"] is True
    assert 10 < result["row_count"] < 16 and result["rows"][-1][0] == str(result["row_count"] - 1)
    assert len(json.dumps(result, separators=(",", ":"))) <= bound


async def test_a_failed_statement_fails_the_job_with_its_message(start_sql, sql_api: FakeSqlApi):
    svc = await start_sql()
    await start_job(
        svc, "typo", {"warehouse_id": WAREHOUSE, "statement": "SELECT * FROM nope", **FAST}
    )
    statement_id = await statement_of(svc, sql_api, "typo")
    sql_api.run(statement_id)
    message = "[TABLE_OR_VIEW_NOT_FOUND] The table or view `nope` cannot be found. SQLSTATE: 42P01"
    sql_api.fail(statement_id, message, error_code="BAD_REQUEST", sql_state="42P01")

    job = await svc.wait_state("typo", "failed")
    assert job["error"] == {
        "type": "BAD_REQUEST",
        "message": f"Databricks SQL statement {statement_id} failed: {message}",
    }
    assert job["result"] == {"statement_id": statement_id, "state": "FAILED", "sql_state": "42P01"}
    await asyncio.sleep(HOLD)
    assert sql_api.calls(f"{STATEMENTS}/{statement_id}/cancel") == []


async def test_cancel_cancels_the_statement(start_sql, sql_api: FakeSqlApi):
    svc = await start_sql()
    await start_job(svc, "long", {"warehouse_id": WAREHOUSE, "statement": "OPTIMIZE t", **FAST})
    statement_id = await statement_of(svc, sql_api, "long")
    sql_api.run(statement_id)

    response = await svc.client.post("/jobs/long/cancel", json={"reason": "not today"})
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "canceled"
    cancel = f"{STATEMENTS}/{statement_id}/cancel"
    await eventually(lambda: sql_api.calls(cancel))
    assert sql_api.statements[statement_id].state == "CANCELED"
    await eventually(lambda: len(sql_api.calls(cancel)) == 1, holds=HOLD)


async def test_a_timeout_cancels_the_statement(start_sql, sql_api: FakeSqlApi):
    svc = await start_sql()
    await start_job(
        svc, "slow", {"warehouse_id": WAREHOUSE, "statement": "SELECT sleep()", **FAST}, timeout=1
    )
    statement_id = await statement_of(svc, sql_api, "slow")
    sql_api.run(statement_id)

    job = await svc.wait_state("slow", "timed_out", timeout=10)
    assert job["error"]["type"] == "timeout"
    await eventually(lambda: sql_api.calls(f"{STATEMENTS}/{statement_id}/cancel"))
    assert sql_api.statements[statement_id].state == "CANCELED"


async def test_a_statement_canceled_in_databricks_cancels_the_job(start_sql, sql_api: FakeSqlApi):
    svc = await start_sql()
    await start_job(svc, "stopped", {"warehouse_id": WAREHOUSE, "statement": "SELECT 1", **FAST})
    statement_id = await statement_of(svc, sql_api, "stopped")
    sql_api.cancel(statement_id)

    job = await svc.wait_state("stopped", "canceled")
    assert job["error"] == {
        "type": "CANCELED",
        "message": f"Databricks SQL statement {statement_id} was canceled",
    }
    await asyncio.sleep(HOLD)  # an ended statement is not canceled again
    assert sql_api.calls(f"{STATEMENTS}/{statement_id}/cancel") == []


async def test_a_statement_the_warehouse_forgot_fails_the_job(start_sql, sql_api: FakeSqlApi):
    svc = await start_sql()
    await start_job(svc, "lost", {"warehouse_id": WAREHOUSE, "statement": "SELECT 1", **FAST})
    statement_id = await statement_of(svc, sql_api, "lost")
    sql_api.forget(statement_id)

    job = await svc.wait_state("lost", "failed")
    assert job["error"]["type"] == "statement_gone"
    assert statement_id in job["error"]["message"]
    assert len(sql_api.calls(f"{STATEMENTS}/{statement_id}/cancel")) == 1  # in case: a 404


async def test_a_statement_a_stray_404_hid_is_canceled_before_its_job_fails(
    start_sql, sql_api: FakeSqlApi
):
    """One 404 (a proxy, an incident) for a statement still running failed
    the job and left the statement going, so a retry ran a second one beside
    it (found by an exploratory QA pass)."""
    svc = await start_sql()
    await start_job(svc, "hidden", {"warehouse_id": WAREHOUSE, "statement": "SELECT 1", **FAST})
    statement_id = await statement_of(svc, sql_api, "hidden")
    sql_api.refuse(f"{STATEMENTS}/{statement_id}", 404, "NOT_FOUND")

    job = await svc.wait_state("hidden", "failed")
    assert job["error"]["type"] == "statement_gone"
    assert sql_api.statements[statement_id].state == "CANCELED"


async def test_a_statement_databricks_refuses_fails_the_job_without_a_retry(
    start_sql, sql_api: FakeSqlApi
):
    svc = await start_sql()
    await start_job(svc, "nowhere", {"warehouse_id": "0000000000000000", "statement": "SELECT 1"})

    job = await svc.wait_state("nowhere", "failed")
    assert job["error"]["type"] == "RESOURCE_DOES_NOT_EXIST"
    assert "Warehouse 0000000000000000 does not exist" in job["error"]["message"]
    assert len(sql_api.calls(STATEMENTS)) == 1  # a 404 is not tried again


async def test_a_job_naming_no_warehouse_runs_on_the_default_one(
    start_sql, sql_api: FakeSqlApi, monkeypatch: pytest.MonkeyPatch
):
    other = "fedcba0987654321"
    sql_api.warehouses[other] = {"id": other, "name": "Other", "state": "RUNNING"}
    monkeypatch.setenv("TETHER_DATABRICKS_SQL_WAREHOUSE_ID", other)
    svc = await start_sql()
    await start_job(svc, "default", {"statement": "SELECT 1", **FAST})
    stmt = await asyncio.to_thread(sql_api.statement)
    assert stmt.request["warehouse_id"] == other

    async def recorded() -> Any:
        return (await svc.job("default"))["external"]

    assert await eventually(recorded) == {"statement_id": stmt.statement_id, "warehouse_id": other}
    sql_api.succeed(stmt.statement_id, [("one", "INT")], [["1"]])
    job = await svc.wait_state("default", "succeeded")
    assert job["result"]["rows"] == [["1"]]


# ── bad params ───────────────────────────────────────────────────────────────

BASE = {"warehouse_id": WAREHOUSE, "statement": "SELECT 1"}
BAD_PARAMS = [
    ({"warehouse_id": WAREHOUSE}, "statement"),
    ({**BASE, "statement": " \n\t"}, "statement"),
    ({"statement": "SELECT 1"}, "warehouse_id"),
    ({**BASE, "warehouse_id": "../../jobs"}, "warehouse_id"),
    ({**BASE, "warehouse_id": WAREHOUSE + "\n"}, "warehouse_id"),
    ({**BASE, "warehouse": WAREHOUSE}, "warehouse"),
    ({**BASE, "row_limit": 0}, "row_limit"),
    ({**BASE, "row_limit": 10_001}, "row_limit"),
    ({**BASE, "row_limit": 2.5}, "row_limit"),
    ({**BASE, "check_interval": 0.01}, "check_interval"),
    ({**BASE, "catalog": ""}, "catalog"),
    ({**BASE, "schema": 7}, "schema"),
    ({**BASE, "parameters": {"1st": "x"}}, "parameters"),
    ({**BASE, "parameters": {"day": ["2024-01-01"]}}, "params.parameters[...]"),
    ({**BASE, "parameters": {"day": {"value": "x", "kind": "DATE"}}}, "kind"),
    ({**BASE, "parameters": {"day": {"value": "x", "type": ""}}}, "params.parameters[...].type"),
]


async def test_bad_params_are_refused_naming_the_field(start_sql, sql_api: FakeSqlApi):
    svc = await start_sql()
    for i, (params, field) in enumerate(BAD_PARAMS):
        body = {"id": f"bad-{i}", "backend": "databricks_sql", "params": params}
        response = await svc.client.post("/jobs", json=body)
        assert response.status_code == 422, (params, response.text)
        message = response.json()["error"]["message"]
        assert "databricks_sql" in message and f"{field}" in message, (params, message)
        assert (await svc.client.get(f"/jobs/bad-{i}")).status_code == 404
    assert sql_api.statements == {}


async def test_the_params_schema_in_the_openapi_document(start_sql, sql_api: FakeSqlApi):
    svc = await start_sql()
    document = (await svc.client.get("/schema/openapi.json")).json()
    schema = document["components"]["schemas"]["DatabricksSqlParams"]
    assert schema["required"] == ["warehouse_id", "statement"]
    assert schema["additionalProperties"] is False
    assert schema["properties"]["row_limit"]["default"] == 1000


# ── secrets ──────────────────────────────────────────────────────────────────


async def test_the_token_never_reaches_the_job_its_events_or_the_logs(
    start_sql, sql_api: FakeSqlApi, logs: Any
):
    svc = await start_sql()
    await start_job(svc, "leaky", {"warehouse_id": WAREHOUSE, "statement": "SELECT 1", **FAST})
    statement_id = await statement_of(svc, sql_api, "leaky")
    # A careless server quoting the request's credentials in its error message
    sql_api.fail(statement_id, f"rejected Authorization: Bearer {TOKEN} (token={TOKEN})")
    job = await svc.wait_state("leaky", "failed")
    assert "***" in job["error"]["message"]

    sql_api.echo_credentials = True
    sql_api.token = "dapi" + "0" * 32  # the service's token is now refused, and quoted
    await start_job(svc, "refused", {"warehouse_id": WAREHOUSE, "statement": "SELECT 1"})
    refused = await svc.wait_state("refused", "failed")
    assert refused["error"]["type"] == "PERMISSION_DENIED"

    seen = json.dumps(
        [job, refused, await events_of(svc, "leaky"), await events_of(svc, "refused")]
    )
    for text in (seen, logs.text):
        assert TOKEN not in text
        assert TOKEN[4:] not in text
    assert "databricks_sql" in logs.text  # the logs were captured
