"""Wrong tokens slow down whoever gives them (`TETHER_WRONG_TOKENS_PER_MINUTE`):
past the limit, a client address's tokens, bearer or at the dashboard's
sign-in, are 429 unread, a right one too, until enough of the minute has
passed; a session cookie, no token, callbacks and /health are not counted or
refused; the count forgets, is per address (an IPv6 one by its /64), warns
once, and remembers a bounded number of addresses. `X-Forwarded-For` is
believed only from `TETHER_TRUSTED_PROXIES`."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from litestar.exceptions import TooManyRequestsException
from uvicorn.middleware.proxy_headers import _TrustedHosts

from api import auth
from api.auth import WrongTokens, address_of
from api.client import Api, ServiceError, patiently, stream_events
from api.http import proxy_options
from core.settings import Settings
from tests.api.test_access_tokens import API_TOKENS, bearer, job_body
from tests.conftest import Hit, Receiver
from tests.process import TetherProcess

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
    for _ in range(LIMIT + 2):  # no token at all: not a guess, not counted
        assert (await svc.client.get("/jobs")).status_code == 401
    assert (await svc.client.get("/jobs", headers=bearer(API_TOKENS[0]))).status_code == 200
    for _ in range(LIMIT):
        assert (await svc.client.get("/jobs", headers=WRONG)).status_code == 401
    with caplog.at_level(logging.WARNING, logger="tether.api"):
        for headers in (WRONG, bearer(API_TOKENS[0])):  # the right one too: not compared
            refused = await svc.client.get("/jobs/w", headers=headers)
            assert refused.status_code == 429, refused.text
            wait = refused.headers["retry-after"]
            assert 1 <= int(wait) <= 60
            assert refused.json()["error"] == {
                "code": "too_many_requests",
                "message": f"{LIMIT} wrong tokens from this address (yours or another"
                " client's at the same address) in the last minute: no token from it is"
                f" read for {wait} s more",
            }
    # Not a token given: 401 as ever; and what carries its own token goes on.
    assert (await svc.client.get("/jobs")).status_code == 401
    assert (await svc.client.get("/health")).status_code == 200
    [hit] = receiver.hits
    callback = hit.body["callback_url"].split("://", 1)[1].partition("/")[2]
    done = await svc.client.post(f"/{callback}", json={"status": "succeeded"})
    assert done.status_code == 200, done.text
    assert not any(token in caplog.text for token in (*API_TOKENS, "not-a-token"))


async def test_the_warning_names_the_address_and_no_token(start_service, caplog):
    svc = await service_with_tokens(start_service)
    with caplog.at_level(logging.WARNING, logger="tether.api"):
        for _ in range(LIMIT + 2):
            await svc.client.get("/jobs", headers=WRONG)
    warned = [r.getMessage() for r in caplog.records if "wrong API tokens" in r.getMessage()]
    assert warned == [
        f"{LIMIT} wrong API tokens from 127.0.0.1 in a minute: its tokens are refused (429)"
        " until it gave fewer in the last minute (TETHER_WRONG_TOKENS_PER_MINUTE)"
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
    for _ in range(LIMIT + 2):  # an empty form is no guess
        empty = await svc.client.post("/ui/sign-in", data={"token": " ", "next": "/ui"})
        assert empty.status_code == 401 and "Give a token." in empty.text
    for _ in range(LIMIT):
        wrong = await svc.client.post("/ui/sign-in", data={"token": "guess", "next": "/ui"})
        assert wrong.status_code == 401
        assert "That token is not accepted." in wrong.text
    again = await svc.client.post("/ui/sign-in", data={"token": API_TOKENS[0], "next": "/ui"})
    assert again.status_code == 429 and 1 <= int(again.headers["retry-after"]) <= 60
    assert "Too many wrong tokens came from this address" in again.text
    assert "tether_session" not in again.cookies
    assert (await svc.client.get("/jobs", headers=bearer(API_TOKENS[0]))).status_code == 429
    assert (await svc.client.get("/jobs", headers=cookie)).status_code == 200  # not a guess


async def test_a_limit_of_0_counts_nothing(start_service):
    svc = await service_with_tokens(start_service, limit=0)
    for _ in range(40):
        assert (await svc.client.get("/jobs", headers=WRONG)).status_code == 401
    assert (await svc.client.get("/jobs", headers=bearer(API_TOKENS[0]))).status_code == 200


def asked_from(address: str | None) -> Any:
    return SimpleNamespace(scope={"client": None if address is None else (address, 40000)})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_count_forgets_slice_by_slice_and_is_per_address():
    clock = Clock()
    wrong = WrongTokens(2, clock=clock)
    a, b = asked_from("10.0.0.1"), asked_from("10.0.0.2")
    wrong.wrong(a)  # in the slice 1000-1010
    clock.now += 30
    wrong.wrong(a)  # in the slice 1030-1040
    assert wrong.wait(a) == 30  # the first is counted until 1060
    with pytest.raises(TooManyRequestsException) as refused:
        wrong.check(a)
    assert refused.value.headers == {"Retry-After": "30"}
    assert wrong.wait(b) == 0  # another address
    clock.now += 30  # 1060: the first is no longer counted, one left
    assert wrong.wait(a) == 0
    wrong.wrong(a)
    assert wrong.wait(a) == 30  # the 1030 one is counted until 1090
    clock.now += 60
    assert wrong.wait(a) == 0 and not wrong._wrong  # none left: forgotten


def test_a_client_guessing_at_the_limit_for_ten_minutes_is_warned_of_once(caplog):
    """A script with a rotated-out token, once a second, is refused most of
    the time and counted whenever a slice frees room: it was warned of at
    each (271 warnings in 10 minutes: found by a review)."""
    clock = Clock()
    wrong = WrongTokens(30, clock=clock)
    a = asked_from("10.0.0.9")
    counted = refused = 0
    with caplog.at_level(logging.WARNING, logger="tether.api"):
        for _ in range(600):
            if wrong.wait(a):
                refused += 1
            else:
                wrong.wrong(a)
                counted += 1
            clock.now += 1
        assert counted <= 30 * 11 and refused >= 250  # about 30 a minute get through
        clock.now += 60  # a quiet minute: the next time at the limit is said again
        for _ in range(30):
            wrong.wrong(a)
    warned = [r for r in caplog.records if "wrong API tokens" in r.getMessage()]
    assert len(warned) == 2


def test_the_count_matches_a_plain_model_over_random_steps():
    """Each token counted is forgotten once its 10-second slice is six
    slices old: `wait` is 0 exactly while fewer than the limit are
    remembered, and otherwise the whole seconds until then, no more; no
    address with none left is kept. Fractional steps, several addresses."""
    rng = random.Random(71)
    clock = Clock()
    limit = 4
    wrong = WrongTokens(limit, clock=clock)
    counted: dict[str, list[float]] = {f"10.0.0.{n}": [] for n in range(3)}

    def remembered(address: str, at: float) -> int:
        return sum(int(at // 10) < int(t // 10) + 6 for t in counted[address])

    for _ in range(3000):
        clock.now += rng.choice([0.0, 0.3, 1.7, 9.999, 10.0, 25.5])
        address = rng.choice(list(counted))
        wait = wrong.wait(asked_from(address))
        assert (wait == 0) == (remembered(address, clock.now) < limit)
        if wait:
            assert remembered(address, clock.now + wait) < limit
            assert wait == 1 or remembered(address, clock.now + wait - 1) >= limit
        elif rng.random() < 0.7:  # read, and wrong
            wrong.wrong(asked_from(address))
            counted[address].append(clock.now)
        at = int(clock.now // 10)
        assert all(kept.total(at) for kept in wrong._wrong.values())


def test_forgetting_the_quiet_leaves_an_address_at_the_limit_refused():
    clock = Clock()
    wrong = WrongTokens(2, clock=clock)
    quiet, locked, other = (asked_from(f"10.2.0.{n}") for n in range(3))
    wrong.wrong(quiet)
    clock.now += 55
    wrong.wrong(locked)
    wrong.wrong(locked)
    clock.now += 10  # the quiet one has none left: forgotten by the next look
    assert wrong.wait(other) == 0
    assert list(wrong._wrong) == ["10.2.0.1"] and wrong.wait(locked) > 0


def test_an_ipv6_client_is_counted_by_its_64_and_a_mapped_ipv4_one_as_ipv4():
    assert address_of(asked_from("2001:db8:1:2:aaaa::1")) == "2001:db8:1:2::/64"
    assert address_of(asked_from("2001:db8:1:2:ffff::9")) == "2001:db8:1:2::/64"
    assert address_of(asked_from("::ffff:10.1.2.3")) == "10.1.2.3"
    assert address_of(asked_from("10.1.2.3")) == "10.1.2.3"
    assert address_of(asked_from(None)) == address_of(asked_from("x")) == "(no IP address)"
    wrong = WrongTokens(2)
    for n in range(2):
        wrong.wrong(asked_from(f"2001:db8:1:2::{n + 1}"))
    assert wrong.wait(asked_from("2001:db8:1:2::77")) > 0
    assert wrong.wait(asked_from("2001:db8:1:3::1")) == 0


def test_the_addresses_remembered_are_bounded_those_quiet_longest_forgotten(monkeypatch):
    monkeypatch.setattr(auth, "ADDRESSES_KEPT", 5)
    wrong = WrongTokens(2)
    first, second = asked_from("10.1.0.100"), asked_from("10.1.0.101")
    for guesser in (first, second, first):  # the first guessed last
        wrong.wrong(guesser)
    for n in range(4):
        wrong.wrong(asked_from(f"10.1.0.{n}"))
    assert len(wrong._wrong) == 5
    assert wrong.wait(first) > 0  # remembered: heard from more lately than the second
    wrong.wrong(second)  # forgotten: counted from one again
    assert wrong.wait(second) == 0


def test_x_forwarded_for_is_believed_from_the_trusted_proxies_alone(tmp_path: Path):
    """uvicorn believed `X-Forwarded-For` from 127.0.0.1 and ::1 by default:
    a client of a proxy on the same host that passed the header on named
    any address, guessed without end, and could have another address
    refused (found by a review). The real `tether serve`."""
    env = {"TETHER_API_TOKEN": API_TOKENS[0], "TETHER_WRONG_TOKENS_PER_MINUTE": "2"}
    for trusted, refused_at in (("", 3), ("127.0.0.1", None)):
        served = TetherProcess(tmp_path, {**env, "TETHER_TRUSTED_PROXIES": trusted}).start()
        try:
            with served.client() as client:
                answers = [
                    client.get("/jobs", headers={**WRONG, "x-forwarded-for": f"10.9.9.{n}"})
                    for n in range(4)
                ]
                statuses = [answer.status_code for answer in answers]
                if refused_at is None:  # each from an address of its own
                    assert statuses == [401] * 4
                    again = {**WRONG, "x-forwarded-for": "10.9.9.0"}  # its second
                    assert client.get("/jobs", headers=again).status_code == 401
                    named = {"x-forwarded-for": "10.9.9.0", **bearer(API_TOKENS[0])}
                    assert client.get("/jobs", headers=named).status_code == 429
                    assert client.get("/jobs", headers=bearer(API_TOKENS[0])).is_success
                else:  # all from 127.0.0.1
                    assert statuses == [401, 401, 429, 429]
        finally:
            served.terminate()  # (a SIGKILL may lose the log thread's lines)
        access = [line for line in served.log.read_text().splitlines() if "GET /jobs " in line]
        assert len(access) == (4 if refused_at else 7)
        if refused_at is None:  # the access log names the client the proxy named
            named_by_proxy = [line for line in access if " ms from 10.9.9." in line]
            assert len(named_by_proxy) == 6 and access[-1].endswith(" ms from 127.0.0.1")
            assert sum(line.endswith(" ms from 10.9.9.0") for line in access) == 3
        else:
            assert all(line.endswith(" ms from 127.0.0.1") for line in access)


def test_a_trusted_proxy_that_is_no_address_stops_the_service_at_start():
    with pytest.raises(ValueError, match=r"TETHER_TRUSTED_PROXIES: 'proxy\.local' is neither"):
        Settings(trusted_proxies="10.0.0.5, proxy.local")
    assert Settings(trusted_proxies="10.0.0.5, 10.1.0.0/16, fd00::/8").trusted_proxies


def test_a_network_written_with_host_bits_is_handed_to_uvicorn_plain():
    """uvicorn reads `127.0.0.5/8` as a name no client has, and believed no
    one (found by a review): it gets `127.0.0.0/8`."""
    options = proxy_options(" 127.0.0.5/8, 10.0.0.5 ,fd00::1/8")
    assert options == {
        "proxy_headers": True,
        "forwarded_allow_ips": "127.0.0.0/8,10.0.0.5/32,fd00::/8",
    }
    trusted = _TrustedHosts(options["forwarded_allow_ips"])
    assert "127.0.0.1" in trusted and "10.0.0.5" in trusted and "fd00::9" in trusted
    assert "10.0.0.6" not in trusted
    assert proxy_options(" , ") == {"proxy_headers": False}


def test_the_cli_waits_out_a_429_as_a_restart():
    """`tether watch` and `submit --wait` stopped on a 429 another client's
    wrong tokens made at the same address (found by a review)."""
    answers = iter([ServiceError("busy", status=429), ServiceError("down", status=503)])

    async def call() -> str:
        failure = next(answers, None)
        if failure is not None:
            raise failure
        return "done"

    assert asyncio.run(patiently(call)) == "done"
    with pytest.raises(ServiceError):
        asyncio.run(patiently(lambda: _raise(ServiceError("no", status=401))))


def test_an_event_stream_answered_429_is_asked_again_after_its_retry_after(
    monkeypatch, receiver: Receiver
):
    """`events --follow` and `watch` stopped on a 429, then asked again
    every few seconds whatever it said (found by two reviews)."""
    event = {"seq": 1, "type": "finished", "attempt": 1, "data": {}}

    def respond(hit: Hit) -> tuple[Any, ...]:
        if len(receiver.hits) == 1:
            return 429, {"error": {"message": "wrong tokens"}}, {"retry-after": "2"}
        stream = f"id: 1\ndata: {json.dumps(event)}\n\n".encode()
        return 200, stream, {"content-type": "text/event-stream"}

    receiver.respond = respond
    events: list[dict[str, Any]] = []
    monkeypatch.delenv("TETHER_API_TOKEN", raising=False)
    api = Api(receiver.url(""))
    asyncio.run(stream_events(api, "j", events.append))
    assert [e["type"] for e in events] == ["finished"]
    first, second = receiver.hits
    assert second.at - first.at >= 1.9  # not the first pause, 0.2 s


async def _raise(exc: Exception) -> None:
    raise exc
