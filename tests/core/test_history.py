"""Job history in the store, in process: written with the change it describes
and only when the change happened (replays record nothing twice), numbered
without gaps, bounded, and deleted with the job."""

from __future__ import annotations

import pytest

import core.store.sql
from core.events import JobHistory
from core.models import Outcome
from core.store.jobs import NewEvent, now_ms
from tests.core.parts import open_parts

DONE = Outcome(status="succeeded")


async def seqs_and_types(parts, job_id: str) -> list[tuple[int, str]]:
    rows = await parts.jobs.db.fetch(
        "SELECT seq, type FROM tether_events WHERE job_id = ? ORDER BY seq", (job_id,)
    )
    return [tuple(r) for r in rows]


async def test_replayed_writes_record_their_event_once():
    async with open_parts() as parts:
        await parts.add_job("j")
        triggered = NewEvent("triggered", {"try": 1, "external": {"run": 1}})
        for _ in range(2):  # the trigger step again after a crash
            rec = await parts.jobs.set_external("j", {"run": 1}, now_ms(), None, triggered)
            assert rec is not None and rec.state == "running"
        for _ in range(2):  # the finish step again
            rec, _ = await parts.jobs.end("j", DONE, now_ms())
        assert await seqs_and_types(parts, "j") == [(1, "triggered"), (2, "finished")]
        assert (await parts.row("j")).events == 2


async def test_a_trigger_that_lands_after_a_cancel_is_still_recorded_once():
    async with open_parts() as parts:
        await parts.add_job("j")
        await parts.jobs.end("j", Outcome(status="canceled"), now_ms())
        triggered = NewEvent("triggered", {"try": 1, "external": {}})
        for _ in range(2):
            rec = await parts.jobs.set_external("j", {"run": 2}, now_ms(), None, triggered)
            assert rec is not None and rec.state == "canceled"
        assert await seqs_and_types(parts, "j") == [(1, "finished"), (2, "triggered")]


async def test_events_of_an_unknown_job_are_not_recorded():
    async with open_parts() as parts:
        assert await parts.jobs.record("ghost", [NewEvent("callback", {})], now_ms()) is None
        assert await seqs_and_types(parts, "ghost") == []


async def test_a_long_history_keeps_its_first_and_last_events(monkeypatch):
    monkeypatch.setattr(core.store.sql, "HISTORY_LIMIT", 6)
    monkeypatch.setattr(core.store.sql, "HISTORY_HEAD", 2)
    async with open_parts() as parts:
        await parts.add_job("j")
        history = JobHistory(parts.jobs)
        for n in range(9):
            await parts.jobs.record("j", [NewEvent("status_check", {"n": n})], now_ms())
        await parts.jobs.end("j", DONE, now_ms())
        page = await history.page("j")
        assert [e.seq for e in page.items] == [1, 2, 7, 8, 9, 10]
        assert page.dropped == 4
        assert page.items[-1].type == "finished"
        first = await history.page("j", limit=4)
        assert [e.seq for e in first.items] == [1, 2, 7, 8] and first.dropped == 4
        assert first.next_cursor is not None
        rest = await history.page("j", limit=4, cursor=first.next_cursor)
        assert [e.seq for e in rest.items] == [9, 10] and rest.next_cursor is None


async def test_retention_deletes_a_jobs_history_with_it():
    async with open_parts() as parts:
        for job_id in ("old", "new"):
            await parts.add_job(job_id)
            await parts.jobs.record(job_id, [NewEvent("status_check", {})], now_ms())
        await parts.jobs.end("old", DONE, now_ms() - 10_000)
        assert await parts.jobs.delete_finished(now_ms() - 5_000, 10) == ["old"]
        assert await seqs_and_types(parts, "old") == []
        assert await seqs_and_types(parts, "new") == [(1, "status_check")]


async def test_a_listener_that_fails_does_not_fail_the_write():
    async with open_parts() as parts:
        history = JobHistory(parts.jobs)
        heard: list[int] = []
        history.listeners.append(lambda rec, event: 1 / 0)  # type: ignore[func-returns-value]
        history.listeners.append(lambda rec, event: heard.append(event.seq))
        await parts.add_job("j")
        assert await parts.jobs.record("j", [NewEvent("status_check", {})], now_ms())
        await parts.jobs.end("j", DONE, now_ms())
        assert heard == [1, 2]


@pytest.mark.parametrize("limit", [0, 1001])
async def test_a_page_size_out_of_bounds_is_refused(limit):
    from core.errors import MalformedBody

    async with open_parts() as parts:
        await parts.add_job("j")
        with pytest.raises(MalformedBody, match="limit"):
            await JobHistory(parts.jobs).page("j", limit=limit)
