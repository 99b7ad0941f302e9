"""`POST /jobs/{id}/retry`: the next attempt of a failed, timed-out or
canceled job, over real HTTP against a real webhook receiver
(docs/lifecycle.md, "Re-runs")."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import httpx
import msgspec
import pytest
from resonate.types import Value

import core.service
import core.steps
from api.client import heartbeat_url
from core import workflow
from core.hookspecs import Backend
from core.models import Job, Trigger
from core.plugin import hookimpl
from core.store.jobs import now_ms
from tests.conftest import Hit, Receiver, Service, eventually


async def start(
    svc: Service, receiver: Receiver, job_id: str, *until: str, **extra: Any
) -> dict[str, Any]:
    """Create a webhook job and wait until it is `running` (or one of `until`)."""
    body = {"id": job_id, "backend": "http_webhook", "params": {"url": receiver.url()}, **extra}
    response = await svc.client.post("/jobs", json=body)
    assert response.status_code == 201, response.text
    await svc.wait_state(job_id, *(until or ("running",)))
    return response.json()  # type: ignore[no-any-return]


def triggers(receiver: Receiver, job_id: str) -> list[dict[str, Any]]:
    return [h.body for h in receiver.hits if h.body and h.body.get("job_id") == job_id]


async def failed_job(svc: Service, receiver: Receiver, job_id: str) -> str:
    """A job whose first attempt failed by callback; its callback URL."""
    await start(svc, receiver, job_id)
    url: str = triggers(receiver, job_id)[-1]["callback_url"]
    answer = await svc.client.post(url, json={"status": "failed", "error": {"message": "boom"}})
    assert answer.status_code == 200
    await svc.wait_state(job_id, "failed")
    return url


async def retry(svc: Service, job_id: str, body: Any = None) -> httpx.Response:
    return await svc.client.post(f"/jobs/{job_id}/retry", json=body)


async def test_a_failed_job_runs_again_as_attempt_2_with_a_new_url_and_key(start_service, receiver):
    svc = await start_service()
    old_url = await failed_job(svc, receiver, "r")
    answer = await retry(svc, "r")
    assert answer.status_code == 200, answer.text
    job = answer.json()
    assert (job["state"], job["attempt"], job["error"], job["external"]) == (
        "pending",
        2,
        None,
        None,
    )
    await svc.wait_state("r", "running")
    first, second = triggers(receiver, "r")
    assert (first["promise_id"], second["promise_id"]) == ("r:1", "r~2:1")
    assert (first["idempotency_key"], second["idempotency_key"]) == ("r:1", "r~2:1")
    assert second["callback_url"] != old_url
    assert receiver.hits[-1].headers["idempotency-key"] == "r~2:1"

    # The first attempt's URL is gone, and says why; the job is untouched.
    # It names the attempts, never the job: its state is attempt 2's, which
    # an old URL's holder has no business reading (found by a security QA pass).
    late = await svc.client.post(old_url, json={"status": "succeeded"})
    assert late.status_code == 410
    assert late.json() == {
        "outcome": "gone",
        "message": "attempt 1 of this job has ended; the job is at attempt 2",
        "error": {
            "code": "gone",
            "message": "attempt 1 of this job has ended; the job is at attempt 2",
            "details": {"attempt": 1, "current_attempt": 2},
        },
    }
    assert (await svc.job("r"))["state"] == "running"

    done = await svc.client.post(second["callback_url"], json={"status": "succeeded", "result": 5})
    assert (done.status_code, done.json()["outcome"]) == (200, "accepted")
    job = await svc.wait_state("r", "succeeded")
    assert (job["attempt"], job["result"], job["error"]) == (2, 5, None)

    events = (await svc.client.get("/jobs/r/events")).json()["items"]
    assert [(e["attempt"], e["type"]) for e in events] == [
        (1, "accepted"),
        (1, "triggered"),
        (1, "callback"),
        (1, "finished"),
        (2, "retried"),
        (2, "triggered"),
        (2, "callback"),
        (2, "callback"),
        (2, "finished"),
    ]
    retried = events[4]["data"]
    assert retried["previous"]["state"] == "failed"
    assert retried["previous"]["error"] == {"message": "boom"}
    assert retried["previous"]["external"] == events[1]["data"]["external"]
    assert (events[6]["data"]["verdict"], events[6]["data"]["attempt"]) == ("gone", 1)
    assert events[7]["data"]["verdict"] == "accepted"


async def test_a_heartbeat_to_an_earlier_attempts_url_describes_that_attempt(
    start_service, receiver
):
    """The 410 is about the attempt the URL names: it ended. Its details gave
    the job's current state (`running`: attempt 2's), which reads as if the
    sender's run were still going; and once attempt 2 ended too, said the job
    was attempt 2's end state, as if attempt 1 had ended that way."""
    svc = await start_service()
    old_url = await failed_job(svc, receiver, "h")
    assert (await retry(svc, "h")).status_code == 200
    await svc.wait_state("h", "running")
    old_beat = heartbeat_url(old_url)
    gone = {
        "code": "gone",
        "message": "attempt 1 of this job has ended; the job is at attempt 2",
        "details": {"attempt": 1, "current_attempt": 2},
    }
    late = await svc.client.post(old_beat, json={"progress": "old"})
    assert (late.status_code, late.json()["error"]) == (410, gone), late.text
    new_url = triggers(receiver, "h")[-1]["callback_url"]
    done = await svc.client.post(new_url, json={"status": "succeeded"})
    assert done.status_code == 200, done.text
    await svc.wait_state("h", "succeeded")
    later = await svc.client.post(old_beat, json={"progress": "old"})
    assert (later.status_code, later.json()["error"]) == (410, gone), later.text
    ended = await svc.client.post(heartbeat_url(new_url), json={"progress": "new"})
    assert ended.json()["error"]["details"] == {"state": "succeeded", "attempt": 2}
    job = await svc.job("h")
    assert (job["progress"], job["heartbeat_at"]) == (None, None)


@pytest.mark.parametrize("status", ["succeeded", "failed"])
async def test_a_callback_that_a_retry_overtakes_is_gone_and_recorded(
    start_service, receiver, monkeypatch, status
):
    """The callback read the job at attempt 1, then a retry moved it to attempt
    2 before the callback settled: it answered 409 `conflict` (or 200
    `duplicate`), recorded nothing, and showed attempt 2. It is gone, as it
    would be had the retry come first (an audit saw it in 4-6 of 80 races)."""
    svc = await start_service()
    old_url = await failed_job(svc, receiver, "o")
    settler = svc.tether.callbacks.settler
    real = settler.settle

    async def overtaken(*args: Any, **kwargs: Any) -> Any:
        assert (await retry(svc, "o")).status_code == 200
        return await real(*args, **kwargs)

    monkeypatch.setattr(settler, "settle", overtaken)
    late = await svc.client.post(old_url, json={"status": status})
    monkeypatch.undo()
    assert late.status_code == 410, late.text
    assert late.json()["outcome"] == "gone"
    assert late.json()["message"] == "attempt 1 of this job has ended; the job is at attempt 2"
    assert "job" not in late.json()
    assert late.json()["error"]["details"] == {"attempt": 1, "current_attempt": 2}
    events = (await svc.client.get("/jobs/o/events")).json()["items"]
    said = [e for e in events if e["type"] == "callback"][-1]
    assert (said["attempt"], said["data"]["verdict"], said["data"]["attempt"]) == (2, "gone", 1)
    await svc.wait_state("o", "running")  # attempt 2 goes on, untouched


async def test_a_stream_opened_after_a_retry_ends_at_the_new_attempts_finished(
    start_service, receiver
):
    svc = await start_service()
    await failed_job(svc, receiver, "s")
    assert (await retry(svc, "s")).status_code == 200
    await svc.wait_state("s", "running")
    url = triggers(receiver, "s")[-1]["callback_url"]
    seen: list[tuple[int, str]] = []

    async def follow() -> None:
        headers = {"accept": "text/event-stream"}
        async with svc.client.stream("GET", "/jobs/s/events", headers=headers) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    item = msgspec.json.decode(line[6:])
                    seen.append((item.get("attempt", 0), item["type"]))

    stream = asyncio.create_task(follow())
    await eventually(lambda: (2, "triggered") in seen)
    assert not stream.done()  # attempt 1's `finished` did not end it
    await svc.client.post(url, json={"status": "succeeded"})
    await asyncio.wait_for(stream, 10)
    assert seen[-2:] == [(2, "finished"), (0, "end")]
    assert seen.count((1, "finished")) == 1


@pytest.mark.parametrize("end", ["running", "succeeded", "pending"])
async def test_a_job_that_is_waiting_or_succeeded_is_not_retried(start_service, receiver, end):
    svc = await start_service()
    if end == "pending":  # a trigger that never answers keeps the job pending
        receiver.respond = lambda hit: (503, {})
        body = {"id": "w", "backend": "http_webhook", "params": {"url": receiver.url()}}
        assert (await svc.client.post("/jobs", json=body)).status_code == 201
    else:
        await start(svc, receiver, "w")
    if end == "succeeded":
        await svc.client.post(
            triggers(receiver, "w")[-1]["callback_url"], json={"status": "succeeded"}
        )
        await svc.wait_state("w", "succeeded")
    before = len(receiver.hits)
    answer = await retry(svc, "w")
    assert answer.status_code == 409
    error = answer.json()["error"]
    assert error["details"] == {"attempt": 1, "state": end}
    assert f"at attempt 1 ({end})" in error["message"]
    job = await svc.job("w")
    assert (job["attempt"], job["state"]) == (1, end)
    assert len(receiver.hits) == before or end == "pending"


async def test_a_body_of_bytes_json_does_not_take_for_white_space_is_refused(
    start_service, receiver
):
    """JSON's white space is space, tab, CR and LF: a body of those is none, a
    vertical tab or form feed (which `bytes.strip` also takes) is not JSON."""
    svc = await start_service()
    await failed_job(svc, receiver, "vt")
    for body in (b"\x0b", b"\x0c", b" \x1c "):
        answer = await svc.client.post(
            "/jobs/vt/retry", content=body, headers={"content-type": "application/json"}
        )
        assert answer.status_code == 400, (body, answer.text)
    assert (await svc.job("vt"))["attempt"] == 1  # nothing changed
    answer = await svc.client.post(
        "/jobs/vt/retry", content=b" \t\r\n", headers={"content-type": "application/json"}
    )
    assert (answer.status_code, answer.json()["attempt"]) == (200, 2)


async def test_an_unknown_job_is_404(start_service):
    svc = await start_service()
    answer = await retry(svc, "nope")
    assert answer.status_code == 404
    assert answer.json()["error"]["message"] == "no job 'nope'"


async def test_a_repeated_retry_naming_its_attempt_starts_nothing_more(start_service, receiver):
    svc = await start_service()
    await failed_job(svc, receiver, "a")
    first = await retry(svc, "a", {"attempt": 2})
    assert (first.status_code, first.json()["attempt"]) == (200, 2)
    await svc.wait_state("a", "running")
    again = await retry(svc, "a", {"attempt": 2.0})  # a whole number, however written
    assert (again.status_code, again.json()["attempt"]) == (200, 2)
    assert again.json()["state"] == "running"
    await asyncio.sleep(0.3)
    assert len(triggers(receiver, "a")) == 2

    # An attempt that cannot follow from where the job is: 409 naming it.
    for wanted in (1, 4):
        answer = await retry(svc, "a", {"attempt": wanted})
        if wanted == 1:  # an earlier attempt: a no-op answer only when it is the current one
            assert answer.status_code == 409
        assert answer.status_code == 409
        error = answer.json()["error"]
        assert error["details"] == {"attempt": 2, "state": "running"}
        assert "at attempt 2 (running)" in error["message"]


async def test_concurrent_retries_start_exactly_one_attempt(start_service, receiver):
    svc = await start_service()
    await failed_job(svc, receiver, "c")
    answers = await asyncio.gather(*(retry(svc, "c") for _ in range(5)))
    assert sorted(a.status_code for a in answers) == [200, 409, 409, 409, 409]
    await svc.wait_state("c", "running")
    await asyncio.sleep(0.3)
    assert [t["promise_id"] for t in triggers(receiver, "c")] == ["c:1", "c~2:1"]
    events = (await svc.client.get("/jobs/c/events")).json()["items"]
    assert [e["type"] for e in events].count("retried") == 1

    # Naming the attempt, every one of them is answered 200 with it.
    await svc.client.post(triggers(receiver, "c")[-1]["callback_url"], json={"status": "failed"})
    await svc.wait_state("c", "failed")
    answers = await asyncio.gather(*(retry(svc, "c", {"attempt": 3}) for _ in range(5)))
    assert {(a.status_code, a.json()["attempt"]) for a in answers} == {(200, 3)}
    await svc.wait_state("c", "running")
    assert [t["promise_id"] for t in triggers(receiver, "c")] == ["c:1", "c~2:1", "c~3:1"]


async def test_a_timed_out_job_gets_a_fresh_deadline(start_service, receiver):
    svc = await start_service()
    # (on a busy machine it may time out before its trigger's answer is kept)
    await start(svc, receiver, "t", "running", "timed_out", timeout=0.5)
    await svc.wait_state("t", "timed_out")
    await asyncio.sleep(0.5)  # the first deadline is long past
    answer = await retry(svc, "t")
    assert answer.status_code == 200
    job = await svc.wait_state("t", "running", "timed_out")  # (as above)
    assert job["attempt"] == 2
    job = await svc.wait_state("t", "timed_out", timeout=5)
    assert job["error"]["type"] == "timeout"
    types = [
        (e["attempt"], e["type"]) for e in (await svc.client.get("/jobs/t/events")).json()["items"]
    ]
    assert types[-2:] == [(2, "timed_out"), (2, "finished")]


async def test_a_canceled_job_is_retried_after_its_run_was_stopped(start_service, receiver):
    svc = await start_service()
    await start(svc, receiver, "k")
    assert (await svc.client.post("/jobs/k/cancel")).status_code == 200
    answer = await retry(svc, "k")  # at once: the cancel's finish step may still run
    assert (answer.status_code, answer.json()["attempt"]) == (200, 2)
    await svc.wait_state("k", "running")
    job = await svc.job("k")
    assert (job["state"], job["error"]) == ("running", None)  # attempt 1's end left it alone


async def failed_and_returned(svc: Service, receiver: Receiver, job_id: str) -> None:
    """`failed_job`, and its attempt's workflow returned: only what is
    still due after it (a run's stop) keeps the attempt from being over."""
    await failed_job(svc, receiver, job_id)
    resonate = svc.tether.resonate

    async def workflow_returned() -> bool:
        return not await workflow.attempt_running(resonate, job_id, 1)

    await eventually(workflow_returned)


async def test_a_retry_waits_for_the_runs_stop_of_an_attempt_no_workflow_finished(
    start_service, receiver, monkeypatch
):
    """The attempt ended with its run's stop due (`stop_due`: a job the
    watchdog finished without its workflow, its stop under way or its
    process dead): a retry waits until the stop's outcome is recorded, and
    answers 409 `still winding up` when it is not within the wait."""
    monkeypatch.setattr(core.service, "ATTEMPT_END_WAIT", 0.3)
    svc = await start_service()
    await failed_and_returned(svc, receiver, "s")
    jobs = svc.tether.jobs
    lease = now_ms() + 3_600_000
    await jobs.db.execute("UPDATE tether_jobs SET stop_due = ? WHERE id = 's'", (lease,))
    answer = await retry(svc, "s")
    assert answer.status_code == 409, answer.text
    assert "still winding up" in answer.json()["error"]["message"]
    shown = await svc.job("s")
    assert (shown["attempt"], shown["winding_up"]) == (1, "stopping_run")

    async def stop_recorded() -> None:
        await asyncio.sleep(0.1)
        assert await jobs.stopped("s", 1, lease, [], now_ms()) is not None

    monkeypatch.setattr(core.service, "ATTEMPT_END_WAIT", 10.0)
    recording = asyncio.create_task(stop_recorded())  # while the next retry waits
    answer = await retry(svc, "s")
    await recording
    assert (answer.status_code, answer.json()["attempt"]) == (200, 2)
    assert answer.json()["winding_up"] is None


async def test_a_retry_waits_for_the_stop_promise_a_host_of_an_earlier_release_made(
    start_service, receiver, monkeypatch
):
    """A host of a release before `stop_due` finishing a job no workflow
    finishes made its stop promise (`{root}:stop`, pending while its stop
    ran) instead: while releases are mixed, a retry through today's host
    waits for that promise as for a workflow, and answers 409 when it is
    not resolved within the wait."""
    monkeypatch.setattr(core.service, "ATTEMPT_END_WAIT", 0.3)
    svc = await start_service()
    await failed_and_returned(svc, receiver, "o")
    resonate = svc.tether.resonate
    stop = workflow.stop_promise_id("o", 1)
    await resonate.promises.create(stop, now_ms() + 3_600_000, Value(data=None), {})
    answer = await retry(svc, "o")
    assert answer.status_code == 409, answer.text
    assert "still winding up" in answer.json()["error"]["message"]

    async def stop_resolved() -> None:
        await asyncio.sleep(0.1)
        await resonate.promises.resolve(stop, Value(data=None))

    monkeypatch.setattr(core.service, "ATTEMPT_END_WAIT", 10.0)
    resolving = asyncio.create_task(stop_resolved())  # while the next retry waits
    answer = await retry(svc, "o")
    await resolving
    assert (answer.status_code, answer.json()["attempt"]) == (200, 2)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"attempt": 0}, "attempt"),
        ({"attempt": 2.5}, "attempt"),
        ({"attempt": 1e300}, "attempt"),  # was quoted whole in a 409 (301 digits)
        ({"attempt": 2**31}, "attempt"),
        ({"attempt": "two"}, "attempt"),
        ({"attempt": True}, "attempt"),
        ({"attempts": 2}, "attempts"),
        ([2], "body"),
    ],
)
async def test_a_malformed_retry_is_refused_naming_the_field_and_changes_nothing(
    start_service, receiver, body, field
):
    svc = await start_service()
    await failed_job(svc, receiver, "m")
    answer = await retry(svc, "m", body)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["details"]["field"] == field
    assert len(answer.text) < 400, answer.text
    job = await svc.job("m")
    assert (job["state"], job["attempt"]) == ("failed", 1)


async def test_retry_needs_the_api_token_not_a_read_token(start_service, receiver):
    svc = await start_service(api_token="write-token", read_token="read-token")
    svc.client.headers["authorization"] = "Bearer write-token"
    await failed_job(svc, receiver, "p")
    read = {"authorization": "Bearer read-token"}
    answer = await svc.client.post("/jobs/p/retry", headers=read)
    assert answer.status_code == 403
    assert (await svc.job("p"))["attempt"] == 1
    assert (await svc.client.post("/jobs/p/retry")).status_code == 200


class Rerunnable(Backend):
    """Records what `rerun` is handed; `trigger` starts a run numbered by attempt."""

    name = "rerunnable"
    params_type = dict

    def __init__(self) -> None:
        self.reruns: list[tuple[Trigger, Job]] = []

    async def trigger(self, trigger: Trigger) -> dict[str, Any]:
        return {"run": trigger.job.attempt}

    async def rerun(self, trigger: Trigger, previous: Job) -> dict[str, Any]:
        self.reruns.append((trigger, previous))
        return {"run": trigger.job.attempt, "resumed": previous.external}


class Offers:
    def __init__(self, *backends: Any) -> None:
        self.backends = backends

    @hookimpl
    def tether_backends(self) -> Any:
        return self.backends


async def test_hook_rerun_gets_the_new_trigger_and_the_previous_attempt(start_service):
    backend = Rerunnable()
    svc = await start_service(plugins=(Offers(backend),))
    assert (await svc.client.post("/jobs", json={"id": "h", "backend": "rerunnable"})).status_code
    await svc.wait_state("h", "running")
    assert (
        await svc.client.post("/jobs/h/cancel", json={"reason": "wrong day"})
    ).status_code == 200
    assert (await retry(svc, "h")).status_code == 200
    job = await svc.wait_state("h", "running")
    [(trigger, previous)] = backend.reruns
    assert (trigger.job.attempt, trigger.promise_id, trigger.idempotency_key) == (
        2,
        "h~2:1",
        "h~2:1",
    )
    assert (previous.attempt, previous.state, previous.external) == (1, "canceled", {"run": 1})
    assert previous.error is not None and previous.error.message == "canceled by request: wrong day"
    assert job["external"] == {"run": 2, "resumed": {"run": 1}}


async def test_hook_rerun_by_default_triggers_again(start_service, receiver):
    svc = await start_service()
    await failed_job(svc, receiver, "d")
    assert (await retry(svc, "d")).status_code == 200
    await svc.wait_state("d", "running")
    assert [t["promise_id"] for t in triggers(receiver, "d")] == ["d:1", "d~2:1"]


async def test_a_job_whose_backend_is_not_installed_is_not_retried(start_service):
    """Its plugin removed since (`tether uninstall`): a retry's trigger would
    fail at once (`unknown_backend`); the retry is refused and changes nothing."""
    first = await start_service(plugins=(Offers(Rerunnable()),))
    await first.client.post("/jobs", json={"id": "u", "backend": "rerunnable"})
    await first.wait_state("u", "running")
    assert (await first.client.post("/jobs/u/cancel", json={})).status_code == 200
    ended = await first.wait_state("u", "canceled")
    svc = await start_service(store=first.settings.store)  # the same store, without the plugin
    events = (await svc.client.get("/jobs/u/events")).json()["items"]
    answer = await retry(svc, "u")
    assert answer.status_code == 409
    assert answer.json()["error"]["message"] == (
        "job 'u' runs on backend 'rerunnable', which is not installed here: install its plugin"
        " (`tether install`), restart, then retry"
    )
    assert answer.json()["error"]["details"]["backend"] == "rerunnable"
    assert await svc.job("u") == ended
    assert (await svc.client.get("/jobs/u/events")).json()["items"] == events


async def test_an_earlier_attempts_token_quoted_in_a_later_attempts_answer_is_masked(
    start_service, receiver
):
    """A receiver refusing attempt 2 with a body that quotes attempt 1's
    callback URL (it logs what it was sent): attempt 1's token is a secret
    too, masked in the job's error and history (found in an audit,
    2026-12-04)."""
    svc = await start_service()
    old_url = await failed_job(svc, receiver, "q")
    receiver.respond = lambda hit: (400, {"error": f"already ran for {old_url}"})
    answer = await retry(svc, "q")
    assert answer.status_code == 200, answer.text
    job = await svc.wait_state("q", "failed")
    old_token = old_url.partition("?token=")[2]
    assert job["attempt"] == 2
    assert "***" in job["error"]["message"]
    assert old_token[:8] not in str(job)
    assert old_token[:8] not in (await svc.client.get("/jobs/q/events")).text


async def canceled_while_triggering(
    start_service: Any, receiver: Receiver, monkeypatch: Any, release: threading.Event
) -> Service:
    """A service whose job `h` was canceled while its webhook's trigger
    request was held open (until `release`): its workflow went on without
    the call (`TRIGGER_WATCH`), whose run is then stopped as unrecorded."""
    monkeypatch.setattr(core.steps, "TRIGGER_WATCH", 0.05)

    def respond(hit: Hit) -> tuple[int, Any]:
        if hit.path == "/hook" and not release.is_set():
            release.wait(30)
        return 202, {"run": hit.path}

    receiver.respond = respond
    svc: Service = await start_service()
    params = {"url": receiver.url(), "cancel_url": receiver.url("/cancel"), "timeout": 60}
    body = {"id": "h", "backend": "http_webhook", "params": params}
    assert (await svc.client.post("/jobs", json=body)).status_code == 201
    await eventually(lambda: receiver.on("/hook"))
    assert (await svc.client.post("/jobs/h/cancel")).status_code == 200
    await eventually(lambda: receiver.on("/cancel"))  # the finish's `cancel_unrecorded`
    return svc


async def test_a_retry_waits_for_a_trigger_call_left_to_answer_late(
    start_service, receiver, monkeypatch
):
    """A job canceled while its webhook's trigger request was held open:
    its workflow went on without the call, whose stop is held in the row
    (`stop_due`) until it answers. A retry meanwhile answers 409, saying
    why (a run may still start, to be stopped first); once the request is
    answered, its run recorded and stopped, the retry goes through. Before,
    attempt 2 could start while attempt 1's call might still start a run."""
    monkeypatch.setattr(core.service, "ATTEMPT_END_WAIT", 0.3)
    release = threading.Event()
    svc = await canceled_while_triggering(start_service, receiver, monkeypatch, release)
    try:
        answer = await retry(svc, "h")
        assert answer.status_code == 409, answer.text
        error = answer.json()["error"]
        assert (
            "a call of its trigger, left to answer late, may still start a run" in error["message"]
        )
        assert error["details"]["attempt"] == 1 and error["details"]["stop_due"]
        shown = await svc.job("h")
        assert (shown["attempt"], shown["winding_up"]) == (1, "late_trigger_call")
    finally:
        release.set()
    await eventually(lambda: len(receiver.on("/cancel")) == 2)  # the late run's, stopped

    async def wound_up() -> bool:
        return (await svc.job("h"))["winding_up"] is None

    await eventually(wound_up)
    monkeypatch.setattr(core.service, "ATTEMPT_END_WAIT", 10.0)
    answer = await retry(svc, "h")
    assert (answer.status_code, answer.json()["attempt"]) == (200, 2), answer.text


async def test_a_retry_that_waited_for_a_late_run_names_it_in_previous(
    start_service, receiver, monkeypatch
):
    """The retry came while attempt 1's trigger call was left to answer
    late, and waited; the call's run was recorded meanwhile. Its `retried`
    event's `previous` had no `external`: it was built from the row read
    before the wait (found by an exploratory QA pass)."""
    release = threading.Event()
    svc = await canceled_while_triggering(start_service, receiver, monkeypatch, release)
    try:
        waiting = asyncio.create_task(retry(svc, "h"))
        await asyncio.sleep(0.3)
        assert not waiting.done()
    finally:
        release.set()
    answer = await waiting
    assert (answer.status_code, answer.json()["attempt"]) == (200, 2), answer.text
    events = (await svc.client.get("/jobs/h/events")).json()["items"]
    late = [e for e in events if e["type"] == "triggered" and e["attempt"] == 1]
    assert late and late[0]["data"]["external"]["response"] == {"run": "/hook"}
    [retried] = [e for e in events if e["type"] == "retried"]
    assert retried["data"]["previous"]["state"] == "canceled"
    assert retried["data"]["previous"]["external"] == late[0]["data"]["external"]
