"""How stored jobs are shown to clients: the `Job` and `JobEvent` views and
the list cursor."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import msgspec

from core.errors import MalformedBody
from core.models import Job, JobEvent, NotifyShown, WindingUp
from core.store.jobs import Event, JobRecord

SUB_MICROSECONDS = re.compile(r"(?<=[.,][0-9]{6})[0-9]+")
"""The digits of a date-time's fraction past the sixth."""
MAX_MOMENT = datetime.max - timedelta(days=1)
"""Past it a microsecond more may not fit (an offset's day aside)."""


def read_time(value: str, *, up: bool = False) -> datetime:
    """A date-time a client gives (a list's `created_after`, `created_before`),
    read as msgspec reads one (RFC 3339, the ISO 8601 profile the OpenAPI
    document's `date-time` names), but a fraction past microseconds cut
    (msgspec rounds it, which may cross into the next second): to the
    microsecond before, or with `up` the one after, so that an exclusive
    upper bound leaves out nothing before it. `msgspec.ValidationError` for
    what is no date-time."""
    finer = SUB_MICROSECONDS.search(value)
    if finer is not None:
        value = value[: finer.start()] + value[finer.end() :]
    at = msgspec.convert(value, datetime)
    if up and finer is not None and finer[0].strip("0") and at.replace(tzinfo=None) < MAX_MOMENT:
        at += timedelta(microseconds=1)
    return at


def _dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def view(rec: JobRecord) -> Job:
    """The job as clients see it (the API, the CLI, the dashboard, completion
    notifications, `tether_job_finished`): its params `shown`."""
    return _job(rec, shown(rec.params))


def backend_view(rec: JobRecord) -> Job:
    """The job as its backend sees it (a trigger, cancel, status check or
    callback): its params as stored, which its requests may need."""
    return _job(rec, rec.params)


USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@")


def shown(params: Any) -> Any:
    """`params` with the `user:password@` of each URL among its values masked
    (`http://***@host/…`). A new job carries none (`Backend.check_new_params`
    refuses them); a job stored before that rule keeps its own for its
    backend's requests, and clients never see it."""
    if not isinstance(params, dict) or not any(
        isinstance(v, str) and "@" in v for v in params.values()
    ):
        return params
    return {k: USERINFO.sub(r"\1***@", v) if isinstance(v, str) else v for k, v in params.items()}


def _job(rec: JobRecord, params: Any) -> Job:
    return Job(
        id=rec.id,
        backend=rec.backend,
        state=rec.state,
        params=params,
        metadata=rec.metadata,
        timeout=float(rec.timeout),  # one type, however the row was read
        external=rec.external,
        result=rec.result,
        error=rec.error,
        created_at=_dt(rec.created_at),
        updated_at=_dt(rec.updated_at),
        finished_at=None if rec.finished_at is None else _dt(rec.finished_at),
        heartbeat_timeout=None if rec.heartbeat_timeout is None else float(rec.heartbeat_timeout),
        heartbeat_at=None if rec.heartbeat_at is None else _dt(rec.heartbeat_at),
        progress=rec.progress,
        attempt=rec.attempt,
        tags=rec.tags,
        notify=None if rec.notify_url is None else NotifyShown(origin(rec.notify_url)),
        deadline=_dt(rec.deadline),
        winding_up=winding_up(rec),
    )


def winding_up(rec: JobRecord) -> WindingUp | None:
    """What an ended job's row says is still to be done before a retry: a
    stop held (`stop_due`) of a run recorded, or of what a late trigger call
    may start (no run recorded: `core.steps.JobSteps._hold_stop`). Not of
    an open attempt a host of an earlier release started meanwhile (the stop
    is then an earlier attempt's, `stop_attempt`)."""
    if rec.stop_due is None or not rec.finished or rec.stop_attempt not in (None, rec.attempt):
        return None
    return "late_trigger_call" if rec.external is None else "stopping_run"


def origin(url: str) -> str:
    """A URL's scheme, host and port: all of it that is ever shown or logged
    (the rest may carry a token)."""
    try:
        parts = urlsplit(url)
    except ValueError:  # a host it cannot read (a row written before that was refused)
        return f"{url.partition(':')[0].lower()}://(unreadable host)"
    return f"{parts.scheme.lower()}://{parts.netloc.rpartition('@')[2].lower()}"


def finished_message(rec: JobRecord) -> str:
    """The body of the completion notification for the attempt `rec` ended."""
    job = msgspec.structs.replace(view(rec), winding_up=None)  # as it ended, whatever follows
    return msgspec.json.encode({"type": "job.finished", "job": job}).decode()


def event_view(event: Event) -> JobEvent:
    """An event as clients see it: its time as the job's times are shown."""
    return JobEvent(
        seq=event.seq,
        at=_dt(event.at),
        type=event.type,
        attempt=event.attempt,
        data=event.data,
    )


CURSOR_PATTERN = "^[0-9a-f]{16}$"
"""Every cursor Tether makes, and every string of this form, names a place in
the list: the OpenAPI document states it, so a cursor is either malformed (400)
or good."""
MAX_SEQ = (1 << 63) - 1


def encode_cursor(seq: int) -> str:
    """The opaque `next_cursor` for a page that ends at row `seq`."""
    return f"{seq:016x}"


def decode_cursor(cursor: str) -> int:
    """The row a cursor names (the list goes on past it: older jobs, later
    events); `MalformedBody` when it does not have `CURSOR_PATTERN`'s form.
    Past the largest row number it names the start of the job list."""
    if len(cursor) != 16 or cursor.strip("0123456789abcdef"):
        raise MalformedBody(
            "invalid cursor: pass back a next_cursor unchanged", {"field": "cursor"}
        )
    return min(int(cursor, 16), MAX_SEQ)


def duration(seconds: float) -> str:
    """`seconds` as people say it: "366 days", "12 hours", "90 seconds"."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        count = seconds / size
        if count >= 1 and count == int(count):
            return f"{int(count)} {unit}{'s' if count != 1 else ''}"
    return f"{seconds:g} second{'s' if seconds != 1 else ''}"
