"""What the store does per job: SQLite statements, transactions, protocol requests.

    python bench/_commits.py drive [--jobs 1000] [--concurrency 8] [--root DIR] [--plain]
    python bench/_commits.py drive --record stream.jsonl   # and keep what the engine was asked
    python bench/_commits.py replay stream.jsonl [--root DIR] [--answers FILE]
    TETHER_BENCH_COUNTS=/tmp/counts.json python bench/_commits.py serve --port N --workers 1

``serve`` runs ``tether`` itself (``api.cli.main``) with the arguments given,
counting: it wraps ``sqlite3.connect`` so every connection the service opens
(the engine's, the job index's, the checkpointer's) reports each statement it
runs (``set_trace_callback``; ``TETHER_BENCH_TRACE=0`` turns that off), and
wraps the embedded engine's ``run_batch`` to count the batches, their
requests by kind, and the engine's CPU time answering them (the thread's CPU
inside ``run_batch``). Every half second the totals go to the file named
by ``TETHER_BENCH_COUNTS`` as JSON: ``{"commits": n, "begins": n,
"statements": n, "checkpoints": n, "requests": n, "batches": n,
"engine_cpu_us": n, "by_kind": {...}, "by_request": {...}}``. With one worker
only (uvicorn runs the app in this process). ``TETHER_BENCH_RECORD=FILE``
appends every batch the engine answers to FILE, one JSON line each.

``drive`` does the whole measurement: a webhook receiver (bench/_receiver.py),
``serve`` on a fresh SQLite file, ``--warmup`` jobs end to end (not counted),
then ``--jobs`` jobs at ``--concurrency`` (bench/_load.py's e2e phase), and
prints the difference per job: statements by kind, transactions, requests by
kind, the engine's CPU and the whole service's (user + system, from
``/proc``). Tracing statements costs CPU: take CPU figures from ``--plain``
runs. ``--store`` serves from another store (a Postgres database). ``--root``
runs another checkout's code (a clone of the last commit, for before/after);
``--py-spy`` profiles the measured jobs; ``--callback-delay`` holds each
callback that long after its trigger, so that every workflow has suspended
first, as a real job's has (at 0 the callback often lands before).

``replay`` answers a recorded stream again, in process, on a fresh file and
the recorded clock: the engine's CPU per request (the best and the median of
``--repeat`` passes) and its statements per job, with another connection
committing between batches as the job index does in the service (each such
commit empties the engine's page cache; ``--alone`` leaves it out).
``--answers`` writes every answer and the final tables: two checkouts'
files must be equal (``cmp``), a check that a change kept the protocol's
answers.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = Path(os.environ.get("TETHER_BENCH_ROOT") or BENCH.parent).resolve()
sys.path.insert(0, str(ROOT))
sys.dont_write_bytecode = True

COUNTS: Counter[str] = Counter()
_LOCK = threading.Lock()
_connect = sqlite3.connect


def _kind(sql: str) -> str:
    words = sql.lstrip().split(None, 3)
    head = words[0].upper() if words else ""
    if head in ("INSERT", "UPDATE", "DELETE", "SELECT", "WITH") and len(words) > 2:
        # the table: INSERT INTO t / UPDATE t / DELETE FROM t / SELECT ... FROM t
        upper = sql.upper()
        at = upper.find(" INTO ") if head == "INSERT" else upper.find(" FROM ")
        if head == "UPDATE":
            return f"UPDATE {words[1]}"
        if at >= 0:
            table = sql[at + 6 :].split(None, 1)[0].strip("( ")
            return f"{head} {table}"
    return head


def _traced(*args: Any, **kwargs: Any) -> sqlite3.Connection:
    conn = _connect(*args, **kwargs)

    def trace(sql: str) -> None:
        kind = _kind(sql)
        with _LOCK:
            COUNTS["statements"] += 1
            COUNTS[f"kind:{kind}"] += 1
            if kind == "COMMIT":
                COUNTS["commits"] += 1
            elif kind == "BEGIN":
                COUNTS["begins"] += 1
            elif "wal_checkpoint" in sql:
                COUNTS["checkpoints"] += 1

    conn.set_trace_callback(trace)
    return conn


def _count_requests(record: Path | None, kinds: bool) -> None:
    """Count what reaches the engine: the batches, their requests (by kind
    with ``kinds``) and the engine's CPU time answering them
    (``engine_cpu_us``, the thread's CPU inside ``run_batch``, which
    includes the job index's writes it carries); with
    ``record``, append each batch to it as a JSON line (see ``replay``)."""
    from resonate_sqlite.engine import Engine

    # `run_batch` (with the job index's writes as extras) where the engine
    # has it; an older checkout's (`--root`) answers through `handle_batch`
    name = "run_batch" if hasattr(Engine, "run_batch") else "handle_batch"
    handle_batch = getattr(Engine, name)
    out = None if record is None else record.open("a", encoding="utf-8")

    def counted(self: Engine, reqs: list[str | bytes], *extras: Any) -> Any:
        if out is not None:
            line = {
                "now": self.clock(),
                "local": sorted(self.local_addresses),
                "room": self.local_room,
                "reqs": [r if isinstance(r, str) else r.decode() for r in reqs],
            }
            out.write(json.dumps(line) + "\n")
            out.flush()
        if kinds:
            with _LOCK:
                for req in reqs:
                    try:
                        kind = json.loads(req).get("kind")
                    except (ValueError, AttributeError):
                        kind = None
                    COUNTS[f"request:{kind}"] += 1
        t0 = time.thread_time_ns()
        try:
            return handle_batch(self, reqs, *extras)
        finally:
            spent = time.thread_time_ns() - t0
            with _LOCK:
                COUNTS["batches"] += 1
                COUNTS["requests"] += len(reqs)
                COUNTS["engine_cpu_us"] += spent // 1000

    setattr(Engine, name, counted)


def _dump(path: Path) -> None:
    while True:
        time.sleep(0.5)
        with _LOCK:
            snapshot = dict(COUNTS)
        by_kind = {k[5:]: v for k, v in snapshot.items() if k.startswith("kind:")}
        by_request = {k[8:]: v for k, v in snapshot.items() if k.startswith("request:")}
        totals = {k: v for k, v in snapshot.items() if ":" not in k}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**totals, "by_kind": by_kind, "by_request": by_request}))
        tmp.replace(path)


def serve(argv: list[str]) -> int:
    counts = os.environ.get("TETHER_BENCH_COUNTS")
    if counts:
        trace = os.environ.get("TETHER_BENCH_TRACE", "1") != "0"
        if trace:
            sqlite3.connect = _traced  # type: ignore[assignment]
        record = os.environ.get("TETHER_BENCH_RECORD")
        _count_requests(Path(record) if record else None, kinds=trace)
        threading.Thread(
            target=_dump, args=(Path(counts),), daemon=True, name="bench-counts"
        ).start()
    from api.cli import main as tether

    return tether(argv)


# -- drive ------------------------------------------------------------------------


def _read(path: Path) -> dict[str, Any]:
    time.sleep(1.2)  # two dumps: the last statements are in the file
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _per_job(before: dict[str, Any], after: dict[str, Any], jobs: int) -> dict[str, Any]:
    def diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
        keys = set(a) | set(b)
        return {k: (b.get(k, 0) - a.get(k, 0)) / jobs for k in keys if b.get(k, 0) != a.get(k, 0)}

    flat_a = {k: v for k, v in before.items() if not isinstance(v, dict)}
    flat_b = {k: v for k, v in after.items() if not isinstance(v, dict)}
    return {
        **diff(flat_a, flat_b),
        "by_kind": diff(before.get("by_kind", {}), after.get("by_kind", {})),
        "by_request": diff(before.get("by_request", {}), after.get("by_request", {})),
    }


def drive(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(BENCH))
    from _common import free_port, percentile, tree_cpu_seconds, wait_http

    py = sys.executable
    root = Path(args.root).resolve()
    out = Path(tempfile.mkdtemp(prefix="commits-"))
    counts = out / "counts.json"
    recv_port, port = free_port(), free_port()
    receiver = f"http://127.0.0.1:{recv_port}"
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    recv = subprocess.Popen(
        [py, str(BENCH / "_receiver.py"), "--port", str(recv_port)],
        stdout=(out / "receiver.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    senv = env | {
        "TETHER_STORE": args.store or f"sqlite:///{out / 'tether.db'}",
        "TETHER_PUBLIC_URL": base,
        "TETHER_CALLBACK_SECRET": "bench-callback-secret",
        "TETHER_BENCH_ROOT": str(root),
    }
    senv["TETHER_BENCH_COUNTS"] = str(counts)
    if args.plain:
        senv["TETHER_BENCH_TRACE"] = "0"
    elif args.record:
        senv["TETHER_BENCH_RECORD"] = str(Path(args.record).resolve())
    svc = subprocess.Popen(
        [py, str(Path(__file__).resolve()), "serve", "--port", str(port), "--workers", "1"],
        env=senv,
        cwd=root,
        stdout=(out / "service.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_http(receiver + "/stats", 30)
        wait_http(base + "/health", 60)
        spec = {
            "phase": "e2e",
            "base": base,
            "hook_url": receiver + "/hook",
            "events_url": receiver + "/events",
            "concurrency": args.concurrency,
            "callback_delay_s": args.callback_delay,
            "budget_s": 600,
        }

        def load(n: int, prefix: str) -> dict[str, Any]:
            spec_path, res_path = out / f"{prefix}.spec.json", out / f"{prefix}.result.json"
            spec_path.write_text(json.dumps(spec | {"n": n, "prefix": prefix}))
            load_py = [py, str(BENCH / "_load.py"), str(spec_path), str(res_path)]
            subprocess.run(load_py, check=True)
            result: dict[str, Any] = json.loads(res_path.read_text())
            return result

        load(args.warmup, "warm")
        time.sleep(1.0)  # let the warm-up's last workflows finish
        before = _read(counts)
        spy = None
        if args.py_spy:  # the measured phase only
            profile = out / "profile.txt"
            spy_argv = [args.py_spy, "record", "-p", str(svc.pid), "--nonblocking", "-r", "200"]
            spy_argv += ["--format", "raw", "-o", str(profile)]
            spy = subprocess.Popen(spy_argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            time.sleep(1.0)  # let it attach
        cpu0 = tree_cpu_seconds(svc.pid)
        r = load(args.jobs, "e2e")
        time.sleep(1.0)
        cpu = tree_cpu_seconds(svc.pid) - cpu0
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        after = _read(counts)
        jobs = len(r["jobs"])
        report: dict[str, Any] = {
            "root": str(root),
            "jobs": jobs,
            "errors": r["errors"],
            "jobs_per_s": jobs / r["wall_s"],
            "service_cpu_ms_per_job": cpu / max(jobs, 1) * 1e3,
            "callback_to_get_succeeded_ms (p50, p99)": [
                round(percentile([j[3] for j in r["jobs"]], q), 1) for q in (50, 99)
            ],
        }
        if spy is not None:
            report["profile"] = str(profile)
        report |= _per_job(before, after, max(jobs, 1))
        print(json.dumps(report, indent=1, sort_keys=True))
    finally:
        for child in (svc, recv):
            child.terminate()
            try:
                child.wait(20)
            except subprocess.TimeoutExpired:
                child.kill()
    return 0


# -- replay -----------------------------------------------------------------------


def _roots(batches: list[dict[str, Any]]) -> int:
    """The jobs a recorded stream started: its creates of a root promise (a
    job's id, or "{id}~N"; its other promises' ids have a ':')."""
    n = 0
    for b in batches:
        for raw in b["reqs"]:
            req = json.loads(raw)
            if req.get("kind") == "promise.create" and ":" not in req["data"]["id"]:
                n += 1
    return n


def replay(args: argparse.Namespace) -> int:
    """Run a recorded request stream against a fresh engine, in process."""
    if Path(args.root).resolve() != ROOT:  # import the other checkout's engine
        env = os.environ | {"TETHER_BENCH_ROOT": str(Path(args.root).resolve())}
        return subprocess.run([sys.executable, *sys.argv], env=env, check=False).returncode
    from resonate_sqlite.engine import Engine
    from resonate_sqlite.schema import TABLES

    batches = [json.loads(line) for line in Path(args.file).read_text().splitlines()]
    requests = sum(len(b["reqs"]) for b in batches)
    now = [0]

    def run(trace: Counter[str] | None, answers: Any) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            eng = Engine(Path(tmp) / "r.db", clock=lambda: now[0])
            eng.open(timeout=5.0)
            assert eng.db is not None
            if trace is not None:
                eng.db.set_trace_callback(lambda sql: trace.update((_kind(sql),)))
            # In the service other connections (the job index, the other
            # workers) commit between the engine's batches, and each of their
            # commits empties the engine's page cache: do the same.
            other = sqlite3.connect(Path(tmp) / "r.db", isolation_level=None)
            other.execute("PRAGMA synchronous = NORMAL")
            other.execute("CREATE TABLE bench_other (x INTEGER)")
            cpu = 0.0
            for b in batches:
                if not args.alone:
                    other.execute("INSERT INTO bench_other VALUES (1)")
                now[0] = b["now"]
                eng.local_addresses = set(b["local"])
                eng.local_room = b["room"]
                t0 = time.process_time()
                out = eng.handle_batch(b["reqs"])
                cpu += time.process_time() - t0
                if answers is not None:
                    for a in out:
                        if isinstance(a, Exception):
                            answers.write(f"exception {a!r}\n")
                        else:
                            resp, msgs, released = a
                            answers.write(f"{resp.decode()} {msgs} {released}\n")
            if answers is not None:
                eng.db.set_trace_callback(None)
                for table in TABLES:
                    for row in eng.db.execute(f"SELECT * FROM {table} ORDER BY 1"):
                        answers.write(f"{table} {row}\n")
            eng.close()
            other.close()
            return cpu

    if args.answers:
        with Path(args.answers).open("w", encoding="utf-8") as f:
            run(None, f)
    counts: Counter[str] = Counter()
    run(counts, None)
    times = sorted(run(None, None) for _ in range(args.repeat)) or [0.0]
    jobs = args.jobs or _roots(batches) or 1
    report = {
        "root": str(ROOT),
        "batches": len(batches),
        "requests": requests,
        "cpu_us_per_request (min, median)": [
            round(times[0] / requests * 1e6, 2),
            round(times[len(times) // 2] / requests * 1e6, 2),
        ],
        "statements_per_request": round(sum(counts.values()) / requests, 3),
        "per_job (root promises created, unless --jobs)": {
            k: round(v / jobs, 3) for k, v in sorted(counts.items())
        },
    }
    print(json.dumps(report, indent=1))
    return 0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        return serve(sys.argv[1:])  # "serve ..." is tether's own command line
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("drive", help="measure per-job counts end to end")
    d.add_argument("--jobs", type=int, default=1000)
    d.add_argument("--warmup", type=int, default=200)
    d.add_argument("--concurrency", type=int, default=8)
    d.add_argument(
        "--callback-delay",
        type=float,
        default=0.0,
        help="seconds each callback waits after its trigger (a real job's callback comes"
        " after the workflow suspended; at 0 it often comes before)",
    )
    d.add_argument("--root", default=str(BENCH.parent), help="the checkout whose code runs")
    d.add_argument(
        "--store",
        help="TETHER_STORE for the service instead of a fresh SQLite file (an empty"
        " postgresql://... database with resonate.sql applied: the statement and request"
        " counts are then the embedded engine's only, so zero)",
    )
    d.add_argument(
        "--plain",
        action="store_true",
        help="trace no statements: CPU per job (service, engine) and requests only",
    )
    d.add_argument("--py-spy", help="py-spy to profile the measured jobs with (raw stacks, 200 Hz)")
    d.add_argument("--record", help="append every batch the engine answers to this file")
    r = sub.add_parser("replay", help="time a recorded request stream in process")
    r.add_argument("file")
    r.add_argument("--root", default=str(ROOT), help="the checkout whose engine runs")
    r.add_argument("--repeat", type=int, default=5)
    r.add_argument(
        "--jobs", type=int, help="jobs in the stream (default: the root promises it creates)"
    )
    r.add_argument("--answers", help="write every answer and the final tables here")
    r.add_argument(
        "--alone", action="store_true", help="no commit by another connection between batches"
    )
    args = parser.parse_args()
    return drive(args) if args.cmd == "drive" else replay(args)


if __name__ == "__main__":
    sys.exit(main())
