"""The real service (in this process, on a real store) with backends that
break the plugin contract: a `check_interval` that raises, a `trigger` that
answers no receipt, or one too large to keep, or never answers. Each job
still ends as the contract says (its run started once, recorded or asked to
stop), and no other job waits for it. Found by a QA pass with a plugin that
misbehaved in each hook (before: a trigger run again with no end, a failure
retried as a network error, 20 MB kept per job, task slots held for good)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

import core.steps
from core.hookspecs import Backend
from core.models import Job, Running, Trigger
from core.plugin import hookimpl
from tests.conftest import Hit, eventually


class Misbehaving(Backend):
    """`params.answer` says how `trigger` answers: `receipt` (a run),
    `list` (no mapping), `huge` (20 MB), `hang` (never);
    `params.interval`: `check_interval`'s answer, `raise` to raise."""

    name = "misbehaving"
    params_type = dict

    def __init__(self) -> None:
        self.triggers: list[str] = []
        self.unrecorded: list[str] = []

    def check_interval(self, params: dict[str, Any]) -> Any:
        if params.get("interval") == "raise":
            raise ValueError("no interval for these params")
        return params.get("interval")

    async def trigger(self, trigger: Trigger) -> Any:
        self.triggers.append(trigger.job.id)
        answer = trigger.params.get("answer", "receipt")
        if answer == "hang":
            await asyncio.Event().wait()
        if answer == "list":
            return ["not", "a", "mapping"]
        if answer == "huge":
            return {"run": trigger.job.id, "blob": "x" * 20_000_000}
        return {"run": trigger.job.id}

    async def cancel_unrecorded(self, trigger: Trigger) -> None:
        self.unrecorded.append(trigger.job.id)

    async def check_status(self, job: Job) -> Running | None:
        if job.params.get("answer") != "huge_running":
            return None
        return Running(external={"state": "QUEUED", "blob2": "e" * 5_000_000})


class Offers:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    @hookimpl
    def tether_backends(self) -> list[Backend]:
        return [self.backend]


async def submit(svc: Any, job_id: str, backend: str = "misbehaving", **job: Any) -> None:
    answer = await svc.client.post("/jobs", json={"id": job_id, "backend": backend, **job})
    assert answer.status_code == 201, answer.text


async def test_a_check_interval_that_raises_leaves_its_job_running_triggered_once(
    start_service,
):
    backend = Misbehaving()
    svc = await start_service(plugins=(Offers(backend),))
    await submit(svc, "ci", params={"interval": "raise"})
    job = await svc.wait_state("ci", "running")
    assert job["external"] == {"run": "ci"}
    await asyncio.sleep(1.5)  # before: tried again after 1 s, 2 s, 4 s..., the job pending
    assert backend.triggers == ["ci"]
    events = (await svc.client.get("/jobs/ci/events")).json()["items"]
    assert [e["type"] for e in events] == ["accepted", "triggered"]


async def test_a_trigger_answering_no_receipt_fails_its_job_and_what_it_started_is_stopped(
    start_service,
):
    backend = Misbehaving()
    svc = await start_service(plugins=(Offers(backend),))
    await submit(svc, "wrong", params={"answer": "list"})
    job = await svc.wait_state("wrong", "failed")
    assert job["error"] == {
        "type": "invalid_receipt",
        "message": "trigger failed: backend 'misbehaving': trigger returned a list, not a"
        " mapping (what identifies the run it started)",
    }
    assert backend.triggers == ["wrong"]  # not tried again
    await eventually(lambda: backend.unrecorded == ["wrong"])


async def test_a_receipt_of_20_mb_is_kept_cut_to_the_result_bound(start_service):
    svc = await start_service(plugins=(Offers(Misbehaving()),))
    await submit(svc, "huge", params={"answer": "huge"})
    await svc.wait_state("huge", "running")
    answer = await svc.client.get("/jobs/huge")
    assert len(answer.content) < 10_000  # before: 20 MB, and 20 MB more in its history
    external = answer.json()["external"]
    assert external["run"] == "huge"
    assert (external["blob"]["truncated"], external["blob"]["bytes"]) == (True, 20_000_002)
    assert len((await svc.client.get("/jobs")).content) < 10_000


async def test_run_details_of_5_mb_a_status_check_reports_are_kept_cut(start_service):
    svc = await start_service(plugins=(Offers(Misbehaving()),))
    await submit(svc, "details", params={"answer": "huge_running", "interval": 0.2})
    await svc.wait_state("details", "running")

    async def checked() -> bool:
        events = (await svc.client.get("/jobs/details/events")).json()["items"]
        return any(e["type"] == "status_check" for e in events)

    await eventually(checked)
    external = (await svc.job("details"))["external"]
    assert external["run"] == "details" and external["state"] == "QUEUED"
    assert external["blob2"]["truncated"] is True  # before: 5 MB at every check


@pytest.fixture
def quick_watch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A trigger's call looks at its job every 0.1 s (5 s in a service)."""
    monkeypatch.setattr(core.steps, "TRIGGER_WATCH", 0.1)


def held_and_fast(receiver: Any) -> threading.Event:
    """A receiver that holds a trigger to `/hang` open until the event is
    set, and calls back `succeeded` for one to `/fast`: the event."""
    release = threading.Event()

    def respond(hit: Hit) -> tuple[int, Any]:
        if hit.path == "/hang":
            release.wait(60)
        return 202, {}

    receiver.respond = respond
    receiver.callback = lambda hit: {"status": "succeeded"} if hit.path == "/fast" else None
    return release


async def test_hung_triggers_free_their_task_slots_when_their_jobs_time_out(
    start_service, quick_watch
):
    """Two task slots, three jobs whose trigger never answers (timeout 2 s):
    before, they held both slots for good, and a job of any other backend
    stayed pending until a restart. Now each hung call is abandoned when
    its job times out, and the run it may have started is asked to stop."""
    backend = Misbehaving()
    svc = await start_service(plugins=(Offers(backend),), max_concurrent_tasks=2)
    hung = [f"hung-{n}" for n in range(3)]
    for job_id in hung:
        await submit(svc, job_id, params={"answer": "hang"}, timeout=2)
    await eventually(lambda: len(backend.triggers) == 2)
    await submit(svc, "next")
    await svc.wait_state("next", "running", timeout=15)
    for job_id in hung:
        job = await svc.wait_state(job_id, "timed_out")
        assert job["external"] is None
    # Each call made was abandoned and its run asked to stop (the third
    # job's workflow found it timed out before it asked its backend).
    tried = {job_id for job_id in backend.triggers if job_id.startswith("hung")}
    await eventually(lambda: sorted(backend.unrecorded) == sorted(tried))


async def test_a_webhook_trigger_held_past_its_jobs_deadline_frees_its_slot_and_is_stopped(
    start_service, receiver, quick_watch
):
    """The same with the real `http_webhook` backend, whose request may take
    up to its `timeout` (300 s here): the receiver holds it, the job times
    out, its slot frees at once, and `cancel_url` is asked to stop the run
    the held request may have started. When the receiver answers at last,
    the run it names is recorded and stopped again, as any answer that came
    after its job ended."""
    release = held_and_fast(receiver)
    svc = await start_service(max_concurrent_tasks=1)
    try:
        params = {
            "url": receiver.url("/hang"),
            "cancel_url": receiver.url("/cancel"),
            "timeout": 300,
        }
        await submit(svc, "held", "http_webhook", params=params, timeout=2)
        await eventually(lambda: receiver.on("/hang"))
        await submit(svc, "fast", "http_webhook", params={"url": receiver.url("/fast")})
        await svc.wait_state("fast", "succeeded", timeout=15)
        held = await svc.job("held")
        assert (held["state"], held["external"]) == ("timed_out", None)

        def stops() -> list[str]:
            return [h.body["promise_id"] for h in receiver.on("/cancel")]

        await eventually(lambda: stops() == ["held:1"])
        release.set()
        await eventually(lambda: stops() == ["held:1", "held:1"])
        held = await svc.job("held")
        assert (held["state"], held["external"]["status_code"]) == ("timed_out", 202)
        assert len(receiver.on("/hang")) == 1
    finally:
        release.set()


async def test_a_trigger_waiting_between_tries_lends_its_task_slot(start_service, receiver):
    """One task slot, a job whose target answers 429 with `Retry-After: 3`:
    its trigger waits 3 s before its next try, and before, it held the
    slot all that time, so a job to a healthy target waited too (3 jobs
    throttled with `Retry-After: 60` held a third job back 3 minutes: found
    by a QA pass). Now the wait gives the slot back: the healthy job is
    triggered and succeeds before the throttled one's next try."""

    def respond(hit: Hit) -> tuple[Any, ...]:
        if hit.path == "/throttled" and len(receiver.on("/throttled")) == 1:
            return 429, {"error": "slow down"}, {"Retry-After": "3"}
        return 202, {}

    receiver.respond = respond
    receiver.callback = lambda hit: {"status": "succeeded"} if hit.path == "/fast" else None
    svc = await start_service(max_concurrent_tasks=1)
    await submit(svc, "throttled", "http_webhook", params={"url": receiver.url("/throttled")})
    await eventually(lambda: receiver.on("/throttled"))
    await submit(svc, "fast", "http_webhook", params={"url": receiver.url("/fast")})
    await svc.wait_state("fast", "succeeded", timeout=15)
    assert len(receiver.on("/throttled")) == 1  # still waiting out its Retry-After
    await svc.wait_state("throttled", "running", timeout=15)  # then it took a slot again
    assert len(receiver.on("/throttled")) == 2
    events = (await svc.client.get("/jobs/throttled/events")).json()["items"]
    [failed] = [e for e in events if e["type"] == "trigger_failed"]
    assert failed["data"]["retry_in"] == 3


async def test_a_slow_trigger_call_lends_its_task_slot(start_service, receiver, monkeypatch):
    """One task slot, a job whose target holds its trigger request open
    (its `timeout` 60 s): before, the slot was held for the whole call, and
    a job to a healthy target waited (64 calls to a hung target held a
    healthy one's job 4 minutes: found by a QA pass). Past `TRIGGER_SLOW`
    the call lends its slot: the healthy job succeeds while the call hangs."""
    monkeypatch.setattr(core.steps, "TRIGGER_WATCH", 0.05)
    monkeypatch.setattr(core.steps, "TRIGGER_SLOW", 0.3)
    release = held_and_fast(receiver)
    svc = await start_service(max_concurrent_tasks=1)
    try:
        params = {"url": receiver.url("/hang"), "timeout": 60}
        await submit(svc, "hung", "http_webhook", params=params)
        await eventually(lambda: receiver.on("/hang"))
        await submit(svc, "fast", "http_webhook", params={"url": receiver.url("/fast")})
        await svc.wait_state("fast", "succeeded", timeout=15)
        hung = await svc.job("hung")
        assert hung["state"] == "pending" and not release.is_set()
        events = (await svc.client.get("/jobs/hung/events")).json()["items"]
        assert [e["type"] for e in events] == ["accepted", "trigger_slow"]
    finally:
        release.set()
    await svc.wait_state("hung", "running", timeout=15)  # its slot taken back, its run recorded
    assert len(receiver.on("/hang")) == 1
