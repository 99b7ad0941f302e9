"""Heartbeats across a real `tether serve --workers 2` and a crash: each
heartbeat may reach either worker, and whichever worker's watchdog looks next
sees it (both read the store); a miss is handled by one process only; after a
SIGKILL and a restart, a job whose heartbeats stopped still times out, and one
whose backend says it is running is still asked about (once its silence has
doubled: `core.watchdog.recheck_in`)."""

from __future__ import annotations

import itertools
import threading
import time
from datetime import datetime
from typing import Any

import httpx

from tests.conftest import Hit, Receiver, wait_until
from tests.process import TetherProcess, wait_for

BEAT = 1.0
SPACING = BEAT / 2
"""The least time between two status asks about the silent job. One worker
claims each miss, at least BEAT after the last claim; the ask leaves after the claim,
later on a loaded loop, so asks may come closer than BEAT (a CI run saw two
less than 0.8 s apart, after the restart; not pinned down further). Two
workers asking about one miss would come within milliseconds of each other."""
"""The jobs' heartbeat_timeout, in seconds."""


def serve(tmp_path: Any) -> TetherProcess:
    env = {"TETHER_STORE": f"sqlite:///{tmp_path}/t.db", "TETHER_WATCHDOG_INTERVAL": "0.1"}
    return TetherProcess(tmp_path, env, args=("--workers", "2")).start()


def events(http: httpx.Client, job_id: str, kind: str) -> list[dict[str, Any]]:
    items = http.get(f"/jobs/{job_id}/events", params={"limit": 1000}).json()["items"]
    return [e for e in items if e["type"] == kind]


def test_heartbeats_hold_across_workers_and_misses_are_seen_after_a_crash(
    tmp_path: Any, receiver: Receiver
) -> None:
    def respond(hit: Hit) -> tuple[int, Any]:
        return (200, {"status": "running"}) if hit.path == "/status" else (202, {})

    receiver.respond = respond
    service = serve(tmp_path)
    try:
        with service.client() as http:
            for job_id, extra in (
                ("beating", {}),
                ("watched", {"status_url": receiver.url("/status"), "status_interval": 3600}),
            ):
                body = {
                    "id": job_id,
                    "backend": "http_webhook",
                    "params": {"url": receiver.url(), **extra},
                    "timeout": 120,
                    "heartbeat_timeout": BEAT,
                }
                assert http.post("/jobs", json=body).status_code == 201
                wait_for(http, job_id, "running", recorded=True)
            [url] = [h.body["heartbeat_url"] for h in receiver.hits if h.path == "/hook"][:1]
            # Four heartbeat_timeouts of heartbeats, new connections each, so
            # both workers take some.
            started = time.monotonic()
            n = 0
            while time.monotonic() - started < 4 * BEAT:
                with httpx.Client(trust_env=False) as once:
                    assert once.post(url, json={"progress": n}).status_code == 200
                n += 1
                time.sleep(BEAT / 4)
            job = http.get("/jobs/beating").json()
            assert (job["state"], job["progress"]) == ("running", n - 1)
            assert not events(http, "beating", "heartbeat_missed")
            # The silent one was asked about as its silence doubled (1, 2, 4 s), by one worker.
            missed = events(http, "watched", "heartbeat_missed")
            assert 2 <= len(missed) <= 5, missed
            asked = [h.at for h in receiver.on("/status")]
            assert all(b - a >= SPACING for a, b in itertools.pairwise(asked))
            assert http.get("/jobs/watched").json()["state"] == "running"
    finally:
        service.kill()

    # A crash, then a restart on the same store: the beating job's heartbeats stopped.
    asked_before = len(receiver.on("/status"))
    restarted = time.time()
    service = serve(tmp_path)
    try:
        with service.client() as http:
            job = wait_for(http, "beating", "timed_out", timeout=15)
            assert job["error"]["type"] == "heartbeat_timeout"
            # The silent one is asked about BEAT after the start (its grace),
            # whatever the last look before the crash planned, and it is filed.
            wait_until(lambda: len(receiver.on("/status")) > asked_before, timeout=10)
            wait_until(
                lambda: any(
                    datetime.fromisoformat(e["at"]).timestamp() >= restarted
                    for e in events(http, "watched", "heartbeat_missed")
                ),
                timeout=10,
            )
            assert http.get("/jobs/watched").json()["state"] == "running"
            asked = [h.at for h in receiver.on("/status")]
            assert all(b - a >= SPACING for a, b in itertools.pairwise(asked))
    finally:
        service.kill()


def test_a_run_that_beats_through_a_restart_is_not_timed_out(
    tmp_path: Any, receiver: Receiver
) -> None:
    """The service is down longer than `heartbeat_timeout` while the run keeps
    trying to beat (and has no status URL to ask): after the restart the run
    gets `heartbeat_timeout` from the start, so its next heartbeat keeps the
    job running. Before, the first look after the start timed the job out."""
    service = serve(tmp_path)
    beats = {"ok": 0, "failed": 0}
    stop = threading.Event()

    def beat(url: str) -> None:  # the run: every 0.4 s, whatever the service says
        while not stop.is_set():
            try:
                with httpx.Client(trust_env=False, timeout=2) as once:
                    code = once.post(url, json={"progress": beats["ok"]}).status_code
                beats["ok" if code == 200 else "failed"] += 1
            except httpx.HTTPError:
                beats["failed"] += 1
            stop.wait(0.4)

    beater = None
    try:
        with service.client() as http:
            body = {
                "id": "beating",
                "backend": "http_webhook",
                "params": {"url": receiver.url()},
                "timeout": 120,
                "heartbeat_timeout": 2,
            }
            assert http.post("/jobs", json=body).status_code == 201
            wait_for(http, "beating", "running", recorded=True)
        [url] = [h.body["heartbeat_url"] for h in receiver.hits if h.path == "/hook"]
        beater = threading.Thread(target=beat, args=(url,), daemon=True)
        beater.start()
        wait_until(lambda: beats["ok"] >= 2, timeout=10)
        service.kill()
        time.sleep(3.5)  # down for more than heartbeat_timeout
        down = beats["failed"]
        service.start()  # on the same port: the run's heartbeat URL names it
        with service.client() as http:
            ok = beats["ok"]
            wait_until(lambda: beats["ok"] >= ok + 8, timeout=20)  # 3 s and more of beats
            job = http.get("/jobs/beating").json()
            assert job["state"] == "running", job
            assert not events(http, "beating", "heartbeat_missed")
        assert down >= 3  # the run did try while the service was down
    finally:
        stop.set()
        if beater is not None:
            beater.join(5)
        service.kill()
