"""The store going away, backends that hang or fail, and backpressure."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from datetime import datetime
from typing import Any

from core.store.embedded import sqlite_path
from tests.conftest import Hit, eventually


async def test_a_locked_store_answers_503_in_bounded_time_and_work_resumes(
    start_service, receiver, tmp_path
):
    receiver.callback = {"status": "succeeded"}
    svc = await start_service(store=f"sqlite:///{tmp_path}/locked.db")
    body = {"backend": "http_webhook", "params": {"url": receiver.url()}}
    assert (await svc.client.post("/jobs", json={**body, "id": "before"})).status_code == 201
    await svc.wait_state("before", "succeeded")

    holder = sqlite3.connect(sqlite_path(svc.settings.store), isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        answer = await svc.client.post("/jobs", json={**body, "id": "during"}, timeout=30)
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "store_unavailable"
        assert answer.headers["retry-after"] == "1"
        # the index refused the write (its lock was taken): nothing was applied
        assert "may have taken effect" not in answer.json()["error"]["message"]
        assert time.monotonic() - started < 15
        health = await svc.client.get("/health", timeout=30)
        assert health.status_code == 503
    finally:
        holder.execute("ROLLBACK")
        holder.close()

    assert (await svc.client.get("/health")).status_code == 200
    assert (await svc.client.post("/jobs", json={**body, "id": "after"})).status_code == 201
    await svc.wait_state("after", "succeeded")


async def test_a_hanging_backend_fails_its_job_and_blocks_no_other(start_service, receiver):
    hung = threading.Event()  # set at the end: until then /hang never answers

    def respond(hit: Hit) -> tuple[int, Any]:
        if hit.path == "/hang":
            hung.wait(30)
        return 202, {}

    receiver.respond = respond
    receiver.callback = lambda hit: {"status": "succeeded"} if hit.path == "/fast" else None
    svc = await start_service(trigger_attempts=2)
    try:
        await svc.client.post(
            "/jobs",
            json={
                "id": "hang",
                "backend": "http_webhook",
                "params": {"url": receiver.url("/hang"), "timeout": 1},
            },
        )
        await eventually(lambda: receiver.on("/hang"))
        await svc.client.post(
            "/jobs",
            json={
                "id": "fast",
                "backend": "http_webhook",
                "params": {"url": receiver.url("/fast")},
            },
        )
        fast = await svc.wait_state("fast", "succeeded")
        # ... while the hanging job's first attempt was still waiting for its answer
        assert len(receiver.on("/hang")) == 1
        assert (await svc.job("hang"))["state"] == "pending"

        hang = await svc.wait_state("hang", "failed")
        assert hang["error"]["type"] == "timeout"
        assert "timed out after 1s" in hang["error"]["message"]
        assert len(receiver.on("/hang")) == 2  # each attempt given up after its timeout
        # (as times: one on a whole second is written without a fraction)
        assert datetime.fromisoformat(fast["finished_at"]) < datetime.fromisoformat(
            hang["finished_at"]
        )
    finally:
        hung.set()


async def test_past_the_step_limit_reads_and_callbacks_are_still_answered(start_service, receiver):
    release = asyncio.Event()
    loop = asyncio.get_running_loop()

    def respond(hit: Hit) -> tuple[int, Any]:
        if hit.path == "/slow":
            asyncio.run_coroutine_threadsafe(release.wait(), loop).result(30)
        return 202, {}

    receiver.respond = respond
    svc = await start_service(max_concurrent_tasks=2)
    # one running job, waiting for its callback
    await svc.client.post(
        "/jobs",
        json={"id": "waiting", "backend": "http_webhook", "params": {"url": receiver.url("/ok")}},
    )
    await svc.wait_state("waiting", "running")
    # two triggers that hang take both step slots; more pile up behind them
    for i in range(5):
        await svc.client.post(
            "/jobs",
            json={
                "id": f"slow{i}",
                "backend": "http_webhook",
                "params": {"url": receiver.url("/slow"), "timeout": 30},
            },
        )
    await eventually(lambda: len(receiver.on("/slow")) == 2)

    started = time.monotonic()
    assert (await svc.client.get("/jobs/slow4")).json()["state"] == "pending"
    assert len((await svc.client.get("/jobs")).json()["items"]) == 6
    path = receiver.on("/ok")[0].body["callback_url"].removeprefix(svc.settings.base_url)
    answer = await svc.client.post(path, json={"status": "succeeded"})
    assert answer.json()["outcome"] == "accepted"
    assert time.monotonic() - started < 2
    assert len(receiver.on("/slow")) == 2  # the limit held

    release.set()
    for i in range(5):
        await svc.wait_state(f"slow{i}", "running", timeout=30)
    await svc.wait_state("waiting", "succeeded")
