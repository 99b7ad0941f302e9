"""Per-backend limits on the real `tether serve`: two worker processes sharing
the embedded store keep to one limit between them, and a SIGKILL at any point
neither leaks a slot (every queued job still runs) nor doubles one (never more
jobs triggered and unfinished than the limit)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import Receiver, wait_until
from tests.process import TetherProcess, wait_for

IDS = ["j1", "j2", "j3", "j4", "j5"]


def service(tmp_path: Path, port: int | None = None, workers: int = 2) -> TetherProcess:
    env = {
        "TETHER_STORE": f"sqlite:///{tmp_path}/tether.db",
        "TETHER_MAX_RUNNING": "http_webhook=2",
        "TETHER_TASK_TTL": "2",
    }
    return TetherProcess(tmp_path, env, port=port, args=("--workers", str(workers)))


class Ledger:
    """What the external system saw: each job's trigger (distinct idempotency
    keys: a repeat of the same key after a kill is the same run) and which of
    them the test has called back, with the most ever running at once."""

    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver
        self.done: set[str] = set()
        self.most = 0
        self.lock = threading.Lock()
        receiver.respond = self._respond

    def _respond(self, hit: Any) -> tuple[int, Any]:
        with self.lock:
            self.most = max(
                self.most, len(self.running()) + (hit.body["job_id"] not in self.started())
            )
        return 202, {"ok": True}

    def started(self) -> list[str]:
        """Jobs triggered, in order of their first trigger, except that j1 and
        j2 (which took the two slots at once, so their workflows trigger side
        by side in no set order) come first in that order."""
        first = list(dict.fromkeys(h.body["job_id"] for h in self.receiver.hits))
        return sorted(first[:2]) + first[2:]

    def running(self) -> set[str]:
        return set(self.started()) - self.done

    def finish(self, client: httpx.Client, job_id: str) -> None:
        url = next(h.body["callback_url"] for h in self.receiver.hits if h.body["job_id"] == job_id)
        with self.lock:
            self.done.add(job_id)
        assert client.post(url, json={"status": "succeeded"}).status_code == 200


def submit_all(client: httpx.Client, receiver: Receiver) -> None:
    for job_id in IDS:
        body = {"id": job_id, "backend": "http_webhook", "params": {"url": receiver.url()}}
        assert client.post("/jobs", json=body).status_code == 201


def test_two_workers_keep_one_limit_and_start_the_queue_in_order(tmp_path, receiver):
    ledger = Ledger(receiver)
    tether = service(tmp_path).start()
    try:
        with tether.client() as client:
            submit_all(client, receiver)
            wait_until(lambda: ledger.started() == ["j1", "j2"], holds=0.5)
            states = [client.get(f"/jobs/{i}").json()["state"] for i in IDS]
            assert states[2:] == ["queued"] * 3
            for expected in (["j1", "j2", "j3"], ["j1", "j2", "j3", "j4"], IDS):
                ledger.finish(client, sorted(ledger.running())[0])
                wait_until(lambda expected=expected: ledger.started() == expected, holds=0.3)
            for job_id in sorted(ledger.running()):
                ledger.finish(client, job_id)
            for job_id in IDS:
                wait_for(client, job_id, "succeeded")
        assert ledger.most == 2
        keys = [h.body["idempotency_key"] for h in receiver.hits]
        assert sorted(keys) == [f"{i}:1" for i in IDS]  # each triggered once
    finally:
        tether.kill()


def test_a_sigkill_leaks_no_slot_and_doubles_none(tmp_path, receiver):
    ledger = Ledger(receiver)
    first = service(tmp_path).start()
    with first.client() as client:
        submit_all(client, receiver)
        wait_until(lambda: ledger.started() == ["j1", "j2"], holds=0.3)
        # A callback, then the kill at once: the end, the next job's promotion
        # and the start of its workflow may each be cut off.
        ledger.finish(client, "j1")
    first.kill()

    second = service(tmp_path, port=first.port).start()
    try:
        with second.client() as client:
            wait_until(lambda: ledger.started() == ["j1", "j2", "j3"], timeout=20, holds=0.5)
            wait_for(client, "j1", "succeeded")
            ledger.finish(client, "j2")
            wait_until(lambda: len(ledger.started()) == 4, holds=0.3)
        second.kill()  # with two running and one queued

        third = service(tmp_path, port=first.port, workers=1).start()
        try:
            with third.client() as client:
                wait_until(lambda: len(ledger.started()) == 4, holds=0.5)
                for job_id in ("j3", "j4"):
                    ledger.finish(client, job_id)
                wait_until(lambda: ledger.started() == IDS, holds=0.3)
                ledger.finish(client, "j5")
                for job_id in IDS:
                    wait_for(client, job_id, "succeeded")
                listed = client.get("/jobs", params={"state": ["queued", "pending", "running"]})
                assert listed.json()["items"] == []
        finally:
            third.kill()
    finally:
        second.kill()
    assert ledger.most == 2
