"""Two real `tether serve` processes sharing one embedded store."""

from __future__ import annotations

import re

import httpx

from tests.conftest import HOLD, wait_until
from tests.process import TetherProcess, wait_for


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
    finally:
        proc.kill()
