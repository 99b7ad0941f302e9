"""Tether's domain records: jobs, outcomes and what a backend is handed.

Every record is a msgspec Struct, so the same type validates input, is stored,
and is what the API returns. Nothing here knows about HTTP or the durable store.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import math
import re
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs, quote, urlsplit

import msgspec

JobState = Literal["queued", "pending", "running", "succeeded", "failed", "canceled", "timed_out"]
"""`queued`: accepted, waiting for a slot under its backend's limit
(`TETHER_MAX_RUNNING`); `pending`: holding a slot, not yet triggered;
`running`: triggered, waiting for the external system; the other four are
final: the attempt that reached one never changes again (docs/lifecycle.md)."""

FINAL_STATES: frozenset[str] = frozenset({"succeeded", "failed", "canceled", "timed_out"})
"""An attempt in one of these has ended for good. Only `POST /jobs/{id}/retry`
takes a job out of one (`RETRYABLE_STATES`), as a new attempt: what the ended
attempt recorded stays in the job's history."""
OPEN_STATES: tuple[JobState, ...] = ("queued", "pending", "running")
RETRYABLE_STATES: tuple[JobState, ...] = ("failed", "timed_out", "canceled")
"""The final states a retry starts a new attempt from (not `succeeded`)."""

OutcomeStatus = Literal["succeeded", "failed", "canceled", "timed_out"]
WindingUp = Literal["stopping_run", "late_trigger_call"]
"""What an ended job still does before it may be retried (`Job.winding_up`)."""

JOB_ID_PATTERN = re.compile(r"^(?!\.+$)[A-Za-z0-9._-]{1,128}$")
JOB_ID_RULE = "1 to 128 characters from A-Z a-z 0-9 . _ -, not only dots"
"""Only dots is refused because URLs collapse `.` and `..`: such a job could
not be reached at `/jobs/{id}` by clients that normalise paths (ids from
before the rule are reached through `job_segment`)."""


def job_segment(job_id: str) -> str:
    """`job_id` as one path segment of a URL: percent-encoded, dots included
    when it is only dots (`.` and `..` are collapsed by URL normalisation)."""
    if job_id and not job_id.strip("."):
        return "%2E" * len(job_id)
    return quote(job_id, safe="")


TAG_PATTERN = re.compile(r"^[A-Za-z0-9._:/=-]{1,64}$")
TAG_RULE = "1 to 64 of A-Z a-z 0-9 . _ : / = -"
"""What a tag may be, as error messages say it."""
TAGS_MAX = 16
LIST_BACKENDS_MAX = 20
JSON_SPACE = b" \t\n\r"
"""The white space JSON allows around a value (RFC 8259): a body of only
these is empty; any other byte (`\x0b`, `\x0c`, which `bytes.strip` takes
too) makes it a body that is not JSON."""
HEARTBEAT_TIMEOUT_MIN = 1.0
"""The least `heartbeat_timeout` (seconds): each miss is a status check of
the backend, and a run beats over the network."""
"""Backends one job list may name (each state and backend is a read of its own)."""
Tag = Annotated[
    str,
    msgspec.Meta(
        extra_json_schema={"pattern": TAG_PATTERN.pattern, "minLength": 1, "maxLength": 64}
    ),
]
"""One tag. Its pattern is stated, not checked, here: `Tether.create_job`
checks it and says what a tag may be, where msgspec would quote the regex."""
Tags = Annotated[
    list[Tag],
    msgspec.Meta(
        max_length=TAGS_MAX,
        extra_json_schema={
            "uniqueItems": True,
            "description": "Labels to find the job by (`GET /jobs?tag=`): at most 16,"
            " each 1 to 64 of `A-Z a-z 0-9 . _ : / = -`, no two alike. Kept sorted.",
            "examples": [["team-a", "nightly"]],
        },
    ),
]
"""A job's tags as `POST /jobs` takes them; the service also refuses
duplicates (`uniqueItems`, which msgspec cannot check)."""

CANCEL_REASON_MAX = 1000
"""Characters a cancel's `reason` may have; it is kept in the job's error message."""


_AT = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_NAMED = re.compile(r"(?:missing required|unknown) field `(?P<name>[^`]+)`")


def field_of(message: str) -> str | None:
    """The field a msgspec validation message is about (`error.message` for
    "Object missing required field `message` - at `$.error`"), if it names one."""
    at = _AT.search(message)
    path = at["path"] if at else ""
    named = _NAMED.search(message)
    if named:
        path = f"{path}.{named['name']}" if path else named["name"]
    return path or None


def read_json(data: bytes | str, type: Any = Any) -> Any:
    """`data`'s JSON as `type` (msgspec's `decode`), each float where the
    type leaves it open (a result, params, progress) read by Python's
    `float`: msgspec's own reading of one near the ends of the double range
    (`1.7976931348623157e308`, 17 digits at `e-300`, as a p-value may be)
    took 0.3-1 s a MiB, where `float` takes 15-30 ms. An ordinary float
    costs more so: a MiB of nothing but floats takes 6-25 ms against 2-3,
    and each read of such a job's row pays it (a review, 2026-12-07).
    Bounded, where msgspec's was not; reading with msgspec's own unless a
    far exponent is in the text is left for later. A job's JSON is read again
    at every look at it (`GET /jobs`, a list page, the dashboard), so one
    such job cost each of them that much of its worker's event loop (a QA
    pass, 2026-12-07). A number out of range is refused as msgspec refuses
    it (`OUT_OF_RANGE`). A UTF-8 byte order mark before the JSON is
    skipped, as RFC 8259 lets a reader do: .NET and PowerShell write one,
    and a callback sent so was refused as "invalid character (byte 0)",
    its job then waiting for its timeout (a QA pass)."""
    if isinstance(data, bytes):
        data = data.removeprefix(b"\xef\xbb\xbf")
    elif isinstance(data, str):
        data = data.removeprefix("\ufeff")
    try:
        decoder = json_decoder(type)
    except TypeError:  # a type that cannot be a key (`Annotated[int, {...}]`)
        decoder = msgspec.json.Decoder(type, float_hook=_float)
    return decoder.decode(data)


@functools.lru_cache(maxsize=256)
def json_decoder(type: Any) -> msgspec.json.Decoder[Any]:
    """msgspec's decoder for `type`, its open floats read by `_float`
    (kept for the last 256 types: a plugin may make its own)."""
    return msgspec.json.Decoder(type, float_hook=_float)


def _float(literal: str) -> float:
    value = float(literal)
    if math.isinf(value):
        raise ValueError(OUT_OF_RANGE[0])
    return value


OUT_OF_RANGE = ("Number out of range", "Integer value out of range")
"""How msgspec's refusals of a number it cannot hold begin (`1e400`, an
integer of thousands of digits)."""

_STEP = re.compile(r"\.(?P<name>[^.\[`]+)|\[(?P<index>\.\.\.|\d+)\]")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class _Pairs(list[tuple[str, Any]]):
    """An object's members in the order sent, a key given twice kept twice."""


class _Far:
    """A number msgspec cannot hold, where the walk below finds it."""


def _number(literal: str) -> Any:
    try:
        return msgspec.json.decode(literal)
    except msgspec.DecodeError:
        return _Far()


def far_number_field(raw: bytes, message: str) -> str | None:
    """The field a refusal of a number out of range is about, with the keys
    msgspec writes `[...]` named (`params.a[1].b`, where it says
    `params[...][1][...]`): the first such number in `raw` at a place of
    that shape. None when `message` is not such a refusal, or the place
    cannot be found (found by an exploratory QA pass: a client could not tell
    which of its keys held the number)."""
    at = _AT.search(message)
    if not message.startswith(OUT_OF_RANGE) or at is None or "[...]" not in at["path"]:
        return None
    shape = [m["name"] or m["index"] for m in _STEP.finditer("." + at["path"])]
    try:
        body = json.loads(raw, parse_int=_number, parse_float=_number, object_pairs_hook=_Pairs)
    except (ValueError, RecursionError):
        return None
    found = _far_in(body, shape)
    if found is None:
        return None
    field = ""
    for step in found:
        if isinstance(step, int):
            field += f"[{step}]"
        elif _NAME.fullmatch(step):
            field += f".{step}" if field else step
        else:
            field += f"[{json.dumps(step)}]"
    return field


def _far_in(value: Any, shape: list[str]) -> list[str | int] | None:
    """The path of the first number msgspec cannot hold in `value` whose
    path fits `shape` (msgspec's steps: a field's name, `...` for any key,
    a list's index)."""
    if not shape:
        return [] if isinstance(value, _Far) else None
    step, rest = shape[0], shape[1:]
    if isinstance(value, _Pairs):
        for key, item in value:
            if step in ("...", key):
                found = _far_in(item, rest)
                if found is not None:
                    return [key, *found]
    elif isinstance(value, list) and step.isdigit() and int(step) < len(value):
        found = _far_in(value[int(step)], rest)
        if found is not None:
            return [int(step), *found]
    return None


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


class Running(msgspec.Struct, frozen=True, omit_defaults=True):
    """What `check_status` returns when the backend *confirms* the run is still
    going (`None` means it cannot tell). A missed heartbeat then only delays:
    the job waits on. `progress`: how far along the run is, if the backend
    knows (any JSON; shown in the job's history). `external`: fields of the
    job's `external` that changed since the trigger (e.g. the run's `state`),
    merged into it; the keys the trigger wrote stay unless named here."""

    progress: Any = None
    external: dict[str, Any] | None = None


class CheckNow(msgspec.Struct, frozen=True):
    """What `parse_callback` returns for a body that only *hints* that the run
    ended (e.g. a Databricks job notification): Tether then calls the backend's
    `check_status` at once and settles the job only on what that returns."""

    reason: str = ""


class Notice(msgspec.Struct, frozen=True):
    """A notification an external system posted to `POST
    /backends/{name}/notifications`, as its backend's `receive_notification`
    is handed it: the request's parts, without the web framework.

    It carries the caller's credentials (an `authorization` header, a
    `?token=`): never log it, never keep it. Its repr hides both."""

    headers: dict[str, str]
    """The request's headers, names lower-cased (a repeated header's values
    joined with `, `)."""
    query: dict[str, list[str]]
    """The URL's query parameters as sent, each with every value given."""
    body: Any
    """The body, decoded from JSON (None for an empty body)."""
    raw: bytes = b""
    """The body as sent, for a system that signs its bytes."""

    def __repr__(self) -> str:  # never the credentials
        return f"Notice(headers={sorted(self.headers)!r}, query={sorted(self.query)!r})"


class NoticeAbout(msgspec.Struct, frozen=True):
    """What a backend's `receive_notification` read in a `Notice`."""

    keys: list[str]
    """The external run keys the notification concerns (in `run_keys`'s
    terms): Tether looks each up among the runs its jobs started. May be
    empty (a test message about no run)."""
    kind: str = ""
    """What the notification says happened, in the external system's words
    (e.g. `jobs.on_success`): shown in the job's `notification` event."""


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
    heartbeat_timeout: float | None = None
    """Seconds the run may go without a heartbeat; None: it need send none."""
    heartbeat_at: datetime | None = None
    """When the run's last heartbeat came (`POST /callbacks/{promise_id}/heartbeat`)."""
    progress: Any = None
    """What the last heartbeat that carried progress said."""
    attempt: int = 1
    """Which run of the job this is: 1, then one more for each retry."""
    tags: list[str] = msgspec.field(default_factory=list)
    """The job's tags, sorted."""
    notify: NotifyShown | None = None
    """Where the job's completion notifications go: the URL's origin only."""
    deadline: datetime | None = None
    """When the job times out if it is still waiting: its attempt's start
    (accepted, or retried) plus `timeout`."""
    winding_up: WindingUp | None = None
    """An ended job whose external run is still to be stopped: `stopping_run`
    (its run, canceled or timed out, with no workflow left to stop it: a
    process holds the stop, and another takes it over if that one dies), or
    `late_trigger_call` (a call of its trigger, left to answer late, may
    still start a run, which is then stopped; up to 15 minutes from the
    call's start). A retry is refused (409) until it is done. None
    otherwise, and in completion notifications (the job as it ended). It
    changes with no `updated_at` of its own (the job's end is its last
    change): a job-list stream, which sends a job when that moves, does
    not send it; a job's history stream ends once it is null."""

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES


def attempt_began(job: dict[str, Any]) -> datetime:
    """When a job's attempt began, from the job as the API writes it: its
    creation, or for a later attempt the retry that began it (its `deadline`
    less its `timeout`). The dashboard's Duration and `tether watch`'s elapsed
    time count from it."""
    began = datetime.fromisoformat(job["created_at"])
    deadline, timeout = job.get("deadline"), job.get("timeout")
    if job.get("attempt", 1) > 1 and isinstance(deadline, str) and isinstance(timeout, int | float):
        began = datetime.fromisoformat(deadline) - timedelta(seconds=timeout)
    return began


class NotifyShown(msgspec.Struct, frozen=True):
    """A job's notification target as shown: the full URL is kept for
    delivery only (such URLs often carry a token in their path)."""

    origin: str
    """The URL's scheme, host and port: `https://hooks.example.com`."""


class JobPage(msgspec.Struct, frozen=True):
    """One page of `GET /jobs`; pass `next_cursor` back to get the next one."""

    items: list[Job]
    next_cursor: str | None


EventType = Literal[
    "accepted",
    "queued",
    "trigger_failed",
    "trigger_slow",
    "triggered",
    "heartbeat",
    "heartbeat_missed",
    "callback",
    "status_check",
    "notification",
    "cancel_requested",
    "cancel_failed",
    "timed_out",
    "retried",
    "finished",
    "notified",
    "notify_failed",
]
"""What a job's event says happened (docs/architecture.md, "Job history"); a
new kind of event is one more name here."""


class JobEvent(msgspec.Struct, frozen=True):
    """One entry of a job's history (`GET /jobs/{id}/events`)."""

    seq: int
    """1, 2, ... in the order things happened to the job, without gaps."""
    at: datetime
    """When it was recorded: never before the event before it (`seq - 1`)."""
    type: EventType
    attempt: int
    """The job's attempt the event belongs to (a trigger's retries are `data.try`)."""
    data: dict[str, Any]
    """What the type says more: never a secret, never a callback body."""


class EventPage(msgspec.Struct, frozen=True):
    """One page of a job's history, oldest first; pass `next_cursor` back for the next."""

    items: list[JobEvent]
    next_cursor: str | None
    dropped: int
    """Events no longer kept: past a bound, the middle of a long history goes."""


_PORT = r"(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})"
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_H16 = r"[0-9A-Fa-f]{1,4}"
_LS32 = rf"(?:{_H16}:{_H16}|{_OCTET}(?:\.{_OCTET}){{3}})"
_IPV6 = "|".join(  # RFC 3986's IPv6address, one line per form
    (
        rf"(?:{_H16}:){{6}}{_LS32}",
        rf"::(?:{_H16}:){{5}}{_LS32}",
        rf"(?:{_H16})?::(?:{_H16}:){{4}}{_LS32}",
        rf"(?:(?:{_H16}:){{0,1}}{_H16})?::(?:{_H16}:){{3}}{_LS32}",
        rf"(?:(?:{_H16}:){{0,2}}{_H16})?::(?:{_H16}:){{2}}{_LS32}",
        rf"(?:(?:{_H16}:){{0,3}}{_H16})?::{_H16}:{_LS32}",
        rf"(?:(?:{_H16}:){{0,4}}{_H16})?::{_LS32}",
        rf"(?:(?:{_H16}:){{0,5}}{_H16})?::{_H16}",
        rf"(?:(?:{_H16}:){{0,6}}{_H16})?::",
    )
)
_LABEL = r"[A-Za-z0-9_-]{1,63}"
HOST_RULE = (
    "the host is dot-separated labels of 1 to 63 of A-Z a-z 0-9 _ - (an internationalized"
    " name in its xn-- form; digits and dots alone only as an IPv4 address, four numbers of"
    " 0 to 255) or a bracketed IPv6 address, the port, if any, 1 to 65535"
)
_IPV4 = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
_NOT_ALL_DIGITS = r"(?![0-9.]+(?:[:/?#]|$))"
"""Digits and dots alone are an IPv4 address or nothing the client sends to
(`999.0.0.1`, `1.2.3`: aiohttp's InvalidUrlClientError)."""
SENDABLE_URL_START = (
    rf"^[Hh][Tt][Tt][Pp][Ss]?://(?:{_IPV4}|{_NOT_ALL_DIGITS}{_LABEL}(?:\.{_LABEL})*\.?"
    rf"|\[(?:{_IPV6})\])(?::{_PORT})?"
)
"""How a URL Tether sends requests to begins, as a new job's may be: the
scheme (any case), a host the HTTP client reads (`HOST_RULE`) and a port of 1
to 65535, without `user:password@`. Stated in the schema as a pattern; jobs
stored before keep theirs."""
SENDABLE_URL_SCHEMA = SENDABLE_URL_START + r"(?:[/?#]|$)"
"""`SENDABLE_URL_START`, then the path, query or fragment, or the end: the
schema's pattern (ECMAScript's, whose `$` is the string's end only)."""
_UNSENT = (
    r"\x00-\x20\x7f-\xa0\u1680\u180e\u2000-\u200f\u2028-\u202f\u205f-\u206f"
    r"\u3000\ufeff"
)
"""What no URL Tether sends to may hold: a space (Unicode's too), a control
character (C1 too: U+0085, U+009B), an invisible format character (a
bidirectional override). In a character class, written alike for
ECMAScript's and Python's expressions; a review found U+0085, U+00A0 and
U+2028 taken, 2026-12-07."""
HTTP_URL_SCHEMA = SENDABLE_URL_START + rf"(?:[/?#][^{_UNSENT}]*)?$"
"""An http(s) URL a notification or a webhook is sent to:
`SENDABLE_URL_START`, then no space, control or format character (`_UNSENT`;
the schema's pattern)."""
SENDABLE_URL = re.compile(SENDABLE_URL_SCHEMA.replace("$", r"\Z"))
"""`SENDABLE_URL_SCHEMA` for Python, whose `$` also matches before a last
newline (`\\Z` does not): before, `http://host\\n` was taken."""
HTTP_URL = re.compile(HTTP_URL_SCHEMA.replace("$", r"\Z"))
"""`HTTP_URL_SCHEMA` for Python."""


def url_fault(url: str, whole: re.Pattern[str] = HTTP_URL) -> str:
    """What keeps `url` from matching `whole` (a pattern that begins with
    `SENDABLE_URL_START`), in words that do not quote it (it may carry a
    credential); "" when nothing does."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        return "is not an http or https URL"
    if "@" in re.split(r"[/?#]", rest, maxsplit=1)[0]:
        return "carries user:password@"
    if not SENDABLE_URL.match(url):
        return f"names no host and port a request can be sent to ({HOST_RULE})"
    if not whole.match(url):
        return "holds a space or a control character"
    return ""


class Notify(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where to tell of the job's end (`POST /jobs`'s `notify`)."""

    url: Annotated[
        str,
        msgspec.Meta(  # the pattern is checked by `Tether.create_job`, saying what it means
            max_length=2048, extra_json_schema={"format": "uri", "pattern": HTTP_URL_SCHEMA}
        ),
    ]
    """An http or https URL without `user:password@`; Tether POSTs a signed
    `job.finished` message to it each time an attempt of the job ends. Kept
    for delivery only: the job shows its origin."""


class JobRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Body of `POST /jobs`."""

    backend: str
    """An installed backend's name (`GET /health` lists them)."""
    params: dict[str, Any] = msgspec.field(default_factory=dict)
    """The backend's parameters; its plugin checks them (`params_type`)."""
    id: str | None = None
    """The job's id, 1 to 128 of `A-Z a-z 0-9 . _ -`; a new unique one when absent.
    Sending the same id and request again reattaches to the job."""
    timeout: float | None = None
    """Seconds the job may wait for its outcome; the service's default when absent."""
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    """Anything the caller wants kept with the job; Tether does not read it."""
    heartbeat_timeout: Annotated[float, msgspec.Meta(ge=HEARTBEAT_TIMEOUT_MIN)] | None = None
    """Seconds (at least 1) the run may go without a heartbeat (one past the job's
    `timeout` never passes before the deadline); None: it need send none. When
    it passes, Tether asks the backend."""
    tags: Tags = msgspec.field(default_factory=list)
    """Labels to find the job by (`GET /jobs?tag=`); their order does not matter."""
    notify: Notify | None = None
    """Where to POST a signed `job.finished` message when the job ends."""


MAX_ATTEMPT = 2**31 - 1
"""The largest attempt a retry may name: the store keeps attempts in a
32-bit `int` (Postgres), and a larger one was quoted whole (a `1e300`, 301
digits) in the 409 that refused it (a QA pass)."""
WholeNumber = Annotated[
    float, msgspec.Meta(ge=1, le=MAX_ATTEMPT, extra_json_schema={"multipleOf": 1})
]
"""A whole number written with a fraction (`2.0`): JSON Schema counts it an
integer, msgspec's `int` does not, so an attempt takes it too."""


class RetryRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Body of `POST /jobs/{id}/retry`; the body itself is optional."""

    attempt: Annotated[int, msgspec.Meta(ge=1, le=MAX_ATTEMPT)] | WholeNumber | None = None
    """The attempt that should exist afterwards. Already there: nothing new
    starts (a repeated request is safe); the next one: it starts; else 409.
    Absent: the next attempt, whatever the current one is."""


class CancelRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Body of `POST /jobs/{id}/cancel`; the body itself is optional."""

    reason: Annotated[str, msgspec.Meta(max_length=CANCEL_REASON_MAX)] | None = None
    """Why the job is canceled; kept in the job's `error.message`."""


PROGRESS_LIMIT = 16 * 1024
"""Bytes a heartbeat's `progress` may take, as JSON."""


class HeartbeatBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Body of `POST /callbacks/{promise_id}/heartbeat`; the body itself is optional."""

    progress: Any = None
    """How far along the run is: any JSON of at most 16 KiB; shown as the job's
    `progress`. Absent or null: the job keeps the progress it has."""


class CallbackError(ErrorInfo, frozen=True, forbid_unknown_fields=True):
    """A callback's `error`, read as strictly as the body around it: a key
    other than `message` and `type` is refused, naming it. It was dropped
    (`{"message": "disk full", "code": "E1"}` accepted, the code lost) where
    an unknown key beside `status` was refused (found by a QA pass)."""


class CallbackBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Tether's uniform callback body (`POST /callbacks/{promise_id}`). `status`
    is required: a body without it settles nothing (a stray POST to the URL
    must not end the job)."""

    status: Literal["succeeded", "failed"]
    result: Any = None
    error: CallbackError | None = None

    def outcome(self) -> Outcome:
        error = None if self.error is None else ErrorInfo(self.error.message, self.error.type)
        if self.status == "failed" and error is None:
            error = ErrorInfo(message="the external job reported a failure")
        return Outcome(status=self.status, result=self.result, error=error)


def token_of(callback_url: str) -> str:
    """The `token` a callback URL carries ("" if none)."""
    return parse_qs(urlsplit(callback_url).query).get("token", [""])[0]


def job_mark(job_id: str, created_at: datetime) -> str:
    """A short mark of a job, not secret: the same for each of its attempts,
    and another for any other job, here or in another Tether deployment,
    even one under the same id (the job's creation time, to the
    millisecond, tells them apart). A backend that finds what it started by
    looking through the external system's lists writes it where a run can
    carry it (a tag, a name: `Trigger.mark`) and takes as its own only what
    carries it: two deployments sharing a workspace may both have a job
    `nightly-2026-12-05`."""
    created = round(created_at.timestamp() * 1000)
    return hashlib.sha256(f"tether-mark:{job_id}@{created}".encode()).hexdigest()[:16]


class Trigger(msgspec.Struct, frozen=True):
    """What a backend's `trigger` is handed.

    - `job`: the job as stored (its `params` are the raw JSON the client sent);
    - `params`: the same params converted to the backend's `params_type`;
    - `promise_id`: the durable promise the job waits on;
    - `callback_url`: the URL that settles it (it carries a secret token: hand it
      to the external system, never log it);
    - `idempotency_key`: derived from the promise id, at most 64 characters;
      pass it to the external system wherever it supports one, so a retried
      trigger never starts a second run;
    - `replayed`: for a backend that sets `asks_if_replayed` (else always
      False), whether an earlier run of this attempt's trigger may have made
      a try that nothing recorded: the process died or stalled inside it (a
      replay after a restart, or a run beside it after a lease ran out).
      Told by the mark each run writes in the job's row, not by clocks;
      a call made again in one run after one that got to its tries (and
      raised) is told it is a replay too. Tries made earlier in this call
      are the backend's own to count;
    - `retried`: for `cancel_unrecorded` only (else always False), the job
      was retried since this attempt ended (a process that stalled inside
      the attempt's trigger stops what its tries may have started): a run
      of the job that does not name this attempt may be a later attempt's,
      so only runs that do are to be stopped. `job.external` is then what
      the attempt recorded, if anything (another process triggered it): a
      later attempt may have taken that run up again (a repair in place);
    - `tokens`: every token this attempt's callback URL may carry (the
      callback secret's, then each previous secret's during a rotation);
      secrets like the URL. A callback URL read back from an external run
      with none of them was handed out by another Tether deployment (its
      own secret), even for a job under the same id (`signed_here`). Empty
      when not known: then any is taken for this deployment's.
    """

    job: Job
    params: Any
    promise_id: str
    callback_url: str
    idempotency_key: str
    replayed: bool = False
    retried: bool = False
    tokens: tuple[str, ...] = ()

    @property
    def mark(self) -> str:
        """The job's mark (`job_mark`)."""
        return job_mark(self.job.id, self.job.created_at)

    @property
    def callback_token(self) -> str:
        """The token `callback_url` carries: a secret, to scrub from what an
        external system answers."""
        return token_of(self.callback_url)

    def signed_here(self, callback_url: str) -> bool:
        """Whether a callback URL read back from an external run (its
        parameters, say) is this attempt's as this deployment handed it out:
        its token is one of `tokens` (any, when those are not known)."""
        if not self.tokens:
            return True
        token = token_of(callback_url).encode()
        return any(hmac.compare_digest(token, t.encode()) for t in self.tokens)

    @property
    def heartbeat_url(self) -> str:
        """Where the run reports it is alive (and how far along it is): the
        callback URL's path and `/heartbeat`, with the same token. A secret
        like the callback URL."""
        path, sep, query = self.callback_url.partition("?")
        return f"{path}/heartbeat{sep}{query}"

    def __repr__(self) -> str:
        url = self.callback_url.split("?", 1)[0] + "?token=***"  # never the token
        return f"Trigger(job={self.job.id!r}, promise_id={self.promise_id!r}, callback_url={url!r})"
