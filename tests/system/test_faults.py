"""Many jobs through the real service while it is killed with SIGKILL and
restarted: once while a trigger is in flight (on purpose), and at random
moments. Every job ends exactly once, with the right outcome, and each job's
external trigger is sent once, or again with the same key only by a later
service process (one started after the process that sent it before was
killed)."""

from __future__ import annotations

import contextlib
import random
import re
import threading
import time
from collections import defaultdict
from typing import Any

import httpx

from tests.conftest import Hit, wait_until
from tests.process import TetherProcess, report

JOBS = 200
KILLS = 4
"""The first lands inside the trigger step of a job (its trigger held until the
service is dead); the others at random moments."""

SENDER = re.compile(r"/g(\d+)(?=/callbacks/)")
"""Each service process's public URL ends in `/g<n>`, n the kills before it
started: a trigger's callback URL names the process that sent it. (The time a
trigger arrived cannot tell: one sent just before a kill may be read by the
receiver just after it.) The external system calls back without it, as a proxy
in front of the service would strip it."""


class ExternalSystem:
    """Answers triggers at once and reports each job's outcome later, retrying
    the callback until the service takes it, as a real system would. Jobs whose
    number is divisible by 5 fail. The first trigger of job `held` is answered
    only once `release` is set (the test kills the service before)."""

    def __init__(self, held: str) -> None:
        self.triggers: dict[str, list[tuple[str, int]]] = defaultdict(list)
        """job -> (idempotency key, the process that sent it) of each trigger"""
        self.pending: dict[str, str] = {}  # job -> callback URL not yet taken
        self.answers: dict[str, list[str]] = defaultdict(list)  # job -> callback outcomes
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.held = held
        self.reached = threading.Event()
        self.release = threading.Event()

    def respond(self, hit: Hit) -> tuple[int, Any]:
        body = hit.body
        with self.lock:
            sender = SENDER.search(body["callback_url"])  # None: checked at the end
            self.triggers[body["job_id"]].append(
                (body["idempotency_key"], int(sender[1]) if sender else -1)
            )
            hold = body["job_id"] == self.held and not self.reached.is_set()
            if not hold:  # no callback for a trigger the service never hears answered
                url = SENDER.sub("", body["callback_url"], count=1)
                self.pending.setdefault(body["job_id"], url)
        if hold:
            self.reached.set()
            self.release.wait(30)
        return 202, {}

    def call_back(self) -> None:
        with httpx.Client(trust_env=False, timeout=5) as client:
            while not self.stop.is_set():
                with self.lock:
                    batch = list(self.pending.items())[:20]
                for job_id, url in batch:
                    n = int(job_id.split("-")[1])
                    body = (
                        {"status": "failed", "error": {"message": f"bad {n}"}}
                        if n % 5 == 0
                        else {"status": "succeeded", "result": {"n": n}}
                    )
                    try:
                        answer = client.post(url, json=body)
                    except httpx.HTTPError:
                        continue  # the service is down: try again later
                    if answer.status_code < 500:
                        with self.lock:
                            outcome = answer.json().get("outcome", str(answer.status_code))
                            self.answers[job_id].append(outcome)
                            self.pending.pop(job_id, None)
                time.sleep(0.05)


def test_jobs_survive_random_kills_each_triggered_and_finished_once(tmp_path, receiver, capsys):
    rng = random.Random(7)
    ids = [f"job-{n}" for n in range(JOBS)]
    kill_at = sorted(rng.sample(range(10, JOBS), KILLS))
    held = ids[kill_at.pop(0)]
    system = ExternalSystem(held)
    receiver.respond = system.respond
    env = {"TETHER_STORE": f"sqlite:///{tmp_path}/faults.db", "TETHER_TASK_TTL": "2"}
    killed = 0  # also the number of the process serving now (SENDER)

    def serve(port: int | None = None) -> TetherProcess:
        process = TetherProcess(tmp_path, env, port=port)
        process.env["TETHER_PUBLIC_URL"] = f"{process.url}/g{killed}"
        return process.start()

    service = serve()
    caller = threading.Thread(target=system.call_back, daemon=True)
    caller.start()

    def restart() -> TetherProcess:
        nonlocal killed
        service.kill()
        killed += 1
        return serve(port=service.port)

    final: dict[str, dict[str, Any]] = {}
    changed: list[str] = []
    try:
        with httpx.Client(base_url=service.url, trust_env=False, timeout=5) as client:
            for i, job_id in enumerate(ids):
                if kill_at and i == kill_at[0]:
                    kill_at.pop(0)
                    time.sleep(rng.uniform(0, 0.3))
                    service = restart()
                body = {"id": job_id, "backend": "http_webhook", "params": {"url": receiver.url()}}
                while True:  # a client retries a start that got no answer: it reattaches
                    try:
                        answer = client.post("/jobs", json=body)
                        assert answer.status_code in (200, 201), answer.text
                        break
                    except httpx.HTTPError:
                        time.sleep(0.1)
                if job_id == held:
                    assert system.reached.wait(30), "the held trigger never came"
                    service = restart()  # inside its trigger step
                    system.release.set()

            def all_final() -> bool:
                for job_id in ids:
                    if job_id not in final:
                        job = client.get(f"/jobs/{job_id}").json()
                        if job["state"] in ("succeeded", "failed"):
                            final[job_id] = job
                return len(final) == JOBS

            with contextlib.suppress(AssertionError):  # stuck jobs are named below
                wait_until(all_final, timeout=90, every=0.2)

            def unchanged() -> bool:
                changed[:] = [j for j in final if client.get(f"/jobs/{j}").json() != final[j]]
                return not changed

            # anything that would change a finished job has had time to, and did not
            with contextlib.suppress(AssertionError):
                wait_until(unchanged, timeout=0, holds=1.0)
    finally:
        system.stop.set()
        service.kill()

    stuck = sorted(set(ids) - set(final))
    wrong = sorted(
        j
        for j, job in final.items()
        if job["state"] != ("failed" if int(j.split("-")[1]) % 5 == 0 else "succeeded")
    )
    repeated = {j: len(seen) for j, seen in system.triggers.items() if len(seen) > 1}
    report(
        capsys,
        f"jobs={JOBS} kills={killed} finished={len(final)} stuck={len(stuck)}"
        f" repeated_triggers={repeated} (same key each time)",
    )
    assert not stuck, f"stuck jobs: {stuck[:10]}"
    assert not wrong, wrong
    assert not changed, changed
    assert killed == KILLS
    assert sorted(system.triggers) == sorted(ids)  # every job was triggered
    for job_id, seen in system.triggers.items():
        keys = [key for key, _ in seen]
        assert keys == [f"{job_id}:1"] * len(keys), (job_id, keys)  # one key per job
        senders = [sender for _, sender in seen]  # again only by a process after a kill
        assert -1 not in senders, (job_id, "a callback URL without the sender's /g<n>")
        assert len(set(senders)) == len(senders), (job_id, "sent twice by one process", senders)
        assert system.answers[job_id].count("accepted") <= 1, (job_id, system.answers[job_id])
        assert set(system.answers[job_id]) <= {"accepted", "duplicate"}, system.answers[job_id]
    assert len(system.triggers[held]) == 2  # the kill inside its trigger step: sent again
