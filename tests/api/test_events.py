"""`GET /jobs/{id}/events`: each kind of event for the scenario that makes it,
over real HTTP, with the http_webhook backend and a real receiver; the
server-sent-event stream; what the history never holds (bodies, tokens)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import closing
from datetime import datetime
from typing import Any

import httpx
import pytest

import api.controllers
import core.events
from core.errors import StoreUnavailable
from core.store.jobs import Event, JobRecord
from tests.conftest import Hit, Service, eventually
from tests.core.test_notify import SECRET as NOTIFY_SECRET

SSE = {"accept": "text/event-stream"}


async def start(
    svc: Service,
    receiver: Any,
    job_id: str,
    timeout: float | None = None,
    notify: str | None = None,
    **params: Any,
) -> dict[str, Any]:
    body = {"id": job_id, "backend": "http_webhook", "params": {"url": receiver.url(), **params}}
    if timeout is not None:
        body["timeout"] = timeout
    if notify is not None:
        body["notify"] = {"url": notify}
    response = await svc.client.post("/jobs", json=body)
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def callback_path(svc: Service, receiver: Any, job_id: str) -> str:
    [url] = {h.body["callback_url"] for h in receiver.hits if h.body["job_id"] == job_id}
    return str(url).removeprefix(svc.settings.base_url)


async def history(svc: Service, job_id: str, **params: Any) -> dict[str, Any]:
    response = await svc.client.get(f"/jobs/{job_id}/events", params=params)
    assert response.status_code == 200, response.text
    page: dict[str, Any] = response.json()
    return page


async def types(svc: Service, job_id: str) -> list[str]:
    return [e["type"] for e in (await history(svc, job_id))["items"]]


async def settled_history(svc: Service, job_id: str, count: int) -> list[dict[str, Any]]:
    """The job's events once there are `count` of them (and no more come)."""

    async def check() -> list[dict[str, Any]] | None:
        items: list[dict[str, Any]] = (await history(svc, job_id))["items"]
        return items if len(items) == count else None

    items: list[dict[str, Any]] = await eventually(check, holds=0.3)
    assert [e["seq"] for e in items] == list(range(1, count + 1))
    return items


async def messages(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The server-sent messages of a streamed response: id, event, data (decoded), comment."""
    message: dict[str, Any] = {}
    async for line in response.aiter_lines():
        if not line:
            if message:
                yield message
            message = {}
            continue
        field, _, value = line.partition(": ")
        if field == "":
            message["comment"] = value
        elif field == "data":
            message["data"] = json.loads(value)
        else:
            message[field] = value


PING = {"event": "ping", "data": {"type": "ping"}}
"""What a quiet stream sends every `KEEP_ALIVE` seconds."""
END = {"event": "end", "data": {"type": "end"}}
"""The message that ends a stream that has ended (not one the service stopped)."""


async def stream(
    svc: Service, job_id: str, headers: dict[str, str] | None = None, *, ends: bool = True
) -> list[Any]:
    """Every message of the job's stream, until the server ends it; with
    `ends`, the stream's last message must be `END` (left out)."""
    got: list[Any] = []
    async with svc.client.stream(
        "GET", f"/jobs/{job_id}/events", headers={**SSE, **(headers or {})}, timeout=15
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["tether-stream-ends"] == "end"
        async for message in messages(response):
            got.append(message)
    if ends:
        assert got and got[-1] == END, got[-3:]
        return got[:-1]
    assert END not in got
    return got


async def test_a_called_back_job_is_accepted_triggered_called_back_finished(
    start_service, receiver
):
    svc = await start_service()
    job = await start(svc, receiver, "j", payload={"table": "sales"})
    await svc.wait_state("j", "running")
    body = b'{"status": "succeeded", "result": {"rows": 42, "note": "private-result-text"}}'
    path = callback_path(svc, receiver, "j")
    answer = await svc.client.post(path, content=body, headers={"content-type": "application/json"})
    assert answer.json()["outcome"] == "accepted"

    items = await settled_history(svc, "j", 4)
    assert [e["type"] for e in items] == ["accepted", "triggered", "callback", "finished"]
    assert {e["attempt"] for e in items} == {1}
    accepted, triggered, called, finished = (e["data"] for e in items)
    assert accepted == {"backend": "http_webhook", "timeout": svc.settings.default_timeout}
    assert triggered == {"try": 1, "external": (await svc.job("j"))["external"]}
    assert called == {
        "verdict": "accepted",
        "status": "succeeded",
        "body_bytes": len(body),
        "body_sha256": hashlib.sha256(body).hexdigest(),
    }
    assert finished == {"state": "succeeded"}
    # times are shown as the job's are: ISO-8601 UTC, in order
    assert items[0]["at"] == job["created_at"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", items[-1]["at"])
    times = [datetime.fromisoformat(e["at"]) for e in items]  # (a whole second has no
    assert times == sorted(times)  # fraction: as text, "16Z" sorts after "16.010000Z")


async def test_every_callback_verdict_is_recorded_and_none_keeps_the_body_or_token(
    start_service, receiver
):
    svc = await start_service()
    await start(svc, receiver, "v")
    await svc.wait_state("v", "running")
    path = callback_path(svc, receiver, "v")
    token = path.partition("token=")[2]
    secret = "private-result-text"
    for body in (
        {"status": "succeeded", "result": secret},  # accepted
        {"status": "succeeded", "result": secret},  # duplicate
        {"status": "failed", "error": {"message": secret}},  # conflict
    ):
        await svc.client.post(path, json=body)
    not_json = await svc.client.post(
        path, content=b"{" + secret.encode(), headers={"content-type": "application/json"}
    )
    assert not_json.status_code == 400
    no_status = await svc.client.post(path, json={"result": secret})
    assert no_status.status_code == 422
    wrong = await svc.client.post(path.replace(token, "x" * len(token)), json={"status": "failed"})
    assert wrong.status_code == 401

    items = await settled_history(svc, "v", 8)
    calls = [e["data"] for e in items if e["type"] == "callback"]
    assert [c["verdict"] for c in calls] == [
        "accepted",
        "duplicate",
        "conflict",
        "invalid",
        "invalid",
    ]  # the wrong token's is not there
    assert [c.get("error_type") for c in calls[3:]] == ["not_json", "invalid_body"]
    assert calls[3]["body_bytes"] == len(secret) + 1
    text = (await svc.client.get("/jobs/v/events")).text
    assert secret not in text and token not in text


async def test_callbacks_that_change_nothing_are_recorded_once_a_minute_with_a_count(
    start_service, receiver, monkeypatch
):
    """A finished job's URL posted in a loop filed an event each, and pushed
    everything but the job's first events out of its bounded history (found
    by a security QA pass). Each verdict that changes nothing is recorded
    once per `REPEAT_EVENT_EVERY`, the next one saying how many were left
    out; every one is still answered as before."""
    import core.callbacks

    svc = await start_service()
    await start(svc, receiver, "loop")
    await svc.wait_state("loop", "running")
    path = callback_path(svc, receiver, "loop")
    assert (await svc.client.post(path, json={"status": "succeeded"})).status_code == 200
    before = await callbacks_counted(svc)
    for _ in range(30):
        assert (await svc.client.post(path, json={"status": "succeeded"})).status_code == 200
        assert (await svc.client.post(path, json={"status": "failed"})).status_code == 409
        assert (await svc.client.post(path, json={"result": 1})).status_code == 422
    counted = await callbacks_counted(svc)
    monkeypatch.setattr(core.callbacks, "REPEAT_EVENT_EVERY", 0.0)  # a minute later, as it were
    assert (await svc.client.post(path, json={"status": "succeeded"})).status_code == 200
    items = (await history(svc, "loop"))["items"]
    calls = [
        (e["data"]["verdict"], e["data"].get("repeats")) for e in items if e["type"] == "callback"
    ]
    assert calls == [
        ("accepted", None),
        ("duplicate", None),
        ("conflict", None),
        ("invalid", None),
        ("duplicate", 29),
    ]
    for verdict in ("duplicate", "conflict", "invalid"):  # every one counted
        assert counted[verdict] - before.get(verdict, 0) == 30, (verdict, before, counted)


async def test_a_repeat_whose_write_failed_is_counted_by_the_next_one_recorded(
    start_service, receiver
):
    """The store fails writing a repeat's event: the next repeat is recorded
    (not left out for a minute), counting the lost one."""
    svc = await start_service()
    await start(svc, receiver, "lost")
    await svc.wait_state("lost", "running")
    path = callback_path(svc, receiver, "lost")
    assert (await svc.client.post(path, json={"status": "succeeded"})).status_code == 200
    jobs = svc.tether.callbacks.jobs
    real = jobs.record

    async def failing(*args: Any, **kwargs: Any) -> Any:
        raise StoreUnavailable("the embedded store failed: disk I/O error")

    jobs.record = failing
    try:
        assert (await svc.client.post(path, json={"result": 1})).status_code == 503
    finally:
        jobs.record = real
    for _ in range(3):
        assert (await svc.client.post(path, json={"result": 1})).status_code == 422
    items = (await history(svc, "lost"))["items"]
    calls = [
        (e["data"]["verdict"], e["data"].get("repeats")) for e in items if e["type"] == "callback"
    ]
    assert calls == [("accepted", None), ("invalid", 1)]


async def callbacks_counted(svc: Service) -> dict[str, float]:
    """`tether_callbacks_total` by verdict, as `/metrics` says now."""
    text = (await svc.client.get("/metrics")).text
    found = re.findall(r'^tether_callbacks_total\{verdict="(\w+)"\} (\S+)$', text, re.M)
    return {verdict: float(value) for verdict, value in found}


async def test_a_wrong_token_records_nothing(start_service, receiver):
    svc = await start_service()
    await start(svc, receiver, "w")
    await svc.wait_state("w", "running")
    path = callback_path(svc, receiver, "w")
    for _ in range(5):
        wrong = path[:-3] + "abc"
        assert (await svc.client.post(wrong, json={"status": "succeeded"})).status_code == 401
    await settled_history(svc, "w", 2)


async def test_cancel_records_the_request_with_its_reason_then_the_end(start_service, receiver):
    svc = await start_service()
    await start(svc, receiver, "c")
    await svc.wait_state("c", "running")
    response = await svc.client.post("/jobs/c/cancel", json={"reason": "  wrong table "})
    assert response.status_code == 200
    path = callback_path(svc, receiver, "c")
    late = b'{"status": "succeeded"}'
    gone = await svc.client.post(path, content=late, headers={"content-type": "application/json"})
    assert gone.status_code == 410
    items = await settled_history(svc, "c", 5)
    assert [(e["type"], e["data"]) for e in items[2:]] == [
        ("cancel_requested", {"reason": "wrong table"}),
        ("finished", {"state": "canceled", "error_type": "canceled"}),
        (
            "callback",
            {
                "verdict": "gone",
                "status": "succeeded",
                "body_bytes": len(late),
                "body_sha256": hashlib.sha256(late).hexdigest(),
            },
        ),
    ]


async def test_a_job_past_its_deadline_records_timed_out(start_service, receiver):
    svc = await start_service()
    await start(svc, receiver, "t", timeout=0.5)
    await svc.wait_state("t", "timed_out")
    items = await settled_history(svc, "t", 4)
    assert [(e["type"], e["data"]) for e in items[2:]] == [
        ("timed_out", {"timeout": 0.5}),
        ("finished", {"state": "timed_out", "error_type": "timeout"}),
    ]


async def test_a_failing_trigger_records_each_try(start_service, receiver):
    tries: list[Hit] = []

    def respond(hit: Hit) -> tuple[int, Any]:
        tries.append(hit)
        if len(tries) < 3:
            return 503, {"busy": True}, {"retry-after": "0"}
        return 202, {"run": 9}

    receiver.respond = respond
    svc = await start_service(trigger_attempts=4)
    await start(svc, receiver, "r")
    await svc.wait_state("r", "running")
    items = await settled_history(svc, "r", 4)
    assert [e["type"] for e in items] == [
        "accepted",
        "trigger_failed",
        "trigger_failed",
        "triggered",
    ]
    first, second = items[1]["data"], items[2]["data"]
    assert (first["try"], second["try"], items[3]["data"]["try"]) == (1, 2, 3)
    assert first["retry_in"] == pytest.approx(0.05) and second["retry_in"] == pytest.approx(0.1)
    assert first["error"] == {"type": "http_503", "message": first["error"]["message"]}
    assert "503" in first["error"]["message"]
    assert {e["attempt"] for e in items} == {1}


async def test_a_trigger_that_gives_up_records_no_retry_and_the_failure(start_service, receiver):
    receiver.respond = lambda hit: (503, {"busy": True})
    svc = await start_service(trigger_attempts=2)
    await start(svc, receiver, "g")
    await svc.wait_state("g", "failed")
    items = await settled_history(svc, "g", 4)
    assert [e["type"] for e in items] == [
        "accepted",
        "trigger_failed",
        "trigger_failed",
        "finished",
    ]
    assert items[1]["data"]["retry_in"] is not None
    assert items[2]["data"]["try"] == 2 and items[2]["data"]["retry_in"] is None
    assert set(items[2]["data"]["error"]) == {"type", "message"}
    job = await svc.job("g")
    assert items[3]["data"] == {"state": "failed", "error_type": job["error"]["type"]}


async def test_status_checks_record_what_the_backend_said(start_service, receiver):
    said = ["running", "running"]

    def respond(hit: Hit) -> tuple[int, Any]:
        if hit.path == "/status":
            return 200, {"status": said.pop(0) if said else "succeeded", "result": 5}
        return 202, {}

    receiver.respond = respond
    svc = await start_service()
    await start(svc, receiver, "s", status_url=receiver.url("/status"), status_interval=0.1)
    await svc.wait_state("s", "succeeded", timeout=20)
    items = (await history(svc, "s"))["items"]
    checks = [e["data"] for e in items if e["type"] == "status_check"]
    assert checks[-1] == {"said": "ended", "status": "succeeded"}
    assert checks[:-1] and all(c == {"said": "running"} for c in checks[:-1])
    assert [e["type"] for e in items][-2:] == ["status_check", "finished"]


async def test_pages_go_oldest_first_and_refuse_what_they_do_not_take(start_service, receiver):
    svc = await start_service()
    await start(svc, receiver, "p")
    await svc.wait_state("p", "running")
    await svc.client.post(callback_path(svc, receiver, "p"), json={"status": "succeeded"})
    await settled_history(svc, "p", 4)
    first = await history(svc, "p", limit=3)
    assert [e["seq"] for e in first["items"]] == [1, 2, 3] and first["dropped"] == 0
    rest = await history(svc, "p", limit=3, cursor=first["next_cursor"])
    assert [e["seq"] for e in rest["items"]] == [4] and rest["next_cursor"] is None

    unknown = await svc.client.get("/jobs/nope/events")
    assert unknown.status_code == 404
    assert (await svc.client.get("/jobs/nope/events", headers=SSE)).status_code == 404
    for query, field in (
        ("?limit=0", "limit"),
        ("?cursor=zz", "cursor"),
        ("?state=running", "state"),
        ("?limit=2&limit=3", "limit"),
    ):
        refused = await svc.client.get(f"/jobs/p/events{query}")
        assert refused.status_code == 400, (query, refused.text)
        assert field in refused.text


async def test_the_stream_sends_history_then_live_events_and_ends_after_finished(
    start_service, receiver
):
    svc = await start_service()
    await start(svc, receiver, "live")
    await svc.wait_state("live", "running")
    await settled_history(svc, "live", 2)
    reading = asyncio.create_task(stream(svc, "live"))
    await asyncio.sleep(0.5)
    assert not reading.done()
    await svc.client.post(callback_path(svc, receiver, "live"), json={"status": "succeeded"})
    got = await asyncio.wait_for(reading, 10)
    assert [(m["id"], m["event"]) for m in got] == [
        ("1", "accepted"),
        ("2", "triggered"),
        ("3", "callback"),
        ("4", "finished"),
    ]
    assert [m["data"] for m in got] == (await history(svc, "live"))["items"]

    # resuming after the second event: the rest, nothing twice; after the last: nothing
    resumed = await stream(svc, "live", {"last-event-id": "2"})
    assert [m["id"] for m in resumed] == ["3", "4"]
    assert await stream(svc, "live", {"last-event-id": "4"}) == []
    bad = await svc.client.get("/jobs/live/events", headers={**SSE, "last-event-id": "x"})
    assert bad.status_code == 400


async def test_a_quiet_stream_sends_pings(start_service, receiver, monkeypatch):
    """An event, not a comment: a browser's EventSource dispatches no
    comment, so a page could not tell a quiet service from a hung one."""
    monkeypatch.setattr(core.events, "KEEP_ALIVE", 0.3)
    svc = await start_service()
    await start(svc, receiver, "quiet")
    await svc.wait_state("quiet", "running")
    got: list[dict[str, Any]] = []
    upper = {"accept": "TEXT/EVENT-STREAM"}  # media types are case-insensitive
    async with svc.client.stream("GET", "/jobs/quiet/events", headers=upper) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        async for message in messages(response):
            got.append(message)
            if got.count(PING) == 2:
                break
    assert [m.get("event") for m in got[:2]] == ["accepted", "triggered"]
    assert got[2:] == [PING, PING]


async def test_open_streams_read_their_job_again_only_once_something_was_committed(
    start_service, receiver
):
    """Each open stream read its job's events three times a second: a
    thousand on one waiting job took a third of a core with nothing to send
    (measured, 2026-12-06). One look at the store's change mark now wakes
    every stream of the process once anything was committed, by any
    connection; this process's own events wake their streams at once."""
    svc = await start_service()
    if await svc.tether.jobs.change_mark() is None:
        pytest.skip("this store cannot tell cheaply whether anything was committed")
    await start(svc, receiver, "idle")
    await svc.wait_state("idle", "running")
    await settled_history(svc, "idle", 2)
    jobs = svc.tether.events.jobs
    real = jobs.events_after
    reads: list[float] = []

    async def counted(*args: Any, **kwargs: Any) -> Any:
        reads.append(time.monotonic())
        return await real(*args, **kwargs)

    jobs.events_after = counted
    streams = [asyncio.create_task(stream(svc, "idle")) for _ in range(5)]
    try:
        await eventually(lambda: len(reads) >= 5)
        await asyncio.sleep(1.0)  # the first look at the mark wakes them once
        quiet = len(reads)
        await asyncio.sleep(2.0)  # six looks: 30 reads before
        # none, or one each per commit of the store's process beat (every few
        # seconds; two may fall in the window on a slow machine)
        assert len(reads) - quiet <= 10
        # A commit by another connection (as another process's would be):
        # each stream reads once more, and sends nothing new.
        before = len(reads)
        store = svc.settings.index or svc.settings.store
        with closing(sqlite3.connect(store.removeprefix("sqlite:///"))) as db, db:
            db.execute("CREATE TABLE test_poke (x)")
        await eventually(lambda: len(reads) >= before + 5, timeout=5)
        assert not any(task.done() for task in streams)
        await svc.client.post(callback_path(svc, receiver, "idle"), json={"status": "succeeded"})
        got = await asyncio.wait_for(asyncio.gather(*streams), 10)
    finally:
        jobs.events_after = real
        for task in streams:
            task.cancel()
    assert [[m["event"] for m in messages] for messages in got] == [
        ["accepted", "triggered", "callback", "finished"]
    ] * 5


async def test_where_the_store_cannot_tell_a_change_each_stream_reads_on_its_own_timer(
    start_service, receiver, monkeypatch
):
    """Postgres has no cheap change mark (`change_mark` is None): there each
    stream reads its job every `POLL_INTERVAL` on its own, so events other
    processes file still arrive within it."""
    svc = await start_service()
    jobs = svc.tether.events.jobs

    async def unmarked() -> None:
        return None

    monkeypatch.setattr(jobs, "change_mark", unmarked)
    await start(svc, receiver, "unmarked")
    await svc.wait_state("unmarked", "running")
    await settled_history(svc, "unmarked", 2)
    real = jobs.events_after
    reads: list[float] = []

    async def counted(*args: Any, **kwargs: Any) -> Any:
        reads.append(time.monotonic())
        return await real(*args, **kwargs)

    monkeypatch.setattr(jobs, "events_after", counted)
    streams = [asyncio.create_task(stream(svc, "unmarked")) for _ in range(2)]
    try:
        await eventually(lambda: len(reads) >= 2)
        await asyncio.sleep(0.5)
        quiet = len(reads)
        await asyncio.sleep(2.0)  # about 13 reads in all
        assert len(reads) - quiet >= 8, reads
        await svc.client.post(
            callback_path(svc, receiver, "unmarked"), json={"status": "succeeded"}
        )
        got = await asyncio.wait_for(asyncio.gather(*streams), 10)
    finally:
        for task in streams:
            task.cancel()
    assert [[m["event"] for m in messages] for messages in got] == [
        ["accepted", "triggered", "callback", "finished"]
    ] * 2


# ── past `finished`: the events still due ─────────────────────────────────────


def answering(**paths: list[tuple[float, int]]) -> Any:
    """A `Receiver.respond` answering a path's requests (path without its
    leading slash) with its (seconds held, status) pairs in turn, the last
    one ever after; anything else as a webhook backend takes a trigger."""

    def respond(hit: Hit) -> tuple[Any, ...]:
        answers = paths.get(hit.path.lstrip("/"))
        if not answers:
            return 202, {"accepted": True}
        held, status = answers.pop(0) if len(answers) > 1 else answers[0]
        time.sleep(held)
        return status, {}

    return respond


async def test_streams_past_the_workers_share_of_open_files_are_refused(
    start_service, receiver, monkeypatch
):
    """History streams count against a worker's open files, list streams
    with them: a thousand held under the usual limit of 1,024 left none for
    a trigger's request (tests/system/test_open_files.py). One for a job
    that does not exist gives its place back."""
    monkeypatch.setattr(api.controllers, "streams_max", lambda: 2)
    svc = await start_service()
    await start(svc, receiver, "held")
    first = await streamed_until_running(svc, "held")
    second = asyncio.create_task(stream(svc, "held"))
    await eventually(lambda: api.controllers._StreamSlot.open == 2, timeout=10)
    refused = await svc.client.get("/jobs/held/events", headers=SSE)
    assert refused.status_code == 503, refused.text
    assert refused.headers["retry-after"] == "1"
    assert refused.headers["connection"] == "close"  # its file given back too
    assert refused.json()["error"] == {
        "code": "too_many_streams",
        "message": "2 streams (job lists' and histories') are open on this worker, the most"
        " it keeps; close one, or read pages without the stream",
        "details": {"limit": 2},
    }
    assert (await svc.client.get("/jobs", headers=SSE)).status_code == 503
    assert (await svc.client.get("/jobs/held/events")).status_code == 200  # pages still read
    await svc.client.post(callback_path(svc, receiver, "held"), json={"status": "succeeded"})
    await asyncio.wait_for(asyncio.gather(first, second), 15)  # both ended with the job
    await eventually(lambda: api.controllers._StreamSlot.open == 0, timeout=10)
    missing = await svc.client.get("/jobs/nobody/events", headers=SSE)
    assert missing.status_code == 404
    assert api.controllers._StreamSlot.open == 0
    assert (await stream(svc, "held"))[-1]["event"] == "finished"  # room again


async def streamed_until_running(svc: Service, job_id: str) -> asyncio.Task[list[Any]]:
    """The job's stream, read in the background from once it runs."""
    await svc.wait_state(job_id, "running")
    await settled_history(svc, job_id, 2)
    reading = asyncio.create_task(stream(svc, job_id))
    await asyncio.sleep(0.3)
    assert not reading.done()
    return reading


async def test_the_stream_goes_on_past_finished_until_the_notification_is_delivered(
    start_service, receiver, monkeypatch
):
    """The completion notification's receiver answers late, and 503 the
    first time: the stream shows `finished`, keeps alive while the first try
    waits, shows both tries, and only then ends."""
    monkeypatch.setattr(core.events, "KEEP_ALIVE", 0.3)
    svc = await start_service(notify_secret=NOTIFY_SECRET, notify_backoff=0.3)
    receiver.respond = answering(notify=[(1.2, 503), (0.5, 200)])
    await start(svc, receiver, "told", notify=receiver.url("/notify"))
    reading = await streamed_until_running(svc, "told")
    await svc.client.post(callback_path(svc, receiver, "told"), json={"status": "succeeded"})
    got = await asyncio.wait_for(reading, 15)
    sent = [m for m in got if m != PING]
    assert [m["event"] for m in sent] == [
        "accepted",
        "triggered",
        "callback",
        "finished",
        "notified",
        "notified",
    ]
    assert [m["data"]["data"]["status"] for m in sent[4:]] == [503, 200]
    assert sent[-1]["data"]["data"]["try"] == 2
    after_finished = got[got.index(sent[3]) + 1 :]
    assert PING in after_finished[: after_finished.index(sent[4])]
    assert [m["data"] for m in sent] == (await history(svc, "told"))["items"]  # all, in order


async def test_the_stream_ends_with_notify_failed_when_the_notification_is_given_up(
    start_service, receiver
):
    svc = await start_service(notify_secret=NOTIFY_SECRET, notify_backoff=0.2, notify_retry_for=1)
    receiver.respond = answering(notify=[(0.0, 502)])
    await start(svc, receiver, "unheard", notify=receiver.url("/notify"))
    reading = await streamed_until_running(svc, "unheard")
    await svc.client.post(callback_path(svc, receiver, "unheard"), json={"status": "failed"})
    got = await asyncio.wait_for(reading, 15)
    kinds = [m["event"] for m in got]
    assert kinds[:4] == ["accepted", "triggered", "callback", "finished"]
    assert kinds[-1] == "notify_failed"
    assert set(kinds[4:-1]) == {"notified"} and len(kinds) >= 7
    assert [m["data"] for m in got] == (await history(svc, "unheard"))["items"]
    # opened again after the end, the outbox empty: over at once
    assert await stream(svc, "unheard", {"last-event-id": got[-1]["id"]}) == []


async def test_a_canceled_jobs_stream_shows_that_its_run_could_not_be_stopped(
    start_service, receiver
):
    """The backend's cancel is refused, after a while: `cancel_failed` comes
    after `finished`, and the stream waits for it (the attempt's workflow
    has yet to return) before it ends."""
    svc = await start_service()
    receiver.respond = answering(cancel=[(1.0, 400)])
    await start(svc, receiver, "unstoppable", cancel_url=receiver.url("/cancel"))
    reading = await streamed_until_running(svc, "unstoppable")
    assert (await svc.client.post("/jobs/unstoppable/cancel", json={})).status_code == 200
    got = await asyncio.wait_for(reading, 15)
    assert [m["event"] for m in got] == [
        "accepted",
        "triggered",
        "cancel_requested",
        "finished",
        "cancel_failed",
    ]
    failed = got[-1]["data"]["data"]
    assert failed["tries"] == 1 and failed["error"]["type"] == "http_400", failed
    assert [m["data"] for m in got] == (await history(svc, "unstoppable"))["items"]


async def test_with_nothing_due_after_finished_the_stream_ends_with_it(start_service, receiver):
    """No notification, and a cancel the backend took: nothing comes after
    `finished`, and the stream ends with it, as a succeeded job's does."""
    svc = await start_service()
    await start(svc, receiver, "quiet-end", cancel_url=receiver.url("/cancel"))
    reading = await streamed_until_running(svc, "quiet-end")
    assert (await svc.client.post("/jobs/quiet-end/cancel", json={})).status_code == 200
    got = await asyncio.wait_for(reading, 5)
    assert [m["event"] for m in got] == ["accepted", "triggered", "cancel_requested", "finished"]
    assert receiver.on("/cancel")  # the run was stopped before the stream ended
    assert await settled_history(svc, "quiet-end", 4)


async def test_listeners_hear_each_event_with_the_job_as_it_became(start_service, receiver):
    svc = await start_service()
    heard: list[tuple[str, str, int]] = []

    def listener(rec: JobRecord, event: Event) -> None:
        heard.append((event.type, rec.state, rec.events))

    def broken(rec: JobRecord, event: Event) -> None:
        raise RuntimeError("a listener's bug")

    svc.tether.events.listeners.extend([broken, listener])
    await start(svc, receiver, "l")
    await svc.wait_state("l", "running")
    await svc.client.post(callback_path(svc, receiver, "l"), json={"status": "failed"})
    await svc.wait_state("l", "failed")
    await eventually(lambda: len(heard) == 4)
    assert heard == [
        ("accepted", "pending", 1),
        ("triggered", "running", 2),
        ("callback", "failed", 4),
        ("finished", "failed", 4),
    ]


async def test_a_store_error_mid_stream_closes_it_without_its_end(start_service, receiver, caplog):
    """The store fails while a stream is open: the stream is closed (no `end`:
    the client resumes it), with one warning line, not an ASGI traceback."""
    svc = await start_service()
    await start(svc, receiver, "shaky")
    await svc.wait_state("shaky", "running")
    jobs = svc.tether.events.jobs
    real = jobs.events_after
    calls = 0

    async def failing(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls >= 2:
            raise StoreUnavailable("the embedded store failed: disk I/O error")
        return await real(*args, **kwargs)

    jobs.events_after = failing
    try:
        got = await asyncio.wait_for(stream(svc, "shaky", ends=False), 10)
    finally:
        jobs.events_after = real
    assert [m["event"] for m in got] == ["accepted", "triggered"]
    said = [r.getMessage() for r in caplog.records if "event stream stopped" in r.getMessage()]
    assert said == ["job shaky: its event stream stopped (StoreUnavailable): resumed"]
