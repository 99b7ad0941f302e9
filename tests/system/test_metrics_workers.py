"""`GET /metrics` of a real `tether serve --workers 2`: whichever worker answers
a scrape, it shows what all workers counted, added up, and the store's gauges
once; the workers' metric files live in a private directory removed at exit."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from tests.api.test_metrics import Samples, parse, value
from tests.conftest import Hit, wait_until
from tests.process import TetherProcess, wait_for

JOBS = [f"w{n}" for n in range(5)]
OUTCOMES = {"w0": "succeeded", "w1": "succeeded", "w2": "succeeded", "w3": "failed"}
"""How the jobs end by callback; w4 is canceled."""


def scrape(proc: TetherProcess) -> Samples:
    """A scrape on a new connection, so that any worker may answer it."""
    response = httpx.get(f"{proc.url}/metrics", trust_env=False, timeout=10)
    assert response.status_code == 200, response.text
    return parse(response.text)


def metrics_dir(proc: TetherProcess) -> Path | None:
    """The metrics directory the worker processes were started with."""
    assert proc.proc is not None
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        for entry in environ if parent == proc.proc.pid else ():
            if entry.startswith(b"PROMETHEUS_MULTIPROC_DIR="):
                return Path(entry.split(b"=", 1)[1].decode())
    return None


def writers(directory: Path) -> set[str]:
    """The pids of the processes that have metric files in `directory`."""
    return {p.stem.rsplit("_", 1)[1] for p in directory.glob("*.db")}


def test_workers_add_up_what_they_count_and_the_store_is_read_once(tmp_path, receiver):
    tries: Counter[str] = Counter()

    def respond(hit: Hit) -> tuple[Any, ...]:
        job_id = hit.body["job_id"]
        tries[job_id] += 1
        if job_id == "w4" and tries[job_id] == 1:
            return (503, {"busy": True})  # one failed trigger try, then ok
        return (202, {"accepted": True})

    receiver.respond = respond
    proc = TetherProcess(
        tmp_path, {"TETHER_STORE": f"sqlite:///{tmp_path}/t.db"}, args=("--workers", "2")
    ).start()
    try:
        directory: Path = wait_until(lambda: metrics_dir(proc))
        assert directory.stat().st_mode & 0o077 == 0
        # each worker counts in files of its own there (from its start: series at 0)
        wait_until(lambda: len(writers(directory)) >= 2, timeout=30)
        before = scrape(proc)
        for job_id in JOBS:
            body = {"id": job_id, "backend": "http_webhook", "params": {"url": receiver.url()}}
            created = httpx.post(f"{proc.url}/jobs", json=body, trust_env=False)
            assert created.status_code == 201, created.text
        with proc.client() as client:
            for job_id in JOBS:
                wait_for(client, job_id, "running")
            urls = {h.body["job_id"]: h.body["callback_url"] for h in receiver.hits}
            for job_id, status in OUTCOMES.items():
                answer = httpx.post(urls[job_id], json={"status": status}, trust_env=False)
                assert answer.json()["outcome"] == "accepted"
            again = httpx.post(urls["w0"], json={"status": "succeeded"}, trust_env=False)
            assert again.json()["outcome"] == "duplicate"
            assert client.post("/jobs/w4/cancel").status_code == 200
            for job_id, state in {**OUTCOMES, "w4": "canceled"}.items():
                wait_for(client, job_id, state)

        def moved(after: Samples, name: str, **labels: str) -> float:
            return value(after, name, **labels) - value(before, name, **labels)

        def all_finished() -> Samples | None:
            after = scrape(proc)
            total = sum(
                moved(after, "tether_jobs_finished_total", backend="http_webhook", state=s)
                for s in ("succeeded", "failed", "canceled")
            )
            return after if total == 5 else None

        wait_until(all_finished)  # the last finish step may still be running
        web = {"backend": "http_webhook"}
        for _ in range(8):  # each scrape on a new connection: any worker, the same sums
            after = scrape(proc)
            assert moved(after, "tether_jobs_created_total", **web) == 5
            assert moved(after, "tether_trigger_attempts_total", result="ok", **web) == 5
            assert moved(after, "tether_trigger_attempts_total", result="failed", **web) == 1
            assert moved(after, "tether_callbacks_total", verdict="accepted") == 4
            assert moved(after, "tether_callbacks_total", verdict="duplicate") == 1
            assert moved(after, "tether_callbacks_total", verdict="conflict") == 0
            for state, count in (("succeeded", 3), ("failed", 1), ("canceled", 1)):
                assert moved(after, "tether_jobs_finished_total", state=state, **web) == count
                assert (
                    moved(after, "tether_job_duration_seconds_count", state=state, **web) == count
                )
                assert value(after, "tether_jobs", state=state) == count  # not once per worker
            assert value(after, "tether_jobs", state="running") == 0
            http = "tether_http_request_duration_seconds_count"
            assert moved(after, http, method="POST", route="/jobs", status="201") == 5
            assert (
                moved(after, http, method="POST", route="/callbacks/{promise_id}", status="200")
                == 5
            )
    finally:
        code = proc.terminate()
    assert code == 0
    assert not directory.exists()
