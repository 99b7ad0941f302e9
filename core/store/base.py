"""What every kind of store offers the service."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from core.store.jobs import JobIndex
from resonate_sqlite import DEFAULT_LOCK_TIMEOUT

STORE_WAIT = DEFAULT_LOCK_TIMEOUT
"""Seconds one store call may wait for what it needs: the SQLite write lock
(the embedded engine and the job index) or a connection of the Postgres pool.
Past it the call fails as `StoreUnavailable`."""

STORE_CALL_TIMEOUT = STORE_WAIT + 3.0
"""The API's backstop for one store call, for calls with no bound of their own:
longer than `STORE_WAIT`, so a store that is only waiting says so itself."""


class Store(ABC):
    """A Resonate connection and the job index, in one durable place.

    Subclasses, one per kind: `core.store.embedded.EmbeddedStore` (and its
    `MemoryStore`), `core.store.postgres.PostgresStore`."""

    kind: ClassVar[str]
    """`sqlite`, `memory` or `postgresql`."""

    def __init__(
        self,
        connection: Any,
        jobs: JobIndex,
        callback_secret: str,
        callback_secret_previous: tuple[str, ...] = (),
    ) -> None:
        self.connection = connection
        """The Resonate `Network` that is also the process's `Source`."""
        self.jobs = jobs
        self.callback_secret = callback_secret
        """The configured secret, or the one this store keeps (see Settings)."""
        self.callback_secret_previous = callback_secret_previous
        """Earlier secrets whose callback URLs are still accepted during a
        rotation: the configured ones and those this store keeps."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r})"

    @abstractmethod
    async def delete_promises(self, older_than_ms: int) -> int:
        """Delete the promises of work that finished more than `older_than_ms`
        ago (never anything pending); return how many went. Raises
        `core.errors.InvalidRequest` where the store cannot do it."""

    async def close(self) -> None:
        """Close the job index (and what else the kind holds)."""
        await self.jobs.close()
