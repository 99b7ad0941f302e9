"""`TETHER_MAX_RESULT_BYTES` on the `http_webhook` backend: a result larger than
the bound, reported by callback or found by a status check, is stored cut and
marked (core/bounds.py), never whole; the same callback again is still a
duplicate."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import msgspec

from tests.conftest import Hit

BOUND = 2048


def webhook_job(job_id: str, url: str, **params: Any) -> dict[str, Any]:
    return {"id": job_id, "backend": "http_webhook", "params": {"url": url, **params}}


def stored_size(value: Any) -> int:
    return len(msgspec.json.encode(value))


async def test_a_callback_result_past_the_bound_is_cut_and_marked(start_service, receiver):
    svc = await start_service(max_result_bytes=BOUND)
    await svc.client.post("/jobs", json=webhook_job("big", receiver.url()))
    await svc.wait_state("big", "running")
    url = receiver.hits[0].body["callback_url"]
    rows = [{"id": n, "name": f'row "{n}" é'} for n in range(200)]  # ~5 KB, quotes to escape
    whole = msgspec.json.encode(rows)
    assert len(whole) > 2 * BOUND

    answer = await svc.client.post(url, json={"status": "succeeded", "result": rows})
    assert answer.status_code == 200 and answer.json()["outcome"] == "accepted"
    job = await svc.job("big")
    result = job["result"]
    assert result["truncated"] is True
    assert result["bytes"] == len(whole)
    assert result["sha256"] == hashlib.sha256(whole).hexdigest()
    assert whole.decode().startswith(result["preview"]) and len(result["preview"]) > BOUND // 4
    assert stored_size(result) <= BOUND
    assert answer.json()["job"]["result"] == result

    again = await svc.client.post(url, json={"status": "succeeded", "result": rows})
    assert again.json()["outcome"] == "duplicate"  # cut the same way: the same outcome
    other = await svc.client.post(url, json={"status": "succeeded", "result": rows[::-1]})
    assert other.status_code == 409 and other.json()["outcome"] == "conflict"
    assert (await svc.job("big"))["result"] == result


async def test_a_result_within_the_bound_is_kept_whole(start_service, receiver):
    svc = await start_service(max_result_bytes=BOUND)
    await svc.client.post("/jobs", json=webhook_job("small", receiver.url()))
    await svc.wait_state("small", "running")
    url = receiver.hits[0].body["callback_url"]
    result = {"text": "x" * (BOUND - 20)}
    assert stored_size(result) <= BOUND
    await svc.client.post(url, json={"status": "succeeded", "result": result})
    assert (await svc.job("small"))["result"] == result


async def test_a_long_error_message_is_cut_saying_so(start_service, receiver):
    svc = await start_service(max_result_bytes=BOUND)
    await svc.client.post("/jobs", json=webhook_job("err", receiver.url()))
    await svc.wait_state("err", "running")
    url = receiver.hits[0].body["callback_url"]
    message = "é" * 3000  # 6000 bytes
    await svc.client.post(url, json={"status": "failed", "error": {"message": message}})
    error = (await svc.job("err"))["error"]
    assert error["message"].endswith("… (cut from 6000 bytes)")
    assert message.startswith(error["message"].split("…")[0])
    assert len(error["message"].encode()) <= BOUND


async def test_a_status_check_result_past_the_bound_is_cut_too(start_service, receiver):
    text = "ab\n" * 2000

    def respond(hit: Hit) -> tuple[int, Any]:
        if hit.path == "/status":
            return 200, {"status": "succeeded", "result": text}
        return 202, {}

    receiver.respond = respond
    svc = await start_service(max_result_bytes=BOUND)
    status_url = receiver.url("/status")
    job = webhook_job("polled", receiver.url(), status_url=status_url, status_interval=0.1)
    await svc.client.post("/jobs", json=job)
    result = (await svc.wait_state("polled", "succeeded"))["result"]
    assert result["truncated"] is True and result["bytes"] == len(json.dumps(text))
    assert text.startswith(result["preview"])  # a string's preview is its text
    assert stored_size(result) <= BOUND
