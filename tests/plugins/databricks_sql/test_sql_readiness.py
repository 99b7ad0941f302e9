"""The `databricks_sql` backend's readiness, against the fake Statement
Execution API with the real databricks-sdk client: with a default warehouse,
`ok` when it exists and `error` when it does not; `unconfigured` without
credentials; `error` with Databricks' reason (and no token) when the
credentials are refused. The settings it declares are known to the start-up
check, and the service offers it as a built-in plugin."""

from __future__ import annotations

from typing import Any

import pytest

from core.plugin import Readiness
from core.plugins import Plugins, make_plugin_manager
from plugins.databricks_sql import DatabricksSql
from tests.conftest import eventually
from tests.plugins.databricks_sql.fake_sql import WAREHOUSE, FakeSqlApi

WAREHOUSES = "/api/2.0/sql/warehouses/"
ME = "/api/2.0/preview/scim/v2/Me"


@pytest.fixture
def default_warehouse(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("TETHER_DATABRICKS_SQL_WAREHOUSE_ID", WAREHOUSE)
    return WAREHOUSE


async def test_hook_readiness_of_databricks_sql_is_ok_when_the_warehouse_exists(
    sql_api: FakeSqlApi, default_warehouse: str
):
    sql_api.warehouses[WAREHOUSE]["state"] = "STOPPED"
    found = await DatabricksSql().readiness()
    assert found == Readiness("ok", f"SQL warehouse {WAREHOUSE} (Shared) is STOPPED")
    assert [(s.method, s.path) for s in sql_api.seen] == [("GET", WAREHOUSES + WAREHOUSE)]


async def test_hook_readiness_of_databricks_sql_is_an_error_without_the_warehouse(
    sql_api: FakeSqlApi, default_warehouse: str
):
    del sql_api.warehouses[WAREHOUSE]
    found = await DatabricksSql().readiness()
    assert found.status == "error"
    assert found.reason == (f"SQL warehouse {WAREHOUSE}: Warehouse {WAREHOUSE} does not exist.")


async def test_hook_readiness_of_databricks_sql_is_an_error_for_a_deleted_warehouse(
    sql_api: FakeSqlApi, default_warehouse: str
):
    sql_api.warehouses[WAREHOUSE]["state"] = "DELETED"
    found = await DatabricksSql().readiness()
    assert found == Readiness("error", f"SQL warehouse {WAREHOUSE} (Shared) is DELETED")


async def test_hook_readiness_of_databricks_sql_checks_the_credentials_without_a_warehouse(
    sql_api: FakeSqlApi,
):
    found = await DatabricksSql().readiness()
    assert found == Readiness("ok", "no default warehouse (TETHER_DATABRICKS_SQL_WAREHOUSE_ID)")
    assert [s.path for s in sql_api.seen] == [ME]


async def test_hook_readiness_of_databricks_sql_is_unconfigured_without_credentials(
    sql_api: FakeSqlApi, default_warehouse: str, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv("DATABRICKS_HOST")
    monkeypatch.delenv("DATABRICKS_TOKEN")
    found = await DatabricksSql().readiness()
    assert found.status == "unconfigured"
    assert "DATABRICKS_HOST" in found.reason
    assert sql_api.seen == []


async def test_hook_readiness_of_databricks_sql_gives_the_reason_but_not_a_refused_token(
    sql_api: FakeSqlApi, default_warehouse: str, monkeypatch: pytest.MonkeyPatch
):
    wrong = "dapi" + "e" * 32
    monkeypatch.setenv("DATABRICKS_TOKEN", wrong)
    sql_api.echo_credentials = True  # the answer quotes the token: it must not show
    found = await DatabricksSql().readiness()
    assert found.status == "error"
    assert "Invalid access token" in found.reason
    assert "e" * 32 not in found.reason
    assert sql_api.seen and not sql_api.seen[0].authorized


async def test_health_shows_the_readiness_of_databricks_sql(
    start_sql, sql_api: FakeSqlApi, default_warehouse: str
):
    svc = await start_sql()

    async def shown() -> Any:
        readiness = (await svc.client.get("/health")).json()["readiness"]["databricks_sql"]
        return readiness if readiness["status"] != "unknown" else None

    assert await eventually(shown) == {
        "status": "ok",
        "reason": f"SQL warehouse {WAREHOUSE} (Shared) is RUNNING",
    }


def test_a_bad_default_warehouse_stops_the_backend_at_start_up(
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.setenv("TETHER_DATABRICKS_SQL_WAREHOUSE_ID", "abc/../def")
    with pytest.raises(ValueError, match="TETHER_DATABRICKS_SQL_WAREHOUSE_ID"):
        DatabricksSql()


def test_the_databricks_sql_backend_is_built_in():
    plugins = Plugins(make_plugin_manager(entry_points=False))
    assert type(plugins.backends["databricks_sql"]) is DatabricksSql
    assert plugins.versions()["databricks_sql"].startswith("tether ")
    assert "TETHER_DATABRICKS_SQL_WAREHOUSE_ID" in plugins.setting_names()
    assert plugins.backends["databricks_sql"].workspace._client is None  # type: ignore[attr-defined]  # built on first use
