"""`tether serve` refuses a store it cannot use, at once and saying why."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port

TETHER = shutil.which("tether", path=str(Path(sys.executable).parent)) or "tether"


def serve(
    env: dict[str, str], timeout: float = 30, args: tuple[str, ...] = ()
) -> tuple[int, str, float]:
    started = time.monotonic()
    done = subprocess.run(
        [TETHER, "serve", "--port", str(free_port()), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done.returncode, done.stderr, time.monotonic() - started


def test_a_damaged_database_is_refused_naming_the_file(tmp_path):
    db = tmp_path / "tether.db"
    db.write_bytes(b"this is not a database" * 500)
    code, err, _ = serve({"TETHER_STORE": f"sqlite:///{db}"})
    assert code == 2
    assert str(db) in err and "Traceback" not in err


def test_an_unwritable_location_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, err, _ = serve({"TETHER_STORE": f"sqlite:///{blocker}/sub/tether.db"})
    assert code == 2
    assert "cannot use the embedded store" in err and "Traceback" not in err


def test_a_locked_database_is_refused_in_bounded_time(tmp_path):
    db = tmp_path / "tether.db"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        code, err, took = serve({"TETHER_STORE": f"sqlite:///{db}"})
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert code == 2
    assert str(db) in err
    assert took < 25


@pytest.mark.parametrize(
    ("store", "says"),
    [
        ("redis://x", "TETHER_STORE"),
        ("sqlite://", "TETHER_STORE"),
        ("postgresql://nobody@127.0.0.1:1/x", "cannot open"),
    ],
)
def test_an_unsupported_or_unreachable_store_url_is_refused(store, says):
    code, err, _ = serve({"TETHER_STORE": store, "TETHER_CALLBACK_SECRET": "s"})
    assert code == 2
    assert says in err and "Traceback" not in err


def test_an_unsupported_store_is_named_before_the_index_beside_it(tmp_path):
    """It was told to unset TETHER_INDEX, which led only to this refusal
    (found by an exploratory QA pass)."""
    index = f"sqlite:///{tmp_path}/index.db"
    env = {
        "TETHER_STORE": "ftp://127.0.0.1:1",
        "TETHER_INDEX": index,
        "TETHER_CALLBACK_SECRET": "s",
    }
    code, err, _ = serve(env)
    assert code == 2
    assert "TETHER_STORE='ftp://127.0.0.1:1' is not supported" in err, err
    assert "unset TETHER_INDEX" not in err


def test_a_bad_setting_is_refused_naming_the_variable():
    code, err, _ = serve({"TETHER_WATCHDOG_INTERVAL": "soon"})
    assert code == 2
    assert "TETHER_WATCHDOG_INTERVAL" in err


def test_several_workers_on_the_memory_store_are_refused():
    code, err, _ = serve({"TETHER_STORE": "memory://"}, args=("--workers", "2"))
    assert code == 2
    assert "memory://" in err and "--workers" in err and "Traceback" not in err
