"""API tokens and read tokens, through real HTTP: several API tokens at once
(to replace one without downtime), read tokens that may list and read jobs
and change nothing, refusals that say what is missing, and no token ever in
a log line. Callbacks and /health stay outside the tokens
(tests/api/test_jobs.py)."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from litestar import Litestar, Router, get, post
from litestar.exceptions import PermissionDeniedException
from litestar.testing import AsyncTestClient

from api.app import create_app
from api.auth import READ, another_sites, api_token_guard, known_hosts_guard
from core.plugins import make_plugin_manager
from tests.conftest import HOLD, eventually, free_port, test_settings
from tests.process import TetherProcess, wait_for
from tests.system.test_startup import TETHER

API_TOKENS = ("api-token-first-4f1c", "api-token-second-9b2e")
READ_TOKEN = "read-token-only-7d3a"
SECRETS = (*API_TOKENS, READ_TOKEN)


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def job_body(job_id: str, receiver: Any) -> dict[str, Any]:
    return {
        "id": job_id,
        "backend": "http_webhook",
        "params": {"url": receiver.url(), "cancel_url": receiver.url("/cancel")},
    }


async def tokened_service(start_service: Any) -> Any:
    """A service with both API tokens (the setting spaced as people write it)
    and a read token; its client sends the first API token."""
    svc = await start_service(api_token=" , ".join(API_TOKENS), read_token=READ_TOKEN)
    svc.client.headers.update(bearer(API_TOKENS[0]))
    return svc


@pytest.mark.resonate_server(False)  # the web layer's
async def test_a_change_a_page_of_another_site_asks_is_refused_only_where_nothing_else_stops_it(
    start_service,
):
    """Without tokens every route is open, and a browser's page of another
    site could change jobs (found by an exploratory QA pass): refused, by
    `Sec-Fetch-Site`, or where a browser sends none (plain http, not
    localhost) by `Origin` against `Host`, `X-Forwarded-Host` and the public
    URL's host (a proxy that rewrites `Host`: found by a review). With
    tokens, a bearer token no page holds, or the session's SameSite cookie
    and CSRF header, stop it already: not refused for its headers."""
    svc = await start_service()
    cancel = "/jobs/nope/cancel"
    for headers, status in [
        ({"sec-fetch-site": "cross-site"}, 403),
        ({"sec-fetch-site": "same-site"}, 403),
        ({"sec-fetch-site": "same-origin"}, 404),
        ({"origin": "http://evil.example"}, 403),
        ({"origin": "null"}, 403),
        ({"origin": "http://127.0.0.1:9", "x-forwarded-host": "127.0.0.1:9"}, 404),
        ({}, 404),  # a program
    ]:
        answer = await svc.client.post(cancel, headers=headers)
        assert answer.status_code == status, (headers, answer.text)
    assert (await svc.client.get("/jobs", headers={"sec-fetch-site": "cross-site"})).is_success
    tokened = await tokened_service(start_service)
    let_in = {**bearer(API_TOKENS[0]), "origin": "http://evil.example"}
    assert (await tokened.client.post(cancel, headers=let_in)).status_code == 404
    # the public URL's host is the service's own (a proxy in front, Host rewritten)
    page = SimpleNamespace(headers={"origin": "https://tether.example", "host": "10.0.0.5:8000"})
    assert another_sites(page)  # type: ignore[arg-type]
    assert not another_sites(page, "tether.example")  # type: ignore[arg-type]


@pytest.mark.resonate_server(False)  # the web layer's
async def test_without_tokens_the_service_answers_only_at_its_own_names(start_service, receiver):
    """DNS rebinding: a page of a site whose name is made to lead to the
    service is the same origin to the browser, and without tokens it read,
    started, canceled and retried jobs (found by a QA pass, 2026-12-07). A
    browser sends such a page's reads with no `Sec-Fetch-Site` (a plain-http
    name) and no `Origin` (a GET): the first version, which looked for them,
    let every read through (a review). So any request for a host the service
    is not known by is 403, `X-Forwarded-Host` too; what carries its own
    authentication, and /health, are not checked; with tokens nothing is."""
    svc = await start_service()
    port = svc.settings.base_url.rsplit(":", 1)[1]
    rebound = {"host": f"rebind.example:{port}"}  # as a browser sends a read
    before = (await svc.client.get("/jobs")).json()
    for method, path, body in [
        ("GET", "/jobs", None),
        ("GET", "/jobs/x", None),
        ("GET", "/jobs/x/events", None),
        ("POST", "/jobs", job_body("rebound", receiver)),
        ("GET", "/ui", None),
        ("GET", "/metrics", None),
    ]:
        for headers in (
            rebound,
            {**rebound, "sec-fetch-site": "same-origin"},
            {"host": f"127.0.0.1:{port}", "x-forwarded-host": rebound["host"]},  # a proxy's
            {"host": f"127.0.0.1:{port}", "x-forwarded-host": f"localhost, {rebound['host']}"},
        ):
            answer = await svc.client.request(method, path, json=body, headers=headers)
            assert answer.status_code == 403, (method, path, headers, answer.text)
    said = (await svc.client.get("/jobs", headers=rebound)).json()["error"]["message"]
    assert said.startswith("a request for host 'rebind.example:") and "TETHER_ALLOWED_HOSTS" in said
    assert (await svc.client.get("/jobs")).json() == before  # nothing made
    page = await svc.client.get("/ui", headers=rebound)  # a page, for the person at the browser
    assert page.headers["content-type"].startswith("text/html"), page.headers
    assert "TETHER_ALLOWED_HOSTS" in page.text
    assert (await svc.client.get("/health", headers=rebound)).status_code == 200
    refused = await svc.client.post("/callbacks/x:1?token=t", json={}, headers=rebound)
    assert refused.status_code == 401  # its own token decides
    for host in (
        f"localhost:{port}",
        f"LOCALHOST.:{port}",
        f"app.localhost:{port}",
        f"[::1]:{port}",
        "10.0.0.5",
    ):
        seen = await svc.client.get("/jobs", headers={"host": host, "x-forwarded-host": host})
        assert seen.status_code == 200, host
    named = await start_service(allowed_hosts="tether.internal, other.example.")
    for host in ("tether.internal:8000", "Other.Example", "other.example."):
        assert (await named.client.get("/jobs", headers={"host": host})).status_code == 200, host
    assert (await named.client.get("/jobs", headers=rebound)).status_code == 403
    anyone = await start_service(allowed_hosts="*")
    assert (await anyone.client.get("/jobs", headers=rebound)).status_code == 200
    # TETHER_PUBLIC_URL's host is the service's own name (the guard alone:
    # no name here leads to 127.0.0.1)
    guard = known_hosts_guard(test_settings(public_url="http://tether.example:8080"))
    assert guard is not None
    public = SimpleNamespace(headers={"host": "Tether.Example.:8080"}, scope={"path": "/jobs"})
    await guard(public, None)  # type: ignore[arg-type]
    other = SimpleNamespace(headers={"host": "other.example"}, scope={"path": "/jobs"})
    with pytest.raises(PermissionDeniedException):
        await guard(other, None)  # type: ignore[arg-type]
    assert known_hosts_guard(test_settings(api_token="t" * 32)) is None
    tokened = await tokened_service(start_service)
    assert (await tokened.client.get("/jobs", headers=rebound)).status_code == 200


@pytest.mark.parametrize("listed", ["tether:8000", "http://tether", "a b", "x..y"])
def test_an_allowed_host_that_is_no_host_name_stops_the_settings(listed: str):
    with pytest.raises(ValueError, match="invalid setting TETHER_ALLOWED_HOSTS"):
        test_settings(allowed_hosts=f"ok.example,{listed}")


async def test_a_read_token_lists_and_reads_jobs(start_service, receiver):
    svc = await tokened_service(start_service)
    assert (await svc.client.post("/jobs", json=job_body("r", receiver))).status_code == 201
    await svc.wait_state("r", "running")
    read = bearer(READ_TOKEN)
    listed = await svc.client.get("/jobs", headers=read)
    assert listed.status_code == 200, listed.text
    assert [job["id"] for job in listed.json()["items"]] == ["r"]
    one = await svc.client.get("/jobs/r", headers=read)
    assert one.status_code == 200 and one.json()["state"] == "running"
    assert (await svc.client.get("/jobs/nope", headers=read)).status_code == 404


async def test_a_read_token_can_neither_create_nor_cancel(start_service, receiver):
    svc = await tokened_service(start_service)
    assert (await svc.client.post("/jobs", json=job_body("r", receiver))).status_code == 201
    await svc.wait_state("r", "running")
    read = bearer(READ_TOKEN)

    created = await svc.client.post("/jobs", json=job_body("new", receiver), headers=read)
    assert created.status_code == 403
    assert created.json()["error"] == {
        "code": "forbidden",
        "message": "this token may only read; POST /jobs needs the API token (TETHER_API_TOKEN)",
    }
    canceled = await svc.client.post("/jobs/r/cancel", json={"reason": "x"}, headers=read)
    assert canceled.status_code == 403
    assert canceled.json()["error"]["message"] == (
        "this token may only read; POST /jobs/r/cancel needs the API token (TETHER_API_TOKEN)"
    )

    # nothing changed: no new job, no trigger, no cancel sent, "r" still waiting
    assert (await svc.client.get("/jobs/new")).status_code == 404
    await eventually(lambda: len(receiver.hits) == 1, holds=HOLD)
    assert receiver.on("/cancel") == []
    assert (await svc.job("r"))["state"] == "running"
    # and the API token still may
    assert (await svc.client.post("/jobs/r/cancel")).json()["state"] == "canceled"


async def test_each_api_token_may_write_and_a_wrong_one_is_refused(start_service, receiver):
    svc = await tokened_service(start_service)
    for n, token in enumerate(API_TOKENS):
        created = await svc.client.post(
            "/jobs", json=job_body(f"j{n}", receiver), headers=bearer(token)
        )
        assert created.status_code == 201, created.text
        read = await svc.client.get(f"/jobs/j{n}", headers=bearer(token))
        assert read.status_code == 200
    del svc.client.headers["authorization"]
    wrong = (
        {},
        bearer("api-token-third"),
        bearer(API_TOKENS[0][:-1]),
        bearer(API_TOKENS[0] + "x"),
        bearer(",".join(API_TOKENS)),  # the setting itself is not a token
        {"authorization": "Bearer"},
        {"authorization": f"Basic {API_TOKENS[0]}"},
        {"authorization": API_TOKENS[0]},
    )
    for headers in wrong:
        for method, path in (("GET", "/jobs"), ("GET", "/jobs/j0"), ("POST", "/jobs/j0/cancel")):
            answer = await svc.client.request(method, path, headers=headers)
            assert answer.status_code == 401, (headers, method, path)
            assert answer.json()["error"] == {
                "code": "unauthorized",
                "message": "missing or invalid API token",
            }
            assert answer.headers["www-authenticate"] == "Bearer"
    svc.client.headers.update(bearer(API_TOKENS[1]))
    assert (await svc.job("j0"))["state"] == "running"


async def test_tokens_never_reach_the_log_or_an_answer(start_service, receiver, caplog):
    caplog.set_level(logging.DEBUG)
    svc = await tokened_service(start_service)
    answers = [
        await svc.client.post("/jobs", json=job_body("s", receiver)),
        await svc.client.get("/jobs/s", headers=bearer(READ_TOKEN)),
        await svc.client.post("/jobs/s/cancel", headers=bearer(READ_TOKEN)),
        await svc.client.get("/jobs", headers=bearer(API_TOKENS[1] + "-wrong")),
    ]
    assert [a.status_code for a in answers] == [201, 200, 403, 401]
    await svc.wait_state("s", "running")
    lines = [r for r in caplog.records if r.name == "tether.access"]
    assert any("POST /jobs/s/cancel 403" in r.getMessage() for r in lines)
    assert any("GET /jobs 401" in r.getMessage() for r in lines)
    texts = [caplog.text, repr(svc.settings), *(a.text for a in answers)]
    for text in texts:
        for secret in SECRETS:
            assert secret not in text


async def test_only_a_get_route_declared_a_read_lets_a_read_token_in():
    """What the next guarded route gets by default: without `opt=READ` a
    read token is refused even on GET, and `opt=READ` on a POST does not let
    it write."""

    @get("/undeclared", sync_to_thread=False)
    def undeclared() -> str:
        return "read"

    @post("/declared", opt=READ, sync_to_thread=False)
    def declared() -> str:
        return "written"

    settings = test_settings(api_token=API_TOKENS[0], read_token=READ_TOKEN)
    guarded = Router("/", route_handlers=[undeclared, declared], guards=[api_token_guard(settings)])
    async with AsyncTestClient(Litestar([guarded])) as client:
        for method, path in (("GET", "/undeclared"), ("POST", "/declared")):
            refused = await client.request(method, path, headers=bearer(READ_TOKEN))
            assert refused.status_code == 403, (method, path)
            allowed = await client.request(method, path, headers=bearer(API_TOKENS[0]))
            assert allowed.status_code in (200, 201), (method, path)


# ── start-up ────────────────────────────────────────────────────────────────


def test_a_read_token_without_an_api_token_stops_tether_serve(tmp_path: Path):
    done = subprocess.run(
        [TETHER, "serve", "--port", str(free_port())],
        env={
            **TetherProcess(tmp_path).env,
            "TETHER_STORE": f"sqlite:///{tmp_path}/t.db",
            "TETHER_READ_TOKEN": READ_TOKEN,
        },
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2, done.stderr
    assert "TETHER_READ_TOKEN is set but TETHER_API_TOKEN is not" in done.stderr
    assert "Traceback" not in done.stderr
    assert READ_TOKEN not in done.stdout + done.stderr
    assert not (tmp_path / "t.db").exists()  # refused before the store is touched


@pytest.mark.parametrize(
    ("api", "read", "says"),
    [
        ("", READ_TOKEN, "TETHER_READ_TOKEN is set but TETHER_API_TOKEN is not"),
        (
            f"{API_TOKENS[0]},{READ_TOKEN}",
            READ_TOKEN,
            "a token is listed in both TETHER_API_TOKEN and TETHER_READ_TOKEN",
        ),
        # a list of empty variables: the API open, silently (an exploratory QA pass)
        (" , ", "", "TETHER_API_TOKEN is set but lists no token \\(only commas and spaces\\)"),
        ("   ", "", "TETHER_API_TOKEN is set but lists no token"),  # every route was open
        (API_TOKENS[0], " ", "TETHER_READ_TOKEN is set but lists no token"),
        (",", READ_TOKEN, "TETHER_API_TOKEN is set but lists no token"),
        (API_TOKENS[0], ",", "TETHER_READ_TOKEN is set but lists no token"),
    ],
)
def test_the_app_refuses_tokens_it_cannot_honour(api: str, read: str, says: str):
    settings = test_settings(api_token=api, read_token=read)
    with pytest.raises(ValueError, match=says) as refused:
        create_app(settings, make_plugin_manager(entry_points=False))
    assert READ_TOKEN not in str(refused.value) and API_TOKENS[0] not in str(refused.value)


# ── replacing a token, on the real `tether serve` ────────────────────────────


def test_a_token_is_replaced_without_downtime(tmp_path: Path, receiver):
    """Old token only, then old and new, then new only: each step a restart
    with new settings, as docs/operations.md tells operators to do it."""
    old, new = "old-api-token-5e8a", "new-api-token-c61f"
    store = {"TETHER_STORE": f"sqlite:///{tmp_path}/t.db", "TETHER_LOG_LEVEL": "DEBUG"}
    logs: list[Path] = []

    def serve(api_token: str) -> TetherProcess:
        proc = TetherProcess(
            tmp_path, {**store, "TETHER_API_TOKEN": api_token, "TETHER_READ_TOKEN": READ_TOKEN}
        )
        logs.append(proc.log)
        return proc.start()

    def answers(proc: TetherProcess) -> dict[str, int]:
        with proc.client() as client:
            return {
                name: client.get("/jobs/j", headers=bearer(token)).status_code
                for name, token in (("old", old), ("new", new), ("read", READ_TOKEN))
            }

    proc = serve(old)
    try:
        with proc.client(headers=bearer(old)) as client:
            assert client.post("/jobs", json=job_body("j", receiver)).status_code == 201
            wait_for(client, "j", "running")
        assert answers(proc) == {"old": 200, "new": 401, "read": 200}
    finally:
        proc.terminate()

    proc = serve(f"{old},{new}")  # step 1: both accepted while clients move over
    try:
        assert answers(proc) == {"old": 200, "new": 200, "read": 200}
    finally:
        proc.terminate()

    proc = serve(new)  # step 2: the old one removed
    try:
        assert answers(proc) == {"old": 401, "new": 200, "read": 200}
        with proc.client(headers=bearer(old)) as client:
            assert client.post("/jobs/j/cancel").status_code == 401
        with proc.client(headers=bearer(new)) as client:
            assert client.get("/jobs/j").json()["state"] == "running"
    finally:
        proc.terminate()

    text = "".join(log.read_text() for log in logs)
    assert "tether.access: GET /jobs/j 401" in text
    for secret in (old, new, READ_TOKEN):
        assert secret not in text
