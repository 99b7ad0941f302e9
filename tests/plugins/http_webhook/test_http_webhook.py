"""The `http_webhook` backend (plugins/http_webhook): the requests it sends, the
answers it understands and what it keeps of them, its status polling and its
errors, through the real service and a real receiver on 127.0.0.1."""

from __future__ import annotations

import threading
from itertools import pairwise
from typing import Any

from tests.conftest import HOLD, Hit, eventually

RECEIPT_BOUND = 4096
"""The documented bound on a trigger's answer kept in the job (4 KiB)."""
STATUS_BOUND = 1 << 20
"""The documented bound on a status_url answer (1 MiB)."""


def webhook_job(job_id: str, url: str, **params: Any) -> dict[str, Any]:
    return {"id": job_id, "backend": "http_webhook", "params": {"url": url, **params}}


# ── the requests it sends ────────────────────────────────────────────────────


async def test_a_job_is_triggered_with_everything_the_receiver_needs(start_service, receiver):
    svc = await start_service()
    response = await svc.client.post(
        "/jobs",
        json={
            "id": "job-1",
            "backend": "http_webhook",
            "metadata": {"team": "data"},
            "params": {"url": receiver.url(), "payload": {"table": "sales"}},
        },
    )
    assert response.status_code == 201, response.text
    assert response.json()["state"] == "pending"
    job = await svc.wait_state("job-1", "running")
    assert job["external"] == {"status_code": 202, "response": {"accepted": True}}
    assert job["metadata"] == {"team": "data"}

    [hit] = receiver.hits
    assert hit.method == "POST"
    assert hit.headers["content-type"] == "application/json"
    assert hit.body == {
        "job_id": "job-1",
        "promise_id": "job-1:1",
        "callback_url": hit.body["callback_url"],
        "heartbeat_url": hit.body["heartbeat_url"],
        "idempotency_key": "job-1:1",
        "payload": {"table": "sales"},
    }
    callback_url = hit.body["callback_url"]
    assert callback_url.startswith(f"{svc.settings.base_url}/callbacks/job-1%3A1?token=")
    token = callback_url.partition("?")[2]
    assert hit.body["heartbeat_url"] == (
        f"{svc.settings.base_url}/callbacks/job-1%3A1/heartbeat?{token}"
    )
    assert hit.headers["tether-callback-url"] == callback_url
    assert hit.headers["idempotency-key"] == "job-1:1"


async def test_params_headers_go_with_every_request_and_never_replace_tethers_own(
    start_service, receiver
):
    receiver.respond = lambda hit: (
        (200, {"status": "running"}) if hit.path == "/status" else (202, {})
    )
    svc = await start_service()
    headers = {
        "X-Team": "data",
        "Idempotency-Key": "mine",
        "Tether-Callback-Url": "http://evil",
        "Tether-Promise-Id": "mine",
    }
    job = webhook_job(
        "h",
        receiver.url(),
        headers=headers,
        cancel_url=receiver.url("/cancel"),
        status_url=receiver.url("/status"),
        status_interval=0.1,
    )
    assert (await svc.client.post("/jobs", json=job)).status_code == 201
    await svc.wait_state("h", "running")
    await eventually(lambda: receiver.on("/status"))
    assert (await svc.client.post("/jobs/h/cancel")).status_code == 200
    await eventually(lambda: len(receiver.on("/cancel")) == 1, holds=HOLD)

    [trigger] = receiver.on("/hook")
    assert trigger.headers["x-team"] == "data"
    assert trigger.headers["idempotency-key"] == "h:1"
    assert trigger.headers["tether-callback-url"] == trigger.body["callback_url"]
    [cancel] = receiver.on("/cancel")
    assert cancel.method == "POST"
    assert cancel.body == {"job_id": "h", "promise_id": "h:1", "reason": "canceled"}
    status = receiver.on("/status")[0]
    assert status.method == "GET"
    for hit in (trigger, cancel, status):  # Tether's, not the job's
        assert hit.headers["tether-promise-id"] == trigger.body["promise_id"] == "h:1"
    for hit in (cancel, status):
        assert hit.headers["x-team"] == "data"


# ── the answers it understands, and what it keeps ───────────────────────────


async def test_a_trigger_answer_is_kept_only_if_it_is_json_of_at_most_4_kib(
    start_service, receiver
):
    fits = "x" * (RECEIPT_BOUND - 2)  # with its quotes, exactly the bound
    answers: dict[str, Any] = {
        "/fits": fits,
        "/long": fits + "x",
        "/huge": "x" * 200_000,  # past what is read on to keep the connection
        "/html": b"<html>started</html>",
    }
    receiver.respond = lambda hit: (202, answers[hit.path])
    svc = await start_service()
    for path in answers:
        await svc.client.post("/jobs", json=webhook_job(path[1:], receiver.url(path)))
    for job_id, kept in (("fits", fits), ("long", None), ("huge", None), ("html", None)):
        job = await svc.wait_state(job_id, "running")
        assert job["external"] == {"status_code": 202, "response": kept}, job_id


async def test_a_redirect_is_not_followed(start_service, receiver):
    def respond(hit: Hit) -> tuple[Any, ...]:
        if hit.path == "/hook":
            return 307, {}, {"location": receiver.url("/elsewhere")}
        return 202, {}

    receiver.respond = respond
    svc = await start_service()
    await svc.client.post("/jobs", json=webhook_job("r", receiver.url()))
    job = await svc.wait_state("r", "failed")
    assert job["error"]["type"] == "http_307"
    assert "answered 307" in job["error"]["message"]
    assert receiver.on("/elsewhere") == []
    assert len(receiver.hits) == 1  # a 3xx is no reason to try again


async def test_a_trigger_refused_with_4xx_fails_the_job_at_once(start_service, receiver):
    receiver.respond = lambda hit: (403, {"error": "no"})
    svc = await start_service()
    await svc.client.post(
        "/jobs", json={"id": "x", "backend": "http_webhook", "params": {"url": receiver.url()}}
    )
    job = await svc.wait_state("x", "failed")
    assert job["error"]["type"] == "http_403"
    assert "answered 403" in job["error"]["message"]
    assert len(receiver.hits) == 1


async def test_a_trigger_refused_with_4xx_keeps_the_receivers_reason(start_service, receiver):
    """The first KiB of the refusal goes into the job's error, whitespace folded
    and the callback token (which the receiver may echo) scrubbed."""

    def refuse(hit: Hit) -> tuple[int, bytes]:
        token = hit.body["callback_url"].split("token=")[1]
        reason = f"no pipeline 'sales'\n  for {token}; " + "x" * 5000
        return 404, reason.encode()

    receiver.respond = refuse
    svc = await start_service()
    await svc.client.post(
        "/jobs", json={"id": "x", "backend": "http_webhook", "params": {"url": receiver.url()}}
    )
    job = await svc.wait_state("x", "failed")
    message = job["error"]["message"]
    prefix = f"trigger failed: POST 127.0.0.1:{receiver.port} answered 404: "
    assert message.startswith(prefix + "no pipeline 'sales' for ***; xxx")
    token = svc.tether.signer.token("x:1")
    assert token not in message
    reason = message.removeprefix(prefix)
    assert len(reason) == 1024 - len(token) + len("***") - 2  # 1 KiB, "\n  " folded to " "


async def test_hook_check_new_params_refuses_credentials_without_echoing_them(
    start_service, receiver
):
    """Params are stored and shown with the job: `user:password@` in a URL
    would put a credential in the job record, so it is refused (the service's
    `auth` credentials are the way), and the refusal does not repeat it."""
    svc = await start_service()
    for name in ("url", "cancel_url", "status_url"):
        params = {"url": receiver.url(), name: receiver.url().replace("//", "//alice:s3cret@")}
        answer = await svc.client.post(
            "/jobs", json={"id": "x", "backend": "http_webhook", "params": params}
        )
        assert answer.status_code == 422, answer.text
        assert f"{name} must not carry user:password@" in answer.json()["error"]["message"]
        assert "s3cret" not in answer.text and "alice" not in answer.text
    for header in ("Authorization", "proxy-authorization"):  # found by a security QA pass
        params = {"url": receiver.url(), "headers": {header: "Bearer s3cret"}}
        answer = await svc.client.post(
            "/jobs", json={"id": "x", "backend": "http_webhook", "params": params}
        )
        assert answer.status_code == 422, answer.text
        error = answer.json()["error"]
        assert error["details"]["field"] == "params.headers"
        assert (
            f"headers: {header!r} would be stored and shown with the job; name a credential"
            " of the service in `auth` instead (TETHER_WEBHOOK_AUTH_<NAME>)"
        ) in error["message"]
        assert "s3cret" not in answer.text
    assert (await svc.client.get("/jobs/x")).status_code == 404
    assert receiver.hits == []


async def test_a_trigger_answered_5xx_is_retried_then_fails(start_service, receiver):
    receiver.respond = lambda hit: (503, {})
    svc = await start_service(trigger_attempts=4, trigger_backoff=0.1)
    await svc.client.post(
        "/jobs", json={"id": "x", "backend": "http_webhook", "params": {"url": receiver.url()}}
    )
    job = await svc.wait_state("x", "failed")
    assert job["error"]["type"] == "http_503"
    assert len(receiver.hits) == 4
    gaps = [b.at - a.at for a, b in pairwise(receiver.hits)]
    for n, gap in enumerate(gaps):  # the backoff, doubling from one attempt to the next
        assert gap >= 0.1 * 2**n, gaps


async def test_hook_cancel_unrecorded_posts_cancel_url_when_no_trigger_answer_came(
    start_service, receiver
):
    """Every try timed out (the receiver may have started the run each time):
    the job fails, and `cancel_url` is POSTed once, naming the promise id
    the tries carried."""
    release = threading.Event()

    def respond(hit: Hit) -> tuple[int, Any]:
        if hit.path == "/hook":
            release.wait(2)  # past params.timeout: no answer reaches Tether
        return 202, {}

    receiver.respond = respond
    svc = await start_service(trigger_attempts=2, trigger_backoff=0.05)
    params = {"timeout": 0.3, "cancel_url": receiver.url("/cancel")}
    await svc.client.post("/jobs", json=webhook_job("x", receiver.url(), **params))
    try:
        job = await svc.wait_state("x", "failed")
        assert job["error"]["type"] == "timeout"
        await eventually(lambda: receiver.on("/cancel"))
        await eventually(lambda: len(receiver.on("/cancel")) == 1, holds=HOLD)
    finally:
        release.set()
    [cancel] = receiver.on("/cancel")
    assert cancel.body == {"job_id": "x", "promise_id": "x:1", "reason": "failed"}
    assert {h.body["promise_id"] for h in receiver.on("/hook")} == {"x:1"}


async def test_a_trigger_refused_outright_gets_no_cancel(start_service, receiver):
    receiver.respond = lambda hit: (422, {}) if hit.path == "/hook" else (200, {})
    svc = await start_service()
    params = {"cancel_url": receiver.url("/cancel")}
    await svc.client.post("/jobs", json=webhook_job("x", receiver.url(), **params))
    await svc.wait_state("x", "failed")
    await eventually(lambda: receiver.on("/cancel") == [], holds=HOLD)


async def test_a_retry_after_longer_than_the_backoff_is_waited_for(start_service, receiver):
    answers = iter([(429, {}, {"retry-after": "1"}), (202, {})])
    receiver.respond = lambda hit: next(answers)
    svc = await start_service(trigger_backoff=0.05)
    await svc.client.post("/jobs", json=webhook_job("slow", receiver.url()))
    await svc.wait_state("slow", "running")
    first, second = receiver.hits
    assert second.at - first.at >= 1


async def test_a_trigger_that_recovers_after_a_5xx_runs_once(start_service, receiver):
    answers = iter([(500, {}), (202, {"run": 7})])
    receiver.respond = lambda hit: next(answers)
    svc = await start_service()
    await svc.client.post(
        "/jobs", json={"id": "x", "backend": "http_webhook", "params": {"url": receiver.url()}}
    )
    job = await svc.wait_state("x", "running")
    assert job["external"] == {"status_code": 202, "response": {"run": 7}}
    await eventually(lambda: len(receiver.hits) == 2, holds=HOLD)
    assert [h.body["idempotency_key"] for h in receiver.hits] == ["x:1", "x:1"]


async def test_a_receiver_echoing_the_request_does_not_leak_the_token(start_service, receiver):
    receiver.respond = lambda hit: (200, {"echo": hit.body})
    svc = await start_service()
    await svc.client.post(
        "/jobs", json={"id": "echo", "backend": "http_webhook", "params": {"url": receiver.url()}}
    )
    job = await svc.wait_state("echo", "running")
    token = receiver.hits[0].body["callback_url"].split("token=")[1]
    assert token not in str(job)
    assert job["external"]["response"]["echo"]["callback_url"].endswith("token=***")


# ── status_url: noticing a lost callback ─────────────────────────────────────


async def test_hook_check_status_and_check_interval_notice_a_lost_callback(start_service, receiver):
    states = iter(["running", "running"])

    def respond(hit: Any) -> tuple[int, Any]:
        if hit.path == "/status":
            state = next(states, "succeeded")
            return 200, {"status": state, "result": {"found": "by polling"}}
        return 202, {}

    receiver.respond = respond
    svc = await start_service()
    await svc.client.post(
        "/jobs",
        json={
            "id": "lost",
            "backend": "http_webhook",
            "params": {
                "url": receiver.url(),
                "status_url": receiver.url("/status"),
                "status_interval": 0.1,
            },
        },
    )
    job = await svc.wait_state("lost", "succeeded")
    assert job["result"] == {"found": "by polling"}
    assert len(receiver.on("/status")) == 3


async def test_a_status_answer_too_long_or_not_understood_keeps_the_job_waiting(
    start_service, receiver
):
    answers = iter(
        [
            {"status": "succeeded", "result": "x" * STATUS_BOUND},  # past the bound
            b"<html>busy</html>",
            {"status": "paused"},
        ]
    )

    def respond(hit: Hit) -> tuple[int, Any]:
        if hit.path == "/status":
            return 200, next(answers, {"status": "failed"})
        return 202, {}

    receiver.respond = respond
    svc = await start_service()
    job = webhook_job("s", receiver.url(), status_url=receiver.url("/status"), status_interval=0.1)
    await svc.client.post("/jobs", json=job)
    failed = await svc.wait_state("s", "failed")
    assert failed["error"] == {"message": "the service reported a failure"}
    assert len(receiver.on("/status")) == 4


async def test_a_credential_the_run_echoes_in_its_callback_is_kept_masked(
    start_service, receiver, monkeypatch
):
    """The receiver's credential (`TETHER_WEBHOOK_AUTH_<NAME>`) was masked in
    the trigger's answer but kept whole when the run sent it back in its
    callback's result or error: in the job, the list and its notification
    (found by a QA pass, 2026-12-06). Every environment secret is masked
    in what a run reports, where it stands whole."""
    import core.redact

    credential = "Bearer echo-cred-0123456789"
    monkeypatch.setenv("TETHER_WEBHOOK_AUTH_RCV", credential)
    monkeypatch.setattr(core.redact, "_ENVIRONMENT", None)  # read again, with it
    svc = await start_service()
    for job_id, body in (
        (
            "echo-ok",
            {
                "status": "succeeded",
                "result": {"auth": credential, "token": "echo-cred-0123456789"},
            },
        ),
        ("echo-no", {"status": "failed", "error": {"message": f"refused: {credential}"}}),
    ):
        job = webhook_job(job_id, receiver.url(), auth="RCV")
        created = await svc.client.post("/jobs", json=job)
        assert created.status_code == 201, created.text
        await svc.wait_state(job_id, "running")
        [hit] = [h for h in receiver.hits if h.body["job_id"] == job_id]
        assert hit.headers["authorization"] == credential  # sent as it is
        path = str(hit.body["callback_url"]).removeprefix(svc.settings.base_url)
        answer = await svc.client.post(path, json=body)
        assert answer.status_code == 200, answer.text
    ok = await svc.wait_state("echo-ok", "succeeded")
    assert ok["result"] == {"auth": "***", "token": "***"}  # the header, and what it carries
    failed = await svc.wait_state("echo-no", "failed")
    assert failed["error"]["message"] == "refused: ***"
    listed = (await svc.client.get("/jobs")).text
    assert credential not in listed and "echo-cred" not in listed
    monkeypatch.setattr(core.redact, "_ENVIRONMENT", None)
