"""The real `tether serve` process, killed with SIGKILL after it sent `run-now`
but before its trigger step was recorded: on restart, still one Databricks run."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.plugins.databricks.workspace import FakeWorkspace
from tests.process import Hold, killed_inside, wait_for

RUN_NOW = "/api/2.2/jobs/run-now"


def test_a_kill_after_run_now_before_its_record_still_makes_one_run(
    tmp_path: Path, workspace: FakeWorkspace
):
    workspace.add_job(7, notebook="hang")

    def inside(client: httpx.Client) -> Hold:
        held = workspace.hold(RUN_NOW)  # the run is created; the answer never comes
        body = {"backend": "databricks", "params": {"job_id": 7, "check_interval": 1}}
        response = client.post("/jobs", json={"id": "crash", **body})
        assert response.status_code == 201, response.text
        assert held.reached.wait(60), "run-now never arrived"
        return held

    first, second = killed_inside(tmp_path, inside)
    [run] = workspace.runs.values()
    try:
        with second.client() as client:
            job = wait_for(client, "crash", "running", recorded=True)
            assert job["external"]["run_id"] == run.run_id
            calls = workspace.calls(RUN_NOW)
            # the killed try's and the replay's; one more where the replay's
            # answer came late on a loaded machine and the SDK asked again
            # (once in a CI run at -n 3): the same key each time, one run
            assert len(calls) >= 2
            assert len({call.body["idempotency_token"] for call in calls}) == 1
            assert len(workspace.runs) == 1

            workspace.end(run.run_id, "SUCCESS")
            job = wait_for(client, "crash", "succeeded", recorded=True)
            assert job["result"] is None  # found by status check: no exit value
    finally:
        second.kill()
    assert len(workspace.runs) == 1
    log = first.log.read_text()
    assert workspace.token not in log
    assert "token=" not in log
