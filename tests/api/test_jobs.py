"""POST /jobs and friends, through real HTTP, with the http_webhook backend and a
real receiver on 127.0.0.1. (What the webhook itself sends and understands is
tested in tests/plugins/http_webhook.)"""

from __future__ import annotations

from typing import Any

import pytest

from core.plugin import hookimpl
from tests.conftest import HOLD, eventually


async def test_the_callback_finishes_the_job(start_service, receiver):
    receiver.callback = {"status": "succeeded", "result": {"rows": 42}}
    svc = await start_service()
    await svc.client.post(
        "/jobs", json={"id": "j", "backend": "http_webhook", "params": {"url": receiver.url()}}
    )
    job = await svc.wait_state("j", "succeeded")
    assert job["result"] == {"rows": 42}
    assert job["error"] is None
    assert job["finished_at"] is not None
    assert receiver.callback_answers == [200]


async def test_a_failed_callback_fails_the_job(start_service, receiver):
    receiver.callback = {"status": "failed", "error": {"message": "disk full", "type": "IOError"}}
    svc = await start_service()
    await svc.client.post(
        "/jobs", json={"id": "j", "backend": "http_webhook", "params": {"url": receiver.url()}}
    )
    job = await svc.wait_state("j", "failed")
    assert job["error"] == {"message": "disk full", "type": "IOError"}


async def test_a_job_gets_a_unique_id_when_none_is_given(start_service, receiver):
    svc = await start_service()
    body = {"backend": "http_webhook", "params": {"url": receiver.url()}}
    first = (await svc.client.post("/jobs", json=body)).json()
    second = (await svc.client.post("/jobs", json=body)).json()
    assert first["id"] != second["id"]
    await eventually(lambda: len(receiver.hits) == 2, holds=HOLD)
    assert {h.body["job_id"] for h in receiver.hits} == {first["id"], second["id"]}


async def test_the_same_start_twice_reattaches_and_triggers_once(start_service, receiver):
    svc = await start_service()
    body = {"id": "dup", "backend": "http_webhook", "params": {"url": receiver.url()}}
    assert (await svc.client.post("/jobs", json=body)).status_code == 201
    await svc.wait_state("dup", "running")
    again = await svc.client.post("/jobs", json=body)
    assert again.status_code == 200
    assert again.json()["id"] == "dup" and again.json()["state"] == "running"
    await svc.client.post("/jobs", json=body)
    # Run the job to its end: a second trigger, had there been one, came before.
    callback = await svc.client.post(receiver.hits[0].body["callback_url"], json={})
    assert callback.json()["outcome"] == "accepted"
    await svc.wait_state("dup", "succeeded")
    assert len(receiver.hits) == 1


async def test_the_same_id_with_another_request_is_a_conflict(start_service, receiver):
    svc = await start_service()
    body = {"id": "c", "backend": "http_webhook", "params": {"url": receiver.url()}}
    await svc.client.post("/jobs", json=body)
    for change in (
        {"params": {"url": receiver.url("/other")}},
        {"timeout": 5},
        {"metadata": {"x": 1}},
    ):
        response = await svc.client.post("/jobs", json={**body, **change})
        assert response.status_code == 409, change
        assert response.json()["error"]["code"] == "conflict"
    job = await svc.job("c")
    assert job["params"] == {"url": receiver.url()}


@pytest.mark.parametrize(
    ("body", "status", "names"),
    [
        ({"backend": "nope"}, 422, ["unknown backend 'nope'", "databricks, http_webhook"]),
        ({"backend": "http_webhook", "params": {}}, 422, ["params", "url"]),
        ({"backend": "http_webhook", "params": {"url": "file:///etc/passwd"}}, 422, ["url"]),
        ({"backend": "http_webhook", "params": {"url": "http://x", "bogus": 1}}, 422, ["bogus"]),
        (
            {"backend": "http_webhook", "params": {"url": "http://x", "timeout": "soon"}},
            422,
            ["params.timeout"],
        ),
        ({"backend": "http_webhook", "params": {"url": "http://x"}, "id": "a/b"}, 422, ["id"]),
        ({"backend": "http_webhook", "params": {"url": "http://x"}, "id": "a:b"}, 422, ["id"]),
        ({"backend": "http_webhook", "params": {"url": "http://x"}, "id": "x" * 129}, 422, ["id"]),
        ({"backend": "http_webhook", "params": {"url": "http://x"}, "id": ""}, 422, ["id"]),
        (
            {"backend": "http_webhook", "params": {"url": "http://x"}, "timeout": -1},
            422,
            ["timeout"],
        ),
        (
            {"backend": "http_webhook", "params": {"url": "http://x"}, "timeout": 1e12},
            422,
            ["timeout"],
        ),
        ({"params": {}}, 400, ["backend"]),
        ({"backend": "http_webhook", "extra": 1}, 400, ["extra"]),
    ],
)
async def test_bad_requests_are_refused_naming_what_is_wrong(
    start_service, receiver, body, status, names
):
    svc = await start_service()
    response = await svc.client.post("/jobs", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    text = str(error)
    for name in names:
        assert name in text
    listed = (await svc.client.get("/jobs")).json()
    assert listed["items"] == []
    assert receiver.hits == []


async def test_a_body_that_is_not_json_is_refused(start_service):
    svc = await start_service()
    response = await svc.client.post(
        "/jobs", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_request"


async def test_an_oversized_body_is_refused_with_413(start_service):
    svc = await start_service(max_body_bytes=1000)
    body = {"backend": "http_webhook", "params": {"url": "http://x", "payload": "x" * 2000}}
    response = await svc.client.post("/jobs", json=body)
    assert response.status_code == 413
    assert (await svc.client.get("/jobs")).json()["items"] == []


async def test_unknown_job_is_404(start_service):
    svc = await start_service()
    response = await svc.client.get("/jobs/nope")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


async def test_jobs_are_listed_newest_first_filtered_and_paginated(start_service, receiver):
    svc = await start_service()
    receiver.respond = lambda hit: (400, {}) if hit.path == "/fail" else (202, {})
    for i in range(5):
        await svc.client.post(
            "/jobs",
            json={"id": f"j{i}", "backend": "http_webhook", "params": {"url": receiver.url()}},
        )
    await svc.client.post(
        "/jobs",
        json={"id": "bad", "backend": "http_webhook", "params": {"url": receiver.url("/fail")}},
    )
    await eventually(lambda: len(receiver.hits) >= 6)

    page = (await svc.client.get("/jobs", params={"limit": 2})).json()
    assert [j["id"] for j in page["items"]] == ["bad", "j4"]
    seen = [j["id"] for j in page["items"]]
    while page["next_cursor"]:
        page = (
            await svc.client.get("/jobs", params={"limit": 2, "cursor": page["next_cursor"]})
        ).json()
        seen += [j["id"] for j in page["items"]]
    assert seen == ["bad", "j4", "j3", "j2", "j1", "j0"]

    await svc.wait_state("bad", "failed")
    failed = (await svc.client.get("/jobs", params={"state": "failed"})).json()
    assert [j["id"] for j in failed["items"]] == ["bad"]
    assert (await svc.client.get("/jobs", params={"backend": "other"})).json()["items"] == []
    for query, status, field in (
        ({"limit": 0}, 400, "limit"),
        ({"limit": 1001}, 400, "limit"),
        ({"state": "exploded"}, 400, "job_state"),
        ({"cursor": "!!"}, 422, "cursor"),
    ):
        response = await svc.client.get("/jobs", params=query)
        assert response.status_code == status, query
        assert response.json()["error"]["code"] == "invalid_request"
        assert field in str(response.json()["error"]["details"]), query


async def test_cancel_stops_the_wait_and_calls_the_backend(start_service, receiver):
    svc = await start_service()
    await svc.client.post(
        "/jobs",
        json={
            "id": "k",
            "backend": "http_webhook",
            "params": {"url": receiver.url(), "cancel_url": receiver.url("/cancel")},
        },
    )
    await svc.wait_state("k", "running")
    response = await svc.client.post("/jobs/k/cancel")
    assert response.status_code == 200
    assert response.json()["state"] == "canceled"
    await eventually(lambda: len(receiver.on("/cancel")) == 1, holds=HOLD)  # called once
    again = await svc.client.post("/jobs/k/cancel")
    assert again.status_code == 409
    assert (await svc.client.post("/jobs/nope/cancel")).status_code == 404


async def test_a_finished_job_cannot_be_canceled(start_service, receiver):
    receiver.callback = {"status": "succeeded"}
    svc = await start_service()
    await svc.client.post(
        "/jobs",
        json={
            "id": "f",
            "backend": "http_webhook",
            "params": {"url": receiver.url(), "cancel_url": receiver.url("/cancel")},
        },
    )
    await svc.wait_state("f", "succeeded")
    response = await svc.client.post("/jobs/f/cancel")
    assert response.status_code == 409
    assert "succeeded" in response.json()["error"]["message"]
    assert (await svc.job("f"))["state"] == "succeeded"
    assert receiver.on("/cancel") == []


async def test_a_job_canceled_before_its_trigger_is_never_triggered(start_service, receiver):
    svc = await start_service()
    # a trigger that keeps failing keeps the job pending (retries), then cancel
    receiver.respond = lambda hit: (503, {})
    await svc.client.post(
        "/jobs", json={"id": "p", "backend": "http_webhook", "params": {"url": receiver.url()}}
    )
    response = await svc.client.post("/jobs/p/cancel")
    assert response.status_code == 200
    job = await svc.wait_state("p", "canceled")
    assert job["error"]["message"] == "canceled by request"
    attempts = len(receiver.hits)
    # ten backoff periods with no attempt after the cancel
    await eventually(lambda: len(receiver.hits) == attempts, holds=0.5)


async def test_no_callback_within_the_timeout_times_the_job_out(start_service, receiver):
    svc = await start_service()
    await svc.client.post(
        "/jobs",
        json={
            "id": "t",
            "backend": "http_webhook",
            "timeout": 0.5,
            "params": {"url": receiver.url(), "cancel_url": receiver.url("/cancel")},
        },
    )
    job = await svc.wait_state("t", "timed_out")
    assert job["error"]["type"] == "timeout"
    await eventually(lambda: len(receiver.on("/cancel")) == 1, holds=HOLD)
    assert receiver.on("/cancel")[0].body["reason"] == "timed_out"


async def test_the_api_token_guards_jobs_but_not_callbacks_or_health(start_service, receiver):
    svc = await start_service(api_token="s3cret-token")
    body = {"id": "a", "backend": "http_webhook", "params": {"url": receiver.url()}}
    assert (await svc.client.post("/jobs", json=body)).status_code == 401
    assert (await svc.client.get("/jobs")).status_code == 401
    wrong = {"authorization": "Bearer nope"}
    assert (await svc.client.get("/jobs/a", headers=wrong)).status_code == 401
    good = {"authorization": "Bearer s3cret-token"}
    assert (await svc.client.post("/jobs", json=body, headers=good)).status_code == 201
    assert (await svc.client.get("/jobs/a", headers=good)).status_code == 200
    assert (await svc.client.get("/health")).status_code == 200
    [hit] = await eventually(lambda: receiver.hits)
    response = await svc.client.post(
        hit.body["callback_url"].removeprefix(svc.settings.base_url), json={"status": "succeeded"}
    )
    assert response.status_code == 200


async def test_health_and_openapi(start_service):
    svc = await start_service()
    health = (await svc.client.get("/health")).json()
    assert health["status"] == "ok"
    assert health["store"] == svc.settings.store.split(":")[0]
    assert health["backends"] == ["databricks", "http_webhook"]
    schema = (await svc.client.get("/schema/openapi.json")).json()
    assert {
        "/jobs",
        "/jobs/{job_id}",
        "/jobs/{job_id}/cancel",
        "/callbacks/{promise_id}",
        "/health",
    } <= set(schema["paths"])


async def test_the_memory_store_runs_jobs_to_every_end(start_service, receiver):
    finished: list[tuple[str, str]] = []

    class Finished:
        @hookimpl
        def tether_job_finished(self, job: Any) -> None:
            finished.append((job.id, job.state))

    receiver.callback = lambda hit: (
        {"status": "succeeded", "result": 1} if hit.path == "/ok" else None
    )
    svc = await start_service(plugins=[Finished()], store="memory://")
    for job_id, path, timeout in (
        ("ok", "/ok", 60),
        ("cancel", "/wait", 60),
        ("late", "/wait", 0.3),
    ):
        await svc.client.post(
            "/jobs",
            json={
                "id": job_id,
                "backend": "http_webhook",
                "timeout": timeout,
                "params": {"url": receiver.url(path)},
            },
        )
    await svc.wait_state("cancel", "running")
    assert (await svc.client.post("/jobs/cancel/cancel")).status_code == 200
    ends = {"ok": "succeeded", "cancel": "canceled", "late": "timed_out"}
    # Each workflow ran its finish step, once: the plugins heard of each end once.
    await eventually(lambda: sorted(finished) == sorted(ends.items()), holds=HOLD)
    jobs = {job_id: await svc.job(job_id) for job_id in ends}
    assert jobs["ok"]["result"] == 1
    assert jobs["cancel"]["error"] == {"message": "canceled by request", "type": "canceled"}
    assert jobs["late"]["error"]["type"] == "timeout"
    assert all(job["finished_at"] is not None for job in jobs.values())
