"""`GET /health` answers within a probe's timeout, whatever the store does:
a Resonate server that takes connections and never answers is a 503 in about
`STORE_CHECK_TIMEOUT` (2 s), not a probe's timeout (it took 5.4-5.7 s)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from core.errors import StoreUnavailable
from core.health import STORE_CHECK_TIMEOUT, Health, store_answers
from core.hookspecs import Readiness
from tests.resonate_server.stand_in import RUNNING

PROBE_TIMEOUT = 3.0
"""What docs/operations.md tells a probe to wait, at least."""


class Blackhole:
    """A listener on `port` that accepts every connection and never answers."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_server(("127.0.0.1", port), backlog=128)
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.fixture
def blackholes() -> Iterator[list[Blackhole]]:
    made: list[Blackhole] = []
    yield made
    for hole in made:
        hole.close()


@pytest.mark.parametrize("store_url", ["resonate"], indirect=True)
async def test_health_under_a_server_that_never_answers_is_503_within_a_probes_timeout(
    start_service, blackholes
):
    svc = await start_service()
    assert (await svc.client.get("/health")).status_code == 200
    server = RUNNING[svc.settings.store]
    server.stop()
    blackholes.append(Blackhole(server.port))  # the server's address, silent

    for _ in range(2):  # and again: nothing waits on the first look
        started = time.monotonic()
        answer = await svc.client.get("/health", timeout=PROBE_TIMEOUT)
        took = time.monotonic() - started
        assert answer.status_code == 503, answer.text
        assert STORE_CHECK_TIMEOUT - 0.1 <= took < STORE_CHECK_TIMEOUT + 0.7, took
        error = answer.json()["error"]
        assert error["code"] == "store_unavailable"
        assert error["message"] == (
            f"the store ({svc.settings.store}) did not answer within {STORE_CHECK_TIMEOUT:g} s"
        )
        assert answer.headers["retry-after"] == "1"


async def test_health_answers_at_once_while_the_store_does(start_service):
    svc = await start_service()
    started = time.monotonic()
    assert (await svc.client.get("/health", timeout=PROBE_TIMEOUT)).status_code == 200
    assert time.monotonic() - started < 1


class SlowToLetGo:
    """A job index whose ping never answers and, once cancelled, takes
    `linger` seconds to let go (a driver waiting on a stopped server)."""

    def __init__(self, linger: float) -> None:
        self.linger = linger
        self.let_go = asyncio.Event()

    def refused(self) -> str | None:
        return None

    async def ping(self) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await asyncio.sleep(self.linger)
            self.let_go.set()
            raise


async def test_a_ping_slow_to_let_go_does_not_hold_health_up():
    """Two hosts on a Postgres stopped with SIGSTOP answered `/health` in 8 s,
    saying 2 (found by an exploratory QA pass): the ping given up on was
    waited for while it let go."""
    index = SlowToLetGo(linger=4)  # within the store call's own bound (8 s)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="did not answer within 2 s"):
        await store_answers(index, "postgresql://db")  # type: ignore[arg-type]
    assert time.monotonic() - started < STORE_CHECK_TIMEOUT + 1.5
    await asyncio.wait_for(index.let_go.wait(), 20)  # and it did let go, on its own


class Ready:
    def __init__(self, hang: bool) -> None:
        self.hang = hang

    async def readiness(self) -> Readiness:
        if self.hang:
            await asyncio.Event().wait()
        return Readiness("ok")


class Index:
    async def ping(self) -> None:
        return None

    async def waiting_backends(self, installed: Any) -> dict[str, int]:
        return {}


async def test_a_backend_slow_to_say_it_is_ready_leaves_the_others_shown():
    """One hanging `readiness` kept every backend `unknown` for 30 s (found by
    an exploratory QA pass)."""
    plugins = SimpleNamespace(backends={"slow": Ready(hang=True), "quick": Ready(hang=False)})
    health = Health(plugins, Index(), interval=60)  # type: ignore[arg-type]
    refresh = asyncio.ensure_future(health.refresh())
    try:
        for _ in range(100):
            await asyncio.sleep(0.01)
            if health.readiness["quick"] is not None:
                break
        assert health.readiness == {"slow": None, "quick": Readiness("ok")}
        assert health.body()["readiness"]["slow"]["status"] == "unknown"
    finally:
        refresh.cancel()


async def test_a_full_disk_under_the_embedded_store_is_503(start_service, monkeypatch):
    """With the disk full every write failed (503) while `/health` said ok:
    taking the write lock needs no space (found by a QA pass)."""
    import os

    import core.store.embedded

    svc = await start_service()
    if svc.tether.store.kind != "sqlite":
        pytest.skip("the embedded store's own check")
    assert (await svc.client.get("/health")).status_code == 200
    real = os.statvfs

    def full(path: Any) -> Any:
        disk = real(path)
        return os.statvfs_result((disk.f_bsize, disk.f_frsize, disk.f_blocks, 100, 100, *disk[5:]))

    monkeypatch.setattr(core.store.embedded.os, "statvfs", full)
    answer = await svc.client.get("/health")
    assert answer.status_code == 503, answer.text
    assert "is full: " in answer.text and "bytes free" in answer.text, answer.text
    monkeypatch.setattr(core.store.embedded.os, "statvfs", real)
    assert (await svc.client.get("/health")).status_code == 200


def test_the_disk_left_counts_roots_reserve_for_root_and_nothing_where_no_blocks_are_told(
    monkeypatch, tmp_path
):
    """`f_bavail` leaves out the blocks reserved for root: a root service on a
    disk 95% full answered 503 while its writes still worked; some FUSE
    filesystems report no blocks at all (found by a review)."""
    import os

    import core.store.embedded
    from core.store.embedded import disk_left

    told: dict[str, int] = {}

    def statvfs(path: Any) -> Any:
        told["path"] = path
        return os.statvfs_result((4096, 4096, told["blocks"], 50, 0, 10, 10, 10, 0, 255))

    monkeypatch.setattr(core.store.embedded.os, "statvfs", statvfs)
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "jobs.db").touch()
    (tmp_path / "link.db").symlink_to(tmp_path / "real" / "jobs.db")
    told["blocks"] = 1000
    monkeypatch.setattr(core.store.embedded.os, "geteuid", lambda: 0)
    assert disk_left(tmp_path / "link.db") == 50 * 4096
    assert told["path"] == str(tmp_path / "real" / "jobs.db")  # the file's own disk
    monkeypatch.setattr(core.store.embedded.os, "geteuid", lambda: 1000)
    assert disk_left(tmp_path / "link.db") == 0
    told["blocks"] = 0
    assert disk_left(tmp_path / "link.db") is None


def test_roots_reserve_is_counted_for_the_hosts_root_alone(monkeypatch, tmp_path):
    """A container's root (a user namespace, as rootless Docker or Podman
    map it) cannot write into the reserve: `/health` said 200 while every
    write failed (found by a review)."""
    import core.store.embedded
    from core.store.embedded import _hosts_root

    monkeypatch.setattr(core.store.embedded.os, "geteuid", lambda: 0)
    host, mapped = tmp_path / "host", tmp_path / "mapped"
    host.write_text("         0          0 4294967295\n")
    mapped.write_text("         0     100000      65536\n")
    assert _hosts_root(str(host)) and not _hosts_root(str(mapped))
    assert _hosts_root(str(tmp_path / "none"))  # no /proc: nothing to tell
    monkeypatch.setattr(core.store.embedded.os, "geteuid", lambda: 1000)
    assert not _hosts_root(str(host))


async def test_an_embedded_store_file_replaced_under_the_service_is_503(start_service):
    """A copy moved over the file (or the file deleted) while the service ran
    went unseen: it wrote on to the old file, a worker started since to the
    new one, and jobs were lost at the next start (found by a QA pass)."""
    import shutil

    svc = await start_service()
    if svc.tether.store.kind != "sqlite" or not svc.settings.store.startswith("sqlite:///"):
        pytest.skip("the embedded store's own check")
    path = svc.settings.store.removeprefix("sqlite:///")
    assert (await svc.client.get("/health")).status_code == 200
    shutil.copy(path, path + ".copy")
    shutil.move(path + ".copy", path)
    answer = await svc.client.get("/health")
    assert answer.status_code == 503, answer.text
    assert "was replaced or deleted while this process had it open" in answer.text


@pytest.mark.parametrize("end", ["-wal", "-shm"])
@pytest.mark.parametrize("linked", [False, True], ids=["file", "link"])
async def test_an_embedded_store_write_ahead_log_deleted_under_the_service_is_503(
    start_service, store_url, tmp_path, linked, end
):
    """A deleted `-wal` went unseen: this process wrote on to the unlinked
    log, and a process started since made a new one, without the commits
    since the last checkpoint (found by a QA pass). The log is next to the
    file itself when the store's path is a link (it was not looked for
    there: found by a review). A deleted `-shm` (the log's index) went
    unseen too: a process started since made another, and the two wrote
    over each other's commits."""
    import os

    store = store_url()
    if not store.startswith("sqlite:///"):
        pytest.skip("the embedded store's own check")
    path = store.removeprefix("sqlite:///")
    if linked:
        (tmp_path / "link.db").symlink_to(path)
        store = f"sqlite:///{tmp_path / 'link.db'}"
    svc = await start_service(store=store)
    assert (await svc.client.get("/health")).status_code == 200
    assert (await svc.client.get("/health")).status_code == 200  # the same files
    os.remove(path + end)
    answer = await svc.client.get("/health")
    assert answer.status_code == 503, answer.text
    assert f"{path}{end}" in answer.text or f"link.db{end}" in answer.text, answer.text
    assert "write-ahead log" in answer.text and "was replaced or deleted" in answer.text


async def test_an_embedded_store_found_damaged_is_logged_once_and_503_on_health(
    start_service, store_url, receiver, caplog
):
    """A damaged page of the file (a disk's bad sector, a copy cut short)
    went unseen: each request that read it answered 503 while `/health` said
    ok, and nothing was logged. Now the first read that finds it logs an
    ERROR saying what to do, each such request says the store is damaged,
    and `/health` answers 503 from then on."""
    import sqlite3

    store = store_url()
    if not store.startswith("sqlite:///"):
        pytest.skip("the embedded store's own check")
    path = store.removeprefix("sqlite:///")
    svc = await start_service(store=store)
    pad = {"pad": "x" * 1500}  # two or three jobs a page: many leaves
    for n in range(60):
        body = {"id": f"d{n}", "backend": "http_webhook", "params": {"url": receiver.url()}}
        answer = await svc.client.post("/jobs", json={**body, "metadata": pad})
        assert answer.status_code == 201, answer.text
    await svc.wait_state("d59", "running")
    assert (await svc.client.get("/health")).status_code == 200

    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        try:
            leaves = [
                page
                for (page,) in db.execute(
                    "SELECT pageno FROM dbstat WHERE name = 'tether_jobs' AND pagetype = 'leaf'"
                    " ORDER BY pageno"
                )
            ]
        except sqlite3.OperationalError:
            pytest.skip("this SQLite has no dbstat table to find the job rows' pages by")
        size = db.execute("PRAGMA page_size").fetchone()[0]
        version = db.execute("PRAGMA user_version").fetchone()[0]
    assert len(leaves) >= 10, leaves
    with open(path, "r+b") as file:  # the middle leaves: garbage
        for page in leaves[3:-3]:
            file.seek((page - 1) * size)
            file.write(b"\xa5" * size)
    with sqlite3.connect(path) as db:  # a commit: every connection reads the file again
        db.execute(f"PRAGMA user_version = {version}")

    caplog.set_level("ERROR", logger="tether")
    answers = [(await svc.client.get(f"/jobs/d{n}")) for n in range(60)]
    broken = [a for a in answers if a.status_code != 200]
    assert broken, "no read found the damage"
    for answer in broken:
        assert answer.status_code == 503, answer.text
        assert f"the embedded store {path} is damaged" in answer.text
        assert "restore a backup" in answer.text
    health = await svc.client.get("/health")
    assert health.status_code == 503, health.text
    assert "is damaged" in health.text and "found by a read" in health.text
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"the embedded store {path} is damaged (")
    assert "tether restore" in errors[0]


async def test_damage_the_store_engine_found_is_503_on_health_too(start_service, store_url, caplog):
    """The engine's own reads (its pump's liveness beat, the SDK's
    requests) found damage the index never read: each was a WARNING or an
    ERROR of its own, and `/health` said ok (found by a review). They are
    told to the index's driver, which says the store is damaged."""
    from resonate_sqlite.engine import StoreFailure

    store = store_url()
    if not store.startswith("sqlite:///"):
        pytest.skip("the embedded store's own check")
    svc = await start_service(store=store)
    assert (await svc.client.get("/health")).status_code == 200
    conn = svc.tether.store.connection
    caplog.set_level("ERROR", logger="tether")
    conn._told(StoreFailure("sqlite store x: database disk image is malformed"))  # the pump's
    conn._told(StoreFailure("sqlite store x: database disk image is malformed"))
    health = await svc.client.get("/health")
    assert health.status_code == 503, health.text
    assert "is damaged (sqlite store x: database disk image is malformed)" in health.text
    assert len([r for r in caplog.records if r.levelname == "ERROR"]) == 1
