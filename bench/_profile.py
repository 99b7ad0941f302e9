"""Summarise a py-spy `--format raw` profile (collapsed stacks: `f1;f2;f3 COUNT`).

    python bench/_profile.py PROFILE.txt [--top 25]

Prints the functions with the most samples on the CPU: *self* (the frame
itself was running) and *inclusive* (the frame was anywhere on the stack), as
shares of all samples, plus a few buckets that say where the time goes
(HTTP server, the SDK, SQLite, the webhook client, logging, ...). Idle samples (py-spy marks
the thread idle unless `--idle`) are not recorded at all.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

# Where a frame comes from -> a bucket; first match wins (matched on "function (file)").
BUCKETS: tuple[tuple[str, str], ...] = (
    ("logging", r"logging/"),
    (
        "job history (filing events, listeners, metrics)",
        r"SqlJobIndex\._file |SqlJobIndex\._tell |JobHistory\.|\(core/(events|metrics)\.py",
    ),
    (
        "handing work to threads and back (run_in_executor, self-pipe wake-ups)",
        r"concurrent/futures|threading\.py|run_in_executor|_write_to_self|_read_from_self"
        r"|wrap_future|_chain_future|_copy_future_state|call_soon_threadsafe",
    ),
    (
        "sqlite3 + SQLite store engine",
        r"resonate_sqlite/|core/store/(embedded|sql|schema)\.py|tether_jobs row decoder|sqlite3",
    ),
    ("aiohttp (webhook trigger client)", r"aiohttp/|yarl/|multidict/"),
    ("resonate-sdk", r"resonate/|resonate_base/"),
    ("uvicorn + httptools (HTTP server)", r"uvicorn/|h11/|httptools"),
    ("litestar (framework)", r"litestar/"),
    ("msgspec / json / uuid", r"msgspec|json/|uuid\.py"),
    ("tether core/api/plugins", r"\((core|api|plugins)/"),
    ("asyncio event loop + sockets", r"asyncio/|selectors\.py|socket\.py"),
)

# What the process was doing: the first rule (in this order) matching any frame.
ACTIVITIES: tuple[tuple[str, str], ...] = (
    ("logging (formatting, queue to the log thread, writing)", r"^(Logger|QueueListener)\."),
    ("route guards", r"^BaseRouteHandler\.authorize"),
    ("webhook trigger POST (aiohttp)", r"^HttpWebhook\._send "),
    ("POST /jobs handler", r"^JobController\.create "),
    ("callback handler", r"^CallbackController\.settle "),
    ("GET /jobs/{id} handler", r"^JobController\.get_job "),
    ("trigger step (without the POST)", r"^JobSteps\.trigger "),
    ("finish step", r"^JobSteps\.finish "),
    ("watchdog", r"^Watchdog\."),
    ("job history (filing events, listeners, metrics)", r"^SqlJobIndex\.(_file|_tell) "),
    ("job index SQL (SqliteDriver)", r"^SqliteDriver\."),
    ("checkpointer thread", r"_Checkpointer"),
    (
        "rest of each HTTP request (uvicorn, httptools, litestar)",
        r"RequestResponseCycle|H11Protocol|HttpToolsProtocol|litestar/",
    ),
    ("resonate-sdk (workflow replay, scheduling)", r"resonate/|resonate_base/"),
    ("store connection (pump, timers, delivery)", r"resonate_sqlite/connection|core/store/"),
    ("aiohttp (other)", r"aiohttp/"),
    ("event loop (other)", r"asyncio/"),
)


# Leaf frames that mean "waiting", not "working" (py-spy's own idle detection is
# unreliable with --nonblocking: every sampled thread counts as running): the
# event loop's poll, idle pool threads, the log writer's wait, the
# checkpointer's sleep, the sleep between two tries of a store call that found
# the other process's write lock taken (`retry_briefly`'s own line is its
# `time.sleep`: the call it retries is a frame of its own).
IDLE_LEAVES = re.compile(
    r"^((EpollSelector\.select|select|Condition\.wait|Event\.wait|Queue\.get|_worker) "
    r"\((selectors|threading|queue|concurrent/futures/thread)\.py\)"
    r"|LogQueue\._wait \(.*api/logs\.py\)"
    r"|retry_briefly \(.*resonate_sqlite/busy\.py\))$"
)

# uvloop's loop is C: a sample whose innermost Python frame is the call that
# runs it is in its poll (idle) or in its own C work (reading sockets, running
# its queues), which py-spy cannot tell apart. Counted aside, not as CPU.
C_LOOP_LEAF = re.compile(r"^Runner\.run \(.*asyncio/runners\.py\)$")


def frame_name(frame: str) -> str:
    # py-spy raw frames look like "function (path/to/file.py:LINE)"; drop the line
    return re.sub(r":\d+\)$", ")", frame.strip())


def load(path: Path) -> Counter[tuple[str, ...]]:
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = tuple(frame_name(f) for f in stack.split(";") if f)
        # drop the "process NNN:" / "thread (0x..)" pseudo-frames py-spy may add
        frames = tuple(f for f in frames if not f.startswith(("process ", "thread ")))
        stacks[frames] += int(n)
    return stacks


def short(name: str) -> str:
    """`func (.../site-packages/pkg/mod.py)` -> `func (pkg/mod.py)`."""
    m = re.match(r"(.*) \((.*)\)$", name)
    if not m:
        return name
    func, path = m.groups()
    for marker in ("site-packages/", "/work/main/", "/lib/python3.12/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{func} ({path})"


def summarise(path: Path, top: int = 20, ms_per_unit: float | None = None) -> str:
    stacks = load(path)
    idle = sum(n for frames, n in stacks.items() if frames and IDLE_LEAVES.match(frames[-1]))
    c_loop = sum(n for frames, n in stacks.items() if frames and C_LOOP_LEAF.match(frames[-1]))
    stacks = Counter(
        {
            f: n
            for f, n in stacks.items()
            if f and not IDLE_LEAVES.match(f[-1]) and not C_LOOP_LEAF.match(f[-1])
        }
    )
    total = sum(stacks.values())
    if not total:
        return f"{path}: no samples"
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    bucket: Counter[str] = Counter()
    activity: Counter[str] = Counter()
    for frames, n in stacks.items():
        if not frames:
            continue
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
        act = next((a for a, rx in ACTIVITIES if any(re.search(rx, f) for f in frames)), "other")
        activity[act] += n
        # bucket by the innermost frame that matches a bucket
        for f in reversed(frames):
            hit = next((b for b, rx in BUCKETS if re.search(rx, f)), None)
            if hit:
                bucket[hit] += n
                break
        else:
            bucket["other"] += n
    out = [
        f"{total} samples on CPU ({path.name}; {idle} idle samples left out, and {c_loop}"
        " in uvloop's C loop: its poll or its own socket work, which py-spy cannot tell apart)",
        "",
        "where the time goes (innermost match):",
    ]
    out += [f"  {100 * n / total:5.1f}%  {b}" for b, n in bucket.most_common()]
    per = " (and CPU ms per job)" if ms_per_unit else ""
    out += ["", f"what the process was doing{per}, first matching rule:"]
    for a, n in activity.most_common():
        ms = f"  ~{ms_per_unit * n / total:5.2f} ms" if ms_per_unit else ""
        out.append(f"  {100 * n / total:5.1f}%{ms}  {a}")
    out += ["", f"top {top} self:"]
    out += [f"  {100 * n / total:5.1f}%  {short(f)}" for f, n in own.most_common(top)]
    out += ["", f"top {top} inclusive:"]
    out += [f"  {100 * n / total:5.1f}%  {short(f)}" for f, n in incl.most_common(top)]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    print(summarise(args.profile, args.top))


if __name__ == "__main__":
    main()
