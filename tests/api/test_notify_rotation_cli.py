"""`tether rotate-notify-secret [--drop-previous]`: a new current secret in
the embedded store's `PATH.notify-secret`, the old ones kept as previous (or
forgotten), never a secret printed; `tether notify-secret` goes on printing
the current one alone; backup and restore carry every line. Refused, exit 2,
where no file holds the secret the services sign with. `tether serve` refuses
a malformed TETHER_NOTIFY_SECRET_PREVIOUS without showing it."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from api.cli import cli
from core.settings import Settings
from core.store import open_store
from core.store.base import new_notify_secret
from core.store.embedded import notify_secret_path
from tests.conftest import free_port
from tests.core.test_notify import SECRET
from tests.process import tether


def run(*args: str, **env: str) -> Result:
    """`tether ARGS` in this process, with only `env` set."""
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def opened_once(db: Path) -> None:
    """The store as a service leaves it after its first start: the database
    and its secret files."""

    async def open_and_close() -> None:
        store = await open_store(Settings.from_env({}, store=f"sqlite:///{db}"), "p")
        await store.close()

    asyncio.run(open_and_close())


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def keys(*secrets: str) -> list[str]:
    """What must never be shown: each secret's key."""
    return [secret.removeprefix("whsec_") for secret in secrets]


def test_rotate_rotate_again_and_drop_previous(tmp_path: Path) -> None:
    db = tmp_path / "tether.db"
    store = f"sqlite:///{db}"
    opened_once(db)
    path = notify_secret_path(db)
    [first] = lines(path)

    rotated = run("rotate-notify-secret", "--store", store)
    assert rotated.exit_code == 0, rotated.output
    second, kept = lines(path)
    assert kept == first and second != first and second.startswith("whsec_")
    assert rotated.stdout.startswith(
        f"rotated the notification secret in {path}; messages are also signed with 1"
        " previous secret(s). Restart every `tether serve` using this store now"
    )
    assert "tether rotate-notify-secret --drop-previous" in rotated.stdout
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    printed = run("notify-secret", TETHER_STORE=store)  # receivers get the new one
    assert (printed.exit_code, printed.stdout) == (0, second + "\n")

    again = run("rotate-notify-secret", TETHER_STORE=store)
    assert again.exit_code == 0, again.output
    assert "also signed with 2 previous secret(s)" in again.stdout
    third, *previous = lines(path)
    assert previous == [second, first] and third not in (first, second)
    assert run("notify-secret", "--store", store).stdout == third + "\n"

    dropped = run("rotate-notify-secret", "--drop-previous", "--store", store)
    assert dropped.exit_code == 0, dropped.output
    assert dropped.stdout.startswith(
        f"dropped 2 previous notification secret(s) from {path}. Restart every"
    )
    assert lines(path) == [third]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    none_left = run("rotate-notify-secret", "--drop-previous", "--store", store)
    assert none_left.stdout.startswith("dropped 0 previous notification secret(s)")
    assert run("notify-secret", "--store", store).stdout == third + "\n"

    said = "".join(r.output for r in (rotated, again, dropped, none_left))
    for key in keys(first, second, third):
        assert key not in said
    assert not list(tmp_path.glob(".secret-*"))


def test_backup_and_restore_carry_every_notification_secret(tmp_path: Path) -> None:
    db = tmp_path / "live" / "tether.db"
    store = f"sqlite:///{db}"
    opened_once(db)
    assert run("rotate-notify-secret", "--store", store).exit_code == 0
    kept = notify_secret_path(db).read_text()
    assert len(kept.splitlines()) == 2

    backup = tmp_path / "backup" / "tether.db"
    backup.parent.mkdir()
    done = run("backup", str(backup), "--store", store)
    assert done.exit_code == 0, done.output
    assert notify_secret_path(backup).read_text() == kept
    said = f"notification secrets copied to {notify_secret_path(backup)} (mode 0600)"
    assert said in done.output  # every path written is named
    restored = tmp_path / "restored" / "tether.db"
    done = run("restore", str(backup), "--store", f"sqlite:///{restored}")
    assert done.exit_code == 0, done.output
    assert notify_secret_path(restored).read_text() == kept
    assert f"notification secrets copied to {notify_secret_path(restored)}" in done.output
    assert stat.S_IMODE(notify_secret_path(restored).stat().st_mode) == 0o600
    for key in keys(*kept.split()):
        assert key not in done.output


@pytest.mark.parametrize(
    ("env", "says"),
    [
        (
            {"TETHER_STORE": "postgresql://tether:pw@127.0.0.1:1/tether"},
            "postgresql://***@127.0.0.1:1/tether keeps no notification secret file: rotate the"
            " notification secret through TETHER_NOTIFY_SECRET and"
            " TETHER_NOTIFY_SECRET_PREVIOUS on every host (docs/operations.md,"
            ' "Changing the secret")',
        ),
        (
            {"TETHER_STORE": "memory://"},
            "tether rotate-notify-secret works on the embedded store"
            " (TETHER_STORE=sqlite:///PATH), not memory://: memory:// keeps nothing beyond"
            " its process",
        ),
        (
            {"TETHER_STORE": "https://resonate.example.com:8001"},
            "tether rotate-notify-secret works on the embedded store"
            " (TETHER_STORE=sqlite:///PATH), not https://resonate.example.com:8001",
        ),
        (
            {"TETHER_NOTIFY_SECRET": SECRET},
            "TETHER_NOTIFY_SECRET is set, so services sign with it and not with the file"
            " {db}.notify-secret: rotate it through TETHER_NOTIFY_SECRET and"
            " TETHER_NOTIFY_SECRET_PREVIOUS (docs/operations.md)",
        ),
    ],
    ids=["postgres", "memory", "resonate", "setting"],
)
@pytest.mark.parametrize("drop", [False, True], ids=["rotate", "drop"])
def test_rotate_notify_secret_refuses_where_no_file_holds_the_secret(
    tmp_path: Path, env: dict[str, str], says: str, drop: bool
) -> None:
    db = tmp_path / "tether.db"
    path = notify_secret_path(db)
    path.write_text(f"{SECRET}\n")
    flags = ["--drop-previous"] if drop else []
    done = run("rotate-notify-secret", *flags, **{"TETHER_STORE": f"sqlite:///{db}", **env})
    assert done.exit_code == 2
    assert done.stderr == f"tether: {says.format(db=db)}\n"
    assert done.stdout == ""
    assert "pw" not in done.stderr and keys(SECRET)[0] not in done.stderr
    assert path.read_text() == f"{SECRET}\n"


def test_rotate_notify_secret_refuses_a_store_with_no_file_yet(tmp_path: Path) -> None:
    db = tmp_path / "tether.db"
    done = run("rotate-notify-secret", "--store", f"sqlite:///{db}")
    assert (done.exit_code, done.stdout) == (2, "")
    assert done.stderr == (
        f"tether: no notification secret file {db}.notify-secret: a service makes one when"
        " it first opens the store\n"
    )
    assert list(tmp_path.iterdir()) == []  # it never makes one


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("\n \n", "the notification secret file {path} is empty"),
        (f"{SECRET}\nwhsec_c2hvcnQ=\n", "the notification secret file {path} (line 2) holds 5"),
    ],
    ids=["empty", "damaged"],
)
@pytest.mark.parametrize("drop", [False, True], ids=["rotate", "drop"])
def test_rotate_notify_secret_refuses_a_damaged_file_unchanged_and_unshown(
    tmp_path: Path, content: str, says: str, drop: bool
) -> None:
    db = tmp_path / "tether.db"
    path = notify_secret_path(db)
    path.write_text(content)
    flags = ["--drop-previous"] if drop else []
    done = run("rotate-notify-secret", *flags, "--store", f"sqlite:///{db}")
    assert (done.exit_code, done.stdout) == (2, "")
    assert done.stderr.startswith(f"tether: {says.format(path=path)}"), done.stderr
    assert "c2hvcnQ" not in done.stderr and keys(SECRET)[0] not in done.stderr
    assert path.read_text() == content
    printed = run("notify-secret", "--store", f"sqlite:///{db}")  # nor is it printed
    assert (printed.exit_code, printed.stdout) == (2, "")


def test_serve_refuses_a_malformed_previous_secret_without_showing_it(tmp_path: Path) -> None:
    done = tether(
        "serve",
        TETHER_NOTIFY_SECRET_PREVIOUS=f"{SECRET},whsec_bm90LWEta2V5",  # 9 bytes
        TETHER_STORE=f"sqlite:///{tmp_path}/t.db",
        TETHER_PORT=str(free_port()),
    )
    assert done.returncode == 2, done.stderr
    assert (
        "tether: TETHER_NOTIFY_SECRET_PREVIOUS (item 2 of 2) holds 9 bytes, not 24 to 64"
        in done.stderr
    )
    assert "bm90LWEta2V5" not in done.stderr + done.stdout
    assert keys(SECRET)[0] not in done.stderr + done.stdout
    assert not (tmp_path / "t.db").exists()


def test_notify_secret_prints_the_current_secret_alone_and_checks_the_previous_ones(
    tmp_path: Path,
) -> None:
    store = f"sqlite:///{tmp_path}/t.db"
    alone = run("notify-secret", TETHER_STORE=store, TETHER_NOTIFY_SECRET_PREVIOUS=SECRET)
    assert (alone.exit_code, alone.stdout) == (2, "")  # no file yet, and no current setting
    assert alone.stderr.startswith("tether: no notification secret file")
    current = new_notify_secret()
    both = {"TETHER_NOTIFY_SECRET": current, "TETHER_NOTIFY_SECRET_PREVIOUS": SECRET}
    printed = run("notify-secret", TETHER_STORE=store, **both)
    assert (printed.exit_code, printed.stdout, printed.stderr) == (0, current + "\n", "")
    bad = {**both, "TETHER_NOTIFY_SECRET_PREVIOUS": "whsec_bm90LWEta2V5"}
    refused = run("notify-secret", TETHER_STORE=store, **bad)
    assert (refused.exit_code, refused.stdout) == (2, "")
    assert refused.stderr.startswith(
        "tether: TETHER_NOTIFY_SECRET_PREVIOUS (item 1 of 1) holds 9 bytes, not 24 to 64"
    )
    assert "bm90LWEta2V5" not in refused.stderr and keys(current)[0] not in refused.stderr


def test_notify_secret_warns_while_the_services_sign_with_the_secret_before(
    tmp_path: Path,
) -> None:
    """Printed right after a rotation, the new secret is one the running
    services do not sign with until their next start: given to receivers
    then, each notification is refused (retried until the restart). Only
    `--help` said so (an open item of earlier notes); the warning goes to
    stderr, the secret alone to stdout."""
    from api.cli import preflight
    from core.plugins import Plugins, make_plugin_manager

    db = tmp_path / "t.db"
    store = f"sqlite:///{db}"
    plugins = Plugins(make_plugin_manager(entry_points=False))

    def serve_starts() -> None:  # what `tether serve` records at start
        settings = Settings.from_env({}, store=store)
        assert asyncio.run(preflight(settings, plugins)) is None

    opened_once(db)
    printed = run("notify-secret", "--store", store)
    assert (printed.exit_code, printed.stderr) == (0, "")  # no start recorded: nothing to say
    serve_starts()
    assert run("notify-secret", "--store", store).stderr == ""
    assert run("rotate-notify-secret", "--store", store).exit_code == 0
    printed = run("notify-secret", "--store", store)
    assert printed.exit_code == 0 and printed.stdout == lines(notify_secret_path(db))[0] + "\n"
    assert printed.stderr.startswith(
        "tether: warning: the services of this store started last before this secret was"
    )
    assert "Restart every `tether serve`" in printed.stderr
    serve_starts()
    assert run("notify-secret", "--store", store).stderr == ""


def test_rotate_secret_force_without_drop_previous_is_a_usage_error(tmp_path: Path) -> None:
    """`--force` goes with `--drop-previous`; alone it was ignored, and the
    command rotated the secret again, the opposite of what was meant (found
    by a QA pass, 2026-12-07). Nothing is changed."""
    db = tmp_path / "tether.db"
    opened_once(db)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    done = run("rotate-secret", "--force", "--store", f"sqlite:///{db}")
    assert done.exit_code == 2, done.output
    assert "--force goes with --drop-previous" in done.output
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
