"""The real `tether serve` on the embedded store, killed with SIGKILL at each
stage of a job and restarted: no job lost, none finished twice, each trigger
once (or, after a kill inside the trigger step, again with the same key)."""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import threading
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import HOLD, Hit, Receiver, wait_until
from tests.process import TetherProcess, wait_for


def service(tmp_path: Path, port: int | None = None, **env: str) -> TetherProcess:
    return TetherProcess(
        tmp_path,
        {"TETHER_STORE": f"sqlite:///{tmp_path}/tether.db", "TETHER_TASK_TTL": "2", **env},
        port=port,
    )


def start_job(client: httpx.Client, receiver: Receiver, job_id: str, **extra: Any) -> None:
    response = client.post(
        "/jobs",
        json={"id": job_id, "backend": "http_webhook", "params": {"url": receiver.url()}, **extra},
    )
    assert response.status_code == 201, response.text


def callback(receiver: Receiver, job_id: str, body: Any) -> httpx.Response:
    [url] = {h.body["callback_url"] for h in receiver.hits if h.body["job_id"] == job_id}
    return httpx.post(url, json=body, trust_env=False, timeout=10)


def test_kill_while_waiting_then_the_callback_after_restart_finishes_the_job(tmp_path, receiver):
    first = service(tmp_path).start()
    with first.client() as client:
        start_job(client, receiver, "wait")
        wait_for(client, "wait", "running")
    first.kill()

    second = service(tmp_path, port=first.port).start()
    try:
        with second.client() as client:
            assert client.get("/jobs/wait").json()["state"] == "running"
            answer = callback(receiver, "wait", {"status": "succeeded", "result": 7})
            assert answer.status_code == 200 and answer.json()["outcome"] == "accepted"
            job = wait_for(client, "wait", "succeeded")
            assert job["result"] == 7
    finally:
        second.kill()
    assert len(receiver.hits) == 1


def test_kill_right_after_accept_still_triggers_once(tmp_path, receiver):
    # Until the first service is dead the external system refuses (503) every
    # trigger, so the kill lands after the accept and before any trigger took.
    dead = threading.Event()
    accepted: list[str] = []

    def respond(hit: Hit) -> tuple[int, Any]:
        if not dead.is_set():
            return 503, {}
        accepted.append(hit.body["idempotency_key"])
        return 202, {}

    receiver.respond = respond
    first = service(tmp_path, TETHER_TRIGGER_ATTEMPTS="100").start()
    with first.client() as client:
        start_job(client, receiver, "acc")
        wait_until(lambda: receiver.hits)
        assert client.get("/jobs/acc").json()["state"] == "pending"
    first.kill()
    dead.set()

    restart_and_finish(tmp_path, first, receiver, "acc", TETHER_TRIGGER_ATTEMPTS="100")
    assert accepted == ["acc:1"]
    assert {h.body["idempotency_key"] for h in receiver.hits} == {"acc:1"}


def test_kill_inside_the_trigger_step_repeats_it_with_the_same_key(tmp_path, receiver):
    release = threading.Event()

    def respond(hit: Hit) -> tuple[int, Any]:
        if len(receiver.hits) == 1:
            release.wait(20)  # hold the first trigger until the service is dead
        return 202, {}

    receiver.respond = respond
    first = service(tmp_path).start()
    with first.client() as client:
        start_job(client, receiver, "mid")
        wait_until(lambda: receiver.hits, every=0.02)
    first.kill()
    release.set()

    restart_and_finish(tmp_path, first, receiver, "mid")
    assert [h.body["idempotency_key"] for h in receiver.hits] == ["mid:1", "mid:1"]


def test_kill_inside_a_try_then_a_timeout_stops_what_the_try_may_have_started(tmp_path, receiver):
    """The service dies inside the trigger's one try (the receiver took it,
    no answer came back); the job's deadline passes while it is down. After
    the restart the job times out with no run recorded, and the receiver is
    asked to stop the run that try started (`cancel_url`), not left to run
    it unrecorded. Tries after the restart are refused with 503, so no run
    of the job is ever recorded."""
    release = threading.Event()

    def respond(hit: Hit) -> tuple[int, Any]:
        if hit.path != "/hook":
            return 200, {}
        if len(receiver.on("/hook")) == 1:
            release.wait(20)  # hold the first try until the service is dead
            return 202, {}
        return 503, {}

    receiver.respond = respond
    env = {"TETHER_TRIGGER_ATTEMPTS": "100", "TETHER_TRIGGER_BACKOFF": "0.2"}
    first = service(tmp_path, **env).start()
    with first.client() as client:
        start_job(
            client,
            receiver,
            "gone",
            timeout=1,
            params={"url": receiver.url(), "cancel_url": receiver.url("/cancel")},
        )
        wait_until(lambda: receiver.on("/hook"), every=0.02)
    first.kill()
    release.set()
    time.sleep(1.2)  # past the deadline

    second = service(tmp_path, port=first.port, **env).start()
    try:
        with second.client() as client:
            job = wait_for(client, "gone", "timed_out")
            assert job["external"] is None
            wait_until(lambda: receiver.on("/cancel"))
    finally:
        second.kill()
    assert {h.body["promise_id"] for h in receiver.on("/cancel")} == {"gone:1"}
    assert {h.body["idempotency_key"] for h in receiver.on("/hook")} == {"gone:1"}


def test_kill_during_a_callback_then_its_retry_settles_once(tmp_path, receiver):
    first = service(tmp_path).start()
    with first.client() as client:
        start_job(client, receiver, "cb")
        wait_for(client, "cb", "running")
    sent = threading.Thread(
        target=lambda: _quietly(callback, receiver, "cb", {"status": "succeeded", "result": 1})
    )
    sent.start()
    first.kill()
    sent.join()

    second = service(tmp_path, port=first.port).start()
    try:
        with second.client() as client:
            retry = callback(receiver, "cb", {"status": "succeeded", "result": 1})
            assert retry.json()["outcome"] in ("accepted", "duplicate")
            job = wait_for(client, "cb", "succeeded")
            # finished once, never changed
            wait_until(lambda: client.get("/jobs/cb").json() == job, holds=HOLD)
            other = callback(receiver, "cb", {"status": "failed", "error": {"message": "x"}})
            assert other.status_code == 409
    finally:
        second.kill()
    assert len(receiver.hits) == 1


def test_a_job_whose_deadline_passes_while_the_service_is_down_times_out(tmp_path, receiver):
    first = service(tmp_path).start()
    with first.client() as client:
        start_job(client, receiver, "late", timeout=1)
        wait_for(client, "late", "running")
    first.kill()
    time.sleep(1.2)
    second = service(tmp_path, port=first.port).start()
    try:
        with second.client() as client:
            job = wait_for(client, "late", "timed_out")
            assert job["error"]["type"] == "timeout"
            assert callback(receiver, "late", {"status": "succeeded"}).status_code == 410
    finally:
        second.kill()


def test_sigterm_drains_and_loses_nothing(tmp_path, receiver):
    def respond(hit: Hit) -> tuple[int, Any]:
        time.sleep(1)  # a slow external system: the trigger is in flight at SIGTERM
        return 202, {}

    receiver.respond = respond
    first = service(tmp_path).start()
    with first.client() as client:
        start_job(client, receiver, "term")
        wait_until(lambda: receiver.hits, every=0.02)
    started = time.monotonic()
    assert first.terminate(wait=20) == -signal.SIGTERM  # uvicorn re-raises it after draining
    assert time.monotonic() - started < 15
    assert "Application shutdown complete" in first.log.read_text()

    restart_and_finish(tmp_path, first, receiver, "term")
    # The trigger in flight at SIGTERM finished and was recorded: never sent again.
    assert [h.body["idempotency_key"] for h in receiver.hits] == ["term:1"]


def test_sigterm_does_not_wait_out_a_triggers_backoff(tmp_path, receiver):
    """A target answering 503 with `Retry-After: 6`: the stop waited out the
    wait (up to its 20 s for its steps), then made the next try while
    stopping. Now the wait is cut short, and the restart tries again, with
    the same key, once, no sooner than the target asked (its lease, 2 s
    here, runs out before that)."""

    def respond(hit: Hit) -> tuple[Any, ...]:
        if len(receiver.hits) == 1:
            return 503, {"busy": True}, {"retry-after": "6"}
        return 202, {}

    receiver.respond = respond
    first, took = stopped_in_backoff(tmp_path, receiver, "backoff")
    assert took < 8  # not the 20 s the stop waits for its steps
    assert len(receiver.hits) == 1  # no try while stopping
    assert "stopping: 1 wait(s) between two tries of a backend's trigger" in first.log.read_text()

    restart_and_finish(tmp_path, first, receiver, "backoff")
    assert [h.body["idempotency_key"] for h in receiver.hits] == ["backoff:1", "backoff:1"]
    assert receiver.hits[1].at - receiver.hits[0].at >= 5.9  # as the target asked
    _, events = restarted(
        tmp_path, first, "backoff", "succeeded"
    )  # tries go on from the first run's
    tries = [(e["type"], e["data"]["try"]) for e in events if "try" in e["data"]]
    assert tries == [("trigger_failed", 1), ("triggered", 2)], tries


def test_a_stop_does_not_give_a_trigger_more_tries(tmp_path, receiver):
    """A trigger's tries were counted afresh by each run of the body, so a
    host stopped during each wait made `TETHER_TRIGGER_ATTEMPTS` more tries
    at every start, without end (a QA pass). Now the run that takes the job
    over goes on from the last try its history holds: two in all here."""
    receiver.respond = lambda hit: (503, {"busy": True}, {"retry-after": "2"})
    env = {"TETHER_TRIGGER_ATTEMPTS": "2"}
    first, _ = stopped_in_backoff(tmp_path, receiver, "bounded", **env)
    job, events = restarted(tmp_path, first, "bounded", "failed", **env)
    assert len(receiver.hits) == 2, job
    failed = [e["data"] for e in events if e["type"] == "trigger_failed"]
    assert [(f["try"], f["retry_in"]) for f in failed] == [(1, 2.0), (2, None)], failed


def test_tries_are_counted_whatever_events_came_between(tmp_path, receiver):
    """The tries made were read from the job's last events, which other
    events between two tries pushed them out of (refused callbacks, filed
    once a minute a kind but by each worker and after each restart;
    heartbeats; callbacks of an earlier attempt): the restart tried from the
    first again, at once (a QA pass). Such events are written here into the
    stopped service's store, as many restarts would have filed them."""
    receiver.respond = lambda hit: (503, {}, {"retry-after": "2"})
    env = {"TETHER_TRIGGER_ATTEMPTS": "2"}
    first, _ = stopped_in_backoff(tmp_path, receiver, "noisy", **env)
    with closing(sqlite3.connect(tmp_path / "tether.db")) as db, db:
        [(seq, at)] = db.execute(
            "SELECT MAX(seq), MAX(at) FROM tether_events WHERE job_id = ?", ("noisy",)
        )
        for n in range(1, 21):
            row = ("noisy", seq + n, at + n, "heartbeat", 1, '{"progress": 0.5}')
            db.execute("INSERT INTO tether_events VALUES (?, ?, ?, ?, ?, ?)", row)
        db.execute("UPDATE tether_jobs SET events = ? WHERE id = ?", (seq + 20, "noisy"))
    _, events = restarted(tmp_path, first, "noisy", "failed", **env)
    failed = [e["data"]["try"] for e in events if e["type"] == "trigger_failed"]
    assert failed == [1, 2] and len(receiver.hits) == 2, (failed, [e["type"] for e in events])


class SlowSoon(TetherProcess):
    """`tether serve` whose trigger calls are slow after half a second."""

    preamble = "from core import steps\n\nsteps.TRIGGER_SLOW = 0.5\n"


def test_a_try_under_way_as_its_host_died_counts(tmp_path, receiver):
    """A try that outlived `TRIGGER_SLOW` files `trigger_slow` after the
    failures before it; its host SIGKILLed during it, the next run read
    only the job's last event, and counted its tries from the first again
    (a QA pass): a target that holds every try was tried without end."""
    held = threading.Event()

    def respond(hit: Hit) -> tuple[Any, ...]:
        if len(receiver.hits) == 2:  # the second try: held until its host dies
            held.wait(30)
        return 503, {}, {"retry-after": "1"}

    receiver.respond = respond
    env = {"TETHER_STORE": f"sqlite:///{tmp_path}/tether.db", "TETHER_TASK_TTL": "2"}
    env["TETHER_TRIGGER_ATTEMPTS"] = "3"
    first = SlowSoon(tmp_path, env).start()
    try:
        with first.client() as client:
            start_job(client, receiver, "slow")
            wait_until(lambda: '"trigger_slow"' in client.get("/jobs/slow/events").text)
        first.kill()
    finally:
        held.set()
    second = SlowSoon(tmp_path, env, port=first.port).start()
    try:
        with second.client() as client:
            wait_for(client, "slow", "failed")
            events = client.get("/jobs/slow/events").json()["items"]
    finally:
        second.kill()
    tries = [(e["type"], e["data"]["try"]) for e in events if "try" in e["data"]]
    assert tries == [("trigger_failed", 1), ("trigger_slow", 2), ("trigger_failed", 3)], tries
    assert len(receiver.hits) == 3


def test_ctrl_c_stops_the_service_with_status_130(tmp_path, receiver):
    """A single-worker `tether serve` stopped by Ctrl-C (SIGINT) stopped as
    SIGTERM stops it, then said "Aborted!" and exited 1, the status of a
    failure (a QA pass). Now 130, as a shell reports a command SIGINT ended;
    the job waits on, and the restart finishes it."""
    first = service(tmp_path).start()
    with first.client() as client:
        start_job(client, receiver, "interrupted")
        wait_for(client, "interrupted", "running")
    assert first.terminate(wait=30, how=signal.SIGINT) == 130
    log = first.log.read_text()
    assert "Aborted" not in log and "Traceback" not in log, log
    restart_and_finish(tmp_path, first, receiver, "interrupted")
    assert len(receiver.hits) == 1


def test_a_second_sigterm_does_not_wait_for_a_hung_trigger(tmp_path, receiver):
    """The stop waits up to 20 s for the steps still running, here a trigger
    its target holds; a second SIGTERM (or Ctrl-C) waited as long (a QA
    pass). Now it stops at once, as a SIGKILL would there: the restart
    sends the trigger again with the same key once the lease runs out."""
    release = threading.Event()

    def respond(hit: Hit) -> tuple[Any, ...]:
        if len(receiver.hits) == 1:
            release.wait(40)
            return 503, {}
        return 202, {}

    receiver.respond = respond
    first = service(tmp_path).start()
    try:
        with first.client() as client:
            params = {"url": receiver.url(), "timeout": 60}  # the stop's 20 s bound it
            start_job(client, receiver, "hung", params=params)
            wait_until(lambda: receiver.hits, every=0.02)
        assert first.proc is not None
        started = time.monotonic()
        first.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "Shutting down" in first.log.read_text(), every=0.05)
        time.sleep(0.5)  # the stop waits for the trigger
        assert first.terminate(wait=30) == -signal.SIGTERM
        assert time.monotonic() - started < 8  # not the 20 s the stop waits for its steps
    finally:
        release.set()
    assert "steps still running at a second signal" in first.log.read_text()
    restart_and_finish(tmp_path, first, receiver, "hung")
    assert [h.body["idempotency_key"] for h in receiver.hits] == ["hung:1", "hung:1"]


def test_two_quick_ctrl_cs_during_backoffs_end_the_service(tmp_path, receiver):
    """A second Ctrl-C 50 ms after the first cuts the stop itself short; the
    workflows whose waits the first cut swallowed the loop's own cancel at
    its end, and `tether serve` hung for good (a QA pass, 11 runs of 14)."""
    busy = threading.Event()
    busy.set()
    receiver.respond = lambda hit: (503, {}, {"retry-after": "3"}) if busy.is_set() else (202, {})
    first = service(tmp_path).start()
    with first.client() as client:
        for job_id in ("cc1", "cc2", "cc3"):
            start_job(client, receiver, job_id)
        for job_id in ("cc1", "cc2", "cc3"):
            wait_until(lambda j=job_id: '"trigger_failed"' in client.get(f"/jobs/{j}/events").text)
    assert first.proc is not None
    try:
        first.proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
        assert first.terminate(wait=15, how=signal.SIGINT) == 130
    finally:
        first.kill()  # (one that hung)
    busy.clear()
    restart_and_finish(tmp_path, first, receiver, "cc1")


def test_a_stop_hands_a_cut_workflow_back_to_be_taken_over_at_once(tmp_path, receiver):
    """A workflow whose wait a stop cut short was held until its task's lease
    ran out (`TETHER_TASK_TTL`, a minute here): the restart tried again only
    then, and a retry of such a job, canceled after the restart, waited 10 s
    and was refused 409 "still winding up" until then (a QA pass). Now the
    stop hands the task back: the restart takes both over at once, the
    first tries again as its target asked, the second's retry starts its
    next attempt. Nothing of the hand-back is logged as an error."""

    def respond(hit: Hit) -> tuple[Any, ...]:
        key = hit.body["idempotency_key"]
        if key == "later:1" and len(receiver.on("/hook")) == 1:
            return 503, {"busy": True}, {"retry-after": "3"}
        if key == "held:1":
            return 503, {"busy": True}, {"retry-after": "60"}
        return 202, {}

    receiver.respond = respond
    env = {"TETHER_TASK_TTL": "60"}
    first = service(tmp_path, **env).start()
    with first.client() as client:
        start_job(client, receiver, "later")
        wait_until(lambda: '"trigger_failed"' in client.get("/jobs/later/events").text)
        start_job(client, receiver, "held")
        wait_until(lambda: '"trigger_failed"' in client.get("/jobs/held/events").text)
    started = time.monotonic()
    assert first.terminate(wait=30) == -signal.SIGTERM
    assert time.monotonic() - started < 8
    assert len(receiver.hits) == 2  # no try while stopping
    log = first.log.read_text()
    assert "stopping: 2 wait(s) between two tries" in log, log
    assert "Traceback" not in log and "ERROR" not in log, log

    second = service(tmp_path, port=first.port, **env).start()
    try:
        with second.client() as client:
            wait_until(lambda: len(receiver.hits) == 3, timeout=20)  # not the lease's minute
            later = [h for h in receiver.hits if h.body["job_id"] == "later"]
            assert [h.body["idempotency_key"] for h in later] == ["later:1", "later:1"]
            assert later[1].at - later[0].at >= 2.9  # as the target asked
            wait_for(client, "later", "running")
            wait_until(lambda: "cut short by a stop" in second.log.read_text(), timeout=20)
            assert client.post("/jobs/held/cancel", json={}).status_code == 200
            asked = time.monotonic()
            retried = client.post("/jobs/held/retry", json={"attempt": 2}, timeout=30)
            assert retried.status_code in (200, 201), retried.text
            assert retried.json()["attempt"] == 2
            assert time.monotonic() - asked < 10  # its workflow ended within the retry's wait
            wait_until(lambda: receiver.on("/hook")[-1].body["idempotency_key"] == "held~2:1")
    finally:
        second.kill()
    held = [h.body["idempotency_key"] for h in receiver.hits if h.body["job_id"] == "held"]
    assert held == ["held:1", "held~2:1"], held


def test_sigterm_does_not_wait_out_a_cancels_backoff(tmp_path, receiver):
    """The same for a canceled job's stop of its run: a `cancel_url`
    answering 500 is tried again after 5 s, then 10 s; the stop waited them
    out, up to its 20 s, asking the target twice more while stopping (a QA
    pass). Now it stops at once, and the restart asks again until it is done."""
    refusing = threading.Event()
    refusing.set()

    def respond(hit: Hit) -> tuple[Any, ...]:
        if hit.path == "/cancel" and refusing.is_set():
            return 500, {}
        return 202, {}

    receiver.respond = respond
    env = {"TETHER_TRIGGER_BACKOFF": "5"}
    first = service(tmp_path, **env).start()
    params = {"url": receiver.url(), "cancel_url": receiver.url("/cancel")}
    with first.client() as client:
        start_job(client, receiver, "stopping", params=params)
        wait_for(client, "stopping", "running")
        assert client.post("/jobs/stopping/cancel", json={}).status_code == 200
        wait_until(lambda: receiver.on("/cancel"), every=0.02)
    started = time.monotonic()
    assert first.terminate(wait=30) == -signal.SIGTERM
    assert time.monotonic() - started < 4  # not the 5 s wait, nor the 20 s for the steps
    assert len(receiver.on("/cancel")) == 1  # no try while stopping

    refusing.clear()
    second = service(tmp_path, port=first.port, **env).start()
    try:
        with second.client() as client:
            wait_until(lambda: len(receiver.on("/cancel")) == 2, timeout=30)
            wait_until(lambda: client.get("/jobs/stopping").json().get("winding_up") is None)
            job = client.get("/jobs/stopping").json()
            assert job["state"] == "canceled", job
            events = [e["type"] for e in client.get("/jobs/stopping/events").json()["items"]]
            assert "cancel_failed" not in events and events.count("finished") == 1, events
    finally:
        second.kill()
    assert len(receiver.on("/hook")) == 1 and len(receiver.on("/cancel")) == 2


def stopped_in_backoff(
    tmp_path: Path, receiver: Receiver, job_id: str, **env: str
) -> tuple[TetherProcess, float]:
    """A service that took the job and was stopped by SIGTERM once its
    first try failed (the target answering so), and how long the stop took."""
    first = service(tmp_path, **env).start()
    with first.client() as client:
        start_job(client, receiver, job_id)
        wait_until(lambda: '"trigger_failed"' in client.get(f"/jobs/{job_id}/events").text)
    started = time.monotonic()
    assert first.terminate(wait=30) == -signal.SIGTERM
    return first, time.monotonic() - started


def restarted(
    tmp_path: Path, dead: TetherProcess, job_id: str, state: str, **env: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Restart on the same store and port until the job is in `state`: the
    job then, and its history."""
    second = service(tmp_path, port=dead.port, **env).start()
    try:
        with second.client() as client:
            job = wait_for(client, job_id, state)
            return job, client.get(f"/jobs/{job_id}/events").json()["items"]
    finally:
        second.kill()


def restart_and_finish(
    tmp_path: Path, dead: TetherProcess, receiver: Receiver, job_id: str, **env: str
) -> None:
    """Restart on the same store and port; the job, still running, finishes by callback."""
    second = service(tmp_path, port=dead.port, **env).start()
    try:
        with second.client() as client:
            wait_for(client, job_id, "running")
            callback(receiver, job_id, {"status": "succeeded"})
            wait_for(client, job_id, "succeeded")
    finally:
        second.kill()


def _quietly(fn: Any, *args: Any) -> None:
    with contextlib.suppress(httpx.HTTPError):
        fn(*args)
