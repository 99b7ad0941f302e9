"""Tether's benchmark: the real service, a real webhook receiver, a separate load process.

    ./dev bench            # full: 20,000 jobs end to end, 100,000 waiting jobs (~15-20 min)
    ./dev bench --quick    # small counts (~2 min), to check that it all works

See bench/README.md for what each figure means. Everything runs on 127.0.0.1:

- `tether serve` (`.venv/bin/tether`), once per store (`sqlite:///…` in a fresh
  temporary directory, `memory://`);
- bench/_receiver.py, an aiohttp webhook receiver in its own process;
- bench/_load.py, the aiohttp load generator, in its own process per phase;
- bench/_ceiling.py, a plain Litestar app with one constant endpoint, served by
  uvicorn with `tether serve`'s options: the machine's ceiling in the same run.

Logs, load results and profiles go to a directory under /tmp (printed at the
end); nothing is written into the repository.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.dont_write_bytecode = True  # leave no __pycache__ in bench/

from _common import (  # noqa: E402
    free_port,
    http,
    percentile,
    tree_cpu_seconds,
    tree_rss_kb,
    wait_http,
)
from _profile import summarise  # noqa: E402

PY = sys.executable
SECRET = "bench-callback-secret"


# ── modes ────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Mode:
    name: str
    jobs: int  # consecutive end-to-end jobs per store
    warmup: int  # end-to-end jobs run first and not counted
    edge: int  # "first N" vs "last N" jobs for the sustained ratio
    curve_block: int  # jobs per point of the printed curve
    waiting: int  # jobs left waiting for the RSS / restart figures
    warm: int  # waiting jobs created before the RSS baseline
    get_seconds: float  # length of each requests/s measurement
    e2e_budget: float  # seconds before an end-to-end run is cut short
    fill_budget: float  # seconds before creating waiting jobs is cut short
    memory_budget: float  # both budgets on memory://, which slows down as it fills


FULL = Mode("full", 20_000, 200, 5_000, 2_000, 100_000, 1_000, 10.0, 900.0, 1500.0, 300.0)
QUICK = Mode("quick", 1_000, 100, 250, 250, 2_000, 300, 3.0, 60.0, 60.0, 45.0)


# ── child processes ──────────────────────────────────────────────────────────


class Child:
    """A child process in its own session (so its workers can be signalled as a
    group), output to `log`."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.argv, self.env, self.log = argv, env, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    def start(self) -> Child:
        with self.log.open("ab") as out:
            self.started = time.perf_counter()
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 20.0) -> float:
        """SIGTERM, then SIGKILL to the whole group after `grace` s; returns the
        seconds it took to exit."""
        if not self.alive():
            return 0.0
        assert self.proc is not None
        start = time.perf_counter()
        self.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(grace)
        took = time.perf_counter() - start
        self.kill()
        return took

    def kill(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):  # the group: uvicorn's workers too
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any TETHER_* of the caller's (the service runs
    with its defaults), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env.update(extra)
    return env


@dataclass
class Service:
    store: str  # "sqlite" or "memory"
    url: str  # TETHER_STORE
    workers: int
    port: int
    log: Path
    child: Child | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready_timeout: float = 120.0) -> float:
        """Start `tether serve`; return the seconds until /health answered."""
        exe = shutil.which("tether", path=str(Path(PY).parent)) or "tether"
        env = clean_env(
            TETHER_STORE=self.url,
            TETHER_PUBLIC_URL=self.base,
            TETHER_CALLBACK_SECRET=SECRET,
        )
        argv = [exe, "serve", "--port", str(self.port), "--workers", str(self.workers)]
        self.child = Child(argv, env, self.log).start()
        wait_http(self.base + "/health", ready_timeout)
        return time.perf_counter() - self.child.started

    def stop(self) -> float:
        return self.child.stop() if self.child else 0.0

    def rss_kb(self) -> int:
        assert self.child is not None
        return tree_rss_kb(self.child.pid)[0]

    def cpu(self) -> float:
        assert self.child is not None
        return tree_cpu_seconds(self.child.pid)


# ── the load process ─────────────────────────────────────────────────────────


class Runner:
    def __init__(self, out: Path, args: argparse.Namespace) -> None:
        self.out = out
        self.args = args
        self.n = 0

    def load(self, spec: dict[str, Any], watch: Service | None = None) -> dict[str, Any]:
        """Run one phase of bench/_load.py in its own process; add the CPU the
        service used meanwhile (`service_cpu_s`)."""
        self.n += 1
        spec_path = self.out / f"load-{self.n}-{spec['phase']}.spec.json"
        out_path = self.out / f"load-{self.n}-{spec['phase']}.result.json"
        spec_path.write_text(json.dumps(spec))
        cpu0 = watch.cpu() if watch else 0.0
        start = time.perf_counter()
        subprocess.run(
            [PY, str(BENCH / "_load.py"), str(spec_path), str(out_path)], check=True, cwd=ROOT
        )
        result: dict[str, Any] = json.loads(out_path.read_text())
        result["phase_wall_s"] = time.perf_counter() - start
        if watch:
            result["service_cpu_s"] = watch.cpu() - cpu0
        return result


class Profiler:
    """py-spy attached to a running service (and its worker processes)."""

    def __init__(self, exe: str | None, pid: int, out: Path) -> None:
        self.out = out
        self.proc: subprocess.Popen[bytes] | None = None
        if exe:
            argv = [exe, "record", "-p", str(pid), "--subprocesses", "--nonblocking"]
            argv += ["-r", "100", "--format", "raw", "-o", str(out)]
            log = out.with_suffix(".log").open("wb")
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
            time.sleep(1.0)  # let it attach

    def stop(self, ms_per_job: float | None = None) -> str | None:
        if self.proc is None:
            return None
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        return summarise(self.out, 25, ms_per_job) if self.out.exists() else None


# ── reading the service log ──────────────────────────────────────────────────

FINISHED = re.compile(
    r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}).*?job (\S+) finished: (\w+)", re.ASCII
)


def finished_jobs(log: Path, prefix: str) -> dict[str, float]:
    """Job id -> unix time its workflow's finish step logged "finished", for ids
    starting with `prefix`."""
    out: dict[str, float] = {}
    with log.open(errors="replace") as f:
        for line in f:
            if "finished:" not in line:
                continue
            m = FINISHED.search(line)
            if m and m.group(3).startswith(prefix):
                t = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S"))
                out[m.group(3)] = t + int(m.group(2)) / 1000
    return out


def wait_finished(log: Path, prefix: str, n: int, timeout: float) -> dict[str, float]:
    deadline = time.perf_counter() + timeout
    while True:
        done = finished_jobs(log, prefix)
        if len(done) >= n or time.perf_counter() > deadline:
            return done
        time.sleep(0.25)


def wait_received(receiver: str, n: int, timeout: float) -> int:
    """Wait until the receiver has seen `n` triggers; return how many it saw."""
    deadline = time.perf_counter() + timeout
    last, last_change = -1, time.perf_counter()
    while True:
        _, stats = http("GET", receiver + "/stats")
        got = int(stats["received"]) if isinstance(stats, dict) else 0
        if got != last:
            last, last_change = got, time.perf_counter()
        if got >= n or time.perf_counter() > deadline or time.perf_counter() - last_change > 30:
            return got
        time.sleep(0.2)


# ── results ──────────────────────────────────────────────────────────────────


@dataclass
class Ceiling:
    workers: int
    rps: float = math.nan
    p50: float = math.nan
    p99: float = math.nan
    rss_mb: float = math.nan
    ready_s: float = math.nan
    load_cpu: float = math.nan


@dataclass
class StoreResult:
    store: str
    workers: int
    ceiling: Ceiling
    jobs_ok: int = 0
    jobs_asked: int = 0
    e2e_rate: float = math.nan
    post_p50: float = math.nan
    post_p99: float = math.nan
    cbfin_p50: float = math.nan
    cbfin_p99: float = math.nan
    cbacc_p50: float = math.nan
    cbacc_p99: float = math.nan
    cbwf_p50: float = math.nan
    cbwf_p99: float = math.nan
    trig_p50: float = math.nan
    trig_p99: float = math.nan
    first_rate: float = math.nan
    last_rate: float = math.nan
    curve: list[tuple[int, float]] = field(default_factory=list)
    e2e_note: str = ""
    cpu_ms_per_job: float = math.nan
    load_cpu: float = math.nan
    get_rps: float = math.nan
    get_p50: float = math.nan
    get_p99: float = math.nan
    get_load_cpu: float = math.nan
    get_note: str = ""
    rss_idle_mb: float = math.nan
    rss_warm_mb: float = math.nan
    rss_full_mb: float = math.nan
    waiting: int = 0
    growth_b: float = math.nan
    fill_rate: float = math.nan
    fill_note: str = ""
    shutdown_s: float = math.nan
    restart_s: float = math.nan
    restart_rss_mb: float = math.nan
    restart_note: str = ""
    profiles: dict[str, str] = field(default_factory=dict)


def rate_curve(times: list[float], t0: float, block: int) -> list[tuple[int, float]]:
    """(jobs done so far, jobs/s within the block) for each block of `block`
    consecutive completions in time order."""
    ordered = sorted(times)
    out: list[tuple[int, float]] = []
    prev = t0
    for end in range(block, len(ordered) + 1, block):
        t = ordered[end - 1]
        out.append((end, block / max(t - prev, 1e-9)))
        prev = t
    return out


def window_rate(ordered: list[float], t0: float, lo: int, hi: int) -> float:
    """Jobs/s of completions lo..hi-1 (0-based, time order)."""
    start = t0 if lo == 0 else ordered[lo - 1]
    return (hi - lo) / max(ordered[hi - 1] - start, 1e-9)


# ── the phases ───────────────────────────────────────────────────────────────


def measure_ceiling(
    runner: Runner, workers: int, concurrency: int, mode: Mode, out: Path
) -> Ceiling:
    port = free_port()
    log = out / f"ceiling-w{workers}.log"
    argv = [PY, "-B", str(BENCH / "_ceiling.py"), "--port", str(port), "--workers", str(workers)]
    child = Child(argv, clean_env(), log).start()
    base = f"http://127.0.0.1:{port}"
    c = Ceiling(workers)
    try:
        wait_http(base + "/health", 60)
        c.ready_s = time.perf_counter() - child.started
        time.sleep(1.0)
        c.rss_mb = tree_rss_kb(child.pid)[0] / 1024
        r = runner.load(
            {
                "phase": "rps",
                "urls": [base + "/c"],
                "concurrency": concurrency,
                "duration": mode.get_seconds,
                "warmup": 1.0,
            }
        )
        c.rps = r["rps"]
        c.p50, c.p99 = percentile(r["latencies"], 50), percentile(r["latencies"], 99)
        c.load_cpu = r["load_cpu_s"] / r["wall_s"]
    finally:
        child.stop()
    return c


def run_e2e(
    runner: Runner,
    svc: Service,
    res: StoreResult,
    receiver: str,
    mode: Mode,
    concurrency: int,
    pyspy: str | None,
    out: Path,
) -> list[str]:
    prefix = f"e2e{svc.port}"
    res.jobs_asked = mode.jobs
    budget = mode.e2e_budget if svc.store != "memory" else mode.memory_budget
    spec = {
        "phase": "e2e",
        "base": svc.base,
        "hook_url": receiver + "/hook",
        "events_url": receiver + "/events",
        "concurrency": concurrency,
    }
    if mode.warmup:  # imports, caches, connection pools: not counted
        runner.load({**spec, "n": mode.warmup, "prefix": f"warm{svc.port}", "budget_s": budget})
    prof = Profiler(pyspy, svc.child.pid, out / f"profile-{svc.store}-e2e.txt") if pyspy else None
    r = runner.load({**spec, "n": mode.jobs, "prefix": prefix, "budget_s": budget}, watch=svc)
    summary = prof.stop(r["service_cpu_s"] / max(len(r["jobs"]), 1) * 1e3) if prof else None
    if summary:
        res.profiles["end to end"] = summary
    jobs, t0_wall = r["jobs"], r["t0_wall"]
    res.jobs_ok = len(jobs)
    done = wait_finished(svc.log, prefix, len(jobs), timeout=120)
    ids = [f"{prefix}-{i}" for i in range(mode.jobs)]
    notes = []
    if r["stopped_early"]:
        notes.append(f"cut short after {budget:g} s")
    if r["errors"]:
        notes.append("errors: " + ", ".join(f"{k} x{v}" for k, v in r["errors"].items()))
    if len(done) < len(jobs):
        notes.append(f"only {len(done)} of {len(jobs)} workflows finished within 120 s")
    res.e2e_note = "; ".join(notes)
    if not jobs:
        return []
    col = list(zip(*jobs, strict=True))
    res.post_p50, res.post_p99 = percentile(col[0], 50), percentile(col[0], 99)
    res.trig_p50, res.trig_p99 = percentile(col[1], 50), percentile(col[1], 99)
    res.cbacc_p50, res.cbacc_p99 = percentile(col[2], 50), percentile(col[2], 99)
    res.cbfin_p50, res.cbfin_p99 = percentile(col[3], 50), percentile(col[3], 99)
    # callback sent -> the workflow's finish step logged (ms resolution)
    t_cb = {f"{prefix}-{int(i)}": w for i, w in zip(col[6], col[5], strict=True)}
    wf = [(done[k] - t) * 1e3 for k, t in t_cb.items() if k in done]
    res.cbwf_p50, res.cbwf_p99 = percentile(wf, 50), percentile(wf, 99)
    ordered = sorted(done.values())
    if ordered:
        res.e2e_rate = len(ordered) / max(ordered[-1] - t0_wall, 1e-9)
        res.curve = rate_curve(ordered, t0_wall, mode.curve_block)
        edge = min(mode.edge, len(ordered) // 2)
        if edge:
            res.first_rate = window_rate(ordered, t0_wall, 0, edge)
            res.last_rate = window_rate(ordered, t0_wall, len(ordered) - edge, len(ordered))
    res.cpu_ms_per_job = r["service_cpu_s"] / max(len(jobs), 1) * 1e3
    res.load_cpu = r["load_cpu_s"] / r["wall_s"]
    return [i for i in ids if i in done]


def run_get(
    runner: Runner,
    svc: Service,
    res: StoreResult,
    ids: list[str],
    mode: Mode,
    concurrency: int,
    pyspy: str | None,
    out: Path,
) -> None:
    if not ids:
        res.get_note = "no finished job to read"
        return
    sample = ids[:: max(1, len(ids) // 2000)]
    prof = Profiler(pyspy, svc.child.pid, out / f"profile-{svc.store}-get.txt") if pyspy else None
    r = runner.load(
        {
            "phase": "rps",
            "urls": [f"{svc.base}/jobs/{i}" for i in sample],
            "concurrency": concurrency,
            "duration": mode.get_seconds,
            "warmup": 1.0,
        },
        watch=svc,
    )
    if prof:
        summary = prof.stop()
        if summary:
            res.profiles["GET /jobs/{id}"] = summary
    res.get_rps = r["rps"]
    res.get_p50, res.get_p99 = percentile(r["latencies"], 50), percentile(r["latencies"], 99)
    res.get_load_cpu = r["load_cpu_s"] / r["wall_s"]
    if r["errors"]:
        res.get_note = "errors: " + ", ".join(f"{k} x{v}" for k, v in r["errors"].items())


def run_waiting(
    runner: Runner,
    store: str,
    make: Any,
    res: StoreResult,
    receiver: str,
    mode: Mode,
    concurrency: int,
) -> None:
    """RSS idle, with `mode.waiting` jobs waiting, growth per job; restart time."""
    budget = mode.fill_budget if store != "memory" else mode.memory_budget
    svc: Service = make()
    svc.start()
    try:
        time.sleep(2.0)
        res.rss_idle_mb = svc.rss_kb() / 1024
        http("POST", receiver + "/reset")
        prefix = f"wait{svc.port}"
        spec = {
            "phase": "fill",
            "base": svc.base,
            "hook_url": receiver + "/hook",
            "prefix": prefix,
            "concurrency": concurrency,
        }
        warm = runner.load({**spec, "start": 0, "n": mode.warm, "budget_s": budget})
        wait_received(receiver, warm["created"], 60)
        time.sleep(2.0)
        res.rss_warm_mb = svc.rss_kb() / 1024
        rest = runner.load(
            {
                **spec,
                "start": mode.warm,
                "n": mode.waiting - mode.warm,
                "budget_s": budget,
            },
            watch=svc,
        )
        created = warm["created"] + rest["created"]
        got = wait_received(receiver, created, 120)
        time.sleep(2.0)
        res.rss_full_mb = svc.rss_kb() / 1024
        res.waiting = created
        if rest["created"]:
            res.growth_b = (res.rss_full_mb - res.rss_warm_mb) * 1024 * 1024 / rest["created"]
        res.fill_rate = rest["created"] / rest["wall_s"]
        notes = []
        if rest["stopped_early"]:
            notes.append(f"only {created:,} of {mode.waiting:,} created within {budget:g} s")
        if got < created:
            notes.append(f"{created - got:,} not yet triggered")
        errs = Counter(warm["errors"]) + Counter(rest["errors"])
        if errs:
            notes.append("errors: " + ", ".join(f"{k} x{v}" for k, v in errs.items()))
        res.fill_note = "; ".join(notes)
        if store == "memory":
            res.restart_note = "n/a: memory:// keeps nothing across a restart"
            return
        # restart on the same database
        res.shutdown_s = svc.stop()
        _, stats = http("GET", receiver + "/stats")
        last = stats.get("last") if isinstance(stats, dict) else None
        probe = f"{prefix}-0"
        start = time.perf_counter()
        svc.start(ready_timeout=300)
        wait_http(
            f"{svc.base}/jobs/{probe}",
            300,
            ok=lambda body: isinstance(body, dict) and body.get("state") == "running",
            interval=0.01,
        )
        res.restart_s = time.perf_counter() - start
        time.sleep(2.0)
        res.restart_rss_mb = svc.rss_kb() / 1024
        # A waiting job still completes after the restart.
        if last:
            status, body = http("POST", last["callback_url"], {"status": "succeeded"})
            outcome = body.get("outcome") if isinstance(body, dict) else body
            done = wait_finished(svc.log, last["job_id"], 1, timeout=15)
            if status != 200 or outcome != "accepted" or not done:
                res.restart_note = (
                    f"after the restart a callback got {status} {outcome!r}"
                    f" and the workflow {'finished' if done else 'did not finish'}"
                )
    finally:
        svc.stop()


# ── the report ───────────────────────────────────────────────────────────────


def fmt(v: float, digits: int = 0, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:,.{digits}f}{unit}"


def ratio(v: float, ceiling: float, times: bool = False) -> str:
    if math.isnan(v) or math.isnan(ceiling) or not ceiling:
        return "-"
    return f"x{v / ceiling:,.1f}" if times else f"{v / ceiling:.0%}"


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "**missed**")


def _ok(value: float, test: Any) -> bool | None:
    return None if math.isnan(value) else bool(test(value))


def table(results: list[StoreResult], mode: Mode, concurrency: int) -> str:
    head = "| figure | target |"
    rule = "|---|---|"
    for r in results:
        head += f" {r.store} (workers {r.workers}) | vs ceiling | |"
        rule += "---:|---:|---|"
    rows = [head, rule]

    def row(name: str, target: str, cells: list[tuple[str, str, bool | str | None]]) -> None:
        line = f"| {name} | {target} |"
        for value, rel, ok in cells:
            mark = ok if isinstance(ok, str) else verdict(ok)
            line += f" {value} | {rel} | {mark} |"
        rows.append(line)

    def lat(a: float, b: float) -> str:
        return f"{fmt(a, 1)} / {fmt(b, 1)}"

    row(
        "ceiling: plain Litestar `GET` req/s (p50 / p99 ms)",
        "",
        [
            (
                f"{fmt(r.ceiling.rps)} ({lat(r.ceiling.p50, r.ceiling.p99)})",
                "100%",
                "",
            )
            for r in results
        ],
    )
    row(
        f"end to end jobs/s (concurrency {concurrency})",
        "≥ 500 (sqlite)",
        [
            (
                fmt(r.e2e_rate),
                ratio(r.e2e_rate, r.ceiling.rps),
                _ok(r.e2e_rate, lambda v: v >= 500) if r.store == "sqlite" else "",
            )
            for r in results
        ],
    )
    row(
        "`POST /jobs` p50 / p99 ms",
        "",
        [
            (lat(r.post_p50, r.post_p99), ratio(r.post_p99, r.ceiling.p99, True), "")
            for r in results
        ],
    )
    row(
        "callback → `GET` shows succeeded, p50 / p99 ms",
        "p99 ≤ 50",
        [
            (
                lat(r.cbfin_p50, r.cbfin_p99),
                ratio(r.cbfin_p99, r.ceiling.p99, True),
                _ok(r.cbfin_p99, lambda v: v <= 50),
            )
            for r in results
        ],
    )
    row(
        "  of which callback → 200 `accepted`, p50 / p99 ms",
        "",
        [
            (lat(r.cbacc_p50, r.cbacc_p99), ratio(r.cbacc_p99, r.ceiling.p99, True), "")
            for r in results
        ],
    )
    row(
        "callback → workflow finish step done, p50 / p99 ms",
        "",
        [(lat(r.cbwf_p50, r.cbwf_p99), "", "") for r in results],
    )
    row(
        "`POST /jobs` answered → trigger received, p50 / p99 ms",
        "",
        [(lat(r.trig_p50, r.trig_p99), "", "") for r in results],
    )
    row(
        f"sustained: last {mode.edge:,} vs first {mode.edge:,} jobs/s",
        "≥ 90%",
        [
            (
                f"{fmt(r.last_rate)} vs {fmt(r.first_rate)} = {ratio(r.last_rate, r.first_rate)}",
                "",
                _ok(r.last_rate / r.first_rate, lambda v: v >= 0.9),
            )
            for r in results
        ],
    )
    row(
        "service CPU per job (ms, all processes)",
        "",
        [(fmt(r.cpu_ms_per_job, 1), "", "") for r in results],
    )
    row(
        "`GET /jobs/{id}` req/s (p50 / p99 ms)",
        "≥ 50% of ceiling",
        [
            (
                f"{fmt(r.get_rps)} ({lat(r.get_p50, r.get_p99)})",
                ratio(r.get_rps, r.ceiling.rps),
                _ok(r.get_rps / r.ceiling.rps, lambda v: v >= 0.5),
            )
            for r in results
        ],
    )
    row(
        "RSS idle, fresh start (MB, all processes)",
        "",
        [
            (fmt(r.rss_idle_mb, 1), ratio(r.rss_idle_mb, r.ceiling.rss_mb, True), "")
            for r in results
        ],
    )
    row(
        "RSS with N jobs waiting (MB)",
        "",
        [(f"{fmt(r.rss_full_mb, 1)} (N = {r.waiting:,})", "", "") for r in results],
    )
    row(
        "RSS growth per waiting job (bytes)",
        "≤ 1 KB",
        [(fmt(r.growth_b), "", _ok(r.growth_b, lambda v: v <= 1024)) for r in results],
    )
    row(
        "restart with N jobs waiting → ready (s)",
        "≤ 5 s",
        [
            (
                fmt(r.restart_s, 2),
                ratio(r.restart_s, r.ceiling.ready_s, True),
                _ok(r.restart_s, lambda v: v <= 5) if r.store != "memory" else "n/a",
            )
            for r in results
        ],
    )
    return "\n".join(rows)


def details(results: list[StoreResult], mode: Mode) -> str:
    out = []
    for r in results:
        out.append(f"### {r.store} (workers {r.workers})")
        out.append(
            f"- end to end: {r.jobs_ok:,} of {r.jobs_asked:,} jobs completed"
            + (f" ({r.e2e_note})" if r.e2e_note else "")
            + f"; load generator CPU {fmt(100 * r.load_cpu)}% of one core"
        )
        curve = ", ".join(f"{n:,}: {fmt(v)}" for n, v in r.curve)
        out.append(f"- jobs/s per block of {mode.curve_block:,} (jobs done: rate): {curve}")
        out.append(
            f"- GET /jobs/{{id}}: load generator CPU {fmt(100 * r.get_load_cpu)}% of one core"
            + (f"; {r.get_note}" if r.get_note else "")
        )
        out.append(
            f"- waiting jobs: RSS {fmt(r.rss_idle_mb, 1)} MB fresh, {fmt(r.rss_warm_mb, 1)} MB"
            f" after {mode.warm:,} jobs, {fmt(r.rss_full_mb, 1)} MB with {r.waiting:,};"
            f" created at {fmt(r.fill_rate)} jobs/s" + (f" ({r.fill_note})" if r.fill_note else "")
        )
        if r.store != "memory":
            out.append(
                f"- restart: SIGTERM took {fmt(r.shutdown_s, 2)} s; ready (health + a waiting job"
                f" readable) {fmt(r.restart_s, 2)} s after the start; RSS then"
                f" {fmt(r.restart_rss_mb, 1)} MB"
                + (
                    f"; {r.restart_note}"
                    if r.restart_note
                    else "; a waiting job's callback after"
                    " the restart was accepted and its workflow finished"
                )
            )
        c = r.ceiling
        out.append(
            f"- ceiling (workers {c.workers}): {fmt(c.rps)} req/s, RSS {fmt(c.rss_mb, 1)} MB,"
            f" ready {fmt(c.ready_s, 2)} s after start, load generator CPU"
            f" {fmt(100 * c.load_cpu)}% of one core"
        )
        out.append("")
    return "\n".join(out)


# ── main ─────────────────────────────────────────────────────────────────────


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small counts (~2 minutes)")
    parser.add_argument("--stores", default="sqlite,memory", help="comma list: sqlite, memory")
    parser.add_argument(
        "--workers", type=int, default=2, help="tether serve --workers for sqlite (memory: 1)"
    )
    parser.add_argument("--concurrency", type=int, default=32, help="jobs/requests in flight")
    parser.add_argument("--jobs", type=int, help="override the end-to-end job count")
    parser.add_argument("--waiting", type=int, help="override the waiting job count")
    parser.add_argument(
        "--skip", default="", help="comma list of phases to skip: e2e, get, waiting"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="attach py-spy to the service during the end-to-end and GET phases"
        " (costs CPU: the figures of a profiled run are lower)",
    )
    parser.add_argument("--py-spy", default=None, help="path of py-spy (default: on PATH)")
    args = parser.parse_args(argv)

    mode = QUICK if args.quick else FULL
    if args.jobs:
        mode = Mode(**{**mode.__dict__, "jobs": args.jobs})
    if args.waiting:
        mode = Mode(**{**mode.__dict__, "waiting": args.waiting})
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    pyspy = None
    if args.profile:
        pyspy = args.py_spy or shutil.which("py-spy")
        if not pyspy:
            parser.error("--profile needs py-spy: pip install py-spy, or pass --py-spy PATH")

    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(tempfile.gettempdir()) / f"tether-bench-{stamp}"
    out.mkdir(parents=True)
    runner = Runner(out, args)
    started = time.perf_counter()
    print(f"tether bench ({mode.name}) — logs and raw results in {out}", flush=True)

    recv_port = free_port()
    receiver = f"http://127.0.0.1:{recv_port}"
    recv = Child(
        [PY, str(BENCH / "_receiver.py"), "--port", str(recv_port)],
        clean_env(),
        out / "receiver.log",
    ).start()
    results: list[StoreResult] = []
    try:
        wait_http(receiver + "/stats", 30)
        ceilings: dict[int, Ceiling] = {}
        for store in stores:
            workers = args.workers if store == "sqlite" else 1
            if workers not in ceilings:
                step(f"ceiling: plain Litestar endpoint, workers {workers}")
                ceilings[workers] = measure_ceiling(runner, workers, args.concurrency, mode, out)
            res = StoreResult(store, workers, ceilings[workers])
            results.append(res)

            def make(store: str = store, workers: int = workers) -> Service:
                port = free_port()
                if store == "sqlite":
                    db = Path(tempfile.mkdtemp(prefix=f"{store}-", dir=out)) / "tether.db"
                    url = f"sqlite:///{db}"
                elif store == "memory":
                    url = "memory://"
                else:
                    raise SystemExit(f"unknown store {store!r}")
                return Service(store, url, workers, port, out / f"service-{store}-{port}.log")

            if "e2e" not in skip or "get" not in skip:
                svc = make()
                svc.start()
                try:
                    ids: list[str] = []
                    if "e2e" not in skip:
                        step(f"{store}: {mode.jobs:,} jobs end to end")
                        ids = run_e2e(
                            runner, svc, res, receiver, mode, args.concurrency, pyspy, out
                        )
                    if "get" not in skip:
                        step(f"{store}: GET /jobs/{{id}} for {mode.get_seconds:g} s")
                        run_get(runner, svc, res, ids, mode, args.concurrency, pyspy, out)
                finally:
                    svc.stop()
            if "waiting" not in skip:
                step(f"{store}: {mode.waiting:,} waiting jobs, RSS, restart")
                run_waiting(runner, store, make, res, receiver, mode, args.concurrency)
    finally:
        recv.stop()

    took = time.perf_counter() - started
    print()
    print(
        f"## Tether benchmark — {mode.name} mode, {datetime.now():%Y-%m-%d %H:%M},"
        f" {os.cpu_count()} CPUs, took {took / 60:.1f} min"
    )
    print()
    print(table(results, mode, args.concurrency))
    print()
    print(details(results, mode))
    for r in results:
        for phase, summary in r.profiles.items():
            print(f"### profile: {r.store}, {phase} (py-spy, all service processes)")
            print("```")
            print(summary)
            print("```")
    print(f"logs, load results and profiles: {out}")
    return 0


def step(what: str) -> None:
    print(f"  … {what}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
