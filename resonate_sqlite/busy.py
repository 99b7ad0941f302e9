"""The one policy for a SQLite call that finds another connection's write lock
taken: never wait inside SQLite (its busy handler sleeps a millisecond and
more at a time, with the event loop stopped); retry at once for a fraction of
a millisecond (`retry_briefly`); then retry after a short sleep on the event
loop that doubles up to a cap (`BusyBackoff`); give up after a lock timeout.

Why the brief retry first. With two workers on one file, the other process
holds the write lock for well under a millisecond in most of its
transactions (an engine batch: 0.2-0.6 ms at the median under the
benchmark's load), but a sleep on a loaded event loop lasts at least a whole
turn of it. In the benchmark (2 workers, concurrency 32, 4,000 jobs) 29-30%
of the job index's write transactions and 15-21% of the engine's batches
found the lock taken, and a request that then slept on the loop waited
6-17 ms at the median and 55-140 ms at the 99th percentile for a lock that
was free again within a millisecond: the 99th percentile of a callback's
index write was 31-88 ms against a median of 0.3 ms. Retried at once every
`SPIN_STEP` for up to `SPIN` (the thread asleep, the GIL released, the event
loop waiting), 88-93% of them got the lock (after 0.3-0.4 ms at the median),
and with it around both connections' `BEGIN IMMEDIATE` and the index's
autocommit statements the 99th percentile of callback → `GET` succeeded went
from 89-102 ms to 70-89 ms (51-62 ms with `gc.freeze()` after start-up too),
at the same CPU per job (2026-12-01, alternating runs on a quiet machine).

Retry briefly only a call that is cheap to repeat and has done nothing when
it fails busy: the `BEGIN IMMEDIATE` of a transaction, or a statement in
autocommit. (Repeating a whole group-commit batch, which decodes its requests
again on each try, bought nothing measurable.)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

#: How long a request waits for another connection's write lock.
DEFAULT_LOCK_TIMEOUT: Final = 5.0
#: The first retry's wait, and the most any retry waits.
FIRST_DELAY: Final = 0.0002
MAX_DELAY: Final = 0.005
#: How long `retry_briefly` retries a busy call at once (the event loop
#: waiting), and the sleep between its tries.
SPIN: Final = 0.0005
SPIN_STEP: Final = 0.00005
#: After a spin that did not get the lock (another process holds it longer:
#: `tether gc`, a migration, an operator's transaction), calls of this
#: process within this long try once and go to the loop at once, so however
#: many wait, the loop is held up at most about SPIN in every SPIN + this.
SPIN_COOLDOWN: Final = 0.005

_spin_failed_at = float("-inf")


def retry_briefly[T](
    call: Callable[[], T], busy: Callable[[Exception], bool], budget: float = SPIN
) -> T:
    """`call()`, tried again every `SPIN_STEP` while it fails with an error
    `busy` says is a taken write lock, for up to `budget` seconds; then that
    error is raised, for the caller's `BusyBackoff` to wait on the loop.

    The thread sleeps between tries (other threads and processes run), so
    this holds up the event loop for about `budget` plus one try (plus how
    late a sleep of `SPIN_STEP` wakes on a busy machine). Within
    `SPIN_COOLDOWN` of a spin of this process that failed, a busy call is
    tried once only. Never for a lock this thread itself holds (a
    transaction of the same connection that only the loop can end): say so
    in `busy`. For the thread that runs the event loop only."""
    global _spin_failed_at
    deadline = 0.0
    while True:
        try:
            return call()
        except Exception as exc:
            if not busy(exc):
                raise
            now = time.monotonic()
            if now - _spin_failed_at < SPIN_COOLDOWN:
                raise
            if not deadline:
                deadline = now + budget
            elif now >= deadline:
                _spin_failed_at = now
                raise
        time.sleep(SPIN_STEP)


class BusyBackoff:
    """Waits between retries of one call that found the write lock taken.

    ::

        backoff = BusyBackoff(timeout)
        while True:
            try:
                return retry_briefly(begin, is_busy)
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
        if self._since and time.monotonic() - self._since >= self.timeout:
            self.reset()
            return None
        return self.pace()

    def pace(self) -> float:
        """Seconds to sleep before the next try, whatever the time waited:
        for a caller that keeps deadlines of its own (the group commit's
        queue, where each entry has its own)."""
        if not self._since:
            self._since = time.monotonic()
        else:
            self._delay = min(self._delay * 2, MAX_DELAY)
        return self._delay
