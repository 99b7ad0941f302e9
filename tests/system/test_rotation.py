"""Rotating the callback secret on the real `tether serve`: URLs handed out
before a rotation keep working after the restart, new ones are signed with the
new secret, and once the previous secret is dropped the old URLs answer 401.
On the embedded store through `tether rotate-secret`; on any store through
TETHER_CALLBACK_SECRET and TETHER_CALLBACK_SECRET_PREVIOUS."""

from __future__ import annotations

import stat
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from core.tokens import CallbackSigner
from tests.conftest import Receiver
from tests.process import TetherProcess, tether, wait_for


def start_job(client: httpx.Client, receiver: Receiver, job_id: str) -> str:
    """Start a job and return the callback URL its trigger carried."""
    answer = client.post(
        "/jobs", json={"id": job_id, "backend": "http_webhook", "params": {"url": receiver.url()}}
    )
    assert answer.status_code == 201, answer.text
    wait_for(client, job_id, "running")
    [url] = [h.body["callback_url"] for h in receiver.hits if h.body["job_id"] == job_id]
    return str(url)


def token_of(url: str) -> str:
    return parse_qs(urlsplit(url).query)["token"][0]


def complete(url: str) -> int:
    return httpx.post(url, json={"status": "succeeded"}, trust_env=False, timeout=10).status_code


def restart(service: TetherProcess, env: dict[str, str]) -> TetherProcess:
    """Stop `service` and start it again on the same port (its callback URLs
    name it) with `env`."""
    service.terminate()
    return TetherProcess(service.log.parent, env, port=service.port).start()


def test_rotate_secret_keeps_waiting_jobs_and_drop_previous_ends_the_old_urls(
    tmp_path: Path, receiver: Receiver
) -> None:
    db = tmp_path / "store" / "tether.db"
    store = f"sqlite:///{db}"
    env = {"TETHER_STORE": store, "TETHER_CALLBACK_SECRET": ""}  # the file's secret
    service = TetherProcess(tmp_path, env).start()
    try:
        with service.client() as client:
            early = start_job(client, receiver, "early")
            also_early = start_job(client, receiver, "also-early")
        [old] = (db.parent / "tether.db.secret").read_text().split()

        rotated = tether("rotate-secret", "--store", store)  # the service still runs
        assert rotated.returncode == 0, rotated.stderr
        assert "1 previous secret(s) still accepted" in rotated.stdout
        assert "Restart" in rotated.stdout
        secret_file = db.parent / "tether.db.secret"
        new, kept = secret_file.read_text().split()
        assert kept == old and new != old
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
        assert old not in rotated.stdout + rotated.stderr
        assert new not in rotated.stdout + rotated.stderr
        # Dropped now, every waiting job's URL would answer 401: refused (it
        # was done without a word, a QA pass, 2026-12-06)
        not_yet = tether("rotate-secret", "--drop-previous", "--store", store)
        assert not_yet.returncode == 2, not_yet.stdout
        assert "has not started since the callback secret was rotated" in not_yet.stderr
        assert "(2 now)" in not_yet.stderr
        assert secret_file.read_text().split() == [new, old]

        service = restart(service, env)
        with service.client() as client:
            assert complete(early) == 200  # signed with the old secret, before the rotation
            assert wait_for(client, "early", "succeeded")
            late = start_job(client, receiver, "late")
            assert token_of(late) == CallbackSigner(new, service.url).token("late:1")
            assert token_of(late) != CallbackSigner(old, service.url).token("late:1")

        waits = tether("rotate-secret", "--drop-previous", TETHER_STORE=store)
        assert waits.returncode == 2, waits.stdout  # also-early waits on an old URL
        assert "1 job(s) created before the last start" in waits.stderr, waits.stderr
        assert "--created-before" in waits.stderr and "--force" in waits.stderr
        assert secret_file.read_text().split() == [new, old]
        dropped = tether("rotate-secret", "--drop-previous", "--force", TETHER_STORE=store)
        assert dropped.returncode == 0, dropped.stderr
        assert dropped.stdout.startswith("dropped 1 previous callback secret(s)")
        assert secret_file.read_text().split() == [new]
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600

        service = restart(service, env)
        with service.client() as client:
            assert complete(also_early) == 401  # as any wrong token
            assert client.get("/jobs/also-early").json()["state"] == "running"
            assert complete(late) == 200
            wait_for(client, "late", "succeeded")
        again = tether("rotate-secret", "--drop-previous", "--store", store)
        assert again.stdout.startswith("dropped 0 previous callback secret(s)")
        # once no job waits from before the last start, a plain drop goes through
        with service.client() as client:
            assert client.post("/jobs/also-early/cancel").status_code == 200
        assert tether("rotate-secret", "--store", store).returncode == 0
        service = restart(service, env)
        dropped = tether("rotate-secret", "--drop-previous", "--store", store)
        assert dropped.returncode == 0, dropped.stderr
        assert dropped.stdout.startswith("dropped 1 previous callback secret(s)")
    finally:
        service.kill()
    logged = service.log.read_text()
    assert old not in logged and new not in logged


def test_rotation_through_the_environment(tmp_path: Path, receiver: Receiver) -> None:
    """TETHER_CALLBACK_SECRET_PREVIOUS (comma-separated) keeps the old URLs
    working; without it they answer 401. As on Postgres, where no file is kept."""
    store = {"TETHER_STORE": f"sqlite:///{tmp_path}/tether.db"}
    service = TetherProcess(tmp_path, {**store, "TETHER_CALLBACK_SECRET": "old-1"}).start()
    try:
        with service.client() as client:
            early = start_job(client, receiver, "early")
            also_early = start_job(client, receiver, "also-early")

        rotated = {"TETHER_CALLBACK_SECRET": "new-2", "TETHER_CALLBACK_SECRET_PREVIOUS": "x, old-1"}
        service = restart(service, {**store, **rotated})
        with service.client() as client:
            assert complete(early) == 200
            wait_for(client, "early", "succeeded")
            late = start_job(client, receiver, "late")
            assert token_of(late) == CallbackSigner("new-2", service.url).token("late:1")

        service = restart(service, {**store, "TETHER_CALLBACK_SECRET": "new-2"})
        with service.client() as client:
            assert complete(also_early) == 401
            assert complete(late) == 200
            wait_for(client, "late", "succeeded")
    finally:
        service.kill()
    logged = service.log.read_text()
    assert "old-1" not in logged and "new-2" not in logged


def test_a_rolling_rotation_never_refuses_a_url_any_host_handed_out(
    tmp_path: Path, receiver: Receiver
) -> None:
    """docs/operations.md's procedure for many hosts, with two services on one
    store as the hosts: first every host accepts the new secret while still
    signing with the old one; then, host by host, it signs with the new one.
    A URL signed either way is accepted by either host."""
    store = {"TETHER_STORE": f"sqlite:///{tmp_path}/tether.db"}
    staged = {"TETHER_CALLBACK_SECRET": "old", "TETHER_CALLBACK_SECRET_PREVIOUS": "new"}
    switched = {"TETHER_CALLBACK_SECRET": "new", "TETHER_CALLBACK_SECRET_PREVIOUS": "old"}
    a = TetherProcess(tmp_path, {**store, **staged}).start()  # not switched yet
    b = TetherProcess(tmp_path, {**store, **switched}).start()  # already switched
    try:
        with a.client() as client:
            start_job(client, receiver, "job")
            for host in (a, b):
                for secret in ("new", "old"):
                    url = CallbackSigner(secret, host.url).url("job:1")
                    assert complete(url) == 200, (host.url, secret)  # accepted, then duplicate
                assert complete(CallbackSigner("other", host.url).url("job:1")) == 401
            wait_for(client, "job", "succeeded")
    finally:
        a.kill()
        b.kill()


@pytest.mark.parametrize(
    ("env", "says"),
    [
        (
            {"TETHER_STORE": "postgresql://tether:pw@127.0.0.1:1/tether"},
            "postgresql://***@127.0.0.1:1/tether keeps no secret file: rotate the callback"
            " secret through TETHER_CALLBACK_SECRET and TETHER_CALLBACK_SECRET_PREVIOUS on"
            ' every host (docs/operations.md, "Rotating the callback secret")',
        ),
        (
            {"TETHER_STORE": "memory://"},
            "tether rotate-secret works on the embedded store (TETHER_STORE=sqlite:///PATH),"
            " not memory://: memory:// keeps nothing beyond its process",
        ),
        (
            {"TETHER_CALLBACK_SECRET": "env-secret-123"},
            "TETHER_CALLBACK_SECRET is set, so services sign with it and not with the file"
            " {db}.secret: rotate it through TETHER_CALLBACK_SECRET and"
            " TETHER_CALLBACK_SECRET_PREVIOUS (docs/operations.md)",
        ),
    ],
)
def test_rotate_secret_refuses_where_no_file_holds_the_secret(
    tmp_path: Path, env: dict[str, str], says: str
) -> None:
    db = tmp_path / "tether.db"
    (tmp_path / "tether.db.secret").write_text("kept-secret-456\n")
    done = tether("rotate-secret", **{"TETHER_STORE": f"sqlite:///{db}", **env})
    assert done.returncode == 2
    assert done.stderr == f"tether: {says.format(db=db)}\n"
    assert done.stdout == ""
    assert "pw" not in done.stderr and "env-secret-123" not in done.stderr
    assert (tmp_path / "tether.db.secret").read_text() == "kept-secret-456\n"


def test_rotate_secret_refuses_a_store_with_no_secret_file(tmp_path: Path) -> None:
    db = tmp_path / "tether.db"
    done = tether("rotate-secret", "--store", f"sqlite:///{db}")
    assert done.returncode == 2
    assert done.stderr == (
        f"tether: no callback secret file {db}.secret: a service makes one when it first"
        " opens the store\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_rotate_secret_refuses_an_empty_secret_file(tmp_path: Path) -> None:
    db = tmp_path / "tether.db"
    (tmp_path / "tether.db.secret").write_text("\n")
    done = tether("rotate-secret", "--store", f"sqlite:///{db}")
    assert (done.returncode, done.stderr) == (
        2,
        f"tether: the callback secret file {db}.secret is empty\n",
    )
    assert (tmp_path / "tether.db.secret").read_text() == "\n"
