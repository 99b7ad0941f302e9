"""Wrong tokens slow down whoever gives them (`TETHER_WRONG_TOKENS_PER_MINUTE`):
past the limit, a client address's tokens, bearer or at the dashboard's
sign-in, are 429 unread, a right one too, for the rest of the minute; a
session cookie, no token, callbacks and /health are not counted or refused;
the count forgets, is per address, and remembers a bounded number of them."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest
from litestar.exceptions import TooManyRequestsException

from api import auth
from api.auth import WRONG_WINDOW, WrongTokens
from tests.api.test_access_tokens import API_TOKENS, bearer, job_body

LIMIT = 3
WRONG = bearer("not-a-token-of-this-service")


async def service_with_tokens(start_service: Any, limit: int = LIMIT) -> Any:
    return await start_service(api_token=API_TOKENS[0], wrong_tokens_per_minute=limit)


async def test_past_the_limit_every_token_from_the_address_is_429_unread(
    start_service, receiver, caplog
):
    svc = await service_with_tokens(start_service)
    svc.client.headers.update(bearer(API_TOKENS[0]))
    created = await svc.client.post("/jobs", json=job_body("w", receiver))
    assert created.status_code == 201, created.text
    await svc.wait_state("w", "running")
    del svc.client.headers["authorization"]
    for _ in range(LIMIT):
        assert (await svc.client.get("/jobs", headers=WRONG)).status_code == 401
    with caplog.at_level(logging.WARNING, logger="tether.api"):
        for headers in (WRONG, bearer(API_TOKENS[0])):  # the right one too: not compared
            refused = await svc.client.get("/jobs/w", headers=headers)
            assert refused.status_code == 429, refused.text
            assert 1 <= int(refused.headers["retry-after"]) <= WRONG_WINDOW
            assert refused.json()["error"] == {
                "code": "too_many_requests",
                "message": f"{LIMIT} wrong tokens from this address in the last 60 s: no token"
                f" from it is read for {refused.headers['retry-after']} s more; check the"
                " token the client sends",
            }
    # Not a token given: 401 as ever; and what carries its own token goes on.
    assert (await svc.client.get("/jobs")).status_code == 401
    assert (await svc.client.get("/health")).status_code == 200
    [hit] = receiver.hits
    callback = hit.body["callback_url"].split("://", 1)[1].partition("/")[2]
    done = await svc.client.post(f"/{callback}", json={"status": "succeeded"})
    assert done.status_code == 200, done.text
    assert not any(token in caplog.text for token in (*API_TOKENS, "not-a-token"))


async def test_the_warning_names_the_address_once_and_no_token(start_service, caplog):
    svc = await service_with_tokens(start_service)
    with caplog.at_level(logging.WARNING, logger="tether.api"):
        for _ in range(LIMIT + 2):
            await svc.client.get("/jobs", headers=WRONG)
    warned = [r.getMessage() for r in caplog.records if "wrong API tokens" in r.getMessage()]
    assert warned == [
        f"{LIMIT} wrong API tokens from 127.0.0.1 in 60 s: its tokens are refused (429) until"
        f" fewer than {LIMIT} came in the last 60 s (TETHER_WRONG_TOKENS_PER_MINUTE)"
    ]
    assert "not-a-token" not in caplog.text


async def test_a_signed_in_dashboard_goes_on_and_its_sign_in_is_limited_too(start_service):
    svc = await service_with_tokens(start_service)
    signed = await svc.client.post(
        "/ui/sign-in", data={"token": API_TOKENS[0], "next": "/ui"}, follow_redirects=False
    )
    assert signed.status_code == 303, signed.text
    cookie = {"cookie": f"tether_session={signed.cookies['tether_session']}"}
    svc.client.cookies.clear()
    for _ in range(LIMIT):
        wrong = await svc.client.post("/ui/sign-in", data={"token": "guess", "next": "/ui"})
        assert wrong.status_code == 401
        assert "That token is not accepted." in wrong.text
    again = await svc.client.post("/ui/sign-in", data={"token": API_TOKENS[0], "next": "/ui"})
    assert again.status_code == 429 and "retry-after" in again.headers
    assert "wrong tokens from this address" in again.text and "tether_session" not in again.cookies
    assert (await svc.client.get("/jobs", headers=bearer(API_TOKENS[0]))).status_code == 429
    assert (await svc.client.get("/jobs", headers=cookie)).status_code == 200  # not a guess


async def test_a_limit_of_0_counts_nothing(start_service):
    svc = await service_with_tokens(start_service, limit=0)
    for _ in range(40):
        assert (await svc.client.get("/jobs", headers=WRONG)).status_code == 401
    assert (await svc.client.get("/jobs", headers=bearer(API_TOKENS[0]))).status_code == 200


def asked_from(address: str) -> Any:
    return SimpleNamespace(scope={"client": (address, 40000)})


def test_the_count_forgets_after_a_minute_and_is_per_address():
    now = [1000.0]
    wrong = WrongTokens(2, clock=lambda: now[0])
    a, b = asked_from("10.0.0.1"), asked_from("10.0.0.2")
    wrong.wrong(a)
    now[0] += 30
    wrong.wrong(a)
    with pytest.raises(TooManyRequestsException) as refused:
        wrong.check(a)
    assert refused.value.headers == {"Retry-After": "30"}
    wrong.check(b)  # another address: not refused
    now[0] += 30  # the first is a minute old: one left in the window
    wrong.check(a)
    wrong.wrong(a)
    with pytest.raises(TooManyRequestsException):
        wrong.check(a)


def test_the_addresses_remembered_are_bounded(monkeypatch):
    monkeypatch.setattr(auth, "ADDRESSES_KEPT", 5)
    wrong = WrongTokens(2)
    first = asked_from("10.1.0.0")
    wrong.wrong(first)
    wrong.wrong(first)
    for n in range(1, 20):
        wrong.wrong(asked_from(f"10.1.0.{n}"))
    assert len(wrong._wrong) == 5
    wrong.check(first)  # forgotten first: heard from longest ago
