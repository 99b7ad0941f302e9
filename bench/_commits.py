"""`tether serve --workers 1` that counts its SQLite statements and commits.

    TETHER_BENCH_COUNTS=/tmp/counts.json python bench/_commits.py serve --port N --workers 1

Wraps `sqlite3.connect` so every connection the service opens (the engine's,
the job index's, the checkpointer's) reports each statement it runs
(`set_trace_callback`), then runs `tether` itself (`api.cli.main`) with
the arguments given. Every half second the totals go to the file named by
`TETHER_BENCH_COUNTS` as JSON: `{"commits": n, "begins": n, "statements": n,
"checkpoints": n, "by_kind": {...}}`. Run N jobs, read the file before and after:
the difference over N is what each job costs the store. With one worker only
(uvicorn runs the app in this process).
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.dont_write_bytecode = True

COUNTS: Counter[str] = Counter()
_LOCK = threading.Lock()
_connect = sqlite3.connect


def _kind(sql: str) -> str:
    words = sql.lstrip().split(None, 3)
    head = words[0].upper() if words else ""
    if head in ("INSERT", "UPDATE", "DELETE", "SELECT", "WITH") and len(words) > 2:
        # the table: INSERT INTO t / UPDATE t / DELETE FROM t / SELECT ... FROM t
        upper = sql.upper()
        at = upper.find(" INTO ") if head == "INSERT" else upper.find(" FROM ")
        if head == "UPDATE":
            return f"UPDATE {words[1]}"
        if at >= 0:
            table = sql[at + 6 :].split(None, 1)[0].strip("( ")
            return f"{head} {table}"
    return head


def _traced(*args: Any, **kwargs: Any) -> sqlite3.Connection:
    conn = _connect(*args, **kwargs)

    def trace(sql: str) -> None:
        kind = _kind(sql)
        with _LOCK:
            COUNTS["statements"] += 1
            COUNTS[f"kind:{kind}"] += 1
            if kind == "COMMIT":
                COUNTS["commits"] += 1
            elif kind == "BEGIN":
                COUNTS["begins"] += 1
            elif "wal_checkpoint" in sql:
                COUNTS["checkpoints"] += 1

    conn.set_trace_callback(trace)
    return conn


def _dump(path: Path) -> None:
    while True:
        time.sleep(0.5)
        with _LOCK:
            snapshot = dict(COUNTS)
        by_kind = {k[5:]: v for k, v in snapshot.items() if k.startswith("kind:")}
        totals = {k: v for k, v in snapshot.items() if not k.startswith("kind:")}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**totals, "by_kind": by_kind}))
        tmp.replace(path)


def main() -> int:
    sqlite3.connect = _traced  # type: ignore[assignment]
    path = Path(os.environ["TETHER_BENCH_COUNTS"])
    threading.Thread(target=_dump, args=(path,), daemon=True, name="bench-counts").start()
    from api.cli import main as tether

    return tether(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
