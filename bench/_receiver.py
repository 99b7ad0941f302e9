"""The benchmark's webhook receiver: the "external system" Tether triggers.

    python bench/_receiver.py --port N

A separate aiohttp process (its CPU never competes inside the service):

- `POST /hook` is what the `http_webhook` backend triggers. It answers 202
  `{"accepted": true}` at once and counts the trigger. When a load process is
  subscribed to `GET /events`, it is sent one line per trigger,
  `job_id<TAB>callback_url<TAB>unix_time\\n`, and POSTs the callback itself; with
  no subscriber nothing calls back (the job stays waiting).
- `GET /events` streams those lines (one subscriber at a time is what the
  benchmark uses; every subscriber gets every line).
- `GET /stats` `{"received": n, "last": {"job_id", "callback_url"}}`;
  `POST /reset` sets the count to zero.
- With `--record FILE`, every trigger's `job_id<TAB>callback_url` is appended
  to FILE (the scale phase calls back random waiting jobs from it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from aiohttp import web

ACCEPTED = b'{"accepted":true}'


class Subscriber:
    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.ready = asyncio.Event()

    def push(self, line: bytes) -> None:
        self.lines.append(line)
        self.ready.set()


class Receiver:
    def __init__(self, record: str | None = None) -> None:
        self.record = open(record, "a", buffering=1 << 16) if record else None  # noqa: SIM115
        self.received = 0
        self.last: dict[str, Any] | None = None
        self.subscribers: set[Subscriber] = set()

    async def hook(self, request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        self.received += 1
        job_id, url = body["job_id"], body["callback_url"]
        self.last = {"job_id": job_id, "callback_url": url}
        if self.record is not None:
            self.record.write(f"{job_id}\t{url}\n")
        if self.subscribers:
            line = f"{job_id}\t{url}\t{time.time():.6f}\n".encode()
            for sub in self.subscribers:
                sub.push(line)
        return web.Response(status=202, body=ACCEPTED, content_type="application/json")

    async def events(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/plain"})
        await resp.prepare(request)
        sub = Subscriber()
        self.subscribers.add(sub)
        try:
            await resp.write(b"subscribed\n")
            while True:
                await sub.ready.wait()
                sub.ready.clear()
                lines, sub.lines = sub.lines, []
                await resp.write(b"".join(lines))
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.subscribers.discard(sub)
        return resp

    async def stats(self, request: web.Request) -> web.Response:
        if self.record is not None:
            self.record.flush()
        return web.json_response({"received": self.received, "last": self.last})

    async def reset(self, request: web.Request) -> web.Response:
        self.received = 0
        if self.record is not None:
            self.record.flush()
        return web.json_response({"received": 0})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--record", help="append job_id<TAB>callback_url of each trigger here")
    args = parser.parse_args()
    receiver = Receiver(args.record)
    app = web.Application()
    app.router.add_post("/hook", receiver.hook)
    app.router.add_get("/events", receiver.events)
    app.router.add_get("/stats", receiver.stats)
    app.router.add_post("/reset", receiver.reset)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
