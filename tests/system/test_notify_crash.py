"""Completion notifications on the real `tether serve`: one pending across a
SIGKILL and a restart (delivered once the receiver accepts, with the same
`webhook-id`, signed with the secret kept beside the store), and one given up
when its retry window runs out (`notify_failed`, counted at `/metrics`). The
notify URL carries a token in its path: it never shows in the job, its
history or the service's log."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx

from core.store.embedded import notify_secret_path
from tests.conftest import Receiver, wait_until
from tests.core.test_notify import SECRET, TOKEN, NotifyReceiver, verify
from tests.process import TetherProcess, wait_for


def service(tmp_path: Path, **env: str) -> TetherProcess:
    settings = {
        "TETHER_STORE": f"sqlite:///{tmp_path}/tether.db",
        "TETHER_NOTIFY_BACKOFF": "0.2",
        **env,
    }
    return TetherProcess(tmp_path, settings)


def canceled_job(client: httpx.Client, backend: Receiver, job_id: str, notify: str) -> None:
    body = {
        "id": job_id,
        "backend": "http_webhook",
        "params": {"url": backend.url()},
        "notify": {"url": notify},
    }
    answer = client.post("/jobs", json=body)
    assert answer.status_code == 201, answer.text
    wait_for(client, job_id, "running")
    assert client.post(f"/jobs/{job_id}/cancel").status_code == 200


def events(client: httpx.Client, job_id: str, kind: str) -> list[dict[str, Any]]:
    items = client.get(f"/jobs/{job_id}/events", params={"limit": 1000}).json()["items"]
    return [e for e in items if e["type"] == kind]


def shown(client: httpx.Client, job_id: str) -> str:
    """Everything a client may read about the job."""
    return json.dumps(
        [
            client.get(f"/jobs/{job_id}").json(),
            client.get(f"/jobs/{job_id}/events").json(),
            client.get("/jobs").json(),
        ]
    )


def test_a_notification_pending_across_a_sigkill_is_delivered_after_the_restart(tmp_path, receiver):
    notified = NotifyReceiver(then=500).start()
    # Tries 1 s, then 2 s apart: the kill comes between two tries, not during one.
    first = service(tmp_path, TETHER_NOTIFY_BACKOFF="1").start()
    try:
        with first.client() as client:
            canceled_job(client, receiver, "k", notified.url())
            wait_until(lambda: len(events(client, "k", "notified")) >= 2, timeout=10)
            assert not notified.accepted()
        first.kill()  # SIGKILL, with the notification due again
        failed_tries = len(notified.got)
        notified.then = 200
        second = service(tmp_path, TETHER_NOTIFY_BACKOFF="1").start()
        try:
            with second.client() as client:
                wait_until(lambda: notified.accepted(), timeout=40, holds=1.0)
                assert len(notified.accepted()) == 1  # delivered once
                tries = events(client, "k", "notified")
                assert [t["data"]["status"] for t in tries] == [500] * failed_tries + [200]
                assert [t["data"]["try"] for t in tries] == list(range(1, len(tries) + 1))
                page = shown(client, "k")
        finally:
            second.kill()
    finally:
        notified.stop()
    webhook_id = tries[0]["data"]["webhook_id"]
    assert {t["data"]["webhook_id"] for t in tries} == {webhook_id}
    assert {d.headers["webhook-id"] for d in notified.got} == {webhook_id}
    secret = notify_secret_path(tmp_path / "tether.db").read_text().strip()
    for delivery in notified.got:  # the secret kept beside the store signs them all
        verify(secret, delivery)
    assert notified.got[-1].message["job"]["id"] == "k"
    logged = first.log.read_text() + second.log.read_text()
    assert TOKEN not in page + logged
    assert f"notification {webhook_id} delivered to {notified.origin}" in logged


def test_running_out_of_the_retry_window_records_notify_failed_and_counts_it(tmp_path, receiver):
    notified = NotifyReceiver(then=503).start()
    proc = service(
        tmp_path, TETHER_NOTIFY_SECRET=SECRET, TETHER_NOTIFY_RETRY_FOR="1", TETHER_LOG_FORMAT="json"
    ).start()
    try:
        with proc.client() as client:
            canceled_job(client, receiver, "w", notified.url())
            wait_until(lambda: events(client, "w", "notify_failed"), timeout=15)
            # Told just after it is filed, and written by a thread: in the log
            # before the kill, which loses what is unwritten.
            wait_until(lambda: "given up" in proc.log.read_text())
            tries = events(client, "w", "notified")
            (given_up,) = events(client, "w", "notify_failed")
            metrics = client.get("/metrics").text
            page = shown(client, "w")
            assert client.get("/jobs/w").json()["state"] == "canceled"
    finally:
        proc.kill()
        notified.stop()
    assert len(tries) >= 3 and {t["data"]["status"] for t in tries} == {503}
    assert given_up["data"] == {
        "webhook_id": tries[0]["data"]["webhook_id"],
        "tries": len(tries),
        "error": "answered 503",
    }
    assert len(notified.got) == len(tries)
    for delivery in notified.got:
        verify(SECRET, delivery)

    def sample(name: str, **labels: str) -> float:
        shown_labels = ",".join(f'{k}="{v}"' for k, v in labels.items())
        found = re.search(rf"^{name}\{{{shown_labels}\}} (\S+)$", metrics, re.M)
        assert found, (name, labels)
        return float(found.group(1))

    assert sample("tether_notifications_failed_total", backend="http_webhook") == 1
    assert sample("tether_notifications_total", backend="http_webhook", result="failed") == len(
        tries
    )
    assert sample("tether_notifications_total", backend="http_webhook", result="ok") == 0
    logged = proc.log.read_text()
    assert TOKEN not in page + logged and SECRET.removeprefix("whsec_") not in logged
    lines = [json.loads(line) for line in logged.splitlines() if line.startswith("{")]
    (line,) = [x for x in lines if "given up" in x["msg"]]
    assert (line["level"], line["job_id"]) == ("WARNING", "w")
    assert notified.origin in line["msg"]
