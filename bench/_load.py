"""The benchmark's load generator: a separate aiohttp process.

    python bench/_load.py SPEC.json RESULT.json

SPEC is `{"phase": "e2e" | "rps" | "fill" | "callbacks", ...}` (see the functions below);
RESULT gets the measurements, plus the CPU this process used, so the report can
show that the load generator was not the bottleneck.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from itertools import count
from typing import Any

import aiohttp

TIMEOUT = aiohttp.ClientTimeout(total=60)


def _cpu() -> float:
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def _session(concurrency: int) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=concurrency + 4, ttl_dns_cache=None)
    return aiohttp.ClientSession(connector=connector, timeout=TIMEOUT)


def _job_body(
    job_id: str, hook_url: str, timeout: float | None, tags: list[str] | None = None
) -> bytes:
    body: dict[str, Any] = {
        "id": job_id,
        "backend": "http_webhook",
        "params": {"url": hook_url},
    }
    if timeout is not None:
        body["timeout"] = timeout
    if tags:
        body["tags"] = tags
    return json.dumps(body).encode()


def scale_tags(i: int, groups: int) -> list[str]:
    """The scale phase's tags: every job `scale`, and one of `groups` groups."""
    return ["scale", f"group-{i % groups}"]


JSON = {"content-type": "application/json"}
SUCCEEDED = json.dumps({"status": "succeeded"}).encode()


# ── end to end ───────────────────────────────────────────────────────────────


async def e2e(spec: dict[str, Any]) -> dict[str, Any]:
    """`n` jobs through the whole path, `concurrency` at a time, each:
    POST /jobs → (the receiver streams us its trigger) → POST the callback →
    GET /jobs/{id} until it shows `succeeded`.

    Per job: [post_ms, trigger_ms (POST answered → trigger seen here),
    accepted_ms (callback POST → its 200 `accepted`), finished_ms (callback POST →
    a GET shows `succeeded`), done_s (since start), callback_wall (unix time the
    callback was sent), i (the job's number)]."""
    base, hook, n = spec["base"], spec["hook_url"], spec["n"]
    prefix, concurrency, budget = spec["prefix"], spec["concurrency"], spec["budget_s"]
    events_url = spec["events_url"]
    delay = spec.get("callback_delay_s", 0.0)  # after the trigger, before the callback
    waiters: dict[str, asyncio.Future[str]] = {}
    early: dict[str, str] = {}
    errors: dict[str, int] = {}
    jobs: list[list[float]] = []
    stop_at = time.perf_counter() + budget
    stopped_early = False
    ids = count()

    def error(kind: str) -> None:
        errors[kind] = errors.get(kind, 0) + 1

    async with _session(concurrency + 1) as http:
        stream = await http.get(events_url, timeout=aiohttp.ClientTimeout(total=None))
        await stream.content.readline()  # "subscribed"

        async def read_events() -> None:
            async for raw in stream.content:
                job_id, url, _ = raw.decode().rstrip("\n").split("\t")
                fut = waiters.pop(job_id, None)
                if fut is None:
                    early[job_id] = url
                elif not fut.done():
                    fut.set_result(url)

        reader = asyncio.create_task(read_events())
        t0 = time.perf_counter()
        t0_wall = time.time()
        cpu0 = _cpu()

        async def one(i: int, job_id: str) -> None:
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[str] = loop.create_future()
            waiters[job_id] = fut
            a = time.perf_counter()
            async with http.post(
                base + "/jobs", data=_job_body(job_id, hook, None), headers=JSON
            ) as r:
                await r.read()
                if r.status != 201:
                    error(f"POST /jobs {r.status}")
                    waiters.pop(job_id, None)
                    return
            b = time.perf_counter()
            if job_id in early:
                fut.set_result(early.pop(job_id))
            try:
                url = await asyncio.wait_for(fut, 60)
            except TimeoutError:
                waiters.pop(job_id, None)
                error("no trigger within 60 s")
                return
            if delay:
                await asyncio.sleep(delay)
            c = time.perf_counter()
            wall = time.time()
            async with http.post(url, data=SUCCEEDED, headers=JSON) as r:
                answer = await r.read()
                if r.status != 200:
                    error(f"callback {r.status}")
                    return
            d = time.perf_counter()
            if json.loads(answer).get("outcome") != "accepted":
                error("callback not accepted")
            for _ in range(1000):
                async with http.get(f"{base}/jobs/{job_id}") as r:
                    state = json.loads(await r.read()).get("state")
                if state == "succeeded":
                    break
                error(f"GET after callback showed {state}")
                await asyncio.sleep(0.001)
            e = time.perf_counter()
            jobs.append(
                [(b - a) * 1e3, (c - b) * 1e3, (d - c) * 1e3, (e - c) * 1e3, e - t0, wall, i]
            )

        async def worker() -> None:
            nonlocal stopped_early
            while True:
                i = next(ids)
                if i >= n:
                    return
                if time.perf_counter() > stop_at:
                    stopped_early = True
                    return
                try:
                    await one(i, f"{prefix}-{i}")
                except (aiohttp.ClientError, TimeoutError) as exc:
                    error(type(exc).__name__)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall_s = time.perf_counter() - t0
        cpu_s = _cpu() - cpu0
        reader.cancel()
        stream.close()
    return {
        "jobs": jobs,
        "t0_wall": t0_wall,
        "errors": errors,
        "stopped_early": stopped_early,
        "wall_s": wall_s,
        "load_cpu_s": cpu_s,
    }


# ── requests per second on GET ───────────────────────────────────────────────


async def rps(spec: dict[str, Any]) -> dict[str, Any]:
    """GET `urls` (cycled) with `concurrency` in flight for `duration` seconds,
    after `warmup` seconds not counted. Latencies in ms."""
    urls: list[str] = spec["urls"]
    concurrency, duration, warmup = spec["concurrency"], spec["duration"], spec["warmup"]
    expect = spec.get("expect_status", 200)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    counter = count()
    answered = 0  # warm-up included: the service's CPU is read over the whole phase
    async with _session(concurrency) as http:
        start = time.perf_counter()
        measure_from = start + warmup
        end = measure_from + duration
        cpu0 = 0.0

        async def worker() -> None:
            nonlocal cpu0, answered
            while True:
                a = time.perf_counter()
                if a >= end:
                    return
                url = urls[next(counter) % len(urls)]
                try:
                    async with http.get(url) as r:
                        await r.read()
                        status = r.status
                except (aiohttp.ClientError, TimeoutError) as exc:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    continue
                b = time.perf_counter()
                answered += 1
                if a >= measure_from:
                    if status == expect:
                        latencies.append((b - a) * 1e3)
                    else:
                        errors[str(status)] = errors.get(str(status), 0) + 1

        async def mark_cpu() -> None:
            nonlocal cpu0
            await asyncio.sleep(warmup)
            cpu0 = _cpu()

        marker = asyncio.create_task(mark_cpu())
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        await marker
        cpu_s = _cpu() - cpu0
    return {
        "requests": len(latencies),
        "answered": answered,
        "rps": len(latencies) / duration,
        "latencies": latencies,
        "errors": errors,
        "wall_s": duration,
        "load_cpu_s": cpu_s,
    }


# ── many waiting jobs ────────────────────────────────────────────────────────


async def fill(spec: dict[str, Any]) -> dict[str, Any]:
    """Create jobs `start`..`start + n - 1` (POST /jobs only; nobody calls back,
    so they stay waiting), `concurrency` at a time, for at most `budget_s`."""
    base, hook, prefix = spec["base"], spec["hook_url"], spec["prefix"]
    start, n, concurrency, budget = spec["start"], spec["n"], spec["concurrency"], spec["budget_s"]
    timeout = spec.get("timeout")
    groups = spec.get("tag_groups")  # tags as scale_tags() when set
    created = 0
    marks: list[tuple[int, float]] = []
    errors: dict[str, int] = {}
    ids = count(start)
    stop = start + n
    t0 = time.perf_counter()
    cpu0 = _cpu()
    stopped_early = False
    async with _session(concurrency) as http:

        async def worker() -> None:
            nonlocal created, stopped_early
            while True:
                i = next(ids)
                if i >= stop:
                    return
                if time.perf_counter() - t0 > budget:
                    stopped_early = True
                    return
                tags = scale_tags(i, groups) if groups else None
                body = _job_body(f"{prefix}-{i}", hook, timeout, tags)
                try:
                    async with http.post(base + "/jobs", data=body, headers=JSON) as r:
                        await r.read()
                        status = r.status
                except (aiohttp.ClientError, TimeoutError) as exc:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    continue
                if status == 201:
                    created += 1
                    if created % 1000 == 0:
                        marks.append((created, time.perf_counter() - t0))
                else:
                    errors[str(status)] = errors.get(str(status), 0) + 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return {
        "created": created,
        "errors": errors,
        "marks": marks,
        "stopped_early": stopped_early,
        "wall_s": wall,
        "load_cpu_s": _cpu() - cpu0,
    }


# ── callbacks to waiting jobs ────────────────────────────────────────────────


async def callbacks(spec: dict[str, Any]) -> dict[str, Any]:
    """POST `succeeded` to each of `targets` ([job_id, callback_url], the jobs
    waiting), `concurrency` at a time, then GET the job until it shows
    `succeeded`. Per callback: [accepted_ms, finished_ms (callback POST → a GET
    shows succeeded), callback_wall (unix time sent)], and its job id."""
    base, targets, concurrency = spec["base"], spec["targets"], spec.get("concurrency", 1)
    out: list[list[float]] = []
    ids: list[str] = []
    errors: dict[str, int] = {}
    todo = iter(targets)
    cpu0 = _cpu()
    t0 = time.perf_counter()

    def error(kind: str) -> None:
        errors[kind] = errors.get(kind, 0) + 1

    async with _session(concurrency) as http:

        async def worker() -> None:
            for job_id, url in todo:
                wall = time.time()
                a = time.perf_counter()
                async with http.post(url, data=SUCCEEDED, headers=JSON) as r:
                    answer = await r.read()
                    status = r.status
                b = time.perf_counter()
                if status != 200 or json.loads(answer).get("outcome") != "accepted":
                    error(f"callback {status} {answer[:80]!r}")
                    continue
                for _ in range(5000):
                    async with http.get(f"{base}/jobs/{job_id}") as r:
                        state = json.loads(await r.read()).get("state")
                    if state == "succeeded":
                        break
                    await asyncio.sleep(0.001)
                else:
                    error("not succeeded within 5000 GETs")
                    continue
                c = time.perf_counter()
                out.append([(b - a) * 1e3, (c - a) * 1e3, wall])
                ids.append(job_id)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {
        "calls": out,
        "ids": ids,
        "errors": errors,
        "wall_s": time.perf_counter() - t0,
        "load_cpu_s": _cpu() - cpu0,
    }


PHASES = {"e2e": e2e, "rps": rps, "fill": fill, "callbacks": callbacks}


def main() -> None:
    spec_path, out_path = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        spec = json.load(f)
    result = asyncio.run(PHASES[spec["phase"]](spec))
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
