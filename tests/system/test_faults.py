"""Many jobs through the real service while it is killed with SIGKILL at random
moments and restarted: every job ends exactly once, with the right outcome, and
every job's external trigger carries one idempotency key."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter, defaultdict
from typing import Any

import httpx

from tests.conftest import Hit
from tests.process import TetherProcess, report

JOBS = 200
KILLS = 4


class ExternalSystem:
    """Answers triggers at once and reports each job's outcome later, retrying
    the callback until the service takes it, as a real system would. Jobs whose
    number is divisible by 5 fail."""

    def __init__(self) -> None:
        self.triggers: dict[str, list[str]] = defaultdict(list)  # job -> keys seen
        self.pending: dict[str, str] = {}  # job -> callback URL not yet taken
        self.answers: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def respond(self, hit: Hit) -> tuple[int, Any]:
        body = hit.body
        with self.lock:
            self.triggers[body["job_id"]].append(body["idempotency_key"])
            self.pending.setdefault(body["job_id"], body["callback_url"])
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
                            self.answers[answer.json().get("outcome", str(answer.status_code))] += 1
                            self.pending.pop(job_id, None)
                time.sleep(0.05)


def test_jobs_survive_random_kills_each_triggered_and_finished_once(tmp_path, receiver, capsys):
    system = ExternalSystem()
    receiver.respond = system.respond
    env = {"TETHER_STORE": f"sqlite:///{tmp_path}/faults.db", "TETHER_TASK_TTL": "2"}
    service = TetherProcess(tmp_path, env).start()
    caller = threading.Thread(target=system.call_back, daemon=True)
    caller.start()
    rng = random.Random(7)
    submitted: set[str] = set()
    kills = 0
    try:
        ids = [f"job-{n}" for n in range(JOBS)]
        kill_at = sorted(rng.sample(range(10, JOBS), KILLS))
        with httpx.Client(trust_env=False, timeout=5) as client:
            for i, job_id in enumerate(ids):
                if kill_at and i == kill_at[0]:
                    kill_at.pop(0)
                    time.sleep(rng.uniform(0, 0.3))
                    service.kill()
                    kills += 1
                    service = TetherProcess(tmp_path, env, port=service.port).start()
                body = {"id": job_id, "backend": "http_webhook", "params": {"url": receiver.url()}}
                while True:  # a client retries a start that got no answer: it reattaches
                    try:
                        answer = client.post(f"{service.url}/jobs", json=body)
                        assert answer.status_code in (200, 201), answer.text
                        break
                    except httpx.HTTPError:
                        time.sleep(0.1)
                submitted.add(job_id)

            deadline = time.monotonic() + 90
            final: dict[str, dict[str, Any]] = {}
            while time.monotonic() < deadline and len(final) < JOBS:
                for job_id in ids:
                    if job_id not in final:
                        job = client.get(f"{service.url}/jobs/{job_id}").json()
                        if job["state"] in ("succeeded", "failed"):
                            final[job_id] = job
                time.sleep(0.2)
            time.sleep(1)  # anything that would change a finished job has had time to
            again = {j: client.get(f"{service.url}/jobs/{j}").json() for j in final}
    finally:
        system.stop.set()
        service.kill()

    stuck = sorted(set(ids) - set(final))
    changed = sorted(j for j in final if again[j] != final[j])
    wrong = sorted(
        j
        for j, job in final.items()
        if job["state"] != ("failed" if int(j.split("-")[1]) % 5 == 0 else "succeeded")
    )
    repeated = {j: keys for j, keys in system.triggers.items() if len(keys) > 1}
    report(
        capsys,
        f"jobs={JOBS} kills={kills} finished={len(final)} stuck={len(stuck)}"
        f" repeated_triggers={len(repeated)} (same key each time)"
        f" callback_answers={dict(system.answers)}",
    )
    assert not stuck, f"stuck jobs: {stuck[:10]}"
    assert not wrong and not changed
    assert sorted(system.triggers) == sorted(ids)  # every job was triggered
    for job_id, keys in system.triggers.items():
        assert set(keys) == {f"{job_id}:1"}, (job_id, keys)  # once per job, by key
