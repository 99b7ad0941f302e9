"""Workflow versions 3 and 4 finish in the body, not in a durable step: the
real `tether serve` on the embedded store, killed with SIGKILL inside that
finish and right after callbacks, finishes each job again after the restart,
with one `finished` event; a job started under version 2 or 3 (by a service
running the code before the next version) waits through a SIGKILL, and
today's service finishes it with its own steps, its promise ids unshifted and
its trigger not sent again."""

from __future__ import annotations

import base64
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import HOLD, Hit, Receiver, wait_until
from tests.process import TetherProcess, wait_for
from tests.system.test_workflow_v1 import task

ENV = {"TETHER_TASK_TTL": "2"}

OLD_VERSION = """
from core import workflow

workflow.VERSION = {version}  # new jobs start as a service before version {next} started them
"""


class OldVersionProcess(TetherProcess):
    """`tether serve` (one worker: one process) whose new jobs start under
    an earlier workflow version."""

    version = 2

    @property
    def preamble(self) -> str:  # type: ignore[override]
        return OLD_VERSION.format(version=self.version, next=self.version + 1)


def db_of(tmp_path: Path) -> Path:
    return tmp_path / "tether.db"


def service(tmp_path: Path, port: int | None = None) -> TetherProcess:
    return TetherProcess(tmp_path, {"TETHER_STORE": f"sqlite:///{db_of(tmp_path)}", **ENV}, port)


def promise_state(db: Path, promise_id: str) -> str | None:
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT state FROM r_promises WHERE id = ?", (promise_id,)).fetchone()
    conn.close()
    return None if row is None else str(row[0])


def promise_value(db: Path, promise_id: str) -> str:
    """The JSON a settled promise holds (its value's data, base64 inside JSON)."""
    with sqlite3.connect(db) as conn:
        (value,) = conn.execute(
            "SELECT value FROM r_promises WHERE id = ?", (promise_id,)
        ).fetchone()
    conn.close()
    return base64.b64decode(json.loads(value)["data"]).decode()


def start_job(client: httpx.Client, receiver: Receiver, job_id: str, **params: Any) -> None:
    body = {"id": job_id, "backend": "http_webhook", "params": {"url": receiver.url(), **params}}
    response = client.post("/jobs", json=body)
    assert response.status_code == 201, response.text
    wait_for(client, job_id, "running", recorded=True)


def callback(receiver: Receiver, job_id: str, body: Any) -> httpx.Response:
    [url] = {h.body["callback_url"] for h in receiver.hits if h.body["job_id"] == job_id}
    return httpx.post(url, json=body, trust_env=False, timeout=10)


def finished_events(client: httpx.Client, job_id: str) -> int:
    events = client.get(f"/jobs/{job_id}/events").json()["items"]
    return sum(e["type"] == "finished" for e in events)


def finished_lines(
    service: TetherProcess, job_id: str, since: int = 0, until: int | None = None
) -> int:
    """How often the log says job `job_id` finished, in bytes `since` to `until`."""
    lines = service.log.read_bytes()[since:until].decode(errors="replace").splitlines()
    return sum(f"job {job_id} finished:" in line for line in lines)


@pytest.mark.parametrize("version", [2, 3])
def test_a_job_waiting_under_an_earlier_version_finishes_on_today_s_after_a_sigkill(
    tmp_path: Path, receiver: Receiver, version: int
) -> None:
    db = db_of(tmp_path)
    first = OldVersionProcess(tmp_path, {"TETHER_STORE": f"sqlite:///{db}", **ENV})
    first.version = version
    first.start()
    with first.client() as client:
        start_job(client, receiver, "old")
    # Its trigger step ("{root}:2") records itself after the step wrote the
    # job running (a kill between the two left it pending once on a slow
    # machine, 2026-12-07); version 4 has none.
    wait_until(lambda: promise_state(db, "old:2") == "resolved")
    first.kill()
    assert task(db, "old")["version"] == version
    assert (promise_state(db, "old:1"), promise_state(db, "old:2")) == ("pending", "resolved")

    second = service(tmp_path, port=first.port).start()
    try:
        with second.client() as client:
            start_job(client, receiver, "new")
            for job_id in ("old", "new"):
                answer = callback(receiver, job_id, {"status": "succeeded", "result": job_id})
                assert (answer.status_code, answer.json()["outcome"]) == (200, "accepted")
                assert wait_for(client, job_id, "succeeded")["result"] == job_id
            wait_until(lambda: promise_state(db, "old") == promise_state(db, "new") == "resolved")
            # The callbacks ended the workflows in their own transactions
            # (nothing else to finish): version 2's finish step, its third
            # durable op, was never made (test_workflow_versions runs it).
            assert promise_state(db, "old:3") is None
            assert (promise_state(db, "new:2"), promise_state(db, "new:3")) == (None, None)
            wait_until(lambda: finished_lines(second, "old") == 1, holds=HOLD)
            assert (finished_events(client, "old"), finished_events(client, "new")) == (1, 1)
    finally:
        second.kill()
    assert task(db, "new")["version"] == 4
    assert [h.body["job_id"] for h in receiver.hits] == ["old", "new"]  # each triggered once


def test_kill_inside_the_finish_runs_it_again_and_records_one_finished(
    tmp_path: Path, receiver: Receiver
) -> None:
    # The backend's cancel (the finish of a canceled job) is held until the
    # service is dead: the kill lands inside the workflow body's finish.
    dead = threading.Event()

    def respond(hit: Hit) -> tuple[int, Any]:
        if hit.path == "/cancel" and not dead.is_set():
            dead.wait(30)
            return 503, {}
        return 202, {}

    receiver.respond = respond
    db = db_of(tmp_path)
    first = service(tmp_path).start()
    try:
        with first.client() as client:
            start_job(client, receiver, "fin", cancel_url=receiver.url("/cancel"))
            assert client.post("/jobs/fin/cancel").status_code == 200
            assert client.get("/jobs/fin").json()["state"] == "canceled"
            wait_until(lambda: receiver.on("/cancel"))
        assert promise_state(db, "fin") == "pending"  # the workflow has not returned
    finally:
        first.kill()
        dead.set()

    second = service(tmp_path, port=first.port).start()
    try:
        wait_until(lambda: promise_state(db, "fin") == "resolved", timeout=20)
        with second.client() as client:
            job = client.get("/jobs/fin").json()
            assert (job["state"], job["error"]["type"]) == ("canceled", "canceled")
            assert finished_events(client, "fin") == 1
    finally:
        second.terminate()  # (its log written out: not a kill)
    # At least once: the cancel again after the kill, the end told once (the
    # first service died before it got there).
    assert [h.body["promise_id"] for h in receiver.on("/cancel")] == ["fin:1", "fin:1"]
    assert finished_lines(second, "fin") == 1
    assert promise_state(db, "fin:3") is None


def test_kill_right_after_callbacks_every_job_ends_once(tmp_path: Path, receiver: Receiver) -> None:
    jobs = [f"k{n}" for n in range(6)]
    db = db_of(tmp_path)
    first = service(tmp_path).start()
    try:
        with first.client() as client:
            for job_id in jobs:
                start_job(client, receiver, job_id)
        for job_id in jobs:  # the last workflows are resuming when the kill comes
            answer = callback(receiver, job_id, {"status": "succeeded", "result": job_id})
            assert answer.status_code == 200, answer.text
    finally:
        first.kill()
    returned_before = [j for j in jobs if promise_state(db, j) == "resolved"]
    first_said = first.log.stat().st_size

    second = service(tmp_path, port=first.port).start()
    try:
        wait_until(lambda: all(promise_state(db, j) == "resolved" for j in jobs), timeout=20)
        with second.client() as client:
            for job_id in jobs:
                job = client.get(f"/jobs/{job_id}").json()
                assert (job["state"], job["result"]) == ("succeeded", job_id)
                assert finished_events(client, job_id) == 1
                root = json.loads(promise_value(db, job_id))
                assert root["status"] == "succeeded"
    finally:
        second.terminate()  # (its log written out: not a kill)
    # A line the first wrote after its commit may be lost with it (the log
    # is written by a thread): the events above are the record. The second
    # tells of each job it finished (its root was not resolved at the kill)
    # once, and of none the first had finished.
    for job_id in jobs:
        assert finished_lines(first, job_id, until=first_said) <= 1
        told = finished_lines(second, job_id, since=first_said)
        assert told == (0 if job_id in returned_before else 1), (job_id, told)
