"""Big and queued runs (issue 18, part 4): a run of 250 tasks (`runs/get` pages
them by 100) reports every failed task; `QUEUED` and `BLOCKED` runs show as such;
429s and a workspace at its limit of concurrent runs are Tether's retries, each a
`trigger_failed` event, not the SDK's unseen ones. The real service, the real
databricks-sdk client, the fake workspace."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

import core.callbacks
from core.errors import BackendError
from plugins.databricks.workspace import DatabricksSettings, Workspace
from tests.conftest import eventually
from tests.plugins.databricks.workspace import FakeWorkspace, Run

RUN_NOW = "/api/2.2/jobs/run-now"
GET_RUN = "/api/2.2/jobs/runs/get"
GET_OUTPUT = "/api/2.2/jobs/runs/get-output"


async def start_job(svc: Any, job_id: str, params: dict[str, Any], **extra: Any) -> None:
    body = {"id": job_id, "backend": "databricks", "params": params, **extra}
    response = await svc.client.post("/jobs", json=body)
    assert response.status_code == 201, response.text


async def history(svc: Any, job_id: str, kind: str) -> list[dict[str, Any]]:
    items = (await svc.client.get(f"/jobs/{job_id}/events")).json()["items"]
    return [e for e in items if e["type"] == kind]


# ── 250 tasks ────────────────────────────────────────────────────────────────


async def test_a_run_of_250_tasks_reports_every_failed_task_across_pages(
    start_databricks, workspace: FakeWorkspace
):
    keys = [f"t{n:03}" for n in range(250)]
    broken = {"t007": "KeyError: 'id'", "t150": "OSError: disk full", "t249": "ValueError: late"}

    def play(ws: FakeWorkspace, run: Run) -> None:
        run.start()
        for task in run.tasks:
            if task.task_key in broken:
                task.code, task.error = "RUN_EXECUTION_ERROR", broken[task.task_key]
                task.message = "Workload failed, see run output for details"
            elif task.task_key > "t200":
                task.code, task.message = "UPSTREAM_FAILED", "Upstream task failed."
            else:
                task.code = "SUCCESS"
        run.end("RUN_EXECUTION_ERROR", "3 of 250 tasks failed")

    workspace.notebooks["wide"] = play
    workspace.add_job(7, notebook="wide").tasks = keys
    svc = await start_databricks()
    await start_job(svc, "wide", {"job_id": 7, "check_interval": 1})

    job = await svc.wait_state("wide", "failed", timeout=20)
    failed = job["result"]["failed_tasks"]
    assert [(f["task_key"], f["error"]) for f in failed] == list(broken.items())
    message = job["error"]["message"]
    assert message.startswith(
        f"Databricks run {workspace.only_run().run_id} failed (RUN_EXECUTION_ERROR):"
        " 3 of 250 tasks failed; 3 tasks failed: t007 (RUN_EXECUTION_ERROR)"
    )
    assert "t249 (RUN_EXECUTION_ERROR): Workload failed, see run output for details:" in message
    assert message.endswith("ValueError: late")
    assert len(workspace.calls(GET_OUTPUT, "GET")) == 3
    assert len(workspace.calls(GET_RUN, "GET")) % 3 == 0  # each read: three pages of tasks


async def test_a_wide_run_that_succeeds_gives_every_tasks_value(
    start_databricks, workspace: FakeWorkspace
):
    keys = [f"t{n:03}" for n in range(120)]

    def play(ws: FakeWorkspace, run: Run) -> None:
        run.start()
        for n, task in enumerate(run.tasks):
            task.code, task.output = "SUCCESS", str(n)
        run.end("SUCCESS")

    workspace.notebooks["wide"] = play
    workspace.add_job(7, notebook="wide").tasks = keys
    svc = await start_databricks()
    await start_job(svc, "wide", {"job_id": 7, "check_interval": 1})
    job = await svc.wait_state("wide", "succeeded", timeout=20)
    assert job["result"] == {key: n for n, key in enumerate(keys)}  # past the first page too


# ── queued and blocked runs ──────────────────────────────────────────────────


async def test_queued_and_blocked_runs_show_as_such(
    start_databricks, workspace: FakeWorkspace, monkeypatch: pytest.MonkeyPatch
):
    # each change of the run's state filed at once (checks every second)
    monkeypatch.setattr(core.callbacks, "GOING_CHANGED_EVERY", 0.0)
    go = {"blocked": threading.Event(), "running": threading.Event()}
    limit = "The workspace has reached its limit of 2000 concurrent active runs."

    def play(ws: FakeWorkspace, run: Run) -> None:
        ws.hold_in(run.run_id, "QUEUED", "ACTIVE_RUNS_LIMIT_REACHED", limit)
        go["blocked"].wait(30)
        ws.hold_in(run.run_id, "BLOCKED")
        go["running"].wait(30)
        run.start()
        run.end("SUCCESS")

    workspace.notebooks["waits"] = play
    workspace.add_job(7, notebook="waits")
    svc = await start_databricks()
    await start_job(svc, "waits", {"job_id": 7, "check_interval": 1})

    job = await svc.wait_state("waits", "running", timeout=20)

    async def external() -> Any:
        return (await svc.job("waits"))["external"]

    assert (await eventually(external))["state"] == "QUEUED"

    async def checked(state: str) -> list[dict[str, Any]]:
        said = await history(svc, "waits", "status_check")
        return [e for e in said if e["data"].get("progress", {}).get("state") == state]

    [queued, *_] = await eventually(lambda: checked("QUEUED"), timeout=20)
    assert queued["data"] == {
        "said": "running",
        "progress": {
            "state": "QUEUED",
            "queue": {"code": "ACTIVE_RUNS_LIMIT_REACHED", "message": limit},
        },
    }
    go["blocked"].set()
    [blocked, *_] = await eventually(lambda: checked("BLOCKED"), timeout=20)
    assert blocked["data"] == {"said": "running", "progress": {"state": "BLOCKED"}}
    job = await svc.job("waits")
    assert (job["state"], job["external"]["state"]) == ("running", "BLOCKED")  # kept current
    assert job["external"]["run_id"]  # what the trigger wrote stays
    go["running"].set()
    await svc.wait_state("waits", "succeeded", timeout=20)


# ── rate limits and the workspace's limits ───────────────────────────────────


async def test_throttled_triggers_are_trigger_failed_events_until_they_pass(
    start_databricks, workspace: FakeWorkspace
):
    workspace.add_job(7, notebook="hang")
    workspace.fail(RUN_NOW, 429, "REQUEST_LIMIT_EXCEEDED", "Too many requests.", retry_after=1)
    full = "The workspace has reached the maximum number of concurrent active runs."
    workspace.fail(RUN_NOW, 429, "RESOURCE_EXHAUSTED", full, retry_after=1)
    svc = await start_databricks()
    started = time.monotonic()
    await start_job(svc, "busy", {"job_id": 7})

    job = await svc.wait_state("busy", "running", timeout=30)
    first, second = await history(svc, "busy", "trigger_failed")
    assert first["data"] == {
        "try": 1,
        "error": {"type": "REQUEST_LIMIT_EXCEEDED", "message": "Too many requests."},
        "retry_in": 1.0,
        "retryable": True,
    }
    assert second["data"] == {
        "try": 2,
        "error": {"type": "RESOURCE_EXHAUSTED", "message": full},
        "retry_in": 1.0,  # its Retry-After: Tether's own backoff is 0.05 s here
        "retryable": True,
    }
    calls = workspace.calls(RUN_NOW)
    assert len(calls) == 3  # one per try: the SDK retried none of them
    assert calls[1].at - calls[0].at >= 1 and calls[2].at - calls[1].at >= 1
    assert time.monotonic() - started < 15
    assert len({c.body["idempotency_token"] for c in calls}) == 1
    assert job["external"]["run_id"] == workspace.only_run().run_id
    workspace.end(job["external"]["run_id"], "SUCCESS")


async def test_a_job_fails_only_once_its_trigger_attempts_are_spent(
    start_databricks, workspace: FakeWorkspace
):
    workspace.add_job(7)
    workspace.fail(RUN_NOW, 429, "REQUEST_LIMIT_EXCEEDED", "Too many requests.", times=9)
    svc = await start_databricks(trigger_attempts=3, trigger_backoff=0.1)
    await start_job(svc, "limited", {"job_id": 7})
    job = await svc.wait_state("limited", "failed", timeout=30)
    tries = await history(svc, "limited", "trigger_failed")
    assert [t["data"]["try"] for t in tries] == [1, 2, 3]
    assert [t["data"]["retry_in"] for t in tries] == [1.0, 1.0, None]  # Retry-After: 1 (default)
    assert job["error"] == {
        "message": "trigger failed: Too many requests.",
        "type": "REQUEST_LIMIT_EXCEEDED",
    }
    assert len(workspace.calls(RUN_NOW)) == 3


@pytest.mark.parametrize(("status", "code"), [(429, "REQUEST_LIMIT_EXCEEDED"), (503, "")])
async def test_the_sdk_hands_throttling_back_at_once_with_its_retry_after(
    workspace: FakeWorkspace, status: int, code: str
):
    """Without `hand_back_throttling` the SDK would sleep the 30 s of
    Retry-After and ask again, within its 60 s budget."""
    ws = Workspace(DatabricksSettings(retry_timeout=60, http_timeout=5, threads=1))
    workspace.fail(GET_RUN, status, code, "later", retry_after=30, method="GET")
    started = time.monotonic()
    with pytest.raises(BackendError) as raised:
        await ws.call(lambda w: w.jobs.get_run(5))
    assert time.monotonic() - started < 5
    assert (raised.value.retryable, raised.value.retry_after) == (True, 30)
    assert len(workspace.calls(GET_RUN, "GET")) == 1


async def test_the_sdk_still_retries_a_dropped_connection_itself(workspace: FakeWorkspace):
    ws = Workspace(DatabricksSettings(retry_timeout=60, http_timeout=5, threads=1))
    workspace.add_job(7, notebook="hang")
    workspace.drop(RUN_NOW)
    answer = await ws.call(lambda w: w.jobs.run_now(7, idempotency_token="t"))
    assert answer.run_id == workspace.only_run().run_id
    assert len(workspace.calls(RUN_NOW)) == 2
