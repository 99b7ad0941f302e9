"""Databricks workspace notifications at `POST /backends/databricks/notifications`:
the real service, the real databricks-sdk client and a fake workspace that
POSTs Databricks' own notification bodies, over real HTTP."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from databricks.sdk import WorkspaceClient

from core.models import Notice
from core.plugins import Plugins, make_plugin_manager
from plugins.databricks.notifications import NotifySettings, read, run_keys
from tests.conftest import HOLD, Service, eventually
from tests.plugins.databricks.workspace import FakeWorkspace, Run, hang

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "examples" / "databricks_notifications.py"
ENDPOINT = "/backends/databricks/notifications"
GET_RUN = "/api/2.2/jobs/runs/get"
USER = "databricks-notifier"
PASSWORD = "pw-5b0c1e0f9d2a4e6f8a7b"
TOKEN = "tok-0f1e2d3c4b5a69788796a5b4"
TABLES = ("tether_jobs", "tether_events", "tether_run_keys", "tether_job_tags")


def basic(user: str, password: str) -> dict[str, str]:
    pair = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {pair}"}


AUTH = basic(USER, PASSWORD)


@pytest.fixture
def notify_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_DATABRICKS_NOTIFY_USER", USER)
    monkeypatch.setenv("TETHER_DATABRICKS_NOTIFY_PASSWORD", PASSWORD)


async def running_job(svc: Service, ws: FakeWorkspace, job_id: str = "nightly") -> Run:
    """A Tether job whose Databricks run goes on until the test ends it (its
    notebook never calls back, and the status check is a minute away)."""
    if 7 not in ws.jobs:
        ws.notebooks["quiet"] = hang
        ws.add_job(7, notebook="quiet")
    response = await svc.client.post(
        "/jobs", json={"id": job_id, "backend": "databricks", "params": {"job_id": 7}}
    )
    assert response.status_code == 201, response.text
    job = await svc.wait_state(job_id, "running", timeout=20)
    return ws.runs[job["external"]["run_id"]]


async def post(svc: Service, body: Any, headers: dict[str, str] | None = None, **kw: Any) -> Any:
    return await svc.client.post(
        ENDPOINT, json=body, headers=AUTH if headers is None else headers, **kw
    )


async def history(svc: Service, job_id: str) -> list[dict[str, Any]]:
    return (await svc.client.get(f"/jobs/{job_id}/events")).json()["items"]  # type: ignore[no-any-return]


async def tables(svc: Service) -> str:
    db = svc.tether.jobs.db
    rows = [await db.fetch(f"SELECT * FROM {t} ORDER BY 1, 2", ()) for t in TABLES]
    return hashlib.sha256(repr(rows).encode()).hexdigest()


def example() -> Any:
    spec = importlib.util.spec_from_file_location("databricks_notifications", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ── the whole path: a destination made with the documented code ─────────────


async def test_a_destination_set_up_as_documented_settles_a_job_once_runs_get_confirms(
    start_databricks, workspace: FakeWorkspace, notify_env, finished
):
    svc = await start_databricks()
    workspace.notebooks["quiet"] = hang
    workspace.add_job(7, notebook="quiet")
    w = WorkspaceClient(host=workspace.url, token=workspace.token)
    setup = example()
    destination = setup.create_destination(w, svc.settings.base_url + "/", USER, PASSWORD)
    setup.notify_tether(w, 7, destination)
    assert workspace.destinations[destination]["url"] == svc.settings.base_url + ENDPOINT
    assert workspace.jobs[7].webhooks == {
        "on_start": [destination],
        "on_success": [destination],
        "on_failure": [destination],
    }

    run = await running_job(svc, workspace)
    await eventually(lambda: [d.status for d in workspace.deliveries] == [200])  # jobs.on_start
    assert (await svc.job("nightly"))["state"] == "running"
    reads = len(workspace.calls(GET_RUN, "GET"))

    workspace.end(run.run_id, "SUCCESS")
    job = await svc.wait_state("nightly", "succeeded", timeout=10)
    assert job["error"] is None
    assert len(workspace.calls(GET_RUN, "GET")) > reads  # confirmed with runs/get
    [started, succeeded] = workspace.deliveries
    assert (started.event_type, succeeded.event_type) == ("jobs.on_start", "jobs.on_success")
    assert succeeded.status == 200 and json.loads(succeeded.answer)["jobs"][0]["id"] == "nightly"

    kinds = [
        (e["type"], e["data"].get("kind") or e["data"].get("said"))
        for e in await history(svc, "nightly")
    ]
    assert kinds[-5:] == [
        ("notification", "jobs.on_start"),
        ("status_check", "running"),
        ("notification", "jobs.on_success"),
        ("status_check", "ended"),
        ("finished", None),
    ]
    await eventually(lambda: finished.of("nightly") == ["succeeded"], holds=HOLD)


async def test_a_notification_while_runs_get_says_running_changes_nothing_but_is_recorded(
    start_databricks, workspace: FakeWorkspace, notify_env
):
    svc = await start_databricks()
    run = await running_job(svc, workspace)
    response = await post(
        svc, workspace.notification(run, "jobs.on_success")
    )  # too early, or false
    assert response.status_code == 200, response.text
    [told] = response.json()["jobs"]
    assert told["state"] == "running" and "has not ended" in told["message"]
    assert (await svc.job("nightly"))["state"] == "running"
    [*_, noted, checked] = await history(svc, "nightly")
    assert noted["type"] == "notification"
    assert noted["data"]["kind"] == "jobs.on_success" and noted["data"]["keys"] == [str(run.run_id)]
    assert checked["type"] == "status_check" and checked["data"]["said"] == "running"
    assert checked["data"]["progress"] == {"state": "RUNNING"}


async def test_a_task_level_notification_finds_the_job_by_its_parent_run_id(
    start_databricks, workspace: FakeWorkspace, notify_env
):
    svc = await start_databricks()
    run = await running_job(svc, workspace)
    workspace.end(run.run_id, "RUN_EXECUTION_ERROR", "Workload failed: ValueError")
    body = workspace.notification(run, "jobs.on_failure", task_key="ingest", task_run_id=987654)
    response = await post(svc, body)
    assert response.status_code == 200, response.text
    assert response.json()["jobs"][0]["state"] == "failed"
    job = await svc.job("nightly")
    assert job["error"]["type"] == "RUN_EXECUTION_ERROR"
    noted = [e for e in await history(svc, "nightly") if e["type"] == "notification"][-1]
    assert noted["data"]["kind"] == "jobs.on_failure (task ingest)"
    assert noted["data"]["keys"] == [str(run.run_id)]


async def test_run_ids_may_be_numbers_or_strings(
    start_databricks, workspace: FakeWorkspace, notify_env
):
    svc = await start_databricks()
    for job_id, as_number in (("by-number", True), ("by-string", False)):
        run = await running_job(svc, workspace, job_id)
        workspace.end(run.run_id, "SUCCESS")
        run_id: Any = run.run_id if as_number else f" {run.run_id}"
        body = {"event_type": "jobs.on_success", "run": {"run_id": run_id}, "job": {"job_id": 7}}
        response = await post(svc, body)
        assert response.status_code == 200, response.text
        [told] = response.json()["jobs"]
        assert (told["id"], told["state"]) == (job_id, "succeeded")


async def test_wrong_or_missing_basic_auth_is_401_and_records_nothing(
    start_databricks, workspace: FakeWorkspace, notify_env
):
    svc = await start_databricks()
    run = await running_job(svc, workspace)
    workspace.end(run.run_id, "SUCCESS")
    before = await tables(svc)
    reads = len(workspace.calls(GET_RUN, "GET"))
    body = workspace.notification(run, "jobs.on_success")
    for headers in (
        {},
        basic(USER, "wrong"),
        basic("someone", PASSWORD),
        basic(USER, PASSWORD + "x"),
        {"Authorization": "Basic not-base64!"},
        {"Authorization": f"Bearer {PASSWORD}"},
    ):
        response = await post(svc, body, headers)
        assert response.status_code == 401, (headers, response.text)
        assert "missing or wrong credentials" in response.json()["error"]["message"]
    response = await post(svc, body, params={"token": PASSWORD})  # no token configured
    assert response.status_code == 200  # the basic auth passed; the token is not asked for
    assert (await svc.job("nightly"))["state"] == "succeeded"
    response = await post(svc, body, {}, params={"token": PASSWORD})
    assert response.status_code == 401
    # What a destination sends: the basic auth of a URL's user info.
    url = svc.settings.base_url.replace("http://", f"http://{USER}:{PASSWORD}@") + ENDPOINT
    async with httpx.AsyncClient(trust_env=False) as client:
        assert (await client.post(url, json=body)).status_code == 200
    # Only the accepted ones wrote anything, and read the run.
    assert len(workspace.calls(GET_RUN, "GET")) == reads + 1  # the second found it ended
    assert before != await tables(svc)


async def test_a_token_in_the_url_authenticates_too(
    start_databricks, workspace: FakeWorkspace, monkeypatch
):
    monkeypatch.setenv("TETHER_DATABRICKS_NOTIFY_TOKEN", TOKEN)
    svc = await start_databricks()
    run = await running_job(svc, workspace)
    body = workspace.notification(run, "jobs.on_start")
    for params in ({}, {"token": "tok-wrong"}, {"token": [TOKEN, TOKEN]}):
        response = await post(svc, body, {}, params=params)
        assert response.status_code == 401, (params, response.text)
    assert (await post(svc, body, {}, params={"token": TOKEN})).status_code == 200
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert (await post(svc, body, bearer)).status_code == 200


async def test_without_credentials_configured_the_endpoint_says_so(
    start_databricks, workspace: FakeWorkspace
):
    svc = await start_databricks()
    response = await post(svc, {"event_type": "jobs.on_start", "run": {"run_id": 1}})
    assert response.status_code == 404
    message = response.json()["error"]["message"]
    assert message.startswith("Databricks notifications are not configured")
    assert (
        "TETHER_DATABRICKS_NOTIFY_USER" in message and "TETHER_DATABRICKS_NOTIFY_TOKEN" in message
    )


async def test_runs_tether_did_not_start_are_200_and_a_burst_of_them_writes_nothing(
    start_databricks, workspace: FakeWorkspace, notify_env
):
    svc = await start_databricks()
    await running_job(svc, workspace)
    before = await tables(svc)
    reads = len(workspace.calls(GET_RUN, "GET"))
    for i in range(200):
        body = {
            "event_type": ("jobs.on_start", "jobs.on_success")[i % 2],
            "workspace_id": workspace.workspace_id,
            "run": {"run_id": 900_000 + i} if i % 3 else {"run_id": str(i), "parent_run_id": "77"},
            "job": {"job_id": "123", "name": "someone else's"},
        }
        response = await post(svc, body)
        assert response.status_code == 200, response.text
        assert response.json()["jobs"] == []
    assert await tables(svc) == before
    assert len(workspace.calls(GET_RUN, "GET")) == reads  # nor asked Databricks anything


MALFORMED = [
    (b'{"event_type": "jobs.on_success", "run": ', 400, "not valid JSON"),
    (b"[1, 2]", 422, "expected a JSON object"),
    (b'{"run": {"run_id": 1}}', 422, "`event_type` is missing"),
    (b'{"event_type": "jobs.on_success", "run": {}}', 422, "`run.run_id` is missing"),
    (b'{"event_type": "jobs.on_start", "run": {"run_id": 1.5}}', 422, "`run.run_id` must be"),
    (b'{"event_type": "jobs.on_start", "run": {"run_id": "12a"}}', 422, "`run.run_id` must"),
    (
        b'{"event_type": "jobs.on_start", "run": {"run_id": 1, "parent_run_id": true}}',
        422,
        "`run.parent_run_id` must be",
    ),
]
"""Bodies of the wrong shape: (body, status, what the message says)."""


async def test_a_malformed_body_is_refused_naming_what_is_wrong(
    start_databricks, workspace: FakeWorkspace, notify_env
):
    svc = await start_databricks()
    for body, status, says in MALFORMED:
        response = await svc.client.post(
            ENDPOINT, content=body, headers={**AUTH, "content-type": "application/json"}
        )
        assert response.status_code == status, (body, response.text)
        assert says in response.json()["error"]["message"], body


async def test_credentials_never_reach_logs_events_or_answers(
    start_databricks, workspace: FakeWorkspace, monkeypatch, logs
):
    monkeypatch.setenv("TETHER_DATABRICKS_NOTIFY_USER", USER)
    monkeypatch.setenv("TETHER_DATABRICKS_NOTIFY_PASSWORD", PASSWORD)
    monkeypatch.setenv("TETHER_DATABRICKS_NOTIFY_TOKEN", TOKEN)
    svc = await start_databricks()
    run = await running_job(svc, workspace)
    body = workspace.notification(run, "jobs.on_start")
    answers = [
        await post(svc, body),
        await post(svc, body, {}, params={"token": TOKEN}),
        await post(svc, body, basic(USER, PASSWORD + "-wrong")),
        await post(svc, body, {}, params={"token": TOKEN + "-wrong"}),
    ]
    assert [a.status_code for a in answers] == [200, 200, 401, 401]
    events = json.dumps(await history(svc, "nightly"))
    job = json.dumps(await svc.job("nightly"))
    shown = [logs.text, events, job, *(a.text for a in answers)]
    pair = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    for secret in (PASSWORD, TOKEN, pair):
        for text in shown:
            assert secret not in text
    assert f"POST {ENDPOINT} 401" in logs.text  # the access log has the path, not the query


# ── settings and reading, without a service ──────────────────────────────────


def test_the_notify_settings_are_declared_checked_and_never_shown():
    plugins = Plugins(make_plugin_manager(entry_points=False))
    names = plugins.setting_names()
    for field in NotifySettings.__struct_fields__:
        assert f"TETHER_DATABRICKS_{field.upper()}" in names
    assert "TETHER_DATABRICKS_PROFILE" in names  # the plugin's other settings stay declared
    with pytest.raises(
        ValueError, match="NOTIFY_USER is set but TETHER_DATABRICKS_NOTIFY_PASSWORD"
    ):
        NotifySettings.from_env({"TETHER_DATABRICKS_NOTIFY_USER": "u"})
    with pytest.raises(
        ValueError, match="NOTIFY_PASSWORD is set but TETHER_DATABRICKS_NOTIFY_USER"
    ):
        NotifySettings.from_env({"TETHER_DATABRICKS_NOTIFY_PASSWORD": "p"})
    with pytest.raises(ValueError, match="has no `:`"):
        NotifySettings.from_env(
            {"TETHER_DATABRICKS_NOTIFY_USER": "a:b", "TETHER_DATABRICKS_NOTIFY_PASSWORD": "p"}
        )
    settings = NotifySettings(notify_user=USER, notify_password=PASSWORD, notify_token=TOKEN)
    assert PASSWORD not in repr(settings) and TOKEN not in repr(settings)
    assert not NotifySettings().configured and settings.configured


def test_run_keys_are_the_run_id_and_a_task_notification_names_its_parent_first():
    assert run_keys({"run_id": 42, "run_page_url": "x"}) == ["42"]
    assert run_keys({"run_page_url": "x"}) == [] and run_keys({"run_id": True}) == []
    about = read({"event_type": "jobs.on_start", "run": {"run_id": "0042"}})
    assert about.keys == ["42"] and about.kind == "jobs.on_start"
    task = {"run_id": 9, "parent_run_id": 42}
    about = read({"event_type": "jobs.on_failure", "run": task, "task": {"task_key": "t"}})
    assert about.keys == ["42", "9"] and about.kind == "jobs.on_failure (task t)"
    with pytest.raises(ValueError, match="more than 20 digits"):
        read({"event_type": "jobs.on_start", "run": {"run_id": "1" * 21}})


def test_a_notice_with_the_credentials_is_never_shown_with_them():
    notice = Notice(headers={k.lower(): v for k, v in AUTH.items()}, query={}, body=None)
    assert PASSWORD not in repr(notice) and AUTH["Authorization"] not in repr(notice)


def test_the_docs_show_the_tested_setup_code_and_every_setting():
    docs = (ROOT / "docs" / "databricks.md").read_text()
    blocks = [b.strip() for b in re.findall(r"```python\n(.*?)```", docs, re.S)]
    code = EXAMPLE.read_text().split('"""', 2)[2].strip()
    assert code in blocks, "docs/databricks.md drifted from examples/databricks_notifications.py"
    for field in NotifySettings.__struct_fields__:
        assert f"TETHER_DATABRICKS_{field.upper()}" in docs
    assert ENDPOINT in (ROOT / "docs" / "plugins.md").read_text()
