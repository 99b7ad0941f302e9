"""The access log: one line per request, without query strings; refused
callbacks name the promise and the client, never the token."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from api.access import PATH_SHOWN, _client
from core.settings import Settings
from tests.conftest import eventually


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name} {record.levelname} {record.getMessage()}")


@pytest.fixture
def access() -> Iterator[list[str]]:
    handler = Capture()
    logger = logging.getLogger("tether.access")
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)


async def test_one_line_per_request_without_the_query_string(start_service, access):
    svc = await start_service()
    token = svc.tether.signer.token("nope:1")
    assert (await svc.client.get("/jobs?state=running&limit=5")).status_code == 200
    assert (await svc.client.get("/no/such/route?x=1")).status_code == 404
    unknown = await svc.client.post(f"/callbacks/nope:1?token={token}", json={"status": "failed"})
    assert unknown.status_code == 404
    forged = await svc.client.post("/callbacks/job-7:1?token=forged-token", json={})
    assert forged.status_code == 401
    bearer = await svc.client.post(
        "/callbacks/job-8:1", headers={"Authorization": "Bearer forged-bearer"}, json={}
    )
    assert bearer.status_code == 401
    beat = await svc.client.post("/callbacks/job-9:1/heartbeat?token=forged-beat", json={})
    assert beat.status_code == 401

    lines = [line for line in access if " INFO " in line]
    assert [line.rsplit(" ", 4)[0] for line in lines] == [
        "tether.access INFO GET /jobs 200",
        "tether.access INFO GET /no/such/route 404",
        "tether.access INFO POST /callbacks/nope:1 404",
        "tether.access INFO POST /callbacks/job-7:1 401",
        "tether.access INFO POST /callbacks/job-8:1 401",
        "tether.access INFO POST /callbacks/job-9:1/heartbeat 401",
    ]
    assert all(line.endswith(" ms from 127.0.0.1") for line in lines)  # the client, no port
    warnings = [line for line in access if " WARNING " in line]
    assert len(warnings) == 4
    said = [("callback", "nope:1"), ("callback", "job-7:1"), ("callback", "job-8:1")]
    said.append(("heartbeat", "job-9:1"))  # before, "callback" too
    for (what, promise_id), line in zip(said, warnings, strict=True):
        assert f"{what} for promise {promise_id!r} refused" in line
        assert line.endswith(" from 127.0.0.1")  # without its port, as the access line
    text = "\n".join(access)
    for secret in (
        token,
        "forged-token",
        "forged-bearer",
        "forged-beat",
        "state=",
        "limit=",
        "x=1",
    ):
        assert secret not in text


async def test_a_token_in_the_path_is_not_logged(start_service, access):
    """A caller that percent-encodes the whole callback URL sends its
    `?token=` inside the path; one that puts the token in a path segment
    sends it past the id: neither shows in the log."""
    svc = await start_service()
    token = svc.tether.signer.token("a-ok:1")
    for path in (
        f"/callbacks/a-ok%3A1%3Ftoken%3D{token}",
        f"/callbacks/a-ok:1/{token}",
        f"/callbacks/a-ok:1/heartbeat%3Ftoken%3D{token}",
        f"/jobs%3Ftoken%3D{token}",
    ):
        assert (await svc.client.post(path, json={})).status_code in (401, 404, 405)
    lines = [line.rsplit(" ", 5)[0] for line in access if " INFO " in line]
    assert lines == [
        "tether.access INFO POST /callbacks/a-ok:1?…",
        "tether.access INFO POST /callbacks/a-ok:1/…",
        "tether.access INFO POST /callbacks/a-ok:1/heartbeat?…",
        "tether.access INFO POST /jobs?…",
    ]
    warnings = [line for line in access if " WARNING " in line]
    assert warnings and all("promise 'a-ok:1' refused" in line for line in warnings)
    assert token not in "\n".join(access)


async def test_a_long_path_is_logged_cut(start_service, access):
    """A refused callback's 20,000-character path was logged whole, in the
    access line and its warning: 40 KB of log a request (a QA pass,
    2026-12-07). Cut at `PATH_SHOWN` characters."""
    svc = await start_service()
    assert (await svc.client.post(f"/callbacks/{'A' * 20_000}:1?token=x", json={})).status_code in (
        401,
        404,
    )
    assert len(access) == 2 and all(len(line) < PATH_SHOWN + 200 for line in access), access
    assert f"POST /callbacks/{'A' * (PATH_SHOWN - len('/callbacks/'))}… 4" in access[0]
    assert "promise 'AAAA" in access[1] and "A…' refused (401)" in access[1]


async def test_a_long_paths_cut_keeps_escapes_whole_and_the_route_told(start_service, access):
    """The cut came after the escaping, so it could split an escape (`A\\…`),
    and a long id's cut took the route's word with it: a refused heartbeat
    was warned of as a callback (a review, 2026-12-07)."""
    svc = await start_service()
    at_the_cut = "A" * (PATH_SHOWN - len("/callbacks/") - 1)  # the newline is the last kept
    path = f"/callbacks/{at_the_cut}%0A{'B' * 500}:1/heartbeat?token=x"
    assert (await svc.client.post(path, json={})).status_code in (401, 404)
    assert len(access) == 2, access
    assert f"POST /callbacks/{at_the_cut}\\x0a… 4" in access[0]
    warned = f"tether.access WARNING heartbeat for promise '{at_the_cut}\\x0aBBB"
    assert access[1].startswith(warned) and "B…' refused (401)" in access[1], access[1]
    access.clear()
    for path in ("/callbacks/x:1/heartbeatXYZ", "/callbacks/x:1/heartbeat/t0ken"):  # no such route
        assert (await svc.client.post(path, json={})).status_code in (401, 404, 405)
    warnings = [line for line in access if " WARNING " in line]
    assert len(warnings) == 2, access
    assert all("callback for promise 'x:1'" in line for line in warnings), warnings


async def test_tether_access_log_0_turns_it_off(start_service, access):
    assert Settings.from_env({"TETHER_ACCESS_LOG": "0"}).access_log is False
    assert Settings.from_env({}).access_log is True
    svc = await start_service(access_log=False)
    assert (await svc.client.get("/health")).status_code == 200
    assert (await svc.client.post("/callbacks/x:1?token=t", json={})).status_code == 401
    assert access == []


async def test_control_characters_in_a_path_cannot_forge_a_line(start_service, access):
    """A path is anyone's to choose: a decoded `%0A` (or `%00`, or an escape)
    is written as an escape, so every request is one line of the log."""
    svc = await start_service()
    forged = "%0A2026-12-02%2000:00:00,000%20WARNING%20tether:%20job%20x%20canceled%00%1b[2J"
    assert (await svc.client.get(f"/jobs/x{forged}")).status_code in (400, 404)
    assert (await svc.client.post(f"/callbacks/x{forged}:1", json={})).status_code in (401, 404)
    assert (await svc.client.get("/jobs/x%E2%80%A8y")).status_code in (400, 404)
    assert (await svc.client.get("/jobs/x%E2%80%AEy%E2%81%A6")).status_code in (400, 404)
    assert (await svc.client.get("/jobs/t%F3%A0%81%81%C2%AD%E2%81%AEz")).status_code in (400, 404)
    text = "\n".join(access)
    assert all(ch not in text for ch in "\x00\x1b\u2028\u202e\u2066\U000e0041\xad\u206e")
    assert len(text.splitlines()) == len(access) == 6  # two lines, the callback's warning, three
    assert "GET /jobs/x\\x0a2026-12-02 00:00:00,000 WARNING tether: job x canceled\\x00" in text
    assert "promise 'x\\x0a2026" in text  # the warning's promise id, escaped once
    assert "GET /jobs/x\\u2028y" in text
    assert "GET /jobs/x\\u202ey\\u2066" in text
    assert "GET /jobs/t\\U000e0041\\xad\\u206ez" in text  # a tag character, a soft hyphen


async def test_a_client_that_leaves_before_its_answer_is_told_as_499_not_500(start_service, access):
    """Its body cut short by a closed connection: no answer was sent, and
    nothing failed in the service. Told as a 500 before, it raised the
    5xx rate operators alert on (found in an audit, 2026-12-04)."""
    svc = await start_service()
    port = int(svc.settings.base_url.rsplit(":", 1)[1])
    before = await told_counts(svc)
    for _ in range(3):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /jobs HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            b"content-length: 100\r\n\r\n{"
        )
        await writer.drain()
        await asyncio.sleep(0.05)  # the service reads the head and waits for the body
        writer.close()
        await writer.wait_closed()

    async def told() -> list[str] | None:
        lines = [line for line in access if line.startswith("tether.access INFO POST /jobs")]
        return lines if len(lines) == 3 else None

    lines = await eventually(told, timeout=5)
    assert [line.rsplit(" ", 4)[0] for line in lines] == ["tether.access INFO POST /jobs 499"] * 3
    after = await told_counts(svc)  # (the registry is the process's: other tests' too)
    assert after.get("499", 0) - before.get("499", 0) == 3
    assert after.get("500", 0) == before.get("500", 0)


async def told_counts(svc: Any) -> dict[str, float]:
    """`POST /jobs` requests told to the metrics, by status."""
    counts: dict[str, float] = {}
    prefix = 'tether_http_request_duration_seconds_count{method="POST",route="/jobs",status="'
    for line in (await svc.client.get("/metrics")).text.splitlines():
        if line.startswith(prefix):
            status, _, count = line.removeprefix(prefix).partition('"} ')
            counts[status] = float(count)
    return counts


@pytest.mark.parametrize(
    ("client", "shown"),
    [
        (("10.0.0.7", 51234), "10.0.0.7"),
        (("2001:db8::1", 0), "2001:db8::1"),
        (None, "unknown address"),
        # behind a trusted proxy, what X-Forwarded-For said: a client's text
        (("1.2.3.4 GET /forged 200", 0), "1.2.3.4\\x20GET\\x20/forged\\x20200"),
        (("a\u202eb", 0), "a\\u202eb"),
        (("9" * 100, 0), "9" * 64),
    ],
)
def test_the_client_is_shown_without_its_port_and_escaped(client: Any, shown: str):
    assert _client({"client": client}) == shown
