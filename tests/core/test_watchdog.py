"""The watchdog's decisions (`core.watchdog`), in process on real parts: time a
job out or ask its backend, back the checks off, skip a check another process
claimed, and retention's minimum and order. The backend is a small real
`Backend` whose `check_status` answers from a script."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from unittest.mock import ANY

import msgspec
import pytest
from resonate.error import ServerError
from resonate.types import Value

import core.steps
import core.watchdog
from core.errors import BackendError, InvalidRequest
from core.hookspecs import Backend
from core.models import ErrorInfo, Job, Outcome, Running
from core.plugin import hookimpl
from core.plugins import Plugins, make_plugin_manager
from core.steps import JobSteps
from core.store.jobs import JobRecord, NewEvent, now_ms
from core.tokens import CallbackSigner
from core.views import view
from core.watchdog import MIN_RETENTION, Watchdog, collect_garbage
from core.workflow import ROOT_GRACE_MS, callback_promise_id
from tests.core.parts import Parts, logs_of, open_parts

DONE = Outcome(status="succeeded", result={"rows": 3})
HOUR = 3_600_000
DAY = 24 * HOUR


class CheckParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    interval: float | None = 2.0


class Checked(Backend):
    """`check_status` answers `found[job id]` (None: still running), after
    `before` if set; records each job it was asked about, and each it was
    asked to stop (`cancel`, which runs `stopping` first if set).
    `check_interval` answers the params' `interval`, or `interval(params)`
    if set."""

    name = "checked"
    params_type = CheckParams

    def __init__(self) -> None:
        self.found: dict[str, Outcome | Running | None] = {}
        self.asked: list[Job] = []
        self.before: Callable[[Job], Awaitable[None]] | None = None
        self.stopped: list[Job] = []
        self.stopping: Callable[[Job], Awaitable[None]] | None = None
        self.interval: Callable[[CheckParams], Any] | None = None

    def check_interval(self, params: CheckParams) -> float | None:
        if self.interval is not None:
            return self.interval(params)  # type: ignore[no-any-return]
        return params.interval

    async def check_status(self, job: Job) -> Outcome | Running | None:
        self.asked.append(job)
        if self.before is not None:
            await self.before(job)
        return self.found.get(job.id)

    async def cancel(self, job: Job) -> None:
        self.stopped.append(job)
        if self.stopping is not None:
            await self.stopping(job)


@dataclass(eq=False)  # pluggy keeps plugins in sets
class Plugin:
    backend: Checked = field(default_factory=Checked)

    @hookimpl
    def tether_backends(self) -> list[Backend]:
        return [self.backend]


@dataclass
class Rig:
    parts: Parts
    backend: Checked
    watchdog: Watchdog

    async def running(
        self, job_id: str, *, age: int = 0, next_check_at: int, **more: Any
    ) -> JobRecord:
        """A running job triggered `age` ms ago, its next check at `next_check_at`."""
        return await self.parts.add_job(
            job_id,
            backend=more.pop("backend", "checked"),
            state="running",
            created_at=now_ms() - age,
            timeout=more.pop("timeout", 3600),
            next_check_at=next_check_at,
            external={"run": job_id},
            **more,
        )


def make_rig(parts: Parts) -> Rig:
    plugin = Plugin()
    plugins = Plugins(make_plugin_manager(builtins=False, entry_points=False, extra=[plugin]))
    watchdog = Watchdog(parts.settings, plugins, parts.store, parts.settler)
    watchdog.started -= DAY  # long up: no start's grace (see its own tests)
    return Rig(parts, plugin.backend, watchdog)


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    async with open_parts(watchdog_interval=0) as parts:
        yield make_rig(parts)


# ── timeouts ─────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("past", [0, 1, 5000])
async def test_a_job_at_or_past_its_deadline_times_out(rig: Rig, past: int):
    rec = await rig.parts.add_job("j", backend="checked", timeout=1.5)
    await rig.parts.add_promise("j")
    with logs_of("tether") as logs:
        await rig.watchdog.look_at(rec, rec.deadline + past)

    row = await rig.parts.row("j")
    assert (row.state, row.error) == (
        "timed_out",
        ErrorInfo(message="not finished within 1.5 seconds, the job's timeout", type="timeout"),
    )
    value = (await rig.parts.promise("j")).value.data
    assert (value["status"], value["by"]) == ("timed_out", "timeout")
    assert logs.lines == ["INFO job j timed out"]
    assert rig.backend.asked == []


async def test_a_job_before_its_deadline_is_not_timed_out(rig: Rig):
    rec = await rig.parts.add_job("j", backend="checked", timeout=60)
    await rig.watchdog.look_at(rec, rec.deadline - 1)
    assert (await rig.parts.row("j")).state == "pending"


async def test_a_timeout_that_lost_is_not_logged(rig: Rig):
    rec = await rig.parts.add_job("j", backend="checked", timeout=60)
    await rig.parts.add_promise("j")
    await rig.parts.settler.settle("j", DONE, by="callback")
    with logs_of("tether") as logs:
        await rig.watchdog.look_at(rec, rec.deadline)
    assert (await rig.parts.row("j")).state == "succeeded"
    assert logs.lines == []


# ── status checks ────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("age", "wait"),
    [
        (1_000, 2_000),  # young: one interval
        (10_001, 5_000),  # half its time running (5000.5, whole milliseconds)
        (100_000, 20_000),  # old: at most ten intervals
    ],
)
async def test_a_status_check_comes_later_the_longer_a_job_runs(rig: Rig, age: int, wait: int):
    now = now_ms()
    rec = await rig.running("j", age=age, next_check_at=now)
    rec = msgspec.structs.replace(rec, updated_at=now - age)
    await rig.watchdog.look_at(rec, now)
    assert (await rig.parts.row("j")).next_check_at == now + wait
    assert [j.id for j in rig.backend.asked] == ["j"]


async def test_a_check_that_finds_the_run_ended_settles_the_job(rig: Rig):
    now = now_ms()
    rec = await rig.running("j", next_check_at=now)
    await rig.parts.add_promise("j")
    rig.backend.found["j"] = DONE
    with logs_of("tether") as logs:
        await rig.watchdog.look_at(rec, now)

    row = await rig.parts.row("j")
    assert (row.state, row.result) == ("succeeded", {"rows": 3})
    assert rig.backend.asked == [view(rec)]
    value = (await rig.parts.promise("j")).value.data
    assert value["by"] == "status_check"
    assert logs.lines == ["INFO job j succeeded (found by status check)"]
    assert logs.fields()[0][1:] == ("j", None)
    assert (await history(rig))[-2:] == [
        ("status_check", {"said": "ended", "status": "succeeded"}),
        ("finished", ANY),
    ]


async def test_a_check_that_lost_to_a_callback_is_not_logged(rig: Rig):
    now = now_ms()
    rec = await rig.running("j", next_check_at=now)
    await rig.parts.add_promise("j")
    await rig.parts.settler.settle("j", DONE, by="callback")
    rig.backend.found["j"] = Outcome(status="failed")
    with logs_of("tether") as logs:
        await rig.watchdog.look_at(rec, now)
    assert (await rig.parts.row("j")).state == "succeeded"
    assert logs.lines == []


async def test_a_check_that_finds_the_run_going_changes_nothing_but_the_next_check(rig: Rig):
    now = now_ms()
    rec = await rig.running("j", next_check_at=now)
    await rig.watchdog.look_at(rec, now)
    row = await rig.parts.row("j")
    assert (row.state, row.next_check_at) == ("running", now + 2000)


async def test_a_check_another_process_took_is_not_made_again(rig: Rig):
    now = now_ms()
    stale = await rig.running("j", next_check_at=now)
    await rig.watchdog.look_at(stale, now)  # this one takes it: next at now + 2000
    await rig.watchdog.look_at(stale, now)  # as a second process would, from the same read
    assert len(rig.backend.asked) == 1
    assert (await rig.parts.row("j")).next_check_at == now + 2000


@pytest.mark.parametrize(
    "how",
    ["no check due", "no interval", "zero interval", "unreadable params", "no backend"],
)
async def test_no_check_is_made_when_none_is_due_or_possible(rig: Rig, how: str):
    now = now_ms()
    params: dict[str, Any] = {
        "no interval": {"interval": None},
        "zero interval": {"interval": 0},
        "unreadable params": {"interval": "often"},
    }.get(how, {})
    backend = "gone" if how == "no backend" else "checked"
    next_check = None if how == "no check due" else now
    rec = await rig.running("j", next_check_at=next_check, params=params, backend=backend)
    await rig.watchdog.look_at(rec, now)
    assert rig.backend.asked == []
    row = await rig.parts.row("j")
    # An interval of None (or 0) at a later check: no more checks, as at the
    # trigger (the job stayed due, and was looked at at every sweep).
    stopped = how in ("no interval", "zero interval")
    later = how == "unreadable params"  # an hour on (below)
    assert row.state == "running"
    assert row.next_check_at == (None if stopped else next_check) or later


# ── sweeps ───────────────────────────────────────────────────────────────────


async def test_a_sweep_looks_at_every_job_due_and_no_other(rig: Rig):
    now = now_ms()
    late = await rig.parts.add_job("late", backend="checked", timeout=0.001)
    await rig.parts.add_promise("late")
    await rig.running("due", next_check_at=now - 1)
    await rig.running("not-yet", next_check_at=now + 60_000)
    rig.backend.found["due"] = DONE
    await rig.parts.add_promise("due")

    await rig.watchdog.sweep(max(now, late.deadline))

    assert (await rig.parts.row("late")).state == "timed_out"
    assert (await rig.parts.row("due")).state == "succeeded"
    assert [j.id for j in rig.backend.asked] == ["due"]
    assert (await rig.parts.row("not-yet")).state == "running"


async def test_a_sweep_after_an_outage_never_starts_a_queued_job_past_its_deadline(rig: Rig):
    """Back from an outage, a sweep times out the running job holding the
    backend's one slot, and its end promotes the next queued job: not the
    one whose deadline passed during the outage too (the same sweep times it
    out, never triggered), but the one queued after it."""
    jobs = rig.parts.jobs
    jobs.limits = {"checked": 1}
    now = now_ms()
    await rig.running("holder", age=10_000, timeout=5, next_check_at=now + HOUR)
    await rig.parts.add_promise("holder")
    late = await rig.parts.add_job("late", backend="checked", deadline=now - 1_000)
    after = await rig.parts.add_job("after", backend="checked")
    assert (late.state, after.state) == ("queued", "queued")
    promoted: list[list[str]] = []
    jobs.on_ready = lambda ready: promoted.append([r.id for r in ready])

    await rig.watchdog.sweep(now)

    assert [(await rig.parts.row(j)).state for j in ("holder", "late", "after")] == [
        "timed_out",
        "timed_out",
        "pending",
    ]
    assert promoted == [["after"]]
    assert [t for t, _ in await history(rig, "late")] == ["queued", "timed_out", "finished"]


async def test_a_sweep_checks_jobs_at_once_and_one_failure_stops_no_other(rig: Rig):
    now = now_ms()
    for job_id in ("a", "b", "c"):
        await rig.running(job_id, next_check_at=now)
        await rig.parts.add_promise(job_id)
        rig.backend.found[job_id] = DONE
    in_flight: set[str] = set()
    together = asyncio.Event()

    async def before(job: Job) -> None:
        if job.id == "b":
            raise RuntimeError("the backend broke")
        in_flight.add(job.id)
        if in_flight == {"a", "c"}:
            together.set()
        await asyncio.wait_for(together.wait(), 2)  # only if checks run concurrently

    rig.backend.before = before
    with logs_of("tether") as logs:
        await rig.watchdog.sweep(now)

    assert [(await rig.parts.row(j)).state for j in "abc"] == ["succeeded", "running", "succeeded"]
    assert (
        "WARNING watchdog: job b: backend 'checked': check_status raised RuntimeError" in logs.lines
    )


async def test_backends_slow_to_answer_hold_up_no_deadline_and_no_next_sweep(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
):
    """More slow status checks than may run at once: the sweep goes on after
    `SWEEP_WAIT`, the deadline due with them is met at once, a later sweep
    asks no backend again about a job still being asked about, and each slow
    check ends the job when its answer comes."""
    monkeypatch.setattr(core.watchdog, "SWEEP_WAIT", 0.2)
    now = now_ms()
    slow = [f"slow-{n}" for n in range(core.watchdog.WATCHDOG_CONCURRENCY + 2)]
    for job_id in slow:
        await rig.running(job_id, next_check_at=now)
        await rig.parts.add_promise(job_id)
        rig.backend.found[job_id] = DONE
    late = await rig.parts.add_job("late", backend="checked", timeout=0.001)
    await rig.parts.add_promise("late")
    answer = asyncio.Event()

    async def before(job: Job) -> None:
        await answer.wait()

    rig.backend.before = before
    at = max(now, late.deadline)
    started = asyncio.get_running_loop().time()
    assert await rig.watchdog.sweep(at) == len(slow) + 1
    assert asyncio.get_running_loop().time() - started < 2
    assert (await rig.parts.row("late")).state == "timed_out"
    asked = len(rig.backend.asked)
    assert asked == core.watchdog.WATCHDOG_CONCURRENCY  # the rest wait for a slot
    for job in rig.backend.asked:  # due again, as a sweep an hour on would find them
        await rig.parts.jobs.db.execute(
            "UPDATE tether_jobs SET next_check_at = ? WHERE id = ?", (at, job.id)
        )
    assert await rig.watchdog.sweep(at) == 0  # no second look while the first goes on
    assert len(rig.backend.asked) == asked
    answer.set()
    await asyncio.wait_for(asyncio.gather(*rig.watchdog._looking.values()), 5)
    assert {(await rig.parts.row(j)).state for j in slow} == {"succeeded"}
    assert len(rig.backend.asked) == len(slow)


async def test_a_heartbeat_miss_waits_for_no_slot_its_backends_slow_checks_hold(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(core.watchdog, "SWEEP_WAIT", 0.2)
    now = now_ms()
    for n in range(core.watchdog.WATCHDOG_CONCURRENCY):
        await rig.running(f"slow-{n}", next_check_at=now)
    rec = await beating(rig)  # "j", its heartbeat due now, its check an hour on
    answer = asyncio.Event()

    async def before(job: Job) -> None:
        if job.id != "j":
            await answer.wait()

    rig.backend.before = before
    rig.backend.found["j"] = Running()
    await rig.watchdog.sweep(max(now, rec.heartbeat_due or now))
    assert (await history(rig))[-1][0] == "heartbeat_missed"  # asked, not queued
    answer.set()
    await asyncio.wait_for(asyncio.gather(*rig.watchdog._looking.values()), 5)


async def test_a_look_that_waited_for_a_slot_plans_its_next_check_from_when_it_ran(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
):
    """One slot, two checks due: the second asks its backend only once the
    first answered, 0.3 s on; its next check is planned from then, not from
    the sweep's `now` (which would bring it that much early)."""
    monkeypatch.setattr(core.watchdog, "WATCHDOG_CONCURRENCY", 1)
    monkeypatch.setattr(core.watchdog, "SWEEP_WAIT", 0.05)
    now = now_ms()
    await rig.running("first", next_check_at=now - 1)
    await rig.running("second", next_check_at=now)
    answer = asyncio.Event()

    async def before(job: Job) -> None:
        if job.id == "first":
            await answer.wait()

    rig.backend.before = before
    assert await rig.watchdog.sweep(now) == 2
    assert [job.id for job in rig.backend.asked] == ["first"]  # the second waits for the slot
    await asyncio.sleep(0.3)
    freed = now_ms()
    answer.set()
    await asyncio.wait_for(asyncio.gather(*rig.watchdog._looking.values()), 5)
    assert [job.id for job in rig.backend.asked] == ["first", "second"]
    assert (await rig.parts.row("second")).next_check_at >= freed + 2000  # interval: 2 s


async def test_a_deadline_whose_runs_cancel_hangs_holds_up_no_sweep_and_is_given_up(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
):
    """Jobs whose waits the store timed out while no service was up, their
    workflows over: each deadline's look ends its job and then asks the
    backend to stop the run, whose `cancel` hangs. The sweep goes on and the
    jobs end `timed_out` at once; the cancels take no check slot (a finish
    queued for one would be lost if the service stopped meanwhile), and each
    is given up after `CANCEL_TIMEOUT`, filed as `cancel_failed`."""
    monkeypatch.setattr(core.watchdog, "WATCHDOG_CONCURRENCY", 1)
    monkeypatch.setattr(core.watchdog, "SWEEP_WAIT", 0.05)
    monkeypatch.setattr(core.steps, "CANCEL_TIMEOUT", 0.3)
    parts = rig.parts
    signer = CallbackSigner("test-secret", "http://t")
    steps = JobSteps(parts.settings, rig.watchdog.plugins, parts.jobs, signer, parts.settler)

    async def finish_orphan(rec: JobRecord) -> None:  # as the service wires it
        await steps.finish(rec.id, {"status": rec.state}, rec.attempt)

    parts.settler.on_orphan = finish_orphan
    for job_id in ("a", "b"):
        await parts.add_job(job_id, backend="checked", state="running", external={"run": job_id})
        await parts.add_promise(job_id, timeout_ms=1)
    await asyncio.sleep(0.05)  # the store timed both waits out

    async def hangs(job: Job) -> None:
        await asyncio.sleep(60)

    rig.backend.stopping = hangs
    started = asyncio.get_running_loop().time()
    assert await rig.watchdog.sweep(now_ms() + HOUR) == 2
    assert asyncio.get_running_loop().time() - started < 1
    assert [(await parts.row(j)).state for j in "ab"] == ["timed_out", "timed_out"]
    await asyncio.wait_for(asyncio.gather(*rig.watchdog._looking.values()), 5)
    assert sorted(job.id for job in rig.backend.stopped) == ["a", "b"]
    for job_id in "ab":
        failed = [d for t, d in await history(rig, job_id) if t == "cancel_failed"]
        assert failed == [
            {
                "tries": 1,
                "error": {"type": "TimeoutError", "message": "no answer within 0.3 s"},
                "external": {"run": job_id},
            }
        ]


async def test_a_status_check_that_does_not_answer_in_time_is_given_up_and_logged(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(core.watchdog, "CHECK_TIMEOUT", 0.05)
    now = now_ms()
    await rig.running("hung", next_check_at=now)

    async def before(job: Job) -> None:
        await asyncio.sleep(10)

    rig.backend.before = before
    with logs_of("tether") as logs:
        await rig.watchdog.sweep(now)
    assert logs.lines == [
        "WARNING watchdog: job hung: backend 'checked': check_status did not answer within 0.05 s"
    ]
    row = await rig.parts.row("hung")
    assert row.state == "running" and now + 2000 <= row.next_check_at <= now_ms() + 2000


async def test_stop_ends_the_looks_still_under_way(rig: Rig, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(core.watchdog, "SWEEP_WAIT", 0.05)
    now = now_ms()
    await rig.running("hung", next_check_at=now)
    ended = asyncio.Event()

    async def before(job: Job) -> None:
        try:
            await asyncio.sleep(10)
        finally:
            ended.set()

    rig.backend.before = before
    await rig.watchdog.sweep(now)
    await rig.watchdog.stop()
    assert ended.is_set() and not rig.watchdog._looking


async def test_a_check_the_store_refused_is_logged_with_its_status_only(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
):
    """The run ended, and the store refuses the settle (a Resonate server's
    `ServerError`): the log says its status, not its words."""
    now = now_ms()
    await rig.running("s", next_check_at=now)
    await rig.parts.add_promise("s")
    rig.backend.found["s"] = DONE

    async def refuse(*args: Any, **kwargs: Any) -> Any:
        raise ServerError(401, "unauthorized: what the server says may hold anything")

    monkeypatch.setattr(rig.watchdog.settler, "settle", refuse)
    with logs_of("tether") as logs:
        await rig.watchdog.sweep(now)
    assert logs.lines == ["WARNING watchdog: job s: the store answered status 401"]


@pytest.mark.parametrize("salt", [None, "s4lt"])
async def test_a_check_a_backend_refused_is_logged_in_its_words_without_a_token(
    rig: Rig, salt: str | None, caplog: pytest.LogCaptureFixture
):
    now = now_ms()
    await rig.running("d", next_check_at=now)
    # attempt 2, and a salt when the id was used before: the job's own tokens
    await rig.parts.jobs.db.execute(
        "UPDATE tether_jobs SET attempt = 2, salt = ? WHERE id = 'd'", (salt,)
    )
    signer = CallbackSigner("test-secret", "http://t")
    rig.watchdog.settler.tokens = signer.job_tokens
    url = signer.url(callback_promise_id("d", 2), salt)

    async def before(job: Job) -> None:
        raise BackendError(f"GET h answered 501 (asked about {url})")

    rig.backend.before = before
    with logs_of("tether") as logs:
        await rig.watchdog.sweep(now)

    said = "WARNING watchdog: job d: backend 'checked': check_status raised BackendError: GET h"
    said += " answered 501 (asked about"
    assert logs.lines == [f"{said} http://t/callbacks/d~2%3A1?token=***)"], logs.lines
    assert [getattr(r, "job_id", None) for r in caplog.records] == ["d"]


@pytest.mark.parametrize(
    ("retry_after", "next_in"),
    [
        (30, 30_000),  # a throttled check: not asked again sooner than it said
        (1, 2_000),  # sooner than the interval's: the interval
        (None, 2_000),
        (86_400, 3_600_000),  # at most the hour a plugin's bug gets
    ],
)
@pytest.mark.parametrize("interval", [2.0, 7200.0])  # (past the hour: never sooner than planned)
async def test_a_check_refused_with_a_retry_after_comes_no_sooner(
    rig: Rig, retry_after: float | None, next_in: int, interval: float
):
    """A review (2026-12-06): a job checked every second was checked 6 times
    in 20 s through Databricks' `Retry-After: 30`."""
    now = now_ms()
    await rig.running("d", next_check_at=now, params={"interval": interval})
    next_in = max(next_in, int(interval * 1000))

    async def before(job: Job) -> None:
        raise BackendError("GET h answered 429", retryable=True, retry_after=retry_after)

    rig.backend.before = before
    with logs_of("tether"):
        await rig.watchdog.sweep(now)
    later = (await rig.parts.row("d")).next_check_at
    assert later is not None and 0 <= later - (now + next_in) < 1000  # (the look's own now)
    assert len(rig.backend.asked) == 1


async def test_a_check_refused_is_logged_in_its_words_by_a_process_without_tokens(rig: Rig):
    now = now_ms()
    await rig.running("d", next_check_at=now)
    rig.watchdog.settler.tokens = None

    async def before(job: Job) -> None:
        raise BackendError("GET h answered 501")

    rig.backend.before = before
    with logs_of("tether") as logs:
        await rig.watchdog.sweep(now)
    assert logs.lines == [
        "WARNING watchdog: job d: backend 'checked': check_status raised BackendError:"
        " GET h answered 501"
    ]


async def test_a_check_whose_backend_raises_cancelled_error_of_its_own_is_a_failed_check(
    rig: Rig,
):
    """A `CancelledError` that `check_status` raises (the look is not being
    cancelled) ended the look silently: no log line, no event (found by a
    QA pass). It is a failed check like any other: logged naming the
    backend, the method and the type, filed, the next check as planned."""
    now = now_ms()
    await rig.running("c", next_check_at=now)

    async def before(job: Job) -> None:
        raise asyncio.CancelledError

    rig.backend.before = before
    with logs_of("tether") as logs:
        await rig.watchdog.sweep(now)
    assert logs.lines == [
        "WARNING watchdog: job c: backend 'checked': check_status raised CancelledError"
    ]
    assert await history(rig, "c") == [
        ("status_check", {"said": "error", "error_type": "CancelledError"})
    ]
    row = await rig.parts.row("c")
    assert row.state == "running" and now + 2000 <= row.next_check_at <= now_ms() + 2000


@pytest.mark.parametrize("exit_", [SystemExit(3), KeyboardInterrupt()])
async def test_a_check_whose_backend_exits_is_a_failed_check_not_a_stopped_service(
    rig: Rig, exit_: BaseException
):
    """A plugin's `sys.exit` (or a `KeyboardInterrupt` of its own) in
    `check_status` left the look's task and stopped the event loop, and so
    the service (found by a review). It is a failed check like any other."""
    now = now_ms()
    await rig.running("c", next_check_at=now)

    async def before(job: Job) -> None:
        raise exit_

    rig.backend.before = before
    with logs_of("tether") as logs:
        await rig.watchdog.sweep(now)
    name = type(exit_).__name__
    assert logs.lines == [f"WARNING watchdog: job c: backend 'checked': check_status raised {name}"]
    assert await history(rig, "c") == [("status_check", {"said": "error", "error_type": name})]
    assert (await rig.parts.row("c")).state == "running"


class Odd:
    """An answer of a type `check_status` may not give."""


WRONG_ANSWERS = [
    ({"status": "succeeded", "token": "s3cret-token"}, "a dict, not Outcome or Running or None"),
    ("succeeded s3cret-token", "a str, not Outcome or Running or None"),
    (Odd, "the class Odd, not Outcome or Running or None"),
    (Odd(), "a Odd, not Outcome or Running or None"),
    # fields of the wrong type, on purpose:
    (Outcome(status="s3cret-token"), "a malformed Outcome (a field of another type)"),  # type: ignore[arg-type]
    (Running(external=["s3cret-token"]), "a malformed Running (a field of another type)"),  # type: ignore[arg-type]
    # values JSON cannot write (a `TypeError` at every interval, and no event):
    (
        Outcome(status="succeeded", result={"o": object()}),
        "a malformed Outcome (its result is not JSON: TypeError)",
    ),
    (
        Running(progress={"o": object()}),
        "a malformed Running (its progress is not JSON: TypeError)",
    ),
]
"""What a backend's `check_status` may wrongly return, and how the log says it."""


@pytest.mark.parametrize(("answer", "kind"), WRONG_ANSWERS)
async def test_a_check_answered_with_a_wrong_type_is_logged_by_its_type_alone(
    rig: Rig, answer: Any, kind: str, caplog: pytest.LogCaptureFixture
):
    """A `check_status` that returns none of its answers (an `Outcome`,
    `Running` or None) is a failed check, as one that raises: one line
    naming the backend and the type it returned, never its value (it may
    hold a secret); the job waits on, its next check as planned. It was
    logged `watchdog: job c: AttributeError`."""
    now = now_ms()
    await rig.running("c", next_check_at=now)
    await rig.parts.add_promise("c")
    rig.backend.found["c"] = answer
    with logs_of("tether") as logs:
        await rig.watchdog.sweep(now)
    said = f"WARNING watchdog: job c: backend 'checked': check_status returned {kind}"
    assert logs.lines == [said]
    assert [getattr(r, "job_id", None) for r in caplog.records] == ["c"]
    row = await rig.parts.row("c")
    assert row.state == "running" and now + 2000 <= row.next_check_at <= now_ms() + 2000
    said_error = {"said": "error", "error_type": "TypeError"}
    assert await history(rig, "c") == [("status_check", said_error)]  # as a raise's
    assert "s3cret" not in caplog.text and "s3cret" not in repr(await history(rig, "c"))


def interval_raises(params: CheckParams) -> Any:
    raise RuntimeError("no interval: s3cret-token")


@pytest.mark.parametrize(
    ("interval", "said"),
    [
        (interval_raises, "raised RuntimeError"),
        (lambda params: "abc", "returned a str"),
        (lambda params: -1, "returned -1"),
        (lambda params: True, "returned True"),
        (lambda params: float("nan"), "returned nan"),
    ],
)
async def test_a_check_interval_that_breaks_at_a_later_check_asks_again_an_hour_on(
    rig: Rig, interval: Callable[[CheckParams], Any], said: str, caplog: pytest.LogCaptureFixture
):
    """`check_interval` is asked again at each routine check, to plan the
    next. One that raised or answered no number of seconds there was
    logged at every sweep (`watchdog: job c: RuntimeError`), the job due
    for good (found by a QA pass); then its checks ended for good, even
    once the plugin was fixed (found by a review). Now it is guarded as at
    the trigger: one warning naming the backend, the due check made, and
    the next an hour on, when a plugin fixed meanwhile plans again."""
    now = now_ms()
    await rig.running("c", next_check_at=now, timeout=86400)
    rig.backend.interval = interval
    with logs_of("tether") as logs:
        await rig.watchdog.sweep(now)
        await rig.watchdog.sweep(now_ms())  # not due again: not logged again
    if said.startswith("returned"):
        said += ", not a number of seconds (or None)"
    assert logs.lines == [
        f"WARNING job c: backend 'checked': check_interval {said};"
        " the job is looked at again in 3600 s"
    ]
    assert [getattr(r, "job_id", None) for r in caplog.records] == ["c"]
    assert [job.id for job in rig.backend.asked] == ["c"]
    row = await rig.parts.row("c")
    assert row.state == "running" and row.next_check_at is not None
    # an hour, not backed off with the job's age (a review found 1 to 10 hours)
    assert now + 3_600_000 <= row.next_check_at <= now_ms() + 3_600_000
    assert "s3cret" not in caplog.text
    rig.backend.interval = lambda params: 5  # fixed and redeployed
    later = row.next_check_at
    with logs_of("tether") as logs:
        await rig.watchdog.sweep(later)
    assert logs.lines == []
    assert [job.id for job in rig.backend.asked] == ["c", "c"]
    row = await rig.parts.row("c")
    assert row.next_check_at is not None and later + 5000 <= row.next_check_at


class ExitingParams(msgspec.Struct):
    """A params type whose own checks call `sys.exit` (a plugin's bug)."""

    interval: float | None = 2.0

    def __post_init__(self) -> None:
        raise SystemExit("s3cret-token")


@pytest.mark.parametrize("how", ["exits", "unfit"])
async def test_stored_params_its_type_cannot_read_are_one_warning_and_a_look_an_hour_on(
    rig: Rig, how: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    """Params stored before a release tightened the type stayed due, looked
    at every sweep (found by a QA pass); a `SystemExit` of the type's own
    checks left the look's task and stopped the service (found by a review).
    Either is one warning by its type, and the next look an hour on."""
    now = now_ms()
    params = {"interval": "soon"} if how == "unfit" else {}
    await rig.running("c", next_check_at=now, timeout=86400, params=params)
    if how == "exits":
        monkeypatch.setattr(rig.backend, "params_type", ExitingParams, raising=False)
    with logs_of("tether") as logs:
        await rig.watchdog.sweep(now)
        await rig.watchdog.sweep(now_ms())  # not due again: not logged again
    assert logs.lines == [
        "WARNING watchdog: job c: backend 'checked': its stored params could not be read with"
        " its params_type; no status check; looked at again in 3600 s"
    ]
    assert rig.backend.asked == []
    row = await rig.parts.row("c")
    assert row.state == "running" and row.next_check_at is not None
    assert now + 3_600_000 <= row.next_check_at <= now_ms() + 3_600_000
    assert "s3cret" not in caplog.text


async def test_a_check_interval_of_none_at_a_later_check_ends_the_checks(rig: Rig):
    """None (or 0) at a routine check is a plugin's valid answer: no more
    routine checks, and nothing logged."""
    now = now_ms()
    await rig.running("c", next_check_at=now)
    rig.backend.interval = lambda params: None
    with logs_of("tether") as logs:
        await rig.watchdog.sweep(now)
    assert logs.lines == [] and rig.backend.asked == []
    assert (await rig.parts.row("c")).next_check_at is None


async def test_a_check_interval_past_any_job_at_a_later_check_is_cut_to_the_longest_timeout(
    rig: Rig,
):
    """1e308 seconds: its time in ms overflowed (`OverflowError`, logged at
    every sweep, the job never checked again). Cut to `max_timeout`, as at
    the trigger: the check goes on, the next one that far on."""
    now = now_ms()
    await rig.running("c", next_check_at=now)
    rig.backend.interval = lambda params: 1e308
    with logs_of("tether") as logs:
        await rig.watchdog.sweep(now)
    assert logs.lines == []
    assert [job.id for job in rig.backend.asked] == ["c"]
    longest = int(rig.parts.settings.max_timeout * 1000)
    row = await rig.parts.row("c")
    assert row.next_check_at is not None
    assert now + longest <= row.next_check_at <= now_ms() + longest


async def test_a_failed_status_check_is_filed_once_a_minute_with_its_repeats(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
):
    """A routine check that raised was logged only, where the history
    promised a `status_check` `said: error` (found by an exploratory QA
    pass). It is filed, at most once a minute per job, attempt and error
    type, the next one filed counting those left out; the log says why."""
    import core.callbacks

    now = now_ms()
    await rig.running("c", next_check_at=now)
    await rig.parts.add_promise("c")

    async def down(job: Job) -> None:
        raise BackendError("GET 127.0.0.1:9 answered 503", retryable=True)

    rig.backend.before = down
    with logs_of("tether") as logs:
        for _ in range(3):
            row = await rig.parts.row("c")
            assert row.next_check_at is not None
            await rig.watchdog.look_at(row, row.next_check_at)
        monkeypatch.setattr(core.callbacks, "REPEAT_EVENT_EVERY", 0.0)  # a minute on
        row = await rig.parts.row("c")
        assert row.next_check_at is not None
        await rig.watchdog.look_at(row, row.next_check_at)
    error = {"said": "error", "error_type": "BackendError"}
    assert await history(rig, "c") == [
        ("status_check", error),
        ("status_check", {**error, "repeats": 2}),
    ]
    assert logs.lines[0] == (
        "WARNING watchdog: job c: backend 'checked': check_status raised BackendError:"
        " GET 127.0.0.1:9 answered 503"
    )
    assert (await rig.parts.row("c")).state == "running"


async def test_checks_that_found_the_run_going_are_filed_when_their_answer_changes(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
):
    """Every check that found the run going was filed: one every 0.1 s
    filed 3,600 events an hour, the history's bound in 17 minutes (found by
    a QA pass). The same answer is filed once a minute, another one 10 s
    after the last filed, each with the `repeats` left out since; what the
    checks learnt of the run (`external`) is kept from each."""
    import core.callbacks

    now = now_ms()
    await rig.running("c", next_check_at=now)
    await rig.parts.add_promise("c")

    async def check(found: Running | None) -> None:
        rig.backend.found["c"] = found
        row = await rig.parts.row("c")
        assert row.next_check_at is not None
        await rig.watchdog.look_at(row, row.next_check_at)

    for n in range(3):  # the same answer
        await check(Running(progress={"pct": 0}, external={"stage": n}))
    assert (await rig.parts.row("c")).external == {"run": "c", "stage": 2}
    await check(Running(progress={"pct": 5}))  # another, but within 10 s
    monkeypatch.setattr(core.callbacks, "GOING_CHANGED_EVERY", 0.0)  # 10 s on
    await check(Running(progress={"pct": 5}))  # the same as the one left out
    await check(Running(progress={"pct": 5}))  # the same as the last filed
    await check(None)  # cannot tell
    monkeypatch.setattr(core.callbacks, "REPEAT_EVENT_EVERY", 0.0)  # a minute on
    await check(None)
    assert await history(rig, "c") == [
        ("status_check", {"said": "running", "progress": {"pct": 0}}),
        ("status_check", {"said": "running", "progress": {"pct": 5}, "repeats": 3}),
        ("status_check", {"said": "unknown", "repeats": 1}),
        ("status_check", {"said": "unknown"}),
    ]


async def test_a_status_checks_outcome_keeps_no_token_of_a_retried_salted_job(rig: Rig):
    now = now_ms()
    await rig.running("s", next_check_at=now)
    await rig.parts.jobs.db.execute(
        "UPDATE tether_jobs SET attempt = 2, salt = 's4lt' WHERE id = 's'", ()
    )
    await rig.parts.resonate.promises.create(
        callback_promise_id("s", 2), now + 60_000, Value(data=None), {}
    )
    signer = CallbackSigner("test-secret", "http://t")
    rig.watchdog.settler.tokens = signer.job_tokens
    url = signer.url(callback_promise_id("s", 2), "s4lt")
    rig.backend.found["s"] = Outcome(
        status="failed", error=ErrorInfo(message=f"502 for url: {url}", type="x")
    )
    await rig.watchdog.sweep(now)
    rec = await rig.parts.row("s")
    assert (rec.state, rec.attempt) == ("failed", 2)
    assert rec.error == ErrorInfo(
        message="502 for url: http://t/callbacks/s~2%3A1?token=***", type="x"
    )


async def test_a_sleep_ends_on_time_whatever_the_wall_clock_does(rig: Rig, monkeypatch):
    """The wall clock stepped back an hour during the watchdog's sleep, then
    set right: the sleep, kept on the wall clock, lasted the hour (heartbeats
    unchecked meanwhile; found by a QA pass). It ends on the monotonic
    clock's time too."""
    step = {"ms": 0}
    monkeypatch.setattr(core.watchdog, "now_ms", lambda: now_ms() + step["ms"])

    async def step_back_then_right() -> None:
        await asyncio.sleep(0.05)
        step["ms"] = -3_600_000
        rig.watchdog._wake.set()  # a look during the step: the sleep starts again
        await asyncio.sleep(0.05)
        step["ms"] = 0

    began = time.monotonic()
    stepping = asyncio.create_task(step_back_then_right())
    await asyncio.wait_for(rig.watchdog._sleep(0.3), 5)
    await stepping
    assert 0.29 <= time.monotonic() - began < 1.0


async def test_the_watchdog_runs_sweeps_until_stopped():
    async with open_parts(watchdog_interval=0.02) as parts:
        rig = make_rig(parts)
        await rig.parts.add_job("j", backend="checked", timeout=0.05)
        await rig.parts.add_promise("j")
        rig.watchdog.start()
        assert rig.watchdog._task is not None
        assert rig.watchdog._task.get_name() == "tether-watchdog"
        try:
            for _ in range(200):
                if (await parts.row("j")).state == "timed_out":
                    break
                await asyncio.sleep(0.02)
            assert (await parts.row("j")).state == "timed_out"
        finally:
            await rig.watchdog.stop()
        assert rig.watchdog._task is not None and rig.watchdog._task.done()
        await rig.watchdog.stop()  # stopping twice is fine


async def test_no_watchdog_runs_with_a_zero_interval(rig: Rig):
    rig.watchdog.start()
    assert rig.watchdog._task is None
    await rig.watchdog.stop()


async def test_a_sweep_that_fails_is_logged_and_the_next_one_runs(monkeypatch):
    async with open_parts(watchdog_interval=0.01) as parts:
        rig = make_rig(parts)
        calls: list[int] = []
        real = parts.jobs.due

        async def due(now: int, limit: int) -> list[JobRecord]:
            calls.append(limit)
            if len(calls) == 1:
                raise OSError("disk")
            return await real(now, limit)

        monkeypatch.setattr(parts.jobs, "due", due)
        with logs_of("tether") as logs:
            rig.watchdog.start()
            try:
                for _ in range(200):
                    if len(calls) >= 3:
                        break
                    await asyncio.sleep(0.01)
            finally:
                await rig.watchdog.stop()
        assert len(calls) >= 3 and set(calls) == {core.watchdog.WATCHDOG_BATCH}
        assert logs.lines.count("WARNING watchdog: the store did not answer: OSError") == 1


async def test_the_watchdog_applies_retention_once_an_hour(monkeypatch):
    """Retention runs on the first sweep, then not again within `GC_EVERY`."""
    async with open_parts(watchdog_interval=0.01, retention=MIN_RETENTION) as parts:
        rig = make_rig(parts)
        await parts.add_job("old", backend="checked", timeout=3600)
        await parts.jobs.finish("old", DONE, now_ms() - 2 * DAY)
        runs: list[float] = []
        real = core.watchdog.collect_garbage

        async def counting(store: Any, older_than: float) -> tuple[int, int]:
            runs.append(older_than)
            return await real(store, older_than)

        monkeypatch.setattr(core.watchdog, "collect_garbage", counting)
        swept: list[int] = []
        sweep = rig.watchdog.sweep

        async def sweeps(now: int) -> None:
            swept.append(now)
            await sweep(now)

        monkeypatch.setattr(rig.watchdog, "sweep", sweeps)
        rig.watchdog.start()
        try:
            for _ in range(300):
                if len(swept) >= 5:
                    break
                await asyncio.sleep(0.01)
        finally:
            await rig.watchdog.stop()
        assert runs == [MIN_RETENTION]
        assert len(swept) >= 5
        assert await parts.jobs.get("old") is None


async def test_retention_that_fails_is_logged_and_sweeps_go_on(monkeypatch):
    async with open_parts(watchdog_interval=0.01, retention=MIN_RETENTION) as parts:
        # a store that refuses (Postgres without resonate.gc, or a user that may not run it)
        async def refused(older_than_ms: int, ids: Any = None) -> int:
            raise InvalidRequest("resonate.gc failed: permission denied for table promises")

        monkeypatch.setattr(parts.store, "delete_promises", refused)
        plugin = Plugin()
        plugins = Plugins(make_plugin_manager(builtins=False, entry_points=False, extra=[plugin]))
        watchdog = Watchdog(parts.settings, plugins, parts.store, parts.settler)
        await parts.add_job("j", backend="checked", timeout=0.05)
        await parts.add_promise("j")
        with logs_of("tether") as logs:
            watchdog.start()
            try:
                for _ in range(300):
                    if (await parts.row("j")).state == "timed_out":
                        break
                    await asyncio.sleep(0.01)
            finally:
                await watchdog.stop()
        assert (await parts.row("j")).state == "timed_out"
        assert logs.lines[0] == (
            "WARNING retention: resonate.gc failed: permission denied for table promises"
        )
        assert sum(line.startswith("WARNING retention") for line in logs.lines) == 1


async def test_retention_that_breaks_is_logged_by_the_error_type(monkeypatch):
    async with open_parts(watchdog_interval=0.01, retention=MIN_RETENTION) as parts:
        rig = make_rig(parts)

        async def broken(store: Any, older_than: float) -> tuple[int, int]:
            raise OSError("disk")

        monkeypatch.setattr(core.watchdog, "collect_garbage", broken)
        with logs_of("tether") as logs:
            rig.watchdog.start()
            try:
                for _ in range(300):
                    if logs.lines:
                        break
                    await asyncio.sleep(0.01)
            finally:
                await rig.watchdog.stop()
        assert logs.lines == ["WARNING retention: OSError"]


# ── retention ────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    "older_than", [0.0, 60.0, MIN_RETENTION - 1, 1e13, float("inf"), float("nan")]
)
async def test_retention_keeps_finished_jobs_at_least_a_day_and_at_most_a_century(
    rig: Rig, older_than: float
):
    await rig.parts.add_job("old", timeout=3600)
    await rig.parts.jobs.finish("old", DONE, now_ms() - 30 * DAY)
    with pytest.raises(InvalidRequest) as raised:
        await collect_garbage(rig.parts.store, older_than)
    said = "keep finished jobs at least 86400 and at most 3.1536e+09 seconds"
    assert raised.value.message == said
    assert await rig.parts.jobs.get("old") is not None


async def test_retention_deletes_jobs_finished_before_the_cut_off_and_nothing_open(rig: Rig):
    now = now_ms()
    for job_id, finished_ago in (("old", DAY + 60_000), ("recent", DAY - 60_000), ("open", None)):
        await rig.parts.add_job(job_id, timeout=3600)
        if finished_ago is not None:
            await rig.parts.jobs.finish(job_id, DONE, now - finished_ago)
    with logs_of("tether") as logs:
        assert await collect_garbage(rig.parts.store, MIN_RETENTION) == (1, 0)
    assert await rig.parts.jobs.get("old") is None
    assert await rig.parts.jobs.get("recent") is not None
    assert (await rig.parts.row("open")).state == "pending"
    assert logs.lines == ["INFO retention: deleted 1 finished jobs and 0 promises"]


async def test_retention_deletes_jobs_in_batches_and_counts_them_all(rig: Rig, monkeypatch):
    monkeypatch.setattr(core.watchdog, "GC_BATCH", 2)
    for i in range(5):
        await rig.parts.add_job(f"old{i}", timeout=3600)
        await rig.parts.jobs.finish(f"old{i}", DONE, now_ms() - 2 * DAY)
    assert await collect_garbage(rig.parts.store, MIN_RETENTION) == (5, 0)
    assert [await rig.parts.jobs.get(f"old{i}") for i in range(5)] == [None] * 5


async def test_retention_with_nothing_to_delete_logs_nothing(rig: Rig):
    with logs_of("tether") as logs:
        assert await collect_garbage(rig.parts.store, MIN_RETENTION) == (0, 0)
    assert logs.lines == []


async def test_promises_go_an_hour_earlier_than_job_rows(rig: Rig):
    """A job's workflow ends at most `ROOT_GRACE_MS` after the job: its promises
    are deleted with that much more reach, so no job row outlives nothing."""
    await rig.parts.add_job("j", timeout=3600)
    await rig.parts.add_promise("j")
    await rig.parts.settler.settle("j", DONE, by="callback")
    engine = rig.parts.store.connection._engine  # type: ignore[attr-defined]
    real_now = now_ms()

    engine.clock = lambda: real_now + DAY - ROOT_GRACE_MS + 60_000  # the promise: 23 h 1 min old
    with logs_of("tether") as logs:
        jobs, promises = await collect_garbage(rig.parts.store, MIN_RETENTION)
    assert (jobs, promises) == (0, 1)
    assert logs.lines == ["INFO retention: deleted 0 finished jobs and 1 promises"]
    assert await rig.parts.jobs.get("j") is not None  # the row: not a day old yet


async def test_promises_within_the_reach_stay(rig: Rig):
    await rig.parts.add_job("j", timeout=3600)
    await rig.parts.add_promise("j")
    await rig.parts.settler.settle("j", DONE, by="callback")
    engine = rig.parts.store.connection._engine  # type: ignore[attr-defined]
    real_now = now_ms()
    engine.clock = lambda: real_now + DAY - ROOT_GRACE_MS - 60_000  # 22 h 59 min old
    assert await collect_garbage(rig.parts.store, MIN_RETENTION) == (0, 0)
    assert (await rig.parts.promise("j")).state == "resolved"


async def test_when_promises_cannot_be_deleted_no_job_row_goes(rig: Rig, monkeypatch):
    """Promises go first: a store that cannot delete them (it says so with
    `InvalidRequest`) keeps every job row."""
    await rig.parts.add_job("old", timeout=3600)
    await rig.parts.jobs.finish("old", DONE, now_ms() - 30 * DAY)

    async def cannot(older_than_ms: int, ids: Any = None) -> int:
        raise InvalidRequest("this store cannot delete promises")

    monkeypatch.setattr(rig.parts.store, "delete_promises", cannot)
    with pytest.raises(InvalidRequest, match="cannot delete promises"):
        await collect_garbage(rig.parts.store, MIN_RETENTION)
    assert await rig.parts.jobs.get("old") is not None


# ── what the watchdog records and says ───────────────────────────────────────


async def history(rig: Rig, job_id: str = "j") -> list[tuple[str, dict[str, Any]]]:
    _, events, _ = await rig.parts.jobs.history(job_id, 0, 100)
    return [(e.type, e.data) for e in events]


async def test_a_timeout_is_recorded_before_finished_and_logged_with_the_job(rig: Rig):
    rec = await rig.parts.add_job("j", backend="checked", timeout=1.5)
    await rig.parts.add_promise("j")
    with logs_of("tether") as logs:
        await rig.watchdog.look_at(rec, rec.deadline)
    assert (await history(rig))[-2:] == [("timed_out", {"timeout": 1.5}), ("finished", ANY)]
    assert logs.fields() == [("job j timed out", "j", None)]


async def test_a_timeout_that_lost_records_nothing(rig: Rig):
    rec = await rig.parts.add_job("j", backend="checked", timeout=60)
    await rig.parts.add_promise("j")
    await rig.parts.settler.settle("j", DONE, by="callback")
    before = await history(rig)
    await rig.watchdog.look_at(rec, rec.deadline)
    assert await history(rig) == before


async def test_a_stale_look_at_an_earlier_attempt_leaves_the_retried_job_alone(rig: Rig):
    """Read at attempt 1 past its deadline; meanwhile the job ended and was
    retried: the timeout is attempt 1's only."""
    rec = await rig.parts.add_job("j", backend="checked", timeout=60)
    await rig.parts.add_promise("j")
    await rig.parts.settler.settle("j", Outcome(status="failed"), by="callback")
    again = NewEvent("retried", {"previous": {"state": "failed"}})
    assert await rig.parts.jobs.retry("j", 1, now_ms() + 60_000, now_ms(), again)
    await rig.watchdog.look_at(rec, rec.deadline)
    row = await rig.parts.row("j")
    assert (row.attempt, row.state) == (2, "pending")


@pytest.mark.parametrize(
    ("found", "after"),
    [
        # a run that ended is recorded after the end: it may disagree with it
        (Outcome(status="failed"), [("status_check", {"said": "ended", "status": "failed"})]),
        # a run still going (or one that cannot tell) is not
        (None, []),
        (Running(progress=1, external={"state": "UP"}), []),
    ],
)
async def test_a_check_a_callback_overtook_is_recorded_after_the_end_only_if_ended(
    rig: Rig, found: Outcome | Running | None, after: list[tuple[str, Any]]
):
    now = now_ms()
    rec = await rig.running("j", next_check_at=now)
    await rig.parts.add_promise("j")

    async def callback_first(job: Job) -> None:  # the callback comes during the check
        await rig.parts.settler.settle("j", DONE, by="callback")

    rig.backend.before = callback_first
    rig.backend.found["j"] = found
    await rig.watchdog.look_at(rec, now)
    told = await history(rig)
    assert told[told.index(("finished", ANY)) :] == [("finished", ANY), *after]
    assert (await rig.parts.row("j")).external == {"run": "j"}


async def test_a_missed_heartbeat_whose_check_fails_after_the_end_records_nothing(rig: Rig):
    rec = await beating(rig)

    async def callback_then_fail(job: Job) -> None:
        await rig.parts.settler.settle("j", DONE, by="callback")
        raise BackendError("the workspace is down")

    rig.backend.before = callback_then_fail
    await rig.watchdog.heartbeat_missed(rec, now_ms())
    assert (await history(rig))[-1] == ("finished", ANY)


@pytest.mark.parametrize(
    ("found", "said", "external"),
    [
        (None, {"said": "unknown"}, {"run": "j"}),
        (Running(progress={"pct": 40}), {"said": "running", "progress": {"pct": 40}}, {"run": "j"}),
        (
            Running(external={"state": "RUNNING"}),
            {"said": "running"},
            {"run": "j", "state": "RUNNING"},
        ),
    ],
)
async def test_a_check_that_found_the_run_going_is_recorded_with_what_it_learnt(
    rig: Rig, found: Running | None, said: dict[str, Any], external: dict[str, Any]
):
    now = now_ms()
    rec = await rig.running("j", next_check_at=now)
    rig.backend.found["j"] = found
    await rig.watchdog.look_at(rec, now)
    assert (await history(rig))[-1] == ("status_check", said)
    row = await rig.parts.row("j")
    assert (row.state, row.external) == ("running", external)


async def test_a_missed_heartbeat_is_looked_at_before_any_status_check(rig: Rig):
    now = now_ms()
    rec = await rig.running("j", next_check_at=now + 60_000)
    await rig.parts.jobs.db.execute(
        "UPDATE tether_jobs SET heartbeat_timeout = 5, heartbeat_due = ? WHERE id = 'j'", (now,)
    )
    rec = await rig.parts.row("j")
    rig.backend.found["j"] = Running()
    await rig.watchdog.look_at(rec, now)
    assert (await history(rig))[-1] == (
        "heartbeat_missed",
        {"heartbeat_timeout": 5.0, "said": "running"},
    )
    row = await rig.parts.row("j")
    assert (row.state, row.heartbeat_due) == ("running", now + 5000)
    assert row.next_check_at == now + 60_000  # no status check made of it


async def test_a_heartbeat_due_later_is_not_missed(rig: Rig):
    now = now_ms()
    await rig.running("j", next_check_at=now)
    await rig.parts.jobs.db.execute(
        "UPDATE tether_jobs SET heartbeat_timeout = 5, heartbeat_due = ? WHERE id = 'j'",
        (now + 1,),
    )
    await rig.watchdog.look_at(await rig.parts.row("j"), now)
    assert (await rig.parts.row("j")).heartbeat_due == now + 1
    assert (await history(rig))[-1] == ("status_check", {"said": "unknown"})  # checked instead


# ── a missed heartbeat ───────────────────────────────────────────────────────


async def beating(rig: Rig, *, external: bool = True, due_in: int = 0) -> JobRecord:
    """Running job j with a 5 s heartbeat timeout, its heartbeat due `due_in`
    ms from now; `external`: it was triggered (else pending, never started)."""
    now = now_ms()
    if external:
        await rig.running("j", next_check_at=now + 60_000)
    else:
        await rig.parts.add_job("j", backend="checked", timeout=3600)
    await rig.parts.add_promise("j")
    await rig.parts.jobs.db.execute(
        "UPDATE tether_jobs SET heartbeat_timeout = 5, heartbeat_due = ? WHERE id = 'j'",
        (now + due_in,),
    )
    return await rig.parts.row("j")


async def test_a_missed_heartbeat_whose_run_goes_on_learns_what_changed(rig: Rig):
    rec = await beating(rig)
    rig.backend.found["j"] = Running(progress=7, external={"state": "UP"})
    await rig.watchdog.heartbeat_missed(rec, now_ms())
    assert (await history(rig))[-1] == (
        "heartbeat_missed",
        {"heartbeat_timeout": 5.0, "said": "running", "progress": 7},
    )
    row = await rig.parts.row("j")
    assert (row.state, row.external) == ("running", {"run": "j", "state": "UP"})


async def test_a_run_that_stays_silent_is_asked_about_as_its_silence_doubles_then_hourly(
    rig: Rig,
):
    """A run that stopped beating, its backend saying it is going: asked
    about (and filed) after 1, 2, 4, ... s of silence, then hourly, not every
    second: six hours of it are a few dozen requests and events. A heartbeat
    starts the count again."""
    start = (await rig.running("j", next_check_at=now_ms() + DAY, timeout=2 * 86400)).created_at
    await rig.parts.jobs.db.execute(
        "UPDATE tether_jobs SET heartbeat_timeout = 1, heartbeat_due = ? WHERE id = 'j'",
        (start + 1000,),
    )
    rig.backend.found["j"] = Running(progress="RUNNING")

    async def silent_until(end: int) -> list[int]:
        """The looks due before `end`, each made when due: when they were."""
        looks = []
        while (rec := await rig.parts.row("j")).heartbeat_due < end and len(looks) < 100:
            looks.append(rec.heartbeat_due)
            await rig.watchdog.look_at(rec, rec.heartbeat_due)
        return looks

    looks = await silent_until(start + 6 * HOUR)
    seconds = [(at - start) // 1000 for at in looks]
    doubling = [2**n for n in range(13)]  # 1 s to 4096 s: the gap reaches an hour
    assert seconds == [*doubling, *range(4096 + 3600, 6 * 3600, 3600)]
    assert len(rig.backend.asked) == len(looks) == 17
    missed = [d for t, d in await history(rig) if t == "heartbeat_missed"]
    assert missed == [{"heartbeat_timeout": 1.0, "said": "running", "progress": "RUNNING"}] * 17

    beat = looks[-1] + 10_000  # the run beats again, then falls silent again
    assert await rig.parts.jobs.beat("j", 1, beat, None, beat + 1000, 60_000)
    assert [at - beat for at in await silent_until(beat + 10_000)] == [1000, 2000, 4000, 8000]


async def test_a_missed_heartbeat_whose_check_fails_waits_on(rig: Rig):
    rec = await beating(rig)

    async def broken(job: Job) -> None:
        raise RuntimeError("the workspace is down")

    rig.backend.before = broken
    now = now_ms()
    with logs_of("tether") as logs:
        await rig.watchdog.heartbeat_missed(rec, now)
    assert (await history(rig))[-1] == (
        "heartbeat_missed",
        {"heartbeat_timeout": 5.0, "said": "error", "error_type": "RuntimeError"},
    )
    row = await rig.parts.row("j")
    assert (row.state, row.heartbeat_due) == ("running", now + 5000)
    assert logs.fields() == [
        (
            "job j: no heartbeat, and the status check failed:"
            " backend 'checked': check_status raised RuntimeError",
            "j",
            None,
        )
    ]


async def test_a_missed_heartbeat_whose_check_raises_cancelled_error_of_its_own_waits_on(
    rig: Rig,
):
    """As a routine check's: it went up silently, nothing filed."""
    rec = await beating(rig)

    async def cancelled(job: Job) -> None:
        raise asyncio.CancelledError

    rig.backend.before = cancelled
    now = now_ms()
    with logs_of("tether") as logs:
        await rig.watchdog.heartbeat_missed(rec, now)
    assert (await history(rig))[-1] == (
        "heartbeat_missed",
        {"heartbeat_timeout": 5.0, "said": "error", "error_type": "CancelledError"},
    )
    row = await rig.parts.row("j")
    assert (row.state, row.heartbeat_due) == ("running", now + 5000)
    assert logs.lines == [
        "WARNING job j: no heartbeat, and the status check failed:"
        " backend 'checked': check_status raised CancelledError"
    ]


@pytest.mark.parametrize(("answer", "kind"), WRONG_ANSWERS)
async def test_a_missed_heartbeat_whose_check_answers_a_wrong_type_waits_on(
    rig: Rig, answer: Any, kind: str, caplog: pytest.LogCaptureFixture
):
    """An answer of a type `check_status` may not give is a failed check,
    as a raise is: `heartbeat_missed` `said: error` (`error_type`
    `TypeError`, as Python would call it), the job waits on, and one line
    names the backend and the type, never the value. It recorded nothing."""
    rec = await beating(rig)
    rig.backend.found["j"] = answer
    now = now_ms()
    with logs_of("tether") as logs:
        await rig.watchdog.heartbeat_missed(rec, now)
    assert (await history(rig))[-1] == (
        "heartbeat_missed",
        {"heartbeat_timeout": 5.0, "said": "error", "error_type": "TypeError"},
    )
    row = await rig.parts.row("j")
    assert (row.state, row.heartbeat_due) == ("running", now + 5000)
    said = f"backend 'checked': check_status returned {kind}"
    assert logs.fields() == [
        (f"job j: no heartbeat, and the status check failed: {said}", "j", None)
    ]
    assert "s3cret" not in caplog.text


async def test_a_missed_heartbeat_whose_check_hangs_waits_on(rig: Rig, monkeypatch):
    monkeypatch.setattr(core.watchdog, "HEARTBEAT_CHECK_TIMEOUT", 0.05)
    rec = await beating(rig)

    async def hangs(job: Job) -> None:
        await asyncio.sleep(10)

    rig.backend.before = hangs
    await rig.watchdog.heartbeat_missed(rec, now_ms())
    assert (await history(rig))[-1][1] == {
        "heartbeat_timeout": 5.0,
        "said": "error",
        "error_type": "TimeoutError",
    }


@pytest.mark.parametrize("external", [True, False])
async def test_a_missed_heartbeat_nobody_can_explain_times_the_job_out(rig: Rig, external: bool):
    """The backend cannot tell (None), or the job never started (nothing to ask)."""
    rec = await beating(rig, external=external)
    with logs_of("tether") as logs:
        await rig.watchdog.heartbeat_missed(rec, now_ms())
    row = await rig.parts.row("j")
    assert (row.state, row.error) == (
        "timed_out",
        ErrorInfo(
            message="no heartbeat within 5 seconds, and its backend cannot tell whether the"
            " run is still going",
            type="heartbeat_timeout",
        ),
    )
    assert (await history(rig))[-2:] == [
        ("heartbeat_missed", {"heartbeat_timeout": 5.0, "said": "unknown"}),
        ("finished", ANY),
    ]
    value = (await rig.parts.promise("j")).value.data
    assert (value["status"], value["by"]) == ("timed_out", "heartbeat")
    assert logs.fields() == [("job j timed_out (no heartbeat within 5s)", "j", None)]
    assert len(rig.backend.asked) == (1 if external else 0)


async def test_a_missed_heartbeat_of_a_run_that_ended_ends_the_job_so(rig: Rig):
    rec = await beating(rig)
    rig.backend.found["j"] = DONE
    await rig.watchdog.heartbeat_missed(rec, now_ms())
    row = await rig.parts.row("j")
    assert (row.state, row.result) == ("succeeded", {"rows": 3})
    assert (await history(rig))[-2] == (
        "heartbeat_missed",
        {"heartbeat_timeout": 5.0, "said": "ended", "status": "succeeded"},
    )


@pytest.mark.parametrize("found", [None, Running(progress=1)])
async def test_a_missed_heartbeat_that_lost_to_a_callback_records_and_logs_nothing(
    rig: Rig, found: Running | None
):
    """Whatever the backend says: a run still going, told after the job's
    `finished`, is not filed after it either (nor a timeout that lost)."""
    rec = await beating(rig)

    async def callback_first(job: Job) -> None:
        await rig.parts.settler.settle("j", Outcome(status="failed"), by="callback")

    rig.backend.before = callback_first
    rig.backend.found["j"] = found
    with logs_of("tether") as logs:
        await rig.watchdog.heartbeat_missed(rec, now_ms())
    assert (await rig.parts.row("j")).state == "failed"
    assert [t for t, _ in await history(rig)].count("heartbeat_missed") == 0
    assert logs.lines == []


@pytest.mark.parametrize("up_for", [0, 4_000])
async def test_a_process_up_for_less_than_the_timeout_gives_the_run_that_long_from_its_start(
    rig: Rig, up_for: int
):
    """Heartbeats due while no service was up had nowhere to go: the miss is
    moved to `heartbeat_timeout` after this process's start, nothing asked or
    filed; once that has passed it is a miss as any other."""
    rec = await beating(rig, due_in=-60_000)
    now = now_ms()
    rig.watchdog.started = now - up_for
    rig.backend.found["j"] = Running()
    await rig.watchdog.heartbeat_missed(rec, now)
    row = await rig.parts.row("j")
    assert (row.state, row.heartbeat_due) == ("running", now - up_for + 5000)
    assert rig.backend.asked == []
    assert [t for t, _ in await history(rig)].count("heartbeat_missed") == 0
    await rig.watchdog.heartbeat_missed(row, now - up_for + 5000)  # then missed, as ever
    assert [t for t, _ in await history(rig)].count("heartbeat_missed") == 1


async def test_a_miss_due_after_the_start_whose_window_began_before_it_gets_the_grace(rig: Rig):
    """The run's last heartbeat that counted came before this process started,
    and those it sent since the start of the outage had nowhere to go."""
    rec = await beating(rig, due_in=-100)  # its window: 5.1 s ago to 0.1 s ago
    now = now_ms()
    rig.watchdog.started = now - 1000  # up since a second ago
    await rig.watchdog.heartbeat_missed(rec, now)
    assert (await rig.parts.row("j")).heartbeat_due == now - 1000 + 5000
    assert rig.backend.asked == []


async def test_a_miss_whose_window_began_after_this_process_started_is_a_miss_at_once(
    rig: Rig,
):
    """Heartbeats had somewhere to go all that window: no grace."""
    rec = await beating(rig, due_in=-500)  # its window: 5.5 s ago to 0.5 s ago
    rig.watchdog.started = now_ms() - 6000
    rig.backend.found["j"] = Running()
    await rig.watchdog.heartbeat_missed(rec, now_ms())
    assert [t for t, _ in await history(rig)].count("heartbeat_missed") == 1


async def test_a_miss_another_process_or_a_heartbeat_took_is_left_alone(rig: Rig):
    rec = await beating(rig)
    await rig.parts.jobs.db.execute(
        "UPDATE tether_jobs SET heartbeat_due = heartbeat_due + 1 WHERE id = 'j'", ()
    )
    await rig.watchdog.heartbeat_missed(rec, now_ms())
    assert rig.backend.asked == []
    assert [t for t, _ in await history(rig)].count("heartbeat_missed") == 0


async def test_a_check_that_ends_after_a_retry_settles_only_the_attempt_it_asked_about(rig: Rig):
    """Attempt 1's run is checked; a retry starts attempt 2 meanwhile: what the
    backend says of attempt 1's run ends nothing of attempt 2."""
    now = now_ms()
    await rig.running("r", next_check_at=now)
    await rig.parts.add_promise("r")
    rig.backend.found["r"] = DONE

    async def before(job: Job) -> None:
        retried = NewEvent("retried", {"previous": {"state": "failed"}})
        await rig.parts.jobs.end("r", Outcome(status="failed"), now_ms(), attempt=1)
        await rig.parts.jobs.retry("r", 1, now_ms() + 60_000, now_ms(), retried)
        await rig.parts.resonate.promises.create(
            callback_promise_id("r", 2), now_ms() + 60_000, Value(data=None), {}
        )

    rig.backend.before = before
    await rig.watchdog.sweep(now)
    rec = await rig.parts.row("r")
    assert (rec.attempt, rec.state) == (2, "pending")
    second = await rig.parts.resonate.promises.get(callback_promise_id("r", 2))
    assert second.state == "pending"
