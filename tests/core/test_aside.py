"""`core.aside`: work on more than `ASIDE_BYTES` runs on the thread of its
own, the rest where it stands; and what each path that reads a party's
words sends there (a status check's answer here; a callback's and a
heartbeat's body in tests/api/test_bodies_aside.py)."""

from __future__ import annotations

import threading

import core.callbacks
from core.aside import ASIDE_BYTES, aside
from core.callbacks import going_said
from core.models import Running
from core.redact import MASK
from core.store.jobs import JobRecord
from tests.conftest import threads_of

TOKEN = "nbcaslPdf-OnkSfhnYAW6By053zklYzE3nJtVHfvVBY"


async def test_work_on_more_than_the_bound_runs_on_its_thread_the_rest_here():
    here = threading.current_thread()
    assert await aside(ASIDE_BYTES, threading.current_thread) is here
    there = await aside(ASIDE_BYTES + 1, threading.current_thread)
    assert there is not here and there.name.startswith("tether-aside")
    assert await aside(10**6, threading.current_thread) is there  # one thread, always


async def test_a_large_status_answer_is_read_aside_and_masked(monkeypatch):
    """A status check that found the run going: its progress and what it
    learnt of the run are masked and bounded on the thread when the
    backend's answer is large (its target holds the job's token)."""
    ran_on = threads_of(monkeypatch, core.callbacks, "_going_said")
    rec = JobRecord(
        id="j", backend="b", state="running", params={}, metadata={}, timeout=60.0,
        fingerprint="f", deadline=0, created_at=0, updated_at=0, external={"run": 1},
    )  # fmt: skip
    words = ["a"] * ASIDE_BYTES + [f"see {TOKEN}"]
    found = Running(progress=words, external={"run": 1, "log": f"sent {TOKEN}"})
    data, learnt = await going_said(rec, found, [TOKEN], 1 << 20)
    assert data == {"said": "running"}  # (progress over 16 KiB is not filed)
    assert learnt == (1, {"log": f"sent {MASK}"})
    small = Running(progress=[f"see {TOKEN}"])
    data, _ = await going_said(rec, small, [TOKEN], 1 << 20)
    assert data == {"said": "running", "progress": [f"see {MASK}"]}
    assert ran_on == ["tether-aside_0", threading.current_thread().name]


async def test_a_large_job_row_is_read_aside(monkeypatch):
    """A job is read at each callback, heartbeat and look at it: a large
    row's JSON is read on the thread, a small one's here."""
    import core.store.sql
    from tests.core.parts import open_parts

    ran_on = threads_of(monkeypatch, core.store.sql, "_row")
    async with open_parts() as parts:
        await parts.add_job("big", params={"floats": [0.5] * ASIDE_BYTES})
        await parts.add_job("small")
        ran_on.clear()  # (the writes' own reads)
        assert (await parts.jobs.get("big")).params == {"floats": [0.5] * ASIDE_BYTES}
        assert (await parts.jobs.get("small")).id == "small"
    assert ran_on == ["tether-aside_0", threading.current_thread().name]
