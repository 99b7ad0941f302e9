"""What a statement's answer means, read by the SDK's own types from JSON
the Statement Execution API sends; and the params type against its own
JSON Schema: every value the schema allows is accepted, every value it
refuses is refused (the OpenAPI document is what clients and fuzzers read)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema_rs
import msgspec
import pytest
from databricks.sdk.service.sql import StatementResponse

from core.plugin import ErrorInfo, Outcome, Running
from plugins.databricks_sql import (
    DatabricksSqlParams,
    DatabricksSqlSettings,
    params_type,
    sql_parameters,
)
from plugins.databricks_sql.statements import (
    MAX_RESULT_BYTES,
    outcome_of_statement,
    result_bound,
    result_of,
)

ROOT = Path(__file__).resolve().parents[3]
SID = "01f0-statement"


def answer(state: str, **more: Any) -> StatementResponse:
    return StatementResponse.from_dict(
        {"statement_id": SID, "status": {"state": state, **more.pop("status", {})}, **more}
    )


@pytest.mark.parametrize("state", ["PENDING", "RUNNING"])
def test_a_live_statement_is_running(state: str):
    assert outcome_of_statement(answer(state), SID, 10) == Running(progress={"state": state})


def test_a_state_this_sdk_does_not_know_cannot_be_told():
    assert outcome_of_statement(answer("PONDERING"), SID, 10) is None
    assert outcome_of_statement(StatementResponse(statement_id=SID), SID, 10) is None


def test_a_failed_statement_without_an_error_code_is_failed():
    found = outcome_of_statement(answer("FAILED", status={"error": {"message": "boom"}}), SID, 10)
    assert found == Outcome(
        status="failed",
        result={"statement_id": SID, "state": "FAILED"},
        error=ErrorInfo(f"Databricks SQL statement {SID} failed: boom", type="FAILED"),
    )


def test_a_closed_statement_succeeded_but_its_result_is_gone():
    found = outcome_of_statement(answer("CLOSED"), SID, 10)
    assert isinstance(found, Outcome) and found.status == "succeeded"
    assert found.result["rows"] == [] and "closed" in found.result["message"]


def test_a_statement_without_a_result_set_succeeds_with_no_rows():
    found = outcome_of_statement(answer("SUCCEEDED"), SID, 10)
    assert found == Outcome(
        status="succeeded",
        result={
            "statement_id": SID,
            "state": "SUCCEEDED",
            "columns": [],
            "column_types": [],
            "rows": [],
            "row_count": 0,
            "total_row_count": None,
            "truncated": False,
        },
    )


def test_a_result_is_cut_to_fit_1_mib_exactly():
    row = ["x" * 999]  # 1005 bytes of JSON with its comma
    statement = answer(
        "SUCCEEDED",
        manifest={"schema": {"columns": [{"name": "x", "type_name": "STRING", "position": 0}]}},
        result={"data_array": [row] * 2000},
    )
    result = result_of(statement, SID, 10_000)
    size = len(msgspec.json.encode(result))
    assert size <= MAX_RESULT_BYTES < size + 1005  # not one more row would fit
    assert result["truncated"] is True and result["row_count"] == len(result["rows"])
    assert result["column_types"] == ["STRING"]  # `type_name` when there is no `type_text`


def test_parameters_get_the_sql_type_their_json_implies():
    given = {
        "i": 2**31,
        "j": -(2**31),
        "d": 10**20,
        "widest": -(10**38) + 1,
        "past": 10**38,  # no DECIMAL holds it: it was sent as a DECIMAL(38,0) all the same
        "t": {"value": 5, "type": "TINYINT"},
        "kept": {"value": 10**40, "type": "DECIMAL(38,0)"},  # as given: Databricks says
    }
    body = msgspec.json.encode({**BASE, "parameters": given})  # as the API reads it
    params = msgspec.convert(msgspec.json.decode(body), DatabricksSqlParams)
    assert sql_parameters(params.parameters) == [
        {"name": "i", "value": str(2**31), "type": "BIGINT"},
        {"name": "j", "value": str(-(2**31)), "type": "INT"},
        {"name": "d", "value": str(10**20), "type": "DECIMAL(38,0)"},
        {"name": "widest", "value": str(-(10**38) + 1), "type": "DECIMAL(38,0)"},
        {"name": "past", "value": str(10**38), "type": "DOUBLE"},
        {"name": "t", "value": "5", "type": "TINYINT"},
        {"name": "kept", "value": str(10**40), "type": "DECIMAL(38,0)"},
    ]


# ── the params type states its rules in its schema ───────────────────────────

W = "abcdef1234567890"
BASE = {"warehouse_id": W, "statement": "SELECT 1"}
EDGES: list[Any] = [
    BASE,
    {"statement": "SELECT 1"},
    {**BASE, "warehouse_id": None},
    {**BASE, "warehouse_id": ""},
    {**BASE, "warehouse_id": W + "\n"},
    {**BASE, "warehouse_id": "a" * 128},
    {**BASE, "warehouse_id": "a" * 129},
    {**BASE, "statement": ""},
    {**BASE, "statement": " "},
    {**BASE, "statement": "\x0b"},
    {**BASE, "statement": "\x1c"},
    {**BASE, "statement": "\u00a0"},
    {**BASE, "statement": "\u2003\u00a0\ufeff\u3000"},
    {**BASE, "statement": "\u2003SELECT 1"},
    {**BASE, "row_limit": 1},
    {**BASE, "row_limit": 10_000},
    {**BASE, "row_limit": 10_000.0},
    {**BASE, "row_limit": 1.5},
    {**BASE, "row_limit": 0},
    {**BASE, "row_limit": True},
    {**BASE, "row_limit": None},
    {**BASE, "check_interval": 0.1},
    {**BASE, "check_interval": 0.09},
    {**BASE, "check_interval": 86400},
    {**BASE, "check_interval": 86400.5},
    {**BASE, "catalog": ""},
    {**BASE, "catalog": None, "schema": "s" * 255},
    {**BASE, "schema": "s" * 256},
    {**BASE, "parameters": {}},
    {**BASE, "parameters": None},
    {**BASE, "parameters": {"_": None, "a1": 1, "b": 1.5, "c": False, "d": "x"}},
    {**BASE, "parameters": {"a": {}}},
    {**BASE, "parameters": {"a": {"value": None, "type": "INT"}}},
    {**BASE, "parameters": {"a": {"type": ""}}},
    {**BASE, "parameters": {"a": {"value": [1]}}},
    {**BASE, "parameters": {"a": {"other": 1}}},
    {**BASE, "parameters": {"1a": "x"}},
    {**BASE, "parameters": {"a\n": "x"}},
    {**BASE, "parameters": {"a-b": "x"}},
    {**BASE, "parameters": {"a" * 255: "x"}},
    {**BASE, "parameters": {"a" * 256: "x"}},
    {**BASE, "parameters": {f"p{i}": "x" for i in range(256)}},
    {**BASE, "parameters": {f"p{i}": "x" for i in range(257)}},
    {**BASE, "extra": 1},
    [],
    "SELECT 1",
]


@pytest.mark.parametrize("default_warehouse", ["", W], ids=["no default", "a default"])
def test_the_params_schema_accepts_exactly_what_the_backend_accepts(default_warehouse: str):
    kind = params_type(default_warehouse)
    validator = jsonschema_rs.validator_for(msgspec.json.schema(kind))
    for value in EDGES:
        try:
            msgspec.convert(value, kind)
            accepted = True
        except msgspec.ValidationError:
            accepted = False
        assert accepted == validator.is_valid(value), (value, accepted)


def test_the_docs_name_every_param_and_setting():
    docs = (ROOT / "docs" / "databricks.md").read_text()
    section = docs.split("## SQL statements on a warehouse: the `databricks_sql` backend", 1)[1]
    for name in DatabricksSqlParams.__struct_fields__:
        assert f"`{name}`" in section, f"docs/databricks.md does not show `{name}`"
    for name in DatabricksSqlSettings.__struct_fields__:
        assert f"TETHER_DATABRICKS_SQL_{name.upper()}" in section
    assert "databricks_sql" in (ROOT / "docs" / "plugins.md").read_text()


def test_the_result_bound_is_the_cores_setting():
    assert result_bound({}) == MAX_RESULT_BYTES
    assert result_bound({"TETHER_MAX_RESULT_BYTES": "65536"}) == 65536
    assert result_bound({"TETHER_MAX_RESULT_BYTES": "lots"}) == MAX_RESULT_BYTES
