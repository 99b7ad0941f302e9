"""Two hosts on one Postgres (docs/deploy.md): two real `tether serve`
processes, each in a working directory of its own, sharing one database.
Host A takes the jobs (alone at first, so their triggers are its own) and is
SIGKILLed while they wait and while two triggers are in flight; callbacks, a
cancel and a status check go through host B (as a load balancer would send
them); every job finishes exactly once, A's
workflows resume on B within `TETHER_TASK_TTL`, and both hosts list the same.
Then A comes back and both keep working.

Needs TETHER_TEST_PG_DSN (docs/testing.md); skipped without it."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from tests.conftest import Hit, Receiver, wait_until
from tests.process import TetherProcess, report, wait_for

TTL = 2.0
WAITING = [f"w{i}" for i in range(6)]
IN_FLIGHT = ["f0", "f1"]


def host(
    tmp_path: Path, name: str, store: str, port: int | None = None, ttl: float = TTL
) -> TetherProcess:
    home = tmp_path / name  # a working directory of its own: nothing shared but Postgres
    home.mkdir(exist_ok=True)
    env = {"TETHER_STORE": store, "TETHER_TASK_TTL": str(ttl)}
    return TetherProcess(home, env, port=port, cwd=home)


def via(client: httpx.Client, url: str) -> str:
    """A callback URL made on any host, sent to this client's host (its path
    and token are the same on every host sharing the secret)."""
    parts = urlsplit(url)
    return f"{client.base_url}{parts.path}?{parts.query}"


def finished_once(client: httpx.Client, job_id: str) -> bool:
    events = client.get(f"/jobs/{job_id}/events").json()["items"]
    return [e["type"] for e in events].count("finished") == 1


def test_a_host_dies_and_the_other_finishes_every_job_exactly_once(
    tmp_path, receiver: Receiver, fresh_pg_url, capsys
):
    release = threading.Event()

    def respond(hit: Hit) -> tuple[int, Any]:
        if hit.path == "/status":  # still going until host A is gone
            return 200, {"status": "succeeded" if release.is_set() else "running"}
        if hit.body["job_id"] in IN_FLIGHT and not release.is_set():
            release.wait(30)  # in flight when host A dies
        return 202, {"run": hit.body["idempotency_key"]}

    receiver.respond = respond
    a = host(tmp_path, "a", fresh_pg_url).start()
    b = host(tmp_path, "b", fresh_pg_url)  # started once A holds the triggers
    try:
        with a.client() as ca, b.client() as cb:
            for job_id in [*WAITING, *IN_FLIGHT, "checked"]:
                params: dict[str, Any] = {"url": receiver.url()}
                if job_id == "checked":  # ends through a status check, never a callback
                    params |= {"status_url": receiver.url("/status"), "status_interval": 0.5}
                body = {"id": job_id, "backend": "http_webhook", "params": params}
                assert ca.post("/jobs", json=body).status_code == 201
            for job_id in WAITING:
                wait_for(ca, job_id, "running", recorded=True)
            wait_until(lambda: {h.body["job_id"] for h in receiver.on("/hook")} >= set(IN_FLIGHT))
            wait_for(ca, "checked", "running", recorded=True)
            b.start()

            a.kill()  # with six waiting and two of its triggers in flight
            killed = time.monotonic()
            release.set()

            for job_id in IN_FLIGHT:  # B runs A's trigger steps again, same keys
                wait_for(cb, job_id, "running", recorded=True, timeout=60)
            resumed = time.monotonic() - killed
            keys = [h.body["idempotency_key"] for h in receiver.hits if h.path == "/hook"]
            assert sorted(set(keys)) == sorted(f"{i}:1" for i in [*WAITING, *IN_FLIGHT, "checked"])

            urls = {h.body["job_id"]: h.body["callback_url"] for h in receiver.on("/hook")}
            for job_id in [*WAITING[:5], *IN_FLIGHT]:
                answer = cb.post(via(cb, urls[job_id]), json={"status": "succeeded"})
                assert answer.status_code == 200, answer.text
            assert (
                cb.post(f"/jobs/{WAITING[5]}/cancel", json={"reason": "host test"}).json()["state"]
                == "canceled"
            )
            wait_for(cb, "checked", "succeeded", timeout=30)
            for job_id in [*WAITING[:5], *IN_FLIGHT]:
                wait_for(cb, job_id, "succeeded")

            a = host(tmp_path, "a", fresh_pg_url, port=a.port).start()  # A returns
            with a.client() as ca2:
                ids = [*WAITING, *IN_FLIGHT, "checked"]
                assert all(finished_once(cb, job_id) for job_id in ids)
                listed_a = ca2.get("/jobs", params={"limit": 100}).json()["items"]
                listed_b = cb.get("/jobs", params={"limit": 100}).json()["items"]
                assert [(j["id"], j["state"]) for j in listed_a] == [
                    (j["id"], j["state"]) for j in listed_b
                ]
                # both keep working: a job on each, called back through the other
                for client, job_id in ((ca2, "after-a"), (cb, "after-b")):
                    body = {
                        "id": job_id,
                        "backend": "http_webhook",
                        "params": {"url": receiver.url()},
                    }
                    assert client.post("/jobs", json=body).status_code == 201
                    wait_for(client, job_id, "running", recorded=True)
                urls = {h.body["job_id"]: h.body["callback_url"] for h in receiver.on("/hook")}
                assert (
                    cb.post(via(cb, urls["after-a"]), json={"status": "succeeded"}).status_code
                    == 200
                )
                assert (
                    ca2.post(via(ca2, urls["after-b"]), json={"status": "succeeded"}).status_code
                    == 200
                )
                wait_for(ca2, "after-b", "succeeded")
                wait_for(cb, "after-a", "succeeded")
        report(
            capsys,
            f"two hosts on Postgres: A's triggers resumed on B {resumed:.1f} s"
            f" after SIGKILL (TTL {TTL:g} s)",
        )
        # the lease runs out, then B's next look at the store: 1.2-1.9 s over
        # seven runs (2026-12-06); 22 s allowed let a takeover ten times
        # slower pass
        assert resumed <= TTL + 6
    finally:
        a.kill()
        b.kill()


def test_a_job_canceled_while_its_trigger_died_with_its_host_has_that_run_stopped(
    tmp_path, receiver: Receiver, fresh_pg_url
):
    """Host A dies inside a trigger's try (the receiver took it, no answer
    came back), and the job is canceled through host B before B takes the
    workflow over. B's replay finds the job ended with no run recorded:
    its finish POSTs `cancel_url` for the run A's try started (before
    2026-12-04 nothing stopped it), and the trigger is not sent again."""
    release = threading.Event()

    def respond(hit: Hit) -> tuple[int, Any]:
        if hit.path == "/hook":
            release.wait(30)  # in flight when host A dies
        return 202, {}

    receiver.respond = respond
    a = host(tmp_path, "a", fresh_pg_url).start()
    b = host(tmp_path, "b", fresh_pg_url)
    try:
        with a.client() as ca, b.client() as cb:
            params = {"url": receiver.url(), "cancel_url": receiver.url("/cancel")}
            body = {"id": "c0", "backend": "http_webhook", "params": params}
            assert ca.post("/jobs", json=body).status_code == 201
            wait_until(lambda: receiver.on("/hook"))
            b.start()
            a.kill()
            release.set()
            assert cb.post("/jobs/c0/cancel").json()["state"] == "canceled"

            wait_until(lambda: receiver.on("/cancel"), timeout=TTL + 30)
            job = cb.get("/jobs/c0").json()
            assert (job["state"], job["external"]) == ("canceled", None)
            assert finished_once(cb, "c0")
        assert {h.body["promise_id"] for h in receiver.on("/cancel")} == {"c0:1"}
        assert len(receiver.on("/hook")) == 1
    finally:
        a.kill()
        b.kill()


def test_a_host_stopped_during_backoffs_hands_them_to_the_other_at_once(
    tmp_path, receiver: Receiver, fresh_pg_url
):
    """SIGTERM to host A while its triggers wait between two tries (a
    target's `Retry-After: 3`): A hands the workflows back, and B tries
    again as the target asked, not once the lease (a minute here) runs out.
    On Postgres the hand-back was refused while resonate-pg's connection
    stopped, logged as an error, and held for the lease (a QA pass)."""
    ids = [f"b{i}" for i in range(4)]

    def respond(hit: Hit) -> tuple[Any, ...]:
        if len([h for h in receiver.hits if h.body["job_id"] == hit.body["job_id"]]) == 1:
            return 503, {"busy": True}, {"retry-after": "3"}
        return 202, {}

    receiver.respond = respond
    a = host(tmp_path, "a", fresh_pg_url, ttl=60).start()
    b = host(tmp_path, "b", fresh_pg_url, ttl=60)
    try:
        with a.client() as ca:
            for job_id in ids:
                body = {"id": job_id, "backend": "http_webhook", "params": {"url": receiver.url()}}
                assert ca.post("/jobs", json=body).status_code == 201
            for job_id in ids:
                wait_until(lambda j=job_id: '"trigger_failed"' in ca.get(f"/jobs/{j}/events").text)
        b.start()
        assert a.terminate(wait=30) == -signal.SIGTERM
        log = a.log.read_text()
        assert "ERROR" not in log and "Traceback" not in log, log
        with b.client() as cb:
            for job_id in ids:  # not the lease's minute
                wait_for(cb, job_id, "running", recorded=True, timeout=20)
    finally:
        a.kill()
        b.kill()
    for job_id in ids:
        keys = [h.body["idempotency_key"] for h in receiver.hits if h.body["job_id"] == job_id]
        assert keys == [f"{job_id}:1", f"{job_id}:1"], keys
