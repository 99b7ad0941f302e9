"""The stop of what a trigger call left to answer late may start is durable.

A job is canceled while its backend's trigger request is still held open:
its workflow no longer waits for the call, and its finish asks the backend
to stop what the call may have started (`cancel_unrecorded`, here the
webhook's `cancel_url`). The backend then starts the run all the same (the
request had reached it: a slow Databricks `run_now` in a thread does this),
after that look. The real `tether serve` on the embedded store holds the
stop of that run in the job's row while the call is under way
(`JobSteps._answered_late`):

- SIGKILLed meanwhile, it leaves the stop to the next service's watchdog once
  the lease (`TETHER_TASK_TTL`, 2 s here) ran out, which asks the backend
  again: the run is stopped. Before, nothing asked after the finish's look,
  and the run went on, recorded nowhere.
- Stopped by SIGTERM, it makes the stop due once the call should have ended
  (its `TRIGGER_TIMEOUT` from its start, 20 s here: a call in a thread goes
  on), and the next service asks then, not before.

The service runs with shorter bounds than its own (a module patched before
it starts, as `test_orphan_stop_crash` does)."""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from tests.conftest import Hit, Receiver, wait_until
from tests.process import TetherProcess
from tests.system.test_events_crash import history

SHORT_BOUNDS = """
from core import steps

steps.TRIGGER_WATCH = 0.2  # the call is left within this of the cancel
steps.TRIGGER_TIMEOUT = 20.0  # the call's bound: more than the tests hold it
"""

SECRET = "Bearer late-trigger-s3cret"
"""The webhook's credential: sent to the cancel URL, never logged or filed."""


class ShortBounds(TetherProcess):
    """`tether serve` on `tmp_path`'s store with the bounds above, a stop's
    lease of 2 s (`TETHER_TASK_TTL`), one trigger try, and `more` settings."""

    preamble = SHORT_BOUNDS
    more: ClassVar[Mapping[str, str]] = {"TETHER_WEBHOOK_AUTH_RUNNER": SECRET}

    def __init__(self, tmp_path: Path, port: int | None = None) -> None:
        env = {
            "TETHER_STORE": f"sqlite:///{tmp_path / 'tether.db'}",
            "TETHER_TASK_TTL": "2",
            "TETHER_TRIGGER_ATTEMPTS": "1",
            **self.more,
        }
        super().__init__(tmp_path, env, port)


class LateBackend:
    """The backend, as `receiver.respond`: a trigger's request is held until
    the first `cancel` came (the finish's look), then its run starts
    (`started`), and the request is held on until `release`; each `cancel`
    is kept (Unix time, the request) and answered 200."""

    def __init__(self) -> None:
        self.cancels: list[tuple[float, Hit]] = []
        self.first, self.started, self.release = (threading.Event() for _ in range(3))
        self.called = 0.0
        """When the trigger's request came (Unix time)."""

    def __call__(self, hit: Hit) -> tuple[int, Any]:
        if hit.path == "/cancel":
            self.cancels.append((time.time(), hit))
            self.first.set()
            return 200, {}
        self.called = time.time()
        self.first.wait(20)
        self.started.set()  # after the finish asked to stop it
        self.release.wait(30)
        return 202, {"run": "late-1"}


def row(db: Path) -> tuple[str, int | None, Any]:
    with sqlite3.connect(db) as conn:
        found = conn.execute(
            "SELECT state, stop_due, external FROM tether_jobs WHERE id = 'late'"
        ).fetchone()
    conn.close()
    return str(found[0]), found[1], found[2]


def canceled_while_triggering(first: ShortBounds, receiver: Receiver) -> LateBackend:
    """The scene of both tests: job `late` posted to `first`, canceled while
    its trigger request is held; the backend starts the run after the
    finish's `cancel_url` came, and the stop of it is held in the row."""
    receiver.respond = backend = LateBackend()
    first.start()
    params = {
        "url": receiver.url("/run"),
        "cancel_url": receiver.url("/cancel"),
        "auth": "runner",
        "timeout": 60,
    }
    with first.client() as client:
        body = {"id": "late", "backend": "http_webhook", "params": params, "timeout": 600}
        assert client.post("/jobs", json=body).status_code == 201
        wait_until(lambda: receiver.on("/run"), timeout=20)
        assert client.post("/jobs/late/cancel").status_code == 200
    assert backend.started.wait(20), first.log.read_text()
    return backend


def test_a_late_trigger_calls_run_is_stopped_after_its_service_was_killed(
    tmp_path: Path, receiver: Receiver
) -> None:
    first = ShortBounds(tmp_path)
    backend = canceled_while_triggering(first, receiver)
    db = tmp_path / "tether.db"
    try:
        wait_until(lambda: row(db)[1] is not None, timeout=10)
        _, held, _ = row(db)
        time.sleep(3.0)  # more than a lease: renewed while the call runs, no sweep takes it
        state, renewed, external = row(db)
        assert (state, external) == ("canceled", None)
        assert held is not None and renewed is not None and renewed > held
        assert len(backend.cancels) == 1  # the finish's alone
    finally:
        first.kill()
        backend.release.set()
    _, due, _ = row(db)
    assert due is not None

    second = ShortBounds(tmp_path, port=first.port).start()
    try:
        wait_until(lambda: len(backend.cancels) == 2, timeout=30)
        wait_until(lambda: row(db)[1] is None, timeout=15)
        time.sleep(1.0)  # asked once more, no more
        with second.client() as client:
            items = history(client, "late")
    finally:
        second.kill()
    assert len(backend.cancels) == 2
    assert backend.cancels[1][0] * 1000 >= due  # once the lease ran out, not before
    assert [hit.body["promise_id"] for _, hit in backend.cancels] == ["late:1", "late:1"]
    assert all(hit.headers["authorization"] == SECRET for _, hit in backend.cancels)
    assert row(db) == ("canceled", None, None)
    types = [e["type"] for e in items]
    assert types == ["accepted", "cancel_requested", "finished"], items
    logs = first.log.read_text() + second.log.read_text()
    assert "stopping it again" in second.log.read_text()
    for secret in ("late-trigger-s3cret", "process-secret", "token="):
        assert secret not in logs
        assert secret not in json.dumps(items)


def test_a_late_trigger_calls_stop_is_due_once_the_call_should_have_ended_after_sigterm(
    tmp_path: Path, receiver: Receiver
) -> None:
    first = ShortBounds(tmp_path)
    backend = canceled_while_triggering(first, receiver)
    db = tmp_path / "tether.db"
    try:
        wait_until(lambda: row(db)[1] is not None, timeout=10)
        [run] = receiver.on("/run")
        assert first.terminate() == -signal.SIGTERM
        stopped = time.time() * 1000
    finally:
        first.kill()
        backend.release.set()
    state, due, _ = row(db)
    assert state == "canceled" and due is not None
    assert stopped < due <= backend.called * 1000 + 20_000  # the call's bound, from its start
    assert "when the call should have ended" in first.log.read_text()
    assert run is not None

    second = ShortBounds(tmp_path, port=first.port).start()
    try:
        wait_until(lambda: len(backend.cancels) == 2, timeout=30)
        wait_until(lambda: row(db)[1] is None, timeout=15)
    finally:
        second.kill()
    assert backend.cancels[1][0] * 1000 >= due  # not before the call should have ended
    assert [hit.body["promise_id"] for _, hit in backend.cancels] == ["late:1", "late:1"]
    logs = first.log.read_text() + second.log.read_text()
    for secret in ("late-trigger-s3cret", "process-secret", "token="):
        assert secret not in logs
