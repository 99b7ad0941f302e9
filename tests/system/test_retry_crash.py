"""Re-runs under SIGKILL: the real `tether serve` on the embedded store, killed
while a retry's trigger is under way, or right after a retry was written but
before its workflow started; after the restart attempt 2 is triggered with
its own idempotency key, and a repeated retry starts no third attempt."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import Hit, Receiver, wait_until
from tests.process import TetherProcess, wait_for


def service(tmp_path: Path, port: int | None = None) -> TetherProcess:
    env = {"TETHER_STORE": f"sqlite:///{tmp_path}/tether.db", "TETHER_TASK_TTL": "2"}
    return TetherProcess(tmp_path, env, port=port)


def fail_first_attempt(client: httpx.Client, receiver: Receiver, job_id: str) -> str:
    body = {"id": job_id, "backend": "http_webhook", "params": {"url": receiver.url()}}
    assert client.post("/jobs", json=body).status_code == 201
    wait_for(client, job_id, "running", recorded=True)
    url: str = receiver.hits[0].body["callback_url"]
    assert client.post(url, json={"status": "failed"}).status_code == 200
    wait_for(client, job_id, "failed")
    return url


def keys(receiver: Receiver) -> list[str]:
    return [h.body["idempotency_key"] for h in receiver.hits]


def test_a_kill_during_the_retrys_trigger_triggers_attempt_2_again_with_its_own_key(
    tmp_path, receiver
):
    dead = threading.Event()

    def respond(hit: Hit) -> tuple[int, Any]:
        if hit.body["idempotency_key"] == "r~2:1" and not dead.is_set():
            dead.wait(30)  # slow: the service dies while it waits for this answer
        return 202, {"run": hit.body["idempotency_key"]}

    receiver.respond = respond
    first = service(tmp_path).start()
    with first.client() as client:
        old_url = fail_first_attempt(client, receiver, "r")
        answer = client.post("/jobs/r/retry", json={"attempt": 2})
        assert (answer.status_code, answer.json()["attempt"]) == (200, 2)
        wait_until(lambda: len(receiver.hits) == 2)
    first.kill()
    dead.set()

    second = service(tmp_path, port=first.port).start()
    try:
        with second.client() as client:
            job = wait_for(client, "r", "running", recorded=True)
            assert (job["attempt"], job["external"]["response"]) == (2, {"run": "r~2:1"})
            # the trigger step ran again after the kill, with the same new key
            assert keys(receiver) == ["r:1", "r~2:1", "r~2:1"]

            again = client.post("/jobs/r/retry", json={"attempt": 2})
            assert (again.status_code, again.json()["attempt"]) == (200, 2)
            assert client.post("/jobs/r/retry").status_code == 409  # it is running

            assert client.post(old_url, json={"status": "succeeded"}).status_code == 410
            new_url = receiver.hits[-1].body["callback_url"]
            assert client.post(new_url, json={"status": "succeeded"}).status_code == 200
            job = wait_for(client, "r", "succeeded")
            assert job["attempt"] == 2
            types = [
                (e["attempt"], e["type"]) for e in client.get("/jobs/r/events").json()["items"]
            ]
            assert types.count((2, "retried")) == 1 and types[-1] == (2, "finished")
    finally:
        second.kill()
    assert keys(receiver) == ["r:1", "r~2:1", "r~2:1"]


def test_a_retry_written_before_a_kill_but_never_started_starts_at_restart(tmp_path, receiver):
    first = service(tmp_path).start()
    with first.client() as client:
        fail_first_attempt(client, receiver, "x")
    first.kill()
    # What a kill between the retry's index write and its workflow start leaves:
    # attempt 2 pending, and no workflow for it.
    with sqlite3.connect(tmp_path / "tether.db") as db:
        changed = db.execute(
            "UPDATE tether_jobs SET state = 'pending', attempt = 2, finished_at = NULL,"
            " error = NULL, external = NULL WHERE id = 'x'"
        ).rowcount
    db.close()
    assert changed == 1

    second = service(tmp_path, port=first.port).start()
    try:
        with second.client() as client:
            job = wait_for(client, "x", "running", recorded=True)
            assert job["attempt"] == 2
            assert keys(receiver) == ["x:1", "x~2:1"]
    finally:
        second.kill()
