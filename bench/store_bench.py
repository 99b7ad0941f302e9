"""Throughput of the embedded SQLite store, alone and under resonate-sdk.

    uv run python bench/store_bench.py                 # everything, ~5 min
    uv run python bench/store_bench.py --quick         # smaller numbers, ~1 min

Three measurements, printed as tables:

1. **store alone** -- the exact request sequence resonate-sdk sends for one
   Tether-shaped workflow (task.create, register_listener, heartbeat, fences,
   suspend, the outside settle, acquire, replayed fences, fulfill, a get)
   replayed through ``SqliteConnection.send`` with no SDK: requests/s and the
   mean cost of each request kind, on an empty store and again after the
   store holds every earlier workflow.
2. **end to end** -- workflows/s through resonate-sdk: ``r.run`` a workflow
   with one ``ctx.promise`` and one ``ctx.run`` step that hands the promise id
   to a fake external system, which settles it with ``r.promises.resolve``
   (what Tether's callback endpoint does) ``--settle-delay`` seconds later,
   so the workflow has suspended and is resumed by the settle -- the path a
   real job takes (execute, acquire, replay, fulfill). Runs ``--workflows`` consecutive
   workflows (``--concurrency`` in flight) on each store, reporting the rate of
   each block of ``--block`` workflows: the curve shows whether cost grows with
   the number of workflows stored. A block slower than ``--budget`` seconds is
   cut short and the store dropped (resonate's in-memory LocalConnection scans
   every promise on hot paths and collapses after a few thousand workflows).
3. **end to end, N processes** -- the same workflow in ``--processes`` OS
   processes sharing one SQLite file (each starts and settles its own jobs),
   the way several Tether processes use one file: aggregate workflows/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from datetime import timedelta
from pathlib import Path
from typing import Any

from resonate.connections.local import LocalConnection
from resonate.context import Context
from resonate.resonate import Resonate
from resonate.types import Value

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from resonate_sqlite.connection import SqliteConnection

GROUP = "bench"
ANY = f"poll://any@{GROUP}"
UNI = f"poll://uni@{GROUP}/p1"

# =============================================================================
# 1. the store alone
# =============================================================================


def _env(kind: str, data: dict[str, Any], n: int) -> str:
    return json.dumps({"kind": kind, "head": {"corrId": f"c{n}", "version": "v"}, "data": data})


def _sub(kind: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"kind": kind, "head": {"corrId": "s", "version": "v"}, "data": data}


def workflow_requests(root: str, now: int) -> list[str]:
    """What resonate-sdk 0.8.1 sends for one workflow with one step and one
    external promise (recorded from the SDK against this store)."""
    p, s = f"{root}:1", f"{root}:2"
    far = now + 3_600_000
    rtags = {
        "resonate:origin": root,
        "resonate:branch": root,
        "resonate:parent": root,
        "resonate:scope": "global",
        "resonate:target": ANY,
    }
    ptags = {
        "resonate:scope": "global",
        "resonate:branch": p,
        "resonate:parent": root,
        "resonate:origin": root,
        "resonate:external": "true",
    }
    stags = {
        "resonate:scope": "local",
        "resonate:branch": root,
        "resonate:parent": root,
        "resonate:origin": root,
    }
    param = {"data": "eyJmdW5jIjoiam9iIiwiYXJncyI6WzFdLCJrd2FyZ3MiOnt9LCJ2ZXJzaW9uIjoxfQ=="}
    create_p = _sub("promise.create", {"id": p, "timeoutAt": far, "param": {}, "tags": ptags})
    create_s = _sub("promise.create", {"id": s, "timeoutAt": far, "param": {}, "tags": stags})
    value = {"data": "eyJvayI6IHRydWV9"}
    reqs = [
        (
            "task.create",
            {
                "pid": "p1",
                "ttl": 60000,
                "action": _sub(
                    "promise.create", {"id": root, "timeoutAt": far, "param": param, "tags": rtags}
                ),
            },
        ),
        ("promise.register_listener", {"awaited": root, "address": UNI}),
        ("task.heartbeat", {"pid": "p1", "tasks": [{"id": root, "version": 1}]}),
        ("task.fence", {"id": root, "version": 1, "action": create_p}),
        ("task.fence", {"id": root, "version": 1, "action": create_s}),
        (
            "task.fence",
            {
                "id": root,
                "version": 1,
                "action": _sub("promise.settle", {"id": s, "state": "resolved", "value": value}),
            },
        ),
        (
            "task.suspend",
            {
                "id": root,
                "version": 1,
                "actions": [_sub("promise.register_callback", {"awaited": p, "awaiter": root})],
            },
        ),
        ("promise.settle", {"id": p, "state": "resolved", "value": value}),
        ("task.acquire", {"id": root, "version": 1, "pid": "p1", "ttl": 60000}),
        ("task.heartbeat", {"pid": "p1", "tasks": [{"id": root, "version": 2}]}),
        ("task.fence", {"id": root, "version": 2, "action": create_p}),
        ("task.fence", {"id": root, "version": 2, "action": create_s}),
        (
            "task.fulfill",
            {
                "id": root,
                "version": 2,
                "action": _sub("promise.settle", {"id": root, "state": "resolved", "value": value}),
            },
        ),
        ("promise.get", {"id": root}),
    ]
    return [_env(kind, data, n) for n, (kind, data) in enumerate(reqs)]


async def bench_store_alone(
    db: Path, workflows: int, rounds: int, streams: int, **options: Any
) -> list[dict[str, Any]]:
    """``rounds`` rounds of ``workflows`` workflows' requests; ``streams``
    workflows are replayed concurrently (each one's requests in order)."""
    conn = SqliteConnection(db, group=GROUP, pid="p1", **options)
    conn.recv(lambda msg: None)  # a receiver: executes/unblocks stay in process
    await conn.start()
    rows = []
    now = int(time.time() * 1000)
    for rnd in range(rounds):
        per_kind: dict[str, list[float]] = defaultdict(list)
        todo = [f"s{rnd}-{i}" for i in range(workflows)]

        async def stream(ids: list[str], per_kind: dict[str, list[float]] = per_kind) -> None:
            for root in ids:
                for req in workflow_requests(root, now):
                    t = time.perf_counter()
                    resp = await conn.send(req)
                    kind = req[10 : req.index('"', 10)]
                    per_kind[kind].append(time.perf_counter() - t)
                    if '"status":4' in resp or '"status":5' in resp:
                        raise RuntimeError(f"{kind}: {resp}")

        t0 = time.perf_counter()
        await asyncio.gather(*(stream(todo[k::streams]) for k in range(streams)))
        dt = time.perf_counter() - t0
        n = sum(len(v) for v in per_kind.values())
        rows.append(
            {
                "stored": rnd * workflows * 3,
                "requests": n,
                "req_s": n / dt,
                "wf_s": workflows / dt,
                "per_kind": {k: statistics.mean(v) * 1e6 for k, v in per_kind.items()},
            }
        )
    await conn.stop()
    return rows


# =============================================================================
# 2. end to end through the SDK
# =============================================================================


async def bench_end_to_end(
    make_conn: Any,
    workflows: int,
    block: int,
    concurrency: int,
    budget: float,
    prefix: str = "w",
    ready: Any = None,
    settle_delay: float = 0.05,
) -> list[tuple[int, int, float, float, float]]:
    """Rows of (first, last, seconds, workflows/s, CPU ms per workflow) per
    block. CPU time (this process, all threads) does not depend on what else
    the machine runs, so it shows whether the cost per workflow grows. ``ready``
    is awaited once everything is set up, before the clock starts."""
    conn = make_conn()
    if isinstance(conn, SqliteConnection):
        await conn.start()
    r = Resonate(network=conn, group=GROUP, pid="p1", subscription_refresh_secs=0)
    outside: asyncio.Queue[str] = asyncio.Queue()

    async def trigger(ctx: Context, promise_id: str) -> str:
        outside.put_nowait(promise_id)  # the external system got the callback URL
        return "triggered"

    async def job(ctx: Context, n: int) -> dict[str, Any]:
        p = ctx.promise(timeout=timedelta(hours=1))
        receipt = await ctx.run(trigger, await p.id())
        outcome = await p
        return {"n": n, "receipt": receipt, "outcome": outcome}

    r.register(job)

    async def settle_later(pid: str) -> None:
        await asyncio.sleep(settle_delay)  # the external job runs a while
        await r.promises.resolve(pid, Value(data={"status": "succeeded"}))

    callbacks: set[asyncio.Task[None]] = set()

    async def external_system() -> None:
        while True:
            task = asyncio.create_task(settle_later(await outside.get()))
            callbacks.add(task)
            task.add_done_callback(callbacks.discard)

    settlers = [asyncio.create_task(external_system())]
    sema = asyncio.Semaphore(concurrency)
    rows: list[tuple[int, int, float, float, float]] = []

    async def one(i: int) -> None:
        async with sema:
            result = await r.run(f"{prefix}{i}", job, i).result()
            assert result["n"] == i

    if ready is not None:
        await ready()
    try:
        for first in range(0, workflows, block):
            last = min(first + block, workflows)
            t0, c0 = time.perf_counter(), time.process_time()
            tasks = [asyncio.create_task(one(i)) for i in range(first, last)]
            done, pending = await asyncio.wait(tasks, timeout=budget)
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            for t in done:
                t.result()
            n = max(len(done), 1)
            rows.append((first, first + len(done), dt, len(done) / dt, cpu / n * 1000))
            if pending:
                for t in pending:
                    t.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                break
    finally:
        for t in settlers:
            t.cancel()
        await asyncio.wait_for(r.stop(), 30)
    return rows


def _process_main(
    db: str, workflows: int, concurrency: int, index: int, q: Any, barrier: Any, options: Any
) -> None:
    logging.basicConfig(level=logging.CRITICAL)
    t0 = 0.0

    async def ready() -> None:
        nonlocal t0
        await asyncio.to_thread(barrier.wait)  # every process set up: go
        t0 = time.time()

    async def run() -> tuple[float, float, int]:
        rows = await bench_end_to_end(
            lambda: SqliteConnection(db, group=GROUP, pid=f"proc{index}", **options),
            workflows,
            workflows,
            concurrency,
            600,
            prefix=f"p{index}-",
            ready=ready,
        )
        return t0, time.time(), rows[0][1] - rows[0][0]

    q.put(asyncio.run(run()))


def bench_processes(
    db: Path, processes: int, workflows: int, concurrency: int, **options: Any
) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    barrier = ctx.Barrier(processes)
    procs = [
        ctx.Process(
            target=_process_main,
            args=(str(db), workflows, concurrency, i, q, barrier, options),
        )
        for i in range(processes)
    ]
    for p in procs:
        p.start()
    results = [q.get(timeout=900) for _ in procs]
    for p in procs:
        p.join()
    start = min(r[0] for r in results)
    end = max(r[1] for r in results)
    done = sum(r[2] for r in results)
    return {
        "processes": processes,
        "workflows": done,
        "seconds": end - start,
        "wf_s": done / (end - start),
    }


# =============================================================================
# main
# =============================================================================


def _sqlite_factory(db: Path) -> Any:
    return lambda: SqliteConnection(db, group=GROUP, pid="p1")


def _memory_factory() -> Any:
    return lambda: LocalConnection(pid="p1", group=GROUP)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workflows", type=int, default=20_000)
    ap.add_argument("--block", type=int, default=5_000)
    ap.add_argument("--concurrency", type=int, default=200)
    ap.add_argument("--budget", type=float, default=60.0, help="seconds per block before giving up")
    ap.add_argument("--stores", default="sqlite,memory")
    ap.add_argument("--alone", type=int, default=2_000, help="workflows per store-alone round")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.workflows, args.block, args.alone, args.budget = 4_000, 2_000, 500, 20.0
    logging.basicConfig(level=logging.CRITICAL)
    tmp = Path(tempfile.mkdtemp(prefix="store-bench-"))
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, files in {tmp}\n")

    print("1. store alone: the SDK's requests for one workflow, replayed through send()")
    print(f"   {'mode':<34} {'promises stored':>16} {'requests':>9} {'req/s':>8} {'wf/s':>7}")
    modes = [
        ("1 stream, group commit", 1, {}),
        ("1 stream, one txn per request", 1, {"group_commit": False}),
        ("64 streams, group commit", 64, {}),
        ("64 streams, one txn per request", 64, {"group_commit": False}),
    ]
    last: list[dict[str, Any]] = []
    for n, (label, streams, options) in enumerate(modes):
        db = tmp / f"alone-{n}.db"
        rounds = asyncio.run(bench_store_alone(db, args.alone, 3, streams, **options))
        for row in rounds:
            print(
                f"   {label:<34} {row['stored']:>16,} {row['requests']:>9,} "
                f"{row['req_s']:>8,.0f} {row['wf_s']:>7,.0f}"
            )
        if n == 0:
            last = rounds
    print("   mean latency per request kind (1 stream, group commit, last round):")
    for kind, us in sorted(last[-1]["per_kind"].items(), key=lambda kv: -kv[1]):
        print(f"     {kind:<28} {us:7.1f} us")

    print(
        f"\n2. end to end through resonate-sdk: {args.workflows:,} workflows, "
        f"{args.concurrency} in flight, blocks of {args.block:,}"
    )
    print(f"   {'store':<8} {'workflows':>15} {'seconds':>8} {'wf/s':>7} {'CPU ms/wf':>10}")
    summary = {}
    for store in args.stores.split(","):
        make = _sqlite_factory(tmp / "e2e.db") if store == "sqlite" else _memory_factory()

        t0 = time.perf_counter()
        rows = asyncio.run(
            bench_end_to_end(make, args.workflows, args.block, args.concurrency, args.budget)
        )
        for first, last, dt, rate, cpu_ms in rows:
            full = last - first == min(args.block, args.workflows - first)
            cut = "" if full else "  (cut: budget)"
            span = f"{first:>6,}-{last:<8,}"
            print(f"   {store:<8} {span} {dt:>8.1f} {rate:>7,.0f} {cpu_ms:>10.2f}{cut}")
        total = sum(row[1] - row[0] for row in rows)
        summary[store] = (total, time.perf_counter() - t0)
    for store, (total, dt) in summary.items():
        print(f"   {store:<8} overall: {total:,} workflows in {dt:.1f} s = {total / dt:,.0f} wf/s")

    if args.processes > 1:
        per = args.workflows // args.processes // 2
        print(
            f"\n3. end to end, {args.processes} OS processes on one SQLite file "
            f"({per:,} workflows each)"
        )
        res = bench_processes(tmp / "multi.db", args.processes, per, args.concurrency)
        print(
            f"   {res['workflows']:,} workflows in {res['seconds']:.1f} s = "
            f"{res['wf_s']:,.0f} wf/s aggregate"
        )


if __name__ == "__main__":
    main()
