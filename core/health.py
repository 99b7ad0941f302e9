"""What `GET /health` says beyond "the store answers": each backend's readiness
and the backends that waiting jobs need but no plugin offers any more.

Both are found in the background and cached, so `/health` stays a cheap
liveness check and a slow external system never delays start-up or a probe:
first at the first `/health` request or `FIRST_CHECK_DELAY` seconds after
start-up, whichever comes first, then every `TETHER_READINESS_INTERVAL`
seconds. (Not at once: a service started for a moment, a test say, should not
make requests to every backend's system.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from core.errors import StoreUnavailable, reason
from core.hookspecs import Backend, Readiness
from core.plugins import PLUGIN_FAULTS, Plugins, cancelling
from core.redact import without_secrets
from core.settle import store_call
from core.store.jobs import JobIndex

log = logging.getLogger("tether")

FIRST_CHECK_DELAY = 10.0
"""Seconds after start-up before the first check, unless `/health` asks first."""

READINESS_TIMEOUT = 30.0
"""Seconds a backend's `readiness` may take before it counts as `error`."""

STORE_CHECK_TIMEOUT = 2.0
"""Seconds `/health` waits for the store's answer before it answers 503
itself: well under a probe's timeout (docs/operations.md: give it 3 s or
more), so a store that takes connections and never answers (a hung server,
a blackholed address) is a 503, not a probe's timeout. A store call of a
request waits longer (`STORE_CALL_TIMEOUT`)."""


_LET_GO: set[asyncio.Task[Any]] = set()
"""Pings given up on and still letting go (held: the loop keeps only weak
references to tasks)."""


def _let_go(ping: asyncio.Task[Any]) -> None:
    _LET_GO.discard(ping)
    if not ping.cancelled():
        ping.exception()  # retrieved: nobody waits for it any more


async def store_answers(jobs: JobIndex, store: str) -> None:
    """`/health`'s look at the store (`jobs.ping()`: the index, and the
    Resonate server beside it); `StoreUnavailable` when it fails, or does not
    answer within `STORE_CHECK_TIMEOUT` (naming `store`, without credentials).

    A ping given up on is cancelled and left to end on its own, not waited
    for: a driver may take long to let go of a call its server never answers
    (two hosts on a Postgres stopped with SIGSTOP: `/health` took 8 s, the
    store call's bound, until 2026-12-05)."""
    ping = asyncio.ensure_future(store_call(jobs.ping()))
    try:
        await asyncio.wait({ping}, timeout=STORE_CHECK_TIMEOUT)
    finally:
        if not ping.done():  # given up on, or the request itself cancelled
            ping.cancel()
            _LET_GO.add(ping)
            ping.add_done_callback(_let_go)
    if not ping.done():
        refused = jobs.refused()  # what the timeout hides: a refused password, ...
        said = f"; {refused}" if refused else ""
        raise StoreUnavailable(
            f"the store ({store}) did not answer within {STORE_CHECK_TIMEOUT:g} s{said}"
        )
    ping.result()


async def orphans(plugins: Plugins, jobs: JobIndex) -> dict[str, int]:
    """How many open (queued, pending or running) jobs each backend that is not
    installed has: one index lookup per backend with open jobs, whatever their
    number (a million waiting jobs cost nothing here)."""
    return await jobs.waiting_backends(plugins.backends)


def warn_orphans(missing: dict[str, int]) -> None:
    for backend, count in missing.items():
        log.warning(
            "backend %r is not installed, and %d waiting job(s) use it: their callbacks"
            " still settle them, but nothing can stop or check their external runs;"
            " reinstall its plugin (`tether install`) or cancel them",
            backend,
            count,
        )


async def check(backend: Backend) -> Readiness:
    """`backend.readiness()`, bounded; an exception is an `error` naming its type
    only (its message may hold a secret). A `SystemExit` of the plugin's, or
    a `CancelledError` of its own, is one too: the check runs in a task of
    its own, which the first stopped the service from (a crash at each
    restart's first `/health`), and the second ended the checks of the
    process for good (found by a review)."""
    try:
        found = await asyncio.wait_for(backend.readiness(), READINESS_TIMEOUT)
    except TimeoutError:
        return Readiness("error", f"no answer within {READINESS_TIMEOUT:g} s")
    except PLUGIN_FAULTS as exc:
        if isinstance(exc, asyncio.CancelledError) and cancelling():
            raise  # the check's own: the service stops
        return Readiness("error", f"readiness check failed: {type(exc).__name__}")
    if not isinstance(found, Readiness):
        return Readiness("error", f"readiness returned {type(found).__name__}, not Readiness")
    # A plugin's words, shown by the open `GET /health` and logged: without
    # the environment's secrets and a URL's `user:password@` (a review,
    # 2026-12-07, found a third party's API key kept whole there).
    said = without_secrets(str(found.reason))
    return found if said == found.reason else Readiness(found.status, said)


class Health:
    """The cached readiness of every backend and the missing backends, kept
    fresh by one background task per process."""

    def __init__(self, plugins: Plugins, jobs: JobIndex, interval: float) -> None:
        self.plugins = plugins
        self.jobs = jobs
        self.interval = interval
        self.readiness: dict[str, Readiness | None] = dict.fromkeys(plugins.backends)
        self.missing: dict[str, int] = {}
        self.store_problem = ""
        """What the last background look at the store found wrong ('' none)."""
        self._task: asyncio.Task[None] | None = None
        self._asked = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def refresh(self) -> None:
        """Check every backend (at once) and count the missing ones' jobs; ask
        the store as `/health` does, so that what the store's check acts on
        (a Resonate server paired with another index: `core.store.remote`)
        is found with no probe asking."""
        try:
            await asyncio.wait_for(self.jobs.ping(), READINESS_TIMEOUT)
            self.store_problem = ""
        except Exception as exc:  # /health says so when it is asked
            problem = reason(exc)
            if problem != self.store_problem:
                log.warning("the store's health check failed: %s", problem)
            self.store_problem = problem
        await asyncio.gather(*(self.look(name) for name in self.plugins.backends))
        await self.count_missing()

    async def look(self, name: str) -> None:
        """Check one backend, and keep what it said as soon as it says it (a
        slow one leaves the others' shown)."""
        readiness = await check(self.plugins.backends[name])
        if readiness != self.readiness.get(name) and readiness.status != "ok":
            log.warning("backend %s: %s: %s", name, readiness.status, readiness.reason)
        self.readiness[name] = readiness

    async def count_missing(self) -> None:
        """Count the open jobs of backends no plugin offers (`missing`)."""
        try:
            self.missing = await orphans(self.plugins, self.jobs)
        except Exception as exc:  # the store is down: /health says so on its own
            log.warning("counting jobs of missing backends failed: %s", type(exc).__name__)

    async def _run(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._asked.wait(), min(FIRST_CHECK_DELAY, self.interval))
        while True:
            await self.refresh()
            await asyncio.sleep(self.interval)

    def body(self) -> dict[str, Any]:
        """The part of `/health`'s body this module knows (and the first check,
        if it has not started yet)."""
        self._asked.set()
        return {
            "readiness": {
                name: {"status": r.status, "reason": r.reason}
                if r is not None
                else {"status": "unknown", "reason": "not checked yet"}
                for name, r in sorted(self.readiness.items())
            },
            "missing": [{"backend": b, "waiting": n} for b, n in self.missing.items()],
        }
