"""Rotating the notification secret on the real `tether serve`, with the
`standardwebhooks` library as the receivers' check: after
`tether rotate-notify-secret` and a restart, a job's notification verifies
with the old secret and with the new one alone; after `--drop-previous` and a
restart, only with the new. A service still running when the file changes
goes on signing with what it read at start; a message it could not deliver
before the restart is signed with both secrets on its next try. The same through
TETHER_NOTIFY_SECRET and TETHER_NOTIFY_SECRET_PREVIOUS. No secret shows in
the service's log, the jobs, their history, or any command's output but
`tether notify-secret`'s."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from standardwebhooks import Webhook, WebhookVerificationError

from core.store.base import new_notify_secret
from tests.conftest import Receiver, wait_until
from tests.core.test_notify import Delivery, NotifyReceiver
from tests.process import TetherProcess, tether, wait_for


def verifies(secret: str, delivery: Delivery) -> bool:
    try:
        Webhook(secret).verify(delivery.body, delivery.headers)
    except WebhookVerificationError:
        return False
    return True


def finish_job(
    client: httpx.Client, backend: Receiver, notified: NotifyReceiver, job_id: str
) -> None:
    """Start a job asking for a notification to `notified` and cancel it."""
    body = {
        "id": job_id,
        "backend": "http_webhook",
        "params": {"url": backend.url()},
        "notify": {"url": notified.url()},
    }
    answer = client.post("/jobs", json=body)
    assert answer.status_code == 201, answer.text
    wait_for(client, job_id, "running")
    assert client.post(f"/jobs/{job_id}/cancel").status_code == 200


def accepted(notified: NotifyReceiver, job_id: str) -> Delivery:
    """The one notification of `job_id` the receiver accepted, once it has."""

    def delivered() -> list[Delivery]:
        return [d for d in notified.accepted() if d.message["job"]["id"] == job_id]

    found: list[Delivery] = wait_until(delivered, timeout=20)
    assert len(found) == 1
    return found[0]


def shown(client: httpx.Client) -> str:
    """Everything a client may read about the jobs."""
    jobs = client.get("/jobs", params={"limit": 100}).json()["items"]
    history = [client.get(f"/jobs/{job['id']}/events").json() for job in jobs]
    return json.dumps([jobs, history])


def notified_job(
    client: httpx.Client, backend: Receiver, notified: NotifyReceiver, job_id: str
) -> Delivery:
    """Finish a job asking for a notification; the notification accepted."""
    finish_job(client, backend, notified, job_id)
    return accepted(notified, job_id)


def restart(service: TetherProcess, env: dict[str, str]) -> TetherProcess:
    service.terminate()
    return TetherProcess(service.log.parent, env, port=service.port).start()


def test_rotate_notify_secret_then_drop_previous_through_restarts(
    tmp_path: Path, receiver: Receiver
) -> None:
    store = f"sqlite:///{tmp_path}/store/tether.db"
    env = {  # the file's secrets
        "TETHER_STORE": store,
        "TETHER_NOTIFY_SECRET": "",
        "TETHER_NOTIFY_BACKOFF": "0.3",
    }
    notified = NotifyReceiver().start()
    refusing = NotifyReceiver(then=503).start()  # until after the restart
    service = TetherProcess(tmp_path, env).start()
    said: list[str] = []
    try:
        printed = tether("notify-secret", "--store", store)
        old = printed.stdout.strip()
        with service.client() as client:
            before = notified_job(client, receiver, notified, "before")
            assert verifies(old, before) and len(before.headers["webhook-signature"].split()) == 1
            finish_job(client, receiver, refusing, "pending")
            wait_until(lambda: refusing.got, timeout=10)

        rotated = tether("rotate-notify-secret", "--store", store)
        assert rotated.returncode == 0, rotated.stderr
        said.append(rotated.stdout + rotated.stderr)
        new = tether("notify-secret", TETHER_STORE=store).stdout.strip()
        assert new.startswith("whsec_") and new != old
        with service.client() as client:  # not restarted: it signs as it did
            unrestarted = notified_job(client, receiver, notified, "unrestarted")
        assert verifies(old, unrestarted) and not verifies(new, unrestarted)

        service.terminate()
        refused = len(refusing.got)  # tries of the first service
        refusing.then = 200  # the next try, from the restarted service, is accepted
        service = TetherProcess(service.log.parent, env, port=service.port).start()
        with service.client() as client:
            both = notified_job(client, receiver, notified, "both")
            retried = accepted(refusing, "pending")
            page = shown(client)
        for delivery in (both, retried):
            assert len(delivery.headers["webhook-signature"].split()) == 2
            assert verifies(new, delivery) and verifies(old, delivery)  # either receiver
            assert not verifies(new_notify_secret(), delivery)
        for delivery in refusing.got[:refused]:
            assert verifies(old, delivery) and not verifies(new, delivery)
        assert {d.headers["webhook-id"] for d in refusing.got} == {retried.headers["webhook-id"]}

        dropped = tether("rotate-notify-secret", "--drop-previous", "--store", store)
        assert dropped.returncode == 0, dropped.stderr
        assert dropped.stdout.startswith("dropped 1 previous notification secret(s)")
        said.append(dropped.stdout + dropped.stderr)

        service = restart(service, env)
        with service.client() as client:
            after = notified_job(client, receiver, notified, "after")
            page += shown(client)
        assert verifies(new, after) and not verifies(old, after)
        assert len(after.headers["webhook-signature"].split()) == 1
    finally:
        service.kill()
        notified.stop()
        refusing.stop()
    logs = "".join(log.read_text() for log in tmp_path.glob("tether-*.log"))
    for secret in (old, new):
        key = secret.removeprefix("whsec_")
        assert key not in logs + page + "".join(said)


def test_rotation_through_the_environment(tmp_path: Path, receiver: Receiver) -> None:
    """As on Postgres or a Resonate server: the current secret in
    TETHER_NOTIFY_SECRET, the previous ones in TETHER_NOTIFY_SECRET_PREVIOUS
    (a setting `tether serve` knows: no warning about it)."""
    old, new = new_notify_secret(), new_notify_secret()
    store = {"TETHER_STORE": f"sqlite:///{tmp_path}/tether.db"}
    rotating = {"TETHER_NOTIFY_SECRET": new, "TETHER_NOTIFY_SECRET_PREVIOUS": old}
    notified = NotifyReceiver().start()
    service = TetherProcess(tmp_path, {**store, **rotating}).start()
    try:
        with service.client() as client:
            both = notified_job(client, receiver, notified, "both")
            page = shown(client)
        printed = tether("notify-secret", **store, **rotating)
    finally:
        service.kill()
        notified.stop()
    assert printed.stdout == new + "\n"  # the current one, alone
    assert verifies(new, both) and verifies(old, both)
    assert both.headers["webhook-signature"].split()[0].startswith("v1,")
    logged = service.log.read_text()
    assert "unknown setting" not in logged
    for secret in (old, new):
        assert secret.removeprefix("whsec_") not in logged + page


def test_a_restore_keeps_the_stores_own_notification_secret_and_ids(
    tmp_path: Path, receiver: Receiver
) -> None:
    """A backup, then a rotation done in full, then the backup restored in
    place: the backup's (old) secret came back, with nothing said, and every
    message after the restore failed to verify for the receivers, given the
    new one, until given up; and an attempt that ended again after the
    restore was told of under a new `webhook-id`, which a receiver deduping
    on it acted on twice (a QA pass). Now the store's own notification
    secret signs first and the backup's beside it (receivers of a store of
    another deployment, given the backup's, verify too: the next QA pass);
    the restore says so, the start after it says nothing of a disagreement,
    and the id is the same."""
    db = tmp_path / "store" / "tether.db"
    env = {"TETHER_STORE": f"sqlite:///{db}", "TETHER_NOTIFY_SECRET": ""}
    notified = NotifyReceiver().start()
    service = TetherProcess(tmp_path, env).start()
    try:
        old = tether("notify-secret", **env).stdout.strip()
        with service.client() as client:
            body = {
                "id": "twice",
                "backend": "http_webhook",
                "params": {"url": receiver.url()},
                "notify": {"url": notified.url()},
            }
            assert client.post("/jobs", json=body).status_code == 201
            wait_for(client, "twice", "running")
            backup = tmp_path / "backup.db"
            assert tether("backup", str(backup), **env).returncode == 0
            assert client.post("/jobs/twice/cancel").status_code == 200
            first = accepted(notified, "twice")
        assert verifies(old, first)
        service.terminate()
        for rotation in ((), ("--drop-previous",)):
            done = tether("rotate-notify-secret", *rotation, **env)
            assert done.returncode == 0, done.stderr
        new = tether("notify-secret", **env).stdout.strip()
        assert new != old

        done = tether("restore", str(backup), "--force", **env)
        assert done.returncode == 0, done.stderr
        assert (
            f"notifications are signed with the store's own secret and the backup's, in"
            f" {db}.notify-secret: receivers given either verify. Once every receiver has"
            " the store's own, `tether rotate-notify-secret --drop-previous` drops the"
            " backup's (and any other previous one)"
        ) in done.stdout.splitlines()
        service = TetherProcess(service.log.parent, env, port=service.port).start()
        notified.got.clear()
        with service.client() as client:
            assert client.get("/jobs/twice").json()["state"] == "running"  # as backed up
            assert client.post("/jobs/twice/cancel").status_code == 200
            again = accepted(notified, "twice")
        assert verifies(new, again) and verifies(old, again)  # either receiver
        assert again.headers["webhook-id"] == first.headers["webhook-id"]
        assert "disagrees" not in service.log.read_text()
    finally:
        service.kill()
        notified.stop()
