"""A worker's open files: `tether serve` raises its soft limit to the hard
one, and holds its streams to half of it, so readers holding streams never
leave it without a file for a trigger's request or a callback."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from pathlib import Path

import httpx

from tests.conftest import Receiver, eventually
from tests.process import TetherProcess

SOFT, HARD = 100, 160
"""The limits the service is started under: the usual 1,024, scaled down."""


class FewFiles(TetherProcess):
    preamble = f"import resource\n\nresource.setrlimit(resource.RLIMIT_NOFILE, ({SOFT}, {HARD}))\n"


def open_files_limit(pid: int) -> int:
    limits = Path(f"/proc/{pid}/limits").read_text()
    found = re.search(r"^Max open files\s+(\d+)", limits, re.M)
    assert found is not None, limits
    return int(found.group(1))


async def test_streams_past_half_the_open_files_are_refused_and_jobs_go_on(
    tmp_path: Path, receiver: Receiver
):
    """Under a soft limit of 1,024 files, a thousand history streams on one
    job left the worker none for the next job's trigger: its request failed
    with "too many open files" and the job failed. Now the soft limit is
    raised to the hard one, the streams held to half of it (80 here), and
    the rest answered 503 `too_many_streams`, list streams included, while
    jobs are triggered and called back as ever."""
    service = FewFiles(tmp_path, {"TETHER_STORE": f"sqlite:///{tmp_path}/tether.db"}).start()
    try:
        assert service.proc is not None
        assert open_files_limit(service.proc.pid) == HARD  # raised from SOFT
        assert f"may open {HARD} files at most" in service.log.read_text()
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=service.url, timeout=30, limits=limits) as client:
            watched = await start(client, receiver, "watched")
            answers: list[int] = []

            async def hold(path: str) -> None:
                headers = {"accept": "text/event-stream"}
                async with client.stream("GET", path, headers=headers) as stream:
                    answers.append(stream.status_code)
                    if stream.status_code == 503:
                        said = (await stream.aread()).decode()
                        assert "too_many_streams" in said and stream.headers["retry-after"]
                        return
                    async for _ in stream.aiter_bytes():
                        pass

            holders = [asyncio.create_task(hold("/jobs/watched/events")) for _ in range(100)]
            await eventually(lambda: len(answers) == 100, timeout=20)
            assert Counter(answers) == {200: HARD // 2, 503: 100 - HARD // 2}
            refused = await client.get("/jobs", headers={"accept": "text/event-stream"})
            assert refused.status_code == 503  # list streams count too

            # The streams held, a job is triggered, called back and ended.
            other = await start(client, receiver, "other")
            assert (await client.post(other, json={"status": "succeeded"})).status_code == 200
            assert (await client.get("/jobs/other")).json()["state"] == "succeeded"
            assert (await client.post(watched, json={"status": "succeeded"})).status_code == 200
            await asyncio.wait_for(asyncio.gather(*holders), 20)  # each ended with the job

            # Every stream's place was given back.
            async with client.stream(
                "GET", "/jobs", headers={"accept": "text/event-stream"}
            ) as listed:
                assert listed.status_code == 200
        assert "Too many open files" not in service.log.read_text()
    finally:
        service.kill()


async def start(client: httpx.AsyncClient, receiver: Receiver, job_id: str) -> str:
    """Start a job on the receiver; once it runs, its callback URL."""
    body = {"id": job_id, "backend": "http_webhook", "params": {"url": receiver.url(f"/{job_id}")}}
    assert (await client.post("/jobs", json=body)).status_code == 201

    async def running() -> bool:
        return (await client.get(f"/jobs/{job_id}")).json()["state"] == "running"

    await eventually(running, timeout=10)
    return str(receiver.on(f"/{job_id}")[0].body["callback_url"])
