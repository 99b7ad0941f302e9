"""A store written by Tether 0.1.0 (commit b2a6ac9, before the job index had a
schema version and before the engine's file format 2) opens with today's code:
its waiting job still takes its callback and finishes, its finished job reads
back as it was, and new jobs run on it.

`data/store-0.1.0/` was made by that version's `tether serve`: job `waiting`
triggered and waiting, job `done` failed by callback. Its deadlines are moved
forward by the fixture's age before the service starts, so the test means the
same on any day."""

from __future__ import annotations

import shutil
import sqlite3
import time
from pathlib import Path

from core.store.migrations import MIGRATIONS
from core.tokens import CallbackSigner
from tests.conftest import Receiver
from tests.process import TetherProcess, wait_for

FIXTURE = Path(__file__).parent / "data" / "store-0.1.0"


def copy_with_fresh_deadlines(to: Path) -> Path:
    shutil.copytree(FIXTURE, to)
    db = to / "tether.db"
    with sqlite3.connect(db) as conn:
        (written,) = conn.execute("SELECT max(updated_at) FROM tether_jobs").fetchone()
        age = int(time.time() * 1000) - written
        conn.execute(
            "UPDATE tether_jobs SET deadline = deadline + ? WHERE finished_at IS NULL", (age,)
        )
        conn.execute(
            "UPDATE r_promises SET timeout_at = timeout_at + ? WHERE state = 'pending'", (age,)
        )
    conn.close()
    return db


def test_a_store_written_by_0_1_0_keeps_working(tmp_path: Path, receiver: Receiver) -> None:
    db = copy_with_fresh_deadlines(tmp_path / "store")
    secret = (tmp_path / "store" / "tether.db.secret").read_text().strip()
    service = TetherProcess(
        tmp_path, {"TETHER_STORE": f"sqlite:///{db}", "TETHER_CALLBACK_SECRET": ""}
    ).start()
    try:
        with service.client() as client:
            done = client.get("/jobs/done").json()
            assert (done["state"], done["error"]["message"]) == ("failed", "boom")
            assert client.get("/jobs/waiting").json()["state"] == "running"

            # The URL 0.1.0 handed out, signed with the secret kept beside its database.
            url = CallbackSigner(secret, service.url).url("waiting:1")
            answer = client.post(url, json={"status": "succeeded", "result": {"rows": 7}})
            assert (answer.status_code, answer.json()["outcome"]) == (200, "accepted")
            job = wait_for(client, "waiting", "succeeded")
            assert job["result"] == {"rows": 7}
            assert job["metadata"] == {"written_by": "tether 0.1.0 at b2a6ac9"}

            client.post(
                "/jobs",
                json={"id": "new", "backend": "http_webhook", "params": {"url": receiver.url()}},
            )
            wait_for(client, "new", "running")
            new_url = receiver.hits[-1].body["callback_url"]
            assert client.post(new_url, json={"status": "succeeded"}).status_code == 200
            wait_for(client, "new", "succeeded")

            # jobs from before job history have none; new ones have theirs
            assert client.get("/jobs/done/events").json() == {
                "items": [],
                "next_cursor": None,
                "dropped": 0,
            }
            waiting = [e["type"] for e in client.get("/jobs/waiting/events").json()["items"]]
            assert waiting == ["callback", "finished"]
            new = [e["type"] for e in client.get("/jobs/new/events").json()["items"]]
            assert new == ["accepted", "triggered", "callback", "finished"]
    finally:
        service.kill()
    with sqlite3.connect(db) as conn:
        latest = MIGRATIONS[-1].version
        assert conn.execute("SELECT version FROM tether_schema").fetchall() == [(latest,)]
        assert conn.execute("SELECT DISTINCT attempt FROM tether_jobs").fetchall() == [(1,)]
    conn.close()
