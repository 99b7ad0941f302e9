"""Run the real `tether serve` as a child process, for tests that need one."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import free_port, wait_until


class TetherProcess:
    """`tether serve` on 127.0.0.1; `env` adds TETHER_* settings. Output goes to
    `log` so a test can read what the service logged."""

    def __init__(
        self,
        tmp: Path,
        env: dict[str, str] | None = None,
        port: int | None = None,
        args: tuple[str, ...] = (),
        cwd: Path | None = None,
    ) -> None:
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
        exe = shutil.which("tether", path=str(Path(sys.executable).parent)) or "tether"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [exe, "serve", *self.args],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.cwd,
            )
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"tether serve exited with {self.proc.returncode}:\n" + self.log.read_text()
                )
            try:
                if httpx.get(self.url + "/health", timeout=1, trust_env=False).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.02)  # a health check is cheap; most starts take ~1 s
        self.kill()
        raise RuntimeError("tether serve did not become healthy:\n" + self.log.read_text())

    def kill(self) -> None:
        """SIGKILL to the service and any worker processes: no chance to clean
        up, as in a crash."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, wait: float = 20) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(wait)

    def client(self, **kwargs: Any) -> httpx.Client:
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
