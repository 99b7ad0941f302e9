"""`tether backup` and `tether restore` on the real `tether serve`: a backup
taken while jobs are being created and settled restores into a new place where
a new service finds every job as it was, and every job that was waiting still
takes its callback URL (the secret came along). And the cases they refuse."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import stat
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Hit, Receiver, wait_until
from tests.process import TetherProcess, tether, wait_for

FINISHED = {"succeeded", "failed", "canceled", "timed_out"}


def number(job_id: str) -> int:
    return int(job_id.rsplit("-", 1)[1])


def jobs_in(db: Path) -> dict[str, tuple[str, Any, str]]:
    """Each job of a store file: (state, result, state of its callback promise)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute(
            "SELECT j.id, j.state, j.result, p.state FROM tether_jobs j"
            " LEFT JOIN r_promises p ON p.id = j.id || ':1'"
        ).fetchall()
    conn.close()
    return {i: (s, None if r is None else json.loads(r), p) for i, s, r, p in rows}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_backup_taken_under_load_restores_every_job_and_callback_url(
    tmp_path: Path, receiver: Receiver
) -> None:
    live = tmp_path / "live" / "tether.db"
    env = {"TETHER_STORE": f"sqlite:///{live}", "TETHER_CALLBACK_SECRET": ""}
    service = TetherProcess(tmp_path, env).start()
    stop = threading.Event()
    created: list[str] = []
    settled: list[int] = []

    def create(first: int) -> None:
        with service.client() as client:
            n = first
            while not stop.wait(0.02):
                job_id, params = f"job-{n}", {"url": receiver.url()}
                job = {"id": job_id, "backend": "http_webhook", "params": params}
                assert client.post("/jobs", json=job).status_code == 201
                created.append(job_id)
                n += 2

    def settle_even_jobs() -> None:
        """The external system: calls back once for each even-numbered job."""
        seen = 0
        while not stop.wait(0.01):
            hits, seen = receiver.hits[seen:], len(receiver.hits)
            for hit in hits:
                if number(hit.body["job_id"]) % 2 == 0:
                    body = {"status": "succeeded", "result": {"n": number(hit.body["job_id"])}}
                    url = hit.body["callback_url"]
                    answer = httpx.post(url, json=body, trust_env=False, timeout=10)
                    settled.append(answer.status_code)

    load = [threading.Thread(target=create, args=(first,)) for first in (0, 1)]
    load.append(threading.Thread(target=settle_even_jobs))
    for thread in load:
        thread.start()
    backup = tmp_path / "backups" / "tether-backup.db"
    try:
        wait_until(lambda: len(settled) >= 20, timeout=30)
        before = len(created)
        done = tether("backup", str(backup), TETHER_STORE=f"sqlite:///{live}")
        during = len(created) - before
    finally:
        stop.set()
        for thread in load:
            thread.join()
    service.kill()  # the host is lost
    assert done.returncode == 0, done.stderr
    assert during > 0  # jobs were being created while the copy was taken
    assert set(settled) == {200}

    saved = jobs_in(backup)
    waiting = {i for i, (state, _, _) in saved.items() if state not in FINISHED}
    assert {"succeeded"} <= {state for state, _, _ in saved.values()} and waiting
    assert done.stdout.startswith(
        f"backed up {live} to {backup} ({backup.stat().st_size / 1e6:.1f} MB,"
        f" {len(saved)} jobs, {len(waiting)} not finished), integrity checked\n"
    )
    assert mode(backup) == 0o600 and mode(Path(f"{backup}.secret")) == 0o600
    secrets = Path(f"{live}.secret").read_text().split()
    assert Path(f"{backup}.secret").read_text().split() == secrets
    assert not any(secret in done.stdout + done.stderr for secret in secrets)

    restored = tmp_path / "new-host" / "tether.db"
    back = tether("restore", str(backup), "--store", f"sqlite:///{restored}")
    assert back.returncode == 0, back.stderr
    assert back.stdout.startswith(f"restored {backup} to {restored} (")
    assert f" {len(saved)} jobs, {len(waiting)} not finished), integrity checked\n" in back.stdout
    assert Path(f"{restored}.secret").read_text().split() == secrets
    # the notification key came along too: receivers keep verifying
    signing = Path(f"{live}.notify-secret").read_text()
    assert Path(f"{backup}.notify-secret").read_text() == signing
    assert Path(f"{restored}.notify-secret").read_text() == signing
    assert mode(Path(f"{restored}.notify-secret")) == 0o600
    assert signing.strip() not in done.stdout + done.stderr + back.stdout + back.stderr
    assert mode(restored) == 0o600 and mode(Path(f"{restored}.secret")) == 0o600

    urls = {h.body["job_id"]: h.body["callback_url"] for h in receiver.hits}
    env = {"TETHER_STORE": f"sqlite:///{restored}", "TETHER_CALLBACK_SECRET": ""}
    service = TetherProcess(tmp_path, env, port=service.port).start()  # the URLs name the port
    try:
        with service.client() as client:
            for job_id, (state, result, promise) in saved.items():
                job = client.get(f"/jobs/{job_id}").json()
                if state in FINISHED:
                    assert (job["state"], job["result"]) == (state, result), job_id
                    continue
                # a waiting job waits still: its trigger may run now, and a callback
                # taken just before the backup finishes the job now
                done_now = {"succeeded"} if promise == "resolved" else set()
                assert job["state"] in {state, "running", *done_now}, job
                answer = httpx.post(
                    urls[job_id] if job_id in urls else wait_for_url(receiver, job_id),
                    json={"status": "succeeded", "result": {"n": number(job_id)}},
                    trust_env=False,
                    timeout=10,
                )
                outcome = "duplicate" if promise == "resolved" else "accepted"
                assert (answer.status_code, answer.json()["outcome"]) == (200, outcome), job
            for job_id in waiting:
                job = wait_for(client, job_id, "succeeded")
                assert job["result"] == {"n": number(job_id)}
    finally:
        service.kill()
    logged = service.log.read_text()
    assert not any(secret in logged for secret in secrets)


def wait_for_url(receiver: Receiver, job_id: str) -> str:
    """The callback URL of a job the restored service triggers only now."""
    hit: Hit = wait_until(
        lambda: next((h for h in receiver.hits if h.body["job_id"] == job_id), None)
    )
    return str(hit.body["callback_url"])


# ── what they refuse ──────────────────────────────────────────────────────────


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def store(tmp_path: Path, receiver: Receiver) -> Path:
    """A store with one waiting job, made by a service that has stopped."""
    db = tmp_path / "store" / "tether.db"
    service = TetherProcess(
        tmp_path, {"TETHER_STORE": f"sqlite:///{db}", "TETHER_CALLBACK_SECRET": ""}
    ).start()
    with service.client() as client:
        job = {"id": "kept", "backend": "http_webhook", "params": {"url": receiver.url()}}
        assert client.post("/jobs", json=job).status_code == 201
        wait_for(client, "kept", "running")
    service.terminate()
    return db


@pytest.mark.parametrize(
    ("store_url", "says"),
    [
        ("memory://", "not memory://: memory:// keeps nothing beyond its process"),
        ("postgresql://u:pw@127.0.0.1:1/db", "not postgresql://***@127.0.0.1:1/db"),
    ],
)
def test_backup_and_restore_refuse_a_store_that_is_not_embedded(
    tmp_path: Path, store_url: str, says: str
) -> None:
    for command, path in (("backup", tmp_path / "copy.db"), ("restore", tmp_path / "b.db")):
        done = tether(command, str(path), TETHER_STORE=store_url)
        assert done.returncode == 2
        assert done.stderr == (
            f"tether: tether {command} works on the embedded store"
            f" (TETHER_STORE=sqlite:///PATH), {says}\n"
        )
    assert list(tmp_path.iterdir()) == []


def test_backup_refuses_a_missing_store_and_an_existing_path(tmp_path: Path, store: Path) -> None:
    missing = tmp_path / "nowhere" / "tether.db"
    done = tether("backup", str(tmp_path / "copy.db"), "--store", f"sqlite:///{missing}")
    assert (done.returncode, done.stderr) == (
        2,
        f"tether: no embedded store at {missing}: nothing to back up\n",
    )
    assert not (tmp_path / "copy.db").exists() and not missing.parent.exists()

    copy = tmp_path / "copy.db"
    copy.write_text("an older backup")
    done = tether("backup", str(copy), "--store", f"sqlite:///{store}")
    assert (done.returncode, done.stderr) == (
        2,
        f"tether: {copy} exists: pass --force to replace a backup there\n",
    )
    assert copy.read_text() == "an older backup"
    done = tether("backup", str(copy), "--store", f"sqlite:///{store}", "--force")
    assert done.returncode == 0, done.stderr
    assert "kept" in dict(jobs_in(copy))

    done = tether("backup", str(store), "--store", f"sqlite:///{store}", "--force")
    assert (done.returncode, done.stderr) == (
        2,
        f"tether: {store} is the store itself: back up to another path\n",
    )


def test_restore_refuses_while_a_service_uses_the_store(
    tmp_path: Path, store: Path, receiver: Receiver
) -> None:
    backup = tmp_path / "b.db"
    assert tether("backup", str(backup), "--store", f"sqlite:///{store}").returncode == 0
    env = {"TETHER_STORE": f"sqlite:///{store}", "TETHER_CALLBACK_SECRET": ""}
    service = TetherProcess(tmp_path, env).start()
    try:
        before = digest(Path(f"{store}.secret"))
        done = tether("restore", str(backup), "--force", **env)
        assert done.returncode == 2
        assert done.stderr == (
            f"tether: the store {store} is in use by another process (a running `tether"
            " serve`?): stop every service using it first, and keep them stopped until the"
            " restore ends\n"
        )
        assert digest(Path(f"{store}.secret")) == before
        with service.client() as client:
            assert client.get("/jobs/kept").json()["state"] == "running"
            assert client.get("/health").status_code == 200
    finally:
        service.kill()
    # a killed service holds nothing: the restore goes ahead at once
    done = tether("restore", str(backup), "--force", **env)
    assert done.returncode == 0, done.stderr
    assert not Path(f"{store}-wal").exists()


def test_restore_refuses_an_existing_store_and_a_file_that_is_no_backup(
    tmp_path: Path, store: Path
) -> None:
    backup = tmp_path / "b.db"
    assert tether("backup", str(backup), "--store", f"sqlite:///{store}").returncode == 0
    before = digest(store)
    done = tether("restore", str(backup), "--store", f"sqlite:///{store}")
    assert (done.returncode, done.stderr) == (
        2,
        f"tether: {store} exists: pass --force to replace a store there\n",
    )
    assert digest(store) == before

    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database" * 100)
    done = tether("restore", str(junk), "--store", f"sqlite:///{store}", "--force")
    assert done.returncode == 2
    assert done.stderr.startswith(f"tether: cannot copy {junk} to {store}: ")
    assert digest(store) == before
    assert sorted(p.name for p in store.parent.iterdir()) == [
        "tether.db",
        "tether.db.notify-secret",
        "tether.db.secret",
    ]

    missing = tmp_path / "missing.db"
    done = tether("restore", str(missing), "--store", f"sqlite:///{store}", "--force")
    assert (done.returncode, done.stderr) == (2, f"tether: no backup at {missing}\n")


@pytest.mark.parametrize(
    ("suffix", "named"), [(".secret", "callback"), (".notify-secret", "notification")]
)
def test_backup_refuses_an_empty_secret_file_naming_which(
    tmp_path: Path, store: Path, suffix: str, named: str
) -> None:
    Path(f"{store}{suffix}").write_text("\n")
    copy = tmp_path / "copy.db"
    done = tether("backup", str(copy), "--store", f"sqlite:///{store}")
    assert (done.returncode, done.stderr) == (
        2,
        f"tether: the {named} secret file {store}{suffix} is empty\n",
    )
    assert not copy.exists() and not Path(f"{copy}.secret").exists()


def test_a_backup_that_cannot_write_says_so_and_one_cut_short_leaves_no_database(
    tmp_path: Path, store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    done = tether("backup", str(blocked / "copy.db"), "--store", f"sqlite:///{store}")
    assert done.returncode == 2 and done.stderr.startswith(f"tether: cannot write in {blocked}")
    assert "Traceback" not in done.stderr

    # Its secrets are written before the database is moved into place: a copy
    # cut short there (here: the secret cannot be written) leaves no database
    # that looks whole, and the next backup clears what it left.
    from core.store import backup as backups

    def cannot(path: Path, kept: Any) -> None:
        raise PermissionError(13, "Permission denied")

    copy = tmp_path / "backups" / "copy.db"
    monkeypatch.setattr(backups, "write_secrets", cannot)
    with pytest.raises(backups.StoreFileError, match=r"cannot write .*copy\.db\.secret"):
        backups.backup(store, copy)
    assert not copy.exists() and list(copy.parent.iterdir()) == []
    killed = copy.parent / ".copy.db.tether-tmp-x1y2z3"  # a copy killed before it moved
    killed.write_text("an hour old")
    os.utime(killed, (time.time() - 7200, time.time() - 7200))
    (copy.parent / ".copy.db.tether-tmp-a1b2c3").write_text("a copy under way")
    (copy.parent / ".copy.db.swp").write_text("not ours")
    monkeypatch.undo()
    made = backups.backup(store, copy)
    assert made.secret == copy.with_name("copy.db.secret") and made.secret.exists()
    assert sorted(p.name for p in copy.parent.iterdir()) == [
        ".copy.db.swp",
        ".copy.db.tether-tmp-a1b2c3",
        "copy.db",
        "copy.db.notify-secret",
        "copy.db.secret",
    ]
    # --force over it: the old copy goes before the new secrets are written
    monkeypatch.setattr(backups, "write_secrets", cannot)
    with pytest.raises(backups.StoreFileError):
        backups.backup(store, copy, force=True)
    assert not copy.exists()


def test_a_secret_given_as_a_setting_is_said_to_be_kept_apart_not_copied(
    tmp_path: Path, store: Path
) -> None:
    """The store keeps its secret files from before the settings were set:
    the services sign with the settings, so a copy of those files would pass
    for the secret kept with the backup."""
    notify = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # base64 of 24 bytes
    env = {"TETHER_CALLBACK_SECRET": "a-callback-s3cret", "TETHER_NOTIFY_SECRET": notify}
    copy = tmp_path / "b" / "copy.db"
    done = tether("backup", str(copy), "--store", f"sqlite:///{store}", **env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1:] == [
        "the callback secret is TETHER_CALLBACK_SECRET (no file): keep it, and"
        " TETHER_CALLBACK_SECRET_PREVIOUS, with the backup",
        "the notification secret is TETHER_NOTIFY_SECRET (no file): keep it, and"
        " TETHER_NOTIFY_SECRET_PREVIOUS, with the backup",
    ]
    assert sorted(p.name for p in copy.parent.iterdir()) == ["copy.db"]
    assert "s3cret" not in done.stdout + done.stderr and notify not in done.stdout
    # without the settings, the files are the secrets, and are copied
    unset = {"TETHER_CALLBACK_SECRET": "", "TETHER_NOTIFY_SECRET": ""}
    again = tether("backup", str(copy), "--store", f"sqlite:///{store}", "--force", **unset)
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in copy.parent.iterdir()) == [
        "copy.db",
        "copy.db.notify-secret",
        "copy.db.secret",
    ]
    # and a backup replacing that one (--force) with the settings set leaves
    # none of its files beside the new copy, to be restored as its secrets
    done = tether("backup", str(copy), "--store", f"sqlite:///{store}", "--force", **env)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in copy.parent.iterdir()) == ["copy.db"]


def test_a_restore_of_a_backup_without_secret_files_sets_the_stores_old_ones_aside(
    tmp_path: Path, store: Path
) -> None:
    """The store's old files stayed beside the restored database, and would
    pass for the backup's secrets; the restore said nothing of notifications
    (found by an exploratory QA pass)."""
    notify = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    env = {"TETHER_CALLBACK_SECRET": "a-callback-s3cret", "TETHER_NOTIFY_SECRET": notify}
    copy = tmp_path / "b" / "copy.db"
    assert tether("backup", str(copy), "--store", f"sqlite:///{store}", **env).returncode == 0
    assert sorted(p.name for p in copy.parent.iterdir()) == ["copy.db"]
    before = store.with_name(store.name + ".secret").read_text()  # the store's own, from before

    unset = {"TETHER_CALLBACK_SECRET": "", "TETHER_NOTIFY_SECRET": ""}
    done = tether("restore", str(copy), "--store", f"sqlite:///{store}", "--force", **unset)
    assert done.returncode == 0, done.stderr
    secret_file = store.with_name(store.name + ".secret")
    assert done.stdout.splitlines()[1:] == [
        f"the store's own {secret_file.name} is kept as {secret_file}.before-restore",
        f"the store's own {store.name}.notify-secret is kept as"
        f" {store.with_name(store.name + '.notify-secret')}.before-restore",
        "no callback secret file came with it (its services took theirs from"
        " TETHER_CALLBACK_SECRET?): give that secret to the services, or the callback URLs"
        " handed out before will answer 401",
        "no notification secret file came with it (its services took theirs from"
        " TETHER_NOTIFY_SECRET?): give that secret to the services, or a new one is made"
        " and receivers refuse what it signs",
    ]
    assert not store.with_name(store.name + ".secret").exists()
    assert not store.with_name(store.name + ".notify-secret").exists()
    # set aside, not lost: a secret nobody else may have
    assert Path(f"{secret_file}.before-restore").read_text() == before
