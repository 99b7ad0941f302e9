"""What every kind of store offers the service."""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any, ClassVar, Protocol
from urllib.parse import urlsplit

from core.errors import StoreConfigError
from core.settings import describe, listed
from core.store.jobs import JobIndex
from resonate_sqlite import DEFAULT_LOCK_TIMEOUT


def scheme_of(name: str, url: str) -> str:
    """The scheme of setting `name`'s URL (lower case), or `StoreConfigError`
    naming the setting (its value `describe`d) when Python cannot read it."""
    try:
        return urlsplit(url).scheme
    except ValueError as exc:
        raise StoreConfigError(
            f"{name}={describe(url)!r} is not a URL Tether can read: {exc}"
        ) from None


STORE_WAIT = DEFAULT_LOCK_TIMEOUT
"""Seconds one store call may wait for what it needs: the SQLite write lock
(the embedded engine and the job index) or a connection of the Postgres pool.
Past it the call fails as `StoreUnavailable`."""

LAST_HOST = "last_host"
"""The `tether_meta` fact `core.service.Tether.compare_with_last_host` keeps
(read by `tether rotate-secret --drop-previous` too)."""

STOP_GRACE = 20.0
"""Seconds a stopping service waits for the workflow steps under way to end
(`core.service.Tether.close`); a Resonate server's requests go on that long
after its message stream closed (`RemoteConnection.stop`)."""

STORE_CALL_TIMEOUT = STORE_WAIT + 3.0
"""The API's backstop for one store call, for calls with no bound of their own:
longer than `STORE_WAIT`, so a store that is only waiting says so itself."""

NOTIFY_SECRET_PREFIX = "whsec_"
NOTIFY_SECRET_BYTES = (24, 64)
"""How long a notification secret's key may be, in bytes (Standard Webhooks)."""
MAKE_NOTIFY_SECRET = (
    "python3 -c 'import base64, secrets;"
    ' print("whsec_" + base64.b64encode(secrets.token_bytes(32)).decode())\''
)
"""A command that prints a new notification secret."""


def new_notify_secret() -> str:
    """A new notification secret: `whsec_` and the base64 of 32 random bytes."""
    return NOTIFY_SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")
"""The standard base64 alphabet, padding optional."""


def check_notify_secret(value: str, source: str = "TETHER_NOTIFY_SECRET") -> str:
    """`value` if it is a Standard Webhooks signing secret: `whsec_` then the
    base64 (standard alphabet, padding optional) of 24 to 64 bytes. Else
    `StoreConfigError` naming `source` (the setting or the file) and what is
    wrong, never the value."""
    low, high = NOTIFY_SECRET_BYTES
    if not value.startswith(NOTIFY_SECRET_PREFIX):
        problem = "does not start with whsec_"
    else:
        key = value.removeprefix(NOTIFY_SECRET_PREFIX)
        try:
            size = len(base64.b64decode(key + "=" * (-len(key) % 4), validate=True))
        except binascii.Error:
            problem = "is not whsec_ followed by base64 (A-Z a-z 0-9 + /)"
            if BASE64.fullmatch(key):  # the alphabet's: too short to be whole bytes
                problem = f"is whsec_ and {len(key)} base64 characters, which make no whole bytes"
        else:
            problem = "" if low <= size <= high else f"holds {size} bytes, not {low} to {high}"
    if problem:
        raise StoreConfigError(
            f"{source} {problem}: a notification secret is whsec_ and the base64 of"
            f" {low} to {high} random bytes; make one with {MAKE_NOTIFY_SECRET}"
        )
    return value


def check_previous_notify_secrets(
    value: str, source: str = "TETHER_NOTIFY_SECRET_PREVIOUS"
) -> tuple[str, ...]:
    """The comma-separated secrets of `value` (blanks dropped), each checked
    as `check_notify_secret` does; a `StoreConfigError` names `source` and
    the item by its place (`item 2`), never a value."""
    items = listed(value)
    for place, item in enumerate(items, 1):
        check_notify_secret(item, f"{source} (item {place} of {len(items)})")
    return items


def signing_secrets(current: str, previous: Iterable[str] = ()) -> tuple[str, ...]:
    """`Store.notify_secrets`: `current` then each of `previous` not already
    named; none without `current`."""
    if not current:
        return ()
    return tuple(dict.fromkeys((current, *previous)))


class WorkflowIds(Protocol):
    """How a job's workflows name their promises (`core.workflow`, which
    hands this in): what retention needs to find the promises of a job the
    index holds open, which it must not delete (`Store.delete_promises`,
    `Store.kept_since`)."""

    def root(self, job_id: str, attempt: int) -> str:
        """The root promise id of attempt `attempt` of job `job_id`: its
        workflow's; every other promise of the workflow is `{root}:...`."""
        ...

    def job(self, root_id: str) -> str:
        """The job the workflow whose root promise is `root_id` belongs to."""
        ...


class Store(ABC):
    """A Resonate connection and the job index, in one durable place.

    Subclasses, one per kind: `core.store.embedded.EmbeddedStore` (and its
    `MemoryStore`), `core.store.postgres.PostgresStore`,
    `core.store.remote.RemoteStore` (a Resonate server)."""

    kind: ClassVar[str]
    """`sqlite`, `memory`, `postgresql` or `resonate`."""

    def __init__(
        self,
        connection: Any,
        jobs: JobIndex,
        callback_secret: str,
        callback_secret_previous: tuple[str, ...] = (),
        notify_secrets: tuple[str, ...] = (),
    ) -> None:
        self.connection = connection
        """The Resonate `Network` that is also the process's `Source`."""
        self.jobs = jobs
        self.callback_secret = callback_secret
        """The configured secret, or the one this store keeps (see Settings)."""
        self.callback_secret_previous = callback_secret_previous
        """Earlier secrets whose callback URLs are still accepted during a
        rotation: the configured ones and those this store keeps."""
        self.notify_secrets = notify_secrets
        """The keys completion notifications are signed with (`whsec_...`),
        current first: the configured one or the one this store keeps, then,
        during a rotation, the previous ones (configured in
        `TETHER_NOTIFY_SECRET_PREVIOUS` or kept by this store; see
        `signing_secrets`). Each message carries one signature per key. Empty
        when there is no current one (Postgres without `TETHER_NOTIFY_SECRET`:
        jobs asking for notifications are refused)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r})"

    @property
    def notify_secret(self) -> str | None:
        """The current notification secret (the one receivers are given), or
        None when there is none."""
        return self.notify_secrets[0] if self.notify_secrets else None

    @abstractmethod
    async def delete_promises(self, older_than_ms: int, ids: WorkflowIds | None = None) -> int:
        """Delete the promises of work that finished more than `older_than_ms`
        ago (never anything pending); return how many went. Raises
        `core.errors.InvalidRequest` where the store cannot do it.

        A promise that *timed out* is settled all the same, at its timeout,
        whether or not its job is over: a workflow the store timed out (no
        process ran from before its job's deadline until an hour after it)
        belongs to a job the index may still hold open, which the watchdog
        has yet to time out (it settles the job's callback promise: one
        deleted leaves the job open for good). So, with `ids`, nothing of a
        job the index holds open goes: a store that can tell which promises
        are whose as it deletes them keeps them here; one that cannot says
        how far back it must keep everything (`kept_since`), and the caller
        reaches no further."""

    async def kept_since(self, ids: WorkflowIds, now: int) -> int | None:
        """For a store whose `delete_promises` cannot keep the promises of
        jobs the index holds open by itself: the earliest time (Unix ms) a
        promise of such a job may have settled that the store's retention
        could reach, and nothing settled since may be deleted (retention then
        reaches no further back, for job rows as for promises). None: nothing
        to keep, or `delete_promises` keeps them itself (the default)."""
        return None

    def out_of_service(self) -> str:
        """Why this process must start no workflow, or '' (a Resonate server
        re-paired with another index while it ran: `core.store.remote`)."""
        return ""

    async def close(self) -> None:
        """Close the job index (and what else the kind holds)."""
        await self.jobs.close()
