"""A file written by an older version is upgraded at open; a newer one is refused."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from resonate_sqlite.engine import Engine, StoreFailure
from resonate_sqlite.schema import SCHEMA_VERSION
from tests.resonate_sqlite.protocol_server import Server

#: r_promises as schema version 1 had it (no t_resumes; Values stored verbatim).
V1_PROMISES = """
CREATE TABLE r_promises (
  id TEXT PRIMARY KEY, state TEXT NOT NULL, param TEXT NOT NULL, value TEXT NOT NULL,
  tags TEXT NOT NULL, target TEXT, is_timer INTEGER NOT NULL, origin TEXT,
  timeout_at INTEGER NOT NULL, created_at INTEGER NOT NULL, settled_at INTEGER,
  t_state TEXT, t_version INTEGER, t_pid TEXT, t_ttl INTEGER, t_due INTEGER
)
"""
V1_ROW = (
    "INSERT INTO r_promises (id, state, param, value, tags, target, is_timer, timeout_at, "
    "created_at, t_state, t_version, t_due) VALUES (?, 'pending', ?, '{}', ?, ?, 0, ?, 0, ?, ?, ?)"
)
FAR = 2**60


def v1_file(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE r_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID")
    db.execute("INSERT INTO r_meta VALUES ('schema_version', '1')")
    db.execute(V1_PROMISES)
    tags = '{"resonate:target":"poll://any@g"}'
    db.execute(V1_ROW, ("wf", '{"data":"e30="}', tags, "poll://any@g", FAR, "pending", 0, 1))
    db.execute(V1_ROW, ("p", "{}", "{}", None, FAR, None, None, None))
    db.commit()
    db.close()


def test_a_version_1_file_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    v1_file(path)
    server = Server(path)
    _, data = server("promise.get", id="wf")
    assert data["promise"]["param"] == {"headers": {}, "data": "e30="}
    assert data["promise"]["value"] == {"headers": {}, "data": None}
    assert server("promise.get", id="p")[1]["promise"]["param"] == {"headers": {}, "data": None}
    assert server("task.get", id="wf")[1]["task"]["resumes"] == 0
    assert server("task.acquire", id="wf", version=0, pid="me", ttl=1000)[0] == 200
    assert server("schedule.get", id="s")[0] == 404  # the table is there
    assert server.engine.db is not None
    version = server.engine.db.execute("SELECT value FROM r_meta").fetchone()[0]
    assert int(version) == SCHEMA_VERSION == 2
    server.engine.close()
    Server(path).engine.close()  # and opens again as it is


def test_a_newer_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    Server(path).engine.close()
    db = sqlite3.connect(path)
    db.execute("UPDATE r_meta SET value = ? WHERE key = 'schema_version'", (SCHEMA_VERSION + 1,))
    db.commit()
    db.close()
    with pytest.raises(StoreFailure, match="newer than this code"):
        Engine(path).open(timeout=1)
