"""`GET /metrics` in the Prometheus text format, and how long requests take.

The jobs' metrics are `core.metrics`; this module adds the request-duration
histogram, the route, and what several worker processes need: under `tether
serve --workers N` (N > 1) `multiprocess_dir` gives the workers a fresh,
private PROMETHEUS_MULTIPROC_DIR, each worker's prometheus_client counts in
files there, and a scrape, whichever worker answers it, adds up all of them.
One process counts in memory (prometheus_client's default registry).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from litestar import Litestar, Request, Response, get
from litestar.di import NamedDependency
from prometheus_client import REGISTRY, Histogram, disable_created_metrics
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from api.auth import READ
from core.metrics import JobsCollector, job_gauges, prime
from core.scratch import Scratch
from core.service import Tether
from core.settle import store_call
from core.store.jobs import now_ms

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

REQUEST_DURATION = Histogram(
    "tether_http_request_duration_seconds",
    "Seconds from a request's arrival to its answer, by route template"
    " (`unmatched` for a path no route takes).",
    ["method", "route", "status"],
)

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
"""Methods shown as they are; any other is `other` (a label value a client
could choose freely would make a new series per request)."""

UNMATCHED = "unmatched"


@contextlib.contextmanager
def multiprocess_dir(workers: int) -> Iterator[None]:
    """Around `tether serve`'s uvicorn run: with more than one worker, a new
    private directory (mode 0700) in PROMETHEUS_MULTIPROC_DIR for the
    workers' metric files, removed at exit; with one, nothing. The
    directories a killed `tether serve` left are deleted as it is made
    (`core.scratch`).

    Enter it before the workers start: prometheus_client reads the variable
    when a worker imports it. This process imported it earlier, so it keeps
    counting in memory, which is harmless: it serves no requests. A directory
    of an earlier run is never reused, so no dead worker's counts leak into
    a new run."""
    if workers <= 1:
        yield
        return
    previous = os.environ.get(MULTIPROC_ENV)
    scratch = Scratch(METRICS_PREFIX, unlocked_in_use=workers_alive)
    os.environ[MULTIPROC_ENV] = str(scratch.path)
    try:
        yield
    finally:
        scratch.remove()
        if previous is None:
            del os.environ[MULTIPROC_ENV]
        else:
            os.environ[MULTIPROC_ENV] = previous


METRICS_PREFIX = "tether-metrics-"

_WORKER_FILE = re.compile(r"_(\d+)\.db$")


def workers_alive(path: Path) -> bool:
    """Whether a process whose metric files are in `path` lives (pids are in
    prometheus_client's file names, `counter_<pid>.db`): a directory made
    without `core.scratch`'s lock (a release before it) is swept once it is
    old only if none does, as a service of that release may still serve
    from it. A pid used again since keeps it, which is harmless."""
    for file in path.iterdir():
        found = _WORKER_FILE.search(file.name)
        if found is None:
            continue
        try:
            os.kill(int(found.group(1)), 0)
        except (ProcessLookupError, OverflowError):  # no such process (or pid)
            continue
        except PermissionError:  # another user's process: alive
            return True
        return True
    return False


_series: dict[tuple[str, str, int], Callable[[float], None]] = {}
"""`REQUEST_DURATION`'s series by (method, route, status), each found once:
`labels()` checks and converts its values and takes a lock on every call.
Bounded as the labels are: methods in `METHODS`, the app's route templates,
statuses."""


def observe_request(scope: Any, status: int, seconds: float) -> None:
    """The request-duration histogram's observation (an `api.access.Observer`),
    labelled with the route's template (`/jobs/{job_id}`), never the path:
    paths carry job and promise ids."""
    key = (scope["method"], scope.get("path_template") or UNMATCHED, status)
    observe = _series.get(key)
    if observe is None:
        method = key[0] if key[0] in METHODS else "other"
        # the route is set by the router on a match
        observe = REQUEST_DURATION.labels(method, key[1], str(status)).observe
        if method != "other":  # a method a client made up is not kept
            _series[key] = observe
    observe(seconds)


def install(app: Litestar, backends: Iterable[str]) -> None:
    """Once per app, after it is built: create the series of `backends` at 0
    (requests are timed by `observe_request`, which `api.app` hands the app's
    one request observer). (`metrics`, the route, goes on a router that
    checks the API token.)"""
    # `*_created` series: Prometheus's text format drops them anyway. (Unannotated upstream.)
    disable_created_metrics()  # type: ignore[no-untyped-call]
    prime(backends)


class Scrape:
    """Several collectors as one, for one scrape."""

    def __init__(self, *parts: Collector) -> None:
        self.parts = parts

    def collect(self) -> Iterator[Metric]:
        for part in self.parts:
            yield from part.collect()


@get("/metrics", include_in_schema=False, opt=READ)
async def metrics(
    request: Request[Any, Any, Any], tether: NamedDependency[Tether]
) -> Response[bytes]:
    """The Prometheus exposition (OpenMetrics when the scraper asks for it):
    the counters and histograms of every worker, added up, and the jobs in
    each state read from the store once. A read token may scrape it (`opt=READ`).
    503 when the store does not answer."""
    gauges = await store_call(job_gauges(tether.jobs, now_ms()))
    counted: Collector = REGISTRY
    if os.environ.get(MULTIPROC_ENV):
        counted = MultiProcessCollector(None)  # type: ignore[no-untyped-call]  # unannotated upstream
    encode, media_type = choose_encoder(request.headers.get("accept", ""))
    if media_type.startswith("text/"):  # Litestar adds the charset to text/* itself
        media_type = media_type.replace("; charset=utf-8", "")
    return Response(encode(Scrape(counted, JobsCollector(gauges))), media_type=media_type)
