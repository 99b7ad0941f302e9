"""The one way a job ends: settle its callback promise, first settle wins.

A callback, a cancel, the watchdog (timeout, status checks), a backend's hint
and a failed trigger all end a job through `Settler.settle`. The promise is
settled with a value Tether builds (never a rejection, never a caller's
object: the SDK unpickles rejections), then the outcome is recorded in the job
index. A nonce in the value tells the settler whether it won.

What made the settle (a callback, a cancel, a timeout, a status check) is
recorded in the job's history as the settle's `note`: with the change when
this settle ended the job (before its `finished`), else after what is there.
The note a winning settle files is also kept in the promise's value
(`noted`): when the settle's index write never happens (the store took the
settle but answered too late, a 503 to the caller), whoever ends the job
from that value (the workflow's finish, or a later settle that lost) files
it before `finished`, so the history still says what ended the job.

A settle is of one attempt of the job (docs/lifecycle.md): it settles that
attempt's promise and writes the index only while the job is still at that
attempt, so a late settle of an ended attempt never touches a retried job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Literal, cast, get_args

import msgspec
from resonate.error import ServerError
from resonate.resonate import Resonate
from resonate.types import Value
from resonate_base import ConnectorError

from core.aside import aside, json_bytes
from core.bounds import bound_outcome, shallow
from core.errors import NotFound, StoreUnavailable, reason
from core.models import OPEN_STATES, ErrorInfo, EventType, JobState, Outcome, read_json
from core.redact import redact_value
from core.store import STORE_CALL_TIMEOUT
from core.store.jobs import (
    Event,
    JobIndex,
    JobRecord,
    NewEvent,
    NotTogether,
    Requests,
    now_ms,
)
from core.store.sql import HISTORY_HEAD, HISTORY_LIMIT
from core.workflow import callback_promise_id, root_promise_id

SettleResult = Literal["accepted", "duplicate", "conflict", "gone"]

FILED_PAGE = 64
"""Events of a job read at a time when a settle that won looks for its note
(`Settler._filed`): usually the first page holds it; events filed after the
end take more, at most the pages of what the history keeps (`HISTORY_LIMIT`):
17."""

Note = Callable[[SettleResult], NewEvent | None]
"""The event a settle records for what made it, given how it turned out (None:
none). Asked first what a win records (kept in the promise's value), then
how the settle turned out when that is not a win."""


def _first_kept(note: Note, tokens: list[str]) -> Note:
    """`note`, asked once what a win records, its events' data without the
    callback tokens (a cancel's reason may quote the job's callback URL):
    they are filed in the history and kept in the promise's value."""

    def masked(result: SettleResult) -> NewEvent | None:
        event = note(result)
        if event is None or not tokens:
            return event
        return NewEvent(event.type, redact_value(event.data, tokens))

    won = masked("accepted")

    def kept(result: SettleResult) -> NewEvent | None:
        return won if result == "accepted" else masked(result)

    return kept


UNBORN_PROMISE_WAIT = 0.05
UNBORN_PROMISE_TRIES = 50
"""A job whose workflow has not created its callback promise yet is pending:
settling it ends it in the index alone. While it races its own trigger,
the settle looks again every `UNBORN_PROMISE_WAIT` seconds, this many times
(2.5 s), before answering that the store is not keeping up."""


log = logging.getLogger("tether")


async def store_call[T](awaitable: Awaitable[T]) -> T:
    """Await a store operation; a store that fails, or stalls past
    `STORE_CALL_TIMEOUT`, is `StoreUnavailable` (503)."""
    try:
        async with asyncio.timeout(STORE_CALL_TIMEOUT):
            return await awaitable
    except (ConnectorError, OSError, TimeoutError) as exc:
        unavailable = StoreUnavailable(f"the store did not answer: {type(exc).__name__}")
        unavailable.unknown_effect = True  # asked: it may apply the request late
        raise unavailable from None


def store_refusal(exc: ServerError) -> str:
    """A status the store answered, as messages name it: its text cut (a
    proxy's page or a server's words may be long)."""
    return f"status {exc.code}: {exc.message[:200]}"


def settled_value(
    outcome: Outcome, by: str, nonce: str, note: NewEvent | None = None
) -> dict[str, Any]:
    """What a callback promise is settled with: the outcome, who ended the job,
    a nonce that tells the settler it won, and the event the settle files
    when it wins (`note`, under "note": read back by `noted`)."""
    value = {**msgspec.to_builtins(outcome), "by": by, "nonce": nonce}
    if note is not None:
        value["note"] = {"type": note.type, "data": note.data}
    return value


EVENT_TYPES = frozenset(get_args(EventType))


def noted(value: Any) -> list[NewEvent]:
    """The event a settled callback promise's value says its settle files
    when it wins (`settled_value`): none for a value without one (settled by
    the trigger, the store, or a release before this one)."""
    note = value.get("note") if isinstance(value, dict) else None
    if not isinstance(note, dict):
        return []
    kind, data = note.get("type"), note.get("data")
    if kind not in EVENT_TYPES or not isinstance(data, dict):
        return []
    return [NewEvent(cast(EventType, kind), data)]


def outcome_of(value: Any) -> Outcome:
    """The outcome a settled callback promise holds (a value Tether built)."""
    try:
        return msgspec.convert(value, Outcome)
    except (msgspec.ValidationError, TypeError):
        return Outcome(
            status="failed", error=ErrorInfo(message="unreadable outcome", type="tether")
        )


def deadline_message(timeout: float | None) -> str:
    """How a job that reached its deadline ends, in words (`error.message`),
    whoever found it: the watchdog, or the store (`store_timeout`)."""
    within = "by its deadline" if timeout is None else f"within {timeout:g} seconds"
    return f"not finished {within}, the job's timeout"


def store_timeout(timeout: float | None) -> Outcome:
    """How a job ends whose callback promise the store timed out (no watchdog
    got there first: the service was down past the deadline and its grace):
    in the watchdog's words, the outage said after them (a timeout found two
    ways read two ways, which alerts matching the words missed: an
    exploratory QA pass)."""
    message = (
        f"{deadline_message(timeout)} (the store timed its wait out: the service was down"
        " past the deadline)"
    )
    return Outcome(status="timed_out", error=ErrorInfo(message=message, type="timeout"))


def store_timed_out(timeout: float | None) -> NewEvent:
    """The event such a job's history gets before `finished`, as the
    watchdog's deadline files `timed_out` (`timeout`, when known), and `by: store`."""
    known = {} if timeout is None else {"timeout": timeout}
    return NewEvent("timed_out", {**known, "by": "store"})


def outcome_of_record(rec: JobRecord) -> Outcome:
    """The outcome a finished job's row records."""
    return Outcome(status=rec.state, result=rec.result, error=rec.error)  # type: ignore[arg-type]


def judge(status: str, same: bool) -> SettleResult:
    """How a settle that lost compares with the one that won."""
    if status in ("canceled", "timed_out"):
        return "gone"
    return "duplicate" if same else "conflict"


def judged(rec: JobRecord, outcome: Outcome) -> SettleResult:
    """How a settle of `outcome` compares with the end finished job `rec`
    records (`same_as` compares the state too)."""
    return judge(rec.state, outcome_of_record(rec).same_as(outcome))


def settled_data(answer: dict[str, Any]) -> Any:
    """The encoded value of the promise a settle answered with (status 200):
    resonate-pg's answer holds it decoded, the embedded engine's as stored
    (`msgspec.Raw`)."""
    value = answer["promise"]["value"]
    if isinstance(value, msgspec.Raw):
        value = read_json(value)
    return value.get("data")


def _kept(outcome: Outcome, secrets: list[str], limit: int | None) -> Outcome:
    """What a settle keeps of `outcome`: no deeper than what reads it
    recursively, without `secrets`, then bounded to `limit` (no whole token
    is left for the bound to cut). Worked aside when large (`core.aside`)."""
    return bound_outcome(_redacted(shallow(outcome), secrets), limit)


def _outcome_bytes(outcome: Outcome) -> int:
    """About how many bytes `_kept` works on."""
    return json_bytes(outcome.result) + (0 if outcome.error is None else len(outcome.error.message))


def _redacted(outcome: Outcome, secrets: list[str]) -> Outcome:
    error = outcome.error
    parts = [outcome.result, None if error is None else [error.message, error.type]]
    redacted = redact_value(parts, secrets)
    if redacted is parts:
        return outcome
    result, said = redacted
    return Outcome(
        status=outcome.status,
        result=result,
        error=None if said is None else ErrorInfo(message=said[0], type=said[1]),
    )


class Settler:
    def __init__(
        self,
        resonate: Resonate,
        jobs: JobIndex,
        max_result_bytes: int | None = None,
        tokens: Callable[[str, int, str | None], list[str]] | None = None,
    ) -> None:
        self.resonate = resonate
        self.jobs = jobs
        self.max_result_bytes = max_result_bytes
        """`TETHER_MAX_RESULT_BYTES`: every outcome is cut to it before it is
        stored (`core.bounds`); None: no bound."""
        self.tokens = tokens
        """The callback tokens of a job up to an attempt, with its salt
        (`CallbackSigner.job_tokens`): masked
        in every outcome before it is stored, wherever it came from (a run's
        error may quote the callback URL it was given)."""
        self.on_orphan: Callable[[JobRecord], Awaitable[None]] | None = None
        """Called with a job a settle ended that no workflow will finish: one
        ended before its workflow made its promise (a start lost to a crash,
        then a cancel or the deadline), or whose workflow the store timed out
        too (the service down past the deadline and `ROOT_GRACE_MS`). What
        the workflow's finish does (stop the run, tell the plugins) is this
        callback's to do (`JobSteps.finish_orphan`, wired by the service).
        The watchdog calls it too, with a job whose run's stop it took over
        (`stop_due`: `Watchdog.stop_again`)."""
        self.stop_lease_ms = 30_000
        """The lease on the stop of such a job's run (`stop_due`: this
        process's, renewed while the stop runs, `core.lease`), from the write
        that ends the job: `JobSteps.stop_lease_ms`, wired by the service."""
        self.finishes_alone: Callable[[str, dict[str, Any]], bool] | None = None
        """Whether a job ended `state` by a settle of that value needs nothing
        of its workflow's finish but the index write: no run to stop, no
        plugin to tell (`JobSteps.finishes_alone`, wired by the service).
        On a store that `settles_together` such a settle then ends the
        workflow too, in the transaction that ends the job
        (`_settle_together`). None: never."""
        self.spawn: Callable[[Coroutine[Any, Any, None]], object] | None = None
        """Runs a durable such finish (its stop recorded as due, `stop_due`) in
        a task the service owns (`Tether._spawn_stop`: cancelled as it stops,
        which gives the stop's lease up) instead of the settle's caller: an
        API cancel or a callback answers once the job's end is recorded, not
        after the backend's `cancel` and its retries. None: `settle` awaits
        it."""

    def job_tokens(self, rec: JobRecord) -> list[str]:
        """The callback tokens of job `rec` up to its attempt (`tokens`):
        what to mask in anything from outside that is kept of it."""
        return [] if self.tokens is None else self.tokens(rec.id, rec.attempt, rec.salt)

    async def settle(
        self,
        job_id: str,
        outcome: Outcome,
        by: str,
        note: Note | None = None,
        attempt: int | None = None,
        salt: str | None = None,
        wait_stop: bool = False,
        seen: JobRecord | None = None,
    ) -> tuple[SettleResult, JobRecord]:
        """End job `job_id`'s wait with `outcome`, unless something ended it first.

        Returns `accepted` when this settle won; else whether it agreed with
        the winner (`duplicate`), disagreed (`conflict`), or came after a
        cancel or timeout (`gone`); and the job's row as it now stands.
        `note` names the event to record for it. `attempt` is the attempt the
        caller saw (pass it whenever it read the row: the job may have been
        retried since); None: the one the job is at now. The outcome is
        bounded first (`max_result_bytes`): nothing larger is ever stored,
        and without the job's callback tokens (of `salt`, the job's: pass it
        whenever it read the row). A job this settle ends that no workflow
        will finish is finished by `on_orphan`: its run's stop, when
        recorded as due, in a task of the service's (`spawn`), unless
        `wait_stop` (the watchdog, whose looks run outside any request and
        are bounded per sweep, awaits it); the stop's outcome (a
        `cancel_failed`) is an event filed later, which the job's stream
        waits for (`stop_due`). `seen`: the job's row as the caller read it
        before this settle (pass it whenever it read the row): one ended at
        `attempt` already was ended by another settle, and this one is
        judged by it, settling nothing (`_after_the_end`).
        """
        if attempt is None:
            current = await store_call(self.jobs.get(job_id))
            if current is None:
                raise NotFound.job(job_id)
            attempt, seen = current.attempt, current
        promise_id = callback_promise_id(job_id, attempt)
        tokens = self.tokens(job_id, attempt, salt) if self.tokens is not None else []
        kept = (outcome, tokens, self.max_result_bytes)
        outcome = await aside(_outcome_bytes(outcome), _kept, *kept)
        if note is not None:  # asked first how a win is noted: kept in the value
            note = _first_kept(note, tokens)
        if seen is not None and seen.attempt == attempt and seen.finished:
            return await self._after_the_end(seen, outcome, note)
        nonce = uuid.uuid4().hex
        value = settled_value(outcome, by, nonce, None if note is None else note("accepted"))
        if self.jobs.settles_together:
            alone = self.finishes_alone is not None and self.finishes_alone(outcome.status, value)
            rec = await self._settle_together(job_id, attempt, outcome, value, note, alone)
            if rec is not None:
                return "accepted", rec
        for _ in range(UNBORN_PROMISE_TRIES):
            try:
                record = await store_call(
                    self.resonate.promises.resolve(promise_id, Value(data=value))
                )
                break
            except ServerError as exc:
                if exc.code != 404:
                    said = f"the store refused the settle ({store_refusal(exc)})"
                    log.warning("job %s: %s", job_id, said, extra={"job_id": job_id})
                    raise StoreUnavailable(said) from None
            # The workflow has not created its promise yet: the job is queued
            # (no workflow yet) or pending. Ending it in the index is enough
            # (the trigger reads it first), but only while it is still
            # one of those; else the promise exists now.
            early: tuple[JobState, ...] = ("queued", "pending")
            if (seen is None or seen.state == "running") and await self._promises_gone(
                job_id, attempt
            ):  # (a row seen queued or pending waits for its promise: no read of the root)
                early += ("running",)
            rec, ended, _ = await self._end(job_id, outcome, early, note, "accepted", attempt)
            # A queued one is the service's (listener); a workflow that is
            # only slow to make its promise finishes the job itself (its
            # trigger finds it ended): finishing it here too told the plugins
            # twice.
            if ended and rec.queued_at is None and not await self._workflow_alive(job_id, attempt):
                await self._orphaned(rec, wait_stop)
            if rec.attempt != attempt:  # its promise never came: the attempt is over
                return "gone", rec
            if rec.finished:  # by this settle, or by another that came first
                return ("accepted" if ended else judged(rec, outcome)), rec
            await asyncio.sleep(UNBORN_PROMISE_WAIT)
        else:
            raise StoreUnavailable(f"job {job_id!r} did not create its promise in time")
        data = record.value.data if record.state == "resolved" else None
        timeout: float | None = None
        if data is None:  # the store timed the wait out: in the job's own words (rarely)
            row = seen
            if row is None:  # a read that fails (after an outage) costs the words only
                with contextlib.suppress(Exception):
                    row = await store_call(self.jobs.get(job_id))
            timeout = row.timeout if row is not None else None
        settled = outcome_of(data) if data is not None else store_timeout(timeout)
        won = isinstance(data, dict) and data.get("nonce") == nonce
        result = "accepted" if won else judge(settled.status, settled.same_as(outcome))
        # Lost: the winner's own event first, should this settle be the one
        # that ends the job (the winner's index write timed out, or is late).
        before = [store_timed_out(timeout)] if data is None else noted(data) if not won else []
        # The store timed the wait out: a settle that ends the job finishes
        # it too when its workflow is over (the service was down past the
        # deadline and `ROOT_GRACE_MS`). Its run's stop is due from the
        # write that ends it (`stop_due`): this process holds it, renewing
        # its lease while the stop runs; any process's watchdog may take it
        # over once the lease ran out.
        orphan = data is None and not await self._workflow_alive(job_id, attempt)
        stop_due = now_ms() + self.stop_lease_ms if orphan else None
        rec, ended, result = await self._end(
            job_id, settled, OPEN_STATES, note, result, attempt, before, won=won, stop_due=stop_due
        )
        if ended and orphan:
            await self._orphaned(rec, wait_stop)
        return result, rec

    async def _after_the_end(
        self, seen: JobRecord, outcome: Outcome, note: Note | None
    ) -> tuple[SettleResult, JobRecord]:
        """A settle of job `seen`'s attempt, which its caller read ended: it
        can change nothing, and the row says how it compares (its outcome is
        the one a settle ended it with, bounded and masked alike; the
        promise holds the same, or a store's timeout that the row words as
        its own, or nothing yet). The promise is not touched: the SDK's
        answer to a settle of a settled promise is its value decoded on the
        loop (a megabyte of floats at the double's ends took 0.5 s a
        duplicate, 2026-12-07), and one the job's end left unborn (the index
        alone: a cancel first) is its trigger's to settle, from the row,
        saying whether it tried a run (`JobSteps`: a value of this settle's
        winning it said not). A look at the job's attempt alone comes first
        (`attempt_of`): only while it is unchanged is the note asked for and
        filed after the end as a loser's, in one write that holds only while
        the job is still ended at that attempt. The row returned is the job
        as it is now, so that a caller sees a retry that came meanwhile; with
        nothing to file, `seen` itself (the row is not read and decoded
        again). A job deleted meanwhile, or made again under its id
        (retention, then a new job), is not found."""
        result = judged(seen, outcome)
        at, rec = seen.attempt, None
        # The note is asked for only while the job is still at that attempt:
        # asking counts a repeat the endpoint leaves out (`tether_callbacks_total`),
        # and one retried meanwhile is answered `gone`, counted as that (a
        # crash and duplicates QA pass counted 4 duplicates too many).
        if await store_call(self.jobs.attempt_of(seen.id)) == (at, seen.created_at):
            late = None if note is None else note(result)
            if late is None:
                return result, seen  # nothing to file (a repeat left out): the row unread
            rec = await store_call(self.jobs.record(seen.id, [late], now_ms(), ended_at=at))
        if rec is None:  # retried since, deleted, or made again
            rec = await store_call(self.jobs.get(seen.id))
        if rec is None or rec.created_at != seen.created_at:
            raise NotFound.job(seen.id)
        return result, rec

    async def _settle_together(
        self,
        job_id: str,
        attempt: int,
        outcome: Outcome,
        value: dict[str, Any],
        note: Note | None,
        alone: bool,
    ) -> JobRecord | None:
        """Settle the callback promise with `value` and end the job in one
        transaction, when the promise is pending and the job open at
        `attempt` (a settle that wins, in the common case): the end written
        as `_end` writes a winner's (the note's event, then `finished`).
        With `alone` (`finishes_alone`: its finish would do nothing more),
        and its workflow waiting (its task suspended on that promise), the
        workflow is ended too: its root promise settled with what it would
        return (the same value), so it never runs again. That saves a
        resume (the task's acquire, a replay, its fulfill) and the wait for
        it. A workflow still running (its trigger: the callback came
        quickly) finishes the job itself, as always. None, with nothing
        written, when the promise or the job is not so (an unborn promise,
        another settle first, a retry): the caller settles step by step."""
        root, promise_id = root_promise_id(job_id, attempt), callback_promise_id(job_id, attempt)
        encoded = msgspec.to_builtins(self.resonate.promises.codec.encode(value))

        async def settle(tx: Requests, pid: str) -> None:
            status, answer = await tx.request(
                "promise.settle", {"id": pid, "state": "resolved", "value": encoded}
            )
            # Settled by this settle only if the promise now holds its value:
            # a settle of a promise settled already (by an earlier settle, or
            # on Postgres by another transaction that holds no lock we wait
            # on) or timed out (each request reads the clock) answers 200
            # all the same; one not born yet answers 404. No read comes
            # first: the common case is a settle that wins, and a loser's
            # transaction is rolled back whole.
            if status != 200 or settled_data(answer) != encoded.get("data"):
                raise NotTogether(f"{pid!r} was not settled by this settle ({status})")

        workflow_ended = False

        async def settle_together(tx: Requests) -> None:
            nonlocal workflow_ended
            workflow_ended = False  # (again: a batch the store retried runs this again)
            first = self.jobs.root_settled_first
            if alone:
                status, answer = await tx.request("task.get", {"id": root})
                workflow_ended = status == 200 and answer["task"]["state"] == "suspended"
            # In the order the store takes their locks in (`root_settled_first`)
            if workflow_ended and first:
                await settle(tx, root)
            await settle(tx, promise_id)
            if workflow_ended and not first:
                await settle(tx, root)

        event = None if note is None else note("accepted")
        try:
            rec, _ = await store_call(
                self.jobs.end(
                    job_id,
                    outcome,
                    now_ms(),
                    events=[] if event is None else [event],
                    attempt=attempt,
                    together=settle_together,
                )
            )
        except NotTogether:
            return None
        if workflow_ended and rec is not None:  # its finish's, which will not run
            log.info("job %s finished: %s", job_id, rec.state, extra=rec.log_extra())
        return rec

    async def _workflow_alive(self, job_id: str, attempt: int) -> bool:
        """Whether the workflow of that attempt of job `job_id` (its root
        promise) still waits: it then finishes the job itself once its
        callback promise is settled."""
        try:
            root = await store_call(self.resonate.promises.get(root_promise_id(job_id, attempt)))
        except (ServerError, StoreUnavailable):
            return False
        return bool(root.state == "pending")

    async def _promises_gone(self, job_id: str, attempt: int) -> bool:
        """Whether the attempt's workflow is gone for good: its root promise
        is not in the store (404, not a store that did not answer). A running
        job's callback promise was made before its trigger, so a settle that
        finds neither may end a `running` row itself, as it ends an early
        one: nothing else would (retention before 2026-12-05 deleted the
        promises of jobs an outage had left waiting past their deadlines,
        and they stayed `running`, every settle a 503)."""
        try:
            await store_call(self.resonate.promises.get(root_promise_id(job_id, attempt)))
        except ServerError as exc:
            return exc.code == 404
        except StoreUnavailable:
            return False
        return False

    async def _orphaned(self, rec: JobRecord, wait: bool) -> None:
        """`orphaned(rec)`, in a task of the service's (`spawn`) when its
        run's stop is durable (`stop_due`: one cut short is given up, and
        taken over by a watchdog) and the caller does not `wait`. A finish
        with nothing recorded as due (no run to stop: the plugins told) is
        awaited: a task cut short by a shutdown would leave no trace of it."""
        if self.spawn is not None and not wait and rec.stop_due is not None:
            self.spawn(self.orphaned(rec))
        else:
            await self.orphaned(rec)

    async def orphaned(self, rec: JobRecord) -> None:
        """`on_orphan(rec)`, an error logged: the job's end is recorded, and a
        run's stop still due (`stop_due`) is taken over once its lease ran out."""
        if self.on_orphan is None:
            return
        try:
            await self.on_orphan(rec)
        except Exception as exc:
            log.warning(
                "job %s: finishing it without its workflow failed: %s",
                rec.id,
                reason(exc),
                extra=rec.log_extra(),
            )

    async def _end(
        self,
        job_id: str,
        outcome: Outcome,
        from_states: tuple[str, ...],
        note: Note | None,
        result: SettleResult,
        attempt: int,
        before: list[NewEvent] | None = None,
        *,
        won: bool = False,
        stop_due: int | None = None,
    ) -> tuple[JobRecord, bool, SettleResult]:
        """Record `outcome` in the index if the job is at `attempt`, with the
        note's event for `result` before `finished` if this ends the job; if it
        does not (someone recorded the end first), the note's event for how
        the settle compares goes after (none once the job is at a later attempt).
        `before`: events that go first when this ends the job. `won`: this
        settle's value is the promise's, so whoever recorded the end from it
        (the workflow's finish, a settle that lost) filed its note already
        (`noted`): not again. `stop_due`: the run's stop is due then, if this
        ends a job with a run (`JobIndex.end`). Returns the row, whether
        this ended the job, and how the settle turned out: `result`, but
        judged against the row when it is `accepted` and another settle
        ended the job (not from this one's value)."""
        event = None if note is None else note(result)
        events = [*(before or []), *([event] if event else [])]
        rec, ended = await store_call(
            self.jobs.end(job_id, outcome, now_ms(), from_states, events, attempt, stop_due)
        )
        if rec is None:
            raise NotFound.job(job_id)
        if note is not None and not ended and rec.finished and rec.attempt == attempt:
            if won and await self._filed(rec, note("accepted")):
                return rec, ended, result
            if result == "accepted":  # another settle ended it first, not from this one's value
                result = judged(rec, outcome)
            late = note(result)
            if late is not None:
                rec = await store_call(self.jobs.record(job_id, [late], now_ms())) or rec
        return rec, ended, result

    async def _filed(self, rec: JobRecord, event: NewEvent | None) -> bool:
        """Whether `event` was filed with the end of `rec`'s attempt: whoever
        ended the job from this settle's value (`noted`: the workflow's
        finish, a settle that lost) filed it in that write, just before the
        attempt's `finished`. The look walks back from the job's last event
        to that `finished`, past whatever came after the end (late
        callbacks, notifications, a run's stop), `FILED_PAGE` events at a
        time by the history's key (job id and seq); made only when a settle
        that won finds the job ended by another.

        Only what the history keeps is read: its last events down to where
        trimming began (`HISTORY_LIMIT`), then its first `HISTORY_HEAD`. A
        range read into the trimmed middle would return the tail's first
        events again (`seq > first` skips the gap), a page for every
        `FILED_PAGE` events ever filed."""
        if event is None:
            return False
        end: Event | None = None
        kept = max(rec.events - (HISTORY_LIMIT - HISTORY_HEAD), HISTORY_HEAD)  # the tail's start
        last = rec.events
        while last > 0:
            first = max(last - FILED_PAGE, kept if last > kept else 0)
            _, page = await store_call(self.jobs.events_after(rec.id, first, last - first))
            for e in reversed(page):
                if e.seq > last:  # trimmed since `rec` was read: the read ran past its page
                    continue
                if e.attempt != rec.attempt:
                    return False  # the attempt's events are over
                if end is None:
                    end = e if e.type == "finished" else None
                elif e.at != end.at:  # past the write that filed `finished`
                    return False
                elif (e.type, e.data) == (event.type, event.data):
                    return True
            last = HISTORY_HEAD if first == kept else first  # past the tail: to the head
        return False

    async def resolve_quietly(
        self, promise_id: str, outcome: Outcome, by: str, tried: bool = False
    ) -> None:
        """Settle `promise_id` with an outcome already recorded in the index
        (the workflow then finishes); whoever settled first still wins.
        `tried`: the trigger settling it made a try that may have started a
        run (kept in the value as `tried`: `JobSteps.finish` stops it)."""
        value = settled_value(outcome, by, uuid.uuid4().hex)
        if tried:
            value["tried"] = True
        await self.resonate.promises.resolve(promise_id, Value(data=value))
