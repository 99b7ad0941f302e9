"""What the dashboard's tests share: a `tether serve` of their own, jobs
started on a webhook receiver, callbacks."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import Hit, Receiver, wait_until
from tests.process import TetherProcess, wait_for

CHROMIUM = shutil.which("chromium")
FAIL = "/fail"
"""Receiver paths under this answer 400: the job fails at its trigger."""
SLOW = "/slow"
"""Receiver paths under this answer 202 after `SLOW_S` seconds."""
SLOW_S = 12.0


def answer(hit: Hit) -> tuple[int, dict[str, Any]]:
    """How the tests' webhook receiver answers a trigger: 202, or 400 under
    `FAIL`, or 202 late under `SLOW`."""
    if hit.path.startswith(SLOW):
        time.sleep(SLOW_S)
    return (400, {"error": "no"}) if hit.path.startswith(FAIL) else (202, {})


def serve(tmp: Path, env: dict[str, str] | None = None, **kwargs: Any) -> TetherProcess:
    """`tether serve` on its own embedded store under `tmp`."""
    return TetherProcess(
        tmp, {"TETHER_STORE": f"sqlite:///{tmp}/tether.db", **(env or {})}, **kwargs
    ).start()


def start_job(
    client: httpx.Client, hooks: Receiver, job_id: str, path: str = "/hook", **request: Any
) -> str:
    """Start an http_webhook job at `path` of the receiver; once it is
    triggered (or failed), the callback URL it was handed."""
    body = {
        "id": job_id,
        "backend": "http_webhook",
        "params": {"url": hooks.url(f"{path}/{job_id}")},
    }
    answer = client.post("/jobs", json={**body, **request})
    assert answer.status_code == 201, answer.text
    hit = wait_until(lambda: next(iter(hooks.on(f"{path}/{job_id}")), None))
    state = "failed" if path.startswith(FAIL) else "running"
    wait_for(client, job_id, state)
    return str(hit.body["callback_url"])


def settle(callback_url: str, **body: Any) -> None:
    answer = httpx.post(callback_url, json=body, timeout=5, trust_env=False)
    assert answer.status_code == 200, answer.text


def unique(name: str) -> str:
    """A job id no other test of the module uses."""
    return f"{name}-{time.monotonic_ns()}"


def sign_in(page: Any, token: str) -> None:
    """Sign in on the page that asks for a token (the page shown)."""
    page.get_by_label("Token").fill(token)
    page.get_by_role("button", name="Sign in").click()
