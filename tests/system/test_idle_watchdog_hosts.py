"""A deadline written by another process is enforced within the watchdog's
nap (`TETHER_WATCHDOG_INTERVAL`), real processes: two `tether serve` on one
store (SQLite; Postgres as two hosts); a job accepted by A, which is
SIGKILLed once it runs; B, which never heard of the job, times it out on
time: it saw it at its next look (at most the nap after A wrote it), and
then slept until the deadline."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from tests.conftest import Receiver
from tests.process import TetherProcess, wait_for

NAP = 1.0
TIMEOUT = 3.0


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_a_deadline_of_a_job_on_a_dead_process_is_enforced_by_a_live_one(
    tmp_path: Path, receiver: Receiver, request: pytest.FixtureRequest, kind: str
) -> None:
    if kind == "postgres":  # two hosts: nothing shared but the database
        store = request.getfixturevalue("fresh_pg_url")
        homes = [tmp_path / "a", tmp_path / "b"]
        for home in homes:
            home.mkdir()
    else:  # two services on one host: the callback secret is kept beside the database
        store, homes = f"sqlite:///{tmp_path}/shared.db", [tmp_path, tmp_path]
    env = {"TETHER_STORE": store, "TETHER_WATCHDOG_INTERVAL": str(NAP)}
    a, b = (TetherProcess(home, env, cwd=home) for home in homes)
    if kind == "sqlite":
        for proc in (a, b):
            del proc.env["TETHER_CALLBACK_SECRET"]
    a.start()
    b.start()
    try:
        with a.client() as ca, b.client() as cb:
            body = {"id": "j", "backend": "http_webhook", "params": {"url": receiver.url()}}
            assert ca.post("/jobs", json={**body, "timeout": TIMEOUT}).status_code == 201
            wait_for(ca, "j", "running")
            a.kill()
            job = wait_for(cb, "j", "timed_out", timeout=TIMEOUT + 10)
        created, finished = (datetime.fromisoformat(job[k]) for k in ("created_at", "finished_at"))
        late = (finished - created).total_seconds() - TIMEOUT
        assert 0 <= late < NAP, late
    finally:
        a.kill()
        b.kill()
