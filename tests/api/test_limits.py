"""Per-backend limits (`TETHER_MAX_RUNNING`) through real HTTP on a real
store: jobs over the limit wait `queued`, first come first served, and the end
of a job starts the next at once; queued jobs can be canceled and time out;
a re-run goes through the same limit."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from core.settings import Settings
from tests.conftest import Finished, eventually

LIMIT = {"max_running": "http_webhook=2"}


def job(receiver: Any, job_id: str, **more: Any) -> dict[str, Any]:
    return {"id": job_id, "backend": "http_webhook", "params": {"url": receiver.url()}, **more}


def triggered(receiver: Any) -> list[str]:
    """The jobs the receiver was asked to start, in order."""
    return [h.body["job_id"] for h in receiver.hits]


def callback_of(receiver: Any, job_id: str) -> str:
    [url] = [h.body["callback_url"] for h in receiver.hits if h.body["job_id"] == job_id]
    return url


async def submit(svc: Any, receiver: Any, *ids: str, **more: Any) -> list[dict[str, Any]]:
    jobs = []
    for job_id in ids:
        answer = await svc.client.post("/jobs", json=job(receiver, job_id, **more))
        assert answer.status_code == 201, answer.text
        jobs.append(answer.json())
    return jobs


async def events(svc: Any, job_id: str) -> list[tuple[str, dict[str, Any]]]:
    answer = await svc.client.get(f"/jobs/{job_id}/events")
    return [(e["type"], e["data"]) for e in answer.json()["items"]]


async def finish(svc: Any, receiver: Any, job_id: str, status: str = "succeeded") -> None:
    answer = await svc.client.post(callback_of(receiver, job_id), json={"status": status})
    assert answer.status_code == 200, answer.text


async def test_five_jobs_with_a_limit_of_two_trigger_two_then_one_per_end_in_order(
    start_service, receiver
):
    svc = await start_service(**LIMIT)
    created = await submit(svc, receiver, "a", "b", "c", "d", "e")
    assert [j["state"] for j in created] == ["pending", "pending", "queued", "queued", "queued"]
    await eventually(lambda: len(receiver.hits) == 2, holds=0.3)
    # a and b took their slots at once: their workflows trigger side by side,
    # in no set order; the queue starts in order, one job per slot freed
    assert sorted(triggered(receiver)) == ["a", "b"]
    assert (await svc.job("c"))["state"] == "queued"
    assert ("queued", {"limit": 2, "running": 2}) in await events(svc, "c")
    listed = await svc.client.get("/jobs", params={"state": "queued"})
    assert [j["id"] for j in listed.json()["items"]] == ["e", "d", "c"]

    await finish(svc, receiver, "b")
    await eventually(lambda: len(receiver.hits) == 3, holds=0.3)
    assert triggered(receiver)[2:] == ["c"]
    await finish(svc, receiver, "a", "failed")
    await eventually(lambda: len(receiver.hits) == 4, holds=0.3)
    await finish(svc, receiver, "c")
    await finish(svc, receiver, "d")
    await eventually(lambda: len(receiver.hits) == 5, holds=0.3)
    await finish(svc, receiver, "e")
    assert triggered(receiver)[2:] == ["c", "d", "e"]
    for job_id in "bcde":
        await svc.wait_state(job_id, "succeeded")
    types = [t for t, _ in await events(svc, "d")]
    assert types == ["accepted", "queued", "triggered", "callback", "finished"]


async def test_backends_without_a_limit_and_other_backends_are_not_held(start_service, receiver):
    svc = await start_service(max_running="http_webhook=1,databricks=5")
    await submit(svc, receiver, "one")
    assert (await submit(svc, receiver, "two"))[0]["state"] == "queued"
    unlimited = await start_service(max_running="databricks=1")
    states = [j["state"] for j in await submit(unlimited, receiver, "x", "y", "z")]
    assert states == ["pending"] * 3


async def test_a_queued_job_can_be_canceled_and_is_never_triggered(start_service, receiver):
    finished = Finished()
    svc = await start_service(plugins=(finished,), max_running="http_webhook=1")
    await submit(svc, receiver, "first", "second", "third")
    await eventually(lambda: len(receiver.hits) == 1)
    answer = await svc.client.post("/jobs/second/cancel", json={"reason": "not needed"})
    assert (answer.status_code, answer.json()["state"]) == (200, "canceled")
    assert [t for t, _ in await events(svc, "second")] == [
        "accepted",
        "queued",
        "cancel_requested",
        "finished",
    ]
    await finish(svc, receiver, "first")
    await eventually(lambda: len(receiver.hits) == 2, holds=0.3)
    assert triggered(receiver) == ["first", "third"]  # the canceled one skipped
    assert (await svc.job("second"))["external"] is None
    assert ("second", "canceled") in finished.jobs  # though it never had a workflow
    await finish(svc, receiver, "third")
    await eventually(lambda: ("third", "succeeded") in finished.jobs)
    assert sorted(finished.jobs) == [
        ("first", "succeeded"),
        ("second", "canceled"),
        ("third", "succeeded"),
    ]


async def test_a_queued_jobs_deadline_counts_from_acceptance(start_service, receiver):
    svc = await start_service(max_running="http_webhook=1", watchdog_interval=0.1)
    await submit(svc, receiver, "holder", timeout=60)
    await submit(svc, receiver, "late", timeout=0.5)
    job = await svc.wait_state("late", "timed_out", timeout=5)
    assert job["external"] is None and job["error"]["type"] == "timeout"
    assert job["error"]["message"] == (  # not "no callback": none was asked for
        "still queued after 0.5 seconds: its backend stayed at its limit of running jobs"
        " (TETHER_MAX_RUNNING)"
    )
    await asyncio.sleep(0.3)
    assert triggered(receiver) == ["holder"]  # the timed-out job took no slot
    await submit(svc, receiver, "next")
    await finish(svc, receiver, "holder")
    await eventually(lambda: triggered(receiver) == ["holder", "next"], holds=0.3)


async def test_a_retry_goes_through_the_limit(start_service, receiver):
    svc = await start_service(max_running="http_webhook=1")
    await submit(svc, receiver, "r")
    await eventually(lambda: len(receiver.hits) == 1)
    await finish(svc, receiver, "r", "failed")
    await svc.wait_state("r", "failed")
    await submit(svc, receiver, "holder")
    await eventually(lambda: len(receiver.hits) == 2)

    answer = await svc.client.post("/jobs/r/retry")
    assert (answer.status_code, answer.json()["state"], answer.json()["attempt"]) == (
        200,
        "queued",
        2,
    )
    assert [t for t, _ in await events(svc, "r")][-2:] == ["retried", "queued"]
    again = await svc.client.post("/jobs/r/retry", json={"attempt": 2})
    assert (again.status_code, again.json()["state"]) == (200, "queued")  # a repeat: no change
    await asyncio.sleep(0.3)
    assert len(receiver.hits) == 2
    await finish(svc, receiver, "holder")
    await eventually(lambda: len(receiver.hits) == 3, holds=0.3)
    assert receiver.hits[-1].body["idempotency_key"] == "r~2:1"
    await svc.wait_state("r", "running")


async def test_a_duplicate_start_of_a_queued_job_reattaches_without_a_trigger(
    start_service, receiver
):
    svc = await start_service(max_running="http_webhook=1")
    await submit(svc, receiver, "holder", "waiting")
    again = await svc.client.post("/jobs", json=job(receiver, "waiting"))
    assert (again.status_code, again.json()["state"]) == (200, "queued")
    await asyncio.sleep(0.3)
    assert triggered(receiver) == ["holder"]


async def test_a_raised_limit_starts_queued_jobs_at_restart(store_url, start_service, receiver):
    store = store_url()
    if store.startswith("memory:"):
        pytest.skip("memory:// keeps nothing across a restart")
    svc = await start_service(store=store, max_running="http_webhook=1")
    await submit(svc, receiver, "a", "b", "c")
    await eventually(lambda: len(receiver.hits) == 1, holds=0.2)
    await svc.tether.close()  # its worker stops: the next service takes over the store
    raised = await start_service(store=store, max_running="http_webhook=3")
    await eventually(lambda: sorted(triggered(receiver)) == ["a", "b", "c"], holds=0.3)
    await raised.wait_state("c", "running")


@pytest.mark.parametrize(
    "value",
    [
        "http_webhook",
        "http_webhook=0",
        "http_webhook=-1",
        "http_webhook=2.5",
        "a=1,a=2",
        "=3",
        "http_webhook=1000001",
        # taken, then past the store's 64-bit integers at every job end (a QA pass)
        "http_webhook=99999999999999999999999",
        "http_webhook=" + "9" * 5000,  # past what Python's int() reads (a review)
    ],
)
def test_a_malformed_limit_is_refused_naming_the_setting(value):
    with pytest.raises(ValueError, match="TETHER_MAX_RUNNING") as refused:
        Settings.from_env({"TETHER_MAX_RUNNING": value})
    assert "TETHER_INVALID" not in str(refused.value)


def test_limits_are_read_with_spaces_and_blanks():
    settings = Settings.from_env({"TETHER_MAX_RUNNING": " databricks = 20 , http_webhook=200,"})
    assert settings.limits == {"databricks": 20, "http_webhook": 200}
    most = Settings.from_env({"TETHER_MAX_RUNNING": "http_webhook=1000000"})
    assert most.limits == {"http_webhook": 1_000_000}


async def test_a_promotion_whose_workflow_start_was_lost_is_started_at_restart(
    store_url, start_service, receiver
):
    store = store_url()
    if store.startswith("memory:"):
        pytest.skip("memory:// keeps nothing across a restart")
    svc = await start_service(store=store, max_running="http_webhook=1")
    await submit(svc, receiver, "holder", "next")
    await eventually(lambda: len(receiver.hits) == 1)
    svc.tether.jobs.on_ready = lambda promoted: None  # as if killed right after the commit
    await finish(svc, receiver, "holder")
    await svc.wait_state("next", "pending")
    await asyncio.sleep(0.3)
    assert triggered(receiver) == ["holder"]
    await svc.tether.close()
    again = await start_service(store=store, max_running="http_webhook=1")
    await again.wait_state("next", "running")
    assert triggered(receiver) == ["holder", "next"]


async def test_a_lost_workflow_start_is_made_good_by_a_running_service(
    start_service, receiver, monkeypatch
):
    """Another host promoted the job and died before starting its workflow:
    the watchdog of a service that keeps running starts it."""
    import core.service
    import core.watchdog

    monkeypatch.setattr(core.watchdog, "RESUME_EVERY", 0.3)
    monkeypatch.setattr(core.service, "STALE_PENDING_MS", 500)
    svc = await start_service(max_running="http_webhook=1", watchdog_interval=0.1)
    await submit(svc, receiver, "holder", "next")
    await eventually(lambda: len(receiver.hits) == 1)
    svc.tether.jobs.on_ready = lambda promoted: None  # the start is lost
    await finish(svc, receiver, "holder")
    await svc.wait_state("next", "pending")
    assert triggered(receiver) == ["holder"]
    await svc.wait_state("next", "running", timeout=5)
    assert triggered(receiver) == ["holder", "next"]
