"""The job's exchange without a store: the floor under Tether's end to end.

    python bench/_shape.py --port N [--workers W]

A plain Litestar app, served as `tether serve` serves Tether (uvicorn, the
same options and worker count), that speaks the HTTP of a job exactly as the
benchmark's load process and webhook receiver see it, and keeps nothing:

- `POST /jobs` decodes the job (msgspec), answers 201 with a job's view, and
  then POSTs the trigger to the job's `params.url` (aiohttp, one pooled
  session per worker, the body and headers `http_webhook` sends);
- `POST /callbacks/{promise_id}` decodes the outcome and answers `accepted`;
- `GET /jobs/{id}` answers a view of the job, `succeeded`.

No durable promise, no workflow, no index, no history, no log line, no
metrics, no token checks: what a job costs on this machine's HTTP alone, with
the same load process, receiver and concurrency as the end-to-end phase.
Tether's own CPU per job above this figure is what its durability, its
checks and its record cost.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from typing import Any

import aiohttp
import msgspec
from _ceiling import serve
from litestar import Litestar, Request, get, post


class Params(msgspec.Struct):
    url: str


class JobIn(msgspec.Struct):
    id: str
    backend: str
    params: Params


class Outcome(msgspec.Struct):
    status: str


_session: aiohttp.ClientSession | None = None
_pending: set[asyncio.Task[None]] = set()


def session() -> aiohttp.ClientSession:
    global _session
    if _session is None:
        _session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256, limit_per_host=0, ttl_dns_cache=10),
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            json_serialize_bytes=msgspec.json.encode,
        )
    return _session


def view(job_id: str, state: str, now: float) -> dict[str, Any]:
    return {
        "id": job_id,
        "backend": "http_webhook",
        "state": state,
        "attempt": 1,
        "created_at": now,
        "updated_at": now,
        "tags": [],
    }


async def trigger(job: JobIn, public: str) -> None:
    promise_id = f"{job.id}:1"
    path, token = f"{public}/callbacks/{promise_id}", f"?token={uuid.uuid4().hex}"
    callback = path + token
    body = {
        "job_id": job.id,
        "promise_id": promise_id,
        "callback_url": callback,
        "heartbeat_url": f"{path}/heartbeat{token}",  # as Trigger.heartbeat_url makes it
        "idempotency_key": promise_id,
        "payload": None,
    }
    headers = {"Tether-Callback-Url": callback, "Idempotency-Key": promise_id}
    async with session().post(job.params.url, json=body, headers=headers) as answer:
        await answer.read()


@post("/jobs", status_code=201)
async def create(request: Request[Any, Any, Any]) -> dict[str, Any]:
    job = msgspec.json.decode(await request.body(), type=JobIn)
    task = asyncio.ensure_future(trigger(job, request.app.state.public))
    _pending.add(task)
    task.add_done_callback(_pending.discard)
    return view(job.id, "running", time.time())


@post("/callbacks/{promise_id:str}", status_code=200)
async def callback(promise_id: str, request: Request[Any, Any, Any]) -> dict[str, Any]:
    outcome = msgspec.json.decode(await request.body(), type=Outcome)
    return {"job_id": promise_id.rsplit(":", 1)[0], "outcome": "accepted", "state": outcome.status}


@get("/jobs/{job_id:str}")
async def read(job_id: str) -> dict[str, Any]:
    return view(job_id, "succeeded", time.time())


@get("/health")
async def health() -> dict[str, Any]:
    return {"status": "ok"}


def create_app() -> Litestar:
    app = Litestar(route_handlers=[create, callback, read, health], debug=False)
    app.state.public = os.environ["SHAPE_PUBLIC_URL"]  # set by main(); spawned workers inherit it
    return app


def main() -> None:
    def public_url(args: argparse.Namespace) -> None:  # spawned workers inherit it
        os.environ["SHAPE_PUBLIC_URL"] = f"http://127.0.0.1:{args.port}"

    serve("_shape:create_app", public_url)


if __name__ == "__main__":
    main()
