"""The one policy for a SQLite call that finds another connection's write lock
taken: never wait inside SQLite (that would block the event loop), retry after
a short sleep that doubles up to a cap, and give up after a lock timeout."""

from __future__ import annotations

import time
from typing import Final

#: How long a request waits for another connection's write lock.
DEFAULT_LOCK_TIMEOUT: Final = 5.0
#: The first retry's wait, and the most any retry waits.
FIRST_DELAY: Final = 0.0002
MAX_DELAY: Final = 0.005


class BusyBackoff:
    """Waits between retries of one call that found the write lock taken.

    ::

        backoff = BusyBackoff(timeout)
        while True:
            try:
                return call()
            except Busy:
                delay = backoff.next_delay()
                if delay is None:
                    raise GaveUp(f"... (gave up after {timeout:g} s)")
                await asyncio.sleep(delay)
    """

    def __init__(self, timeout: float = DEFAULT_LOCK_TIMEOUT) -> None:
        self.timeout = timeout
        self._since = 0.0
        self._delay = FIRST_DELAY

    def reset(self) -> None:
        """The call got through: the next busy answer starts a new wait."""
        self._since, self._delay = 0.0, FIRST_DELAY

    def next_delay(self) -> float | None:
        """Seconds to sleep before the next try, or None once `timeout` has
        passed since the first busy answer (the wait then starts anew)."""
        now = time.monotonic()
        if not self._since:
            self._since = now
            return self._delay
        if now - self._since >= self.timeout:
            self.reset()
            return None
        self._delay = min(self._delay * 2, MAX_DELAY)
        return self._delay
