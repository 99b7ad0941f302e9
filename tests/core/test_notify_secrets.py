"""Rotating the notification secret (`core/notify.py`, `core/store`): while
previous secrets are kept, each message's `webhook-signature` carries one
`v1,` signature per secret, current first, and the `standardwebhooks` library
(what receivers use) verifies the message with any one of them alone. The
previous secrets come from `TETHER_NOTIFY_SECRET_PREVIOUS` (any store) or
from the embedded store's `PATH.notify-secret` lines after the first; a
malformed one is refused naming where it is, never showing it."""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from core.errors import StoreConfigError
from core.notify import signature
from core.plugins import Plugins, make_plugin_manager
from core.settings import Settings, unknown_env
from core.store import open_store
from core.store.base import new_notify_secret
from core.store.embedded import (
    drop_previous_notify_secrets,
    notify_secret_path,
    notify_secrets,
    read_notify_secret,
    rotate_notify_secret,
)
from tests.conftest import eventually
from tests.core.test_notify import SECRET, TOKEN, NotifyReceiver, canceled_job, events, serve

OLD = SECRET
NEW = "whsec_" + base64.b64encode(b"the new key of the notifications").decode()
OTHER = new_notify_secret()


@pytest.fixture
def notified() -> Iterator[NotifyReceiver]:
    receiver = NotifyReceiver().start()
    yield receiver
    receiver.stop()


def verifies(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """Whether the Standard Webhooks library, given `secret` alone, accepts
    the message (`verify` raises when no signature of the header matches)."""
    try:
        Webhook(secret).verify(body, headers)
    except WebhookVerificationError:
        return False
    return True


def test_the_header_has_a_signature_per_secret_current_first_and_each_alone_verifies():
    seconds = int(time.time())
    body = '{"type": "job.finished"}'
    header = signature([Webhook(NEW), Webhook(OLD)], "msg_1", seconds, body)
    at = datetime.fromtimestamp(seconds, UTC)
    assert header.split(" ") == [
        Webhook(NEW).sign("msg_1", at, body),
        Webhook(OLD).sign("msg_1", at, body),
    ]
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(seconds)}
    signed = {**headers, "webhook-signature": header}
    assert verifies(NEW, signed, body.encode()) and verifies(OLD, signed, body.encode())
    assert not verifies(OTHER, signed, body.encode())  # the check can fail
    assert not verifies(OLD, {**signed, "webhook-id": "msg_2"}, body.encode())
    only_new = {**headers, "webhook-signature": signature([Webhook(NEW)], "msg_1", seconds, body)}
    assert verifies(NEW, only_new, body.encode()) and not verifies(OLD, only_new, body.encode())


async def test_a_service_with_previous_secrets_signs_each_message_with_all_of_them(
    start_service, receiver, notified, caplog
):
    """TETHER_NOTIFY_SECRET_PREVIOUS, as on Postgres or a Resonate server
    (whatever store this run's tests use): the current secret first."""
    caplog.set_level(logging.DEBUG)
    svc = await serve(
        start_service, notify_secret=NEW, notify_secret_previous=f" {OLD}, ,{NEW},{OTHER}"
    )
    assert svc.tether.store.notify_secrets == (NEW, OLD, OTHER)  # blanks, repeats dropped
    await canceled_job(svc, receiver, "rot", notified.url())
    await eventually(lambda: notified.accepted())
    delivery = notified.got[0]
    at = datetime.fromtimestamp(int(delivery.headers["webhook-timestamp"]), UTC)
    body = delivery.body.decode()
    webhook_id = delivery.headers["webhook-id"]
    expected = [Webhook(key).sign(webhook_id, at, body) for key in (NEW, OLD, OTHER)]
    assert delivery.headers["webhook-signature"].split(" ") == expected
    for secret in (NEW, OLD, OTHER):
        assert verifies(secret, delivery.headers, delivery.body), secret
    assert not verifies(new_notify_secret(), delivery.headers, delivery.body)
    history = str(await events(svc, "rot")) + str((await svc.client.get("/jobs/rot")).json())
    for secret in (NEW, OLD, OTHER):
        key = secret.removeprefix("whsec_")
        assert key not in history + caplog.text + repr(svc.settings)
    assert TOKEN not in caplog.text


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("s3cr3t-value", "(item 1 of 1) does not start with whsec_"),
        (f"{OLD},whsec_s3cr3t-value_", "(item 2 of 2) is not whsec_ followed by base64"),
        (
            f"{OLD}, whsec_" + base64.b64encode(b"s3cr3t").decode(),
            "(item 2 of 2) holds 6 bytes, not 24 to 64",
        ),
    ],
)
@pytest.mark.parametrize("store", ["sqlite:///{tmp}/t.db", "postgresql://u:pw@127.0.0.1:1/t"])
async def test_a_malformed_previous_secret_is_refused_naming_the_setting_not_the_value(
    tmp_path, value, problem, store
):
    settings = Settings.from_env(
        {},
        store=store.format(tmp=tmp_path),
        callback_secret="c",
        notify_secret=NEW,
        notify_secret_previous=value,
    )
    with pytest.raises(StoreConfigError) as refused:
        await open_store(settings, "p")
    said = str(refused.value)
    assert said.startswith(f"TETHER_NOTIFY_SECRET_PREVIOUS {problem}"), said
    assert "s3cr3t" not in said and OLD.removeprefix("whsec_") not in said
    assert not list(tmp_path.iterdir())  # refused before anything was made


@pytest.mark.parametrize(
    "store", ["postgresql://u:pw@127.0.0.1:1/t", "http://127.0.0.1:1"], ids=["postgres", "resonate"]
)
async def test_previous_secrets_without_a_current_one_are_refused_where_none_is_kept(store):
    settings = Settings.from_env(
        {}, store=store, index="sqlite:///x.db", callback_secret="c", notify_secret_previous=OLD
    )
    with pytest.raises(StoreConfigError) as refused:
        await open_store(settings, "p")
    said = str(refused.value)
    assert said.startswith("TETHER_NOTIFY_SECRET_PREVIOUS is set but TETHER_NOTIFY_SECRET is not")
    assert OLD.removeprefix("whsec_") not in said and "pw" not in said


async def test_the_embedded_store_signs_with_every_line_of_its_file_then_the_setting(tmp_path):
    db = tmp_path / "t.db"
    notify_secret_path(db).write_text(f"{NEW}\n\n{OLD}\n")
    opened = await open_store(Settings.from_env({}, store=f"sqlite:///{db}"), "p1")
    try:
        assert opened.notify_secrets == (NEW, OLD)
    finally:
        await opened.close()
    with_setting = Settings.from_env({}, store=f"sqlite:///{db}", notify_secret_previous=OTHER)
    opened = await open_store(with_setting, "p2")
    try:
        assert opened.notify_secrets == (NEW, OLD, OTHER)  # the file's, then the setting's
    finally:
        await opened.close()


async def test_a_malformed_line_of_the_file_is_named_by_its_number_not_shown(tmp_path):
    db = tmp_path / "t.db"
    path = notify_secret_path(db)
    path.write_text(f"{NEW}\nwhsec_not base64!\n")
    with pytest.raises(StoreConfigError) as refused:
        await open_store(Settings.from_env({}, store=f"sqlite:///{db}"), "p")
    assert f"the notification secret file {path} (line 2) is not whsec_" in str(refused.value)
    assert "not base64!" not in str(refused.value)
    assert NEW.removeprefix("whsec_") not in str(refused.value)
    path.write_text(" \n\n")
    with pytest.raises(StoreConfigError, match=r"notification secret file .* is empty"):
        read_notify_secret(path)


def test_rotate_then_drop_keeps_the_file_private_and_in_order(tmp_path):
    db = tmp_path / "t.db"
    [first] = notify_secrets(db)  # made as a service's first start makes it
    assert rotate_notify_secret(db) == 1
    second, kept = notify_secret_path(db).read_text().split("\n")[:2]
    assert kept == first and second != first
    assert read_notify_secret(notify_secret_path(db)) == second
    assert rotate_notify_secret(db) == 2
    third, *rest = notify_secrets(db)
    assert rest == [second, first]
    assert notify_secret_path(db).stat().st_mode & 0o777 == 0o600
    assert drop_previous_notify_secrets(db) == 2
    assert notify_secret_path(db).read_text() == f"{third}\n"
    assert drop_previous_notify_secrets(db) == 0
    assert notify_secret_path(db).stat().st_mode & 0o777 == 0o600
    assert not list(tmp_path.glob(".secret-*"))  # no temporary file left


def test_the_setting_is_known_and_masked():
    names = Plugins(make_plugin_manager(entry_points=False)).setting_names()
    env = {"TETHER_NOTIFY_SECRET_PREVIOUS": OLD, "TETHER_NOTIFY_SECRET_PREVIOS": OLD}
    assert unknown_env(names, env) == [
        ("TETHER_NOTIFY_SECRET_PREVIOS", "TETHER_NOTIFY_SECRET_PREVIOUS")
    ]
    settings = Settings.from_env(env)
    assert settings.notify_secret_previous == OLD
    assert OLD.removeprefix("whsec_") not in repr(settings)
    assert "notify_secret_previous='***'" in repr(settings)
