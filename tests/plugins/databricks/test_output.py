"""Results without a callback (issue 18, part 2): a run that ends with no
callback settles its job with what `runs/get-output` says, through the real
service, the real databricks-sdk client and the fake workspace. The notebook
without Tether code is the one docs/databricks.md shows."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from tests.conftest import eventually
from tests.plugins.databricks.workspace import (
    FakeWorkspace,
    NotebookExit,
    Run,
    StubDbutils,
    StubSpark,
    hang,
)

ROOT = Path(__file__).resolve().parents[3]
GET_OUTPUT = "/api/2.2/jobs/runs/get-output"
SUBMIT = "/api/2.2/jobs/runs/submit"


def docs_notebook() -> str:
    """The notebook without Tether code, as docs/databricks.md shows it."""
    docs = (ROOT / "docs" / "databricks.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", docs, re.S)
    [cell] = [b for b in blocks if "A notebook without Tether code" in b]
    return cell  # type: ignore[no-any-return]


def run_cell(cell: str) -> Callable[[FakeWorkspace, Run], None]:
    """A notebook that runs `cell` as Databricks would: an exception fails the
    run (its message is what `runs/get-output` says), `exit` ends it."""

    def play(ws: FakeWorkspace, run: Run) -> None:
        run.start()
        scope = {"dbutils": StubDbutils(run.parameters), "spark": StubSpark(ws.tables)}
        try:
            exec(compile(cell, "notebook", "exec"), scope)
        except NotebookExit as done:
            ws.exits[run.run_id] = done.value
            run.end("SUCCESS")
        except Exception as exc:
            run.tasks[0].error = f"{type(exc).__name__}: {exc}"
            run.end("RUN_EXECUTION_ERROR", "Workload failed, see run output for details")
        else:
            run.end("SUCCESS")

    return play


async def start_job(svc: Any, job_id: str, params: dict[str, Any], **extra: Any) -> None:
    body = {"id": job_id, "backend": "databricks", "params": params, **extra}
    response = await svc.client.post("/jobs", json=body)
    assert response.status_code == 201, response.text


async def history(svc: Any, job_id: str) -> list[dict[str, Any]]:
    return (await svc.client.get(f"/jobs/{job_id}/events")).json()["items"]  # type: ignore[no-any-return]


def ends_with(
    code: str, outputs: dict[str, Any] | None = None, after: float = 0.1
) -> Callable[[FakeWorkspace, Run], None]:
    """A run that sets its tasks' outputs (task key → exit value, or a dict of
    `TaskRun` fields) and ends with `code` after `after` seconds; no callback."""

    def play(ws: FakeWorkspace, run: Run) -> None:
        run.start()
        for task in run.tasks:
            given = (outputs or {}).get(task.task_key)
            if isinstance(given, dict):
                for name, value in given.items():
                    setattr(task, name, value)
            elif given is not None:
                task.output = given
        if not run.ended.wait(after):
            run.end(code)

    return play


# ── a notebook without Tether code ───────────────────────────────────────────


async def test_a_notebook_without_tether_code_ends_its_job_with_its_exit_value_or_error(
    start_databricks, workspace: FakeWorkspace
):
    workspace.notebooks["plain"] = run_cell(docs_notebook())
    workspace.add_job(7, notebook="plain")
    svc = await start_databricks()
    for name, table in (("plain", "main.sales.orders"), ("nope", "main.sales.nope")):
        params = {"job_id": 7, "job_parameters": {"table": table}, "check_interval": 1}
        await start_job(svc, name, params)

    job = await svc.wait_state("plain", "succeeded", timeout=20)
    assert job["result"] == {"table": "main.sales.orders", "rows": 42}
    events = await history(svc, "plain")
    assert "callback" not in [e["type"] for e in events]
    [ended] = [e for e in events if e["type"] == "status_check" and e["data"]["said"] == "ended"]
    assert ended["data"]["status"] == "succeeded"

    job = await svc.wait_state("nope", "failed", timeout=20)
    [run] = [r for r in workspace.runs.values() if r.parameters["tether_job_id"] == "nope"]
    [task] = run.tasks
    assert job["error"]["type"] == "RUN_EXECUTION_ERROR"
    assert job["error"]["message"] == (
        f"Databricks run {run.run_id} failed (RUN_EXECUTION_ERROR): Workload failed, see run"
        " output for details; 1 task failed: main (RUN_EXECUTION_ERROR): Workload failed, see"
        " run output for details: AnalysisException: [TABLE_OR_VIEW_NOT_FOUND] The table or"
        " view `main.sales.nope` cannot be found."
    )
    assert job["result"] == {
        "run_id": run.run_id,
        "termination_code": "RUN_EXECUTION_ERROR",
        "failed_tasks": [
            {
                "task_key": "main",
                "run_id": task.run_id,
                "code": "RUN_EXECUTION_ERROR",
                "message": "Workload failed, see run output for details",
                "error": "AnalysisException: [TABLE_OR_VIEW_NOT_FOUND] The table or view"
                " `main.sales.nope` cannot be found.",
            }
        ],
    }
    assert len(workspace.calls(GET_OUTPUT, "GET")) == 2  # one task each


# ── several tasks ────────────────────────────────────────────────────────────


async def test_a_multi_task_run_gives_values_by_task_key_or_lists_its_failed_tasks(
    start_databricks, workspace: FakeWorkspace
):
    outputs = {"ingest": json.dumps({"files": 3}), "report": "ok, not JSON", "cleanup": None}
    workspace.notebooks["/etl/ingest"] = ends_with("SUCCESS", outputs)
    failures = {
        "load": {"code": "SUCCESS", "output": "3"},
        "transform": {
            "code": "RUN_EXECUTION_ERROR",
            "message": "Workload failed, see run output for details",
            "error": "ZeroDivisionError: division by zero",
        },
        "publish": {"code": "UPSTREAM_FAILED", "message": "Upstream task failed."},
        "audit": {"code": "DRIVER_ERROR", "message": "The Spark driver stopped unexpectedly."},
    }
    workspace.notebooks["/etl/load"] = ends_with("RUN_EXECUTION_ERROR", failures)
    svc = await start_databricks()
    wheel = {"task_key": "wheel", "python_wheel_task": {"package_name": "p", "entry_point": "e"}}
    for name, keys in (("etl", [*outputs, "wheel"]), ("broken", list(failures))):
        tasks = [
            wheel
            if k == "wheel"
            else {"task_key": k, "notebook_task": {"notebook_path": f"/etl/{k}"}}
            for k in keys
        ]
        await start_job(svc, name, {"submit": {"tasks": tasks}, "check_interval": 1})

    job = await svc.wait_state("etl", "succeeded", timeout=20)
    assert job["result"] == {"ingest": {"files": 3}, "report": "ok, not JSON", "cleanup": None}

    job = await svc.wait_state("broken", "failed", timeout=20)
    failed = job["result"]["failed_tasks"]
    assert [(f["task_key"], f["code"]) for f in failed] == [
        ("transform", "RUN_EXECUTION_ERROR"),
        ("audit", "DRIVER_ERROR"),
    ]
    assert failed[0]["error"] == "ZeroDivisionError: division by zero"
    assert "error" not in failed[1]  # get-output had none
    message = job["error"]["message"]
    assert "; 2 tasks failed: transform (RUN_EXECUTION_ERROR): Workload failed, see run" in message
    assert "details: ZeroDivisionError: division by zero; audit (DRIVER_ERROR):" in message
    assert "publish" not in message  # it never ran
    # three notebook tasks (not the wheel), two failed ones (not those that succeeded)
    assert len(workspace.calls(GET_OUTPUT, "GET")) == 5


# ── values Databricks cut, and the bound ─────────────────────────────────────


async def test_a_value_databricks_cut_or_past_the_bound_is_stored_cut_and_marked(
    start_databricks, workspace: FakeWorkspace
):
    cut = '{"rows": [1, 2, 3'  # the first part of a value past 5 MB
    workspace.notebooks["cut"] = ends_with("SUCCESS", {"main": {"output": cut, "truncated": True}})
    value = {"rows": [[n, f"name {n}"] for n in range(2000)]}
    workspace.notebooks["big"] = ends_with("SUCCESS", {"main": json.dumps(value)})
    workspace.add_job(7, notebook="cut")
    workspace.add_job(8, notebook="big")
    svc = await start_databricks(max_result_bytes=4096)
    await start_job(svc, "cut", {"job_id": 7, "check_interval": 1})
    await start_job(svc, "bound", {"job_id": 8, "check_interval": 1})

    job = await svc.wait_state("cut", "succeeded", timeout=20)
    assert job["result"] == {"truncated": True, "preview": cut, "truncated_by": "databricks"}

    job = await svc.wait_state("bound", "succeeded", timeout=20)
    result = job["result"]
    whole = msgspec.json.encode(value)  # parsed, then measured as Tether writes JSON
    assert result["truncated"] is True and result["bytes"] == len(whole)
    assert result["sha256"] == hashlib.sha256(whole).hexdigest()
    assert whole.decode().startswith(result["preview"])
    assert len(msgspec.json.encode(result)) <= 4096
    assert "name 1999" not in json.dumps(await svc.job("bound"))


# ── outputs that cannot be read ──────────────────────────────────────────────


async def test_an_output_throttled_is_read_later_and_one_gone_is_left_out(
    start_databricks, workspace: FakeWorkspace, logs
):
    workspace.notebooks["quick"] = ends_with("SUCCESS", {"main": "[1, 2]"})
    workspace.add_job(7, notebook="quick")
    svc = await start_databricks()

    workspace.fail(GET_OUTPUT, 429, "REQUEST_LIMIT_EXCEEDED", "slow down", method="GET")
    await start_job(svc, "later", {"job_id": 7, "check_interval": 1})
    job = await svc.wait_state("later", "succeeded", timeout=20)
    assert job["result"] == [1, 2]
    assert len(workspace.calls(GET_OUTPUT, "GET")) == 2
    assert "job later: reading run" in logs.text and "slow down" in logs.text

    workspace.fail(GET_OUTPUT, 404, "RESOURCE_DOES_NOT_EXIST", "expired", method="GET")
    await start_job(svc, "gone", {"job_id": 7, "check_interval": 1})
    job = await svc.wait_state("gone", "succeeded", timeout=20)
    assert job["result"] is None
    assert "has no output: expired" in logs.text


async def test_no_output_is_read_while_a_run_goes_on_nor_after_a_callback(
    start_databricks, workspace: FakeWorkspace
):
    workspace.notebooks["slow"] = hang
    workspace.add_job(7, notebook="slow")
    workspace.add_job(8)  # the example notebook: it calls back, then exits
    svc = await start_databricks()
    await start_job(svc, "slow", {"job_id": 7, "check_interval": 1})
    params = {"job_id": 8, "job_parameters": {"table": "main.sales.orders"}, "check_interval": 1}
    await start_job(svc, "called", params)

    job = await svc.wait_state("called", "succeeded", timeout=20)
    assert job["result"] == {"table": "main.sales.orders", "rows": 42}

    async def checked() -> bool:
        said = [e for e in await history(svc, "slow") if e["type"] == "status_check"]
        return bool(said) and said[0]["data"] == {
            "said": "running",
            "progress": {"state": "RUNNING"},
        }

    await eventually(checked, timeout=20)
    await eventually(lambda: all(r.code for r in workspace.runs.values() if r.job_id == 8))
    assert workspace.calls(GET_OUTPUT, "GET") == []


async def test_a_finished_runs_job_is_not_held_open_by_outputs_that_keep_failing(
    start_databricks, workspace: FakeWorkspace, logs, monkeypatch
):
    """`runs/get-output` failing with a 5xx for good kept a run that ended
    SUCCESS a job `running` until its timeout, logged as "reading run N
    failed" (an audit, 2026-12-04). Within `OUTPUT_PATIENCE` of the run's end
    a check fails and is tried again, saying it was the output; past it the
    run's end settles the job without the output."""
    import plugins.databricks

    workspace.notebooks["quick"] = ends_with("SUCCESS", {"main": "[1, 2]"})
    workspace.add_job(7, notebook="quick")
    workspace.fail(
        GET_OUTPUT, 500, "INTERNAL_ERROR", "output service broken", times=10**6, method="GET"
    )
    svc = await start_databricks()
    await start_job(svc, "patient", {"job_id": 7, "check_interval": 1})
    await eventually(lambda: len(workspace.calls(GET_OUTPUT, "GET")) >= 2, timeout=20)
    assert (await svc.job("patient"))["state"] == "running"
    assert "the output of task run" in logs.text and "output service broken" in logs.text

    monkeypatch.setattr(plugins.databricks, "OUTPUT_PATIENCE", 0.0)
    job = await svc.wait_state("patient", "succeeded", timeout=20)
    assert job["result"] is None
    assert "has no output: output service broken" in logs.text
