"""A callback's and a heartbeat's body over `core.aside.ASIDE_BYTES` is
read on the aside thread, not on the worker's event loop: decoded, checked
for its depth and masked of the job's token there (the real service, in
process). A body of many small strings that quotes the token held the loop
for 0.4 s at 64 KiB (a review, 2026-12-07)."""

from __future__ import annotations

import threading
from urllib.parse import parse_qs, urlsplit

import core.callbacks
from core.aside import ASIDE_BYTES
from core.redact import MASK
from tests.api.test_heartbeats import start_job
from tests.conftest import threads_of


async def test_a_large_callback_body_is_read_aside(start_service, receiver, monkeypatch):
    ran_on = threads_of(monkeypatch, core.callbacks, "decode_json")
    svc = await start_service()
    _, beat = await start_job(svc, receiver, "big")
    url = beat.removesuffix("/heartbeat").replace("/heartbeat?", "?")
    token = parse_qs(urlsplit(url).query)["token"][0]
    words = ["a"] * ASIDE_BYTES + [f"sent {token}"]
    answer = await svc.client.post(url, json={"status": "succeeded", "result": words})
    assert answer.status_code == 200, answer.text
    assert answer.json()["outcome"] == "accepted"
    job = await svc.job("big")
    assert job["result"] == ["a"] * ASIDE_BYTES + [f"sent {MASK}"]
    again = await svc.client.post(url, json={"status": "succeeded", "result": words})
    assert again.json()["outcome"] == "duplicate"
    assert ran_on == ["tether-aside_0"] * 2


async def test_a_large_heartbeat_is_read_aside(start_service, receiver, monkeypatch):
    ran_on = threads_of(monkeypatch, core.callbacks, "_masked_progress")
    svc = await start_service()
    _, url = await start_job(svc, receiver, "beat", heartbeat_timeout=60)
    token = parse_qs(urlsplit(url).query)["token"][0]
    words = ["a"] * (ASIDE_BYTES // 4) + [f"sent {token}"]
    answer = await svc.client.post(url, json={"progress": words})
    assert answer.status_code == 200, answer.text
    assert (await svc.job("beat"))["progress"] == ["a"] * (ASIDE_BYTES // 4) + [f"sent {MASK}"]
    small = await svc.client.post(url, json={"progress": [f"sent {token}"]})
    assert small.status_code == 200, small.text
    assert (await svc.job("beat"))["progress"] == [f"sent {MASK}"]
    assert ran_on == ["tether-aside_0", threading.current_thread().name]


async def test_heartbeats_to_one_url_keep_their_order_when_one_waits_aside(start_service, receiver):
    """A large heartbeat read aside may wait behind other work there; a
    later small one waits its turn, so the newer progress is the one kept
    (a review saw the older kept in 5 of 5 rounds)."""
    import asyncio

    from core.aside import _THREAD

    svc = await start_service()
    _, url = await start_job(svc, receiver, "order", heartbeat_timeout=60)
    busy = threading.Event()
    _THREAD.submit(busy.wait, 10)  # other work holds the thread
    try:
        large = asyncio.create_task(
            svc.client.post(url, json={"progress": ["older"] * (ASIDE_BYTES // 6)})
        )
        await asyncio.sleep(0.2)
        small = asyncio.create_task(svc.client.post(url, json={"progress": "newer"}))
        await asyncio.sleep(0.2)
    finally:
        busy.set()
    assert (await large).status_code == 200
    assert (await small).status_code == 200
    assert (await svc.job("order"))["progress"] == "newer"


async def test_a_large_row_is_decoded_aside_once_a_write(start_service, receiver, monkeypatch):
    """A duplicate of a large callback decoded the job's row five times on
    the loop (two writes, each read in its transaction, by its listeners and
    by its caller). Now its one write's row is decoded once, on the aside
    thread, and its events' listeners are still told (the duplicate is
    counted)."""
    import core.store.sql
    from tests.api.test_events import callbacks_counted

    svc = await start_service()
    _, beat = await start_job(svc, receiver, "rows")
    url = beat.removesuffix("/heartbeat").replace("/heartbeat?", "?")
    words = [[]] * ASIDE_BYTES  # a row of many small lists: slow to decode
    answer = await svc.client.post(url, json={"status": "succeeded", "result": words})
    assert answer.json()["outcome"] == "accepted"
    before = await callbacks_counted(svc)
    decoded = threads_of(monkeypatch, core.store.sql, "_row")  # (the job's row: the only one)
    again = await svc.client.post(url, json={"status": "succeeded", "result": words})
    assert again.json()["outcome"] == "duplicate"
    assert again.json()["job"]["result"] == words
    # the look before the settle, the note's write (judged by the row the
    # look read: no write that finds the job ended, no settle of the promise)
    assert decoded == ["tether-aside_0"] * 2
    assert (await callbacks_counted(svc)).get("duplicate", 0) == before.get("duplicate", 0) + 1
