"""Many jobs waiting at once in the real service, then their callbacks 200 at a
time: no error, no lost or doubled settle, memory bounded. The suite runs it
with 1,000 jobs (about 4 s: the requests go through aiohttp, whose client
sends them 15 times as fast as httpx's at 200 at a time; the benchmark's
scale phase measures a million); `./dev test --all` adds the 10,000-job run."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import Hit, eventually
from tests.process import TetherProcess, report

CONCURRENCY = 200


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("jobs", [1000, pytest.param(10_000, marks=pytest.mark.heavy)])
async def test_many_waiting_jobs_then_their_callbacks(tmp_path, receiver, capsys, jobs):
    urls: dict[str, str] = {}

    def respond(hit: Hit) -> tuple[int, dict[str, bool]]:
        urls[hit.body["job_id"]] = hit.body["callback_url"]
        return 202, {}

    receiver.respond = respond
    service = TetherProcess(
        tmp_path, {"TETHER_STORE": f"sqlite:///{tmp_path}/load.db", "TETHER_LOG_LEVEL": "WARNING"}
    ).start()
    assert service.proc is not None
    try:
        # aiohttp, not httpx: httpx's pool took 15 s of client CPU for the
        # 1,000 requests at 200 at a time that aiohttp sends in 1 s.
        connector = aiohttp.TCPConnector(limit=CONCURRENCY)
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(
            service.url, connector=connector, timeout=timeout
        ) as client:
            gate = asyncio.Semaphore(CONCURRENCY)
            rss_idle = rss_kib(service.proc.pid)

            async def start(n: int) -> int:
                async with gate:
                    body = {
                        "id": f"L{n}",
                        "backend": "http_webhook",
                        "params": {"url": receiver.url()},
                    }
                    async with client.post("/jobs", json=body) as answer:
                        return answer.status

            statuses = await asyncio.gather(*(start(n) for n in range(jobs)))
            assert set(statuses) == {201}
            await eventually(lambda: len(urls) == jobs, timeout=60, every=0.1)

            async def listed(state: str, limit: int) -> list[Any]:
                params = {"state": state, "limit": str(limit)}
                async with client.get("/jobs", params=params) as page:
                    return list((await page.json())["items"])

            async def all_running() -> bool:
                # A job is listed as running once the backend's answer is recorded, a moment
                # after the receiver saw the trigger.
                return len(await listed("running", 1000)) == min(jobs, 1000)

            await eventually(all_running, timeout=30, every=0.1)
            rss_waiting = rss_kib(service.proc.pid)

            async def settle(job_id: str) -> str:
                async with gate:
                    path = urls[job_id].removeprefix(service.url)
                    body = {"status": "succeeded", "result": job_id}
                    async with client.post(path, json=body) as answer:
                        assert answer.status == 200, await answer.text()
                        return str((await answer.json())["outcome"])

            outcomes = await asyncio.gather(*(settle(f"L{n}") for n in range(jobs)))
            assert outcomes == ["accepted"] * jobs
            again = await asyncio.gather(*(settle(f"L{n}") for n in range(0, jobs, 50)))
            assert set(again) == {"duplicate"}

            async def none_running() -> bool:
                return await listed("running", 1) == []

            await eventually(none_running, timeout=60, every=0.1)
            for n in range(0, jobs, 997):
                async with client.get(f"/jobs/L{n}") as answer:
                    job = await answer.json()
                assert (job["state"], job["result"]) == ("succeeded", f"L{n}")
            rss_after = rss_kib(service.proc.pid)
    finally:
        service.kill()
    report(
        capsys,
        f"RSS idle {rss_idle} KiB, with {jobs} waiting {rss_waiting} KiB"
        f" ({(rss_waiting - rss_idle) * 1024 / jobs:.0f} B/job), after callbacks {rss_after} KiB",
    )
    assert len(receiver.hits) == jobs
    assert rss_waiting - rss_idle < jobs * 20  # KiB: bounded, well under 20 KB a waiting job
