"""`GET /jobs` with `Accept: text/event-stream`, the stream of job changes the
dashboard's list follows: the page first, then each job that changes on it,
joins it or leaves it (and is named as gone); the list's filters hold; it
ends when the service stops."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import api.controllers
from tests.api.test_events import messages
from tests.conftest import Receiver, Service, eventually
from tests.process import wait_for
from tests.ui.parts import serve

SSE = {"accept": "text/event-stream"}


@contextlib.asynccontextmanager
async def follow(svc: Service, query: str = "") -> AsyncIterator[list[dict[str, Any]]]:
    """The jobs the stream of `GET /jobs?{query}` sent so far, growing while
    open; a job named as gone from the page (`event: left`) as `{"left": id}`,
    the page's ids (`event: page`) as `{"page": [ids]}`."""
    got: list[dict[str, Any]] = []

    async def read() -> None:
        async with svc.client.stream("GET", f"/jobs?{query}", headers=SSE, timeout=30) as answer:
            assert answer.status_code == 200
            assert answer.headers["content-type"].startswith("text/event-stream")
            async for message in messages(answer):
                data, kind = message["data"], message["event"]
                assert kind in ("job", "left", "page")
                if kind == "page":
                    got.append({"page": data["ids"]})
                else:
                    got.append(data if kind == "job" else {"left": data["id"]})

    reading = asyncio.create_task(read())
    try:
        yield got
    finally:
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading


def states(got: list[dict[str, Any]], job_id: str) -> list[str]:
    return [job["state"] for job in got if job.get("id") == job_id]


async def start(svc: Service, receiver: Receiver, job_id: str) -> None:
    body = {"id": job_id, "backend": "http_webhook", "params": {"url": receiver.url()}}
    assert (await svc.client.post("/jobs", json=body)).status_code == 201
    await svc.wait_state(job_id, "running")


async def settle(receiver: Receiver, job_id: str, **outcome: Any) -> None:
    hit = next(h for h in receiver.hits if h.body["job_id"] == job_id)
    async with httpx.AsyncClient(trust_env=False) as client:
        assert (await client.post(hit.body["callback_url"], json=outcome)).status_code == 200


async def test_the_page_then_each_change(start_service, receiver):
    svc = await start_service()
    await start(svc, receiver, "before")
    async with follow(svc, "limit=10") as got:
        await eventually(lambda: states(got, "before") == ["running"])
        await start(svc, receiver, "after")
        await eventually(lambda: states(got, "after")[-1:] == ["running"])
        await settle(receiver, "before", status="succeeded", result=1)
        await eventually(lambda: states(got, "before") == ["running", "succeeded"], holds=1.5)
    finished = got[-1]
    assert finished["result"] == 1 and finished["finished_at"] is not None
    # Every job once per change, never again while it stays as it is.
    assert [j.get("id") for j in got].count("before") == 2
    assert not any("left" in j for j in got)  # both still on the page
    assert [j for j in got if "page" in j] == [{"page": ["before"]}]  # once, after the first
    assert got.index({"page": ["before"]}) == 1


async def test_the_filters_hold_and_a_job_leaving_them_is_sent_once(start_service, receiver):
    svc = await start_service()
    async with follow(svc, "state=running&backend=http_webhook") as got:
        await start(svc, receiver, "runs")
        await eventually(lambda: states(got, "runs") == ["running"])
        await settle(receiver, "runs", status="failed", error={"message": "no"})
        await eventually(lambda: states(got, "runs") == ["running", "failed"], holds=1.5)
        assert got[-1] == {"left": "runs"}  # then named as gone
        refused = {"url": "http://127.0.0.1:9/"}  # nothing listens: the trigger fails
        body = {"id": "refused", "backend": "http_webhook", "params": refused}
        assert (await svc.client.post("/jobs", json=body)).status_code == 201
        await svc.wait_state("refused", "failed", timeout=15)
        await asyncio.sleep(1.5)  # past a read of the page
    assert states(got, "refused") == []  # never running: never on the page


async def test_a_job_pushed_off_the_page_is_named_as_gone_once(start_service, receiver):
    svc = await start_service()
    for job_id in ("oldest", "older"):
        await start(svc, receiver, job_id)
    async with follow(svc, "limit=2") as got:
        await eventually(lambda: {j["id"] for j in got if "id" in j} == {"oldest", "older"})
        assert {"page": ["older", "oldest"]} in got
        await start(svc, receiver, "newest")  # the page holds the newest two
        await eventually(lambda: {"left": "oldest"} in got)
        assert states(got, "oldest") == ["running"]  # unchanged: not sent again
        await settle(receiver, "oldest", status="succeeded")  # off the page: not sent
        await asyncio.sleep(1.5)  # past a read of the page
        assert states(got, "oldest") == ["running"]
        assert got.count({"left": "oldest"}) == 1
        assert [j for j in got if "left" in j] == [{"left": "oldest"}]


async def test_a_bad_query_is_refused_as_the_list_refuses_it(start_service):
    svc = await start_service()
    for query in ("state=sleeping", "limit=0", "cursor=nope", "colour=red"):
        answer = await svc.client.get(f"/jobs?{query}", headers=SSE)
        assert answer.status_code == 400, query
        assert answer.headers["content-type"].startswith("application/json")


def test_an_open_stream_ends_when_the_service_stops(tmp_path: Path):
    served = serve(tmp_path)
    try:
        with (
            served.client() as client,
            client.stream("GET", "/jobs", headers=SSE, timeout=30) as answer,
        ):
            assert answer.status_code == 200
            served.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            stopping = time.monotonic()
            for _ in answer.iter_lines():
                pass
            assert time.monotonic() - stopping < 5
        assert served.proc.wait(10) == -signal.SIGTERM  # type: ignore[union-attr]
    finally:
        served.kill()


def test_a_job_on_the_page_is_read_by_its_process(tmp_path: Path, receiver):
    """Two processes share the store: a change made by the other one reaches
    the stream by its reads of the page."""
    first = serve(tmp_path)
    second = serve(tmp_path)
    try:
        with (
            first.client() as reader,
            second.client() as writer,
            reader.stream("GET", "/jobs", headers=SSE, timeout=30) as answer,
        ):
            body = {"id": "elsewhere", "backend": "http_webhook", "params": {"url": receiver.url()}}
            assert writer.post("/jobs", json=body).status_code == 201
            wait_for(writer, "elsewhere", "running")
            lines = answer.iter_lines()
            assert next(lines) == "event: page"  # the page as the stream opened: empty
            assert next(lines) == 'data: {"ids":[]}'
            assert next(line for line in lines if line) == "event: job"
            assert '"id":"elsewhere"' in next(lines)
    finally:
        first.kill()
        second.kill()


async def test_a_worker_keeps_so_many_list_streams_open_and_answers_503_past_them(
    start_service, monkeypatch
):
    """A thousand open streams, each reading its page on every change, left
    the service answering nothing else (found in an audit, 2026-12-04)."""
    monkeypatch.setattr(api.controllers, "LIST_STREAMS_MAX", 2)
    svc = await start_service()

    async with follow(svc) as first, follow(svc, "state=running") as second:
        await eventually(lambda: first and second, timeout=10)  # both read their page
        assert api.controllers._StreamSlot.lists == 2
        refused = await svc.client.get("/jobs", headers=SSE)
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"] == {
            "code": "too_many_streams",
            "message": "2 job-list streams are open on this worker, the most it keeps;"
            " close one, or read pages without the stream",
            "details": {"limit": 2},
        }
        assert (await svc.client.get("/jobs")).status_code == 200  # pages still read
        # a bad filter is named first, as it would be with room
        bad = await svc.client.get("/jobs?tag=a%20b", headers=SSE)
        assert bad.status_code == 400, bad.text
        assert bad.json()["error"]["details"] == {"field": "tag"}
    await eventually(lambda: api.controllers._StreamSlot.lists == 0, timeout=10)
    async with follow(svc) as again:
        await eventually(lambda: again, timeout=10)  # room again once they closed


async def test_an_open_stream_reads_its_page_again_only_once_something_was_committed(
    start_service, receiver, monkeypatch
):
    """Each open stream read its page every second: with jobs near the body
    limit, 8 MB decoded a second a stream while nothing changed, 4% of a core
    and 20 MB each (found by a QA pass). The page is read again only once
    the index's `change_mark` moved."""
    svc = await start_service()
    if await svc.tether.jobs.change_mark() is None:
        pytest.skip("this store cannot tell cheaply whether anything was committed")
    listed = svc.tether.list_page
    reads: list[float] = []

    async def list_page(query: Any) -> Any:
        reads.append(time.monotonic())
        return await listed(query)

    monkeypatch.setattr(svc.tether, "list_page", list_page)
    await start(svc, receiver, "before")
    async with follow(svc) as got:
        await eventually(lambda: states(got, "before") == ["running"])
        await asyncio.sleep(1.5)  # the round after the first may read once more
        quiet = len(reads)
        await asyncio.sleep(3)  # three polls, nothing committed
        assert len(reads) == quiet
        await settle(receiver, "before", status="succeeded")
        await eventually(lambda: states(got, "before") == ["running", "succeeded"])
        assert len(reads) > quiet


async def test_a_stream_refused_for_want_of_room_reads_no_page_and_a_failed_read_is_tried_again(
    start_service, receiver, monkeypatch
):
    """A refused stream had read its whole page first, and many opened at once
    overran the cap; a read the store failed ended a stream with a traceback
    (found by a security QA pass). Now the room is taken before the first
    read, and a failed read is tried again at the next poll."""
    from core.errors import StoreUnavailable

    monkeypatch.setattr(api.controllers, "LIST_STREAMS_MAX", 1)
    svc = await start_service()
    listed = svc.tether.list_page
    failing = {"left": 0}

    async def list_page(query: Any) -> Any:
        if "boom" in query.tags:
            raise AssertionError("a refused stream read its page")
        if failing["left"]:
            failing["left"] -= 1
            raise StoreUnavailable("the store did not answer: TimeoutError")
        return await listed(query)

    monkeypatch.setattr(svc.tether, "list_page", list_page)
    async with follow(svc) as got:
        await eventually(lambda: got, timeout=10)  # the first page was read
        answers = await asyncio.gather(
            *(svc.client.get("/jobs?tag=boom", headers=SSE) for _ in range(20))
        )
        assert {answer.status_code for answer in answers} == {503}
        assert {answer.json()["error"]["code"] for answer in answers} == {"too_many_streams"}
        assert api.controllers._StreamSlot.lists == 1
        failing["left"] = 2  # the next two reads fail; the stream goes on
        await start(svc, receiver, "after")
        await eventually(lambda: states(got, "after"), timeout=10)
        assert failing["left"] == 0
    await eventually(lambda: api.controllers._StreamSlot.lists == 0, timeout=10)
