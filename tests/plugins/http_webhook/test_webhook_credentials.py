"""Credentials for webhook targets (`params.auth` naming a
`TETHER_WEBHOOK_AUTH_<NAME>` of the service), through the real service and a
real receiver that demands a bearer token, and through `tether serve` itself:
the secret goes on the wire and nowhere else."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Hit, Receiver, eventually, wait_until
from tests.process import TetherProcess

TOKEN = "wh-s3cr3t-6f1d2c"
SECRET = f"Bearer {TOKEN}"
CREDENTIALS = {"TETHER_WEBHOOK_AUTH_PARTNER": SECRET, "TETHER_WEBHOOK_AUTH_BILLING": "Basic Ymls"}


def guarded(receiver: Receiver) -> None:
    """The receiver answers only requests bearing the token; every answer
    quotes the Authorization header it got, as a careless service might."""

    def respond(hit: Hit) -> tuple[int, Any]:
        got = hit.headers.get("authorization", "")
        if got != SECRET:
            return 401, {"error": f"bad credentials: {got!r}"}
        if hit.path == "/status":
            return 200, {"status": "running", "result": {"seen": got}}
        return 202, {"accepted": True, "seen": got}

    receiver.respond = respond


def texts_without(secrets: tuple[str, ...], *texts: str) -> None:
    for text in texts:
        for secret in secrets:
            assert secret not in text


@pytest.fixture
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """The service's environment: read when it starts."""
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)


async def test_a_target_demanding_a_token_gets_it_and_the_token_stays_on_the_wire(
    start_service, receiver, credentials, caplog
):
    caplog.set_level(logging.DEBUG)
    guarded(receiver)
    svc = await start_service()
    params = {
        "url": receiver.url(),
        "auth": "partner",  # any case
        "status_url": receiver.url("/status"),
        "status_interval": 0.1,
        "cancel_url": receiver.url("/cancel"),
    }
    created = await svc.client.post(
        "/jobs", json={"id": "a", "backend": "http_webhook", "params": params}
    )
    assert created.status_code == 201, created.text
    job = await svc.wait_state("a", "running")
    assert job["params"]["auth"] == "partner"  # the name only
    assert job["external"] == {"status_code": 202, "response": {"accepted": True, "seen": "***"}}
    await eventually(lambda: receiver.on("/status"))
    assert (await svc.client.post("/jobs/a/cancel")).status_code == 200
    await eventually(lambda: receiver.on("/cancel"))

    assert {h.path: h.headers["authorization"] for h in receiver.hits} == {
        "/hook": SECRET,
        "/status": SECRET,
        "/cancel": SECRET,
    }
    texts_without(
        (TOKEN,),
        (await svc.client.get("/jobs/a")).text,
        (await svc.client.get("/jobs")).text,
        (await svc.client.get("/jobs/a/events")).text,
        (await svc.client.get("/schema/openapi.json")).text,
        caplog.text,
    )


async def test_a_refusal_quoting_the_token_fails_the_job_without_it(
    start_service, receiver, credentials, monkeypatch, caplog
):
    caplog.set_level(logging.DEBUG)
    receiver.respond = lambda hit: (403, {"error": f"{hit.headers['authorization']} is revoked"})
    svc = await start_service()
    job = {
        "id": "r",
        "backend": "http_webhook",
        "params": {"url": receiver.url(), "auth": "PARTNER"},
    }
    assert (await svc.client.post("/jobs", json=job)).status_code == 201
    failed = await svc.wait_state("r", "failed")
    assert failed["error"]["message"].endswith('answered 403: {"error": "*** is revoked"}')
    texts_without(
        (TOKEN,),
        (await svc.client.get("/jobs/r")).text,
        (await svc.client.get("/jobs/r/events")).text,
        caplog.text,
    )


async def test_an_unknown_credential_is_refused_naming_it_and_nothing_is_created(
    start_service, receiver, credentials
):
    svc = await start_service()
    job = {
        "id": "u",
        "backend": "http_webhook",
        "params": {"url": receiver.url(), "auth": "partnr"},
    }
    refused = await svc.client.post("/jobs", json=job)
    assert refused.status_code == 422, refused.text
    message = refused.json()["error"]["message"]
    assert "unknown credential 'partnr'" in message
    assert "this service's credentials: BILLING, PARTNER" in message
    texts_without((TOKEN, "Ymls"), refused.text)
    assert (await svc.client.get("/jobs/u")).status_code == 404
    assert (await svc.client.get("/jobs")).json()["items"] == []
    assert receiver.hits == []


async def test_without_credentials_any_auth_is_refused(start_service, receiver):
    svc = await start_service()
    job = {"backend": "http_webhook", "params": {"url": receiver.url(), "auth": "partner"}}
    refused = await svc.client.post("/jobs", json=job)
    assert refused.status_code == 422
    assert "this service's credentials: none" in refused.json()["error"]["message"]


async def test_the_openapi_document_lists_the_names_and_never_a_value(start_service, credentials):
    svc = await start_service()
    doc = (await svc.client.get("/schema/openapi.json")).json()
    auth = doc["components"]["schemas"]["WebhookParams"]["properties"]["auth"]
    assert "BILLING, PARTNER" in auth["description"]
    assert auth["anyOf"][0]["pattern"] == (
        "^(?:[Bb][Ii][Ll][Ll][Ii][Nn][Gg]|[Pp][Aa][Rr][Tt][Nn][Ee][Rr])$"
    )


def test_tether_serve_knows_the_credential_variables_and_never_logs_them(tmp_path: Path, receiver):
    guarded(receiver)
    proc = TetherProcess(
        tmp_path,
        {
            **CREDENTIALS,
            "TETHER_WEBHOOK_AUTH_partner": "Bearer lower-case-is-no-name",
            "TETHER_STORE": f"sqlite:///{tmp_path}/tether.db",
            "TETHER_LOG_LEVEL": "DEBUG",
        },
    ).start()
    try:
        with httpx.Client(base_url=proc.url, trust_env=False, timeout=10) as client:
            params = {"url": receiver.url(), "auth": "Partner"}
            job = {"id": "p", "backend": "http_webhook", "params": params}
            assert client.post("/jobs", json=job).status_code == 201

            def running() -> dict[str, Any] | None:
                found = client.get("/jobs/p").json()
                return found if found["state"] == "running" else None

            found = wait_until(running, timeout=20)
            assert found["external"]["response"] == {"accepted": True, "seen": "***"}
    finally:
        proc.terminate()
    [hit] = receiver.hits
    assert hit.headers["authorization"] == SECRET
    log = proc.log.read_text()
    for name in CREDENTIALS:  # declared settings: no warning
        assert f"unknown setting {name}" not in log
    assert (
        "unknown setting TETHER_WEBHOOK_AUTH_partner is ignored;"
        " setting names are upper case: TETHER_WEBHOOK_AUTH_PARTNER"
    ) in log
    texts_without((TOKEN, "Ymls", "lower-case-is-no-name"), log)


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("   ", "it holds nothing but spaces; set the Authorization value"),
        ("Bearer s3cret\n", "it holds a control character"),
    ],
)
def test_a_credential_no_header_can_carry_is_refused_never_shown(value: str, said: str):
    """A value of spaces alone was taken, and its jobs sent `Authorization: `
    unauthenticated (found by a QA pass). An empty one declares the name,
    no credential."""
    from plugins.http_webhook import declared_credentials

    with pytest.raises(ValueError) as refused:
        declared_credentials({"TETHER_WEBHOOK_AUTH_SP": value})
    assert str(refused.value).startswith(f"invalid setting TETHER_WEBHOOK_AUTH_SP: {said}")
    assert "s3cret" not in str(refused.value)
    assert declared_credentials({"TETHER_WEBHOOK_AUTH_SP": ""}) == {"SP": ""}
