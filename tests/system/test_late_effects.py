"""A request the API answered 503 because the store did not answer in time,
which the store then applied all the same: the job's history still says what
ended it (docs/operations.md, "Job history")."""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

import pytest

import core.settle
from core.store.embedded import SqliteIndex, sqlite_path
from tests.conftest import HOLD, Finished, eventually

LATE = "may have taken effect"


async def _late(svc: Any, call: Any) -> Any:
    """`call()` (a request) while another connection holds the store's write
    lock: the store waits for it past the API's patience (503), and applies
    the request once the lock is let go (before its own wait gives up)."""
    holder = sqlite3.connect(sqlite_path(svc.settings.store), isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        answer = await call()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert answer.status_code == 503, answer.text
    assert LATE in answer.json()["error"]["message"]
    return answer


async def _events(svc: Any, job_id: str) -> list[tuple[str, dict[str, Any]]]:
    page = (await svc.client.get(f"/jobs/{job_id}/events")).json()
    return [(e["type"], e["data"]) for e in page["items"]]


async def _waiting(svc: Any, receiver: Any, job_id: str) -> str:
    body = {"id": job_id, "backend": "http_webhook", "params": {"url": receiver.url()}}
    assert (await svc.client.post("/jobs", json=body)).status_code == 201
    await svc.wait_state(job_id, "running")
    [hit] = receiver.hits
    return str(hit.body["callback_url"])


@pytest.fixture
def patience(monkeypatch: pytest.MonkeyPatch) -> None:
    """The API waits 1 s for a store call (8 s in service), the store 5 s for its lock."""
    monkeypatch.setattr(core.settle, "STORE_CALL_TIMEOUT", 1.0)


@pytest.fixture
def step_by_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settles resolve the promise, then write the index, as on the stores
    other than the embedded one (whose settle that wins is one transaction,
    dropped when its caller gave up: the last test)."""
    monkeypatch.setattr(SqliteIndex, "settles_together", False)


async def test_a_callback_the_store_took_after_a_503_is_in_the_history(
    start_service, receiver, tmp_path, patience, step_by_step
):
    svc = await start_service(store=f"sqlite:///{tmp_path}/late.db")
    url = await _waiting(svc, receiver, "late")
    path = url.removeprefix(svc.settings.base_url)
    body = b'{"status": "succeeded", "result": {"rows": 42}}'
    await _late(svc, lambda: svc.client.post(path, content=body, timeout=30))

    job = await svc.wait_state("late", "succeeded")  # the workflow finished it
    assert job["result"] == {"rows": 42}
    events = await _events(svc, "late")
    assert [t for t, _ in events][-2:] == ["callback", "finished"], events
    _, callback = events[-2]
    assert callback["verdict"] == "accepted" and callback["status"] == "succeeded"
    assert callback["body_bytes"] == len(body)
    token = url.partition("token=")[2]
    assert token and token not in str(events)

    # The caller repeats it, as the 503 says: a duplicate, filed after.
    again = await svc.client.post(path, content=body)
    assert again.json()["outcome"] == "duplicate"
    verdicts = [d["verdict"] for t, d in await _events(svc, "late") if t == "callback"]
    assert verdicts == ["accepted", "duplicate"]


@pytest.mark.parametrize("told", [False, True], ids=["ends its workflow", "a plugin told"])
async def test_a_callback_settled_in_one_transaction_is_not_run_after_its_503(
    start_service, receiver, tmp_path, patience, told
):
    # The embedded store: the callback settles its promise and ends the job
    # in one transaction (its workflow too, when nothing is left to finish:
    # no plugin told of finishes), which the store does not run once the
    # caller stopped waiting for it. The 503 says it may have taken effect;
    # it did not, and the repeat ends the job.
    plugins = [Finished()] if told else []
    svc = await start_service(store=f"sqlite:///{tmp_path}/late.db", plugins=plugins)
    url = await _waiting(svc, receiver, "late")
    path = url.removeprefix(svc.settings.base_url)
    body = b'{"status": "succeeded", "result": {"rows": 42}}'
    await _late(svc, lambda: svc.client.post(path, content=body, timeout=30))

    await asyncio.sleep(HOLD)  # the lock let go: nothing runs late
    assert (await svc.client.get("/jobs/late")).json()["state"] == "running"
    assert "callback" not in [t for t, _ in await _events(svc, "late")]
    again = await svc.client.post(path, content=body)
    assert again.json()["outcome"] == "accepted"
    assert (await svc.client.get("/jobs/late")).json()["result"] == {"rows": 42}
    events = await _events(svc, "late")
    assert [t for t, _ in events][-2:] == ["callback", "finished"], events

    async def returned() -> bool:
        return (await svc.tether.resonate.promises.get("late")).state == "resolved"

    await eventually(returned)  # (at once, unless a plugin is told: then the workflow)


async def test_a_cancel_the_store_took_after_a_503_is_in_the_history(
    start_service, receiver, tmp_path, patience, step_by_step
):
    svc = await start_service(store=f"sqlite:///{tmp_path}/late.db")
    await _waiting(svc, receiver, "stop")
    cancel = {"reason": "not needed"}
    await _late(svc, lambda: svc.client.post("/jobs/stop/cancel", json=cancel, timeout=30))

    job = await svc.wait_state("stop", "canceled")
    assert job["error"]["message"] == "canceled by request: not needed"
    events = await _events(svc, "stop")
    assert events[-2:] == [
        ("cancel_requested", {"reason": "not needed"}),
        ("finished", events[-1][1]),
    ], events
