"""Run the real `tether serve` as a child process, for tests that need one."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import httpx

from tests.conftest import TLS, free_port, wait_until

PORT_TRIES = 3
"""Ports a server started on a free port tries before its test fails: each
found taken by another test's server (pytest-xdist runs two at once) is
given up for another."""


class AddressInUse(RuntimeError):
    """A server process exited because another process holds its port."""


def listening(pid: int, port: int) -> bool | None:
    """Whether process `pid` itself holds the socket listening on TCP `port`
    (any local address), from /proc/net/tcp{,6} and its descriptors; None
    where there is no /proc to tell (not Linux). A socket that is only bound
    (`tether serve --workers N` binds before its workers listen) is not
    listening: another process may still take the port then."""
    if not Path("/proc/net/tcp").exists():
        return None
    listeners = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):  # no IPv6
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                    listeners.add(f"socket:[{fields[9]}]")
    if not listeners:
        return False
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:  # gone
        return False
    for fd in fds:
        with contextlib.suppress(OSError):  # closed meanwhile
            if os.readlink(fd) in listeners:
                return True
    return False


def answers(port: int) -> bool:
    """Whether something accepts a TCP connection on 127.0.0.1:`port`: the
    cheap look that goes first (a refused connect costs microseconds; a read
    of /proc/net/tcp and tcp6 for `listening` walks the kernel's whole
    connection table, ~13 ms of system time however few sockets it lists)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def wait_serving(
    proc: subprocess.Popen[Any],
    port: int,
    healthy: Callable[[], bool],
    wait: float,
    said: Callable[[], str],
) -> None:
    """Return once `proc` listens on `port` itself (`listening`) and, that
    seen, `healthy()` is true while it still runs: until then another
    process may hold the port (another test's server, on the port
    `free_port` gave both) and answer in its place. Raises `AddressInUse`
    when `proc` exits saying its address is in use (`said()`: what it wrote),
    RuntimeError when it exits otherwise or `wait` seconds pass. The socket
    tables are read only once something answers on `port` (`answers`)."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            output = said()
            if "already in use" in output.lower():  # `tether serve`'s words, and uvicorn's
                raise AddressInUse(f"port {port} is taken by another process:\n{output}")
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{output}")
        if answers(port) and listening(proc.pid, port) is not False:
            try:
                if healthy() and proc.poll() is None:
                    return
            except httpx.HTTPError:
                pass
        time.sleep(0.02)  # a look is cheap; most starts take ~1 s
    raise RuntimeError(f"the server did not serve on port {port} within {wait}s:\n{said()}")


def on_free_ports[T](start: Callable[[int], T], port: int, tries: int = PORT_TRIES) -> T:
    """`start(port)`, and while it raises `AddressInUse`, `start` again on
    another free port, `tries` in all."""
    for left in range(tries - 1, -1, -1):
        try:
            return start(port)
        except AddressInUse as exc:
            if not left:
                raise
            port = free_port()
            print(f"{exc}\n(trying port {port} instead)", file=sys.stderr)
    raise AssertionError("unreachable")


class TetherProcess:
    """`tether serve` on 127.0.0.1; `env` adds TETHER_* settings. Output goes to
    `log` so a test can read what the service logged."""

    preamble: str | None = None
    """Python run before `tether`'s own entry point, in a script that takes
    the installed command's place (None: the command): a test's patches of
    the real service's modules (an older workflow version, shorter bounds).
    The script goes beside `log`."""

    def __init__(
        self,
        tmp: Path,
        env: dict[str, str] | None = None,
        port: int | None = None,
        args: tuple[str, ...] = (),
        cwd: Path | None = None,
    ) -> None:
        self.pinned = port is not None
        """The port is kept by `start`: the test chose it (a restart on the
        same one), or the service served on it already (the jobs' callback
        URLs name it)."""
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"tether-{self.port}.log"
        self.env = {
            **os.environ,
            "TETHER_PORT": str(self.port),
            "TETHER_PUBLIC_URL": self.url,
            "TETHER_CALLBACK_SECRET": "process-secret",
            "TETHER_WATCHDOG_INTERVAL": "0.2",
            "TETHER_TRIGGER_BACKOFF": "0.1",
            **(env or {}),
        }
        self.args = args
        self.cwd = cwd
        """The process's working directory (None: this one's)."""
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: float = 30) -> TetherProcess:
        """Start `tether serve` and return once it, not another process on its
        port, answers /health (`wait_serving`). A port found taken is given up
        for a free one (`on_free_ports`) unless it is kept (`pinned`: the test
        chose it with `port=`, or this is a restart): then `AddressInUse`."""
        if self.pinned:
            return self._start(self.port, wait)
        started = on_free_ports(lambda port: self._start(port, wait), self.port)
        self.pinned = True  # served on: a restart keeps it
        return started

    def _command(self) -> str:
        """The `tether` to run: the installed command, or a script that runs
        `preamble` and then the command's entry point."""
        if self.preamble is None:
            return shutil.which("tether", path=str(Path(sys.executable).parent)) or "tether"
        script = self.log.with_suffix(".run.py")
        entry = "import sys\n\nfrom api.cli import main\n\nsys.exit(main(sys.argv[1:]))\n"
        script.write_text(f"#!{sys.executable}\n{self.preamble}\n{entry}")
        script.chmod(0o755)
        return str(script)

    def _start(self, port: int, wait: float) -> TetherProcess:
        if port != self.port:  # the last port was taken: this process moves
            url = f"http://127.0.0.1:{port}"
            public = self.env.get("TETHER_PUBLIC_URL", "")
            if public == self.url or public.startswith(self.url + "/"):  # ours, or ours + a path
                self.env["TETHER_PUBLIC_URL"] = url + public[len(self.url) :]
            self.env["TETHER_PORT"] = str(port)
            self.port, self.url = port, url
        exe = self._command()
        with self.log.open("ab") as out:
            before = out.tell()  # a restart on the same port logs to the same file
            self.proc = subprocess.Popen(
                [exe, "serve", *self.args],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.cwd,
            )

        def said() -> str:
            with self.log.open("rb") as log:
                log.seek(before)
                return log.read().decode(errors="replace")

        def healthy() -> bool:
            return httpx.get(self.url + "/health", timeout=1, trust_env=False).status_code == 200

        try:
            wait_serving(self.proc, port, healthy, wait, said)
        except AddressInUse as exc:
            if self.pinned:
                raise AddressInUse(
                    f"{exc}\n(port {port} is kept, the test's choice or a restart's:"
                    " no other is tried)"
                ) from None
            with self.log.open("r+b") as log:  # the log is the serving process's alone
                log.truncate(before)
            raise
        except BaseException:
            self.kill()
            raise
        return self

    def kill(self) -> None:
        """SIGKILL to the service and any worker processes: no chance to clean
        up, as in a crash."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, wait: float = 20, how: signal.Signals = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(how)
        return self.proc.wait(wait)

    def client(self, **kwargs: Any) -> httpx.Client:
        kwargs.setdefault("verify", TLS)  # (one context: httpx loads the certificates for each)
        return httpx.Client(base_url=self.url, trust_env=False, timeout=10, **kwargs)


def tether(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The `tether` command of this environment, run to its end, with `env`
    over the process's own variables."""
    exe = shutil.which("tether", path=str(Path(sys.executable).parent)) or "tether"
    return subprocess.run(
        [exe, *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


class Hold(Protocol):
    """A request a fake external system holds (made, its answer not sent)."""

    release: threading.Event


def killed_inside(
    tmp: Path, inside: Callable[[httpx.Client], Hold], **settings: str
) -> tuple[TetherProcess, TetherProcess]:
    """The real `tether serve` on a store in `tmp` (a 2 s lease, `settings`
    added), killed with SIGKILL once `inside(client)` returns: it makes the
    service send a request the fake holds, and returns that hold, released
    after the kill. Then started again on the same store and port. Both
    processes; the second serves (the caller kills it)."""
    env = {"TETHER_STORE": f"sqlite:///{tmp}/t.db", "TETHER_TASK_TTL": "2", **settings}
    first = TetherProcess(tmp, env).start(wait=60)
    try:
        with first.client() as client:
            held = inside(client)
    finally:
        first.kill()
    held.release.set()
    return first, TetherProcess(tmp, env, port=first.port).start(wait=60)


def wait_for(
    client: httpx.Client,
    job_id: str,
    *states: str,
    timeout: float = 30,
    recorded: bool = False,
) -> dict[str, Any]:
    """The job once it is in one of `states` (and, with `recorded`, once its
    trigger step has recorded `external`). A service that does not answer yet
    (restarting) is asked again."""
    seen: list[Any] = [None]

    def reached() -> dict[str, Any] | None:
        try:
            job = seen[0] = client.get(f"/jobs/{job_id}").json()
        except httpx.HTTPError:
            return None
        if job.get("state") in states and not (recorded and job.get("external") is None):
            return job
        return None

    try:
        job: dict[str, Any] = wait_until(reached, timeout)
        return job
    except AssertionError as exc:
        raise AssertionError(f"job {job_id} is {seen[0]}, not {states}: {exc}") from None


def report(capsys: Any, line: str) -> None:
    """Print a test's figures past pytest's capture, so CI's log shows them."""
    with capsys.disabled():
        print(f"\n[figures] {line}")
