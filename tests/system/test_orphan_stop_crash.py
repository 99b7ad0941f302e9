"""The stop of the run of a job no workflow finishes is durable: the real
`tether serve` on the embedded store, SIGKILLed while the backend's `cancel`
of such a job's run is in flight, is started again, and once the stop's
lease ran out the run is asked to stop again and the stop's outcome is filed,
once: the job's history is complete and its event stream ends. While it
lives, the service renews the lease for as long as the `cancel` takes: no
sweep of its own asks the backend again meanwhile. Stopped by SIGTERM
instead, it gives the lease up as it stops: started again, it asks the
backend again at its first sweep, not once the lease ran out.

The service runs with shorter bounds than its own (a module patched before
it starts, as `test_finish_crash` starts an older workflow version): the
store times a job's wait and its workflow out at the deadline (so a service
down past it leaves the job to the watchdog, as after an outage past the
deadline and an hour). A stop's lease is `TETHER_TASK_TTL`, 2 s here."""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Hit, Receiver, wait_until
from tests.process import TetherProcess, wait_for
from tests.system.test_events_crash import Stream, history

SHORT_BOUNDS = """
from core import steps, workflow

workflow.PROMISE_GRACE_MS = 0  # the store times the wait out at the deadline,
workflow.ROOT_GRACE_MS = 0  # and the workflow with it: no workflow will finish the job
steps.CANCEL_TIMEOUT = 30.0  # longer than the test holds a cancel
"""

DEADLINE = 10
"""The job's timeout, seconds: the first service is killed before it (a job
taken and triggered, on a loaded machine, well within it), and the second
starts past it."""

SECRET = "Bearer orphan-stop-s3cret"
"""The webhook's credential: sent to the cancel URL, never logged or filed."""


HELD = 5.0
"""Seconds the first `cancel` is held open while the service lives: two and a
half of its stop's leases."""


class ShortBounds(TetherProcess):
    """`tether serve` on `tmp_path`'s store (or `store`: one Postgres for
    several hosts, each with a `tmp_path` of its own), with the bounds above."""

    preamble = SHORT_BOUNDS

    ttl = "2"

    def __init__(self, tmp_path: Path, port: int | None = None, store: str | None = None) -> None:
        tmp_path.mkdir(exist_ok=True)
        env = {
            "TETHER_STORE": store or f"sqlite:///{tmp_path / 'tether.db'}",
            "TETHER_TASK_TTL": self.ttl,
            "TETHER_TRIGGER_ATTEMPTS": "1",
            "TETHER_WEBHOOK_AUTH_RUNNER": SECRET,
        }
        super().__init__(tmp_path, env, port)


class LongLease(ShortBounds):
    """A stop's lease of 2 minutes: longer than the test."""

    ttl = "120"


class HeldCancels(list[tuple[float, Hit]]):
    """The backend, as `receiver.respond`: any request but a `cancel` starts
    the run; each `cancel` is kept (Unix time, the request), the first held
    until `release` is set (at most `hold` seconds) and answered 200, a later
    one held until `later` is set (if given) and answered `then`."""

    def __init__(
        self,
        hold: float,
        then: tuple[int, Any] = (200, {}),
        later: threading.Event | None = None,
    ) -> None:
        super().__init__()
        self.first, self.release = threading.Event(), threading.Event()
        self.hold, self.then, self.later = hold, then, later

    def __call__(self, hit: Hit) -> tuple[int, Any]:
        if hit.path != "/cancel":
            return 202, {"run": "r-1"}
        self.append((time.time(), hit))
        if not self.first.is_set():
            self.first.set()
            self.release.wait(self.hold)
            return 200, {}
        if self.later is not None:
            self.later.wait(20)
        return self.then


def row(db: Path, job_id: str) -> tuple[str, int | None]:
    with sqlite3.connect(db) as conn:
        state, stop_due = conn.execute(
            "SELECT state, stop_due FROM tether_jobs WHERE id = ?", (job_id,)
        ).fetchone()
    conn.close()
    return str(state), stop_due


def left_running_past_its_deadline(first: ShortBounds, receiver: Receiver) -> ShortBounds:
    """The scene of both tests: `first` started, a job posted to it whose run
    `receiver` takes (and whose cancel it answers), then `first` killed
    before the job's deadline and left down until past it: no workflow will
    finish the job, and the next service's watchdog ends it and stops its run."""
    first.start()
    params = {
        "url": receiver.url(),
        "cancel_url": receiver.url("/cancel"),
        "auth": "runner",
        "timeout": 60,
    }
    with first.client() as client:
        posted = time.monotonic()
        body = {"id": "orphan", "backend": "http_webhook", "params": params, "timeout": DEADLINE}
        assert client.post("/jobs", json=body).status_code == 201
        wait_for(client, "orphan", "running", recorded=True)
    first.kill()  # before the deadline: the service is down past it
    killed = time.monotonic() - posted
    if killed >= DEADLINE:  # a machine this slow did not set the scene: not a verdict
        pytest.skip(
            f"the first service was killed {killed:.1f} s after the POST: past the deadline"
        )
    time.sleep(posted + DEADLINE + 1.0 - time.monotonic())  # past the deadline
    return first


def test_a_stop_killed_in_flight_is_asked_again_after_a_restart_and_filed_once(
    tmp_path: Path, receiver: Receiver
) -> None:
    # The first held while the service lives, then is killed; the stop taken
    # over held while the stream is looked at, then refused.
    looked = threading.Event()
    refused = (400, {"error": "that run cannot be stopped"})
    receiver.respond = cancels = HeldCancels(HELD + 20, refused, looked)
    first = left_running_past_its_deadline(ShortBounds(tmp_path), receiver)

    # Started again past the deadline: its watchdog ends the job and asks the
    # backend to stop the run, whose answer is held while the service is killed.
    second = ShortBounds(tmp_path, port=first.port).start()
    db = tmp_path / "tether.db"
    try:
        assert cancels.first.wait(20), second.log.read_text()
        _, leased = row(db, "orphan")
        time.sleep(HELD)  # its lease renewed meanwhile: its own sweeps leave the stop be
        state, renewed = row(db, "orphan")
        assert len(cancels) == 1, cancels
        assert leased is not None and renewed is not None and renewed > leased + 2_000
    finally:
        second.kill()
        cancels.release.set()
    state, stop_due = row(db, "orphan")
    assert state == "timed_out" and stop_due is not None  # the stop is still due

    third = ShortBounds(tmp_path, port=first.port).start()
    try:
        stream = Stream(third.url, "orphan")  # waits past `finished` for the stop
        wait_until(lambda: "finished" in stream.types())
        wait_until(lambda: len(cancels) == 2, timeout=30)
        time.sleep(0.5)  # the stop taken over, its `cancel` held: still due
        assert not stream.ended.is_set() and len(cancels) == 2, stream.messages
        looked.set()
        assert stream.ended.wait(15), stream.messages
        assert stream.said_end(), stream.messages
        with third.client() as client:
            items = history(client, "orphan")
        time.sleep(1.0)  # no third stop, no second outcome
        assert len(cancels) == 2
        with third.client() as client:
            assert history(client, "orphan") == items
    finally:
        looked.set()
        third.kill()

    types = [e["type"] for e in items]
    assert types == ["accepted", "triggered", "timed_out", "finished", "cancel_failed"], items
    assert stream.types() == types
    assert items[2]["data"]["by"] == "store"  # no workflow finished it: the watchdog did
    assert items[4]["data"]["error"]["type"] == "http_400"
    assert row(db, "orphan") == ("timed_out", None)
    # The same run asked to stop twice, the second time only once the first
    # stop's lease ran out: never two stops of it at once.
    assert [hit.body["promise_id"] for _, hit in cancels] == ["orphan:1", "orphan:1"]
    assert cancels[1][0] * 1000 >= stop_due
    assert all(hit.headers["authorization"] == SECRET for _, hit in cancels)
    logs = "".join(p.log.read_text() for p in (first, second, third))
    assert "stopping it again" in third.log.read_text()
    for secret in ("orphan-stop-s3cret", "process-secret", "token="):
        assert secret not in logs
        assert secret not in json.dumps(items)


def test_a_stop_cut_short_by_sigterm_is_asked_again_at_the_restart_not_after_its_lease(
    tmp_path: Path, receiver: Receiver
) -> None:
    """The service stopped by SIGTERM while the backend's `cancel` of such a
    job's run is held open gives the stop's lease up as it stops: started
    again, its first sweep asks the backend to stop the run again at once,
    not once the lease (here 2 minutes) has run out."""
    receiver.respond = cancels = HeldCancels(20)  # the first held while the service stops
    first = left_running_past_its_deadline(LongLease(tmp_path), receiver)

    # Started again past the deadline: its watchdog ends the job and asks the
    # backend to stop the run, whose answer is held while SIGTERM stops it.
    second = LongLease(tmp_path, port=first.port).start()
    db = tmp_path / "tether.db"
    try:
        assert cancels.first.wait(20), second.log.read_text()
        state, lease = row(db, "orphan")
        assert state == "timed_out" and lease is not None
        assert second.terminate() == -signal.SIGTERM  # drained: uvicorn re-raises it
    finally:
        second.kill()
        cancels.release.set()
    stopped = time.time() * 1000
    state, stop_due = row(db, "orphan")
    assert state == "timed_out" and stop_due is not None and stop_due <= stopped < lease

    third = LongLease(tmp_path, port=first.port).start()
    try:
        wait_until(lambda: len(cancels) == 2, timeout=30)
        wait_until(lambda: row(db, "orphan")[1] is None, timeout=15)
    finally:
        third.kill()
    assert cancels[1][0] * 1000 < lease  # its first sweep's, not the lease's end
    assert [hit.body["promise_id"] for _, hit in cancels] == ["orphan:1", "orphan:1"]
    assert all(hit.headers["authorization"] == SECRET for _, hit in cancels)
    logs = "".join(p.log.read_text() for p in (first, second, third))
    assert "cut short" in logs
    for secret in ("orphan-stop-s3cret", "process-secret", "token="):
        assert secret not in logs


def test_a_host_killed_mid_stop_leaves_it_to_the_other_within_a_lease_postgres(
    tmp_path: Path, receiver: Receiver, fresh_pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two hosts on one Postgres: host B's watchdog ends the job (its first
    host A killed before the deadline) and asks the backend to stop the run,
    whose `cancel` is held; host C (A come back, in a directory of its own)
    leaves the stop to B while B renews its lease, however long the `cancel`
    takes; B is SIGKILLed, and C asks the backend again once B's lease (2 s,
    `TETHER_TASK_TTL`) ran out, and files the outcome once."""
    # The first held while B lives, then is killed; the one C makes refused.
    refused = (400, {"error": "that run cannot be stopped"})
    receiver.respond = cancels = HeldCancels(HELD + 20, refused)
    a = ShortBounds(tmp_path / "a", store=fresh_pg_url)
    left_running_past_its_deadline(a, receiver)
    b = ShortBounds(tmp_path / "b", store=fresh_pg_url).start()
    c = ShortBounds(tmp_path / "c", store=fresh_pg_url)
    try:
        assert cancels.first.wait(20), b.log.read_text()
        c.start()
        time.sleep(HELD)  # B renews its lease: C's sweeps leave the stop be
        assert len(cancels) == 1, cancels
        b.kill()
        killed = time.time()
        cancels.release.set()
        wait_until(lambda: len(cancels) == 2, timeout=30)
        with c.client() as client:
            wait_until(lambda: "cancel_failed" in [e["type"] for e in history(client, "orphan")])
            time.sleep(1.0)  # no third stop, no second outcome
            items = history(client, "orphan")
    finally:
        cancels.release.set()
        b.kill()
        c.kill()
    taken_over = cancels[1][0] - killed
    types = [e["type"] for e in items]
    assert types == ["accepted", "triggered", "timed_out", "finished", "cancel_failed"], items
    assert len(cancels) == 2 and taken_over < 2.0 + 3.0  # the lease, and a sweep's slack
    assert [hit.body["promise_id"] for _, hit in cancels] == ["orphan:1", "orphan:1"]
    assert "stopping it again" in c.log.read_text()
    logs = "".join(p.log.read_text() for p in (a, b, c))
    for secret in ("orphan-stop-s3cret", "process-secret", "token="):
        assert secret not in logs
        assert secret not in json.dumps(items)
    with capsys.disabled():
        print(
            f"\n[figures] two hosts on Postgres: the stop of a killed host's orphan asked again"
            f" by the other {taken_over:.1f} s after SIGKILL (lease, TETHER_TASK_TTL, 2 s)"
        )
