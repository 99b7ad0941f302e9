"""Callbacks: what the external system reports at `POST /callbacks/{promise_id}`.

The token is checked first (a wrong token and an unknown promise look alike),
then the body is read: the backend's native shape if its `parse_callback`
claims it, else Tether's uniform body, whose `status` is required. A reported
outcome settles the job (`core.settle`); a `CheckNow` hint makes Tether ask the
backend at once and settle on its answer alone.

Every callback with the right token is a `callback` event in the job's history
(its verdict, the body's size and SHA-256, never the body or the token); one
with a wrong token is not recorded on any job.

A heartbeat (`POST /callbacks/{promise_id}/heartbeat`, the same token) says the
run is alive, and may say how far along it is: it moves the job's
`heartbeat_at`, `progress` and next heartbeat due, every time. It is a
`heartbeat` event only when its progress differs from the last one recorded,
at most once every `HEARTBEAT_EVENT_EVERY` seconds per job, so a run beating
every second never pushes how the job started out of its bounded history.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec

from core import workflow
from core.aside import aside, json_bytes
from core.bounds import MAX_DEPTH, bound_learnt, deeper_than
from core.errors import InvalidRequest, MalformedBody, NotFound, Unauthorized, escaped
from core.events import body_digest
from core.metrics import CALLBACKS, series
from core.models import (
    JSON_SPACE,
    PROGRESS_LIMIT,
    CallbackBody,
    CheckNow,
    HeartbeatBody,
    Job,
    JobState,
    Outcome,
    Running,
    far_number_field,
    field_of,
    read_json,
)
from core.plugins import PLUGIN_FAULTS, Plugins, cancelling, contract_answer
from core.redact import redact_value
from core.settle import Settler, SettleResult, store_call
from core.store.jobs import JobIndex, JobRecord, NewEvent, now_ms
from core.tokens import CallbackSigner
from core.views import backend_view, view

log = logging.getLogger("tether")

CallbackOutcome = Literal[SettleResult, "noted"]

CHECK_NOW_TIMEOUT = 30.0
"""Seconds a backend may take to answer the status check a hint asks for."""

HEARTBEAT_EVENT_EVERY = 60.0
"""Seconds between a job's `heartbeat` events, at least: heartbeats in between
change the job, not its history."""

REPEAT_EVENT_EVERY = 60.0
"""Seconds between a job's `callback` events of one verdict that changed
nothing (`duplicate`, `conflict`, `gone`, `invalid`) for one attempt's URL,
at least, in each process (`Repeats`)."""
REPEATS_KEPT = 10_000
"""(job, attempt, verdict) keys `Repeats` remembers, the least recent let go."""


class Repeats:
    """Which callbacks that changed nothing are recorded: the first of each
    job, attempt and verdict (an invalid body's with its why), then one
    every `REPEAT_EVENT_EVERY` seconds, with how many were left out since
    (`repeats`; each is counted in `tether_callbacks_total` all the same).
    An external system posting an old or finished job's URL in a loop pushed
    everything but the job's first events out of its bounded history, a store
    write each (found by a security QA pass). In memory, per process: each
    worker records its own."""

    def __init__(self) -> None:
        self._seen: OrderedDict[tuple[str, int, str], tuple[float, int]] = OrderedDict()

    def admit(self, job_id: str, attempt: int, verdict: str) -> int | None:
        """None: leave this one out; else record it, saying how many were
        left out before it."""
        key, now = (job_id, attempt, verdict), time.monotonic()
        last = self._seen.get(key)
        if last is not None and now - last[0] < REPEAT_EVENT_EVERY:
            self._seen[key] = (last[0], last[1] + 1)
            self._seen.move_to_end(key)  # kept while it repeats
            return None
        self._seen[key] = (now, 0)
        self._seen.move_to_end(key)
        if len(self._seen) > REPEATS_KEPT:
            self._seen.popitem(last=False)
        return 0 if last is None else last[1]

    def unrecorded(self, job_id: str, attempt: int, verdict: str, left_out: int) -> None:
        """A recorded one's write failed: the next one is recorded, counting
        this one and those before it as left out."""
        self._seen[(job_id, attempt, verdict)] = (-math.inf, left_out + 1)


GOING_CHANGED_EVERY = 10.0
"""Seconds between two filed status checks that found the run going with
different answers (its progress changed), at least; the same answer is
filed once every `REPEAT_EVENT_EVERY` (`GoingChecks`)."""


class GoingChecks:
    """Which status checks that found the run going (or could not tell) are
    filed in the job's history: the first of each job and attempt, then one
    whose answer (`said`, `progress`) differs from the last filed once
    `GOING_CHANGED_EVERY` seconds have passed since it, or the same answer
    after `REPEAT_EVENT_EVERY`, with how many were left out since
    (`repeats`). Every check was filed: one every 0.1 s filed 3,600 events an
    hour, reaching the history's bound in 17 minutes (found by a QA pass).
    In memory, per process, as `Repeats`."""

    def __init__(self) -> None:
        self._seen: OrderedDict[tuple[str, int], tuple[float, bytes, int]] = OrderedDict()

    def admit(self, job_id: str, attempt: int, data: dict[str, Any]) -> int | None:
        """None: leave this answer out; else file it, saying how many were
        left out before it."""
        key, now = (job_id, attempt), time.monotonic()
        digest = hashlib.sha256(msgspec.json.encode(data, order="sorted")).digest()
        last = self._seen.get(key)
        if last is not None:
            every = REPEAT_EVENT_EVERY if digest == last[1] else GOING_CHANGED_EVERY
            if now - last[0] < every:
                self._seen[key] = (last[0], last[1], last[2] + 1)
                self._seen.move_to_end(key)
                return None
        self._seen[key] = (now, digest, 0)
        self._seen.move_to_end(key)
        if len(self._seen) > REPEATS_KEPT:
            self._seen.popitem(last=False)
        return 0 if last is None else last[2]

    def events(self, job_id: str, attempt: int, data: dict[str, Any]) -> list[NewEvent]:
        """The `status_check` event to file for a check that found the run
        going and answered `data` (`status_said`): none when `admit` leaves it
        out, else it with the `repeats` left out before it."""
        left_out = self.admit(job_id, attempt, data)
        if left_out is None:
            return []
        return [NewEvent("status_check", {**data, "repeats": left_out} if left_out else data)]


def _repeat_kind(data: dict[str, Any]) -> str:
    """What `Repeats` tells repeats apart by: the verdict, and an invalid
    body's why."""
    return f"{data['verdict']} {data.get('error_type', '')}"


CALLBACK_MESSAGES = {
    "accepted": "outcome recorded",
    "duplicate": "the same outcome was already recorded; nothing changed",
    "conflict": "a different outcome was already recorded ({state}); nothing changed",
    "gone": "the job is {state}; its wait accepts nothing more",
}
SAME_STATE_CONFLICT = (
    "the job already ended as {state}, with another result or error; nothing changed"
)
"""A `conflict` of a callback whose status is the job's (a status check, say,
ended it first with its own result): "a different outcome was already
recorded (succeeded)" to one saying succeeded read as a fault (found by a QA
pass)."""


class CallbackResult(msgspec.Struct, frozen=True):
    outcome: CallbackOutcome
    job: Job | None
    """The job as this callback left it; None for an earlier attempt's URL,
    which a retry replaced (the job's state is the new attempt's)."""
    message: str = ""
    details: dict[str, Any] | None = None
    """What a `gone` for an earlier attempt's URL names: `attempt`, and the
    job's `current_attempt`."""


class Heartbeat(msgspec.Struct, frozen=True):
    """What a heartbeat is answered: the job's state, its deadline, and by
    when the next heartbeat must come (None: the job has no heartbeat_timeout)."""

    state: JobState
    deadline: datetime
    heartbeat_timeout: float | None
    heartbeat_due: datetime | None


class HeartbeatGone(msgspec.Struct, frozen=True):
    """Why a heartbeat changed nothing (410 `gone`): `message`, and
    `details` about the attempt the URL names, never another one's:
    `attempt` (the URL's), and `state`, how that attempt ended, when the job
    ended at it; or, when a retry has replaced it, `current_attempt` (the
    job's state then is the new attempt's, not the URL's: not given)."""

    message: str
    details: dict[str, Any]


def learnt(
    rec: JobRecord, found: Running | None, tokens: list[str]
) -> tuple[int, dict[str, Any]] | None:
    """What a status check of `rec` that found the run going changes in its
    `external` (`Running.external`), for `JobIndex.record`; without the
    job's callback tokens (`tokens`: a backend may echo what it was sent)."""
    if found is None or not found.external:
        return None
    return rec.attempt, redact_value(found.external, tokens)


async def going_said(
    rec: JobRecord, found: Running | None, tokens: list[str], limit: int | None
) -> tuple[dict[str, Any], tuple[int, dict[str, Any]] | None]:
    """What a status check of `rec` that found the run going (or could not
    tell) files and changes: its event's data (`status_said`), and what it
    learnt of the run (`learnt`), bounded (`bound_learnt`). Worked aside
    when the backend's answer is large (`core.aside`): the backend's
    target, holding the job's token, writes it."""
    size = 0 if found is None else json_bytes([found.progress, found.external])
    return await aside(size, _going_said, rec, found, tokens, limit)


def _going_said(
    rec: JobRecord, found: Running | None, tokens: list[str], limit: int | None
) -> tuple[dict[str, Any], tuple[int, dict[str, Any]] | None]:
    return status_said(found, tokens), bound_learnt(rec, learnt(rec, found, tokens), limit)


def status_said(found: Running | None, tokens: list[str]) -> dict[str, Any]:
    """A `status_check` (or `heartbeat_missed`) event's data for a run the
    backend says is going (`running`, with its progress when that is at most
    `PROGRESS_LIMIT` bytes of JSON, without the job's callback tokens) or
    cannot tell about (`unknown`)."""
    if found is None:
        return {"said": "unknown"}
    said: dict[str, Any] = {"said": "running"}
    if found.progress is not None and len(msgspec.json.encode(found.progress)) <= PROGRESS_LIMIT:
        said["progress"] = redact_value(found.progress, tokens)
    return said


REFUSAL_TIME = 0.005
"""Seconds after its check began that a refused callback token is answered,
at least: far more than the check's work varies (microseconds), so the time
does not tell whether the job named exists."""
WRONG_TOKEN = "missing or invalid callback token"
NO_SALT = "-"
"""What a wrong token is checked under when the job named has no salt (or
does not exist): no job's salt (`JobRecord.salt`) is this."""


class Callbacks:
    def __init__(
        self, plugins: Plugins, jobs: JobIndex, signer: CallbackSigner, settler: Settler
    ) -> None:
        self.plugins = plugins
        self.jobs = jobs
        self.signer = signer
        self.settler = settler
        self.repeats = Repeats()
        self.going = GoingChecks()
        """Which checks a hint asked for that found the run going are filed."""
        self._turns: dict[str, tuple[asyncio.Lock, int]] = {}
        """The heartbeats of each callback URL under way here, and the lock
        they take turns on (`_in_turn`)."""

    @contextlib.asynccontextmanager
    async def _in_turn(self, key: str) -> AsyncIterator[None]:
        """Heartbeats to one URL handled one after another, in the order they
        came: a large one is read aside (`core.aside`), where it may wait
        behind other jobs' work, and a later small one overtook it, and then
        the older progress was kept (a review, 2026-12-07)."""
        lock, waiting = self._turns.get(key, (asyncio.Lock(), 0))
        self._turns[key] = (lock, waiting + 1)
        try:
            async with lock:
                yield
        finally:
            lock, waiting = self._turns[key]
            if waiting == 1:
                del self._turns[key]
            else:
                self._turns[key] = (lock, waiting - 1)

    def _repeat(self, job_id: str, attempt: int, data: dict[str, Any]) -> NewEvent | None:
        """The `callback` event `data` of a callback that changed nothing, or
        None when `Repeats` leaves it out."""
        left_out = self.repeats.admit(job_id, attempt, _repeat_kind(data))
        if left_out is None:  # counted all the same, as a recorded one is (`on_event`)
            series(CALLBACKS, data["verdict"]).inc()
            return None
        return NewEvent("callback", {**data, "repeats": left_out} if left_out else data)

    def _unrecorded(self, job_id: str, attempt: int, event: NewEvent | None) -> None:
        """`event`, of `_repeat`, was not written (the store failed): the
        next repeat is recorded, counting it."""
        if event is not None:
            left_out = event.data.get("repeats", 0)
            self.repeats.unrecorded(job_id, attempt, _repeat_kind(event.data), left_out)

    async def _record_repeat(
        self, job_id: str, attempt: int, event: NewEvent | None
    ) -> JobRecord | None:
        """Write `event`, of `_repeat`, if any: the job as recorded, or None."""
        if event is None:
            return None
        try:
            return await store_call(self.jobs.record(job_id, [event], now_ms()))
        except BaseException:
            self._unrecorded(job_id, attempt, event)
            raise

    async def _job_of(self, promise_id: str, token: str | None) -> JobRecord:
        """The job a callback URL names, once its token is checked: a wrong
        token and an unknown promise look alike to a stranger, in the answer
        (401 first) and in the time it takes: a refusal is answered
        `REFUSAL_TIME` after the check began, whatever the check did. (Reading
        the whole row only when the job existed told, over 2,000 tries on
        loopback, whether it did: about 20 µs, a QA pass, 2026-12-07. Reading
        the salt alone, found or not, left 3 µs, which a client with less
        jitter still told.)"""
        began = time.monotonic()
        try:
            return await self._checked(promise_id, token)
        except Unauthorized:
            await asyncio.sleep(began + REFUSAL_TIME - time.monotonic())
            raise

    async def _checked(self, promise_id: str, token: str | None) -> JobRecord:
        """`_job_of`'s check. A wrong token reads only the job's salt, and is
        compared under a salt whether the job has one or not."""
        job_id = workflow.job_id_of(promise_id)
        if self.signer.verify(promise_id, token):  # the token of a job without a salt
            salt = None
            rec = None if job_id is None else await store_call(self.jobs.get(job_id))
        elif job_id is None or not token:
            raise Unauthorized(WRONG_TOKEN)
        else:  # a salted job's token, or a wrong one
            salt = await store_call(self.jobs.salt_of(job_id))
            if not self.signer.verify(promise_id, token, salt or NO_SALT) or not salt:
                raise Unauthorized(WRONG_TOKEN)
            rec = await store_call(self.jobs.get(job_id))
        if rec is not None and rec.salt != salt:
            # the id was used before (retention), or the job was deleted and
            # made again between the two reads: the URL is another job's
            raise Unauthorized(WRONG_TOKEN)
        if rec is None:
            raise NotFound.promise(promise_id)
        return rec

    async def too_large(self, promise_id: str, token: str | None, size: int | None) -> None:
        """A callback whose body was over `TETHER_MAX_BODY_BYTES`, refused
        413 unread: filed on its job, with a good token, as an `invalid`
        verdict (`error_type` `too_large`, `body_bytes` when the request said
        its length), once a minute as any. Before, nothing was: the run's
        report was lost, and the job waited for its deadline with no word of
        why (found by a QA pass). A token or promise refused files nothing,
        and the 413 stands either way."""
        try:
            rec = await self._job_of(promise_id, token)
        except (Unauthorized, NotFound):
            return
        attempt = workflow.attempt_of(promise_id) or 1
        if attempt != rec.attempt:
            return
        data: dict[str, Any] = {"verdict": "invalid", "error_type": "too_large"}
        if size is not None:
            data["body_bytes"] = size
        await self._record_repeat(rec.id, attempt, self._repeat(rec.id, attempt, data))

    async def take(self, promise_id: str, token: str | None, body: bytes) -> CallbackResult:
        """Settle a job's wait from its callback URL."""
        rec = await self._job_of(promise_id, token)
        job_id = rec.id
        digest = body_digest(body)
        attempt = workflow.attempt_of(promise_id) or 1
        if attempt > rec.attempt:  # its URL was never handed out
            raise NotFound.promise(promise_id)
        if attempt < rec.attempt:  # a re-run has its own URL
            return await self._gone(rec, attempt, digest)
        try:
            outcome = self._parse(rec, await aside(len(body), decode_json, "callback", body, {}))
        except InvalidRequest as exc:  # not JSON (400), or neither shape (422)
            why = "not_json" if isinstance(exc, MalformedBody) else "invalid_body"
            invalid = self._repeat(
                job_id, attempt, {"verdict": "invalid", **digest, "error_type": why}
            )
            await self._record_repeat(job_id, attempt, invalid)
            raise
        if isinstance(outcome, CheckNow):
            data = {"verdict": "noted", **digest}
            # A hint is a repeat after the first of its attempt, as a duplicate
            # is: once a minute, with `repeats` (a receiver hinting every 0.1 s
            # filed two events a hint; found by a review)
            await self._record_repeat(job_id, attempt, self._repeat(job_id, attempt, data))
            return await self.check_now(rec, outcome.reason)
        status = outcome.status
        decided: dict[str, NewEvent | None] = {}

        def note(verdict: SettleResult) -> NewEvent | None:
            data = {"verdict": verdict, "status": status, **digest}
            if verdict == "accepted":
                return NewEvent("callback", data)
            if verdict not in decided:  # once a callback: a settle may ask twice
                decided[verdict] = self._repeat(job_id, attempt, data)
            return decided[verdict]

        try:
            result, rec = await self.settler.settle(
                job_id, outcome, by="callback", note=note, attempt=attempt, salt=rec.salt, seen=rec
            )
        except BaseException:
            for event in decided.values():
                self._unrecorded(job_id, attempt, event)
            raise
        if result != "accepted" and rec.attempt > attempt:
            # A retry came between the read above and the settle: the
            # attempt had ended, as it would have been found had it come first.
            return await self._gone(rec, attempt, digest)
        if result == "accepted":
            log.info(
                "job %s %s by callback", job_id, outcome.status, extra=rec.log_extra(promise_id)
            )
        same = result == "conflict" and rec.state == outcome.status
        message = (SAME_STATE_CONFLICT if same else CALLBACK_MESSAGES[result]).format(
            state=rec.state
        )
        return CallbackResult(outcome=result, job=view(rec), message=message)

    async def _gone(self, rec: JobRecord, attempt: int, digest: dict[str, Any]) -> CallbackResult:
        """The answer to a callback for an attempt a retry has replaced (410
        `gone`), recorded as a `callback` event of the job's current attempt.
        It names the attempts, not the job: the job's state is the new
        attempt's, which an old URL's holder has no business reading (as a
        heartbeat's 410 has it; found by a security QA pass)."""
        late = self._repeat(rec.id, attempt, {"verdict": "gone", "attempt": attempt, **digest})
        rec = await self._record_repeat(rec.id, attempt, late) or rec
        message = f"attempt {attempt} of this job has ended; the job is at attempt {rec.attempt}"
        details = {"attempt": attempt, "current_attempt": rec.attempt}
        return CallbackResult(outcome="gone", job=None, message=message, details=details)

    async def check_now(self, rec: JobRecord, reason: str) -> CallbackResult:
        """A hint that the run ended (a callback its backend reads as
        `CheckNow`, a backend notification: `core.notices`): ask the backend,
        settle on its answer alone."""
        backend = self.plugins.backends.get(rec.backend)
        message = f"noted ({escaped(reason)}); " if reason else "noted; "
        if rec.finished or backend is None or rec.external is None:
            return CallbackResult("noted", view(rec), message + f"the job is {rec.state}")
        found: Outcome | Running | None
        fault: str | None
        try:
            answer = await asyncio.wait_for(
                backend.check_status(backend_view(rec)), CHECK_NOW_TIMEOUT
            )
        except PLUGIN_FAULTS as exc:  # its words may quote a secret
            if isinstance(exc, asyncio.CancelledError) and cancelling():
                raise  # this request's own, not the backend's
            found, fault, error_type = None, f"raised {type(exc).__name__}", type(exc).__name__
        else:  # an answer of another type: a bug, told as Python tells one
            (found, fault), error_type = contract_answer(answer, Outcome, Running), "TypeError"
        if fault is not None:
            log.warning(
                "job %s: backend %s: check_status on a hint %s",
                rec.id,
                rec.backend,
                fault,
                extra=rec.log_extra(),
            )
            failed = NewEvent("status_check", {"said": "error", "error_type": error_type})
            await store_call(self.jobs.record(rec.id, [failed], now_ms(), open_at=rec.attempt))
            return CallbackResult(
                "noted",
                view(rec),
                message + "the backend's status check failed; the job waits on",
            )
        if found is None or isinstance(found, Running):
            tokens = self.settler.job_tokens(rec)
            data, found_now = await going_said(rec, found, tokens, self.settler.max_result_bytes)
            going = self.going.events(rec.id, rec.attempt, data)  # as the watchdog's checks
            if going or found_now is not None:
                await store_call(
                    self.jobs.record(rec.id, going, now_ms(), found_now, open_at=rec.attempt)
                )
            return CallbackResult(
                "noted", view(rec), message + "the run has not ended; Tether keeps checking"
            )
        said = NewEvent("status_check", {"said": "ended", "status": found.status})
        _, now = await self.settler.settle(
            rec.id, found, by="hint", note=lambda _: said, attempt=rec.attempt, salt=rec.salt
        )
        return CallbackResult("noted", view(now), message + f"the run's state says {now.state}")

    async def heartbeat(
        self, promise_id: str, token: str | None, body: bytes
    ) -> tuple[Heartbeat, HeartbeatGone | None]:
        """Note that a job's run is alive, and its progress if the body has
        one. Returns the answer, and why the heartbeat changed nothing when it
        came too late (this attempt's wait ended: a re-run has its own URL;
        or the job ended). A body that is not JSON is `MalformedBody`; one of
        another shape, or progress over `PROGRESS_LIMIT`, is `InvalidRequest`:
        nothing changes. Heartbeats to one URL take turns (`_in_turn`)."""
        async with self._in_turn(promise_id):
            return await self._heartbeat(promise_id, token, body)

    async def _heartbeat(
        self, promise_id: str, token: str | None, body: bytes
    ) -> tuple[Heartbeat, HeartbeatGone | None]:
        rec = await self._job_of(promise_id, token)
        job_id = rec.id
        # A run may report what it was sent (its callback URL, by mistake)
        tokens = self.settler.job_tokens(rec)
        progress = await aside(len(body), _masked_progress, body, tokens)
        attempt = workflow.attempt_of(promise_id) or 1
        if attempt > rec.attempt:  # its URL was never handed out (as `take` has it)
            raise NotFound.promise(promise_id)
        gone = None
        if attempt < rec.attempt:  # first: the job's state is another attempt's
            gone = _replaced(attempt, rec)
        elif rec.finished:
            gone = _ended(rec)
        else:
            now = now_ms()
            timeout = rec.heartbeat_timeout
            due = None if timeout is None else now + int(timeout * 1000)
            every = int(HEARTBEAT_EVENT_EVERY * 1000)
            # Written only while the job is at the attempt read: one that
            # ended and was retried meanwhile keeps its new attempt's due.
            beaten = await store_call(self.jobs.beat(job_id, attempt, now, progress, due, every))
            rec = beaten or await store_call(self.jobs.get(job_id)) or rec
            if attempt < rec.attempt:  # it ended and was retried meanwhile
                gone = _replaced(attempt, rec)
            elif rec.finished:  # it ended meanwhile
                gone = _ended(rec)
        timeout = rec.heartbeat_timeout
        answer = Heartbeat(
            state=rec.state,
            deadline=_at(rec.deadline),
            heartbeat_timeout=None if timeout is None else float(timeout),  # as the job shows it
            heartbeat_due=None if rec.heartbeat_due is None else _at(rec.heartbeat_due),
        )
        return answer, gone

    def _parse(self, rec: JobRecord, decoded: Any) -> Outcome | CheckNow:
        """The outcome a callback body reports (`decoded`: its JSON, read
        by `decode_json`). An empty body reads as `{}`:
        the backend may claim it; Tether's uniform body needs `status`. A
        backend whose `parse_callback` raises anything but `ValueError`, or
        answers something else than it may, is logged (its name and the
        exception's or answer's type: its words may quote a secret) and the
        body read as the uniform one, which settles the job whatever its
        plugin does."""
        backend = self.plugins.backends.get(rec.backend)
        native: Outcome | CheckNow | None = None
        fault = None
        if backend is not None:
            try:
                answer = backend.parse_callback(backend_view(rec), decoded)
                native, fault = contract_answer(answer, Outcome, CheckNow)
            except ValueError as exc:
                raise InvalidRequest(  # its words may quote the body: escaped
                    f"invalid {rec.backend} callback: {escaped(str(exc))}",
                    {"field": "body", "backend": rec.backend},
                ) from None
            except PLUGIN_FAULTS as exc:
                fault = f"raised {type(exc).__name__}"
            if fault is not None:
                log.warning(
                    "job %s: backend %s: parse_callback %s (a bug in its plugin);"
                    " the callback is read as Tether's uniform body",
                    rec.id,
                    rec.backend,
                    fault,
                    extra=rec.log_extra(),
                )
            elif native is not None:
                return native
        try:
            return msgspec.convert(decoded, CallbackBody).outcome()
        except msgspec.ValidationError as exc:
            unread = ""
            if fault is not None:
                unread = f" (backend {rec.backend!r} could not read it: parse_callback {fault})"
            hint = ""
            if isinstance(decoded, dict) and (
                "progress" in decoded
                or decoded.get("status")
                in (
                    "running",
                    "pending",
                )
            ):  # progress, sent here
                hint = " (progress goes to the job's heartbeat URL, this URL plus /heartbeat)"
            raise InvalidRequest(
                f"invalid callback body: {str(exc).replace('`$.', '`')}; expected"
                ' {"status": "succeeded"|"failed", "result"?, "error"?: {"message", "type"?}}'
                f"{unread}{hint}; nothing changed",
                {"field": field_of(str(exc)) or "body"},
            ) from None


def _replaced(attempt: int, rec: JobRecord) -> HeartbeatGone:
    """A heartbeat for an attempt a retry has replaced (`rec`: the job now)."""
    return HeartbeatGone(
        f"attempt {attempt} of this job has ended; the job is at attempt {rec.attempt}",
        {"attempt": attempt, "current_attempt": rec.attempt},
    )


def _ended(rec: JobRecord) -> HeartbeatGone:
    """A heartbeat for the attempt the job ended at."""
    return HeartbeatGone(
        f"the job is {rec.state}; it takes no more heartbeats",
        {"state": rec.state, "attempt": rec.attempt},
    )


HIGH_ALONE = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})")
"""The escape of a high surrogate, `\\ud800` to `\\udbff`, with no low one's
after it; it may follow an escaped backslash (then it is text)."""
CUT_LOW = re.compile(rb"(?:\\(?:u(?:[dD](?:[c-fC-F][0-9a-fA-F]?)?)?)?)?")
"""What a body cut short within a low surrogate's escape ends with."""
TAIL = 11
"""msgspec says "truncated" of a lone high surrogate's escape only when
fewer than the 6 bytes of a low one's follow it: only an escape starting in
the body's last `TAIL` bytes is looked at (a search of the whole body took
up to 100 ms of a 1 MiB one: found by two reviews)."""


def lone_surrogate(body: bytes) -> re.Match[bytes] | None:
    """The escape of a high surrogate that made msgspec say "truncated" of
    `body`: one near its end (`TAIL`) that is an escape (not after an escaped
    backslash) with no low surrogate's after it. None when there is none, or
    when the body ends where a low one could still follow (it was cut short,
    as msgspec says)."""
    for found in HIGH_ALONE.finditer(body, max(len(body) - TAIL, 0)):
        start, end = found.span()
        if len(body) - end >= 6:  # read whole by msgspec: not what it stopped at
            continue
        if (start - len(body[:start].rstrip(b"\\"))) % 2:  # `\\ud800`: a backslash, then text
            continue
        return None if CUT_LOW.fullmatch(body[end:]) else found
    return None


def not_json(exc: msgspec.DecodeError | UnicodeDecodeError, body: bytes) -> str:
    """Why msgspec could not read `body` as JSON, in words: bytes that are
    not UTF-8 inside a string raise `UnicodeDecodeError`, not `DecodeError`;
    a lone high surrogate's escape, which msgspec calls "Input data was
    truncated", is named (found by a QA pass)."""
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8"
    if str(exc) == "Input data was truncated":
        lone = lone_surrogate(body)
        if lone is not None:
            return (
                f"the escape {lone[0].decode()} at byte {lone.start()} is half a surrogate"
                " pair, with no \\udc00-\\udfff escape after it: a lone surrogate is not"
                " a character"
            )
    return str(exc)


def decode_json(what: str, body: bytes, empty: Any) -> Any:
    """A `what` body's JSON; `empty` for a body of white space only. One
    nested more than `MAX_DEPTH` levels deep is refused."""
    try:
        decoded = read_json(body) if body.strip(JSON_SPACE) else empty
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # bad UTF-8 in a string: the latter
        far = far_number_field(body, str(exc))
        if far is not None:
            why = str(exc).split(" - at `")[0]
            raise MalformedBody(
                f"the {what} body holds a number out of range at {far}: {why}; nothing changed",
                {"field": far},
            ) from None
        raise MalformedBody(
            f"the {what} body is not valid JSON: {not_json(exc, body)}", {"field": "body"}
        ) from None
    except RecursionError:  # too deep for the decoder itself
        raise _too_deep(what) from None
    if deeper_than(decoded):
        raise _too_deep(what)
    return decoded


def _too_deep(what: str) -> MalformedBody:
    return MalformedBody(
        f"the {what} body is JSON nested more than {MAX_DEPTH} levels deep; nothing changed",
        {"field": "body", "limit_depth": MAX_DEPTH},
    )


def _progress(body: bytes) -> Any:
    """The progress a heartbeat body reports (None: none; an empty body and
    `null` are heartbeats without progress)."""
    decoded = decode_json("heartbeat", body, empty=None)
    if decoded is None:
        return None
    try:
        progress = msgspec.convert(decoded, HeartbeatBody).progress
    except msgspec.ValidationError as exc:
        hint = ""
        if isinstance(decoded, dict) and "status" in decoded:  # an outcome, sent here
            hint = " (an outcome goes to the job's callback URL, not its heartbeat URL)"
        raise InvalidRequest(
            f"invalid heartbeat body: {str(exc).replace('`$.', '`')}; expected"
            f' {{"progress"?: any JSON}}{hint}; nothing changed',
            {"field": field_of(str(exc)) or "body"},
        ) from None
    size = len(msgspec.json.encode(progress))
    if size > PROGRESS_LIMIT:
        raise InvalidRequest(
            f"progress is {size} bytes of JSON; at most {PROGRESS_LIMIT} bytes are kept;"
            " nothing changed",
            {"field": "progress", "limit_bytes": PROGRESS_LIMIT},
        )
    return progress


def _masked_progress(body: bytes, tokens: list[str]) -> Any:
    """A heartbeat body's progress (`_progress`) without the job's tokens."""
    return redact_value(_progress(body), tokens)


def _at(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)
