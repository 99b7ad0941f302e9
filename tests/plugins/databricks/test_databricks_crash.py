"""The real `tether serve` process, killed with SIGKILL after it sent `run-now`
but before its trigger step was recorded: on restart, still one Databricks run."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from core.plugins import BUILTIN_PLUGINS
from tests.plugins.databricks.workspace import FakeWorkspace
from tests.process import TetherProcess

RUN_NOW = "/api/2.2/jobs/run-now"


def plugin_site(tmp_path: Path) -> str:
    """A directory for PYTHONPATH that installs the databricks plugin through the
    `tether` entry-point group, as long as it is not a built-in yet."""
    site = tmp_path / "site"
    site.mkdir()
    if "plugins.databricks" not in BUILTIN_PLUGINS:
        dist = site / "tether_databricks-0.0.0.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text(
            "Metadata-Version: 2.1\nName: tether-databricks\nVersion: 0.0.0\n"
        )
        (dist / "entry_points.txt").write_text("[tether]\ndatabricks = plugins.databricks\n")
    return str(site)


def wait_for(client: httpx.Client, job_id: str, state: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    job: Any = None
    while time.monotonic() < deadline:
        try:
            job = client.get(f"/jobs/{job_id}").json()
            if job["state"] == state and job["external"] is not None:
                return job
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} is {job and job['state']}, not {state}")


def test_a_kill_after_run_now_before_its_record_still_makes_one_run(
    tmp_path: Path, workspace: FakeWorkspace
):
    workspace.add_job(7, notebook="hang")
    held = workspace.hold(RUN_NOW)  # the run is created; the answer never comes
    env = {  # DATABRICKS_HOST/TOKEN, HOME and TETHER_DATABRICKS_* come from the fixture
        "TETHER_STORE": f"sqlite:///{tmp_path}/t.db",
        "TETHER_TASK_TTL": "2",
        "PYTHONPATH": plugin_site(tmp_path),
    }
    first = TetherProcess(tmp_path, env).start(wait=60)
    try:
        with first.client() as client:
            body = {"backend": "databricks", "params": {"job_id": 7, "check_interval": 1}}
            response = client.post("/jobs", json={"id": "crash", **body})
            assert response.status_code == 201, response.text
            assert held.reached.wait(60), "run-now never arrived"
    finally:
        first.kill()
    held.release.set()
    [run] = workspace.runs.values()

    second = TetherProcess(tmp_path, env, port=first.port).start(wait=60)
    try:
        with second.client() as client:
            job = wait_for(client, "crash", "running")
            assert job["external"]["run_id"] == run.run_id
            calls = workspace.calls(RUN_NOW)
            assert len(calls) == 2
            assert calls[0].body["idempotency_token"] == calls[1].body["idempotency_token"]
            assert len(workspace.runs) == 1

            workspace.end(run.run_id, "SUCCESS")
            job = wait_for(client, "crash", "succeeded")
            assert job["result"]["termination_code"] == "SUCCESS"
    finally:
        second.kill()
    assert len(workspace.runs) == 1
    log = first.log.read_text()
    assert workspace.token not in log
    assert "token=" not in log
