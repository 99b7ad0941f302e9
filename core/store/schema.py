"""Tether's tables, declared once, and the job row's codec.

A table is a tuple of columns, each with a logical type that every database
spells its own way (`Dialect`). The DDL, the column lists, the insert and the
row decoding are all derived from the declaration, so adding a column is one
`Column(..., since=N)` here plus one `Migration(N, ...)` in
`core.store.migrations`.

`since` is the schema version that brought a column, index or table in: the
statements that reach version N are those of the things with `since == N`, so
an old version's statements never change when a newer one adds something.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple

import msgspec

from core.models import json_decoder
from core.store.jobs import Event, JobRecord, Notification

type LogicalType = Literal["serial", "text", "int", "real", "json"]
"""`serial`: the row's key, an increasing integer the database assigns;
`json`: a value of the row's struct field, kept as JSON text."""


class Dialect(NamedTuple):
    name: str
    types: Mapping[LogicalType, str]


SQLITE = Dialect(
    "sqlite",
    {
        "serial": "INTEGER PRIMARY KEY AUTOINCREMENT",
        "text": "TEXT",
        "int": "INTEGER",
        "real": "REAL",
        "json": "TEXT",
    },
)
POSTGRES = Dialect(
    "postgresql",
    {
        "serial": "BIGSERIAL PRIMARY KEY",
        "text": "TEXT",
        "int": "BIGINT",
        "real": "DOUBLE PRECISION",
        "json": "TEXT",
    },
)


class Column(NamedTuple):
    name: str
    type: LogicalType
    null: bool = False
    unique: bool = False
    since: int = 1
    default: str | None = None
    """An SQL literal: what rows that exist when the column is added get (a
    `NOT NULL` column added to a table with rows needs one)."""

    def sql(self, dialect: Dialect) -> str:
        spec = [self.name, dialect.types[self.type]]
        if not self.null and self.type != "serial":
            spec.append("NOT NULL")
        if self.default is not None:
            spec.append(f"DEFAULT {self.default}")
        if self.unique:
            spec.append("UNIQUE")
        return " ".join(spec)


class Index(NamedTuple):
    name: str
    on: str
    """The indexed columns, as written in `ON table (...)`."""
    where: str | None = None
    """The predicate of a partial index."""
    since: int = 1


class Table(NamedTuple):
    name: str
    columns: tuple[Column, ...]
    indexes: tuple[Index, ...] = ()
    since: int = 1
    primary_key: str | None = None
    """The key's columns, as written in `PRIMARY KEY (...)`, for a table
    without a `serial` column; on SQLite such a table is stored in key order
    (`WITHOUT ROWID`), so reading one key's range reads adjacent rows."""

    def migrate(self, dialect: Dialect, version: int) -> list[str]:
        """The statements taking this table from `version - 1` to `version`:
        create it (the version that brings it in), or add what came with
        `version`. Written `IF NOT EXISTS` where both databases allow it."""
        if version < self.since:
            return []
        if version == self.since:
            columns = [f"    {c.sql(dialect)}" for c in self.columns if c.since <= version]
            suffix = ""
            if self.primary_key:
                columns.append(f"    PRIMARY KEY ({self.primary_key})")
                suffix = " WITHOUT ROWID" if dialect.name == "sqlite" else ""
            body = ",\n".join(columns)
            statements = [f"CREATE TABLE IF NOT EXISTS {self.name} (\n{body}\n){suffix}"]
            indexes = [i for i in self.indexes if i.since <= version]
        else:
            statements = [
                f"ALTER TABLE {self.name} ADD COLUMN {c.sql(dialect)}"
                for c in self.columns
                if c.since == version
            ]
            indexes = [i for i in self.indexes if i.since == version]
        for index in indexes:
            where = f" WHERE {index.where}" if index.where else ""
            statements.append(
                f"CREATE INDEX IF NOT EXISTS {index.name} ON {self.name} ({index.on}){where}"
            )
        return statements


JOBS = Table(
    "tether_jobs",
    (
        Column("seq", "serial"),
        Column("id", "text", unique=True),
        Column("backend", "text"),
        Column("state", "text"),
        Column("params", "json"),
        Column("metadata", "json"),
        Column("timeout", "real"),
        Column("fingerprint", "text"),
        Column("deadline", "int"),
        Column("created_at", "int"),
        Column("updated_at", "int"),
        Column("external", "json", null=True),
        Column("result", "json", null=True),
        Column("error", "json", null=True),
        Column("finished_at", "int", null=True),
        Column("next_check_at", "int", null=True),
        Column("attempt", "int", since=2, default="1"),
        Column("events", "int", since=2, default="0"),
        Column("heartbeat_timeout", "real", null=True, since=3),
        Column("heartbeat_at", "int", null=True, since=3),
        Column("heartbeat_due", "int", null=True, since=3),
        Column("progress", "json", null=True, since=3),
        Column("heartbeat_noted_at", "int", null=True, since=3),
        Column("progress_noted", "text", null=True, since=3),
        Column("tags", "json", since=4, default="'[]'"),
        Column("notify_url", "text", null=True, since=5),
        Column("queued_at", "int", null=True, since=5),
        Column("salt", "text", null=True, since=9),
        Column("stop_due", "int", null=True, since=11),
        Column("stop_attempt", "int", null=True, since=11),
        Column("tries_run", "text", null=True, since=13),
    ),
    (
        Index("tether_jobs_state", "state, seq"),
        Index("tether_jobs_backend", "backend, seq"),
        Index("tether_jobs_deadline", "deadline", "finished_at IS NULL"),
        Index("tether_jobs_check", "next_check_at", "next_check_at IS NOT NULL"),
        Index("tether_jobs_finished", "finished_at", "finished_at IS NOT NULL"),
        Index("tether_jobs_heartbeat", "heartbeat_due", "heartbeat_due IS NOT NULL", since=3),
        Index("tether_jobs_created", "created_at", since=4),
        Index("tether_jobs_queue", "backend, queued_at, seq", "state = 'queued'", since=5),
        Index("tether_jobs_active", "backend", "state IN ('pending', 'running')", since=5),
        Index("tether_jobs_created_day", "(created_at / 86400000), seq, created_at", since=6),
        Index("tether_jobs_stop", "stop_due", "stop_due IS NOT NULL", since=11),
    ),
)
"""The job index: one row per job (`JobRecord`). `events` counts the job's
events ever recorded: the last one's `seq` (see `EVENTS`). `heartbeat_due` is
when the watchdog next looks for a missed heartbeat (set at the trigger and by
each heartbeat, for jobs with a `heartbeat_timeout`); `heartbeat_noted_at` and
`progress_noted` (a digest) are of the last `heartbeat` event, which heartbeats
are throttled against. `tags` is the job's tags as shown; `TAGS` indexes them.
`stop_due` is set while the run of a job no workflow finishes is to be
stopped (`JobRecord.stop_due`), `stop_attempt` to the attempt whose run it
is; the watchdog finds those through its index. `tries_run` names the run of
the workflow that began the attempt's trigger tries (`JobRecord.tries_run`)."""

EVENTS = Table(
    "tether_events",
    (
        Column("job_id", "text"),
        Column("seq", "int"),
        Column("at", "int"),
        Column("type", "text"),
        Column("attempt", "int"),
        Column("data", "json"),
    ),
    since=2,
    primary_key="job_id, seq",
)
"""Job history: one row per event (`Event`), numbered 1, 2, ... per job."""

TAGS = Table(
    "tether_job_tags",
    (Column("tag", "text"), Column("seq", "int"), Column("job_id", "text")),
    (Index("tether_job_tags_job", "job_id", since=4),),
    since=4,
    primary_key="tag, seq",
)
"""One row per tag of a job (`seq` is the job's): a page of the jobs with a
tag walks that tag's key range newest first."""

NOTIFICATIONS = Table(
    "tether_notifications",
    (
        Column("id", "text"),
        Column("job_id", "text"),
        Column("attempt", "int"),
        Column("url", "text"),
        Column("body", "text"),
        Column("created_at", "int"),
        Column("due_at", "int"),
        Column("tries", "int"),
    ),
    (
        Index("tether_notifications_due", "due_at", since=5),
        Index("tether_notifications_job", "job_id, created_at", since=10),
    ),
    since=5,
    primary_key="id",
)
"""Completion notifications not yet delivered (`Notification`): the outbox.
`tether_notifications_job` answers whether one of a job's waits (its event
stream goes on while one does)."""

SLOTS = Table(
    "tether_slots",
    (Column("backend", "text"), Column("turns", "int")),
    since=5,
    primary_key="backend",
)
"""One row per backend with a limit (`TETHER_MAX_RUNNING`), updated first by
every transaction that counts its slots: its lock makes such transactions take
turns on Postgres (SQLite runs one writer at a time anyway)."""

RUN_KEYS = Table(
    "tether_run_keys",
    (Column("backend", "text"), Column("run_key", "text"), Column("job_id", "text")),
    (Index("tether_run_keys_job", "job_id", since=7),),
    since=7,
    primary_key="backend, run_key",
)
"""The keys each backend's external runs are known by (`Backend.run_keys`),
to the job that started them: a backend's notification (`POST
/backends/{name}/notifications`) finds its job with one key lookup. Written
with the job's `external`, deleted with the job."""

META = Table(
    "tether_meta",
    (Column("name", "text"), Column("value", "text")),
    since=8,
    primary_key="name",
)
"""Facts about the index itself, one row each: `index_id`, the id a Resonate
server's pairing names (`core.store.remote`), made the first time it is
asked for; and `last_host`, the group and the callback secrets' fingerprints
of the host that started last on a shared store (`Tether.compare_with_last_host`);
and `group`, the `TETHER_GROUP` the store's jobs run in (`Tether.take_group`)."""

TOMBSTONES = Table(
    "tether_tombstones",
    (Column("id", "text"), Column("deleted_at", "int")),
    (Index("tether_tombstones_deleted", "deleted_at", since=9),),
    since=9,
    primary_key="id",
)
"""The ids of jobs retention deleted, for `TOMBSTONE_DAYS`: a new job under
such an id gets a `salt` (`JobRecord.salt`), so the deleted job's callback
URLs and idempotency keys are not its own."""

_encode_json = msgspec.json.encode


def json_text(value: Any) -> str | None:
    """A `json` column's value: JSON text, or NULL for None."""
    return None if value is None else _encode_json(value).decode()


class RowCodec[T: msgspec.Struct]:
    """Rows of `table` to and from `struct`, whose fields are the table's
    columns: `json` columns are encoded and decoded (to the field's type),
    others pass as they are."""

    def __init__(self, table: Table, struct: type[T]) -> None:
        fields = {f.name: f.type for f in msgspec.structs.fields(struct)}
        if set(fields) != {c.name for c in table.columns}:
            raise TypeError(f"{struct.__name__}'s fields are not the columns of {table.name}")
        self.table = table
        self.columns = ", ".join(c.name for c in table.columns)
        """The select list: every column, in the table's order."""
        self._written = [(c.name, c.type == "json") for c in table.columns if c.type != "serial"]
        names = ", ".join(name for name, _ in self._written)
        marks = ", ".join("?" for _ in self._written)
        self.insert = f"INSERT INTO {table.name} ({names}) VALUES ({marks})"
        """An insert of every column the database does not assign, `?` for each."""
        self.decode: Callable[[tuple[Any, ...]], T] = _row_decoder(table, struct, fields)
        """A row selected with `columns`, as a `struct`."""

    def values(self, rec: T) -> tuple[Any, ...]:
        """The arguments of `insert` for `rec`."""
        return tuple(
            json_text(getattr(rec, name)) if is_json else getattr(rec, name)
            for name, is_json in self._written
        )


def _row_decoder[T](
    table: Table, struct: type[T], fields: Mapping[str, Any]
) -> Callable[[tuple[Any, ...]], T]:
    """The decoder written out for these columns, as `dataclasses` writes an
    `__init__` (from the declared names only): every row read goes through it,
    and this is as fast as one written by hand, about twice a loop's speed."""
    scope: dict[str, Any] = {"struct": struct}
    args = []
    for c in table.columns:
        value = f"c_{c.name}"
        if c.type == "json":
            scope[f"decode_{c.name}"] = json_decoder(fields[c.name]).decode  # (floats: `read_json`)
            value = f"decode_{c.name}({value})"
            if c.null:
                value = f"None if c_{c.name} is None else {value}"
        args.append(f"{c.name}={value}")
    unpack = "".join(f"c_{c.name}, " for c in table.columns)
    source = f"def decode(row):\n    {unpack}= row\n    return struct({', '.join(args)})\n"
    exec(compile(source, f"<{table.name} row decoder>", "exec"), scope)
    decode: Callable[[tuple[Any, ...]], T] = scope["decode"]
    return decode


JOB_ROWS = RowCodec(JOBS, JobRecord)
EVENT_ROWS = RowCodec(EVENTS, Event)
NOTIFICATION_ROWS = RowCodec(NOTIFICATIONS, Notification)
