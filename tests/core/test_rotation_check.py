"""What `tether rotate-secret --drop-previous` reads before it drops the
previous callback secrets (`waiting_on_previous_secrets`): whether the
store's last start signed with the current secret, and how many jobs that
may hold an old URL still wait. A damaged record of the last start counts
every waiting job (a review, 2026-12-07: a record without its time let the
drop through with a job running, one with a huge time raised)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import msgspec
import pytest

from core.store.embedded import secret_path, waiting_on_previous_secrets, write_secrets
from core.store.jobs import now_ms
from core.tokens import fingerprint

NEW, OLD = "new-secret-" + "n" * 32, "old-secret-" + "o" * 32


def store(tmp_path: Path, last: object, jobs: list[tuple[str, int]]) -> Path:
    db = tmp_path / "t.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE tether_meta (name TEXT PRIMARY KEY, value TEXT)")
        conn.execute("CREATE TABLE tether_jobs (id TEXT, state TEXT, created_at INTEGER)")
        if last is not None:
            raw = last if isinstance(last, str) else msgspec.json.encode(last).decode()
            conn.execute("INSERT INTO tether_meta VALUES ('last_host', ?)", (raw,))
        conn.executemany(
            "INSERT INTO tether_jobs VALUES (?, ?, ?)",
            [(f"j{i}", state, at) for i, (state, at) in enumerate(jobs)],
        )
    write_secrets(secret_path(db), [NEW, OLD])
    return db


SIGNS_NEW, SIGNS_OLD = fingerprint(NEW), fingerprint(OLD)


def test_jobs_from_before_the_last_start_count_when_it_signed_with_the_new_secret(tmp_path):
    start = now_ms() - 60_000
    jobs = [("running", start - 1), ("pending", start - 5), ("running", start), ("failed", 1)]
    db = store(tmp_path, {"signs": SIGNS_NEW, "at": start}, jobs)
    assert waiting_on_previous_secrets(db) == (True, 2, start)


def test_a_start_that_signed_with_the_old_secret_is_not_one_since_the_rotation(tmp_path):
    start = now_ms() - 60_000
    db = store(tmp_path, {"signs": SIGNS_OLD, "at": start}, [("running", start + 1)])
    assert waiting_on_previous_secrets(db) == (False, 1, start)


@pytest.mark.parametrize(
    "last",
    [
        {"signs": SIGNS_NEW},  # no time
        {"signs": SIGNS_NEW, "at": -1},
        {"signs": SIGNS_NEW, "at": 10**17},  # a year past any date
        {"signs": SIGNS_NEW, "at": 10**20},  # past SQLite's integers
        {"signs": SIGNS_NEW, "at": "soon"},
    ],
)
def test_a_damaged_record_of_the_last_start_counts_every_waiting_job(tmp_path, last):
    db = store(tmp_path, last, [("running", now_ms() - 5), ("pending", now_ms() - 1)])
    assert waiting_on_previous_secrets(db)[1:] == (2, 0)


@pytest.mark.parametrize("last", [None, "not json", "[1, 2]"])
def test_no_record_or_one_that_is_no_object_is_no_start_since_the_rotation(tmp_path, last):
    db = store(tmp_path, last, [("running", 5)])
    assert waiting_on_previous_secrets(db) == (False, 1, 0)


def test_a_store_not_made_yet_has_nothing_waiting(tmp_path):
    assert waiting_on_previous_secrets(tmp_path / "none.db") == (True, 0, 0)


def test_a_store_that_cannot_be_read_refuses_the_drop(tmp_path):
    """`tether rotate-secret --drop-previous` on a file that is no database:
    refused, saying why, and the secrets kept (nothing is known of the jobs
    waiting)."""
    from tests.process import tether

    db = tmp_path / "t.db"
    db.write_bytes(b"not a database, " * 100)
    write_secrets(secret_path(db), [NEW, OLD])
    refused = tether("rotate-secret", "--drop-previous", "--store", f"sqlite:///{db}")
    assert refused.returncode == 2, refused.stdout
    assert refused.stderr.startswith("tether: cannot read the store to see which jobs wait:")
    assert "Traceback" not in refused.stderr
    assert secret_path(db).read_text().split() == [NEW, OLD]
