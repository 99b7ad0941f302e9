"""Postgres going away and coming back, on the Postgres store.

Needs TETHER_TEST_PG_DSN (see tests/conftest.py); skipped without it. The service reaches Postgres
through a TCP proxy this test controls, so "Postgres is down" is every
connection cut and every new one refused, without touching the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.conftest import eventually, free_port


class Proxy:
    """Forwards 127.0.0.1:port to Postgres while up; cuts everything while down."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = free_port()
        self.up = True
        self.pipes: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self.pipes |= {writer, up_writer}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self.pipes -= {writer, up_writer}

    def cut(self) -> None:
        self.up = False
        for pipe in list(self.pipes):
            pipe.transport.abort()
        self.pipes.clear()

    def restore(self) -> None:
        self.up = True

    async def stop(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()


@pytest.fixture
async def proxied_pg(fresh_pg_url: str) -> Any:
    parts = urlsplit(fresh_pg_url)
    proxy = Proxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    await proxy.start()
    netloc = f"{parts.username}:{parts.password}@127.0.0.1:{proxy.port}"
    yield proxy, urlunsplit(parts._replace(netloc=netloc))
    await proxy.stop()


def job(job_id: str, url: str) -> dict[str, Any]:
    return {"id": job_id, "backend": "http_webhook", "params": {"url": url}}


# once, on the Postgres behind the proxy: `start_service`'s own store is not used
# (it ran as `[sqlite]`, which it is not)
@pytest.mark.parametrize("store_url", [pytest.param("sqlite", id="postgres")], indirect=True)
async def test_postgres_down_answers_503_and_work_resumes_when_it_is_back(
    start_service, receiver, proxied_pg
):
    proxy, dsn = proxied_pg
    svc = await start_service(store=dsn)
    for job_id in ("before", "after"):
        created = await svc.client.post(
            "/jobs",
            json=job(job_id, receiver.url()),
        )
        assert created.status_code == 201
        await svc.wait_state(job_id, "running")
    urls = {h.body["job_id"]: h.body["callback_url"] for h in receiver.hits}

    proxy.cut()
    started = time.monotonic()
    answers = [
        await svc.client.get("/jobs/before"),
        await svc.client.post(urls["before"], json={"status": "succeeded"}),
        await svc.client.post(
            "/jobs",
            json=job("during", receiver.url()),
        ),
        await svc.client.get("/health"),
    ]
    assert [a.status_code for a in answers] == [503, 503, 503, 503], [a.text for a in answers]
    assert all(a.json()["error"]["code"] == "store_unavailable" for a in answers)
    assert time.monotonic() - started < 45  # bounded by the pool's timeout, not a hang

    proxy.restore()

    async def healthy() -> bool:
        return (await svc.client.get("/health")).status_code == 200

    await eventually(healthy, timeout=30)
    # The callback refused during the outage changed nothing: the job still waits.
    assert (await svc.job("before"))["state"] == "running"
    for job_id in ("before", "after"):
        answer = await svc.client.post(urls[job_id], json={"status": "succeeded"})
        assert answer.status_code == 200 and answer.json()["outcome"] == "accepted", answer.text

    # The workflows resume and run their finish step on the store that came back.
    async def workflows_done() -> bool:
        roots = [await svc.tether.resonate.promises.get(job_id) for job_id in ("before", "after")]
        return all(root.state == "resolved" for root in roots)

    await eventually(workflows_done, timeout=30)
    assert (await svc.client.get("/jobs/during")).status_code == 404  # refused, so never made
    created = await svc.client.post("/jobs", json=job("later", receiver.url()))
    assert created.status_code == 201
    await svc.wait_state("later", "running", timeout=30)
