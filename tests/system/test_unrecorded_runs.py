"""The real `tether serve`: a trigger try that reached the receiver but whose
answer Tether never recorded (the answer came too late, was a 503, or the
service died inside the try) may have started a run. When the job then ends
canceled or timed out, that run is asked to stop (`cancel_url`), once per
job, whatever the way its answer was lost. Several jobs at once, so the
cancels land at different points of their tries. On the code before
`Backend.cancel_unrecorded` every one of these runs was left going."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import HOLD, Hit, Receiver, wait_until
from tests.process import wait_for
from tests.system.test_crash import service

JOBS = 3
TRIES = {"TETHER_TRIGGER_ATTEMPTS": "100", "TETHER_TRIGGER_BACKOFF": "0.2"}


def start(
    client: httpx.Client, receiver: Receiver, ids: list[str], tries: Any = None, **job: Any
) -> None:
    """Jobs `ids`, each try of whose trigger gets `tries` seconds (the
    webhook's `timeout`); `job`: more of the new job's fields."""
    params = {"url": receiver.url(), "cancel_url": receiver.url("/cancel")}
    if tries is not None:
        params["timeout"] = tries
    for job_id in ids:
        body = {"id": job_id, "backend": "http_webhook", "params": params, **job}
        response = client.post("/jobs", json=body)
        assert response.status_code == 201, response.text


def tried(receiver: Receiver, job_id: str) -> int:
    return sum(h.body.get("job_id") == job_id for h in receiver.on("/hook"))


def cancel(client: httpx.Client, ids: list[str]) -> None:
    for job_id in ids:
        assert client.post(f"/jobs/{job_id}/cancel").status_code == 200


def cancel_while_tried(
    tmp_path: Path, receiver: Receiver, ids: list[str], after: int, **webhook: Any
) -> None:
    """Start `ids` (`webhook`: `start`'s options), cancel them once each
    trigger was tried `after` times, and check that each run was stopped."""
    svc = service(tmp_path, **TRIES).start()
    try:
        with svc.client() as client:
            start(client, receiver, ids, **webhook)
            wait_until(lambda: all(tried(receiver, job_id) >= after for job_id in ids))
            cancel(client, ids)
            for job_id in ids:
                wait_for(client, job_id, "canceled")
            assert_each_run_stopped(client, receiver, ids)
    finally:
        svc.kill()


def assert_each_run_stopped(client: httpx.Client, receiver: Receiver, ids: list[str]) -> None:
    for job_id in ids:
        assert client.get(f"/jobs/{job_id}").json()["external"] is None  # no answer recorded
    wait_until(lambda: {h.body["job_id"] for h in receiver.on("/cancel")} == set(ids), holds=HOLD)
    stops = [h.body["promise_id"] for h in receiver.on("/cancel")]
    assert sorted(stops) == sorted(f"{job_id}:1" for job_id in ids)  # once each
    started = {h.body["idempotency_key"] for h in receiver.on("/hook")}
    assert started == {f"{job_id}:1" for job_id in ids}  # one run each, however many tries


def hold_first_tries(
    receiver: Receiver, status: int, body: Any
) -> tuple[threading.Event, set[str]]:
    """Have `receiver` hold each job's first try until the event is set (the
    service is dead by then), and answer `status`, `body` to later tries;
    the set: the jobs whose first try it holds."""
    release = threading.Event()
    held: set[str] = set()

    def respond(hit: Hit) -> tuple[int, Any]:
        if hit.path != "/hook":
            return 202, {}
        if hit.body["job_id"] not in held:
            held.add(hit.body["job_id"])
            release.wait(20)
            return 202, {}
        return status, body

    receiver.respond = respond
    return release, held


def test_answers_that_come_after_the_tries_timeout_then_a_cancel(tmp_path: Path, receiver):
    def respond(hit: Hit) -> tuple[int, Any]:
        if hit.path == "/hook":
            time.sleep(1.0)  # the run started; the answer comes after the try's 0.5 s
        return 202, {}

    receiver.respond = respond
    cancel_while_tried(tmp_path, receiver, [f"late-{n}" for n in range(JOBS)], 1, tries=0.5)


def test_a_503_on_every_try_then_a_cancel_between_tries(tmp_path: Path, receiver):
    receiver.respond = lambda hit: (503, {}) if hit.path == "/hook" else (202, {})
    cancel_while_tried(tmp_path, receiver, [f"refused-{n}" for n in range(JOBS)], 2)


@pytest.mark.parametrize("end", ["canceled", "timed_out"])
def test_the_service_killed_inside_the_first_try(tmp_path: Path, receiver, end: str):
    """The first try of each job is held until the service is dead; later
    tries are refused with 503, so no run is ever recorded."""
    release, held = hold_first_tries(receiver, 503, {})
    ids = [f"killed-{end}-{n}" for n in range(JOBS)]
    first = service(tmp_path, **TRIES).start()
    with first.client() as client:
        start(client, receiver, ids, **({"timeout": 2} if end == "timed_out" else {}))
        wait_until(lambda: held == set(ids), every=0.02)
    first.kill()
    release.set()
    time.sleep(2.2)  # past a deadline while the service is down

    second = service(tmp_path, port=first.port, **TRIES).start()
    try:
        with second.client() as client:
            if end == "canceled":
                cancel(client, ids)
            for job_id in ids:
                wait_for(client, job_id, end)
            assert_each_run_stopped(client, receiver, ids)
    finally:
        second.kill()


@pytest.mark.parametrize(
    ("status", "said"),
    [(409, "a request with this key is being processed"), (422, "this key was used already")],
)
def test_a_replay_refused_after_a_kill_inside_the_try(
    tmp_path: Path, receiver, status: int, said: str
):
    """The service dies inside the first try; the receiver refuses the
    restart's replay (the same Idempotency-Key). A 409, the IETF
    Idempotency-Key draft's answer while that request is still being
    processed, is tried again, and the job fails when the tries run out;
    any other 4xx fails it at once, a refusal of a repeat (the replayed run
    of the workflow says so). Either way the run the first try started is
    stopped. Before, the 409 and the 422 failed the job at once as a clear
    refusal, and the run was left going (an audit, 2026-12-04)."""
    release, held = hold_first_tries(receiver, status, {"error": said})
    ids = [f"replay-{status}-{n}" for n in range(JOBS)]
    few = {"TETHER_TRIGGER_ATTEMPTS": "3", "TETHER_TRIGGER_BACKOFF": "0.2"}
    first = service(tmp_path, **few).start()
    with first.client() as client:
        start(client, receiver, ids)
        wait_until(lambda: held == set(ids), every=0.02)
    first.kill()
    release.set()

    second = service(tmp_path, port=first.port, **few).start()
    try:
        with second.client() as client:
            for job_id in ids:
                job = wait_for(client, job_id, "failed")
                assert job["error"]["type"] == f"http_{status}"
            assert_each_run_stopped(client, receiver, ids)
    finally:
        second.kill()
