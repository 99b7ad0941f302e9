"""The embedded store's physical limit: SQLite WAL commits per second here.

    python bench/_walrate.py [--seconds 5] [--dir /tmp]

One connection, the embedded store's settings (WAL, `synchronous = NORMAL`,
so a commit appends to the WAL and does not wait on the disk; the
checkpoint, with its fsyncs, runs elsewhere), a table shaped like a small
job row with one secondary index. For each case, as many transactions as fit in
`--seconds`, each `BEGIN IMMEDIATE`, `rows` inserts, `COMMIT`:

- NORMAL, 1 row per commit: the ceiling of commits/s when every step of a job
  is its own transaction;
- NORMAL, 8 and 64 rows per commit: what group commit buys;
- FULL, 1 row per commit: a commit that waits for the disk (fsync of the WAL);
- NORMAL, 1 row per commit, with `wal_checkpoint(PASSIVE)` every 64 commits in
  the same thread (what the store's checkpointer thread does on the other core).

Prints one JSON object: commits/s and rows/s per case, plus the SQLite version.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import tempfile
import time
from pathlib import Path

ROW = "x" * 200


def case(path: Path, sync: str, rows: int, seconds: float, checkpoint: int = 0) -> dict[str, float]:
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    db = sqlite3.connect(str(path), isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute(f"PRAGMA synchronous = {sync}")
    db.execute(
        "PRAGMA wal_autocheckpoint = 0" if checkpoint else "PRAGMA wal_autocheckpoint = 1000"
    )
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, k TEXT, state TEXT, body TEXT)")
    db.execute("CREATE INDEX t_state ON t (state, id)")
    n = commits = 0
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        db.execute("BEGIN IMMEDIATE")
        for _ in range(rows):
            n += 1
            db.execute("INSERT INTO t (k, state, body) VALUES (?, 'running', ?)", (f"job-{n}", ROW))
        db.execute("COMMIT")
        commits += 1
        if checkpoint and commits % checkpoint == 0:
            db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    took = time.perf_counter() - start
    db.close()
    return {"commits_per_s": commits / took, "rows_per_s": n / took}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "wal.db"
        out: dict[str, object] = {"sqlite": sqlite3.sqlite_version, "dir": args.dir}
        out["NORMAL, 1 row/commit"] = case(path, "NORMAL", 1, args.seconds)
        out["NORMAL, 8 rows/commit"] = case(path, "NORMAL", 8, args.seconds)
        out["NORMAL, 64 rows/commit"] = case(path, "NORMAL", 64, args.seconds)
        out["FULL, 1 row/commit"] = case(path, "FULL", 1, args.seconds)
        out["NORMAL, 1 row/commit, checkpoint every 64"] = case(
            path, "NORMAL", 1, args.seconds, checkpoint=64
        )
        out["filesystem"] = os.popen(f"df -T {args.dir} | tail -1").read().split()[1:2]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
