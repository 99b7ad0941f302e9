"""Tether's benchmark: the real service, a real webhook receiver, a separate load process.

    ./dev bench            # full: 20,000 jobs end to end, 100,000 waiting jobs (~15-20 min)
    ./dev bench --quick    # small counts (~2 min), to check that it all works

See bench/README.md for what each figure means. Everything runs on 127.0.0.1:

- `tether serve` (`.venv/bin/tether`), once per store (`sqlite:///…` in a fresh
  temporary directory, `memory://`);
- bench/_receiver.py, an aiohttp webhook receiver in its own process;
- bench/_load.py, the aiohttp load generator, in its own process per phase;
- bench/_ceiling.py, a plain Litestar app with one constant endpoint, served by
  uvicorn with `tether serve`'s options: the machine's ceiling in the same run;
- bench/_pages.py (phase `pages`), the job list's filtered pages on a store of
  a million jobs filled in process and kept between runs under `--cache`.
- phase `scale` (asked for with `--phases scale`): `--scale-jobs` jobs left
  waiting through `POST /jobs`; idle CPU, RSS, pages, callbacks and restarts
  at 1,000 and at all of them (`run_scale`).

Logs, load results and profiles go to a directory under /tmp (printed at the
end); nothing is written into the repository.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlencode

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.dont_write_bytecode = True  # leave no __pycache__ in bench/

from _common import (  # noqa: E402
    free_port,
    http,
    percentile,
    tree_context_switches,
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
    page_jobs: int = 1_000_000  # jobs in the store whose list pages are timed
    scale_jobs: int = 1_000_000  # jobs left waiting in the scale phase
    idle_s: float = 60.0  # length of each idle CPU measurement (scale phase)
    scale_samples: int = 200  # timed page requests and callbacks per scale point


FULL = Mode("full", 20_000, 200, 5_000, 2_000, 100_000, 1_000, 10.0, 900.0, 1500.0, 300.0)
QUICK = Mode(
    "quick", 1_000, 100, 250, 250, 2_000, 300, 3.0, 60.0, 60.0, 45.0, 50_000, 3_000, 10.0, 50
)
PHASES = ("e2e", "get", "waiting", "pages", "scale")
DEFAULT_PHASES = ("e2e", "get", "waiting", "pages")
"""What runs without `--phases`: the scale phase takes up to an hour, so it is asked for."""
CACHE = Path(tempfile.gettempdir()) / "tether-bench-cache"
"""Where the pages phase keeps its filled databases between runs."""
HTTP_REPEATS = 50


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


BENCH_SETS = ("TETHER_STORE", "TETHER_PUBLIC_URL", "TETHER_CALLBACK_SECRET")
"""The settings each service gets from the benchmark itself."""


def interpreter() -> str:
    """The report's line on the interpreter every process of the run used:
    its build moves every figure (HISTORY.md, thirty-second pass)."""
    options = str(sysconfig.get_config_var("CONFIG_ARGS") or "")
    flags = [f for f in ("--enable-optimizations", "--with-lto") if f in options]
    build = (
        f"configured with {' and '.join(f'`{f}`' for f in flags)}"
        if flags
        else "its configure options name neither `--enable-optimizations` nor `--with-lto`"
        " (pyenv's default build; a distribution's may use both without saying so)"
    )
    return (
        f"Every process ran {platform.python_implementation()} {platform.python_version()}"
        f" ({Path(sys.base_prefix)}); {build}."
    )


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
    settings: ClassVar[dict[str, str]] = {}
    """`--set` settings every `tether serve` of the run gets (TETHER_* names)."""

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready_timeout: float = 120.0) -> float:
        """Start `tether serve`; return the seconds until /health answered."""
        exe = shutil.which("tether", path=str(Path(PY).parent)) or "tether"
        env = clean_env(
            **self.settings,
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

    def load(self, spec: dict[str, Any], watch: Service | _Watched | None = None) -> dict[str, Any]:
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
    cpu_us: float = math.nan  # the server's CPU per request under the aiohttp load
    wrk_rps: float = math.nan  # the same endpoint measured by wrk (when installed)
    wrk_p50: float = math.nan
    wrk_p99: float = math.nan
    shape: Shape | None = None  # the job's exchange without a store (bench/_shape.py)


@dataclass
class Shape:
    """A job's HTTP exchange alone (`bench/_shape.py`), loaded as the end-to-end
    phase loads Tether: the floor under Tether's figures on this machine."""

    rate: float = math.nan
    cpu_ms_per_job: float = math.nan
    post_p50: float = math.nan
    post_p99: float = math.nan
    cbfin_p50: float = math.nan
    cbfin_p99: float = math.nan
    load_cpu: float = math.nan
    note: str = ""


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
    get_cpu_us: float = math.nan  # the service's CPU per GET, all processes
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
    runner: Runner,
    workers: int,
    concurrency: int,
    mode: Mode,
    out: Path,
    receiver: str | None = None,
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
            },
            watch=_Watched(child.pid),
        )
        c.rps = r["rps"]
        c.cpu_us = per_request_us(r)
        c.p50, c.p99 = percentile(r["latencies"], 50), percentile(r["latencies"], 99)
        c.load_cpu = r["load_cpu_s"] / r["wall_s"]
        wrk = run_wrk(base + "/c", concurrency, mode.get_seconds)
        if wrk:
            c.wrk_rps, c.wrk_p50, c.wrk_p99 = wrk
    finally:
        child.stop()
    if receiver is not None:
        c.shape = measure_shape(runner, workers, concurrency, mode, out, receiver)
    return c


def per_request_us(r: dict[str, Any]) -> float:
    """The service's CPU per answered request over an `rps` phase (its
    warm-up included on both sides): steadier than req/s, which the aiohttp
    load process bounds when it runs at a whole core."""
    answered = r.get("answered", 0)
    return r["service_cpu_s"] / answered * 1e6 if answered and "service_cpu_s" in r else math.nan


class _Watched:
    """What `Runner.load` reads the CPU of: a child process and its workers."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def cpu(self) -> float:
        return tree_cpu_seconds(self.pid)


def measure_shape(
    runner: Runner, workers: int, concurrency: int, mode: Mode, out: Path, receiver: str
) -> Shape:
    """The end-to-end phase's load on `bench/_shape.py` (a job's HTTP exchange,
    no store): its jobs/s (the last job's GET since the first POST), CPU per
    job and latencies, with the same warm-up and job count."""
    port = free_port()
    argv = [PY, "-B", str(BENCH / "_shape.py"), "--port", str(port), "--workers", str(workers)]
    child = Child(argv, clean_env(), out / f"shape-w{workers}.log").start()
    base = f"http://127.0.0.1:{port}"
    shape = Shape()
    spec = {
        "phase": "e2e",
        "base": base,
        "hook_url": receiver + "/hook",
        "events_url": receiver + "/events",
        "concurrency": concurrency,
        "budget_s": mode.e2e_budget,
    }
    try:
        wait_http(base + "/health", 60)
        if mode.warmup:
            runner.load({**spec, "n": mode.warmup, "prefix": f"shapewarm{port}"})
        r = runner.load({**spec, "n": mode.jobs, "prefix": f"shape{port}"}, _Watched(child.pid))
    finally:
        child.stop()
    jobs = r["jobs"]
    if r["errors"]:
        shape.note = "errors: " + ", ".join(f"{k} x{v}" for k, v in r["errors"].items())
    if not jobs:
        return shape
    col = list(zip(*jobs, strict=True))
    shape.rate = len(jobs) / max(max(col[4]), 1e-9)
    shape.cpu_ms_per_job = r["service_cpu_s"] / len(jobs) * 1e3
    shape.post_p50, shape.post_p99 = percentile(col[0], 50), percentile(col[0], 99)
    shape.cbfin_p50, shape.cbfin_p99 = percentile(col[3], 50), percentile(col[3], 99)
    shape.load_cpu = r["load_cpu_s"] / r["wall_s"]
    return shape


WRK_LATENCY = re.compile(r"^\s*(50|99)%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)


def run_wrk(url: str, concurrency: int, seconds: float) -> tuple[float, float, float] | None:
    """`wrk` (Debian's package; a C load generator that is not itself the
    limit) on `url`: (req/s, p50 ms, p99 ms), or None when wrk is not installed."""
    exe = shutil.which("wrk")
    if not exe:
        return None
    argv = [exe, "-t2", f"-c{concurrency}", f"-d{max(seconds, 1):.0f}s", "--latency", url]
    out = subprocess.run(argv, capture_output=True, text=True, check=False).stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        return None
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}
    lat = {q: float(v) * scale[u] for q, v, u in WRK_LATENCY.findall(out)}
    return float(m.group(1)), lat.get("50", math.nan), lat.get("99", math.nan)


def run_e2e(
    runner: Runner,
    svc: Service,
    res: StoreResult,
    receiver: str,
    mode: Mode,
    concurrency: int,
    pyspy: str | None,
    out: Path,
    callback_delay: float = 0.0,
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
        "callback_delay_s": callback_delay,
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
    res.get_cpu_us = per_request_us(r)
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


def run_pages(out: Path, jobs: int, cache: Path, workers: int) -> dict[str, Any]:
    """The job list at `jobs` jobs (bench/_pages.py: fill once, then time
    `Tether.list_jobs` in process), then the cases marked `http` through a
    `tether serve` on the same database: sequential `GET /jobs`, one at a time."""
    spec_path, out_path = out / "pages.spec.json", out / "pages.result.json"
    spec_path.write_text(json.dumps({"cache": str(cache), "jobs": jobs}))
    subprocess.run([PY, str(BENCH / "_pages.py"), str(spec_path), str(out_path)], check=True)
    result: dict[str, Any] = json.loads(out_path.read_text())
    db = Path(result["db"])
    svc = Service("sqlite", f"sqlite:///{db}", workers, free_port(), out / "service-pages.log")
    svc.start(ready_timeout=300)
    try:
        for case in result["cases"]:
            if not case["http"]:
                continue
            url = f"{svc.base}/jobs?{urlencode(case['query'], doseq=True)}"
            times, statuses = [], Counter()
            for i in range(3 + HTTP_REPEATS):
                start = time.perf_counter()
                status, _ = http("GET", url, timeout=30)
                if i >= 3:
                    times.append((time.perf_counter() - start) * 1e3)
                    statuses[status] += 1
            case["http_p50"], case["http_p99"] = percentile(times, 50), percentile(times, 99)
            case["http_status"] = dict(statuses)
    finally:
        svc.stop()
    out_path.write_text(json.dumps(result))  # with the HTTP figures
    return result


def pages_table(result: dict[str, Any]) -> str:
    cases = result["cases"]
    http_timed = [c for c in cases if "http_p50" in c]
    rows = [
        "| `GET /jobs` case (limit 100) | rows | `list_jobs` p50 / p99 ms | HTTP p50 / p99 ms |",
        "|---|---:|---:|---:|",
    ]
    for c in cases:
        rows_cell = f"{c['rows']}" + ("" if c["ok"] else " **wrong**")
        via_http = ""
        if "http_p50" in c:
            via_http = f"{fmt(c['http_p50'], 1)} / {fmt(c['http_p99'], 1)}"
            if set(c["http_status"]) != {200}:
                via_http += f" (status {c['http_status']})"
        rows.append(
            f"| {c['name']} | {rows_cell} | {fmt(c['p50'], 2)} / {fmt(c['p99'], 2)} | {via_http} |"
        )
    meta = result["meta"]
    slow = [c["name"] for c in cases if c["p99"] > 20 and not c["name"].startswith("limit:")]
    wrong = [c["name"] for c in cases if not c["ok"]]
    notes = [
        f"- {meta['jobs']:,} jobs ({result['db_bytes'] / 1e6:,.0f} MB of database, filled in"
        f" {meta['fill_s']:.0f} s on {meta['filled']}): {result['db']}",
        f"- each case: {min(c['n'] for c in cases)}-{max(c['n'] for c in cases)} timed calls"
        f" of `Tether.list_jobs` in process; {HTTP_REPEATS} sequential requests for the HTTP"
        f" column ({len(http_timed)} cases)",
        "- rows checked against a scan of every job: "
        + ("all equal" if not wrong else "**differ** for " + ", ".join(wrong)),
        "- p99 over 20 ms: " + (", ".join(slow) if slow else "none (target met)"),
    ]
    return "\n".join([*rows, "", *notes])


# ── the scale phase: many waiting jobs ───────────────────────────────────────

SCALE_TIMEOUT = 300 * 24 * 3600.0
"""The scale phase's jobs wait this long (s): no deadline passes during a run."""
TAG_GROUPS = 100
"""Each scale job has tags `scale` and `group-<i % TAG_GROUPS>` (bench/_load.py)."""
SCALE_WARM = 1_000
"""Waiting jobs at the scale phase's first point (the "as fast as with 1,000" baseline)."""
SCALE_SETTLE_S = 30.0
"""How long after the restarts the scale phase times its last callbacks."""


def scale_pages(base: str) -> dict[str, str]:
    """The `GET /jobs` pages the scale phase times: name -> URL."""
    return {
        "state=running&limit=100": f"{base}/jobs?state=running&limit=100",
        "tag=group-7&limit=100 (1% of jobs)": f"{base}/jobs?tag=group-7&limit=100",
        "tag=group-7&state=running&limit=100": f"{base}/jobs?tag=group-7&state=running&limit=100",
    }


def time_pages(base: str, repeats: int) -> dict[str, dict[str, Any]]:
    """Each page of `scale_pages`: 3 untimed, then `repeats` sequential requests."""
    out: dict[str, dict[str, Any]] = {}
    for name, url in scale_pages(base).items():
        times: list[float] = []
        statuses: Counter[int] = Counter()
        rows = 0
        for i in range(3 + repeats):
            start = time.perf_counter()
            status, body = http("GET", url, timeout=30)
            took = (time.perf_counter() - start) * 1e3
            if i >= 3:
                times.append(took)
                statuses[status] += 1
            elif isinstance(body, dict):
                rows = len(body.get("jobs") or body.get("items") or [])
        out[name] = {
            "p50": percentile(times, 50),
            "p99": percentile(times, 99),
            "rows": rows,
            "status": dict(statuses),
        }
    return out


def idle_cpu(svc: Service, seconds: float) -> dict[str, Any]:
    """The service's CPU (% of one core) and wake-ups (voluntary context
    switches of all its threads, per s) over `seconds` of doing nothing."""
    assert svc.child is not None
    pid = svc.child.pid
    cpu0, sw0 = svc.cpu(), tree_context_switches(pid)
    time.sleep(seconds)
    cpu1, sw1 = svc.cpu(), tree_context_switches(pid)
    return {
        "cpu_pct": 100 * (cpu1 - cpu0) / seconds,
        "wakeups_per_s": (sw1 - sw0) / seconds,
        "seconds": seconds,
    }


def recorded(path: Path) -> list[tuple[str, str]]:
    """The receiver's record: (job id, callback URL) of each trigger."""
    out = []
    with path.open() as f:
        for line in f:
            job_id, _, url = line.rstrip("\n").partition("\t")
            if url:
                out.append((job_id, url))
    return out


def time_callbacks(runner: Runner, svc: Service, targets: list[tuple[str, str]]) -> dict[str, Any]:
    """A callback to each of `targets`, one at a time: accepted, `GET` shows
    succeeded, and the workflow's own `finished` log line (ms)."""
    r = runner.load({"phase": "callbacks", "base": svc.base, "targets": targets})
    calls = r["calls"]
    acc = [c[0] for c in calls]
    fin = [c[1] for c in calls]
    done = wait_finished(svc.log, "", 0, 0)  # everything logged so far
    wf = [(done[i] - c[2]) * 1e3 for i, c in zip(r["ids"], calls, strict=True) if i in done]
    return {
        "n": len(calls),
        "accepted_p50": percentile(acc, 50),
        "accepted_p99": percentile(acc, 99),
        "final_p50": percentile(fin, 50),
        "final_p99": percentile(fin, 99),
        "workflow_p50": percentile(wf, 50),
        "workflow_p99": percentile(wf, 99),
        "errors": r["errors"],
    }


def resident(db: Path) -> float | None:
    """The share of the database files' bytes in the page cache now
    (util-linux's `fincore`), or None where it cannot be told. A callback
    to a job whose pages were evicted waits for a read of each from the
    disk: on this benchmark's VM 60-150 us a page, against 2 us for one
    cached (the forty-eighth pass in bench/HISTORY.md)."""
    exe = shutil.which("fincore")
    files = [str(p) for p in db.parent.glob("tether.db*") if p.is_file()]
    if not exe or not files:
        return None
    try:
        out = subprocess.run(
            [exe, "--bytes", "--noheadings", "--raw", "--output", "RES,SIZE", *files],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        pairs = [tuple(int(v) for v in line.split()) for line in out.splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    size = sum(p[1] for p in pairs)
    return sum(p[0] for p in pairs) / size if size else None


def read_through(db: Path) -> float:
    """Read the database files once from start to end, as a warm host has
    them cached (`cat tether.db* > /dev/null`); the seconds it took."""
    start = time.perf_counter()
    for path in db.parent.glob("tether.db*"):
        if path.is_file():
            with path.open("rb", buffering=0) as f:
                while f.read(1 << 20):
                    pass
    return time.perf_counter() - start


def time_scrapes(svc: Service, n: int = 6) -> list[float]:
    """`GET /metrics` `n` times in a row (ms each), as Prometheus scrapes:
    each reads the job gauges, whose count per state reads the whole state
    index unless nothing was committed since the worker's last count."""
    took = []
    for _ in range(n):
        start = time.perf_counter()
        status, _body = http("GET", f"{svc.base}/metrics", timeout=30)
        took.append((time.perf_counter() - start) * 1e3 if status == 200 else math.nan)
    return took


def restart(svc: Service, how: str, target: tuple[str, str]) -> dict[str, Any]:
    """Stop the service (`how`: "SIGTERM" or "SIGKILL"), start it on the same
    database: seconds from the spawn until `/health` answers 200, until a
    callback to a waiting job is accepted, and until a `GET` shows it succeeded."""
    assert svc.child is not None
    out: dict[str, Any] = {"how": how}
    if how == "SIGTERM":
        out["stop_s"] = svc.stop()
    else:
        start = time.perf_counter()
        svc.child.kill()
        out["stop_s"] = time.perf_counter() - start
    out["health_s"] = svc.start(ready_timeout=600)
    assert svc.child is not None
    spawned = svc.child.started
    job_id, url = target
    deadline = time.perf_counter() + 120
    last: Any = None
    answers: Counter[str] = Counter()  # what the callback got before it was accepted
    out["answers"] = answers
    while time.perf_counter() < deadline:
        sent = time.perf_counter()
        status, body = http("POST", url, {"status": "succeeded"}, timeout=10)
        last = (status, body)
        outcome = body.get("outcome") if isinstance(body, dict) else None
        answers[f"{status} {outcome}"] += 1
        out["last_call_ms"] = (time.perf_counter() - sent) * 1e3
        if status == 200 and isinstance(body, dict) and body.get("outcome") == "accepted":
            out["callback_s"] = time.perf_counter() - spawned
            break
        time.sleep(0.01)
    else:
        out["note"] = f"no callback accepted within 120 s (last {last!r})"
        return out
    while time.perf_counter() < deadline:
        status, body = http("GET", f"{svc.base}/jobs/{job_id}")
        if isinstance(body, dict) and body.get("state") == "succeeded":
            out["final_s"] = time.perf_counter() - spawned
            break
        time.sleep(0.005)
    time.sleep(2.0)
    out["rss_mb"] = svc.rss_kb() / 1024
    return out


def run_scale(runner: Runner, args: argparse.Namespace, mode: Mode, out: Path) -> dict[str, Any]:
    """`mode.scale_jobs` jobs waiting on the embedded store, created through
    `POST /jobs` (the real workflow: each is triggered and waits for a callback
    that the receiver never sends). Measured at no jobs, at `SCALE_WARM` and at
    all of them: idle CPU, RSS, pages, callbacks; then restarts."""
    n = mode.scale_jobs
    res: dict[str, Any] = {"jobs_asked": n, "workers": args.workers, "samples": mode.scale_samples}
    record = out / "scale-callbacks.tsv"
    recv_port = free_port()
    receiver = f"http://127.0.0.1:{recv_port}"
    recv = Child(
        [PY, str(BENCH / "_receiver.py"), "--port", str(recv_port), "--record", str(record)],
        clean_env(),
        out / "scale-receiver.log",
    ).start()
    db = Path(tempfile.mkdtemp(prefix="scale-", dir=out)) / "tether.db"
    port = free_port()
    svc = Service(
        "sqlite", f"sqlite:///{db}", args.workers, port, out / f"service-scale-{port}.log"
    )
    rng = random.Random(19)
    prefix = f"scale{port}"
    spec = {
        "phase": "fill",
        "base": svc.base,
        "hook_url": receiver + "/hook",
        "prefix": prefix,
        "concurrency": args.concurrency,
        "timeout": SCALE_TIMEOUT,
        "tag_groups": TAG_GROUPS,
        "budget_s": 4 * 3600.0,
    }
    try:
        wait_http(receiver + "/stats", 30)
        res["start_s"] = svc.start()
        time.sleep(5.0)
        step(f"scale: idle with no jobs, {mode.idle_s:g} s")
        res["idle_empty"] = idle_cpu(svc, mode.idle_s)
        res["rss_empty_mb"] = svc.rss_kb() / 1024
        warm = min(SCALE_WARM, n)
        step(f"scale: {warm:,} waiting jobs")
        w = runner.load({**spec, "start": 0, "n": warm})
        wait_received(receiver, w["created"], 120)
        time.sleep(3.0)
        res["rss_warm_mb"] = svc.rss_kb() / 1024
        targets = recorded(record)
        res["scrapes_warm"] = time_scrapes(svc)
        res["warm"] = {
            "waiting": w["created"],
            "resident": resident(db),
            "pages": time_pages(svc.base, mode.scale_samples),
            # callbacks end jobs: these come out of the waiting count
            "callbacks": time_callbacks(
                runner, svc, rng.sample(targets, min(mode.scale_samples // 2, len(targets)))
            ),
        }
        done_ids = set(finished_jobs(svc.log, prefix))
        step(f"scale: creating {n - warm:,} more waiting jobs (POST /jobs)")
        http("POST", receiver + "/reset")
        f = runner.load({**spec, "start": warm, "n": n - warm}, watch=svc)
        got = wait_received(receiver, f["created"], 600)
        res["fill"] = {
            "created": f["created"],
            "wall_s": f["wall_s"],
            "rate": f["created"] / max(f["wall_s"], 1e-9),
            "marks": f["marks"],
            "errors": f["errors"],
            "service_cpu_ms_per_job": f["service_cpu_s"] / max(f["created"], 1) * 1e3,
            "load_cpu": f["load_cpu_s"] / max(f["wall_s"], 1e-9),
            "not_triggered": f["created"] - got,
            "stopped_early": f["stopped_early"],
        }
        waiting = w["created"] + f["created"] - len(done_ids)
        res["waiting"] = waiting
        time.sleep(10.0)  # let the trigger steps and the WAL settle
        total, each = tree_rss_kb(svc.child.pid)  # type: ignore[union-attr]
        res["rss_full_mb"] = total / 1024
        res["rss_each_mb"] = {str(k): v / 1024 for k, v in each.items()}
        res["growth_b"] = (
            (res["rss_full_mb"] - res["rss_warm_mb"]) * 1024 * 1024 / max(f["created"], 1)
        )
        res["db_mb"] = sum(p.stat().st_size for p in db.parent.glob("tether.db*")) / 1e6
        step(f"scale: idle with {waiting:,} waiting, {mode.idle_s:g} s")
        res["idle_full"] = idle_cpu(svc, mode.idle_s)
        res["scrapes_full"] = time_scrapes(svc)
        step(f"scale: pages and callbacks at {waiting:,} waiting")
        targets = [t for t in recorded(record) if t[0] not in done_ids]
        half = mode.scale_samples // 2
        picks = rng.sample(targets, min(3 * half + 2, len(targets)))
        res["full"] = {
            "waiting": waiting,
            "pages": time_pages(svc.base, mode.scale_samples),
            "resident": resident(db),
            "callbacks": time_callbacks(runner, svc, picks[:half]),
        }
        step("scale: restart after SIGTERM, then after SIGKILL")
        res["restarts"] = [restart(svc, "SIGTERM", picks[-2]), restart(svc, "SIGKILL", picks[-1])]
        # Right after the fill the kernel is still writing gigabytes back
        # and the WAL checkpoints: timed again on the restarted service, once
        # that has passed, for the steady figure.
        time.sleep(SCALE_SETTLE_S)
        step(f"scale: callbacks again {SCALE_SETTLE_S:g} s after the restart")
        res["settled"] = {
            "resident": resident(db),
            "callbacks": time_callbacks(runner, svc, picks[half : 2 * half]),
        }
        # The same with every page of the database in the page cache: what
        # a host whose cache holds the file answers (this VM's sandbox keeps
        # about 3 GB of file pages, whatever memory is free)
        step("scale: callbacks again with the database read into the page cache")
        took = read_through(db)
        res["cached"] = {
            "read_s": took,
            "resident": resident(db),
            "callbacks": time_callbacks(runner, svc, picks[2 * half : -2]),
        }
    finally:
        svc.stop()
        recv.stop()
    (out / "scale.result.json").write_text(json.dumps(res, indent=1))
    return res


def scale_report(r: dict[str, Any]) -> str:
    """The scale phase's figures, with the issue's targets."""
    warm, full = r.get("warm", {}), r.get("full", {})
    n = r.get("waiting", 0)
    rows = [
        f"| figure (sqlite, workers {r['workers']}) | target | {SCALE_WARM:,} waiting"
        f" | {n:,} waiting | |",
        "|---|---|---:|---:|---|",
    ]

    def row(name: str, target: str, a: str, b: str, ok: bool | str | None) -> None:
        rows.append(
            f"| {name} | {target} | {a} | {b} | {ok if isinstance(ok, str) else verdict(ok)} |"
        )

    for name in scale_pages(""):
        pw, pf = warm.get("pages", {}).get(name, {}), full.get("pages", {}).get(name, {})
        row(
            f"`GET /jobs?{name}` p50 / p99 ms",
            "p99 ≤ 20 ms",
            f"{fmt(pw.get('p50', math.nan), 1)} / {fmt(pw.get('p99', math.nan), 1)}",
            f"{fmt(pf.get('p50', math.nan), 1)} / {fmt(pf.get('p99', math.nan), 1)}",
            _ok(pf.get("p99", math.nan), lambda v: v <= 20),
        )
    cw, cf = warm.get("callbacks", {}), full.get("callbacks", {})
    cs = r.get("settled", {}).get("callbacks", {})
    cc = r.get("cached", {}).get("callbacks", {})

    def cached_share(part: str) -> str:
        share = r.get(part, {}).get("resident")
        return f"{share:.0%} of the file cached" if share is not None else "cache not read"

    for key, label in (
        ("accepted", "callback → 200 `accepted`"),
        ("final", "callback → `GET` shows succeeded"),
        ("workflow", "callback → workflow's `finished` log line"),
    ):
        a50, a99 = cw.get(f"{key}_p50", math.nan), cw.get(f"{key}_p99", math.nan)
        for when, got in (
            (f"right after the fill ({cached_share('full')})", cf),
            (f"after the restart ({cached_share('settled')})", cs),
            (f"the file read through first ({cached_share('cached')})", cc),
        ):
            if not got:  # a result from before that timing
                continue
            b50, b99 = got.get(f"{key}_p50", math.nan), got.get(f"{key}_p99", math.nan)
            row(
                f"{label}, p50 / p99 ms (one at a time), {when}",
                "as with 1,000",
                f"{fmt(a50, 1)} / {fmt(a99, 1)}",
                f"{fmt(b50, 1)} / {fmt(b99, 1)}",
                _ok(b99, lambda v, a99=a99: v <= max(1.5 * a99, a99 + 5)),
            )
    ie, iw = r.get("idle_empty", {}), r.get("idle_full", {})
    row(
        f"idle service CPU, % of one core ({fmt(ie.get('seconds', math.nan))} s)",
        "≤ 0.2% empty, ≤ 1% full",
        f"{fmt(ie.get('cpu_pct', math.nan), 2)}% (no jobs)",
        f"{fmt(iw.get('cpu_pct', math.nan), 2)}%",
        f"{verdict(_ok(ie.get('cpu_pct', math.nan), lambda v: v <= 0.2))} empty,"
        f" {verdict(_ok(iw.get('cpu_pct', math.nan), lambda v: v <= 1))} full",
    )
    row(
        "`GET /metrics` six times in a row, idle (ms each; either worker may answer)",
        "",
        ", ".join(fmt(v, 1) for v in r.get("scrapes_warm", [])),
        ", ".join(fmt(v, 1) for v in r.get("scrapes_full", [])),
        "",
    )
    row(
        "idle wake-ups (voluntary context switches/s, all threads)",
        "",
        f"{fmt(ie.get('wakeups_per_s', math.nan))} (no jobs)",
        fmt(iw.get("wakeups_per_s", math.nan)),
        "",
    )
    row(
        "RSS, all service processes (MB)",
        "",
        f"{fmt(r.get('rss_warm_mb', math.nan), 1)}"
        f" (empty {fmt(r.get('rss_empty_mb', math.nan), 1)})",
        fmt(r.get("rss_full_mb", math.nan), 1),
        "",
    )
    row(
        f"RSS growth per waiting job, {SCALE_WARM:,} → {n:,} (bytes)",
        "≤ 100",
        "",
        fmt(r.get("growth_b", math.nan)),
        _ok(r.get("growth_b", math.nan), lambda v: v <= 100),
    )
    for rs in r.get("restarts", []):
        row(
            f"restart after {rs['how']} (stop took {fmt(rs.get('stop_s', math.nan), 2)} s):"
            " /health 200, first callback accepted, its GET succeeded (s)",
            "≤ 5 s",
            "",
            f"{fmt(rs.get('health_s', math.nan), 2)}, {fmt(rs.get('callback_s', math.nan), 2)},"
            f" {fmt(rs.get('final_s', math.nan), 2)}",
            _ok(rs.get("callback_s", math.nan), lambda v: v <= 5),
        )
    fl = r.get("fill", {})
    marks = fl.get("marks", [])
    curve = ""
    if marks:
        step_n = max(1, len(marks) // 10)
        pts = marks[step_n - 1 :: step_n]
        prev_n, prev_t, parts = 0, 0.0, []
        for cn, ct in pts:
            parts.append(f"{cn + SCALE_WARM:,}: {fmt((cn - prev_n) / max(ct - prev_t, 1e-9))}")
            prev_n, prev_t = cn, ct
        curve = ", ".join(parts)
    notes = [
        "",
        f"- created {fl.get('created', 0) + SCALE_WARM:,} jobs through `POST /jobs` at"
        f" {fmt(fl.get('rate', math.nan))} jobs/s ({fmt(fl.get('wall_s', math.nan) / 60, 1)} min;"
        f" service CPU {fmt(fl.get('service_cpu_ms_per_job', math.nan), 2)} ms per job, load"
        f" generator {fmt(100 * fl.get('load_cpu', math.nan))}% of a core)"
        + (f"; errors {fl['errors']}" if fl.get("errors") else "")
        + (f"; {fl['not_triggered']:,} not triggered" if fl.get("not_triggered") else ""),
        f"- creation rate by jobs created (jobs/s over the preceding block): {curve}",
        f"- database files {fmt(r.get('db_mb', math.nan))} MB; RSS per process (MB):"
        f" {', '.join(fmt(v, 1) for v in r.get('rss_each_mb', {}).values())}",
        f"- callbacks timed: {cw.get('n', 0)} at {SCALE_WARM:,}, {cf.get('n', 0)} at {n:,}"
        f" right after the fill, {cs.get('n', 0)} {SCALE_SETTLE_S:g} s after the restarts,"
        f" {cc.get('n', 0)} after reading the database files through"
        f" ({fmt(r.get('cached', {}).get('read_s', math.nan), 1)} s)"
        f" (random waiting jobs, sequential; at {SCALE_WARM:,}, {cached_share('warm')});"
        f" page requests: 3 untimed then {r.get('samples', 0)} timed, one at a time",
    ]
    for rs in r.get("restarts", []):
        said = ", ".join(f"{k} x{v}" for k, v in rs.get("answers", {}).items())
        if not said:  # a result from before the answers were recorded
            continue
        notes.append(
            f"- restart after {rs['how']}: the callback's answers, polled from /health on: {said};"
            f" the accepted one took {fmt(rs.get('last_call_ms', math.nan), 1)} ms; RSS then"
            f" {fmt(rs.get('rss_mb', math.nan), 1)} MB"
            + (f"; {rs['note']}" if rs.get("note") else "")
        )
    return "\n".join(rows + notes)


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
        "ceiling measured by `wrk -t2` instead (req/s, p50 / p99 ms)",
        "",
        [
            (
                f"{fmt(r.ceiling.wrk_rps)} ({lat(r.ceiling.wrk_p50, r.ceiling.wrk_p99)})"
                if not math.isnan(r.ceiling.wrk_rps)
                else "wrk not installed",
                ratio(r.ceiling.wrk_rps, r.ceiling.rps, True),
                "",
            )
            for r in results
        ],
    )
    row(
        "floor: a job's HTTP exchange, no store (`bench/_shape.py`): jobs/s;"
        " CPU ms/job; callback → `GET` p50 / p99 ms",
        "",
        [
            (
                f"{fmt(s.rate)}; {fmt(s.cpu_ms_per_job, 2)}; {lat(s.cbfin_p50, s.cbfin_p99)}"
                + (f" ({s.note})" if s.note else ""),
                "",
                "",
            )
            if (s := r.ceiling.shape)
            else ("not measured", "", "")
            for r in results
        ],
    )
    row(
        f"end to end jobs/s (concurrency {concurrency}); vs: share of the floor's",
        "≥ 400 (goal 500)",
        [
            (
                fmt(r.e2e_rate),
                ratio(r.e2e_rate, r.ceiling.shape.rate) if r.ceiling.shape else "",
                _ok(r.e2e_rate, lambda v: v >= 400) if r.store == "sqlite" else "",
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
        "callback → `GET` shows succeeded, p50 / p99 ms; vs: the floor's p99",
        "p99 ≤ 50",
        [
            (
                lat(r.cbfin_p50, r.cbfin_p99),
                ratio(r.cbfin_p99, r.ceiling.shape.cbfin_p99, True) if r.ceiling.shape else "",
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
        "p99 ≤ 100",
        [(lat(r.cbwf_p50, r.cbwf_p99), "", _ok(r.cbwf_p99, lambda v: v <= 100)) for r in results],
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
        "service CPU per job (ms, all processes); vs: the floor's",
        "≤ 2.5",
        [
            (
                fmt(r.cpu_ms_per_job, 1),
                ratio(r.cpu_ms_per_job, r.ceiling.shape.cpu_ms_per_job, True)
                if r.ceiling.shape
                else "",
                _ok(r.cpu_ms_per_job, lambda v: v <= 2.5) if r.store == "sqlite" else "",
            )
            for r in results
        ],
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
        "service CPU per `GET /jobs/{id}` (µs, all processes); vs: the ceiling's per `GET`",
        "",
        [(fmt(r.get_cpu_us), ratio(r.get_cpu_us, r.ceiling.cpu_us, True), "") for r in results],
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
        if (f := c.shape) is not None:
            out.append(
                f"- floor (workers {c.workers}): `POST /jobs` p50 / p99"
                f" {fmt(f.post_p50, 1)} / {fmt(f.post_p99, 1)} ms, load generator CPU"
                f" {fmt(100 * f.load_cpu)}% of one core"
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
    parser.add_argument(
        "--callback-delay",
        type=float,
        default=0.0,
        help="end to end: seconds each callback waits after its trigger, so that every"
        " workflow has suspended first, as a real job's has (default 0: at once, often"
        " before the workflow suspended); the callback latencies start after the wait",
    )
    parser.add_argument("--jobs", type=int, help="override the end-to-end job count")
    parser.add_argument("--waiting", type=int, help="override the waiting job count")
    parser.add_argument(
        "--phases",
        default=",".join(DEFAULT_PHASES),
        help="comma list of phases to run: e2e, get, waiting, pages, scale (default all but scale)",
    )
    parser.add_argument(
        "--skip", default="", help="comma list of phases to skip: e2e, get, waiting, pages"
    )
    parser.add_argument(
        "--scale-jobs",
        type=int,
        help="jobs left waiting in the scale phase (full 1,000,000; quick 3,000)",
    )
    parser.add_argument(
        "--page-jobs", type=int, help="jobs in the pages phase's store (full 1,000,000)"
    )
    parser.add_argument(
        "--cache",
        default=str(CACHE),
        help="where the pages phase keeps its filled databases between runs",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="attach py-spy to the service during the end-to-end and GET phases"
        " (costs CPU: the figures of a profiled run are lower)",
    )
    parser.add_argument("--py-spy", default=None, help="path of py-spy (default: on PATH)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="TETHER_NAME=VALUE",
        help="a setting for every `tether serve` the run starts (repeatable), for instance"
        " --set TETHER_ACCESS_LOG=0 to measure what a setting costs; the report names them",
    )
    args = parser.parse_args(argv)
    settings: dict[str, str] = {}
    for item in args.set:
        name, eq, value = item.partition("=")
        if not eq or not name.startswith("TETHER_") or name in BENCH_SETS:
            parser.error(
                f"--set {item!r}: give TETHER_NAME=VALUE, a setting other than"
                f" {', '.join(BENCH_SETS)} (the benchmark sets those)"
            )
        settings[name] = value
    Service.settings = settings  # this run's, not added to a class-wide dict

    mode = QUICK if args.quick else FULL
    if args.jobs:
        mode = Mode(**{**mode.__dict__, "jobs": args.jobs})
    if args.waiting:
        mode = Mode(**{**mode.__dict__, "waiting": args.waiting})
    if args.page_jobs:
        mode = Mode(**{**mode.__dict__, "page_jobs": args.page_jobs})
    if args.scale_jobs:
        mode = Mode(**{**mode.__dict__, "scale_jobs": args.scale_jobs})
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    wanted = {s.strip() for s in args.phases.split(",") if s.strip()}
    if wanted - set(PHASES):
        parser.error(f"unknown phases {sorted(wanted - set(PHASES))}; known: {', '.join(PHASES)}")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()} | (set(PHASES) - wanted)
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

    results: list[StoreResult] = []
    if {"e2e", "get", "waiting"} - skip:
        run_services(runner, args, mode, stores, skip, pyspy, out, results)
    # A phase that fails is reported with the others' figures, not instead of them.
    failed: list[str] = []
    pages = None
    if "pages" not in skip:
        step(f"pages: GET /jobs filters at {mode.page_jobs:,} jobs")
        try:
            pages = run_pages(out, mode.page_jobs, Path(args.cache), args.workers)
        except Exception as exc:
            traceback.print_exc()
            failed.append(f"pages: {exc}")
    scale = None
    if "scale" not in skip:
        step(f"scale: {mode.scale_jobs:,} waiting jobs through POST /jobs")
        try:
            scale = run_scale(runner, args, mode, out)
        except Exception as exc:
            traceback.print_exc()
            failed.append(f"scale: {exc}")

    took = time.perf_counter() - started
    print()
    print(
        f"## Tether benchmark — {mode.name} mode, {datetime.now():%Y-%m-%d %H:%M},"
        f" {os.cpu_count()} CPUs, took {took / 60:.1f} min"
    )
    print()
    print(interpreter())
    print()
    if Service.settings:
        shown = ", ".join(f"`{k}={v}`" for k, v in sorted(Service.settings.items()))
        print(f"Services ran with {shown} (`--set`), not only their defaults.")
        print()
    if results:
        print(table(results, mode, args.concurrency))
        print()
        print(details(results, mode))
    for r in results:
        for phase, summary in r.profiles.items():
            print(f"### profile: {r.store}, {phase} (py-spy, all service processes)")
            print("```")
            print(summary)
            print("```")
    if pages is not None:
        print(f"### the job list at {mode.page_jobs:,} jobs")
        print()
        print(pages_table(pages))
        print()
    if scale is not None:
        print(f"### scale: {scale.get('waiting', 0):,} jobs waiting")
        print()
        print(scale_report(scale))
        print()
    for what in failed:
        print(f"**phase failed** ({what}): its traceback is above")
    print(f"logs, load results and profiles: {out}")
    return 1 if failed else 0


def run_services(
    runner: Runner,
    args: argparse.Namespace,
    mode: Mode,
    stores: list[str],
    skip: set[str],
    pyspy: str | None,
    out: Path,
    results: list[StoreResult],
) -> None:
    """The phases on a running service, per store: end to end, GET, waiting."""
    recv_port = free_port()
    receiver = f"http://127.0.0.1:{recv_port}"
    recv = Child(
        [PY, str(BENCH / "_receiver.py"), "--port", str(recv_port)],
        clean_env(),
        out / "receiver.log",
    ).start()
    try:
        wait_http(receiver + "/stats", 30)
        ceilings: dict[int, Ceiling] = {}
        for store in stores:
            workers = args.workers if store == "sqlite" else 1
            if workers not in ceilings:
                step(f"ceiling: plain Litestar endpoint, workers {workers}")
                ceilings[workers] = measure_ceiling(
                    runner,
                    workers,
                    args.concurrency,
                    mode,
                    out,
                    receiver if "e2e" not in skip else None,
                )
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
                            runner,
                            svc,
                            res,
                            receiver,
                            mode,
                            args.concurrency,
                            pyspy,
                            out,
                            args.callback_delay,
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


def step(what: str) -> None:
    print(f"  … {what}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
