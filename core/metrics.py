"""The jobs' Prometheus metrics.

Counters and a histogram follow the job history: `on_event` is a listener of
the event recorder, called once for each event it records, in the process that
recorded it. Under `tether serve --workers N` each worker counts in files of
its own (prometheus_client's multiprocess mode) and a scrape adds them up.

What the job index holds (jobs in each state, the oldest waiting job, jobs past
their deadline) is read from the store at scrape time instead (`job_gauges`),
once per scrape: every worker sees the same index, so these are never added
up across workers, and a restart loses nothing.

Labels take only values from a small, known set (backend names, states,
verdicts): never a job id, a promise id or anything a caller chose freely.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol, get_args

import msgspec
from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from core.models import FINAL_STATES, OPEN_STATES, JobState
from core.store.jobs import JobIndex, JobRecord
from core.store.sql import SqlJobIndex

JOBS_CREATED = Counter("tether_jobs_created_total", "Jobs accepted.", ["backend"])
JOBS_FINISHED = Counter(
    "tether_jobs_finished_total", "Jobs that ended, by final state.", ["backend", "state"]
)
CALLBACKS = Counter(
    "tether_callbacks_total",
    "Callbacks taken, by verdict (accepted, duplicate, conflict, gone, noted, invalid).",
    ["verdict"],
)
TRIGGER_ATTEMPTS = Counter(
    "tether_trigger_attempts_total",
    "Tries to trigger a job on its backend: ok, or failed (retried or not).",
    ["backend", "result"],
)
TRIGGERS_SLOW = Counter(
    "tether_triggers_slow_total",
    "Trigger calls that had not answered after TRIGGER_SLOW (30 s): each a trigger_slow event.",
    ["backend"],
)
NOTIFICATIONS = Counter(
    "tether_notifications_total",
    "Tries to deliver a completion notification: ok (a 2xx answer), or failed.",
    ["backend", "result"],
)
NOTIFICATIONS_FAILED = Counter(
    "tether_notifications_failed_total",
    "Completion notifications given up: their retry window (TETHER_NOTIFY_RETRY_FOR) ran out.",
    ["backend"],
)
CANCELS_FAILED = Counter(
    "tether_run_cancels_failed_total",
    "External runs the backend could not be made to stop (each a cancel_failed event):"
    " they may still be going.",
    ["backend"],
)
JOB_DURATION = Histogram(
    "tether_job_duration_seconds",
    "Seconds from a job's creation to its end.",
    ["backend", "state"],
    # jobs last from seconds to the 7-day default timeout
    buckets=(1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 86400, 3 * 86400, 7 * 86400),
)

VERDICTS = ("accepted", "duplicate", "conflict", "gone", "noted", "invalid")


class EventLike(Protocol):
    """What `on_event` reads of a recorded event (`core.events.Event`)."""

    @property
    def type(self) -> str: ...

    @property
    def data(self) -> Mapping[str, Any]: ...


_series: dict[tuple[Any, ...], Any] = {}
"""Each metric's series by its label values, found once (`labels()` checks
and converts the values and takes a lock on every call). Bounded as the
labels are (module docstring)."""


def series(metric: Any, *labels: str) -> Any:
    """`metric.labels(*labels)`, from `_series` after the first time."""
    key = (metric, *labels)
    found = _series.get(key)
    if found is None:
        found = _series[key] = metric.labels(*labels)
    return found


def on_event(job: JobRecord, event: EventLike) -> None:
    """Count one recorded event; `job` is the job's record as the event left
    it. Cheap (no I/O but prometheus_client's own) and never raises on an
    event it does not count."""
    match event.type:
        case "accepted":
            series(JOBS_CREATED, job.backend).inc()
        case "triggered":
            series(TRIGGER_ATTEMPTS, job.backend, "ok").inc()
        case "trigger_failed":
            if event.data.get("counted", True):  # (not a wait that sent nothing)
                series(TRIGGER_ATTEMPTS, job.backend, "failed").inc()
        case "trigger_slow":
            series(TRIGGERS_SLOW, job.backend).inc()
        case "callback":
            series(CALLBACKS, str(event.data.get("verdict", "unknown"))).inc()
        case "notified":
            series(NOTIFICATIONS, job.backend, "failed" if "error" in event.data else "ok").inc()
        case "notify_failed":
            series(NOTIFICATIONS_FAILED, job.backend).inc()
        case "cancel_failed":
            series(CANCELS_FAILED, job.backend).inc()
        case "finished":
            series(JOBS_FINISHED, job.backend, job.state).inc()
            if job.finished_at is not None:
                seconds = max(job.finished_at - job.created_at, 0) / 1000
                series(JOB_DURATION, job.backend, job.state).observe(seconds)


def prime(backends: Iterable[str]) -> None:
    """Create every series of these backends at 0, so that a series exists
    before its first event: `rate()` and `increase()` then count that first
    event too, and a dashboard shows 0 rather than nothing."""
    for verdict in VERDICTS:
        CALLBACKS.labels(verdict)
    for backend in backends:
        JOBS_CREATED.labels(backend)
        for result in ("ok", "failed"):
            TRIGGER_ATTEMPTS.labels(backend, result)
            NOTIFICATIONS.labels(backend, result)
        TRIGGERS_SLOW.labels(backend)
        NOTIFICATIONS_FAILED.labels(backend)
        CANCELS_FAILED.labels(backend)
        for state in sorted(FINAL_STATES):
            JOBS_FINISHED.labels(backend, state)


class JobGauges(msgspec.Struct, frozen=True):
    """What the job index holds at one moment."""

    counts: dict[str, int]
    """Jobs in each state (every known state, 0 included)."""
    oldest: dict[str, int]
    """The creation time (Unix ms) of the oldest job in each waiting state that has one."""
    entered: dict[str, int]
    """When (Unix ms) the job longest in each waiting state entered it (its
    row's `updated_at`, which only a change of state or the run's record
    sets), among the first `ENTERED_SCAN` of the state by creation."""
    overdue: int
    """Waiting jobs past their deadline: the watchdog times these out within
    seconds, so a number that stays above 0 means no worker sweeps."""
    notes_due: int = 0
    """Completion notifications due and not being tried (the outbox's)."""
    notes_oldest_due: int | None = None
    """When (Unix ms) the one longest due became due; None when none is."""


ENTERED_SCAN = 1000
"""Jobs of a state `job_gauges` reads for when the one longest in it
entered it: exact below that many, else among the oldest by creation (a
job retried or out of its queue since is among them, as is one that
entered the state long ago), at a bounded cost with a million waiting."""


async def longest_waiting(index: JobIndex, limit: int) -> list[dict[str, Any]]:
    """The `limit` waiting jobs made first (the least `seq`), oldest first:
    their id, state, backend and `created_at` (Unix ms) alone, found on the
    index of states. (The dashboard's summary read up to 1,000 waiting jobs
    whole to name five, params and all: 1.9 s of the worker with 40 jobs of
    a megabyte each, a QA pass, 2026-12-07.)"""
    if not isinstance(index, SqlJobIndex):  # the one implementation there is
        raise TypeError(f"no waiting jobs of a {type(index).__name__}")
    rows: list[tuple[Any, ...]] = []
    for state in OPEN_STATES:
        rows += await index.db.fetch(
            "SELECT seq, id, state, backend, created_at FROM tether_jobs"
            " WHERE state = ? ORDER BY seq LIMIT ?",
            (state, limit),
        )
    found: dict[str, dict[str, Any]] = {}  # (a job that moved on between two reads: once)
    for _, id, state, backend, made in sorted(rows):
        found.setdefault(
            id, {"id": id, "state": state, "backend": backend, "created_at": int(made)}
        )
    return list(found.values())[:limit]


async def job_gauges(index: JobIndex, now: int) -> JobGauges:
    """Read the gauges from the job index: the counts per state
    (`SqlJobIndex.state_counts`), a query for each waiting state (on the
    index of states), one for the overdue (on the deadlines')."""
    if not isinstance(index, SqlJobIndex):  # the one implementation there is
        raise TypeError(f"no gauges for a {type(index).__name__}")
    db = index.db
    counts = dict.fromkeys(get_args(JobState), 0) | await index.state_counts()
    oldest: dict[str, int] = {}
    entered: dict[str, int] = {}
    for state in OPEN_STATES:
        [(created, since)] = await db.fetch(
            "SELECT min(created_at), min(updated_at) FROM (SELECT created_at, updated_at"
            " FROM tether_jobs WHERE state = ? ORDER BY seq LIMIT ?) AS first",
            (state, ENTERED_SCAN),
        )
        if created is not None:
            oldest[state], entered[state] = int(created), int(since)
    late = await db.fetch(
        "SELECT count(*) FROM tether_jobs WHERE finished_at IS NULL AND deadline <= ?", (now,)
    )
    # A try in flight holds its notification's `due_at` at its claim's end:
    # counted only once it is due again. (A hung receiver's backlog grew for a
    # day with nothing to show it: found by a QA pass.)
    [(due, first)] = await db.fetch(
        "SELECT count(*), min(due_at) FROM tether_notifications WHERE due_at <= ?", (now,)
    )
    return JobGauges(
        counts, oldest, entered, int(late[0][0]), int(due), None if first is None else int(first)
    )


class JobsCollector:
    """`gauges` as metric families, for one scrape's registry."""

    def __init__(self, gauges: JobGauges) -> None:
        self.gauges = gauges

    def collect(self) -> Iterable[Metric]:
        jobs = GaugeMetricFamily(
            "tether_jobs", "Jobs in each state, read from the job index.", labels=["state"]
        )
        for state, count in sorted(self.gauges.counts.items()):
            jobs.add_metric([state], count)
        oldest = GaugeMetricFamily(
            "tether_jobs_oldest_created_timestamp_seconds",
            "When the oldest job in each waiting state was created (Unix seconds);"
            " absent when the state has no job.",
            labels=["state"],
        )
        for state, at in sorted(self.gauges.oldest.items()):
            oldest.add_metric([state], at / 1000)
        entered = GaugeMetricFamily(
            "tether_jobs_oldest_entered_timestamp_seconds",
            "When the job longest in each waiting state entered it (Unix seconds): a"
            " job's time in the queue or before a retry not counted; absent when the"
            " state has no job.",
            labels=["state"],
        )
        for state, at in sorted(self.gauges.entered.items()):
            entered.add_metric([state], at / 1000)
        overdue = GaugeMetricFamily(
            "tether_jobs_overdue",
            "Waiting jobs past their deadline, not yet timed out by the watchdog.",
            value=self.gauges.overdue,
        )
        notes_due = GaugeMetricFamily(
            "tether_notifications_due",
            "Completion notifications due and not being tried: a backlog that grows"
            " means receivers are slow or hang.",
            value=self.gauges.notes_due,
        )
        families = [jobs, oldest, entered, overdue, notes_due]
        if self.gauges.notes_oldest_due is not None:
            families.append(
                GaugeMetricFamily(
                    "tether_notifications_oldest_due_timestamp_seconds",
                    "When the notification longest due became due (Unix seconds);"
                    " absent when none is.",
                    value=self.gauges.notes_oldest_due / 1000,
                )
            )
        return families
