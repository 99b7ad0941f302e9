"""The seam that picks the durable store from `TETHER_STORE`.

A store is two things living in one place: the Resonate connection the
workflow runs on (promises, tasks, the messages that move work between
processes) and the job index listing needs. See docs/architecture.md.

| `TETHER_STORE`            | `Store` kind | promises and tasks            | job index         |
|---------------------------|--------------|-------------------------------|-------------------|
| `sqlite:///PATH` (default)| `sqlite`     | embedded SQLite protocol      | table in the file |
| `memory://`               | `memory`     | embedded, on a temporary file | table in the file |
| `postgresql://...`        | `postgresql` | resonate-pg                   | table in the DB   |
| `http(s)://HOST:PORT`     | `resonate`   | a Resonate server (HTTP, SSE) | `TETHER_INDEX`    |

`memory://` (tests, demos) keeps nothing: its file is deleted when the store closes.
Each store has a notification secret (`Store.notify_secret`): `TETHER_NOTIFY_SECRET`,
else on the embedded store one made once and kept beside the database
(`PATH.notify-secret`); Postgres and a Resonate server have none without
the setting. During a rotation it comes with previous ones, each message being
signed with all of them: `TETHER_NOTIFY_SECRET_PREVIOUS`, and on the embedded
store the file's later lines (`tether rotate-notify-secret`).
Opening a store brings its tables to this code's schema version
(`core.store.migrations`).
"""

from __future__ import annotations

from core.errors import StoreConfigError
from core.settings import Settings, describe
from core.store.base import (
    STORE_CALL_TIMEOUT,
    STORE_WAIT,
    Store,
    WorkflowIds,
    check_notify_secret,
    check_previous_notify_secrets,
    scheme_of,
)
from core.store.jobs import JobIndex

__all__ = [
    "STORE_CALL_TIMEOUT",
    "STORE_WAIT",
    "JobIndex",
    "Store",
    "StoreConfigError",
    "WorkflowIds",
    "open_store",
]


async def open_store(settings: Settings, pid: str) -> Store:
    """Open the store `settings.store` names, its tables migrated. Raises
    `StoreConfigError` saying why when it cannot (a `TETHER_NOTIFY_SECRET`
    or `TETHER_NOTIFY_SECRET_PREVIOUS` of the wrong form included, named but
    never shown)."""
    if settings.notify_secret:
        check_notify_secret(settings.notify_secret)
    scheme = scheme_of("TETHER_STORE", settings.store)
    if scheme not in ("sqlite", "memory", "postgresql", "postgres", "http", "https"):
        raise StoreConfigError(
            f"TETHER_STORE={describe(settings.store)!r} is not supported; use sqlite:///PATH,"
            " memory://, postgresql://... or http(s)://HOST:PORT (a Resonate server)"
        )
    if check_previous_notify_secrets(settings.notify_secret_previous) and not (
        settings.notify_secret or scheme in ("sqlite", "memory")
    ):
        raise StoreConfigError(
            "TETHER_NOTIFY_SECRET_PREVIOUS is set but TETHER_NOTIFY_SECRET is not:"
            f" {describe(settings.store)} keeps no notification secret, so there is no"
            " current one to sign with; set TETHER_NOTIFY_SECRET too, the same on every host"
        )
    if settings.index and scheme not in ("http", "https"):
        raise StoreConfigError(
            f"TETHER_INDEX is only for a Resonate server store (TETHER_STORE=http(s)://...);"
            f" {describe(settings.store)} keeps its job index itself: unset TETHER_INDEX"
        )
    if settings.store_token and scheme not in ("http", "https"):  # it was ignored, unsaid
        raise StoreConfigError(
            "TETHER_STORE_TOKEN is only for a Resonate server store (TETHER_STORE=http(s)://...);"
            f" {describe(settings.store)} takes no token: unset TETHER_STORE_TOKEN"
        )
    # Each kind is imported only when asked for: psycopg is slow to import.
    if scheme == "sqlite":
        from core.store.embedded import EmbeddedStore

        return await EmbeddedStore.open(settings, pid)
    if scheme == "memory":
        from core.store.embedded import MemoryStore

        return await MemoryStore.open(settings, pid)
    if scheme in ("postgresql", "postgres"):
        from core.store.postgres import PostgresStore

        return await PostgresStore.open(settings, pid)
    from core.store.remote import RemoteStore  # http(s): the others are refused above

    return await RemoteStore.open(settings, pid)
