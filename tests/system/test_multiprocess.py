"""Two real `tether serve` processes sharing one embedded store."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import HOLD, Hit, wait_until
from tests.process import TetherProcess, wait_for
from tests.system.test_notify_workers import worker_pids


def test_two_processes_share_the_work_and_a_job_started_in_one_finishes_in_the_other(
    tmp_path, receiver
):
    env = {"TETHER_STORE": f"sqlite:///{tmp_path}/shared.db", "TETHER_TASK_TTL": "2"}
    a = TetherProcess(tmp_path, env)
    b = TetherProcess(tmp_path, env)
    for proc in (a, b):  # both must sign with the secret kept beside the database
        del proc.env["TETHER_CALLBACK_SECRET"]
    a.start()
    b.start()
    try:
        with a.client() as ca, b.client() as cb:
            ids = [f"j{i}" for i in range(20)]
            for job_id in ids:
                client = ca if int(job_id[1:]) % 2 else cb
                response = client.post(
                    "/jobs",
                    json={
                        "id": job_id,
                        "backend": "http_webhook",
                        "params": {"url": receiver.url()},
                    },
                )
                assert response.status_code == 201
            for job_id in ids:
                wait_for(ca, job_id, "running")
            for hit in list(receiver.hits):
                # the callback goes to the *other* process than the one that triggered it
                url = hit.body["callback_url"]
                other = b.url if url.startswith(a.url) else a.url
                path = url.split("/callbacks/", 1)[1]
                answer = httpx.post(
                    f"{other}/callbacks/{path}", json={"status": "succeeded"}, trust_env=False
                )
                assert answer.status_code == 200, answer.text
            for job_id in ids:
                wait_for(cb, job_id, "succeeded")
            assert (
                ca.get("/jobs", params={"state": "succeeded"}).json()["items"]
                == cb.get("/jobs", params={"state": "succeeded"}).json()["items"]
            )

            # A job reads succeeded before its finish is told (the workflow
            # may tell it after), and a thread writes the log: the lines
            # counted below are waited for, as a SIGKILL loses what is unwritten.
            def told() -> tuple[int, int]:
                text = a.log.read_text() + b.log.read_text()
                return text.count(" triggered"), text.count(" finished: succeeded")

            wait_until(lambda: told() == (20, 20), holds=HOLD)
    finally:
        a.kill()
        b.kill()
    assert sorted(h.body["job_id"] for h in receiver.hits) == sorted(ids)
    logs = {p: p.log.read_text() for p in (a, b)}
    triggered = {p: logs[p].count(" triggered") for p in (a, b)}
    finished = {p: logs[p].count(" finished: succeeded") for p in (a, b)}
    assert sum(triggered.values()) == 20 and sum(finished.values()) == 20
    assert all(finished.values()), f"one process did all the finishing: {finished}"


def test_workers_option_runs_several_processes(tmp_path, receiver):
    proc = TetherProcess(
        tmp_path, {"TETHER_STORE": f"sqlite:///{tmp_path}/w.db"}, args=("--workers", "2")
    ).start()
    try:
        with proc.client() as client:
            for i in range(6):
                client.post(
                    "/jobs",
                    json={
                        "id": f"w{i}",
                        "backend": "http_webhook",
                        "params": {"url": receiver.url()},
                    },
                )
            for i in range(6):
                wait_for(client, f"w{i}", "running")
        # each job triggered once, by one of the two workers
        wait_until(
            lambda: sorted(h.body["job_id"] for h in receiver.hits) == [f"w{i}" for i in range(6)],
            holds=HOLD,
        )
        # The workers are spawned processes: each must set up logging itself.
        log = proc.log.read_text()
        assert log.count(" triggered") == 6, log
        assert len(set(re.findall(r"Started server process \[(\d+)\]", log))) == 2, log
        # Where it listens, said once (one worker's uvicorn says it itself).
        said = re.findall(r" INFO tether: listening on (\S+) with (\d+) workers$", log, re.M)
        assert said == [(proc.url, "2")], log
    finally:
        proc.kill()


def test_workers_stop_when_their_supervisor_is_killed(tmp_path, receiver):
    """SIGKILL to the supervisor alone: its workers notice within a tick or
    two and stop (finishing what they serve), so the port is free and a new
    `tether serve` starts; the job waiting meanwhile finishes under it."""
    env = {"TETHER_STORE": f"sqlite:///{tmp_path}/w.db"}
    proc = TetherProcess(tmp_path, env, args=("--workers", "2")).start()
    workers: list[int] = []
    try:
        with proc.client() as client:
            body = {"id": "w", "backend": "http_webhook", "params": {"url": receiver.url()}}
            assert client.post("/jobs", json=body).status_code == 201
            wait_for(client, "w", "running", recorded=True)
        assert proc.proc is not None
        workers = worker_pids(proc.proc.pid)
        assert len(workers) == 2
        os.kill(proc.proc.pid, signal.SIGKILL)
        proc.proc.wait(10)

        def gone(pid: int) -> bool:
            try:
                return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
            except OSError:
                return True

        wait_until(lambda: all(gone(pid) for pid in workers), timeout=15)
        assert "the supervisor [" in proc.log.read_text()
        proc.start()  # the same port, free again
        [hook] = [h for h in receiver.hits if h.path == "/hook"]
        with httpx.Client(trust_env=False) as http:
            assert http.post(hook.body["callback_url"], json={"status": "succeeded"}).is_success
        with proc.client() as client:
            assert wait_for(client, "w", "succeeded")["state"] == "succeeded"
    finally:
        proc.kill()
        for pid in workers:  # those the supervisor left, should they not have stopped
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def test_a_second_sigterm_to_the_supervisor_reaches_its_workers(tmp_path, receiver):
    """The supervisor passed SIGTERM on once, then only joined its workers:
    a second one was left unhandled, and a worker whose trigger its target
    holds waited its 20 s for it (a QA pass). Now the second reaches the
    workers, whose stop waits no more."""
    release = threading.Event()

    def respond(hit: Hit) -> tuple[Any, ...]:
        release.wait(40)
        return 503, {}

    receiver.respond = respond
    env = {"TETHER_STORE": f"sqlite:///{tmp_path}/w.db", "TETHER_TASK_TTL": "2"}
    proc = TetherProcess(tmp_path, env, args=("--workers", "2")).start()
    try:
        with proc.client() as client:
            params = {"url": receiver.url(), "timeout": 60}  # the stop's 20 s bound it
            body = {"id": "held", "backend": "http_webhook", "params": params}
            assert client.post("/jobs", json=body).status_code == 201
        wait_until(lambda: receiver.hits, every=0.02)
        assert proc.proc is not None
        started = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "Terminated child process" in proc.log.read_text(), every=0.05)
        time.sleep(0.5)  # a worker's stop waits for the trigger
        assert proc.terminate(wait=30) == 0
        assert time.monotonic() - started < 8  # not the 20 s a worker waits for its steps
    finally:
        release.set()
        proc.kill()
    log = proc.log.read_text()
    assert "Received a second signal" in log and "steps still running at a second signal" in log
