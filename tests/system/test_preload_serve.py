"""The preload on the real ``tether serve`` (embedded store): a workflow
resumed after its callback does not ask the store again for its callback
promise (``{root}:1``: ``ctx.promise`` gives it a branch of its own, so the
protocol's rule would leave it out; the engine preloads the task's bare
children too); under workflow version 3, nor for the trigger step it already
ran (``{root}:2``, of the root's branch), which it does not run again either.
Version 4 has no trigger step: its replay reads the job's row instead.

The service is ``tether serve`` itself, its engine's ``run_batch`` wrapped
to write down every request it answers (kind, task, the fenced promise), its
new jobs started under the workflow version the test names.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Hit, Receiver, wait_until
from tests.process import TetherProcess, wait_for

RECORDING = """
import json
import os
import sys

from resonate_sqlite import engine

LOG = os.environ["PRELOAD_TEST_REQUESTS"]
_run_batch = engine.Engine.run_batch


def run_batch(self, reqs, extras):
    with open(LOG, "a") as out:
        for raw in reqs:
            req = json.loads(raw)
            data = req.get("data") or {}
            inner = (data.get("action") or {}).get("data") or {}
            out.write(json.dumps([req["kind"], data.get("id"), inner.get("id")]) + "\\n")
    return _run_batch(self, reqs, extras)


engine.Engine.run_batch = run_batch
from core import steps, workflow

workflow.VERSION = int(os.environ["PRELOAD_TEST_VERSION"])
if os.environ.get("PRELOAD_TEST_RESUME"):  # the workflow finishes every job
    steps.JobSteps.finishes_alone = lambda self, state, value: False
"""


class Recorded(TetherProcess):
    """`tether serve` (one worker: one process) writing down its engine's requests."""

    preamble = RECORDING


def requests(log: Path, task: str) -> list[list[str | None]]:
    """[kind, fenced promise] of each request about ``task`` (its promise's too)."""
    out = []
    for line in log.read_text().splitlines():
        kind, tid, inner = json.loads(line)
        if tid == task or (tid or "").startswith(f"{task}:"):
            out.append([kind, inner])
    return out


def fenced(log: Path, promise_id: str) -> int:
    return sum(
        kind == "task.fence" and inner == promise_id
        for kind, inner in requests(log, promise_id.split(":")[0])
    )


def task_version(db: Path, task_id: str) -> int:
    with sqlite3.connect(db) as conn:
        (version,) = conn.execute(
            "SELECT t_version FROM r_promises WHERE id = ?", (task_id,)
        ).fetchone()
    conn.close()
    return int(version)


def promise_state(db: Path, promise_id: str) -> str | None:
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT state FROM r_promises WHERE id = ?", (promise_id,)).fetchone()
    conn.close()
    return None if row is None else str(row[0])


def callback_of(receiver: Receiver, job_id: str) -> str:
    [url] = {h.body["callback_url"] for h in receiver.on("/hook") if h.body["job_id"] == job_id}
    return url


@pytest.mark.parametrize("version", [3, 4])
def test_a_resumed_workflow_takes_its_settled_step_from_the_preload(
    tmp_path: Path, receiver: Receiver, version: int
) -> None:
    """Two jobs: one resumed by a callback after it suspended (task.acquire's
    preload), one whose callback lands inside its trigger, before it suspends
    (task.suspend's 300 and its preload: the body runs again on the same
    lease, task version 1). The workflow finishes both jobs (as it does when
    a run is to be stopped or a plugin told of finishes): a callback does not
    end it in its own transaction (the next test)."""

    def respond(hit: Hit) -> tuple[int, Any]:
        if hit.path == "/hook" and hit.body["job_id"] == "early":
            answer = httpx.post(
                hit.body["callback_url"],
                json={"status": "succeeded", "result": "early"},
                trust_env=False,
                timeout=10,
            )
            assert answer.status_code == 200
        return 202, {}

    receiver.respond = respond
    db, log = tmp_path / "tether.db", tmp_path / "requests.jsonl"
    env = {
        "TETHER_STORE": f"sqlite:///{db}",
        "PRELOAD_TEST_REQUESTS": str(log),
        "PRELOAD_TEST_VERSION": str(version),
        "PRELOAD_TEST_RESUME": "1",
    }
    service = Recorded(tmp_path, env).start()
    try:
        with service.client() as client:
            for job_id in ("late", "early"):
                body = {"id": job_id, "backend": "http_webhook", "params": {"url": receiver.url()}}
                assert client.post("/jobs", json=body).status_code == 201
            wait_for(client, "late", "running", recorded=True)
            wait_until(lambda: ["task.suspend", None] in requests(log, "late"))
            answer = httpx.post(
                callback_of(receiver, "late"),
                json={"status": "succeeded", "result": "late"},
                trust_env=False,
                timeout=10,
            )
            assert answer.status_code == 200
            for job_id in ("late", "early"):
                assert wait_for(client, job_id, "succeeded")["result"] == job_id
                wait_until(lambda j=job_id: promise_state(db, j) == "resolved")  # it returned
    finally:
        service.kill()
    # the late job was acquired again (version 2); the early one kept its lease
    assert (task_version(db, "late"), task_version(db, "early")) == (2, 1)
    for job_id in ("late", "early"):
        # the body ran twice: the callback promise created by a fence and
        # (version 3) the step created and settled in the first run, both
        # taken from the preload in the second (without it: a fence more for each)
        step = 2 if version == 3 else 0
        assert (fenced(log, f"{job_id}:1"), fenced(log, f"{job_id}:2")) == (1, step), requests(
            log, job_id
        )
        # and the trigger ran once
        assert sum(h.body["job_id"] == job_id for h in receiver.on("/hook")) == 1
    # The late job's replay settled nothing again (version 4 reads the row,
    # whose `external` says it was triggered); its callback's settle is made
    # inside the index's transaction (`request_in`, not a request of a batch).
    # (The early one's trigger came back to a job its callback had ended, and
    # settles the promise from the row, as every version did.)
    settles = [kind for kind, _ in requests(log, "late") if kind == "promise.settle"]
    assert settles == [], requests(log, "late")


@pytest.mark.parametrize("version", [2, 3, 4])
def test_a_callback_to_a_waiting_workflow_ends_it_without_a_resume(
    tmp_path: Path, receiver: Receiver, version: int
) -> None:
    """Nothing to finish but the index write (no run to stop, no plugin told
    of finishes): the callback settles the callback promise and the root
    promise and ends the job in one transaction, under any version. The
    workflow is never acquired again: no request about it after it
    suspended, its task at version 1, no finish step (version 2's "{root}:3")."""
    db, log = tmp_path / "tether.db", tmp_path / "requests.jsonl"
    env = {
        "TETHER_STORE": f"sqlite:///{db}",
        "PRELOAD_TEST_REQUESTS": str(log),
        "PRELOAD_TEST_VERSION": str(version),
    }
    service = Recorded(tmp_path, env).start()
    try:
        with service.client() as client:
            body = {"id": "one", "backend": "http_webhook", "params": {"url": receiver.url()}}
            assert client.post("/jobs", json=body).status_code == 201
            wait_for(client, "one", "running", recorded=True)
            wait_until(lambda: ["task.suspend", None] in requests(log, "one"))
            suspended = len(requests(log, "one"))
            answer = httpx.post(
                callback_of(receiver, "one"),
                json={"status": "succeeded", "result": "one"},
                trust_env=False,
                timeout=10,
            )
            assert (answer.status_code, answer.json()["outcome"]) == (200, "accepted")
            # ended with the answer: the job, its callback promise and its root
            assert client.get("/jobs/one").json()["result"] == "one"
            assert (promise_state(db, "one:1"), promise_state(db, "one")) == ("resolved",) * 2
            wait_until(lambda: len(requests(log, "one")) == suspended, holds=1.0)
            events = client.get("/jobs/one/events").json()["items"]
            assert [e["type"] for e in events][-2:] == ["callback", "finished"]
    finally:
        service.kill()
    assert requests(log, "one")[-1] == ["task.suspend", None]
    assert task_version(db, "one") == 1
    assert promise_state(db, "one:3") is None
    with sqlite3.connect(db) as conn:
        (root,) = conn.execute("SELECT value FROM r_promises WHERE id = 'one'").fetchone()
        (waited,) = conn.execute("SELECT value FROM r_promises WHERE id = 'one:1'").fetchone()
    conn.close()
    assert root == waited  # what the workflow returns: the value it waited for
    assert "one finished: succeeded" in service.log.read_text()
