"""Tether's domain records: jobs, outcomes and what a backend is handed.

Every record is a msgspec Struct, so the same type validates input, is stored,
and is what the API returns. Nothing here knows about HTTP or the durable store.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Literal

import msgspec

JobState = Literal["pending", "running", "succeeded", "failed", "canceled", "timed_out"]
"""`pending`: accepted, not yet triggered; `running`: triggered, waiting for the
external system; the other four are final and never change again."""

FINAL_STATES: frozenset[str] = frozenset({"succeeded", "failed", "canceled", "timed_out"})
OPEN_STATES: tuple[JobState, ...] = ("pending", "running")

OutcomeStatus = Literal["succeeded", "failed", "canceled", "timed_out"]

JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
JOB_ID_RULE = "1 to 128 characters from A-Z a-z 0-9 . _ -"


class ErrorInfo(msgspec.Struct, frozen=True, omit_defaults=True):
    """Why a job failed: a message for people, an optional type for programs."""

    message: str
    type: str | None = None


class Outcome(msgspec.Struct, frozen=True, omit_defaults=True):
    """How a job ended. Built by Tether (never taken verbatim from a caller) and
    stored as the resolved value of the job's callback promise."""

    status: OutcomeStatus
    result: Any = None
    error: ErrorInfo | None = None

    def same_as(self, other: Outcome) -> bool:
        """True when `other` reports the same ending (used to tell a duplicate
        callback from a conflicting one)."""
        return (self.status, self.result, self.error) == (other.status, other.result, other.error)


class CheckNow(msgspec.Struct, frozen=True):
    """What `parse_callback` returns for a body that only *hints* that the run
    ended (e.g. a Databricks job notification): Tether then calls the backend's
    `check_status` at once and settles the job only on what that returns."""

    reason: str = ""


class Job(msgspec.Struct, frozen=True):
    """A job as clients see it (`GET /jobs/{id}`)."""

    id: str
    backend: str
    state: JobState
    params: dict[str, Any]
    metadata: dict[str, Any]
    timeout: float
    external: dict[str, Any] | None
    result: Any
    error: ErrorInfo | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES


class JobPage(msgspec.Struct, frozen=True):
    """One page of `GET /jobs`; pass `next_cursor` back to get the next one."""

    items: list[Job]
    next_cursor: str | None


class JobRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Body of `POST /jobs`."""

    backend: str
    params: dict[str, Any] = msgspec.field(default_factory=dict)
    id: str | None = None
    timeout: float | None = None
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)


class CallbackBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Tether's uniform callback body (`POST /callbacks/{promise_id}`)."""

    status: Literal["succeeded", "failed"] = "succeeded"
    result: Any = None
    error: ErrorInfo | None = None

    def outcome(self) -> Outcome:
        error = self.error
        if self.status == "failed" and error is None:
            error = ErrorInfo(message="the external job reported a failure")
        return Outcome(status=self.status, result=self.result, error=error)


class Trigger(msgspec.Struct, frozen=True):
    """What a backend's `trigger` is handed.

    - `job`: the job as stored (its `params` are the raw JSON the client sent);
    - `params`: the same params converted to the backend's `params_type`;
    - `promise_id`: the durable promise the job waits on;
    - `callback_url`: the URL that settles it (it carries a secret token: hand it
      to the external system, never log it);
    - `idempotency_key`: derived from the promise id, at most 64 characters;
      pass it to the external system wherever it supports one, so a retried
      trigger never starts a second run.
    """

    job: Job
    params: Any
    promise_id: str
    callback_url: str
    idempotency_key: str

    def __repr__(self) -> str:
        url = self.callback_url.split("?", 1)[0] + "?token=***"  # never the token
        return f"Trigger(job={self.job.id!r}, promise_id={self.promise_id!r}, callback_url={url!r})"
