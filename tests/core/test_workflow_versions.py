"""Workflow versions (core/workflow.py). Version 4 triggers and finishes in
the body around the wait: one durable op ("{root}:1", the callback promise),
no trigger step ("{root}:2") and no finish step ("{root}:3"). Jobs started
under version 3 (a trigger step, the finish in the body) and version 2 (both
as steps) still run their steps, their promise ids unshifted. In this
process, on the embedded store, over real HTTP against a real webhook
receiver; the SIGKILL cases are in tests/system/test_finish_crash.py."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from resonate.error import ServerError

from core import workflow
from core.steps import JobSteps
from tests.conftest import HOLD, Finished, Receiver, Service, eventually

pytestmark = pytest.mark.resonate_server(False)


async def promise(svc: Service, promise_id: str) -> Any:
    """The promise's record, or None when the store has none by that id."""
    try:
        return await svc.tether.resonate.promises.get(promise_id)
    except ServerError as exc:
        assert exc.code == 404
        return None


async def run_to_the_end(
    svc: Service, receiver: Receiver, job_id: str, end: dict[str, Any] | None = None
) -> None:
    """Create a job, wait for its trigger, end it (a callback with `end`, or a
    cancel), and wait until its workflow has returned."""
    body = {"id": job_id, "backend": "http_webhook", "params": {"url": receiver.url()}}
    assert (await svc.client.post("/jobs", json=body)).status_code == 201
    await svc.wait_state(job_id, "running")
    if end is None:
        assert (await svc.client.post(f"/jobs/{job_id}/cancel")).status_code == 200
    else:
        [url] = [h.body["callback_url"] for h in receiver.hits if h.body["job_id"] == job_id]
        assert (await svc.client.post(url, json=end)).status_code == 200

    await eventually(lambda: resolved(svc, job_id))


async def resolved(svc: Service, promise_id: str) -> bool:
    found = await promise(svc, promise_id)
    return found is not None and found.state == "resolved"


async def finished_events(svc: Service, job_id: str) -> int:
    events = (await svc.client.get(f"/jobs/{job_id}/events")).json()["items"]
    return sum(e["type"] == "finished" for e in events)


async def test_a_new_job_runs_under_version_4_with_one_durable_op(start_service, receiver):
    finished = Finished()
    svc = await start_service(plugins=[finished])
    await run_to_the_end(svc, receiver, "v4", {"status": "succeeded", "result": 4})

    root = await promise(svc, "v4")
    assert (root.param.data["version"], root.value.data["status"]) == (4, "succeeded")
    assert (await promise(svc, "v4:1")).state == "resolved"
    assert await promise(svc, "v4:2") is None  # no trigger step
    assert await promise(svc, "v4:3") is None  # no finish step
    assert len(receiver.hits) == 1  # the resume's replay did not trigger again
    await eventually(lambda: finished.jobs == [("v4", "succeeded")], holds=HOLD)
    assert await finished_events(svc, "v4") == 1


async def test_a_canceled_job_under_version_4_stops_its_external_run_once(start_service, receiver):
    finished = Finished()
    svc = await start_service(plugins=[finished])
    body = {
        "id": "c3",
        "backend": "http_webhook",
        "params": {"url": receiver.url(), "cancel_url": receiver.url("/cancel")},
    }
    assert (await svc.client.post("/jobs", json=body)).status_code == 201
    await svc.wait_state("c3", "running")
    assert (await svc.client.post("/jobs/c3/cancel")).status_code == 200
    await eventually(lambda: finished.jobs == [("c3", "canceled")], holds=HOLD)
    [cancel] = receiver.on("/cancel")
    assert cancel.body["promise_id"] == "c3:1"
    assert (await promise(svc, "c3")).state == "resolved"
    assert await promise(svc, "c3:2") is None
    assert await promise(svc, "c3:3") is None
    assert await finished_events(svc, "c3") == 1


@pytest.mark.parametrize("version", [2, 3])
async def test_a_job_started_under_an_earlier_version_still_runs_its_steps(
    start_service, receiver, monkeypatch, version
):
    finished = Finished()
    svc = await start_service(plugins=[finished])
    monkeypatch.setattr(workflow, "VERSION", version)  # what a service before it started
    body = {"id": "old", "backend": "http_webhook", "params": {"url": receiver.url()}}
    assert (await svc.client.post("/jobs", json=body)).status_code == 201
    await svc.wait_state("old", "running")
    await eventually(lambda: resolved(svc, "old:2"))  # its trigger step, recorded
    monkeypatch.setattr(workflow, "VERSION", 4)  # the callback comes to today's code
    [url] = [h.body["callback_url"] for h in receiver.hits]
    assert (await svc.client.post(url, json={"status": "failed"})).status_code == 200

    # Its ids did not shift: version 2's "{root}:3" is its finish step (version
    # 3 finishes in the body), then the root returns.
    await eventually(lambda: resolved(svc, "old"))
    assert (await promise(svc, "old")).param.data["version"] == version
    finish_step = await promise(svc, "old:3")
    assert (finish_step.state if finish_step else None) == {2: "resolved", 3: None}[version]
    assert len(receiver.hits) == 1
    await eventually(lambda: finished.jobs == [("old", "failed")], holds=HOLD)
    assert await finished_events(svc, "old") == 1


@pytest.mark.parametrize("version", [2, 3, 4])
async def test_a_first_run_refused_outright_is_no_replay(
    start_service, receiver, monkeypatch, version
):
    """A trigger refused outright in the first run of the workflow, under
    every version: a clear refusal (no `replayed` in the history), and no
    stop asked of a run no try started."""
    receiver.respond = lambda hit: (422, {}) if hit.path == "/hook" else (200, {})
    svc = await start_service()
    monkeypatch.setattr(workflow, "VERSION", version)
    params = {"url": receiver.url(), "cancel_url": receiver.url("/cancel")}
    job = {"id": "no", "backend": "http_webhook", "params": params}
    assert (await svc.client.post("/jobs", json=job)).status_code == 201
    await svc.wait_state("no", "failed")
    assert (await promise(svc, "no")).param.data["version"] == version
    events = (await svc.client.get("/jobs/no/events")).json()["items"]
    [tried] = [e["data"] for e in events if e["type"] == "trigger_failed"]
    assert tried["retryable"] is False and "replayed" not in tried
    await eventually(lambda: receiver.on("/cancel") == [], holds=HOLD)


async def test_a_failing_finish_is_tried_again_in_the_body_not_given_up(
    start_service, receiver, monkeypatch, caplog
):
    # As a durable step the SDK retried a failing finish; in the body, a
    # failure reaching the SDK would reject the root promise and never finish.
    monkeypatch.setattr(workflow, "RETRY_BACKOFF", 0.05)
    real = JobSteps.finish
    failures = [RuntimeError("the index did not answer")] * 2

    async def flaky(self: JobSteps, job_id: str, value: Any, attempt: int = 1) -> None:
        if failures:
            raise failures.pop()
        await real(self, job_id, value, attempt)

    monkeypatch.setattr(JobSteps, "finish", flaky)
    finished = Finished()
    svc = await start_service(plugins=[finished])
    with caplog.at_level(logging.WARNING, logger="tether"):
        await run_to_the_end(svc, receiver, "flaky", {"status": "succeeded"})
    assert failures == []
    assert finished.jobs == [("flaky", "succeeded")]
    root = await promise(svc, "flaky")
    assert (root.state, root.value.data["status"]) == ("resolved", "succeeded")
    retried = [r.getMessage() for r in caplog.records if "finishing attempt" in r.getMessage()]
    assert retried == [
        "job flaky: finishing attempt 1 failed (RuntimeError); again in 0.05s",
        "job flaky: finishing attempt 1 failed (RuntimeError); again in 0.1s",
    ]


async def test_a_failing_trigger_is_tried_again_in_the_body_not_given_up(
    start_service, receiver, monkeypatch, caplog
):
    # As a durable step (versions 1-3) the SDK retried a trigger whose index
    # read or write failed; in the body the same must hold.
    monkeypatch.setattr(workflow, "RETRY_BACKOFF", 0.05)
    real = JobSteps.trigger
    failures = [RuntimeError("the index did not answer")]

    async def flaky(
        self: JobSteps, job_id: str, promise_id: str, attempt: int = 1, **kw: Any
    ) -> None:
        if failures:
            raise failures.pop()
        await real(self, job_id, promise_id, attempt, **kw)

    monkeypatch.setattr(JobSteps, "trigger", flaky)
    svc = await start_service()
    with caplog.at_level(logging.WARNING, logger="tether"):
        await run_to_the_end(svc, receiver, "flaky", {"status": "succeeded"})
    assert failures == [] and len(receiver.hits) == 1
    retried = [r.getMessage() for r in caplog.records if "triggering attempt" in r.getMessage()]
    assert retried == ["job flaky: triggering attempt 1 failed (RuntimeError); again in 0.05s"]


async def test_a_trigger_made_again_after_a_call_that_raised_takes_a_refusal_as_unsure(
    start_service, receiver, monkeypatch
):
    """The body's trigger tried (a 503) and raised before that try was
    recorded (the index failed). Made again a second later, its try is
    refused outright (a receiver refusing a key it has seen): that refusal
    may refuse a repeat, so the failed job's finish looks for the run the
    first try may have started (`cancel_url`), as after a replay."""
    answers = iter([(503, {}), (422, {"error": "this key was used already"})])
    receiver.respond = lambda hit: next(answers) if hit.path == "/hook" else (200, {})
    real = JobSteps._trigger_failed
    failures = [RuntimeError("the index did not answer")]

    async def unrecorded(self: JobSteps, *args: Any, **kw: Any) -> None:
        if failures:
            raise failures.pop()
        await real(self, *args, **kw)

    monkeypatch.setattr(JobSteps, "_trigger_failed", unrecorded)
    svc = await start_service(trigger_backoff=0.05)
    params = {"url": receiver.url(), "cancel_url": receiver.url("/cancel")}
    job = {"id": "again", "backend": "http_webhook", "params": params}
    assert (await svc.client.post("/jobs", json=job)).status_code == 201
    await svc.wait_state("again", "failed")
    await eventually(lambda: [h.body["promise_id"] for h in receiver.on("/cancel")] == ["again:1"])
    assert failures == [] and len(receiver.on("/hook")) == 2


async def test_until_done_backs_off_doubling_up_to_the_max(monkeypatch):
    monkeypatch.setattr(workflow, "RETRY_BACKOFF_MAX", 4.0)
    calls: list[int] = []
    waits: list[float] = []

    async def call() -> None:
        calls.append(1)
        if len(calls) < 5:
            raise OSError("down")

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    await workflow.until_done("finishing", "j", 2, call, sleep=sleep)
    assert waits == [1.0, 2.0, 4.0, 4.0]
    assert len(calls) == 5


async def test_a_job_whose_row_is_deleted_under_it_ends_at_its_deadline(
    start_service, receiver, monkeypatch
):
    # Deleted by hand while its workflow waits (retention deletes only ended
    # jobs): the watchdog, which reads the index, never sees it, the store
    # times the callback promise out, and the replay's trigger finds no row
    # beside a settled promise. It ends the workflow instead of retrying for
    # ever, and triggers nothing again.
    monkeypatch.setattr(workflow, "PROMISE_GRACE_MS", 0)  # the store's timeout at the deadline
    svc = await start_service()
    body = {
        "id": "gone",
        "backend": "http_webhook",
        "params": {"url": receiver.url()},
        "timeout": 3.0,  # the row is deleted long before the deadline
    }
    assert (await svc.client.post("/jobs", json=body)).status_code == 201
    await svc.wait_state("gone", "running")
    await svc.tether.jobs.db.execute("DELETE FROM tether_jobs WHERE id = ?", ("gone",))

    await eventually(lambda: resolved(svc, "gone"), timeout=15)
    assert (await promise(svc, "gone:1")).state == "rejected_timedout"
    assert len(receiver.hits) == 1
    assert (await svc.client.get("/jobs/gone")).status_code == 404
