"""The real `tether serve` on a Resonate server (the stand-in, serving from
this test process), its job index in SQLite: SIGKILLed with one job waiting
for its callback and another inside its trigger step, restarted while the
server keeps running, both jobs finish, each trigger sent as the embedded
store would (once; again with the same key after a kill inside the step).
The server's token reaches it on every request, never the log."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

import core.service
import core.settle
import core.watchdog
from core.store.remote import RemoteStore
from tests.conftest import HOLD, Hit, Receiver, eventually, test_settings, wait_until
from tests.process import TetherProcess, wait_for
from tests.resonate_server.stand_in import RUNNING, StandIn
from tests.system.test_notify_workers import worker_pids

TOKEN = "t0ken-the-log-must-never-show"


def service(
    tmp_path: Path, server: StandIn, port: int | None = None, ttl: int = 2
) -> TetherProcess:
    return TetherProcess(
        tmp_path,
        {
            "TETHER_STORE": server.url,
            "TETHER_INDEX": f"sqlite:///{tmp_path}/index.db",
            "TETHER_STORE_TOKEN": TOKEN,
            "TETHER_TASK_TTL": str(ttl),
        },
        port=port,
    )


def start_job(client: httpx.Client, receiver: Receiver, job_id: str) -> None:
    response = client.post(
        "/jobs",
        json={"id": job_id, "backend": "http_webhook", "params": {"url": receiver.url()}},
    )
    assert response.status_code == 201, response.text


def callback(receiver: Receiver, job_id: str, body: Any) -> httpx.Response:
    [url] = {h.body["callback_url"] for h in receiver.hits if h.body["job_id"] == job_id}
    return httpx.post(url, json=body, trust_env=False, timeout=10)


def task_state(server: StandIn, task_id: str) -> str:
    """The state of a task, asked of the server as any client would."""
    answer = httpx.post(
        server.url + "/",
        json={"kind": "task.get", "head": {"corrId": "t", "version": "v"}, "data": {"id": task_id}},
        headers={"Authorization": f"Bearer {TOKEN}"},
        trust_env=False,
    ).json()
    assert answer["head"]["status"] == 200, answer
    return str(answer["data"]["task"]["state"])


def test_a_killed_service_on_a_resonate_server_finishes_its_jobs_after_restart(tmp_path, receiver):
    release = threading.Event()

    def respond(hit: Hit) -> tuple[int, Any]:
        if hit.body["job_id"] == "mid" and len(receiver.on("/hook")) == 2:
            release.wait(20)  # hold the first trigger of "mid" until the service is dead
        return 202, {}

    receiver.respond = respond
    server = StandIn(tmp_path / "resonate.db", token=TOKEN).start()
    try:
        first = service(tmp_path, server).start()
        with first.client() as client:
            start_job(client, receiver, "wait")
            wait_for(client, "wait", "running", recorded=True)
            start_job(client, receiver, "mid")
            wait_until(lambda: len(receiver.hits) == 2, every=0.02)
        first.kill()
        release.set()

        second = service(tmp_path, server, port=first.port).start()
        try:
            with second.client() as client:
                answer = callback(receiver, "wait", {"status": "succeeded", "result": 7})
                assert answer.status_code == 200 and answer.json()["outcome"] == "accepted"
                assert wait_for(client, "wait", "succeeded")["result"] == 7
                # the step cut short by the kill runs again once its lease ran out
                wait_for(client, "mid", "running", recorded=True)
                callback(receiver, "mid", {"status": "failed", "error": {"message": "x"}})
                mid = wait_for(client, "mid", "failed")
                wait_until(lambda: client.get("/jobs/mid").json() == mid, holds=HOLD)
        finally:
            second.kill()
    finally:
        server.stop()
    keys = [h.body["idempotency_key"] for h in receiver.hits]
    assert keys == ["wait:1", "mid:1", "mid:1"]
    assert server.delivered > 0  # work reached the services through the message stream
    assert set(server.authorizations) == {f"Bearer {TOKEN}"}
    log = first.log.read_text()  # both runs write to it (same port)
    assert log.count(f"store {server.url},") == 2 and TOKEN not in log


def test_a_worker_replaced_while_the_server_is_down_comes_back_with_it(tmp_path, receiver):
    """The server stops; a worker dies (SIGKILL) meanwhile: its replacement
    cannot reach the server as it starts, and is tried again with a growing
    wait while the other worker serves what it can (the job index), instead
    of the whole host stopping (it did, with exit status 0). The server
    returns: both workers serve, and the job waiting from before finishes."""
    server = StandIn(tmp_path / "resonate.db", token=TOKEN).start()
    served = TetherProcess(
        tmp_path,
        {
            "TETHER_STORE": server.url,
            "TETHER_INDEX": f"sqlite:///{tmp_path}/index.db",
            "TETHER_STORE_TOKEN": TOKEN,
        },
        args=("--workers", "2"),
    ).start()
    again: StandIn | None = None
    try:
        started = "Application startup complete"
        wait_until(lambda: served.log.read_text().count(started) == 2, timeout=20)  # both serve
        with served.client() as client:
            start_job(client, receiver, "w")
            wait_for(client, "w", "running", recorded=True)
        assert served.proc is not None
        [first, second] = worker_pids(served.proc.pid)
        server.stop()
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: "trying again in 2s" in served.log.read_text(), timeout=30)
        assert served.proc.poll() is None  # the supervisor goes on
        with served.client() as client:  # the other worker reads the index
            assert client.get("/jobs/w").json()["state"] == "running"
        again = StandIn(tmp_path / "resonate.db", token=TOKEN, port=server.port).start()

        def both_serve() -> bool:
            assert served.proc is not None
            pids = worker_pids(served.proc.pid)
            return len(pids) == 2 and second in pids and first not in pids

        wait_until(both_serve, timeout=40)
        answer = callback(receiver, "w", {"status": "succeeded", "result": 1})
        assert answer.status_code == 200 and answer.json()["outcome"] == "accepted"
        with served.client() as client:

            def healthy() -> bool:
                try:
                    return client.get("/health", timeout=15).status_code == 200
                except httpx.TimeoutException:  # a probe waits on the server's answers
                    return False

            wait_until(healthy, timeout=30)
            assert wait_for(client, "w", "succeeded")["result"] == 1
    finally:
        served.kill()
        server.stop()
        if again is not None:
            again.stop()
    log = served.log.read_text()
    assert TOKEN not in log
    said = rf"could not reach the store {re.escape(server.url)} as it started; trying again in"
    waits = re.findall(said + r" ([0-9.]+)s", log)
    assert waits[:3] == ["0.5", "1", "2"], waits  # doubling, not reset by a starting worker
    # One line a try: the worker's traceback only at the first (later ones at DEBUG)
    assert len(re.findall(r"ERROR tether\.http: .*Traceback \(most recent", log)) == 1, log
    assert log.count("Application startup failed") == 1, log


def test_sigterm_on_a_resonate_server_lets_the_step_under_way_record_itself(tmp_path, receiver):
    """The SDK closes its connections before it waits for the work under way:
    the message stream closes, requests still go, so the trigger in flight at
    SIGTERM is recorded and never sent again."""

    def respond(hit: Hit) -> tuple[int, Any]:
        time.sleep(1)  # a slow external system: the trigger is in flight at SIGTERM
        return 202, {}

    receiver.respond = respond
    server = StandIn(tmp_path / "resonate.db", token=TOKEN).start()
    try:
        first = service(tmp_path, server).start()
        with first.client() as client:
            start_job(client, receiver, "term")
            wait_until(lambda: receiver.hits, every=0.02)
        assert first.terminate(wait=20) == -signal.SIGTERM
        # the workflow went on to wait for its callback: its task let go, not left to expire
        assert task_state(server, "term") == "suspended"
        second = service(tmp_path, server, port=first.port).start()
        try:
            with second.client() as client:
                assert client.get("/jobs/term").json()["external"] is not None
                callback(receiver, "term", {"status": "succeeded"})
                wait_for(client, "term", "succeeded")
        finally:
            second.kill()
    finally:
        server.stop()
    assert [h.body["idempotency_key"] for h in receiver.hits] == ["term:1"]


def test_sigterm_on_a_resonate_server_cuts_a_triggers_backoff_short(tmp_path, receiver):
    """A trigger waiting out a target's `Retry-After: 6` at SIGTERM: the
    stop does not wait for it and hands the task back to the server (its
    lease, a minute here, does not run out first), and the restart tries
    again with the same key, once, no sooner than asked."""

    def respond(hit: Hit) -> tuple[Any, ...]:
        if len(receiver.hits) == 1:
            return 503, {"busy": True}, {"retry-after": "6"}
        return 202, {}

    receiver.respond = respond
    server = StandIn(tmp_path / "resonate.db", token=TOKEN).start()
    try:
        first = service(tmp_path, server, ttl=60).start()
        with first.client() as client:
            start_job(client, receiver, "backoff")
            wait_until(lambda: '"trigger_failed"' in client.get("/jobs/backoff/events").text)
        started = time.monotonic()
        assert first.terminate(wait=30) == -signal.SIGTERM
        assert time.monotonic() - started < 8  # not the 20 s the stop waits for its steps
        assert len(receiver.hits) == 1
        second = service(tmp_path, server, port=first.port, ttl=60).start()
        try:
            with second.client() as client:
                wait_until(lambda: len(receiver.hits) == 2, timeout=20)  # not the lease's minute
                wait_for(client, "backoff", "running")
                callback(receiver, "backoff", {"status": "succeeded"})
                wait_for(client, "backoff", "succeeded")
        finally:
            second.kill()
    finally:
        server.stop()
    assert [h.body["idempotency_key"] for h in receiver.hits] == ["backoff:1", "backoff:1"]
    assert receiver.hits[1].at - receiver.hits[0].at >= 5.9  # as the target asked


@pytest.mark.parametrize("store_url", ["resonate"], indirect=True)
async def test_a_job_sent_while_the_server_is_down_is_accepted_and_triggered_once_back(
    start_service, receiver, resonate_stand_ins, monkeypatch
):
    """The job index takes the job; its workflow cannot start. An error would
    have a client that sent no id send it again as a second job: it is
    accepted `pending`, and started (once) when the server is back."""
    monkeypatch.setattr(core.settle, "STORE_CALL_TIMEOUT", 1.0)
    monkeypatch.setattr(core.watchdog, "RESUME_EVERY", 0.5)
    monkeypatch.setattr(core.service, "STALE_PENDING_MS", 500)
    svc = await start_service()
    server = RUNNING[svc.settings.store]
    server.stop()
    answer = await svc.client.post(
        "/jobs", json={"backend": "http_webhook", "params": {"url": receiver.url()}}
    )
    assert answer.status_code == 201, answer.text
    job = answer.json()
    assert job["state"] == "pending" and (await svc.job(job["id"]))["state"] == "pending"
    # A task's `execute` pushed before the worker's message stream is back is
    # dropped and pushed again every `retry_ms`: 1 s here, not the default 5 s,
    # so a slow reconnect on a busy machine costs a second, not ten.
    back = resonate_stand_ins(server.db, port=server.port, retry_ms=1000)
    try:
        await svc.wait_state(job["id"], "running", timeout=30)
    except AssertionError as exc:
        seen = f"delivered {back.delivered}, dropped {back.dropped}, kinds {dict(back.kinds)}"
        raise AssertionError(f"{exc}; the stand-in: {seen}, streams {len(back.streams)}") from exc
    await asyncio.sleep(1.5)  # resumes go on: none triggers again
    assert [h.body["job_id"] for h in receiver.hits] == [job["id"]]


@pytest.mark.parametrize("store_url", ["resonate"], indirect=True)
async def test_waiting_jobs_go_on_through_a_restart_of_the_server(
    start_service, receiver, resonate_stand_ins
):
    """The server stops and comes back on the same port and data: meanwhile
    the job index still answers and `/health` says the server does not; the
    message stream connects again by itself, and a job waiting from before
    finishes by its callback."""
    svc = await start_service()
    server = RUNNING[svc.settings.store]
    await svc.client.post(
        "/jobs", json={"id": "w", "backend": "http_webhook", "params": {"url": receiver.url()}}
    )
    await svc.wait_state("w", "running")
    server.stop()
    assert (await svc.client.get("/jobs/w")).json()["state"] == "running"
    health = await svc.client.get("/health")
    assert health.status_code == 503
    assert f"the Resonate server at {server.url} did not answer" in health.text
    again = resonate_stand_ins(server.db, port=server.port)
    await eventually(lambda: again.streams, timeout=10)  # the stream came back
    assert (await svc.client.get("/health")).status_code == 200
    [hit] = receiver.hits
    path = hit.body["callback_url"].removeprefix(svc.settings.base_url)
    answer = await svc.client.post(path, json={"status": "succeeded", "result": 1})
    assert answer.json()["outcome"] == "accepted"
    assert (await svc.wait_state("w", "succeeded"))["result"] == 1
    # The workflow's resume came down the new stream. The job shows `succeeded` as
    # soon as the callback is accepted; the resume is delivered after that.
    await eventually(lambda: again.delivered >= 1, timeout=10)


def _index_id(index: str) -> str:
    with sqlite3.connect(index.removeprefix("sqlite:///")) as db:
        return str(
            db.execute("SELECT value FROM tether_meta WHERE name = 'index_id'").fetchone()[0]
        )


@pytest.mark.parametrize("store_url", ["resonate"], indirect=True)
async def test_a_service_whose_server_is_re_paired_with_another_index_stops_taking_work(
    start_service, receiver, tmp_path, caplog
):
    """`tether pair-index --force` from another index while a service still
    runs on the old one (its hosts should have been stopped first): the
    service's next health check finds it, answers 503 naming both indexes,
    logs it once as an error (however many checks run at once), stops
    receiving work (its message stream closes) and starts no workflow: a job
    sent to it is refused with nothing made, since a host on the new index
    would take its workflow and not find it. It stays so until it is
    restarted, even once the server is paired back."""
    svc = await start_service()
    server = RUNNING[svc.settings.store]
    await eventually(lambda: server.streams, timeout=10)
    assert (await svc.client.get("/health")).status_code == 200
    mine = _index_id(svc.settings.index)

    async def re_pair(index: str) -> None:  # what `tether pair-index --force` does
        store = await RemoteStore.open(
            test_settings(store=server.url, index=index), "p", repair=True
        )
        await store.close()

    new_index = f"sqlite:///{tmp_path}/new.db"
    await re_pair(new_index)
    theirs = _index_id(new_index)
    with caplog.at_level(logging.ERROR, "tether"):
        answers = await asyncio.gather(*(svc.client.get("/health") for _ in range(3)))
        answers.append(await svc.client.get("/health"))
    said = (
        f"the Resonate server at {server.url} is now paired with the job index with id"
        f" {theirs}, not with this host's TETHER_INDEX (id {mine}): this process no longer"
        " takes or starts work; restart it with the server's TETHER_INDEX"
    )
    assert [a.status_code for a in answers] == [503] * 4
    assert all(said in a.text for a in answers), answers[0].text
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith(said)
    await eventually(lambda: not server.streams, timeout=10)  # no more work comes to it

    job = {"id": "late", "backend": "http_webhook", "params": {"url": receiver.url()}}
    refused = await svc.client.post("/jobs", json=job)
    assert refused.status_code == 503 and said in refused.text
    assert (await svc.client.get("/jobs/late")).status_code == 404  # nothing made

    await re_pair(svc.settings.index)  # paired back: still out until restarted
    answer = await svc.client.get("/health")
    assert answer.status_code == 503 and said in answer.text
    await eventually(lambda: not server.streams, holds=1.5)  # the stream stays closed
    assert receiver.hits == []


@pytest.mark.parametrize("store_url", ["resonate"], indirect=True)
async def test_a_server_whose_pairing_is_gone_is_paired_again_by_a_running_service(
    start_service, caplog
):
    """The server lost its pairing promises (its database replaced): a running
    service's health check pairs it with its own index again, as a start
    would, and stays in service."""
    svc = await start_service()
    server = RUNNING[svc.settings.store]
    mine = _index_id(svc.settings.index)
    with sqlite3.connect(server.db) as db:
        db.execute("DELETE FROM r_promises WHERE id LIKE 'tether:index.%'")
    with caplog.at_level(logging.WARNING, "tether"):
        assert (await svc.client.get("/health")).status_code == 200
    assert f"it is paired with this host's TETHER_INDEX again (id {mine})" in caplog.text
    with sqlite3.connect(server.db) as db:
        [(tags,)] = db.execute(
            "SELECT tags FROM r_promises WHERE id LIKE 'tether:index.%'"
        ).fetchall()
    assert json.loads(tags)["tether:index"] == mine
    assert server.streams


@pytest.mark.parametrize("store_url", ["resonate"], indirect=True)
async def test_a_re_pairing_is_found_with_no_health_probe_asking(start_service, tmp_path):
    """The background check (every `TETHER_READINESS_INTERVAL`) asks the store
    as `/health` does: a host nobody probes stops taking work too."""
    svc = await start_service(readiness_interval=0.2)
    server = RUNNING[svc.settings.store]
    await eventually(lambda: server.streams, timeout=10)
    given = test_settings(store=server.url, index=f"sqlite:///{tmp_path}/new.db")
    store = await RemoteStore.open(given, "p", repair=True)
    await store.close()
    await eventually(lambda: not server.streams, timeout=10)
