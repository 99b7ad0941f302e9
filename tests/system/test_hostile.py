"""Hostile input: each gets a clear 4xx and changes nothing."""

from __future__ import annotations

from urllib.parse import unquote

import msgspec
import pytest

from core.models import Job, Trigger
from core.tokens import CallbackSigner
from tests.api.test_callbacks import started

DEEP = "[" * 50_000 + "]" * 50_000


@pytest.mark.parametrize(
    ("content", "content_type", "status"),
    [
        (
            '{"backend": "http_webhook", "params": {"url": "http://x", "payload": ' + DEEP + "}}",
            "application/json",
            400,
        ),
        ('{"backend": "http_webhook", "params": {"url": "http://x"}}', "text/plain", 415),
        ("backend=http_webhook", "application/x-www-form-urlencoded", 415),
        (
            '{"backend": "http_webhook", "params": {"url": "http://x"}, "timeout": 1e400}',
            "application/json",
            400,
        ),
        (
            '{"backend": "http_webhook", "params": {"url": "http://x"}, "timeout": NaN}',
            "application/json",
            400,
        ),
        ("null", "application/json", 400),
        (b"\xc3\x28", "application/json", 400),
    ],
)
async def test_hostile_job_requests_are_refused_and_change_nothing(
    start_service, receiver, content, content_type, status
):
    svc = await start_service()
    body = content.encode() if isinstance(content, str) else content
    response = await svc.client.post("/jobs", content=body, headers={"content-type": content_type})
    assert response.status_code == status, response.text
    assert response.json()["error"]["message"]
    if status == 400:
        field = "timeout" if b"1e400" in body else "body"  # out of range: its field is named
        deep = {"limit_depth": 64} if DEEP.encode() in body else {}  # `api.errors.too_deep`
        assert response.json()["error"]["details"] == {"field": field, "in": "body", **deep}
    assert (await svc.client.get("/jobs")).json()["items"] == []
    assert receiver.hits == []


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/jobs/..%2F..%2Fetc%2Fpasswd", 404),
        ("/jobs/a%2Fb", 404),
        ("/jobs/%00", 404),
        ("/jobs/" + "x" * 3000, 404),
        # the id this path routes to is not one a token can be made for: its
        # token is wrong, and a wrong token is 401 whatever the promise
        ("/callbacks/%2F..%2F?token=x", 401),
        ("/callbacks/..%2F..%2Fjobs%3A1", 404),  # with the token made for that id
    ],
)
async def test_odd_paths_are_404_and_odd_callbacks_401(start_service, path, status):
    svc = await start_service()  # no API token: no path asks for one
    if path.startswith("/jobs"):
        response = await svc.client.get(path)
    else:
        if "?token=" not in path:
            signer = CallbackSigner(svc.settings.callback_secret, svc.settings.base_url)
            path = signer.url(unquote(path.removeprefix("/callbacks/")))
            path = path.removeprefix(svc.settings.base_url)
        response = await svc.client.post(path, json={"status": "succeeded"})
    assert response.status_code == status
    code = {401: "unauthorized", 404: "not_found"}[status]
    assert response.json()["error"]["code"] == code


async def test_a_deeply_nested_callback_is_refused(start_service, receiver):
    svc = await start_service()
    path = await started(svc, receiver)
    response = await svc.client.post(
        path, content=DEEP.encode(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert "nested more than 64 levels deep" in response.json()["error"]["message"]
    assert (await svc.job("cb"))["state"] == "running"


async def test_secrets_never_reach_job_records_or_listings(start_service, receiver, caplog):
    caplog.set_level("DEBUG")
    svc = await start_service(callback_secret="very-secret-key", api_token="api-token-123")
    headers = {"authorization": "Bearer api-token-123"}
    svc.client.headers.update(headers)
    receiver.respond = lambda hit: (200, {"echo": hit.body, "headers": hit.headers})
    await svc.client.post(
        "/jobs",
        headers=headers,
        json={"id": "s", "backend": "http_webhook", "params": {"url": receiver.url()}},
    )
    job = await svc.wait_state("s", "running")
    token = receiver.hits[0].body["callback_url"].split("token=")[1]
    texts = [
        str(job),
        (await svc.client.get("/jobs", headers=headers)).text,
        caplog.text,
        repr(svc.tether),
        repr(svc.tether.signer),
        repr(svc.settings),
        repr(
            Trigger(
                job=msgspec.convert(job, Job),
                params=None,
                promise_id="s:1",
                callback_url=receiver.hits[0].body["callback_url"],
                idempotency_key="k",
            )
        ),
    ]
    for text in texts:
        for secret in ("very-secret-key", token, "api-token-123"):
            assert secret not in text


async def test_oversized_headers_are_refused_and_the_service_goes_on(start_service):
    import asyncio
    import socket

    svc = await start_service()

    def send_raw(size: int) -> bytes:
        with socket.create_connection(("127.0.0.1", svc.settings.port), timeout=5) as conn:
            conn.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * size + b"\r\n\r\n")
            return conn.recv(64)

    answer = await asyncio.to_thread(send_raw, 1_000_000)
    assert answer.startswith(b"HTTP/1.1 400")
    answer = await asyncio.to_thread(send_raw, 70_000)  # just past the 64 KiB bound
    assert answer.startswith(b"HTTP/1.1 400")
    answer = await asyncio.to_thread(send_raw, 30_000)  # big, but allowed
    assert answer.startswith(b"HTTP/1.1 200")
    assert (await svc.client.get("/health")).status_code == 200


def _raw(port: int, *parts: bytes, pause: float = 0.0, wait: float = 5.0) -> tuple[bytes, float]:
    """Send `parts` to the service, `pause` seconds apart; what it answered
    until it closed the connection, and the seconds that took."""
    import socket
    import time

    began = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as conn:
        for part in parts:
            try:
                conn.sendall(part)
            except (BrokenPipeError, ConnectionResetError):  # it answered and closed
                break
            time.sleep(pause)
        answer = b""
        try:
            while chunk := conn.recv(4096):
                answer += chunk
        except ConnectionResetError:  # it closed with our bytes unread: what came is kept
            pass
    return answer, time.monotonic() - began


async def test_a_request_that_does_not_arrive_in_time_is_dropped_and_the_service_goes_on(
    start_service, monkeypatch
):
    """uvicorn bounds only the idle time between requests: a connection that
    sent nothing, or a head a byte at a time, was held for ever (found in an
    audit, 2026-12-04). A request must now arrive whole within
    `READ_TIMEOUT`: a head still incomplete gets 408 in the API's JSON, a
    body still incomplete is dropped, and the service goes on."""
    import asyncio

    from api import http

    monkeypatch.setattr(http, "READ_TIMEOUT", 0.6)
    svc = await start_service()
    port = svc.settings.port

    silent, took = await asyncio.to_thread(_raw, port)
    assert silent.startswith(b"HTTP/1.1 408 "), silent
    assert took > 0.5
    head, _, body = silent.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head and b"connection: close" in head
    assert msgspec.json.decode(body)["error"]["code"] == "request_timeout"

    trickle = [bytes([b]) for b in b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"]
    slow, _ = await asyncio.to_thread(_raw, port, *trickle, pause=0.05)  # 34 bytes: 1.7 s
    assert slow.startswith(b"HTTP/1.1 408 "), slow  # (a 200 had it waited for them all)

    head_only = b"POST /jobs HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
    partial, _ = await asyncio.to_thread(
        _raw, port, head_only + b"content-length: 100\r\n\r\n", b'{"backend"'
    )
    assert partial == b""  # the app was reading its body: the connection just closes

    # in time, though slowly, and one after the other on one connection: answered
    steady = [b"GET /health HTTP/1.1\r\n", b"Host: x\r\n\r\n"] * 2
    answered, _ = await asyncio.to_thread(_raw, port, *steady, pause=0.2, wait=10)
    assert answered.count(b"HTTP/1.1 200 ") == 2, answered
    assert (await svc.client.get("/jobs")).json()["items"] == []
    assert (await svc.client.get("/health")).status_code == 200


async def test_a_request_the_parser_refuses_is_answered_in_the_apis_json(start_service):
    import asyncio

    svc = await start_service()
    answer, _ = await asyncio.to_thread(_raw, svc.settings.port, b"NOT HTTP AT ALL\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request") and b"application/json" in head
    error = msgspec.json.decode(body)["error"]
    assert error == {"code": "invalid_request", "message": "Invalid HTTP request received."}
