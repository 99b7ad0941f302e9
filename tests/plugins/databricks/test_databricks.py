"""The `databricks` backend: the real service, the real databricks-sdk client, a
fake workspace on 127.0.0.1 (tests/plugins/databricks/workspace.py) and the example
notebook run against them."""

from __future__ import annotations

import json
import re
import threading
import time
import typing
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import msgspec
import pytest
from databricks.sdk.service.jobs import JobsAPI, Run

import core.redact
from core.models import Job, Outcome, Running, Trigger
from core.plugins import Plugins, make_plugin_manager
from plugins.databricks import DatabricksParams, SubmitRun, idempotency_token
from plugins.databricks.runs import outcome_of_run
from plugins.databricks.workspace import NO_WORKSPACE, DatabricksSettings, Workspace
from tests.conftest import HOLD, eventually
from tests.plugins.databricks.workspace import (
    EXAMPLE_NOTEBOOK,
    FakeWorkspace,
    example_notebook,
    hang,
    silent,
)

ROOT = Path(__file__).resolve().parents[3]
RUN_NOW = "/api/2.2/jobs/run-now"
SUBMIT = "/api/2.2/jobs/runs/submit"
GET_RUN = "/api/2.2/jobs/runs/get"
CANCEL = "/api/2.2/jobs/runs/cancel"


async def start_job(svc: Any, job_id: str, params: dict[str, Any], **extra: Any) -> None:
    body = {"id": job_id, "backend": "databricks", "params": params, **extra}
    response = await svc.client.post("/jobs", json=body)
    assert response.status_code == 201, response.text


async def external_of(svc: Any, job_id: str) -> dict[str, Any]:
    """The job's `external`, once its trigger step has recorded it (a fast notebook
    may call back before that)."""

    async def recorded() -> Any:
        return (await svc.job(job_id))["external"]

    return await eventually(recorded, timeout=20)  # type: ignore[no-any-return]


def callback_path(svc: Any, job_id: str) -> str:
    return str(svc.tether.signer.url(f"{job_id}:1").removeprefix(svc.settings.base_url))


# ── running a job ────────────────────────────────────────────────────────────


async def test_a_job_succeeds_when_the_example_notebook_calls_back(
    start_databricks, workspace: FakeWorkspace, finished
):
    workspace.add_job(7)
    svc = await start_databricks()
    await start_job(svc, "sales", {"job_id": 7, "job_parameters": {"table": "main.sales.orders"}})

    job = await svc.wait_state("sales", "succeeded", timeout=30)
    run = workspace.only_run()
    assert job["result"] == {"table": "main.sales.orders", "rows": 42}
    assert job["progress"] == {"step": "counting", "table": "main.sales.orders"}  # its heartbeat
    external = await external_of(svc, "sales")
    assert external.pop("state") in {"QUEUED", "RUNNING", "TERMINATED"}  # as it started
    assert external == {
        "run_id": run.run_id,
        "run_page_url": f"{workspace.url}/?o=1#job/7/run/{run.run_id}",
    }
    assert workspace.exits[run.run_id] == json.dumps(job["result"])
    assert run.code == "SUCCESS"

    [request] = workspace.calls(RUN_NOW)
    parameters = request.body["job_parameters"]
    assert parameters["table"] == "main.sales.orders"
    assert parameters["tether_promise_id"] == "sales:1"
    assert parameters["tether_job_id"] == "sales"
    assert parameters["tether_callback_url"] == svc.tether.signer.url("sales:1")
    token = request.body["idempotency_token"]
    assert token.startswith("tether-") and len(token) <= 64
    assert "token=" not in json.dumps(job)
    await eventually(lambda: finished.of("sales") == ["succeeded"], holds=HOLD)


async def test_a_job_fails_with_the_error_the_notebook_reports(
    start_databricks, workspace: FakeWorkspace
):
    workspace.add_job(7)
    svc = await start_databricks()
    await start_job(svc, "missing", {"job_id": 7, "job_parameters": {"table": "main.sales.nope"}})

    job = await svc.wait_state("missing", "failed", timeout=30)
    assert job["error"]["type"] == "AnalysisException"
    assert "TABLE_OR_VIEW_NOT_FOUND" in job["error"]["message"]
    run = workspace.only_run()
    await eventually(lambda: run.code == "RUN_EXECUTION_ERROR")  # the notebook re-raised


async def test_a_one_time_run_gets_the_callback_url_as_notebook_parameters(
    start_databricks, workspace: FakeWorkspace
):
    workspace.notebooks["/Workspace/Shared/tether_example"] = example_notebook
    svc = await start_databricks()
    task = {
        "task_key": "main",
        "existing_cluster_id": "1124-120000-abcd1234",
        "notebook_task": {
            "notebook_path": "/Workspace/Shared/tether_example",
            "base_parameters": {"table": "main.sales.orders"},
        },
    }
    await start_job(svc, "adhoc", {"submit": {"run_name": "adhoc", "tasks": [task]}})

    job = await svc.wait_state("adhoc", "succeeded", timeout=30)
    assert job["result"] == {"table": "main.sales.orders", "rows": 42}
    [request] = workspace.calls(SUBMIT)
    assert request.body["run_name"] == "adhoc"
    assert request.body["idempotency_token"].startswith("tether-")
    [sent] = request.body["tasks"]
    assert sent["existing_cluster_id"] == task["existing_cluster_id"]
    parameters = sent["notebook_task"]["base_parameters"]
    assert parameters["table"] == "main.sales.orders"
    assert parameters["tether_callback_url"] == svc.tether.signer.url("adhoc:1")
    assert (await external_of(svc, "adhoc"))["run_id"] == workspace.only_run().run_id


async def test_credentials_may_come_from_a_profile_the_settings_name(
    start_databricks, workspace: FakeWorkspace, monkeypatch
):
    config = Path.home() / ".databrickscfg"  # HOME is the test's empty directory
    config.write_text(f"[tether-prod]\nhost = {workspace.url}\ntoken = {workspace.token}\n")
    monkeypatch.delenv("DATABRICKS_HOST")
    monkeypatch.delenv("DATABRICKS_TOKEN")
    monkeypatch.setenv("TETHER_DATABRICKS_PROFILE", "tether-prod")
    workspace.add_job(7, notebook="quick")
    workspace.notebooks["quick"] = silent("SUCCESS", after=0.05)
    svc = await start_databricks()
    await start_job(svc, "prof", {"job_id": 7, "check_interval": 1})
    await svc.wait_state("prof", "succeeded", timeout=20)
    assert all(seen.authorized for seen in workspace.seen)


# ── lost callbacks, races and notifications ──────────────────────────────────


async def test_a_lost_callback_is_settled_from_the_run_state(
    start_databricks, workspace: FakeWorkspace, finished, logs
):
    endings = {
        "ok": ("SUCCESS", "", "succeeded"),
        "crash": ("DRIVER_ERROR", "The Spark driver stopped unexpectedly.", "failed"),
        "stopped": ("USER_CANCELED", "Run cancelled by alice@example.com.", "canceled"),
        "skipped": ("SKIPPED", "An upstream task failed.", "failed"),
    }
    for n, (name, (code, message, _)) in enumerate(endings.items(), start=1):
        workspace.notebooks[name] = silent(code, message)
        workspace.add_job(n, notebook=name)
    svc = await start_databricks()
    for n, name in enumerate(endings, start=1):
        await start_job(svc, name, {"job_id": n, "check_interval": 1})

    for name, (code, message, state) in endings.items():
        job = await svc.wait_state(name, state, timeout=20)
        if state == "succeeded":
            assert job["result"] is None  # the notebook gave no exit value (test_output.py)
        else:
            assert job["result"]["termination_code"] == code
            assert job["error"]["type"] == code
            assert message in job["error"]["message"]
        await eventually(lambda name=name, state=state: finished.of(name) == [state], holds=HOLD)
        # settled by the watchdog's status check: nothing calls back, and the
        # trigger's own runs/get (for the run's page) settles nothing
        assert f"job {name} {state} (found by status check)" in logs.text
    assert len(workspace.runs) == 4


async def test_a_run_error_quoting_its_callback_url_keeps_no_token(
    start_databricks, workspace: FakeWorkspace
):
    """A notebook that failed calling back (`HTTPError: 502 … for url:
    <callback_url>`) ends with that in its state message; the status check
    that finds it stores the job's error, result and events without the token."""

    def failing(ws: FakeWorkspace, run: Any) -> None:
        run.start()
        url = run.parameters["tether_callback_url"]
        run.end("RUN_EXECUTION_ERROR", f"HTTPError: 502 Server Error: Bad Gateway for url: {url}")

    workspace.notebooks["quoting"] = failing
    workspace.add_job(1, notebook="quoting")
    svc = await start_databricks()
    await start_job(svc, "q", {"job_id": 1, "check_interval": 1})
    job = await svc.wait_state("q", "failed", timeout=20)
    token = svc.tether.signer.token("q:1")
    assert "for url: " in job["error"]["message"] and "token=***" in job["error"]["message"]
    events = (await svc.client.get("/jobs/q/events")).text
    assert token[:4] not in str(job) and token[:4] not in events


async def test_a_callback_and_a_status_check_racing_settle_once(
    start_databricks, workspace: FakeWorkspace, finished
):
    answers: dict[str, httpx.Response] = {}
    go = threading.Event()
    slow_check = workspace.delay(GET_RUN)
    slow_check.times = 0  # armed later: the second job's status check, after its trigger's read

    def poll_first(ws: FakeWorkspace, run: Any) -> None:
        run.start()
        run.end("SUCCESS")
        go.wait(20)  # until the status check has settled the job
        url = run.parameters["tether_callback_url"]
        answers["first"] = httpx.post(
            url, json={"status": "succeeded", "result": "late"}, trust_env=False
        )

    def callback_first(ws: FakeWorkspace, run: Any) -> None:
        run.start()
        run.end("SUCCESS")
        slow_check.reached.wait(20)  # a status check has read the run; its answer waits
        url = run.parameters["tether_callback_url"]
        answers["second"] = httpx.post(
            url, json={"status": "succeeded", "result": "early"}, trust_env=False
        )
        slow_check.release.set()

    workspace.notebooks |= {"poll-first": poll_first, "callback-first": callback_first}
    workspace.add_job(1, notebook="poll-first")
    workspace.add_job(2, notebook="callback-first")
    svc = await start_databricks()

    await start_job(svc, "first", {"job_id": 1, "check_interval": 1})
    job = await svc.wait_state("first", "succeeded", timeout=20)
    assert job["result"] is None  # the status check won: the run gave no exit value
    go.set()
    await eventually(lambda: "first" in answers)
    assert answers["first"].status_code == 409
    assert answers["first"].json()["outcome"] == "conflict"

    slow_check.times, slow_check.skip = 1, 1
    await start_job(svc, "second", {"job_id": 2, "check_interval": 1})
    await eventually(lambda: slow_check.release.is_set(), timeout=20)
    job = await svc.wait_state("second", "succeeded")
    assert answers["second"].json()["outcome"] == "accepted"
    await eventually(slow_check.answered.is_set)  # the check read SUCCESS, and lost the race

    async def unchanged() -> bool:
        return await svc.job("second") == job  # its later settle changed nothing

    await eventually(unchanged, holds=HOLD)
    assert job["result"] == "early"
    for name in ("first", "second"):
        await eventually(lambda name=name: finished.of(name) == ["succeeded"], holds=HOLD)
        assert (await svc.job(name))["state"] == "succeeded"


async def test_a_databricks_notification_is_checked_not_trusted(
    start_databricks, workspace: FakeWorkspace
):
    workspace.add_job(7, notebook="hang")
    svc = await start_databricks()
    await start_job(svc, "hinted", {"job_id": 7, "check_interval": 3600})
    job = await svc.wait_state("hinted", "running", timeout=20)
    run_id = job["external"]["run_id"]
    path = callback_path(svc, "hinted")

    note = {
        "event_type": "jobs.on_success",
        "workspace_id": "1234567890",
        "run": {"run_id": str(run_id)},  # ids may come as strings
        "job": {"job_id": 7, "name": "job-7"},
    }
    answer = await svc.client.post(path, json=note)  # the run is still going: noted, no change
    assert answer.status_code == 202
    assert answer.json()["outcome"] == "noted"
    assert "has not ended" in answer.json()["message"]
    other = await svc.client.post(path, json={**note, "run": {"run_id": 999}})
    assert other.status_code == 422 and "is about run 999" in other.json()["error"]["message"]
    broken = await svc.client.post(path, json={"event_type": "jobs.on_failure", "run": {}})
    assert broken.status_code == 422 and "run.run_id" in broken.json()["error"]["message"]
    for wrong in (run_id + 0.5, True):  # `int()` read them as a run id
        refused = await svc.client.post(path, json={**note, "run": {"run_id": wrong}})
        assert refused.status_code == 422, refused.text
        assert "`run.run_id` must be a run id" in refused.json()["error"]["message"]
    quoted = await svc.client.post(path, json={"event_type": "jobs.x\n\x1b[2J", "run": {}})
    assert quoted.status_code == 422  # the sender's words quoted back as escapes
    assert "(jobs.x\\n\\x1b[2J)" in quoted.json()["error"]["message"]
    assert (await svc.job("hinted"))["state"] == "running"

    workspace.end(run_id, "RUN_EXECUTION_ERROR", "Task main failed: ZeroDivisionError")
    # the hint says success; the run says failure; the next poll is an hour away
    answer = await svc.client.post(path, json=note)
    assert answer.status_code == 202
    job = answer.json()["job"]
    assert job["state"] == "failed"  # what the run says, not the hint, and at once
    assert "ZeroDivisionError" in job["error"]["message"]
    assert (await svc.job("hinted"))["state"] == "failed"


# ── exactly one run ──────────────────────────────────────────────────────────


async def test_a_dropped_answer_to_run_now_still_makes_exactly_one_run(
    start_databricks, workspace: FakeWorkspace
):
    workspace.add_job(7)
    dropped = workspace.drop(RUN_NOW)
    svc = await start_databricks()
    await start_job(svc, "drop", {"job_id": 7, "job_parameters": {"table": "main.sales.orders"}})

    await svc.wait_state("drop", "succeeded", timeout=30)
    external = await external_of(svc, "drop")
    assert dropped.reached.is_set()
    calls = workspace.calls(RUN_NOW)
    assert len(calls) == 2  # the SDK sent it again after the connection closed
    assert len({c.body["idempotency_token"] for c in calls}) == 1
    assert external["run_id"] == workspace.only_run().run_id


LOST_ANSWER_CASES = pytest.mark.parametrize(
    ("path", "params"),
    [
        (RUN_NOW, {"job_id": 7}),
        (
            SUBMIT,
            {
                "submit": {
                    "tasks": [{"task_key": "main", "notebook_task": {"notebook_path": "hang"}}]
                }
            },
        ),
        (
            SUBMIT,
            {
                "submit": {
                    "tasks": [
                        {
                            "task_key": "main",
                            "python_wheel_task": {"package_name": "p", "entry_point": "e"},
                        }
                    ]
                }
            },
        ),
    ],
    ids=["job", "one-time", "one-time-wheel"],
)
"""A job run, a one-time run with a notebook task (both carry Tether's
parameters) and one without (named by its mark)."""


@LOST_ANSWER_CASES
async def test_a_run_whose_every_trigger_answer_was_lost_is_found_and_canceled(
    start_databricks, workspace: FakeWorkspace, path: str, params: dict[str, Any]
):
    """Databricks started the run, and every try's answer came back cut
    short: the job fails, and its finish finds the run by its promise id
    (`runs/list`) and cancels it, rather than leave it going unrecorded. A
    wheel's run takes no parameters of Tether's: it is found by its name."""
    workspace.notebooks["hang"] = hang
    workspace.add_job(7, notebook="hang")
    workspace.garble(path, times=10)
    svc = await start_databricks(trigger_attempts=2, trigger_backoff=0.05)
    await start_job(svc, "lost", params)

    job = await svc.wait_state("lost", "failed", timeout=30)
    assert job["external"] is None
    run = workspace.only_run()
    await eventually(lambda: run.code == "USER_CANCELED", timeout=20)
    assert [c.body for c in workspace.calls(CANCEL)] == [{"run_id": run.run_id}]
    assert len(workspace.calls(path)) == 2  # one run for both tries: the same token


@LOST_ANSWER_CASES
async def test_another_deployments_run_of_a_job_under_the_same_id_is_left_going(
    start_databricks, workspace: FakeWorkspace, path: str, params: dict[str, Any]
):
    """Staging and production share a workspace, each with a job `nightly`
    (the same promise id): production's run goes on. Staging's tries' every
    answer is lost, so its job fails and its finish looks for the run its
    tries started: it cancels its own, not production's (which it would
    take by the promise id alone)."""
    workspace.notebooks["hang"] = hang
    workspace.add_job(7, notebook="hang")
    production = await start_databricks(callback_secret="production-secret")
    staging = await start_databricks(
        callback_secret="staging-secret", trigger_attempts=2, trigger_backoff=0.05
    )
    await start_job(production, "nightly", params)
    theirs = (await external_of(production, "nightly"))["run_id"]

    workspace.garble(path, times=10)
    await start_job(staging, "nightly", params)
    job = await staging.wait_state("nightly", "failed", timeout=30)
    assert job["external"] is None
    [ours] = [run for run in workspace.runs.values() if run.run_id != theirs]
    await eventually(lambda: ours.code == "USER_CANCELED", timeout=20)
    await eventually(lambda: len(workspace.calls(CANCEL)) == 1, holds=HOLD)
    assert [c.body for c in workspace.calls(CANCEL)] == [{"run_id": ours.run_id}]
    assert workspace.runs[theirs].status != "TERMINATED"
    assert (await production.job("nightly"))["state"] == "running"


async def test_an_answer_to_run_now_cut_short_is_tried_again_for_the_same_run(
    start_databricks, workspace: FakeWorkspace
):
    """A 200 whose body is not JSON (cut short, or a proxy's page) is a
    failed try, tried again: the run it started is the job's, and the only one."""
    workspace.notebooks["hang"] = hang  # so the job waits for the trigger's record
    workspace.add_job(7, notebook="hang")
    garbled = workspace.garble(RUN_NOW)
    svc = await start_databricks()
    await start_job(svc, "cut", {"job_id": 7, "job_parameters": {"table": "main.sales.orders"}})

    await svc.wait_state("cut", "running", timeout=30)
    await external_of(svc, "cut")
    assert garbled.reached.is_set()
    calls = workspace.calls(RUN_NOW)
    assert len({c.body["idempotency_token"] for c in calls}) == 1
    assert (await external_of(svc, "cut"))["run_id"] == workspace.only_run().run_id
    items = (await svc.client.get("/jobs/cut/events")).json()["items"]
    [failed] = [e for e in items if e["type"] == "trigger_failed"]
    assert failed["data"]["error"]["type"] == "bad_answer"
    assert "answer was not JSON" in failed["data"]["error"]["message"]


def test_the_idempotency_token_is_stable_per_job_and_differs_between_jobs():
    job = msgspec.convert(
        {
            "id": "j", "backend": "databricks", "state": "pending", "params": {},
            "metadata": {}, "timeout": 1.0, "external": None, "result": None,
            "error": None, "created_at": "2026-11-24T10:00:00.123Z",
            "updated_at": "2026-11-24T10:00:00.123Z", "finished_at": None,
        },
        Job,
    )  # fmt: skip
    trigger = Trigger(
        job=job, params=None, promise_id="j:1", callback_url="", idempotency_key="j:1"
    )
    token = idempotency_token(trigger)
    assert token == idempotency_token(msgspec.structs.replace(trigger)) and len(token) <= 64
    reused_id = msgspec.structs.replace(
        trigger, job=msgspec.structs.replace(job, created_at=job.created_at.replace(year=2027))
    )
    assert idempotency_token(reused_id) != token


# ── cancel and timeout ───────────────────────────────────────────────────────


async def test_cancel_cancels_the_databricks_run(start_databricks, workspace: FakeWorkspace):
    workspace.add_job(7, notebook="hang")
    svc = await start_databricks()
    await start_job(svc, "stop", {"job_id": 7})
    job = await svc.wait_state("stop", "running", timeout=20)

    assert (await svc.client.post("/jobs/stop/cancel")).status_code == 200
    run = workspace.only_run()
    await eventually(lambda: run.code == "USER_CANCELED")
    await eventually(lambda: len(workspace.calls(CANCEL)) == 1, holds=HOLD)
    assert [c.body for c in workspace.calls(CANCEL)] == [{"run_id": job["external"]["run_id"]}]
    assert (await svc.job("stop"))["state"] == "canceled"


async def test_a_timeout_cancels_the_databricks_run(start_databricks, workspace: FakeWorkspace):
    workspace.add_job(7, notebook="hang")
    svc = await start_databricks()
    await start_job(svc, "slow", {"job_id": 7}, timeout=2)

    job = await svc.wait_state("slow", "timed_out", timeout=20)
    run = workspace.only_run()
    await eventually(lambda: run.code == "USER_CANCELED")
    assert job["external"]["run_id"] == run.run_id


# ── bad params and refusals ──────────────────────────────────────────────────

TASK = {"task_key": "t", "notebook_task": {"notebook_path": "/x"}}
BAD_PARAMS = [
    ({}, "exactly one of `job_id`", "params"),
    ({"job_id": 1, "submit": {"tasks": [TASK]}}, "exactly one of", "params"),
    ({"job_id": "7"}, "Expected a number or null, got `str`", "params.job_id"),
    ({"job_id": "abc"}, "Expected a number or null, got `str`", "params.job_id"),
    ({"job_id": 7.5}, "`job_id` must be a whole number", "params"),
    ({"job_id": 7, "jobparameters": {}}, "unknown field `jobparameters`", "params"),
    (
        {"job_id": 7, "job_parameters": {"n": 1}},
        "Expected `str`, got `int`",
        "params.job_parameters",
    ),
    (
        {"job_id": 7, "job_parameters": {"tether_callback_url": "x"}},
        "must not set tether_callback_url",
        "params",
    ),
    ({"job_id": 0}, "Expected `int` >= 1", "params.job_id"),
    ({"job_id": 2**63}, "Expected `int` <= 9223372036854775807", "params.job_id"),
    ({"job_id": 10**23}, "Expected `int` <= 9223372036854775807", "params.job_id"),
    ({"job_id": 1e300}, "Expected `float` <= 9007199254740991.0", "params.job_id"),
    ({"job_id": 7, "job_parameters": {"": "x"}}, "without a name", "params"),
    ({"job_id": 7, "check_interval": 0.01}, "Expected `float` >= 1.0", "params.check_interval"),
    ({"submit": {"tasks": []}}, "Expected `array` of length >= 1", "params.submit.tasks"),
    ({"submit": {"tasks": [{"notebook_task": {}}]}}, "needs a `task_key`", "params.submit"),
    ({"submit": {"tasks": [TASK], "name": "x"}}, "unknown field `name`", "params.submit"),
]


async def test_bad_params_are_refused_naming_the_field(start_databricks, workspace: FakeWorkspace):
    svc = await start_databricks()
    for params, message, where in BAD_PARAMS:
        response = await svc.client.post("/jobs", json={"backend": "databricks", "params": params})
        assert response.status_code == 422, (params, response.text)
        text = response.json()["error"]["message"]
        assert message in text and f"`{where}" in text, (params, text)
    assert workspace.seen == []


async def test_a_misspelt_field_of_a_one_time_run_fails_the_job_before_any_run(
    start_databricks, workspace: FakeWorkspace
):
    svc = await start_databricks()
    task = {"task_key": "t", "notebook_task": {"notebook_path": "/x", "base_paramters": {"a": "b"}}}
    await start_job(svc, "typo", {"submit": {"tasks": [task]}})
    job = await svc.wait_state("typo", "failed", timeout=20)
    assert "`submit.tasks[0].notebook_task.base_paramters`" in job["error"]["message"]
    assert job["error"]["type"] == "INVALID_PARAMETER_VALUE"
    assert workspace.seen == []


async def test_a_task_key_used_twice_fails_the_job_before_any_run(
    start_databricks, workspace: FakeWorkspace
):
    svc = await start_databricks()
    await start_job(svc, "twice", {"submit": {"tasks": [TASK, TASK]}})
    job = await svc.wait_state("twice", "failed", timeout=20)
    assert "tasks[1]: task_key 't' is used twice" in job["error"]["message"]
    assert job["error"]["type"] == "INVALID_PARAMETER_VALUE"
    assert workspace.seen == []


async def test_databricks_refusals_fail_the_job_with_its_error_code_and_message(
    start_databricks, workspace: FakeWorkspace
):
    workspace.add_job(7)
    workspace.add_job(8, tether_parameters=False)
    denied = "User alice@example.com does not have Manage Run permissions on Job 7."
    workspace.fail(RUN_NOW, 403, "PERMISSION_DENIED", denied)
    svc = await start_databricks()
    cases = {
        "denied": (7, "PERMISSION_DENIED", denied),
        "absent": (404, "RESOURCE_DOES_NOT_EXIST", "Job 404 does not exist."),
        "undefined": (8, "INVALID_PARAMETER_VALUE", "are not defined in job 8"),
    }
    for name, (job_id, _, _) in cases.items():
        await start_job(svc, name, {"job_id": job_id})
        await svc.wait_state(name, "failed", timeout=20)  # one at a time: the fault is for 7
    for name, (_, code, message) in cases.items():
        job = await svc.job(name)
        assert job["error"]["type"] == code
        assert message in job["error"]["message"]
        assert job["external"] is None
    assert len(workspace.calls(RUN_NOW)) == 3  # none of them retried
    assert workspace.runs == {}


async def test_a_wrong_token_fails_the_job_and_appears_nowhere(
    start_databricks, workspace: FakeWorkspace, monkeypatch, logs
):
    wrong = "dapi" + "f" * 32
    monkeypatch.setenv("DATABRICKS_TOKEN", wrong)
    workspace.echo_credentials = True  # the workspace's error message repeats it
    workspace.add_job(7)
    svc = await start_databricks()
    await start_job(svc, "auth", {"job_id": 7})

    job = await svc.wait_state("auth", "failed", timeout=20)
    assert job["error"]["type"] == "PERMISSION_DENIED"
    assert "Invalid access token." in job["error"]["message"]
    listed = (await svc.client.get("/jobs")).text
    assert "< 403 Forbidden" not in logs.text  # the SDK's request dumps stay off
    await eventually(lambda: "job auth finished: failed" in logs.text)  # the finish step, later
    for text in (json.dumps(job), listed, logs.text):
        assert wrong not in text
        assert workspace.token not in text


async def test_a_token_quoted_percent_encoded_by_the_workspace_appears_nowhere(
    start_databricks, workspace: FakeWorkspace, monkeypatch, logs
):
    """A workspace (or a proxy) quoting the token percent-encoded in its
    error: the job's error was masked, its `trigger_failed` events and the
    log lines kept it whole (found by a QA pass, 2026-12-07)."""
    token = "Zk9/q+Xw=Lm2Rt8sVb4Nc7Hd1Jf6Gk3Pa5"
    workspace.token = token
    monkeypatch.setenv("DATABRICKS_TOKEN", token)
    monkeypatch.setattr(core.redact, "_ENVIRONMENT", None)  # read again, with it
    encoded = quote(token, safe="")
    workspace.add_job(7)
    said = f"proxy says: bad credential {encoded} (or {token[5:]}, {json.dumps(token)[1:-1]})"
    workspace.fail(RUN_NOW, 503, "TEMPORARILY_UNAVAILABLE", said, times=10)
    svc = await start_databricks(trigger_attempts=2)
    await start_job(svc, "quoted", {"job_id": 7})
    job = await svc.wait_state("quoted", "failed", timeout=30)
    assert "proxy says: bad credential ***" in job["error"]["message"]
    events = (await svc.client.get("/jobs/quoted/events")).json()["items"]
    assert [e["type"] for e in events].count("trigger_failed") == 2
    await eventually(lambda: "job quoted finished: failed" in logs.text)
    for text in (json.dumps(job), json.dumps(events), logs.text):
        assert "proxy says: bad credential" in text
        for form in (token, encoded, token[5:], json.dumps(token)[1:-1], token[:12]):
            assert form not in text


async def test_missing_credentials_fail_the_job_saying_so(
    start_databricks, workspace: FakeWorkspace, monkeypatch, tmp_path
):
    """Nothing names a workspace: the trigger fails at once, saying what to
    set, as the readiness check does (not the SDK's page of text)."""
    monkeypatch.delenv("DATABRICKS_HOST")
    monkeypatch.delenv("DATABRICKS_TOKEN")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.databrickscfg
    svc = await start_databricks()
    await start_job(svc, "nocreds", {"job_id": 7})
    job = await svc.wait_state("nocreds", "failed", timeout=20)
    assert job["error"] == {
        "message": f"trigger failed: {NO_WORKSPACE}",
        "type": "databricks_config",
    }
    assert workspace.seen == []


async def test_an_unreachable_workspace_fails_the_trigger_after_bounded_retries(
    start_databricks, workspace: FakeWorkspace, monkeypatch, refused_url: str
):
    monkeypatch.setenv("DATABRICKS_HOST", refused_url)
    monkeypatch.setenv("TETHER_DATABRICKS_RETRY_TIMEOUT", "1")
    svc = await start_databricks(trigger_attempts=2)
    started = time.monotonic()
    await start_job(svc, "down", {"job_id": 7})
    job = await svc.wait_state("down", "failed", timeout=30)
    assert time.monotonic() - started < 20
    assert job["error"]["type"] == "timeout"
    assert "Databricks did not answer" in job["error"]["message"]


async def test_throttling_and_unavailability_are_retried_by_tether_honouring_retry_after(
    start_databricks, workspace: FakeWorkspace, logs
):
    """Not by the SDK, unseen within its retry budget (5 s here): by Tether's
    trigger retries, each one logged (and a `trigger_failed` event:
    test_big_runs.py)."""
    workspace.add_job(7)
    params = {"job_id": 7, "job_parameters": {"table": "main.sales.orders"}}
    workspace.fail(RUN_NOW, 503, "TEMPORARILY_UNAVAILABLE", "try later", retry_after=1)
    workspace.fail(RUN_NOW, 429, "REQUEST_LIMIT_EXCEEDED", "slow down", retry_after=1)
    svc = await start_databricks()
    await start_job(svc, "throttled", params)
    await svc.wait_state("throttled", "succeeded", timeout=30)
    await external_of(svc, "throttled")
    first, second, third = workspace.calls(RUN_NOW)
    assert second.at - first.at >= 1 and third.at - second.at >= 1
    assert "job throttled: trigger try 1/4 failed (try later" in logs.text
    assert "job throttled: trigger try 2/4 failed (slow down" in logs.text
    assert "again in 1.0s" in logs.text
    assert first.body["idempotency_token"] == third.body["idempotency_token"]
    assert len(workspace.runs) == 1


# ── the plugin itself ────────────────────────────────────────────────────────


def test_registering_the_plugin_reads_settings_only(workspace: FakeWorkspace):
    plugins = Plugins(make_plugin_manager(entry_points=False))
    assert sorted(plugins.backends) == ["databricks", "databricks_sql", "http_webhook"]
    assert plugins.backends["databricks"].workspace._client is None  # type: ignore[attr-defined]
    assert workspace.seen == []


def test_bad_plugin_settings_stop_the_service_naming_the_variable():
    with pytest.raises(ValueError, match="TETHER_DATABRICKS_RETRY_TIMEOUT"):
        DatabricksSettings.from_env({"TETHER_DATABRICKS_RETRY_TIMEOUT": "soon"})
    with pytest.raises(ValueError, match="TETHER_DATABRICKS_HTTP_TIMEOUT"):
        DatabricksSettings.from_env({"TETHER_DATABRICKS_HTTP_TIMEOUT": "0"})
    settings = DatabricksSettings.from_env({"TETHER_DATABRICKS_PROFILE": "prod"})
    assert (settings.profile, settings.retry_timeout, settings.http_timeout) == ("prod", 60, 30.0)


def test_error_messages_are_scrubbed_of_credentials(monkeypatch):
    monkeypatch.setenv("DATABRICKS_TOKEN", "s3cr3t-token-value")
    scrub = Workspace(DatabricksSettings()).scrub
    text = scrub(
        "denied for s3cr3t-token-value; Authorization: Bearer abc.def;"
        ' url=https://t/cb?x=1&token=T0K {"token": "zzz"} dapi0123456789abcdef0123'
        ' Request log:```GET /x\n> {"job_parameters": 1}```'
    )
    for secret in ("s3cr3t-token-value", "abc.def", "T0K", "zzz", "dapi0123", "job_parameters"):
        assert secret not in text
    # every form `core.redact` knows: percent-encoded, JSON-escaped, and what
    # a cut left (found by a QA pass, 2026-12-07: the token as written alone)
    token = "Zk9/q+Xw=Lm2Rt8sVb4Nc7Hd1Jf6Gk3Pa5"
    monkeypatch.setenv("DATABRICKS_TOKEN", token)
    for form in (quote(token, safe=""), token.replace("/", "\\/")):
        assert scrub(f"denied: {form}!") == "denied: ***!"
    assert "Lm2Rt8sVb4" not in scrub("denied: Xw=Lm2Rt8sVb4Nc7…")
    # a password whole, in its forms; not the word after its space (`forms`
    # read it as an Authorization value's: every "1" was masked, a review)
    monkeypatch.setenv("DATABRICKS_PASSWORD", "letmein 1")
    said = scrub("Run 1 of job 2024 failed for letmein 1 (letmein%201)")
    assert said == "Run 1 of job 2024 failed for *** (***)"
    assert scrub("x" * 5000).endswith("…") and len(scrub("x" * 5000)) == 1000


def test_the_one_time_run_fields_are_those_of_the_sdk():
    sdk = set(typing.get_type_hints(JobsAPI.submit)) - {"return", "idempotency_token"}
    assert set(SubmitRun.__struct_fields__) == sdk


RUN_STATES = [
    # (status, state) → (outcome status, code), "running" while the run goes
    # on, or None when this SDK cannot tell
    (
        {"state": "RUNNING"},
        {"life_cycle_state": "TERMINATED", "result_state": "SUCCESS"},
        "running",
    ),
    ({"state": "TERMINATING"}, None, "running"),
    ({"state": "SOMETHING_NEW"}, {"life_cycle_state": "RUNNING"}, "running"),
    (None, {"life_cycle_state": "SOMETHING_NEW"}, None),
    (None, None, None),
    (
        {"state": "TERMINATED", "termination_details": {"code": "RUN_EXECUTION_ERROR"}},
        {"life_cycle_state": "INTERNAL_ERROR", "result_state": "FAILED"},
        ("failed", "RUN_EXECUTION_ERROR"),
    ),
    (
        {"state": "TERMINATED", "termination_details": {"code": "SUCCESS_WITH_FAILURES"}},
        None,
        ("succeeded", "SUCCESS_WITH_FAILURES"),
    ),
    (
        {"state": "TERMINATED", "termination_details": {"code": "CANCELED"}},
        None,
        ("failed", "CANCELED"),  # canceled by Databricks itself (its timeout), not a user
    ),
    (
        {"state": "TERMINATED", "termination_details": {"code": "A_NEW_CODE"}},
        {"life_cycle_state": "TERMINATED", "result_state": "SUCCESS"},
        ("succeeded", "SUCCESS"),
    ),
    (
        {"state": "TERMINATED", "termination_details": {"code": "A_NEW_CODE"}},
        None,
        ("failed", "UNKNOWN"),
    ),
    (None, {"life_cycle_state": "TERMINATED", "result_state": "SUCCESS"}, ("succeeded", "SUCCESS")),
    (None, {"life_cycle_state": "TERMINATED", "result_state": "TIMEDOUT"}, ("failed", "TIMEDOUT")),
    (
        None,
        {"life_cycle_state": "TERMINATED", "result_state": "CANCELED"},
        ("canceled", "CANCELED"),
    ),
    (
        None,
        {"life_cycle_state": "TERMINATED", "result_state": "UPSTREAM_FAILED"},
        ("failed", "UPSTREAM_FAILED"),
    ),
    (None, {"life_cycle_state": "SKIPPED"}, ("failed", "SKIPPED")),
    (None, {"life_cycle_state": "INTERNAL_ERROR"}, ("failed", "INTERNAL_ERROR")),
]


@pytest.mark.parametrize(("status", "state", "expected"), RUN_STATES)
def test_run_states_are_read_from_status_first(status, state, expected):
    body: dict[str, Any] = {"run_id": 5}
    if status is not None:
        body["status"] = status
    if state is not None:
        body["state"] = {**state, "state_message": "msg"}
    outcome = outcome_of_run(Run.from_dict(body))
    if expected is None:
        assert outcome is None
    elif expected == "running":
        assert isinstance(outcome, Running)
    else:
        assert isinstance(outcome, Outcome)
        assert (outcome.status, outcome.result["termination_code"]) == expected
        if outcome.status != "succeeded":
            assert outcome.error is not None and outcome.error.type == expected[1]
            assert "Databricks run 5" in outcome.error.message


def test_the_docs_show_the_tested_example_notebook():
    docs = (ROOT / "docs" / "databricks.md").read_text()
    blocks = [b.strip() for b in re.findall(r"```python\n(.*?)```", docs, re.S)]
    assert EXAMPLE_NOTEBOOK.read_text().strip() in blocks, "docs/databricks.md drifted"
    for name in ("tether_callback_url", "tether_promise_id", "tether_job_id", "check_interval"):
        assert f"`{name}`" in docs
    for variable in DatabricksSettings.__struct_fields__:
        assert f"TETHER_DATABRICKS_{variable.upper()}" in docs
    assert DatabricksParams.__struct_fields__ == (
        "job_id",
        "job_parameters",
        "submit",
        "check_interval",
    )


async def test_the_openapi_document_says_exactly_one_kind_of_run(start_databricks):
    svc = await start_databricks()
    doc = (await svc.client.get("/schema/openapi.json")).json()
    schemas = doc["components"]["schemas"]
    params = schemas["DatabricksParams"]
    assert [kind["required"] for kind in params["oneOf"]] == [["job_id"], ["submit"]]
    assert params["properties"]["job_id"]["anyOf"][0] == {
        "type": "integer",
        "exclusiveMinimum": 0,
        "maximum": 2**63 - 1,
    }
    assert params["properties"]["job_id"]["anyOf"][1]["maximum"] == 2**53 - 1
    assert params["properties"]["check_interval"]["minimum"] == 1
    names = params["properties"]["job_parameters"]["propertyNames"]
    assert names["minLength"] == 1 and "tether_callback_url" in names["not"]["enum"]
    tasks = schemas["SubmitRun"]["properties"]["tasks"]
    assert tasks["minItems"] == 1 and tasks["items"]["required"] == ["task_key"]
