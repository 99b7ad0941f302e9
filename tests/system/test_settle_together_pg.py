"""The one-transaction settle on Postgres, on the real `tether serve`: a
callback to a waiting workflow whose finish has nothing left to do settles
its callback promise and its root promise and ends the job in one
transaction of resonate-pg's database, so the workflow is never acquired
again (its task stays at version 1, fulfilled); a cancel, whose finish stops
the run, leaves the workflow to resume (version 2) and finish the job.

Needs TETHER_TEST_PG_DSN (docs/testing.md); skipped without it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import psycopg

from tests.conftest import Receiver, wait_until
from tests.process import TetherProcess, wait_for


def task(dsn: str, task_id: str) -> tuple[str, int] | None:
    """The state and version of the task of promise `task_id`."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT state, version FROM resonate.tasks WHERE id = %s", (task_id,)
        ).fetchone()
    return None if row is None else (str(row[0]), int(row[1]))


def promise(dsn: str, promise_id: str) -> tuple[str, str | None]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT state, value_data FROM resonate.promises WHERE id = %s", (promise_id,)
        ).fetchone()
    assert row is not None
    return str(row[0]), row[1]


def test_a_callback_to_a_waiting_workflow_ends_it_in_its_transaction_a_cancel_resumes_it(
    tmp_path: Path, receiver: Receiver, fresh_pg_url: str
) -> None:
    receiver.respond = lambda hit: (202, {"run": hit.body["job_id"]})
    service = TetherProcess(tmp_path, {"TETHER_STORE": fresh_pg_url}).start()
    try:
        with service.client() as client:
            for job_id in ("called", "canceled"):
                body = {"id": job_id, "backend": "http_webhook", "params": {"url": receiver.url()}}
                assert client.post("/jobs", json=body).status_code == 201
            for job_id in ("called", "canceled"):
                wait_for(client, job_id, "running", recorded=True)
                wait_until(lambda j=job_id: task(fresh_pg_url, j) == ("suspended", 1))
            hooks = receiver.on("/hook")
            [url] = [h.body["callback_url"] for h in hooks if h.body["job_id"] == "called"]
            answer = httpx.post(
                url, json={"status": "succeeded", "result": 7}, trust_env=False, timeout=10
            )
            assert (answer.status_code, answer.json()["outcome"]) == (200, "accepted")
            # ended with the answer: the job, its callback promise, its root
            assert client.get("/jobs/called").json()["result"] == 7
            assert task(fresh_pg_url, "called") == ("fulfilled", 1)
            waited, returned = promise(fresh_pg_url, "called:1"), promise(fresh_pg_url, "called")
            assert waited[0] == returned[0] == "resolved"
            assert returned[1] == waited[1]  # what the workflow returns

            assert client.post("/jobs/canceled/cancel").status_code == 200
            wait_for(client, "canceled", "canceled")
            # its finish stops the run: the workflow resumed (acquired again) to run it
            wait_until(lambda: task(fresh_pg_url, "canceled") == ("fulfilled", 2))
            wait_until(lambda: task(fresh_pg_url, "called") == ("fulfilled", 1), holds=1.0)
            events: list[dict[str, Any]] = client.get("/jobs/called/events").json()["items"]
            assert [e["type"] for e in events][-2:] == ["callback", "finished"]
    finally:
        service.kill()
    assert "called finished: succeeded" in service.log.read_text()
