"""Retention: finished jobs older than the cut-off go, with their promises;
nothing waiting is touched."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from core.store.jobs import now_ms
from tests.conftest import eventually

TETHER = shutil.which("tether", path=str(Path(sys.executable).parent)) or "tether"


async def test_old_finished_jobs_go_and_waiting_ones_stay(start_service, receiver, tmp_path):
    receiver.callback = lambda hit: {"status": "succeeded"} if hit.path == "/done" else None
    svc = await start_service(store=f"sqlite:///{tmp_path}/gc.db")
    for job_id, path in (("old", "/done"), ("waiting", "/wait")):
        await svc.client.post(
            "/jobs",
            json={"id": job_id, "backend": "http_webhook", "params": {"url": receiver.url(path)}},
        )
    await svc.wait_state("old", "succeeded")
    await svc.wait_state("waiting", "running")
    await eventually(lambda: len(receiver.hits) == 2)

    tether = svc.tether

    async def workflow_done() -> bool:
        return (await tether.r.promises.get("old")).state == "resolved"

    await eventually(workflow_done)
    with pytest.raises(Exception, match="at least"):
        await tether.collect_garbage(60)
    assert await tether.collect_garbage(86_400) == (0, 0)  # nothing is a day old yet

    # pretend a week has passed (the clock of the index and of the store)
    week = 7 * 86_400_000
    await tether.jobs.db.execute("UPDATE tether_jobs SET finished_at = finished_at - ?", (week,))
    engine = tether.store.connection._engine
    engine.clock = lambda: now_ms() + week
    try:
        jobs, promises = await tether.collect_garbage(86_400)
    finally:
        engine.clock = now_ms
    assert jobs == 1 and promises >= 3
    assert (await svc.client.get("/jobs/old")).status_code == 404
    assert (await svc.job("waiting"))["state"] == "running"
    callback = receiver.on("/wait")[0].body["callback_url"]
    answer = await svc.client.post(callback.removeprefix(svc.settings.base_url), json={})
    assert answer.json()["outcome"] == "accepted"
    # the id is free again: a new job under it runs anew
    response = await svc.client.post(
        "/jobs",
        json={"id": "old", "backend": "http_webhook", "params": {"url": receiver.url("/done")}},
    )
    assert response.status_code == 201
    await svc.wait_state("old", "succeeded")


def test_tether_gc_command(tmp_path):
    env = {"TETHER_STORE": f"sqlite:///{tmp_path}/cli.db", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [TETHER, "gc", "--older-than", "30"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "deleted 0 finished jobs" in done.stdout
    done = subprocess.run(
        [TETHER, "gc", "--older-than", "0.1"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "at least" in done.stderr
