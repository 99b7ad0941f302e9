"""`tether notify-secret` (a local command: it reads the local store's secret
file, or TETHER_NOTIFY_SECRET) and `tether submit --notify URL`, against a
real `tether serve` and a real notification receiver: the secret printed is
the one the service signs with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from api.cli import cli
from core.store.embedded import notify_secret_path
from tests.conftest import free_port, wait_until
from tests.core.test_notify import SECRET, TOKEN, NotifyReceiver, verify
from tests.process import TetherProcess, tether


def notify_secret(*args: str, **env: str) -> Result:
    """`tether notify-secret ARGS` in this process, with only `env` set."""
    return CliRunner().invoke(cli, ["notify-secret", *args], env=env, catch_exceptions=False)


def test_notify_secret_prints_the_secret_the_service_signs_with_and_submit_notify_uses_it(
    tmp_path, receiver
):
    store = f"sqlite:///{tmp_path}/tether.db"
    notified = NotifyReceiver().start()
    proc = TetherProcess(tmp_path, {"TETHER_STORE": store}).start()
    try:
        submitted = tether(
            "submit",
            "http_webhook",
            "--id",
            "cli",
            "--params",
            json.dumps({"url": receiver.url()}),
            "--notify",
            notified.url(),
            "--json",
            TETHER_URL=proc.url,
        )
        assert submitted.returncode == 0, submitted.stderr
        assert json.loads(submitted.stdout)["notify"] == {"origin": notified.origin}
        params = json.dumps({"url": receiver.url()})
        for bad in ("ftp://hooks.example.com/x", "https://u:p@hooks.example.com/x"):
            refused = CliRunner().invoke(
                cli,
                ["submit", "http_webhook", "--id", "bad", "--params", params, "--notify", bad],
                env={"TETHER_URL": proc.url},
            )
            assert refused.exit_code == 4 and refused.stdout == ""
            assert "notify.url" in refused.stderr and "(HTTP 400)" in refused.stderr
        with proc.client() as client:
            assert client.get("/jobs/bad").status_code == 404  # nothing was created
            wait_until(lambda: client.get("/jobs/cli").json()["state"] == "running")
            assert client.post("/jobs/cli/cancel").status_code == 200
        wait_until(lambda: notified.accepted(), timeout=10)
        printed = tether("notify-secret", "--store", store)
        by_env = notify_secret(TETHER_STORE=store)
    finally:
        proc.kill()
        notified.stop()
    assert printed.returncode == 0, printed.stderr
    secret = printed.stdout.removesuffix("\n")
    assert secret.startswith("whsec_") and "\n" not in secret and printed.stderr == ""
    assert by_env.stdout == printed.stdout
    assert secret == notify_secret_path(tmp_path / "tether.db").read_text().strip()
    verify(secret, notified.got[0])
    assert notified.got[0].path == f"/hooks/{TOKEN}?key=q-{TOKEN}"
    assert TOKEN not in submitted.stdout + proc.log.read_text()


def test_notify_secret_prints_tether_notify_secret_when_it_is_set(tmp_path):
    done = notify_secret(TETHER_NOTIFY_SECRET=SECRET, TETHER_STORE=f"sqlite:///{tmp_path}/t.db")
    assert (done.exit_code, done.stdout, done.stderr) == (0, SECRET + "\n", "")
    on_postgres = notify_secret(
        TETHER_NOTIFY_SECRET=SECRET, TETHER_STORE="postgresql://u:pw@db.example.com/tether"
    )
    assert (on_postgres.exit_code, on_postgres.stdout) == (0, SECRET + "\n")


def test_serve_refuses_a_malformed_notify_secret_at_start_without_showing_it(tmp_path):
    value = "whsec_" + "c2VjcmV0" * 2  # 12 bytes: too short
    done = tether(
        "serve",
        TETHER_NOTIFY_SECRET=value,
        TETHER_STORE=f"sqlite:///{tmp_path}/t.db",
        TETHER_PORT=str(free_port()),
    )
    assert done.returncode == 2, done.stderr
    assert "tether: TETHER_NOTIFY_SECRET holds 12 bytes, not 24 to 64" in done.stderr
    assert "c2VjcmV0" not in done.stderr + done.stdout
    assert not (tmp_path / "t.db").exists()


def test_notify_secret_refuses_a_malformed_setting_without_showing_it(tmp_path):
    value = "whsec_not-base64-but-secret"
    done = notify_secret(TETHER_NOTIFY_SECRET=value, TETHER_STORE=f"sqlite:///{tmp_path}/t.db")
    assert done.exit_code == 2 and done.stdout == ""
    assert done.stderr.startswith("tether: TETHER_NOTIFY_SECRET is not whsec_ followed by base64")
    assert "not-base64-but-secret" not in done.output


@pytest.mark.parametrize(
    ("store", "says"),
    [
        (
            "postgresql://u:pw@db.example.com/tether",
            "tether: postgresql://***@db.example.com/tether keeps no notification secret:"
            " set TETHER_NOTIFY_SECRET",
        ),
        ("memory://", "tether: tether notify-secret works on the embedded store"),
        ("sqlite:///{tmp}/never.db", "tether: no notification secret file {tmp}/never.db."),
    ],
)
def test_notify_secret_refuses_a_store_without_a_secret_to_print(tmp_path, store, says):
    done = notify_secret(TETHER_STORE=store.format(tmp=tmp_path))
    assert done.exit_code == 2 and done.stdout == ""
    assert done.stderr.startswith(says.format(tmp=tmp_path)), done.stderr
    assert "pw" not in done.stderr
    assert not list(Path(tmp_path).iterdir())  # it reads; it never makes one


def test_notify_secret_names_a_damaged_secret_file_without_showing_it(tmp_path):
    path = notify_secret_path(tmp_path / "t.db")
    path.write_text("whsec_c2hvcnQ=\n")  # base64 of 5 bytes
    done = notify_secret("--store", f"sqlite:///{tmp_path}/t.db")
    assert done.exit_code == 2
    assert done.stderr.startswith(
        f"tether: the notification secret file {path} holds 5 bytes, not 24 to 64"
    )
    assert "c2hvcnQ" not in done.stderr
