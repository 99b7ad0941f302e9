"""A job the watchdog finishes without its workflow (the service was down
past the deadline and the workflow's grace): its run's stop is due in the
job's row (`stop_due`) from the write that ends the job until the write that
files the stop's outcome. Its event stream waits for it; a stop whose
process died before it recorded the outcome is taken over by the watchdog of
one process (a compare-and-set claim) once its lease ran out, and its
outcome is filed once."""

from __future__ import annotations

import asyncio
import functools
import threading
from pathlib import Path
from typing import Any

import pytest
from resonate.error import ServerError
from resonate.types import Value

import core.events
import core.steps
import core.watchdog
from core import workflow
from core.errors import BackendError, StoreUnavailable
from core.events import JobHistory
from core.lease import StopLease
from core.models import ErrorInfo, Job, JobRequest, Outcome
from core.plugins import Plugins, make_plugin_manager
from core.service import Tether
from core.steps import JobSteps
from core.store.embedded import SqliteDriver
from core.store.jobs import JobRecord, NewEvent, now_ms
from core.store.sql import SqlJobIndex
from core.tokens import CallbackSigner
from core.watchdog import MIN_RETENTION, Watchdog, collect_garbage
from tests.conftest import Hit, Receiver, eventually, test_settings
from tests.core.parts import Parts, logs_of, open_parts
from tests.core.test_watchdog import DAY, HOUR, Rig, history, make_rig

TIMED_OUT = Outcome(status="timed_out", error=ErrorInfo(message="late", type="timeout"))


@pytest.fixture(autouse=True)
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(core.events, "FOLLOW_UP_POLL", 0.05)
    monkeypatch.setattr(core.watchdog, "SWEEP_WAIT", 0.05)


def wired(rig: Rig) -> JobSteps:
    """The steps, wired into the settler as the service wires them."""
    parts = rig.parts
    signer = CallbackSigner("test-secret", "http://t")
    steps = JobSteps(parts.settings, rig.watchdog.plugins, parts.jobs, signer, parts.settler)
    parts.settler.on_orphan = steps.finish_orphan
    parts.settler.stop_lease_ms = steps.stop_lease_ms()
    return steps


async def orphan(parts: Parts, job_id: str = "j") -> None:
    """A running job whose wait the store timed out, and no workflow."""
    await parts.add_job(job_id, backend="checked", state="running", external={"run": job_id})
    await parts.add_promise(job_id, timeout_ms=1)
    await asyncio.sleep(0.05)


def recorded_waits(steps: JobSteps) -> list[float]:
    """The waits `steps` makes between tries, recorded instead of slept."""
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    steps.sleep = sleep
    return waits


async def stop_due_at(parts: Parts, due: int, job_id: str = "j") -> JobRecord:
    """A running job with a run, ended `timed_out` with its run's stop due
    at `due`, as a settle of a job no workflow finishes ends it."""
    await parts.add_job(job_id, backend="checked", state="running", external={"run": job_id})
    rec, _ = await parts.jobs.end(job_id, TIMED_OUT, now_ms(), stop_due=due)
    assert rec is not None and rec.stop_due == due
    return rec


async def looks_done(rig: Rig) -> None:
    await asyncio.wait_for(asyncio.gather(*rig.watchdog._looking.values()), 5)


async def _read(stream: Any, seen: list[str]) -> None:
    async for item in stream:
        if item is not None:
            seen.append(item if item == core.events.END else item.type)


async def refuses(job: Job) -> None:
    raise BackendError("the run cannot be stopped now")


def refuses_once_released(rig: Rig) -> asyncio.Event:
    """The backend holds each stop of a run until the event is set, then refuses it."""
    release = asyncio.Event()

    async def refuses_late(job: Job) -> None:
        await release.wait()
        await refuses(job)

    rig.backend.stopping = refuses_late
    return release


async def test_a_stream_waits_for_the_stop_of_a_job_no_workflow_finishes():
    async with open_parts(watchdog_interval=0, trigger_attempts=1) as parts:
        rig = make_rig(parts)
        wired(rig)
        history_ = JobHistory(parts.jobs)
        history_.attempt_running = functools.partial(workflow.attempt_running, parts.resonate)
        await orphan(parts)
        release = refuses_once_released(rig)
        seen: list[str] = []
        reader = asyncio.create_task(_read(await history_.follow("j"), seen))
        began = now_ms()
        await rig.watchdog.sweep(now_ms() + HOUR)  # ends it, and asks the backend to stop the run

        await eventually(lambda: "finished" in seen)
        await asyncio.sleep(0.5)  # ten looks past `finished`: the stop is still under way
        assert "end" not in seen, seen
        row = await parts.row("j")
        assert row.stop_due is not None  # held by this process, for its lease at least
        assert began + parts.settler.stop_lease_ms <= row.stop_due

        release.set()
        await asyncio.wait_for(reader, 5)
        assert seen[-3:] == ["finished", "cancel_failed", "end"], seen
        assert (await parts.row("j")).stop_due is None
        with pytest.raises(ServerError) as raised:  # no stop promise: the row says it
            await parts.resonate.promises.get(workflow.stop_promise_id("j"))
        assert raised.value.code == 404
        await looks_done(rig)


async def test_a_job_whose_end_stops_nothing_has_no_stop_due():
    """No run recorded: its finish stops nothing, and no stream waits for it."""
    async with open_parts(watchdog_interval=0) as parts:
        rig = make_rig(parts)
        finished: list[str] = []

        async def finish_orphan(rec: JobRecord) -> None:
            finished.append(rec.id)

        parts.settler.on_orphan = finish_orphan
        await parts.add_job("p", backend="checked", state="pending")
        await parts.add_promise("p", timeout_ms=1)
        await asyncio.sleep(0.05)
        await rig.watchdog.sweep(now_ms() + HOUR)
        await eventually(lambda: finished == ["p"])
        assert (await parts.row("p")).stop_due is None
        assert not await workflow.attempt_running(parts.resonate, "p", 1)


@pytest.mark.parametrize(
    ("attempts", "within"),
    [(4, 4 * 300 + 1 + 2 + 4 + 60), (1, 300 + 60), (0, 300 + 60), (2000, 86_400)],
)
async def test_a_stop_is_bounded_by_its_tries_at_most_a_day(attempts, within):
    """Every try's cancel and the waits between (`TETHER_TRIGGER_ATTEMPTS`
    has no upper bound: 2000 tries doubled 1 s is past a float, which
    raised `OverflowError` as the service opened)."""
    async with open_parts(trigger_attempts=attempts, trigger_backoff=1.0) as parts:
        signer = CallbackSigner("test-secret", "http://t")
        steps = JobSteps(
            parts.settings, make_rig(parts).watchdog.plugins, parts.jobs, signer, parts.settler
        )
        assert steps.stop_within() == within


async def test_a_stop_its_process_never_recorded_is_redone_once_its_lease_ran_out():
    """The process stopping the run dies mid-stop (its look cancelled, the
    backend's `cancel` unanswered, and no write giving the stop up gets
    through): nothing is filed and the row keeps `stop_due`. No sweep takes
    the stop before the lease runs out; the first after it asks the backend
    again, files the outcome once, and clears it."""
    async with open_parts(watchdog_interval=0, trigger_attempts=1) as parts:
        rig = make_rig(parts)
        wired(rig)
        await orphan(parts)

        async def unreachable(*args: Any) -> bool:
            raise OSError("the store went away")

        parts.jobs.release_stop = unreachable  # type: ignore[method-assign]
        hang = asyncio.Event()

        async def hangs(job: Job) -> None:
            await hang.wait()

        rig.backend.stopping = hangs
        await rig.watchdog.sweep(now_ms() + HOUR)
        await eventually(lambda: len(rig.backend.stopped) == 1)
        for look in rig.watchdog._looking.values():  # the process dies
            look.cancel()
        await asyncio.gather(*rig.watchdog._looking.values(), return_exceptions=True)
        row = await parts.row("j")
        assert (row.state, [t for t, _ in await history(rig)]) == (
            "timed_out",
            ["timed_out", "finished"],
        )
        assert row.stop_due is not None

        rig.backend.stopping = refuses
        assert await rig.watchdog.sweep(row.stop_due - 1) == 0  # still leased: nobody takes it
        assert len(rig.backend.stopped) == 1
        with logs_of("tether") as logs:
            assert await rig.watchdog.sweep(row.stop_due) == 1
            await looks_done(rig)
        assert [job.id for job in rig.backend.stopped] == ["j", "j"]  # asked again
        assert [t for t, _ in await history(rig)] == ["timed_out", "finished", "cancel_failed"]
        assert (await parts.row("j")).stop_due is None
        assert any("stopping it again" in line for line in logs.lines), logs.lines
        assert await rig.watchdog.sweep(now_ms() + 2 * HOUR) == 0  # done: never again
        assert await parts.jobs.next_due(0) is None


async def test_a_stop_cut_short_by_a_shutdown_is_taken_over_by_the_next_sweep():
    """The service stops (SIGTERM: its tasks cancelled) while the backend's
    `cancel` is under way: the stop gives its lease up (`stop_due` becomes
    now) and the cancellation goes on, so the next sweep of any watchdog
    (the restarted service's first) stops the run again, not the lease's
    end (a stream and a retry of the job wait till then)."""
    async with open_parts(watchdog_interval=0, trigger_attempts=1) as parts:
        rig = make_rig(parts)
        steps = wired(rig)
        lease = now_ms() + parts.settler.stop_lease_ms
        rec = await stop_due_at(parts, lease)
        hang = asyncio.Event()

        async def hangs(job: Job) -> None:
            await hang.wait()

        rig.backend.stopping = hangs
        stopping = asyncio.create_task(steps.finish_orphan(rec))
        await eventually(lambda: len(rig.backend.stopped) == 1)
        with logs_of("tether") as logs:
            stopping.cancel()
            with pytest.raises(asyncio.CancelledError):  # not swallowed
                await stopping
        row = await parts.row("j")
        assert row.stop_due is not None and row.stop_due <= now_ms() < lease
        assert [t for t, _ in await history(rig)] == ["finished"]
        assert any("cut short" in line for line in logs.lines), logs.lines

        rig.backend.stopping = refuses
        assert await rig.watchdog.sweep(now_ms()) == 1  # the next sweep, long before the lease
        await looks_done(rig)
        assert [job.id for job in rig.backend.stopped] == ["j", "j"]  # asked again
        assert [t for t, _ in await history(rig)] == ["finished", "cancel_failed"]
        assert (await parts.row("j")).stop_due is None


async def test_a_stop_cut_short_whose_release_hangs_keeps_its_lease(monkeypatch):
    """The write giving the stop up is bounded (`RELEASE_TIMEOUT`): a store
    that does not answer leaves the lease to run out, as a process that
    dies does, and the cancellation goes on."""
    monkeypatch.setattr(core.steps, "RELEASE_TIMEOUT", 0.1)
    async with open_parts(watchdog_interval=0, trigger_attempts=1) as parts:
        rig = make_rig(parts)
        steps = wired(rig)
        lease = now_ms() + parts.settler.stop_lease_ms
        rec = await stop_due_at(parts, lease)
        never = asyncio.Event()

        async def hangs(*args: Any) -> Any:
            await never.wait()

        rig.backend.stopping = hangs
        parts.jobs.release_stop = hangs  # type: ignore[method-assign]
        stopping = asyncio.create_task(steps.finish_orphan(rec))
        await eventually(lambda: len(rig.backend.stopped) == 1)
        with logs_of("tether") as logs:
            stopping.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(stopping, 5)
        assert (await parts.row("j")).stop_due == lease
        assert any("giving it up failed" in line for line in logs.lines), logs.lines


async def test_a_settle_that_ends_a_job_no_workflow_finishes_stops_its_run_in_the_background():
    """An API cancel (or a late callback) ending a job whose wait the store
    timed out, with no workflow: the settle answers once the job's end is
    recorded, its run's stop (`stop_due`) in a task of the service's
    (`Settler.spawn`), not after the backend's `cancel` and its retries.
    The stop's outcome comes later, as an event; the watchdog's own settle
    awaits it (`wait_stop`), in its look."""
    async with open_parts(watchdog_interval=0, trigger_attempts=1) as parts:
        rig = make_rig(parts)
        wired(rig)
        tasks: set[asyncio.Task[None]] = set()

        def spawn(finish: Any) -> None:
            task = asyncio.get_running_loop().create_task(finish)
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        parts.settler.spawn = spawn
        await orphan(parts)
        release = refuses_once_released(rig)
        canceled = Outcome(status="canceled")
        result, rec = await asyncio.wait_for(
            parts.settler.settle("j", canceled, by="cancel", attempt=1), 5
        )
        assert (result, rec.state) == ("gone", "timed_out")  # the store's end, recorded
        assert rec.stop_due is not None and len(tasks) == 1  # the stop under way, apart
        await eventually(lambda: len(rig.backend.stopped) == 1)
        assert (await parts.row("j")).stop_due == rec.stop_due
        release.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        assert [t for t, _ in await history(rig)][-2:] == ["finished", "cancel_failed"]
        assert (await parts.row("j")).stop_due is None

        await orphan(parts, "w")  # the watchdog's: in its look, not apart
        await rig.watchdog.sweep(now_ms() + HOUR)
        await looks_done(rig)
        assert not tasks and [job.id for job in rig.backend.stopped] == ["j", "w"]
        assert (await parts.row("w")).stop_due is None


async def test_of_two_watchdogs_one_claims_a_stop_whose_lease_ran_out():
    """Two processes' sweeps at once find the same stop due: the claim is a
    compare-and-set of `stop_due`, so one of them stops the run, once."""
    async with open_parts(watchdog_interval=0, trigger_attempts=1) as parts:
        rig = make_rig(parts)
        wired(rig)
        other = Watchdog(parts.settings, rig.watchdog.plugins, parts.store, parts.settler)
        rec = await stop_due_at(parts, now_ms() - 1)
        assert rec.stop_due is not None
        rig.backend.stopping = refuses
        now = now_ms()
        await asyncio.gather(rig.watchdog.sweep(now), other.sweep(now))
        looks = [*rig.watchdog._looking.values(), *other._looking.values()]
        await asyncio.wait_for(asyncio.gather(*looks), 5)
        assert [job.id for job in rig.backend.stopped] == ["j"]
        assert [t for t, _ in await history(rig)] == ["finished", "cancel_failed"]
        assert (await parts.row("j")).stop_due is None


async def test_a_stop_taken_over_files_the_outcome_of_the_process_that_took_it():
    """A process that stalled past its lease while stopping the run finds the
    stop taken over when it records the outcome: it files nothing (the
    other process files its own), so the history has one `cancel_failed`."""
    async with open_parts(watchdog_interval=0, trigger_attempts=1) as parts:
        rig = make_rig(parts)
        steps = wired(rig)
        stalled = await stop_due_at(parts, now_ms() - 1)
        assert stalled.stop_due is not None
        taken = await parts.jobs.claim_stop("j", stalled.stop_due, now_ms() + HOUR)
        assert taken is not None
        assert await parts.jobs.claim_stop("j", stalled.stop_due, now_ms() + HOUR) is None
        rig.backend.stopping = refuses
        with logs_of("tether") as logs:
            await steps.finish_orphan(stalled)
        assert [t for t, _ in await history(rig)] == ["finished"]
        assert any("taken over" in line for line in logs.lines), logs.lines
        await steps.finish_orphan(taken)
        assert [t for t, _ in await history(rig)] == ["finished", "cancel_failed"]
        assert (await parts.row("j")).stop_due is None


async def test_a_stop_under_a_lease_tries_no_longer_than_its_bound():
    """A backend that asks to wait longer than the stop's bound leaves (its
    `retry_after` past `stop_within`): the stop under a lease files its
    failure then, rather than renew its lease for an hour; the workflow's
    finish (no lease) waits and tries again as ever."""
    async with open_parts(watchdog_interval=0, trigger_attempts=3, trigger_backoff=1.0) as parts:
        rig = make_rig(parts)
        steps = wired(rig)
        waits = recorded_waits(steps)

        async def throttled(job: Job) -> None:
            raise BackendError("slow down", retryable=True, retry_after=3600.0)

        rig.backend.stopping = throttled
        for job_id in ("leased", "workflow"):
            await parts.add_job(job_id, backend="checked", state="running", external={"run": 1})
        lease = now_ms() + parts.settler.stop_lease_ms
        leased, _ = await parts.jobs.end("leased", TIMED_OUT, now_ms(), stop_due=lease)
        assert leased is not None and leased.stop_due == lease
        await steps.finish_orphan(leased)
        [(_, failed)] = [e for e in await history(rig, "leased") if e[0] == "cancel_failed"]
        assert (failed["tries"], waits) == (1, [])

        await parts.jobs.end("workflow", TIMED_OUT, now_ms())
        await steps.finish("workflow", {"status": "timed_out"})
        [(_, failed)] = [e for e in await history(rig, "workflow") if e[0] == "cancel_failed"]
        assert (failed["tries"], waits) == (3, [3600.0, 3600.0])


async def test_retention_keeps_a_job_whose_runs_stop_is_still_due():
    """Every host down past `TETHER_RETENTION` with a stop left due (its
    process killed mid-stop): the first host back runs retention before its
    first sweep. The job is kept until the stop's outcome is recorded, or
    the run would never be asked to stop again; then it goes as any."""
    async with open_parts(watchdog_interval=0, trigger_attempts=1) as parts:
        rig = make_rig(parts)
        wired(rig)
        await parts.add_job("j", backend="checked", state="running", external={"run": "j"})
        ended_at = now_ms() - 2 * DAY
        rec, _ = await parts.jobs.end("j", TIMED_OUT, ended_at, stop_due=ended_at + HOUR)
        assert rec.stop_due is not None
        assert await collect_garbage(parts.store, MIN_RETENTION) == (0, 0)
        rig.backend.stopping = refuses
        assert await rig.watchdog.sweep(now_ms()) == 1
        await looks_done(rig)
        assert [job.id for job in rig.backend.stopped] == ["j"]
        assert [t for t, _ in await history(rig)] == ["finished", "cancel_failed"]
        assert await collect_garbage(parts.store, MIN_RETENTION) == (1, 0)


async def test_a_stop_left_due_by_an_attempt_an_older_host_retried_stops_nothing_of_the_next():
    """A host of a release before `stop_due` retries the job while attempt
    1's run's stop is still due (it does not see it), after the process
    stopping it died. When that stop falls due again the row is at attempt
    2, here ended by its own workflow (which stops its run, tells the
    plugins and files what it must): taking it for attempt 2's stop would
    ask attempt 2's run to stop again, tell the plugins of attempt 2 twice,
    and file a `cancel_failed` under it. Attempt 1's run is no longer
    recorded: its stop is dropped, and said so in the log."""
    async with open_parts(watchdog_interval=0, trigger_attempts=1) as parts:
        rig = make_rig(parts)
        wired(rig)
        told: list[tuple[str, int]] = []
        rig.watchdog.plugins.job_finished = lambda job: told.append((job.id, job.attempt))  # type: ignore[method-assign]
        await parts.add_job("j", backend="checked", state="running", external={"run": "one"})
        first, _ = await parts.jobs.end("j", TIMED_OUT, now_ms(), stop_due=now_ms() - 1)
        assert first.stop_due is not None
        retried = NewEvent("retried", {"previous": {"state": "timed_out"}, "timeout": 60})
        second = await parts.retry_as_before("j", 1, retried)
        assert second is not None and (second.attempt, second.stop_due) == (2, first.stop_due)
        await parts.jobs.set_external("j", {"run": "two"}, now_ms(), None, attempt=2)
        await parts.jobs.end("j", TIMED_OUT, now_ms(), attempt=2)  # its workflow's finish
        rig.backend.stopping = refuses
        with logs_of("tether") as logs:
            assert await rig.watchdog.sweep(now_ms()) == 1
            await looks_done(rig)
        assert rig.backend.stopped == []  # attempt 2's run: its workflow's to stop
        assert told == []
        assert "cancel_failed" not in [t for t, _ in await history(rig)]
        assert (await parts.row("j")).stop_due is None  # dropped: not found due again
        assert any("attempt 1" in line and "retried" in line for line in logs.lines), logs.lines


async def test_a_stream_waits_for_the_stop_promise_a_host_of_an_earlier_release_made():
    """While releases are mixed, a job no workflow finishes may be ended by
    a host of a release before `stop_due`: no `stop_due`, its stop promise
    (`{root}:stop`) pending while its stop runs. A stream through today's
    host waits for that promise, and shows the stop's `cancel_failed`."""
    async with open_parts(watchdog_interval=0) as parts:
        history_ = JobHistory(parts.jobs)
        history_.attempt_running = functools.partial(workflow.attempt_running, parts.resonate)
        await parts.add_job("j", backend="checked", state="running", external={"run": "j"})
        stop = workflow.stop_promise_id("j")
        await parts.resonate.promises.create(stop, now_ms() + HOUR, Value(data=None), {})
        ended, _ = await parts.jobs.end("j", TIMED_OUT, now_ms())  # the older host's end
        assert ended is not None and ended.stop_due is None
        seen: list[str] = []
        reader = asyncio.create_task(_read(await history_.follow("j"), seen))
        await eventually(lambda: "finished" in seen)
        await asyncio.sleep(0.5)  # ten looks past `finished`: its stop is still under way
        assert "end" not in seen, seen
        failed = NewEvent("cancel_failed", {"tries": 1})
        await parts.jobs.record("j", [failed], now_ms())
        await parts.resonate.promises.resolve(stop, Value(data=None))
        await asyncio.wait_for(reader, 5)
        assert seen[-3:] == ["finished", "cancel_failed", "end"], seen


async def test_the_stops_outcome_is_recorded_through_a_store_that_fails_a_while():
    """Just after the outage that made the orphan the store may still fail
    now and then: the write that files the stop's outcome and clears
    `stop_due` is tried again while the lease lasts, not left to the
    watchdog once the lease ran out (a stream and a retry of the job would
    wait for it the rest of the lease, and the run be asked to stop, and
    the plugins told, a second time)."""
    async with open_parts(watchdog_interval=0, trigger_attempts=1) as parts:
        rig = make_rig(parts)
        steps = wired(rig)
        waits = recorded_waits(steps)
        told: list[str] = []
        rig.watchdog.plugins.job_finished = lambda job: told.append(job.id)  # type: ignore[method-assign]
        stopped = parts.jobs.stopped
        failures: list[Exception] = [OSError("the store went away"), TimeoutError()]

        async def failing(*args: Any) -> JobRecord | None:
            if failures:
                raise failures.pop(0)
            return await stopped(*args)

        parts.jobs.stopped = failing  # type: ignore[method-assign]
        lease = now_ms() + parts.settler.stop_lease_ms
        rec = await stop_due_at(parts, lease)
        rig.backend.stopping = refuses
        with logs_of("tether") as logs:
            await parts.settler.orphaned(rec)
        assert (await parts.row("j")).stop_due is None
        assert [t for t, _ in await history(rig)] == ["finished", "cancel_failed"]
        assert ([job.id for job in rig.backend.stopped], told) == (["j"], ["j"])
        assert waits == [1.0, 2.0]
        assert not any("taken over" in line for line in logs.lines), logs.lines


async def test_a_stop_whose_outcome_the_store_fails_past_a_lease_keeps_its_lease(
    monkeypatch: pytest.MonkeyPatch,
):
    """The write that files the stop's outcome fails for three leases (of 1
    s: room for a loaded machine), while the store still answers the
    lease's renewals (it fails now and then): the lease is renewed between
    the tries, so the outcome is filed by this process, and another
    process's sweeps, all along, find nothing due (the run is asked to stop
    once)."""
    monkeypatch.setattr(core.steps, "RETRY_BACKOFF", 0.05)
    monkeypatch.setattr(core.steps, "RETRY_BACKOFF_MAX", 0.1)
    monkeypatch.setattr(core.steps, "STORE_CALL_TIMEOUT", 0.05)
    async with open_parts(watchdog_interval=0, trigger_attempts=1, task_ttl=1.0) as parts:
        rig = make_rig(parts)
        steps = wired(rig)
        other = Watchdog(parts.settings, rig.watchdog.plugins, parts.store, parts.settler)
        stopped = parts.jobs.stopped
        failing_until = now_ms() + 3000

        async def failing(*args: Any) -> JobRecord | None:
            if now_ms() < failing_until:
                raise OSError("the store went away")
            return await stopped(*args)

        parts.jobs.stopped = failing  # type: ignore[method-assign]
        rec = await stop_due_at(parts, now_ms() + 1000)
        rig.backend.stopping = refuses
        stopping = asyncio.create_task(steps.finish_orphan(rec))
        swept = 0
        while not stopping.done():
            swept += await other.sweep(now_ms())
            await asyncio.sleep(0.05)
        await stopping
        assert swept == 0 and len(rig.backend.stopped) == 1
        assert [t for t, _ in await history(rig)] == ["finished", "cancel_failed"]
        assert (await parts.row("j")).stop_due is None


async def test_a_stop_whose_outcome_the_store_answers_nothing_for_hands_it_over(
    monkeypatch: pytest.MonkeyPatch,
):
    """A store that fails every write (the renewals' too) past the lease:
    the write that files the stop's outcome is tried no longer than the
    lease the row surely holds. A renewal that failed may have been
    applied, but its value does not put the end off: one each try, it
    would put it off for as long as the store fails."""
    monkeypatch.setattr(core.steps, "RETRY_BACKOFF", 0.05)
    monkeypatch.setattr(core.steps, "RETRY_BACKOFF_MAX", 0.1)
    monkeypatch.setattr(core.steps, "STORE_CALL_TIMEOUT", 0.05)
    async with open_parts(watchdog_interval=0, trigger_attempts=1, task_ttl=0.3) as parts:
        rig = make_rig(parts)
        steps = wired(rig)

        async def failing(*args: Any) -> JobRecord | None:
            raise OSError("the store went away")

        rec = await stop_due_at(parts, now_ms() + 300)
        assert rec.stop_due is not None
        rig.backend.stopping = refuses
        parts.jobs.stopped = failing  # type: ignore[method-assign]
        parts.jobs.claim_stop = failing  # type: ignore[method-assign]
        with pytest.raises(StoreUnavailable):  # (not the 3 s: it gave up)
            await asyncio.wait_for(steps.finish_orphan(rec), 3)


async def test_a_service_stopped_mid_stop_leaves_it_to_the_next_sweep_not_the_lease(
    tmp_path: Path, receiver: Receiver
):
    """The service stops (`Tether.close`, as on SIGTERM) while a stop it runs
    apart from any request (`Settler.spawn`) waits for the backend's
    `cancel`: the stop is cancelled and gives its lease up, so the service
    started again asks the backend to stop the run at its first sweep, not
    once the lease has run out."""
    cancels: list[Hit] = []
    release = threading.Event()

    def respond(hit: Hit) -> tuple[int, Any]:
        if hit.path != "/cancel":
            return 202, {"run": "r-1"}
        cancels.append(hit)
        if len(cancels) == 1:  # held while the service stops
            release.wait(20)
        return 200, {}

    receiver.respond = respond
    settings = test_settings(store=f"sqlite:///{tmp_path / 'tether.db'}", trigger_attempts=1)
    plugins = Plugins(make_plugin_manager(entry_points=False))
    params = {"url": receiver.url(), "cancel_url": receiver.url("/cancel")}
    first = await Tether.open(settings, plugins)
    try:
        await first.create_job(JobRequest("http_webhook", params, id="j", timeout=600))

        async def triggered() -> bool:
            rec = await first.jobs.get("j")
            return rec is not None and rec.external is not None

        await eventually(triggered)
        lease = now_ms() + first.settler.stop_lease_ms
        # as the settle of a job no workflow finishes ends it (the store timed it out)
        ended, _ = await first.jobs.end("j", TIMED_OUT, now_ms(), stop_due=lease)
        assert ended is not None and ended.stop_due == lease
        assert first.settler.spawn is not None
        first.settler.spawn(first.settler.orphaned(ended))
        await eventually(lambda: len(cancels) == 1)
    finally:
        with logs_of("tether") as logs:
            await asyncio.wait_for(first.close(), 30)  # the cancel still held
        release.set()
    assert any("cut short" in line for line in logs.lines), logs.lines
    # Read with no service running: the next one's first sweep may come
    # before its `open` returns, and takes the stop again under a new lease.
    driver = SqliteDriver(tmp_path / "tether.db")
    try:
        rec = await SqlJobIndex(driver).get("j")
    finally:
        await driver.close()
    assert rec is not None and rec.stop_due is not None and rec.stop_due < lease

    second = await Tether.open(settings, plugins)
    try:
        await eventually(lambda: len(cancels) == 2)  # its first sweep's: the lease runs on

        async def recorded() -> bool:
            rec = await second.jobs.get("j")
            return rec is not None and rec.stop_due is None

        await eventually(recorded)
    finally:
        await second.close()
    assert now_ms() < lease
    assert [hit.body["promise_id"] for hit in cancels] == ["j:1", "j:1"]


async def test_a_stop_spawned_while_the_service_closes_is_cut_short_before_the_store_closes(
    tmp_path: Path,
):
    """A settle that comes while `Tether.close` runs (a late callback, a
    step's settle while the worker stops) spawns its stop after the first
    stops were cut short: it is cut short too, and gives its lease up while
    the store is still open, not left running past the close."""
    settings = test_settings(store=f"sqlite:///{tmp_path / 'tether.db'}")
    tether = await Tether.open(settings, Plugins(make_plugin_manager(entry_points=False)))
    late: list[asyncio.Task[None]] = []
    gave_up: list[bool] = []

    async def stop() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:  # as `finish_orphan` releases: a store write
            gave_up.append(await tether.jobs.get("none") is None)
            raise

    assert tether.watchdog is not None
    stop_watchdog = tether.watchdog.stop

    async def late_settle() -> None:  # the spawn of a settle that came meanwhile
        tether._spawn_stop(stop())
        late.extend(tether._stopping)
        await stop_watchdog()

    tether.watchdog.stop = late_settle  # type: ignore[method-assign]
    try:
        await asyncio.wait_for(tether.close(), 30)
        assert len(late) == 1 and late[0].cancelled(), late
        assert gave_up == [True]
    finally:
        for task in late:
            task.cancel()


async def test_a_stop_that_outlasts_its_lease_keeps_it_while_its_process_lives():
    """The backend's `cancel` takes four leases (`TETHER_TASK_TTL`): the
    process stopping the run renews the lease meanwhile, so another
    process's sweeps, at every moment, find nothing due and the run is
    asked to stop once; once it is over the lease is no longer renewed and
    the outcome is filed once."""
    async with open_parts(watchdog_interval=0, trigger_attempts=1, task_ttl=0.3) as parts:
        rig = make_rig(parts)
        wired(rig)
        other = Watchdog(parts.settings, rig.watchdog.plugins, parts.store, parts.settler)
        await orphan(parts)
        release = refuses_once_released(rig)
        await rig.watchdog.sweep(now_ms() + HOUR)  # ends it, and asks the backend to stop the run
        await eventually(lambda: len(rig.backend.stopped) == 1)
        first = (await parts.row("j")).stop_due
        assert first is not None
        held_until = now_ms() + 1200
        swept = 0
        while now_ms() < held_until:
            swept += await other.sweep(now_ms())
            await asyncio.sleep(0.05)
        renewed = (await parts.row("j")).stop_due
        assert (swept, len(rig.backend.stopped)) == (0, 1)
        assert renewed is not None and renewed > first + 600  # moved on with the stop

        release.set()
        await looks_done(rig)
        assert [t for t, _ in await history(rig)] == ["timed_out", "finished", "cancel_failed"]
        assert (await parts.row("j")).stop_due is None
        renewals: list[tuple[Any, ...]] = []
        claim = parts.jobs.claim_stop

        async def counted(*args: Any) -> JobRecord | None:
            renewals.append(args)
            return await claim(*args)

        parts.jobs.claim_stop = counted  # type: ignore[method-assign]
        await asyncio.sleep(0.4)  # more than a lease: the stop is over, none renews it
        assert renewals == []
        assert await other.sweep(now_ms() + HOUR) == 0
        assert len(rig.backend.stopped) == 1


async def test_a_renewal_whose_write_did_not_answer_leaves_both_values_to_the_stop():
    """A renewal the store applied but whose answer was lost (it failed, or
    was cut short) leaves the lease under one of two values: the next
    renewal, and the write that records the stop, find the row's."""
    async with open_parts(watchdog_interval=0, trigger_attempts=1) as parts:
        rec = await stop_due_at(parts, now_ms() + HOUR)
        assert rec.stop_due is not None
        lease = StopLease(parts.jobs, rec, 60_000)
        claim = parts.jobs.claim_stop

        async def applied_then_lost(*args: Any) -> JobRecord | None:
            await claim(*args)
            raise OSError("the answer was lost")

        parts.jobs.claim_stop = applied_then_lost  # type: ignore[method-assign]
        with logs_of("tether") as logs:
            await lease.renew()
        applied = (await parts.row("j")).stop_due
        assert applied is not None and lease.claims == [rec.stop_due, applied]
        assert logs.fields() == [
            (
                "job j: renewing the lease on its run's stop failed (the store did not"
                f" answer: OSError); the lease lasts until {rec.stop_due}",  # the later one
                "j",
                None,
            )
        ]

        parts.jobs.claim_stop = claim  # type: ignore[method-assign]
        await asyncio.sleep(0.002)
        await lease.renew()  # from the value the row holds
        [held] = lease.claims
        assert held == (await parts.row("j")).stop_due and held > applied

        parts.jobs.claim_stop = applied_then_lost  # type: ignore[method-assign]
        await asyncio.sleep(0.002)
        await lease.renew()
        assert len(lease.claims) == 2
        steps = wired(make_rig(parts))
        written = await steps._stop_recorded(rec, 1, lease, [])
        assert written is not None and written.stop_due is None


async def test_a_lease_taken_over_is_no_longer_renewed():
    """Another process claimed the stop (this one stalled past its lease):
    the renewal finds the row's `stop_due` is not its own, says so, and
    renews no more; the other process's lease stands."""
    async with open_parts(watchdog_interval=0) as parts:
        rec = await stop_due_at(parts, now_ms() - 1)
        assert rec.stop_due is not None
        taken = await parts.jobs.claim_stop("j", rec.stop_due, now_ms() + HOUR)
        assert taken is not None
        lease = StopLease(parts.jobs, rec, 100)
        with logs_of("tether") as logs:
            async with lease.kept():
                await asyncio.sleep(0.2)  # a renewal or more
        assert lease.claims == []
        assert logs.fields() == [
            (
                "job j: the lease on its run's stop is no longer this process's (taken over"
                " by another process, or the stop's outcome recorded)",
                "j",
                None,
            )
        ]
        assert (await parts.row("j")).stop_due == taken.stop_due


async def test_a_lease_is_renewed_a_third_of_its_length_after_it_began(monkeypatch):
    """The first renewal of an hour's lease comes 20 minutes on (the naps
    of a second or more are recorded, not slept)."""
    sleep = asyncio.sleep
    naps: list[float] = []

    async def nap(seconds: float, *args: Any) -> Any:
        if seconds < 1:
            return await sleep(seconds, *args)
        naps.append(seconds)
        await asyncio.Event().wait()

    async with open_parts(watchdog_interval=0) as parts:
        rec = await stop_due_at(parts, now_ms() + HOUR)
        monkeypatch.setattr(asyncio, "sleep", nap)
        async with StopLease(parts.jobs, rec, HOUR).kept():
            await eventually(lambda: naps, timeout=2)
    assert naps == [pytest.approx(HOUR / 3 / 1000, abs=0.05)]


async def test_a_cancelled_error_a_backend_raises_of_its_own_is_a_failed_stop():
    """A backend's `cancel` raising `CancelledError` while nothing cancels the
    stop (a library's inner future leaking its cancellation) is a failure
    like any other: logged and filed as `cancel_failed`, the stop recorded,
    not mistaken for the service stopping (which gives the lease up)."""
    async with open_parts(watchdog_interval=0, trigger_attempts=1) as parts:
        rig = make_rig(parts)
        steps = wired(rig)

        async def leaks(job: Job) -> None:
            raise asyncio.CancelledError

        rig.backend.stopping = leaks
        rec = await stop_due_at(parts, now_ms() + HOUR)
        with logs_of("tether") as logs:
            await steps.finish_orphan(rec)
        [(_, failed)] = [e for e in await history(rig) if e[0] == "cancel_failed"]
        assert failed["error"]["type"] == "CancelledError"
        assert (await parts.row("j")).stop_due is None
        assert not any("cut short" in line for line in logs.lines), logs.lines
        assert any("cancelling the external run failed" in line for line in logs.lines)


async def test_a_renewal_the_store_holds_does_not_put_the_next_one_off():
    """A renewal the store holds for longer than a third of the lease (its
    write lock taken by another process, up to `STORE_CALL_TIMEOUT`) and
    then fails: the next one comes a third of a lease after that one began,
    not a third of a lease after it gave up, so the lease does not lapse
    meanwhile (no sweep of another process finds the stop due)."""
    async with open_parts(watchdog_interval=0) as parts:
        length = 2400
        rec = await stop_due_at(parts, now_ms() + length)
        lease = StopLease(parts.jobs, rec, length)
        claim = parts.jobs.claim_stop
        held: list[int] = []

        async def held_once(*args: Any) -> JobRecord | None:
            if not held:  # the first renewal: held most of two thirds of the lease, then failed
                held.append(now_ms())
                await asyncio.sleep(1.3)
                raise OSError("the store did not answer")
            return await claim(*args)

        parts.jobs.claim_stop = held_once  # type: ignore[method-assign]
        lapsed: list[int] = []
        async with lease.kept():
            until = now_ms() + 2 * length
            while now_ms() < until:
                due = (await parts.row("j")).stop_due
                assert due is not None
                if due <= now_ms():
                    lapsed.append(now_ms() - due)
                await asyncio.sleep(0.02)
        assert held, "no renewal was held"
        assert not lapsed, f"the lease lapsed for {max(lapsed)} ms"
        assert lease.claims == [(await parts.row("j")).stop_due]


async def test_a_stop_whose_lease_was_taken_over_tries_the_backend_no_more():
    """Another process took the stop over while this one's `cancel` failed
    with a retryable error (this one cut off from the store for a lease):
    once a renewal finds the lease gone, this process asks the backend no
    more (its tries would run beside the other process's, up to the stop's
    bound of about 21 minutes, and it files nothing), as the stop under a
    lease of one stop's length stopped at the lease's end before."""
    async with open_parts(
        watchdog_interval=0, trigger_attempts=4, trigger_backoff=0.3, task_ttl=0.3
    ) as parts:
        rig = make_rig(parts)
        steps = wired(rig)
        rec = await stop_due_at(parts, now_ms() + 300)
        assert rec.stop_due is not None
        taken: list[int] = []

        async def throttled_and_taken_over(job: Job) -> None:
            if not taken:  # meanwhile another process claims the stop
                row = await parts.row("j")
                assert row.stop_due is not None
                claimed = await parts.jobs.claim_stop("j", row.stop_due, now_ms() + HOUR)
                assert claimed.stop_due is not None
                taken.append(claimed.stop_due)
            raise BackendError("slow down", retryable=True)

        rig.backend.stopping = throttled_and_taken_over
        with logs_of("tether") as logs:
            await asyncio.wait_for(steps.finish_orphan(rec), 10)
        assert len(rig.backend.stopped) == 1, logs.lines
        assert (await parts.row("j")).stop_due == taken[0]  # the other's, untouched
        assert [e for e in await history(rig) if e[0] == "cancel_failed"] == []
        assert any("taken over" in line for line in logs.lines), logs.lines
