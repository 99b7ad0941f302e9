"""The real `tether serve` process, killed with SIGKILL after it sent
`runs/repair` for a retried job but before its trigger step was recorded: a
repair takes no idempotency token, yet on restart the run is repaired once."""

from __future__ import annotations

from pathlib import Path

import httpx

from core.workflow import callback_promise_id
from tests.plugins.databricks.workspace import FakeWorkspace, Run, hang, silent
from tests.process import Hold, killed_inside, wait_for

REPAIR = "/api/2.2/jobs/runs/repair"


def fails_then_hangs(ws: FakeWorkspace, run: Run) -> None:
    """The run fails; its repair goes on until the test ends it."""
    if run.repairs:
        hang(ws, run)
    else:
        silent("RUN_EXECUTION_ERROR", "Workload failed", after=0.05)(ws, run)


def test_a_kill_after_runs_repair_before_its_record_still_makes_one_repair(
    tmp_path: Path, workspace: FakeWorkspace
):
    workspace.notebooks["flaky"] = fails_then_hangs
    workspace.add_job(7, notebook="flaky")

    def inside(client: httpx.Client) -> Hold:
        body = {"backend": "databricks", "params": {"job_id": 7, "check_interval": 1}}
        assert client.post("/jobs", json={"id": "crash", **body}).status_code == 201
        wait_for(client, "crash", "failed")
        held = workspace.hold(REPAIR)  # the repair is made; its answer never comes
        assert client.post("/jobs/crash/retry").status_code == 200
        assert held.reached.wait(60), "runs/repair never arrived"
        return held

    first, second = killed_inside(tmp_path, inside)
    run = workspace.only_run()
    [made] = [r for r in run.repairs if r["type"] == "REPAIR"]
    assert run.parameters["tether_promise_id"] == callback_promise_id("crash", 2)

    try:
        with second.client() as client:
            job = wait_for(client, "crash", "running", recorded=True)
            assert job["attempt"] == 2
            assert job["external"]["run_id"] == run.run_id
            assert job["external"]["repair_id"] == made["id"]
            assert len(workspace.calls(REPAIR)) == 1  # found in the run's history, not made again
            assert [r["type"] for r in run.repairs] == ["ORIGINAL", "REPAIR"]

            workspace.end(run.run_id, "SUCCESS")
            job = wait_for(client, "crash", "succeeded", recorded=True)
            assert job["attempt"] == 2
    finally:
        second.kill()
    assert len(workspace.runs) == 1 and len(workspace.calls(REPAIR)) == 1
    for log in (first.log.read_text(), second.log.read_text()):
        assert workspace.token not in log
        assert "token=" not in log
    assert "repair" in second.log.read_text()
