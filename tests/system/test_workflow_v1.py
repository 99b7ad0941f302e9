"""Workflow version 1 after the change to version 2 (re-runs): a job waiting
in a store written by Tether 0.1.0, under version 1, takes its callback and
finishes; a job that failed there is retried and runs as attempt 2 under
version 2; the 0.1.0 callback URL then answers 410."""

from __future__ import annotations

import base64
import json
import sqlite3
from pathlib import Path
from typing import Any

from core.tokens import CallbackSigner
from core.workflow import VERSION
from tests.conftest import Receiver
from tests.process import TetherProcess, wait_for
from tests.system.test_upgrade import copy_with_fresh_deadlines


def task(db: Path, promise_id: str) -> dict[str, Any]:
    """What a root promise asks a worker to run: function, arguments, version."""
    with sqlite3.connect(db) as conn:
        (param,) = conn.execute(
            "SELECT param FROM r_promises WHERE id = ?", (promise_id,)
        ).fetchone()
    conn.close()
    found: dict[str, Any] = json.loads(base64.b64decode(json.loads(param)["data"]))
    return found


def test_a_job_waiting_under_version_1_finishes_and_a_failed_one_reruns(
    tmp_path: Path, receiver: Receiver
) -> None:
    db = copy_with_fresh_deadlines(tmp_path / "store")
    assert task(db, "waiting")["version"] == 1
    with sqlite3.connect(db) as conn:  # the 0.1.0 receiver is gone: point `done` at this one
        conn.execute(
            "UPDATE tether_jobs SET params = ? WHERE id = 'done'",
            (json.dumps({"url": receiver.url()}),),
        )
    conn.close()
    secret = (tmp_path / "store" / "tether.db.secret").read_text().strip()
    service = TetherProcess(
        tmp_path, {"TETHER_STORE": f"sqlite:///{db}", "TETHER_CALLBACK_SECRET": ""}
    ).start()
    try:
        with service.client() as client:
            signer = CallbackSigner(secret, service.url)
            answer = client.post(signer.url("waiting:1"), json={"status": "succeeded"})
            assert (answer.status_code, answer.json()["outcome"]) == (200, "accepted")
            job = wait_for(client, "waiting", "succeeded")
            assert job["attempt"] == 1

            # `done` failed under 0.1.0: its next attempt runs under the new version
            retried = client.post("/jobs/done/retry", json={"params": 1})
            assert retried.status_code == 400  # an unknown field changes nothing
            assert client.get("/jobs/done").json()["attempt"] == 1
            retried = client.post("/jobs/done/retry")
            assert (retried.status_code, retried.json()["attempt"]) == (200, 2), retried.text
            wait_for(client, "done", "running", recorded=True)
            assert receiver.hits[-1].body["idempotency_key"] == "done~2:1"
            assert (
                client.post(signer.url("done:1"), json={"status": "succeeded"}).status_code == 410
            )
            answer = client.post(signer.url("done~2:1"), json={"status": "succeeded"})
            assert answer.status_code == 200, answer.text
            job = wait_for(client, "done", "succeeded")
            assert job["attempt"] == 2
    finally:
        service.kill()
    rerun = task(db, "done~2")
    assert (rerun["version"], rerun["args"][0], rerun["args"][2]) == (VERSION, "done", 2)
