"""The tables, their upgrades, and every statement the engine runs.

One row per promise in ``r_promises``; the task that backs a promise (task id
== promise id) lives in the same row (``t_*`` columns, NULL = no task), so a
task transition and its promise read are one b-tree lookup and one write.
Every table starts with ``r_``: an application may keep its own tables in the
same file.

Every statement is a constant string (the :mod:`sqlite3` statement cache then
keeps it prepared) on an index; ``tests/resonate_sqlite/test_plans.py``
asserts the plans of :data:`HOT_QUERIES`.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any, Final

__all__ = ["HOT_QUERIES", "SCHEMA", "SCHEMA_VERSION", "migrate"]

#: Bumped when the table layout changes; a newer file is refused at open, an
#: older one is upgraded (:func:`migrate`).
SCHEMA_VERSION: Final = 2

SCHEMA: Final = (
    """
    CREATE TABLE IF NOT EXISTS r_meta (
      key   TEXT PRIMARY KEY,
      value TEXT NOT NULL
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE IF NOT EXISTS r_promises (
      id         TEXT PRIMARY KEY,
      state      TEXT NOT NULL,      -- pending|resolved|rejected[_canceled|_timedout]
      param      TEXT NOT NULL,      -- JSON {"headers": ..., "data": text|null}
      value      TEXT NOT NULL,      -- the same shape; data null until settled
      tags       TEXT NOT NULL,      -- JSON object of string tags
      target     TEXT,               -- tags['resonate:target']
      is_timer   INTEGER NOT NULL,   -- tags['resonate:timer'] = 'true'
      origin     TEXT,               -- tags['resonate:origin'] (root of the lineage)
      timeout_at INTEGER NOT NULL,   -- ms epoch; the promise timer while pending
      created_at INTEGER NOT NULL,
      settled_at INTEGER,
      t_state    TEXT,               -- NULL (no task)|pending|acquired|suspended|halted|fulfilled
      t_version  INTEGER,
      t_pid      TEXT,
      t_ttl      INTEGER,
      t_due      INTEGER,            -- retry (pending) or lease expiry (acquired), ms epoch
      t_resumes  INTEGER             -- awaited promises that settled since the last acquire
    )
    """,
    # promise timers: only pending rows are indexed
    """
    CREATE INDEX IF NOT EXISTS r_promises_due
      ON r_promises (timeout_at) WHERE state = 'pending'
    """,
    # task timers: only pending/acquired tasks are indexed
    """
    CREATE INDEX IF NOT EXISTS r_tasks_due
      ON r_promises (t_due) WHERE t_state IN ('pending', 'acquired')
    """,
    # retention: settled roots by settle time (only roots are indexed)
    """
    CREATE INDEX IF NOT EXISTS r_roots_settled
      ON r_promises (settled_at, id)
      WHERE state <> 'pending' AND (origin IS NULL OR origin = id)
    """,
    # suspended awaiters of a promise (resumed when it settles)
    """
    CREATE TABLE IF NOT EXISTS r_callbacks (
      awaited_id TEXT NOT NULL,
      awaiter_id TEXT NOT NULL,
      PRIMARY KEY (awaited_id, awaiter_id)
    ) WITHOUT ROWID
    """,
    "CREATE INDEX IF NOT EXISTS r_callbacks_awaiter ON r_callbacks (awaiter_id)",
    # addresses to push an `unblock` to when a promise settles
    """
    CREATE TABLE IF NOT EXISTS r_listeners (
      awaited_id TEXT NOT NULL,
      address    TEXT NOT NULL,
      PRIMARY KEY (awaited_id, address)
    ) WITHOUT ROWID
    """,
    "CREATE INDEX IF NOT EXISTS r_listeners_address ON r_listeners (address)",
    # messages for other processes; key dedups (x:<task> / u:<promise>\n<address>)
    """
    CREATE TABLE IF NOT EXISTS r_outbox (
      seq     INTEGER PRIMARY KEY,
      key     TEXT NOT NULL UNIQUE,
      address TEXT NOT NULL,
      body    TEXT NOT NULL
    )
    """,
    "CREATE INDEX IF NOT EXISTS r_outbox_address ON r_outbox (address, seq)",
    # live processes (liveness heartbeat)
    """
    CREATE TABLE IF NOT EXISTS r_processes (
      pid          TEXT PRIMARY KEY,
      grp          TEXT NOT NULL,
      unicast      TEXT NOT NULL,
      anycast      TEXT NOT NULL,
      started_at   INTEGER NOT NULL,
      heartbeat_at INTEGER NOT NULL
    ) WITHOUT ROWID
    """,
    "CREATE INDEX IF NOT EXISTS r_processes_heartbeat ON r_processes (heartbeat_at)",
    # cron schedules: each fires a promise.create at every matching minute
    """
    CREATE TABLE IF NOT EXISTS r_schedules (
      id              TEXT PRIMARY KEY,
      cron            TEXT NOT NULL,
      promise_id      TEXT NOT NULL,  -- template: {{.id}}, {{.timestamp}}
      promise_timeout INTEGER NOT NULL,
      promise_param   TEXT NOT NULL,  -- JSON {"headers": ..., "data": ...}
      promise_tags    TEXT NOT NULL,  -- JSON object
      created_at      INTEGER NOT NULL,
      next_run_at     INTEGER NOT NULL,
      last_run_at     INTEGER
    ) WITHOUT ROWID
    """,
    "CREATE INDEX IF NOT EXISTS r_schedules_due ON r_schedules (next_run_at)",
)

#: Every table, for the open-time touch that finds a damaged b-tree early.
TABLES: Final = (
    "r_promises",
    "r_callbacks",
    "r_listeners",
    "r_outbox",
    "r_processes",
    "r_schedules",
)


def _normal_value(text: str) -> str:
    """A version-1 Value (the SDK's JSON verbatim, ``{}`` when empty) in the
    shape resonate.sql stores: ``{"headers": ..., "data": text|null}``."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        value = {}
    data = value.get("data")
    if data is not None and not isinstance(data, str):
        data = json.dumps(data)
    headers = value.get("headers", {})
    return json.dumps({"headers": headers, "data": data}, separators=(",", ":"))


def migrate(db: sqlite3.Connection, version: int) -> None:
    """Upgrade a file at schema ``version`` in place (inside the caller's
    transaction), before :data:`SCHEMA` runs."""
    if version < 2:
        # 2: task resumes, schedules (created by SCHEMA), Values stored in
        # resonate.sql's shape.
        db.execute("ALTER TABLE r_promises ADD COLUMN t_resumes INTEGER")
        db.execute("UPDATE r_promises SET t_resumes = 0 WHERE t_state IS NOT NULL")
        rows = db.execute("SELECT id, param, value FROM r_promises").fetchall()
        db.executemany(
            "UPDATE r_promises SET param = ?, value = ? WHERE id = ?",
            [(_normal_value(p), _normal_value(v), pid) for pid, p, v in rows],
        )


# =============================================================================
# Statements
# =============================================================================

COLS: Final = (
    "id, state, param, value, tags, target, is_timer, timeout_at, created_at, "
    "settled_at, t_state, t_version, t_pid, t_ttl, t_due, t_resumes"
)
#: Indexes into a row read with :data:`COLS`.
ID, STATE, PARAM, VALUE, TAGS, TARGET, IS_TIMER, TIMEOUT_AT, CREATED_AT = range(9)
SETTLED_AT, T_STATE, T_VERSION, T_PID, T_TTL, T_DUE, T_RESUMES = range(9, 16)

type Row = list[Any]

SQL_GET = f"SELECT {COLS} FROM r_promises WHERE id = ?"
#: What a task's lease check needs (task.fence, task.suspend, task.release):
#: a narrow read, without the promise's param, value and tags.
SQL_LEASE = "SELECT t_state, t_version, state, timeout_at, target FROM r_promises WHERE id = ?"
#: task.fence's one read: the task's lease (as SQL_LEASE) and the row of the
#: promise it creates or settles (as SQL_GET; NULLs when there is none).
SQL_LEASE_GET = (
    "SELECT t.t_state, t.t_version, t.state, t.timeout_at, t.target, "
    + ", ".join(f"p.{c}" for c in COLS.split(", "))
    + " FROM r_promises AS t LEFT JOIN r_promises AS p ON p.id = ? WHERE t.id = ?"
)
#: The ``preload`` of a task's answers: the promises tagged with the task's own
#: ``resonate:branch`` (the task's promise left out, an empty branch has none),
#: and the bare promises the branch promise made (``ctx.promise``: its
#: children with no ``resonate:target``, each a branch of its own; a
#: ``ctx.sleep`` timer has a target), by id within each search (the caller sorts them: cheaper than
#: ORDER BY's temporary b-tree). Candidates are the branch promise itself and
#: the ids under it (a protocol id extends its branch: ``{branch}.n``, or
#: ``{branch}:n`` as resonate-sdk joins a root's children), three searches of
#: the primary key.
SQL_PRELOAD = (
    f"SELECT {', '.join(f'p.{c}' for c in COLS.split(', '))} "
    "FROM (SELECT json_extract(tags, '$.\"resonate:branch\"') AS b FROM r_promises "
    "WHERE id = ?) AS t, r_promises AS p "
    "WHERE t.b <> '' AND ((p.id >= t.b || ':' AND p.id < t.b || ';') "
    "OR (p.id >= t.b || '.' AND p.id < t.b || '/') OR p.id = t.b) "
    "AND p.id <> ? AND (json_extract(p.tags, '$.\"resonate:branch\"') = t.b "
    "OR (json_extract(p.tags, '$.\"resonate:parent\"') = t.b "
    "AND json_extract(p.tags, '$.\"resonate:target\"') IS NULL)) LIMIT ?"
)
SQL_INSERT = f"INSERT INTO r_promises ({COLS}, origin) VALUES ({', '.join('?' * 17)})"
SQL_SETTLE = (
    "UPDATE r_promises SET state = ?, value = ?, settled_at = ?, "
    "t_state = CASE WHEN t_state IS NULL THEN NULL ELSE 'fulfilled' END, "
    "t_resumes = CASE WHEN t_state IS NULL THEN NULL ELSE 0 END, "
    "t_pid = NULL, t_ttl = NULL, t_due = NULL WHERE id = ?"
)
SQL_TASK_ACQUIRE = (
    "UPDATE r_promises SET t_state = 'acquired', t_version = ?, t_pid = ?, t_ttl = ?, "
    "t_due = ?, t_resumes = 0 WHERE id = ?"
)
SQL_TASK_PENDING = (
    "UPDATE r_promises SET t_state = 'pending', t_pid = NULL, t_ttl = NULL, t_due = ? WHERE id = ?"
)
SQL_TASK_RETRY = "UPDATE r_promises SET t_due = ? WHERE id = ?"
SQL_TASK_SUSPEND = (
    "UPDATE r_promises SET t_state = 'suspended', t_pid = NULL, t_ttl = NULL, t_due = NULL, "
    "t_resumes = 0 WHERE id = ?"
)
SQL_TASK_HALT = (
    "UPDATE r_promises SET t_state = 'halted', t_pid = NULL, t_ttl = NULL, t_due = NULL "
    "WHERE id = ?"
)
SQL_TASK_UNRESUMED = "UPDATE r_promises SET t_resumes = 0 WHERE id = ?"
SQL_RESUME = (
    "UPDATE r_promises SET t_state = 'pending', t_due = ?, t_resumes = 1 "
    "WHERE id = ? AND t_state = 'suspended' RETURNING t_version, target"
)
SQL_RESUME_COUNT = (
    "UPDATE r_promises SET t_resumes = t_resumes + 1 "
    "WHERE id = ? AND t_state IN ('pending', 'acquired', 'halted')"
)
SQL_HEARTBEAT = (
    "UPDATE r_promises SET t_due = ? + t_ttl WHERE id = ? AND t_state = 'acquired' "
    "AND t_pid = ? AND t_version = ? AND state = 'pending' AND timeout_at > ?"
)
SQL_DUE_PROMISES = (
    "SELECT id FROM r_promises INDEXED BY r_promises_due "
    "WHERE state = 'pending' AND timeout_at <= ? "
    "ORDER BY timeout_at LIMIT ?"
)
SQL_DUE_TASKS = (
    "SELECT id FROM r_promises INDEXED BY r_tasks_due "
    "WHERE t_state IN ('pending', 'acquired') AND t_due <= ? "
    "ORDER BY t_due LIMIT ?"
)
SQL_LISTENER_ADD = "INSERT OR IGNORE INTO r_listeners (awaited_id, address) VALUES (?, ?)"
SQL_LISTENERS_DROP = "DELETE FROM r_listeners WHERE awaited_id = ?"
SQL_CALLBACK_ADD = "INSERT OR IGNORE INTO r_callbacks (awaited_id, awaiter_id) VALUES (?, ?)"
#: Who waits on a settling promise, in one read: (0, listener address) and
#: (1, awaiter id) rows.
SQL_WAITERS = (
    "SELECT 0, address FROM r_listeners WHERE awaited_id = ? "
    "UNION ALL SELECT 1, awaiter_id FROM r_callbacks WHERE awaited_id = ?"
)
SQL_CALLBACKS_DROP = "DELETE FROM r_callbacks WHERE awaited_id = ?"
SQL_CALLBACKS_SCRUB = "DELETE FROM r_callbacks INDEXED BY r_callbacks_awaiter WHERE awaiter_id = ?"
SQL_OUTBOX_PUT = (
    "INSERT INTO r_outbox (key, address, body) VALUES (?, ?, ?) "
    "ON CONFLICT (key) DO UPDATE SET address = excluded.address, body = excluded.body"
)
SQL_OUTBOX_DROP = "DELETE FROM r_outbox WHERE key = ?"
SQL_OUTBOX_PEEK = "SELECT 1 FROM r_outbox INDEXED BY r_outbox_address WHERE address = ? LIMIT 1"
SQL_OUTBOX_NEXT = (
    "SELECT seq, body FROM r_outbox INDEXED BY r_outbox_address "
    "WHERE address = ? ORDER BY seq LIMIT ?"
)
SQL_OUTBOX_TAKE = "DELETE FROM r_outbox WHERE seq = ?"

SCHEDULE_COLS: Final = (
    "id, cron, promise_id, promise_timeout, promise_param, promise_tags, "
    "created_at, next_run_at, last_run_at"
)
S_ID, S_CRON, S_PROMISE_ID, S_TIMEOUT, S_PARAM, S_TAGS = range(6)
S_CREATED_AT, S_NEXT_RUN_AT, S_LAST_RUN_AT = range(6, 9)

SQL_SCHEDULE_GET = f"SELECT {SCHEDULE_COLS} FROM r_schedules WHERE id = ?"
SQL_SCHEDULE_INSERT = f"INSERT INTO r_schedules ({SCHEDULE_COLS}) VALUES ({', '.join('?' * 9)})"
SQL_SCHEDULE_DELETE = "DELETE FROM r_schedules WHERE id = ?"
SQL_SCHEDULE_ADVANCE = "UPDATE r_schedules SET last_run_at = ?, next_run_at = ? WHERE id = ?"
SQL_DUE_SCHEDULES = (
    "SELECT id FROM r_schedules INDEXED BY r_schedules_due "
    "WHERE next_run_at <= ? ORDER BY next_run_at LIMIT ?"
)

SQL_PROCESS_UPSERT = (
    "INSERT INTO r_processes (pid, grp, unicast, anycast, started_at, heartbeat_at) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (pid) DO UPDATE SET grp = excluded.grp, "
    "unicast = excluded.unicast, anycast = excluded.anycast, "
    "heartbeat_at = excluded.heartbeat_at"
)
SQL_PROCESS_BEAT = "UPDATE r_processes SET heartbeat_at = ? WHERE pid = ?"
SQL_PROCESS_DEAD = (
    "SELECT pid, unicast FROM r_processes INDEXED BY r_processes_heartbeat "
    "WHERE heartbeat_at < ? LIMIT 100"
)
SQL_PROCESS_DELETE = "DELETE FROM r_processes WHERE pid = ?"
SQL_LISTENERS_DROP_ADDRESS = (
    "DELETE FROM r_listeners INDEXED BY r_listeners_address WHERE address = ?"
)
SQL_OUTBOX_DROP_ADDRESS = "DELETE FROM r_outbox INDEXED BY r_outbox_address WHERE address = ?"
SQL_GC_ROOTS = (
    "SELECT id, settled_at, origin FROM r_promises INDEXED BY r_roots_settled "
    "WHERE state <> 'pending' AND (origin IS NULL OR origin = id) "
    "AND (settled_at, id) > (?, ?) AND settled_at <= ? ORDER BY settled_at, id LIMIT ?"
)
# A lineage is the root and every id under "{root}:" -- a range on the primary key
# (resonate ids are "{origin}:{path}", and a root id never contains ":").
SQL_GC_LINEAGE = "SELECT id, state, t_state, origin FROM r_promises WHERE id >= ? AND id < ?"
SQL_GC_DELETE = "DELETE FROM r_promises WHERE id = ?"
SQL_GC_UNBLOCKS = "DELETE FROM r_outbox WHERE key >= ? AND key < ?"

#: The statements the request, timer, delivery and gc paths run, for the
#: index-use test.
HOT_QUERIES: Final = {
    "get": SQL_GET,
    "lease": SQL_LEASE,
    "lease_get": SQL_LEASE_GET,
    "preload": SQL_PRELOAD,
    "settle": SQL_SETTLE,
    "task_acquire": SQL_TASK_ACQUIRE,
    "task_pending": SQL_TASK_PENDING,
    "task_retry": SQL_TASK_RETRY,
    "task_suspend": SQL_TASK_SUSPEND,
    "task_halt": SQL_TASK_HALT,
    "task_unresumed": SQL_TASK_UNRESUMED,
    "resume": SQL_RESUME,
    "resume_count": SQL_RESUME_COUNT,
    "heartbeat": SQL_HEARTBEAT,
    "due_promises": SQL_DUE_PROMISES,
    "due_tasks": SQL_DUE_TASKS,
    "due_schedules": SQL_DUE_SCHEDULES,
    "schedule_get": SQL_SCHEDULE_GET,
    "schedule_advance": SQL_SCHEDULE_ADVANCE,
    "listeners_drop": SQL_LISTENERS_DROP,
    "waiters": SQL_WAITERS,
    "callbacks_drop": SQL_CALLBACKS_DROP,
    "callbacks_scrub": SQL_CALLBACKS_SCRUB,
    "outbox_drop": SQL_OUTBOX_DROP,
    "outbox_peek": SQL_OUTBOX_PEEK,
    "outbox_next": SQL_OUTBOX_NEXT,
    "outbox_take": SQL_OUTBOX_TAKE,
    "listeners_drop_address": SQL_LISTENERS_DROP_ADDRESS,
    "outbox_drop_address": SQL_OUTBOX_DROP_ADDRESS,
    "process_dead": SQL_PROCESS_DEAD,
    "gc_roots": SQL_GC_ROOTS,
    "gc_lineage": SQL_GC_LINEAGE,
    "gc_unblocks": SQL_GC_UNBLOCKS,
}
