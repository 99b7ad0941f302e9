"""`core.metrics.longest_waiting`: the dashboard summary's jobs waiting
longest, found on the index of states, their few fields alone."""

from __future__ import annotations

from core.metrics import longest_waiting
from core.models import Outcome
from tests.core.parts import open_parts


async def test_the_waiting_jobs_made_first_oldest_first_with_their_fields_alone():
    async with open_parts() as parts:
        big = {"blob": "x" * 100_000}  # (not read: the summary names jobs)
        for n, state in enumerate(["running", "succeeded", "pending", "running", "failed"]):
            waits = "pending" if state == "pending" else "running"
            await parts.add_job(f"j{n}", state=waits, params=big, created_at=1_000 + n)
            if state in ("succeeded", "failed"):
                await parts.jobs.end(f"j{n}", Outcome(status=state), 2_000)
        for n in range(5, 9):
            await parts.add_job(f"j{n}", state="pending", created_at=1_000 + n)
        found = await longest_waiting(parts.jobs, 5)
        assert [job["id"] for job in found] == ["j0", "j2", "j3", "j5", "j6"]
        first = {"id": "j0", "state": "running", "backend": "scripted", "created_at": 1000}
        assert found[0] == first
        assert [job["id"] for job in await longest_waiting(parts.jobs, 2)] == ["j0", "j2"]
