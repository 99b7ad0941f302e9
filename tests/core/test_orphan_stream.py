"""A job the watchdog finishes without its workflow (the service was down
past the deadline and the workflow's grace): its event stream waits for the
run's stop that finish asks for, and shows its `cancel_failed` before it ends
(the stop promise, `core.workflow.stop_promise_id`)."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import pytest
from resonate.error import ServerError
from resonate.types import Value

import core.events
import core.settle
import core.watchdog
from core import workflow
from core.errors import BackendError, StoreUnavailable
from core.events import JobHistory
from core.models import Job
from core.steps import JobSteps
from core.store.jobs import JobRecord, now_ms
from core.tokens import CallbackSigner
from tests.conftest import eventually
from tests.core.parts import open_parts
from tests.core.test_watchdog import HOUR, make_rig


@pytest.fixture(autouse=True)
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(core.events, "FOLLOW_UP_POLL", 0.05)
    monkeypatch.setattr(core.watchdog, "SWEEP_WAIT", 0.05)


async def _read(stream: Any, seen: list[str]) -> None:
    async for item in stream:
        if item is not None:
            seen.append(item if item == core.events.END else item.type)


async def test_a_stream_waits_for_the_stop_of_a_job_no_workflow_finishes():
    async with open_parts(watchdog_interval=0, trigger_attempts=1) as parts:
        rig = make_rig(parts)
        signer = CallbackSigner("test-secret", "http://t")
        steps = JobSteps(parts.settings, rig.watchdog.plugins, parts.jobs, signer, parts.settler)

        async def finish_orphan(rec: JobRecord) -> None:  # as the service wires it
            await steps.finish(rec.id, {"status": rec.state}, rec.attempt)

        parts.settler.on_orphan = finish_orphan
        parts.settler.stop_within_ms = int(steps.stop_within() * 1000)
        history = JobHistory(parts.jobs)
        history.attempt_running = functools.partial(workflow.attempt_running, parts.resonate)

        await parts.add_job("j", backend="checked", state="running", external={"run": "j"})
        await parts.add_promise("j", timeout_ms=1)  # the store timed the wait out; no workflow
        await asyncio.sleep(0.05)
        release = asyncio.Event()

        async def refuses(job: Job) -> None:
            await release.wait()
            raise BackendError("the run cannot be stopped now")

        rig.backend.stopping = refuses
        seen: list[str] = []
        reader = asyncio.create_task(_read(await history.follow("j"), seen))
        await rig.watchdog.sweep(now_ms() + HOUR)  # ends it, and asks the backend to stop the run

        await eventually(lambda: "finished" in seen)
        await asyncio.sleep(0.5)  # ten looks past `finished`: the stop is still under way
        assert "end" not in seen, seen
        assert await workflow.attempt_running(parts.resonate, "j", 1)

        release.set()
        await asyncio.wait_for(reader, 5)
        assert seen[-3:] == ["finished", "cancel_failed", "end"], seen
        assert not await workflow.attempt_running(parts.resonate, "j", 1)
        await asyncio.gather(*rig.watchdog._looking.values())


async def test_a_job_whose_end_stops_nothing_makes_no_stop_promise():
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
        assert not await workflow.attempt_running(parts.resonate, "p", 1)
        with pytest.raises(ServerError) as raised:
            await parts.resonate.promises.get(workflow.stop_promise_id("p"))
        assert raised.value.code == 404


@pytest.mark.parametrize(
    ("attempts", "within"),
    [(4, 4 * 300 + 1 + 2 + 4 + 60), (1, 300 + 60), (0, 300 + 60), (2000, 86_400)],
)
async def test_the_stop_promise_lasts_as_long_as_the_stop_at_most_a_day(attempts, within):
    """Every try's cancel and the waits between (`TETHER_TRIGGER_ATTEMPTS`
    has no upper bound: 2000 tries doubled 1 s is past a float, which
    raised `OverflowError` as the service opened)."""
    async with open_parts(trigger_attempts=attempts, trigger_backoff=1.0) as parts:
        signer = CallbackSigner("test-secret", "http://t")
        steps = JobSteps(
            parts.settings, make_rig(parts).watchdog.plugins, parts.jobs, signer, parts.settler
        )
        assert steps.stop_within() == within


async def test_the_stop_promise_is_resolved_through_a_slow_store(
    monkeypatch: pytest.MonkeyPatch,
):
    """Just after the outage that made the orphan the store may still be slow:
    a try to resolve the stop promise that times out is made again, not left
    for the promise's timeout (a stream and a retry of the job wait for it)."""
    monkeypatch.setattr(core.settle, "STOP_END_WAITS", (0.01, 0.01))
    async with open_parts() as parts:
        await parts.add_job("j", state="succeeded")
        promise_id = workflow.stop_promise_id("j", 1)
        promises = parts.resonate.promises
        await promises.create(promise_id, now_ms() + HOUR, Value(data=None), {})
        resolve, failures = promises.resolve, [StoreUnavailable("slow"), ServerError(503, "x")]

        async def slow(promise_id: str, value: Value) -> Any:
            if failures:
                raise failures.pop(0)
            return await resolve(promise_id, value)

        monkeypatch.setattr(promises, "resolve", slow)
        await parts.settler._stop_ends(await parts.row("j"), promise_id)
        assert (await promises.get(promise_id)).state == "resolved"
