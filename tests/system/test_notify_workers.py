"""Completion notifications with `tether serve --workers 2`: both worker
processes run a notifier on one store, and each notification is still sent
once at a time and accepted once. Every first try is refused (500), so the
retries, which either worker may take, are exercised too; then one worker is
SIGKILLed while retries are due, and its replacement and the other worker
deliver what is left, still once each."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.conftest import Receiver, wait_until
from tests.process import TetherProcess, wait_for

JOBS = 16


class Deliveries:
    """A receiver that refuses the first try of each notification (by its
    `webhook-id`) and accepts the later ones, keeping every try."""

    def __init__(self) -> None:
        self.tries: list[tuple[str, str, int]] = []  # (webhook-id, job id, status answered)
        self.lock = threading.Lock()
        deliveries = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                webhook_id = self.headers["webhook-id"]
                job_id = json.loads(body)["job"]["id"]
                with deliveries.lock:
                    seen = any(w == webhook_id for w, _, _ in deliveries.tries)
                    status = 200 if seen else 500
                    deliveries.tries.append((webhook_id, job_id, status))
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/done"

    def accepted(self) -> Counter[str]:
        with self.lock:
            return Counter(job for _, job, status in self.tries if status == 200)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def worker_pids(supervisor: int) -> list[int]:
    """The service's worker processes: the supervisor's children that
    multiprocessing spawned as workers (not its resource tracker)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            if parent == supervisor and b"--multiprocessing-fork" in cmdline:
                found.append(int(entry))
    return found


def test_two_workers_deliver_each_notification_once_across_retries_and_a_worker_kill(
    tmp_path: Path, receiver: Receiver
) -> None:
    deliveries = Deliveries()
    env = {
        "TETHER_STORE": f"sqlite:///{tmp_path}/tether.db",
        # retries 1 s apart, then 2 s: the kill lands while some are due
        "TETHER_NOTIFY_BACKOFF": "1",
    }
    service = TetherProcess(tmp_path, env, args=("--workers", "2")).start()
    try:
        with service.client() as client:
            for i in range(JOBS):
                body = {
                    "id": f"n{i}",
                    "backend": "http_webhook",
                    "params": {"url": receiver.url()},
                    "notify": {"url": deliveries.url()},
                }
                assert client.post("/jobs", json=body).status_code == 201
            for i in range(JOBS):
                wait_for(client, f"n{i}", "running")
            for hit in list(receiver.on("/hook")):
                answer = client.post(hit.body["callback_url"], json={"status": "succeeded"})
                assert answer.status_code == 200
            # every first try refused; then one worker dies with retries due
            wait_until(lambda: len(deliveries.tries) >= JOBS // 2, timeout=30)
            assert service.proc is not None
            workers = worker_pids(service.proc.pid)
            assert len(workers) == 2
            os.kill(workers[0], signal.SIGKILL)
            wait_until(lambda: len(deliveries.accepted()) == JOBS, timeout=60, holds=3.0)
            histories = {
                f"n{i}": [
                    e["data"]
                    for e in client.get(f"/jobs/n{i}/events", params={"limit": 1000}).json()[
                        "items"
                    ]
                    if e["type"] == "notified"
                ]
                for i in range(JOBS)
            }
    finally:
        service.kill()
        deliveries.stop()
    assert deliveries.accepted() == Counter({f"n{i}": 1 for i in range(JOBS)})
    # one webhook-id a job; each try claimed by one worker (its number once,
    # rising: a try claimed by the killed worker and never recorded leaves a
    # gap, and the claim's lease runs out before another worker tries again)
    ids = {job: {w for w, j, _ in deliveries.tries if j == job} for job in histories}
    assert all(len(found) == 1 for found in ids.values()), ids
    for job, tries in histories.items():
        statuses = [t["status"] for t in tries]
        assert statuses[-1] == 200 and statuses.count(200) == 1, (job, tries)
        numbers = [t["try"] for t in tries]
        assert numbers == sorted(set(numbers)), (job, tries)
        sent = [status for _, j, status in deliveries.tries if j == job]
        assert len(sent) <= len(tries) + 1, (job, sent, tries)  # at most the killed one unrecorded
