"""A worker's open files: `tether serve` raises its soft limit to the hard
one, and holds its streams to half of it, so readers holding streams never
leave it without a file for a trigger's request or a callback."""

from __future__ import annotations

import re
import socket
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
    the rest answered 503 `too_many_streams`, list streams included, on a
    connection the service closes: kept alive, each refused client held a
    file as well, asking again on it (a QA pass). Jobs are triggered and
    called back as ever meanwhile."""
    service = FewFiles(tmp_path, {"TETHER_STORE": f"sqlite:///{tmp_path}/tether.db"}).start()
    held: list[socket.socket] = []
    try:
        assert service.proc is not None
        assert open_files_limit(service.proc.pid) == HARD  # raised from SOFT
        assert f"may open {HARD} files at most" in service.log.read_text()
        async with httpx.AsyncClient(base_url=service.url, timeout=30) as client:
            watched = await start(client, receiver, "watched")
            # Each on a connection of its own, none closed by this side.
            answers = Counter(
                stream_on(service.port, "/jobs/watched/events", held) for _ in range(150)
            )
            assert answers == {200: HARD // 2, 503: 150 - HARD // 2}
            assert stream_on(service.port, "/jobs", held) == 503  # list streams count too

            # The streams held, a job is triggered, called back and ended.
            other = await start(client, receiver, "other")
            assert (await client.post(other, json={"status": "succeeded"})).status_code == 200
            assert (await client.get("/jobs/other")).json()["state"] == "succeeded"
            assert (await client.post(watched, json={"status": "succeeded"})).status_code == 200
            # Every stream's place is given back once its job ended.
            await eventually(lambda: stream_on(service.port, "/jobs", held) == 200, timeout=20)
        assert "Too many open files" not in service.log.read_text()
    finally:
        for sock in held:
            sock.close()
        service.kill()


def stream_on(port: int, path: str, held: list[socket.socket]) -> int:
    """Ask for a stream on a new connection, kept open (in `held`) whatever
    the answer, as a client that would ask again on it; the status."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    held.append(sock)
    head = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n"
    sock.sendall(head.encode())
    status = sock.recv(64).split(b" ", 2)[1]
    return int(status)


async def start(client: httpx.AsyncClient, receiver: Receiver, job_id: str) -> str:
    """Start a job on the receiver; once it runs, its callback URL."""
    body = {"id": job_id, "backend": "http_webhook", "params": {"url": receiver.url(f"/{job_id}")}}
    assert (await client.post("/jobs", json=body)).status_code == 201

    async def running() -> bool:
        return (await client.get(f"/jobs/{job_id}")).json()["state"] == "running"

    await eventually(running, timeout=10)
    return str(receiver.on(f"/{job_id}")[0].body["callback_url"])
