"""Completion notifications with `tether serve --workers 2`: both worker
processes run a notifier on one store, and each try of a notification is
made by one of them. Every first try is refused (500), so the retries, which
either worker may take, are exercised too; the second tries are held open
at the receiver, and the worker holding one of them is SIGKILLed. Its try
was answered but never recorded: after its claim runs out (20 s) another
worker tries again with the same `webhook-id` (at least once, as documented);
every other notification is accepted exactly once."""

from __future__ import annotations

import json
import os
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.conftest import POLL, Receiver, wait_until
from tests.process import TetherProcess, wait_for

JOBS = 16


class Deliveries:
    """A receiver that refuses the first try of each notification (by its
    `webhook-id`) and holds every later one open until `release` is set,
    then accepts it; it keeps every try, and which of `workers` sent each
    one it held (found while the sender is alive)."""

    def __init__(self) -> None:
        self.tries: list[tuple[str, str, int, int]] = []  # (webhook-id, job, status, port)
        self.held: list[tuple[str, int | None]] = []  # (job, sending worker) of tries held
        self.workers: list[int] = []
        self.release = threading.Event()
        self.lock = threading.Lock()
        deliveries = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                webhook_id = self.headers["webhook-id"]
                job_id = json.loads(body)["job"]["id"]
                port = self.client_address[1]
                with deliveries.lock:
                    seen = any(w == webhook_id for w, _, _, _ in deliveries.tries)
                    if seen:
                        deliveries.held.append((job_id, owner_of(port, deliveries.workers)))
                if seen:
                    deliveries.release.wait(60)
                status = 200 if seen else 500
                with deliveries.lock:
                    deliveries.tries.append((webhook_id, job_id, status, port))
                try:
                    self.send_response(status)
                    self.send_header("content-length", "0")
                    self.end_headers()
                except OSError:  # the sender was killed meanwhile
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(POLL,), daemon=True).start()

    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/done"

    def accepted(self, job_id: str) -> int:
        with self.lock:
            return sum(job == job_id and status == 200 for _, job, status, _ in self.tries)

    def stop(self) -> None:
        self.release.set()
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


def owner_of(port: int, pids: list[int]) -> int | None:
    """Which of `pids` has the TCP socket whose local port is `port`."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port:
            inodes.add(f"socket:[{fields[9]}]")
    for pid in pids:
        try:
            if any(os.readlink(fd) in inodes for fd in Path(f"/proc/{pid}/fd").iterdir()):
                return pid
        except OSError:  # gone (the killed worker), or an fd closed meanwhile
            continue
    return None


def test_two_workers_deliver_each_notification_once_but_a_try_in_flight_at_a_worker_kill(
    tmp_path: Path, receiver: Receiver
) -> None:
    deliveries = Deliveries()
    env = {"TETHER_STORE": f"sqlite:///{tmp_path}/tether.db", "TETHER_NOTIFY_BACKOFF": "0.5"}
    service = TetherProcess(tmp_path, env, args=("--workers", "2")).start()
    try:
        assert service.proc is not None
        deliveries.workers = worker_pids(service.proc.pid)
        assert len(deliveries.workers) == 2
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
            # second tries arrive and are held open; kill a worker holding one
            wait_until(lambda: len(deliveries.held) >= 4, timeout=30)
            with deliveries.lock:
                victim = next(worker for _, worker in deliveries.held if worker is not None)
                os.kill(victim, signal.SIGKILL)
            deliveries.release.set()
        # a new client: the last one's connection may have been to the killed worker
        with service.client() as client:

            def delivered() -> bool:
                return all(
                    any(e["data"].get("status") == 200 for e in notified(client, f"n{i}"))
                    for i in range(JOBS)
                )

            wait_until(delivered, timeout=60, holds=2.0)
            histories = {f"n{i}": notified(client, f"n{i}") for i in range(JOBS)}
    finally:
        service.kill()
        deliveries.stop()
    # Read now, not at the kill: a try the victim sent just before it may be
    # looked up and noted by the receiver a moment after (a CI run saw one).
    with deliveries.lock:
        killed = {job for job, worker in deliveries.held if worker == victim}
    assert killed  # the kill caught a try in flight
    for job, tries in histories.items():
        data = [t["data"] for t in tries]
        statuses = [d["status"] for d in data]
        assert statuses[-1] == 200 and statuses.count(200) == 1, (job, data)
        numbers = [d["try"] for d in data]
        assert numbers == sorted(set(numbers)), (job, data)  # each try claimed once
        assert len({d["webhook_id"] for d in data}) == 1, (job, data)
        # accepted once; twice where the killed worker's try was answered but
        # never recorded (then retried once its claim ran out): surely for
        # those it was seen holding, perhaps for one whose sender was gone
        # before the receiver looked it up (None)
        senders = {worker for held_job, worker in deliveries.held if held_job == job}
        expected = {2} if job in killed else {1, 2} if None in senders else {1}
        assert deliveries.accepted(job) in expected, (job, senders, deliveries.tries)


def notified(client: Any, job_id: str) -> list[dict[str, Any]]:
    items = client.get(f"/jobs/{job_id}/events", params={"limit": 1000}).json()["items"]
    return [e for e in items if e["type"] == "notified"]
