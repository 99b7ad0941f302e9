"""Small helpers shared by the benchmark's processes (no third-party imports)."""

from __future__ import annotations

import json
import math
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Never route the benchmark's own HTTP through a proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http(method: str, url: str, body: Any = None, timeout: float = 5.0) -> tuple[int, Any]:
    """One blocking request; returns (status, decoded JSON or text). Status 0 means
    the connection failed."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("content-type", "application/json")
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    except (OSError, TimeoutError):
        return 0, None
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def wait_http(url: str, timeout: float, ok: Any = None, interval: float = 0.02) -> float:
    """Poll `url` until it answers 200 (and `ok(body)` is true); return the seconds
    it took. Raises TimeoutError."""
    start = time.perf_counter()
    while True:
        status, body = http("GET", url, timeout=1.0)
        if status == 200 and (ok is None or ok(body)):
            return time.perf_counter() - start
        if time.perf_counter() - start > timeout:
            raise TimeoutError(f"{url} not ready after {timeout:g}s (last status {status})")
        time.sleep(interval)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of unsorted `values`; NaN if empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


# ── processes and memory ─────────────────────────────────────────────────────


def children(pid: int) -> list[int]:
    """`pid` and all its descendants, from /proc."""
    parent_of: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # the command name is in parentheses and may contain spaces
        fields = stat.rsplit(")", 1)[1].split()
        parent_of[int(entry)] = int(fields[1])
    tree = [pid]
    for p in tree:
        tree.extend(c for c, parent in parent_of.items() if parent == p)
    return tree


def rss_kb(pid: int) -> int:
    """VmRSS of one process in KiB (0 if gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_kb(pid: int) -> tuple[int, dict[int, int]]:
    """Total VmRSS of `pid` and its descendants, and each one's."""
    each = {p: rss_kb(p) for p in children(pid)}
    return sum(each.values()), each


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by one process (0 if gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def tree_cpu_seconds(pid: int) -> float:
    return sum(cpu_seconds(p) for p in children(pid))


def context_switches(pid: int) -> int:
    """Voluntary context switches of all threads of one process so far (0 if
    gone): each is a thread going to sleep, so their rate counts wake-ups."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tasks:
        try:
            for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def tree_context_switches(pid: int) -> int:
    return sum(context_switches(p) for p in children(pid))
