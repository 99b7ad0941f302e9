"""A Databricks run that a `run-now` left to answer late starts after its job
was canceled is stopped, even by a service started after a crash.

The plugin calls the blocking databricks-sdk in threads: a `run-now` whose
answer is slow goes on after the job was canceled, and no cancel stops it.
Here the fake workspace holds that request undone (`FakeWorkspace.late`)
while the job is canceled through the API, its workflow leaves the call to
answer late, and the finish asks the workspace for the attempt's runs
(`cancel_unrecorded`: `runs/list`, answered before the run exists); only
then is the run created, as a workspace acting late on a request it got.
The real `tether serve` (embedded store, the real SDK) holds the stop of
what the call may start in the job's row (`JobSteps._answered_late`,
`stop_due`), renewed while the call runs:

- SIGKILLed before the answer came, it leaves that stop to the next
  service's watchdog once the lease (`TETHER_TASK_TTL`, 2 s here) ran out,
  which looks again (`runs/list`) and cancels the run (`runs/cancel`).
  Before, nothing looked after the finish did, and the run went on,
  recorded nowhere.
- When the answer comes while it runs, the run is recorded (a late
  `triggered`) and canceled, and the stop is let go.

Either way the job stays `canceled`, the workspace holds exactly the one run,
ended canceled, and the workspace token never reaches the service's log.
The service runs with shorter trigger bounds than its own (a module patched
before it starts, as `tests/system/test_late_trigger_crash.py` does)."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import httpx

from tests.conftest import wait_until
from tests.plugins.databricks.workspace import FakeWorkspace, Fault, Run
from tests.system.test_events_crash import history
from tests.system.test_late_trigger_crash import ShortBounds as WebhookBounds
from tests.system.test_late_trigger_crash import row

RUN_NOW = "/api/2.2/jobs/run-now"
RUNS_LIST = "/api/2.2/jobs/runs/list"
RUNS_CANCEL = "/api/2.2/jobs/runs/cancel"


class ShortBounds(WebhookBounds):
    more: ClassVar[Mapping[str, str]] = {
        # The SDK's own bounds: no request of it times out (and is sent
        # again) while the workspace holds `run-now`.
        "TETHER_DATABRICKS_HTTP_TIMEOUT": "30",
        "TETHER_DATABRICKS_RETRY_TIMEOUT": "30",
    }


def stop_held(db: Path) -> int:
    """The lease on the stop of what the late `run-now` may start, once the
    job's row holds it (`stop_due`)."""
    try:
        due: int = wait_until(lambda: row(db)[1], timeout=10)
    except AssertionError:
        raise AssertionError(
            f"the job's row holds no stop of what its late run-now may start: {row(db)}"
        ) from None
    return due


def job(client: httpx.Client) -> dict[str, Any]:
    found: dict[str, Any] = client.get("/jobs/late").json()
    return found


def canceled_while_triggering(first: ShortBounds, workspace: FakeWorkspace) -> tuple[Fault, Run]:
    """The scene of both tests: job `late` (Databricks job 7) posted to
    `first`, canceled while its `run-now` is held undone; the finish's look
    (`runs/list`) answered with no run; then the run created, its answer
    held (the fault's `respond`). The fault and the run."""
    workspace.add_job(7, notebook="hang")
    held = workspace.late(RUN_NOW)
    look = workspace.delay(RUNS_LIST)  # answered, then held: the look is over once sent
    first.start()
    try:
        with first.client() as client:
            body = {"backend": "databricks", "params": {"job_id": 7, "check_interval": 1}}
            response = client.post("/jobs", json={"id": "late", "timeout": 600, **body})
            assert response.status_code == 201, response.text
            assert held.reached.wait(30), "run-now never arrived"
            assert client.post("/jobs/late/cancel").status_code == 200
            assert look.reached.wait(20), f"the finish never looked\n{first.log.read_text()}"
            look.release.set()
            assert look.answered.wait(10)
            assert job(client)["state"] == "canceled"
        [listed] = workspace.calls(RUNS_LIST, "GET")
        assert listed.body == {} and not workspace.runs  # the look found nothing: no run yet
        held.release.set()  # the workspace acts on run-now at last
        wait_until(lambda: workspace.runs, timeout=10)
        return held, workspace.only_run()
    except BaseException:
        first.kill()
        raise


def canceled_once(
    service: ShortBounds, run: Run, db: Path
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Once `service` canceled the late run and let go of the stop (and a
    moment more: canceled once, no more), job `late` and its history."""
    assert run.ended.wait(30), f"the late run was never canceled\n{service.log.read_text()}"
    wait_until(lambda: row(db)[1] is None, timeout=15)
    time.sleep(1.0)
    with service.client() as client:
        return job(client), history(client, "late")


def assert_quiet(workspace: FakeWorkspace, *logs: Path) -> None:
    text = "".join(log.read_text() for log in logs)
    for secret in (workspace.token, "process-secret", "token="):
        assert secret not in text


def test_a_late_run_nows_run_is_canceled_after_its_service_was_killed(
    tmp_path: Path, workspace: FakeWorkspace
) -> None:
    first = ShortBounds(tmp_path)
    db = tmp_path / "tether.db"
    held, run = canceled_while_triggering(first, workspace)
    try:
        lease = stop_held(db)
        time.sleep(3.0)  # more than a lease: renewed while the call runs, no sweep takes it
        state, renewed, external = row(db)
        assert (state, external) == ("canceled", None)
        assert renewed is not None and renewed > lease
        assert not run.ended.is_set()  # going, found by nobody yet
        assert not workspace.calls(RUNS_CANCEL)
    finally:
        first.kill()
        held.respond.set()  # to a client gone
    _, due, _ = row(db)
    assert due is not None
    due_at = time.monotonic() + (due / 1000 - time.time())  # the lease's end, as `Seen.at`

    second = ShortBounds(tmp_path, port=first.port).start()
    try:
        found, items = canceled_once(second, run, db)
    finally:
        second.kill()
    [cancel] = workspace.calls(RUNS_CANCEL)
    assert cancel.body == {"run_id": run.run_id}
    assert cancel.at >= due_at - 0.05  # once the lease ran out, not before
    assert len(workspace.calls(RUNS_LIST, "GET")) == 2  # the finish's look, then the watchdog's
    assert (run.code, len(workspace.runs)) == ("USER_CANCELED", 1)
    assert (found["state"], found["external"]) == ("canceled", None)
    assert row(db) == ("canceled", None, None)
    assert [e["type"] for e in items] == ["accepted", "cancel_requested", "finished"], items
    assert "stopping it again" in second.log.read_text()
    assert_quiet(workspace, first.log, second.log)
    assert workspace.token not in json.dumps(items)


def test_a_late_run_nows_answer_is_recorded_and_its_run_canceled(
    tmp_path: Path, workspace: FakeWorkspace
) -> None:
    first = ShortBounds(tmp_path)
    db = tmp_path / "tether.db"
    held, run = canceled_while_triggering(first, workspace)
    try:
        stop_held(db)
        held.respond.set()  # run-now answers, late
        found, items = canceled_once(first, run, db)
    finally:
        first.kill()
    [cancel] = workspace.calls(RUNS_CANCEL)
    assert cancel.body == {"run_id": run.run_id}
    assert len(workspace.calls(RUNS_LIST, "GET")) == 1  # the answer named the run: no look again
    assert len(workspace.calls(RUN_NOW)) == 1
    assert (run.code, len(workspace.runs)) == ("USER_CANCELED", 1)
    assert found["state"] == "canceled"
    assert found["external"]["run_id"] == run.run_id
    types = [e["type"] for e in items]
    assert types == ["accepted", "cancel_requested", "finished", "triggered"], items
    assert "answered after attempt 1 ended" in first.log.read_text()
    assert_quiet(workspace, first.log)
    assert workspace.token not in json.dumps(items)
