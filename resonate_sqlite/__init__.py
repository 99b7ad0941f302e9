"""resonate-sqlite: the Resonate server protocol on a SQLite file, in process.

A resonate-sdk connection (the SDK's `Network` and `Source` seam), like
resonate-pg's `PostgresConnection`, for programs that want durable promises,
tasks and schedules without running a Resonate server or Postgres; it answers
as resonate-pg's `resonate.sql` does::

    from resonate.resonate import Resonate
    from resonate_sqlite import SqliteConnection

    conn = SqliteConnection("app.db", group="default", pid="worker-1")
    r = Resonate(network=conn, group="default", pid="worker-1")

It imports nothing of Tether. See README.md beside this file.
"""

from resonate_sqlite.busy import DEFAULT_LOCK_TIMEOUT, BusyBackoff, retry_briefly
from resonate_sqlite.connection import SqliteConnection, SqliteStoreError
from resonate_sqlite.engine import HOT_PATH_AUTOCHECKPOINT, is_busy

__all__ = [
    "DEFAULT_LOCK_TIMEOUT",
    "HOT_PATH_AUTOCHECKPOINT",
    "BusyBackoff",
    "SqliteConnection",
    "SqliteStoreError",
    "is_busy",
    "retry_briefly",
]
