"""`tether serve`'s uvicorn parts sleep while idle (`api/server.py`), real
processes and real signals: a worker's loop wakes about once a second, not
ten times, yet a SIGTERM still stops it at once; the supervisor wakes for a
worker's death or a signal, not twice a second, and still replaces a
SIGKILLed worker and stops on SIGTERM. Wake-ups are counted as the kernel
counts them (`voluntary_ctxt_switches` in /proc)."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from api.server import TetherProcess as Worker
from tests.conftest import free_port, wait_until
from tests.process import TetherProcess, on_free_ports, wait_serving

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")

APP = """
import sys
import uvicorn
from api.http import SERVER_OPTIONS
from api.server import TetherServer

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})

config = uvicorn.Config(app, port=int(sys.argv[1]), log_level="warning", **SERVER_OPTIONS)
TetherServer(config).run()
"""


def wakeups(pid: int, tid: int | None = None) -> int:
    """Voluntary context switches of a thread so far (the main one by default)."""
    status = Path(f"/proc/{pid}/task/{tid or pid}/status").read_text()
    return int(status.split("voluntary_ctxt_switches:")[1].split()[0])


def workers(pid: int) -> set[int]:
    """The supervisor's worker processes (not multiprocessing's resource tracker)."""
    found = set()
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.add(int(child))
        except OSError:
            pass  # gone meanwhile
    return found


def test_a_worker_ticks_once_a_second_and_stops_at_once_on_sigterm(tmp_path: Path) -> None:
    output = tmp_path / "app.log"

    def start(port: int) -> tuple[subprocess.Popen[bytes], int]:
        with output.open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-c", APP, str(port)], stdout=out, stderr=out)

        def up() -> bool:
            return httpx.get(f"http://127.0.0.1:{port}/", trust_env=False).status_code == 200

        try:
            wait_serving(proc, port, up, 20, output.read_text)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        return proc, port

    proc, port = on_free_ports(start, free_port())
    try:
        said = httpx.get(f"http://127.0.0.1:{port}/", trust_env=False).headers["date"]
        assert abs(parsedate_to_datetime(said).timestamp() - time.time()) < 2
        before = wakeups(proc.pid)
        time.sleep(3)
        assert wakeups(proc.pid) - before <= 6  # uvicorn's own loop: ~30
        # Right after a whole second, when the loop has just gone back to sleep
        # for a second: only the signal's wake stops it before the next tick.
        time.sleep(1.05 - time.time() % 1)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == -signal.SIGTERM  # uvicorn raises it again once stopped
        assert time.monotonic() - sent < 0.6
    finally:
        proc.kill()
        proc.wait()


def test_the_supervisor_sleeps_yet_replaces_a_killed_worker_and_stops(tmp_path: Path) -> None:
    service = TetherProcess(
        tmp_path, {"TETHER_STORE": f"sqlite:///{tmp_path}/t.db"}, args=("--workers", "2")
    ).start()
    assert service.proc is not None
    pid = service.proc.pid
    try:
        wait_until(lambda: len(workers(pid)) == 2, timeout=20)
        first = workers(pid)
        before = wakeups(pid)
        time.sleep(3)
        assert wakeups(pid) - before <= 3  # uvicorn's Multiprocess: 7-8

        victim = min(first)
        killed = time.monotonic()
        subprocess.run(["kill", "-KILL", str(victim)], check=True)
        wait_until(lambda: len(workers(pid) - first) == 1, timeout=10)
        # RESTART_GAP (0.5 s) and the replacement's start; a kill during the
        # supervisor's ping of that worker took its whole 5 s timeout.
        assert time.monotonic() - killed < 2.5
        assert victim not in workers(pid)
        # why, in the log (uvicorn's line said only "Child process [N] died")
        line = f"worker [{victim}] was ended by SIGKILL; starting another"
        wait_until(lambda: line in service.log.read_text(), timeout=5)  # (a thread writes it)
        with service.client() as http:
            for _ in range(4):  # whichever worker takes the connection
                assert http.get("/health", headers={"connection": "close"}).status_code == 200

        sent = time.monotonic()
        assert service.terminate(wait=20) == 0
        assert time.monotonic() - sent < 5
    finally:
        service.kill()


def test_a_ping_ends_when_its_worker_dies_before_answering() -> None:
    """The supervisor pings each worker every `PING_INTERVAL`; a worker
    SIGKILLed just before it answers is seen dead at once, not after the
    ping's whole timeout (a CI run once took 5 s to replace one)."""
    worker = Worker(uvicorn.Config(app=None), [], None)
    # A worker that never answers a ping and exits after a moment.
    worker.process = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(2.0,))
    worker.process.start()
    asked = time.monotonic()
    try:
        assert worker.is_alive(timeout=60) is False
        assert time.monotonic() - asked < 30  # uvicorn's own ping: the whole 60 s
    finally:
        worker.process.kill()
        worker.process.join()


def connections_held(pid: int, port: int, clients: list[socket.socket]) -> int:
    """Established TCP connections on `port` (the service's side) from
    `clients` that process `pid` holds, from /proc/net/tcp and its
    descriptors. Only the test's own: another test's probe of a port it
    found free a moment before may be connected to this service too (once in
    a CI run: 27 of 24)."""
    theirs = {client.getsockname()[1] for client in clients}
    mine = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().name
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            mine.add(target[len("socket:[") : -1])
    held = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        peer_port = int(fields[2].split(":")[1], 16)
        established = fields[3] == "01"
        if local_port == port and peer_port in theirs and established and fields[9] in mine:
            held += 1
    return held


def open_connection(port: int) -> socket.socket:
    """A keep-alive connection, answered once (so a worker has accepted it)."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn.sendall(b"GET /health HTTP/1.1\r\nhost: t\r\n\r\n")
    assert conn.recv(65536).startswith(b"HTTP/1.1 ")
    return conn


def test_the_workers_share_a_burst_of_connections_evenly_and_a_stopped_one_holds_none_up(
    tmp_path: Path,
) -> None:
    """A client opening its pool at once used to land mostly on one worker
    (28 of 32 in a benchmark run); each worker now takes one per turn and
    leaves a connection for a moment to one that holds fewer."""
    service = TetherProcess(
        tmp_path, {"TETHER_STORE": f"sqlite:///{tmp_path}/t.db"}, args=("--workers", "2")
    ).start()
    assert service.proc is not None
    opened: list[socket.socket] = []
    try:
        wait_until(lambda: len(workers(service.proc.pid)) == 2, timeout=20)
        a, b = sorted(workers(service.proc.pid))

        def burst() -> list[int]:
            """24 connections at once, answered: how many each worker holds."""
            time.sleep(1.5)  # each worker has said how many it holds (none)
            # All 24 wait in the listener's queue when the workers go on.
            for pid in (a, b):
                subprocess.run(["kill", "-STOP", str(pid)], check=True)
            try:
                pending = [socket.create_connection(("127.0.0.1", service.port)) for _ in range(24)]
            finally:
                subprocess.run(["kill", "-CONT", str(a), str(b)], check=True)
            try:
                for conn in pending:
                    conn.settimeout(10)
                    conn.sendall(b"GET /health HTTP/1.1\r\nhost: t\r\n\r\n")
                    assert conn.recv(65536).startswith(b"HTTP/1.1 ")
                split = sorted(connections_held(pid, service.port, pending) for pid in (a, b))
            finally:
                for conn in pending:
                    conn.close()
            assert sum(split) == 24
            return split

        # asyncio's and uvloop's own accepting gave 24/0 and 22/2. A worker the
        # busy machine did not schedule within the 2 ms it is left lets the
        # other take them all (once in a CI run, 22/2): up to three bursts.
        splits = [burst()]
        while splits[-1][0] < 6 and len(splits) < 3:
            splits.append(burst())
        assert splits[-1][0] >= 6, f"connections split {splits} between the two workers"

        # A stopped worker holding fewer takes nothing, and keeps no one waiting long.
        subprocess.run(["kill", "-STOP", str(a)], check=True)
        try:
            started = time.monotonic()
            new = [open_connection(service.port) for _ in range(10)]
            opened += new
            assert time.monotonic() - started < 2.0
            # (the new ones alone: on a busy machine an idle one of the burst
            # may have reached its keep-alive timeout meanwhile, and closed)
            assert connections_held(b, service.port, new) == 10
        finally:
            subprocess.run(["kill", "-CONT", str(a)], check=True)
    finally:
        for conn in opened:
            conn.close()
        service.kill()


def serve(tmp_path: Path, workers: int, **popen: Any) -> tuple[subprocess.Popen[bytes], int]:
    """`tether serve --workers N` on a store in `tmp_path`, started as
    `popen` says; with its port."""
    port = free_port()
    env = {**os.environ, "TETHER_STORE": f"sqlite:///{tmp_path}/t.db", "TETHER_PORT": str(port)}
    exe = shutil.which("tether", path=str(Path(sys.executable).parent)) or "tether"
    args = [exe, "serve", "--workers", str(workers)]
    return subprocess.Popen(args, env=env, cwd=tmp_path, **popen), port


def answers(url: str) -> bool:
    """Whether `url` answers 200 (not at all while its service starts)."""
    try:
        return httpx.get(url, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_service_started_with_its_output_closed_writes_nothing_into_its_shared_memory(
    tmp_path: Path,
) -> None:
    """Started with stdout and stderr closed (by tooling that closes what it
    does not pass on), the supervisor's table of connections in shared
    memory took descriptor 2, and the workers wrote their logs into it, in
    RAM without bound (found by a QA pass). Each closed one is the null
    device now."""

    def close_output() -> None:
        os.close(1)
        os.close(2)

    proc, port = serve(tmp_path, 2, preexec_fn=close_output)
    try:
        url = f"http://127.0.0.1:{port}/health"

        wait_until(lambda: answers(url), timeout=30)
        for _ in range(50):  # each logs an access line
            assert httpx.get(url, trust_env=False).status_code == 200
        wait_until(lambda: len(workers(proc.pid)) == 2, timeout=10)
        for pid in (proc.pid, *workers(proc.pid)):
            for fd in (1, 2):
                assert os.readlink(f"/proc/{pid}/fd/{fd}") == os.devnull, (pid, fd)
    finally:
        proc.kill()
        proc.wait(10)


def test_a_log_output_nobody_reads_holds_up_no_request(tmp_path: Path) -> None:
    """`tether serve … | sleep 100000` (a stuck log shipper): the workers
    blocked writing to the full pipe and answered nothing more, after some
    950 requests (found by a QA pass). Lines wait in a queue for a writer
    thread, or are dropped, and are written once the pipe is read."""
    # One worker (a worker's own log, as each of several has): stderr never
    # read until the end.
    proc, port = serve(tmp_path, 1, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}/health"

        wait_until(lambda: answers(url), timeout=30)
        with httpx.Client(trust_env=False, timeout=10) as client:
            for _ in range(1200):  # an access line each: some 80 KB, past the pipe's 64 KB
                assert client.get(url).status_code == 200
    finally:
        proc.terminate()
        assert proc.stderr is not None
        said = proc.stderr.read().decode()  # read at last: the rest is written
        proc.wait(20)
    assert said.count(" GET /health 200 ") >= 1200


@pytest.mark.parametrize(
    ("exitcode", "hung", "said"),
    [
        (-9, False, "was ended by SIGKILL"),
        (-200, False, "was ended by signal 200"),  # (no signal of this system)
        (3, False, "exited with status 3"),
        (-9, True, "did not answer a ping within 5 s (a blocked event loop?) and was killed"),
    ],
)
def test_a_replaced_workers_end_is_said(exitcode: int, hung: bool, said: str) -> None:
    from api.server import _ended

    assert _ended(exitcode, hung, 5.0) == said
