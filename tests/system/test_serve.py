"""The real `tether serve` process, driven over HTTP."""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path

from tests.process import TetherProcess, wait_for

ROOT = Path(__file__).resolve().parents[2]


def test_tether_serve_runs_a_webhook_job_end_to_end(tmp_path, receiver):
    receiver.callback = {"status": "succeeded", "result": {"ok": True}}
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {"TETHER_STORE": "memory://", "TMPDIR": str(scratch)}
    service = TetherProcess(tmp_path, env).start()
    try:
        assert [p.name[:14] for p in scratch.iterdir()] == ["tether-memory-"]
        with service.client() as client:
            response = client.post(
                "/jobs",
                json={"id": "e2e", "backend": "http_webhook", "params": {"url": receiver.url()}},
            )
            assert response.status_code == 201
            job = wait_for(client, "e2e", "succeeded")
            assert job["result"] == {"ok": True}
            assert client.get("/schema/openapi.json").status_code == 200
    finally:
        assert service.terminate() == -signal.SIGTERM  # uvicorn re-raises it after draining
    log = service.log.read_text()
    assert "Application shutdown complete" in log
    assert "job e2e finished: succeeded" in log
    assert list(scratch.iterdir()) == []  # memory:// leaves nothing behind
    assert "process-secret" not in log
    assert "token=" not in log


def test_an_installed_plugin_is_served_without_changing_tether(tmp_path):
    site = tmp_path / "site"
    dist = site / "tether_echo-0.1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tether-echo\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text("[tether]\necho = tether_echo\n")
    (site / "tether_echo.py").write_text((ROOT / "examples/tether_echo/tether_echo.py").read_text())
    service = TetherProcess(tmp_path, {"TETHER_STORE": "memory://", "PYTHONPATH": str(site)})
    service.start()
    try:
        with service.client() as client:
            assert client.get("/health").json()["backends"] == [
                "databricks",
                "databricks_sql",
                "echo",
                "http_webhook",
            ]
            client.post("/jobs", json={"id": "x", "backend": "echo", "params": {"message": "m"}})
            assert wait_for(client, "x", "running")["external"] == {"echoed": "m"}
        service.terminate()  # memory:// deletes its temporary file on the way out
    finally:
        service.kill()


def test_a_new_embedded_store_is_private_to_its_owner(tmp_path, receiver):
    """Made by SQLite, the database and its -wal and -shm took the umask's
    mode (0644): a job's params, results and history readable by any user
    of the host (found by an exploratory QA pass). The umask here is the
    usual 022."""
    old = os.umask(0o022)
    try:
        db = tmp_path / "store" / "tether.db"
        service = TetherProcess(tmp_path, {"TETHER_STORE": f"sqlite:///{db}"}).start()
    finally:
        os.umask(old)
    try:
        with service.client() as client:
            body = {"id": "private", "backend": "http_webhook", "params": {"url": receiver.url()}}
            assert client.post("/jobs", json=body).status_code == 201
            wait_for(client, "private", "running")
        made = {p.name: stat.S_IMODE(p.stat().st_mode) for p in db.parent.iterdir()}
        assert {"tether.db", "tether.db-wal", "tether.db-shm"} <= set(made), made
        assert {name: mode for name, mode in made.items() if mode & 0o077} == {}, made
    finally:
        service.kill()
