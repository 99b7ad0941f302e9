"""A process's hold on the stop of a job's run, kept alive while the stop runs.

A job that ended with no workflow to finish it has its run's stop recorded as
due in its row (`JobRecord.stop_due`, see `core.steps.JobSteps.finish_orphan`);
so does one canceled or timed out while its trigger's call was under way, for
what that call may start (`JobIndex.hold_stop`, `JobSteps._answered_late`).
The value of `stop_due` is the lease: whoever wrote it holds the stop until
then, and any process's watchdog may take the stop over once it passed
(`Watchdog.stop_again`, by compare-and-set on that value). The lease is short
(`TETHER_TASK_TTL`, as a workflow step's): the holder renews it every third
of that while the backend's `cancel` and its retries take, so a process that
dies hands its stops over within one lease, and one that lives keeps them for
as long as they take.

A renewal is a compare-and-set from the value held to a later one. One whose
write did not answer (the store slow, or the renewal cut short) may yet be
applied, so both values stay candidates (`claims`) until a later write tells
which is the row's: the write that ends the hold (`stopped`, `release_stop`)
tries each, oldest first, and at most one can match. Oldest first: a
renewal cut short whose write still lands (on Postgres, a statement sent
before the cancellation) moves the row from an older value to a newer, so a
try of the older value that misses is followed by one of the newer that
finds it, never the other way round.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from core.errors import reason
from core.settle import store_call
from core.store.jobs import JobIndex, JobRecord, now_ms

log = logging.getLogger("tether")

RENEWALS_PER_LEASE = 3
"""How often the holder renews within one lease (each a third of it after the
last one began): a renewal lost to a slow or failing store leaves one more
try a third of a lease before it runs out, and another as it does."""


class StopLease:
    """This process's hold on the stop of `rec`'s run, from `rec.stop_due`."""

    def __init__(self, jobs: JobIndex, rec: JobRecord, length_ms: int) -> None:
        assert rec.stop_due is not None
        self.jobs = jobs
        self.rec = rec
        self.length_ms = length_ms
        self._claims = [rec.stop_due]
        """The values of `stop_due` this process may hold the stop under,
        the newest last: more than one only while a renewal's outcome is
        unknown."""

    @property
    def claims(self) -> list[int]:
        """The candidates, oldest first (see the module's docstring); empty
        once the stop was lost (taken over by another process, or recorded)."""
        return list(self._claims)

    @property
    def until(self) -> int:
        """When the lease runs out at the latest, as far as this process knows."""
        return max(self._claims, default=0)

    @contextlib.asynccontextmanager
    async def kept(self) -> AsyncIterator[StopLease]:
        """Renew the lease in the background for as long as the block runs;
        the renewals are over (none in flight) when it exits, so the write
        that ends the hold sees every value it may be under."""
        renewing = asyncio.create_task(self._keep())
        try:
            yield self
        finally:
            renewing.cancel()
            await asyncio.wait([renewing])

    async def _keep(self) -> None:
        """A renewal every third of the lease, counted from the last one's
        start: one the store held (up to `STORE_CALL_TIMEOUT`, longer than a
        third of a short lease) does not put the next one off by as long."""
        loop = asyncio.get_running_loop()
        every = self.length_ms / RENEWALS_PER_LEASE / 1000
        began = loop.time()
        while self._claims:
            await asyncio.sleep(max(began + every - loop.time(), 0))
            began = loop.time()
            await self.renew()

    async def renew(self) -> None:
        """Move `stop_due` to a lease from now, from whichever candidate is
        the row's. A candidate the store refuses is not (compare-and-set:
        nothing written) and is dropped; a write that fails, or is cut
        short, leaves the new value a candidate beside the old."""
        until = now_ms() + self.length_ms
        for held in self.claims:
            self._claims.append(until)
            try:
                claimed = await store_call(self.jobs.claim_stop(self.rec.id, held, until))
            except Exception as exc:
                log.warning(
                    "job %s: renewing the lease on its run's stop failed (%s); the lease"
                    " lasts until %d",
                    self.rec.id,
                    reason(exc),
                    self.until,
                    extra=self.rec.log_extra(),
                )
                return
            self._claims.remove(until)
            if claimed is not None:
                self._claims = [until]
                return
            self._claims.remove(held)
        if not self._claims:
            log.warning(
                "job %s: the lease on its run's stop is no longer this process's (taken"
                " over by another process, or the stop's outcome recorded)",
                self.rec.id,
                extra=self.rec.log_extra(),
            )
