"""Retention: finished jobs older than the cut-off go, with their promises;
nothing waiting is touched."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from resonate.types import Value

from core.errors import InvalidRequest
from core.models import Outcome
from core.store.jobs import now_ms
from core.watchdog import collect_garbage
from core.workflow import ROOT_GRACE_MS
from tests.conftest import eventually, wait_until
from tests.core.parts import logs_of, open_parts
from tests.process import TetherProcess

TETHER = shutil.which("tether", path=str(Path(sys.executable).parent)) or "tether"


async def a_week_later(tether: Any, where: str = "") -> int:
    """Pretend a week has passed for the finished jobs (the clock of the index
    and of the embedded store), and collect the garbage: the jobs deleted."""
    week = 7 * 86_400_000
    await tether.jobs.db.execute(
        f"UPDATE tether_jobs SET finished_at = finished_at - ? {where}", (week,)
    )
    engine = tether.store.connection._engine
    engine.clock = lambda: now_ms() + week
    try:
        jobs, promises = await tether.collect_garbage(86_400)
    finally:
        engine.clock = now_ms
    assert promises >= 2 * jobs  # each one's root and callback promises (workflow version 4)
    return int(jobs)


async def workflow_over(svc: Any) -> bool:
    return bool((await svc.tether.resonate.promises.get("old")).state == "resolved")


async def old_and_waiting(start_service: Any, receiver: Any, store: str) -> Any:
    """A service on `store` with job `old` succeeded (its workflow over too)
    and job `waiting` running."""
    receiver.callback = lambda hit: {"status": "succeeded"} if hit.path == "/done" else None
    svc = await start_service(store=store)
    for job_id, path in (("old", "/done"), ("waiting", "/wait")):
        await svc.client.post(
            "/jobs",
            json={"id": job_id, "backend": "http_webhook", "params": {"url": receiver.url(path)}},
        )
    await svc.wait_state("old", "succeeded")
    await svc.wait_state("waiting", "running")
    await eventually(lambda: len(receiver.hits) == 2)

    await eventually(lambda: workflow_over(svc))
    return svc


async def test_old_finished_jobs_go_and_waiting_ones_stay(start_service, receiver, tmp_path):
    svc = await old_and_waiting(start_service, receiver, f"sqlite:///{tmp_path}/gc.db")
    tether = svc.tether
    with pytest.raises(InvalidRequest, match="at least"):
        await tether.collect_garbage(60)
    assert await tether.collect_garbage(86_400) == (0, 0)  # nothing is a day old yet

    assert await a_week_later(tether) == 1
    assert (await svc.client.get("/jobs/old")).status_code == 404
    assert (await svc.job("waiting"))["state"] == "running"
    callback = receiver.on("/wait")[0].body["callback_url"]
    answer = await svc.client.post(
        callback.removeprefix(svc.settings.base_url), json={"status": "succeeded"}
    )
    assert answer.json()["outcome"] == "accepted"
    # the id is free again: a new job under it runs anew, with keys of its own
    await a_new_job_under_an_old_id_has_its_own_keys(
        svc, receiver, lambda: a_week_later(tether, where="WHERE id = 'old'")
    )


async def test_a_repeated_start_of_a_job_whose_promises_went_makes_no_workflow(
    start_service, receiver, tmp_path
):
    """Retention deletes a finished job's promises an hour before its row. A
    repeated `POST /jobs` meanwhile reattaches (200) and starts nothing: a
    start would have made the old workflow again, leaving its promises beside
    no row once the row went (a new job under the id then never ran)."""
    svc = await old_and_waiting(start_service, receiver, f"sqlite:///{tmp_path}/gc.db")
    engine = svc.tether.store.connection._engine
    engine.clock = lambda: now_ms() + 86_400_000 + 60_000  # the promises a day old; the row not
    try:
        assert await svc.tether.store.delete_promises(86_400_000) >= 2
    finally:
        engine.clock = now_ms
    body = {"id": "old", "backend": "http_webhook", "params": {"url": receiver.url("/done")}}
    again = await svc.client.post("/jobs", json=body)
    assert (again.status_code, again.json()["state"]) == (200, "succeeded")
    rows = await svc.tether.jobs.db.fetch(
        "SELECT id, state FROM r_promises WHERE id = 'old' OR id LIKE 'old:%'", ()
    )
    assert rows == []  # no workflow made again
    assert len(receiver.on("/done")) == 1


async def a_new_job_under_an_old_id_has_its_own_keys(
    svc: Any, receiver: Any, delete_again: Callable[[], Awaitable[int]]
) -> None:
    """Job `old` was deleted: a new one under its id gets another idempotency
    key and callback URL (an external system that remembers the old key would
    take the new trigger for the old one), and the old job's URL settles
    nothing of it; so does a third one, again other than both."""
    first = receiver.on("/done")[0].body
    seen = [first]
    for n in (2, 3):
        response = await svc.client.post(
            "/jobs",
            json={"id": "old", "backend": "http_webhook", "params": {"url": receiver.url("/hold")}},
        )
        assert response.status_code == 201
        await svc.wait_state("old", "running")
        trigger = receiver.on("/hold")[-1].body
        assert trigger["idempotency_key"].startswith("old:1.")
        assert trigger["idempotency_key"] not in [b["idempotency_key"] for b in seen]
        assert trigger["callback_url"] not in [b["callback_url"] for b in seen]
        for earlier in seen:
            stale = await svc.client.post(
                earlier["callback_url"].removeprefix(svc.settings.base_url),
                json={"status": "succeeded", "result": "the old run's"},
            )
            assert stale.status_code == 401, stale.text
        answer = await svc.client.post(
            trigger["callback_url"].removeprefix(svc.settings.base_url),
            json={"status": "succeeded"},
        )
        assert answer.json()["outcome"] == "accepted"
        assert (await svc.job("old"))["result"] is None
        seen.append(trigger)
        if n == 2:  # deleted again, for the third
            await eventually(lambda: workflow_over(svc))
            assert await delete_again() == 1


async def test_retention_on_postgres_uses_resonate_gc(start_service, receiver, fresh_pg_url):
    svc = await old_and_waiting(start_service, receiver, fresh_pg_url)
    tether = svc.tether
    assert await tether.collect_garbage(86_400) == (0, 0)
    week = 7 * 86_400_000  # a week passes: for the index and for resonate-pg's promises
    await tether.jobs.db.execute("UPDATE tether_jobs SET finished_at = finished_at - ?", (week,))
    await tether.jobs.db.execute(
        "UPDATE resonate.promises SET settled_at = settled_at - ? WHERE settled_at IS NOT NULL",
        (week,),
    )
    jobs, promises = await tether.collect_garbage(86_400)
    assert jobs == 1 and promises >= 2
    assert (await svc.client.get("/jobs/old")).status_code == 404
    callback = receiver.on("/wait")[0].body["callback_url"]
    answer = await svc.client.post(
        callback.removeprefix(svc.settings.base_url), json={"status": "succeeded"}
    )
    assert answer.json()["outcome"] == "accepted"  # the waiting job's promises stayed
    await svc.wait_state("waiting", "succeeded")

    async def delete_again() -> int:
        await tether.jobs.db.execute(
            "UPDATE tether_jobs SET finished_at = finished_at - ? WHERE id = 'old'", (week,)
        )
        await tether.jobs.db.execute(
            "UPDATE resonate.promises SET settled_at = settled_at - ?"
            " WHERE settled_at IS NOT NULL AND id LIKE ?",
            (week, "old%"),
        )
        return int((await tether.collect_garbage(86_400))[0])

    await a_new_job_under_an_old_id_has_its_own_keys(svc, receiver, delete_again)


LATER = """\
import time

_time, _time_ns = time.time, time.time_ns
time.time = lambda: _time() + 8 * 86400
time.time_ns = lambda: _time_ns() + 8 * 86400 * 10**9
"""
"""A `sitecustomize` that sets a process's clock 8 days ahead."""


def test_tether_gc_command(tmp_path, receiver):
    receiver.callback = lambda hit: {"status": "succeeded"} if hit.path == "/done" else None
    store = f"sqlite:///{tmp_path}/cli.db"
    service = TetherProcess(tmp_path, {"TETHER_STORE": store}).start()
    try:
        with service.client() as client:
            for job_id, path in (("old", "/done"), ("waiting", "/wait")):
                body = {"backend": "http_webhook", "params": {"url": receiver.url(path)}}
                client.post("/jobs", json={"id": job_id, "timeout": 30 * 86400, **body})
            wait_until(lambda: "job old finished: succeeded" in service.log.read_text())
            assert client.get("/jobs/waiting").json()["state"] == "running"
    finally:
        service.terminate()

    def gc(days: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [TETHER, "gc", "--older-than", days],
            env={"TETHER_STORE": store, "PATH": "/usr/bin:/bin", **env},
            capture_output=True,
            text=True,
            timeout=60,
        )

    done = gc("1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "deleted 0 finished jobs and 0 promises"  # nothing a day old
    done = gc("0.1")
    assert done.returncode == 2 and "at least" in done.stderr
    for days in ("inf", "1e13"):  # a time in milliseconds the store cannot hold
        done = gc(days)
        assert (done.returncode, done.stderr) == (
            2,
            "tether: --older-than is at most 36500 days (a hundred years)\n",
        ), days

    later = tmp_path / "later"
    later.mkdir()
    (later / "sitecustomize.py").write_text(LATER)
    done = gc("7", PYTHONPATH=str(later))
    assert done.returncode == 0, done.stderr
    jobs, promises = map(int, re.findall(r"\d+", done.stdout))
    # the job; its workflow's root and callback promises (version 4: no trigger step)
    assert (jobs, promises) == (1, 2), done.stdout
    again = gc("7", PYTHONPATH=str(later))
    assert again.stdout.strip() == "deleted 0 finished jobs and 0 promises"

    service = TetherProcess(tmp_path, {"TETHER_STORE": store}, port=service.port).start()
    try:
        with service.client() as client:
            assert client.get("/jobs/old").status_code == 404
            assert client.get("/jobs/waiting").json()["state"] == "running"
            callback = receiver.on("/wait")[0].body["callback_url"]
            answer = client.post(callback.removeprefix(service.url), json={"status": "succeeded"})
            assert answer.json()["outcome"] == "accepted"
    finally:
        service.kill()


@pytest.mark.parametrize("where", ["missing/tether.db", "typo.db"])
def test_tether_gc_refuses_a_store_no_service_made_and_makes_none(tmp_path, where):
    """A typo in TETHER_STORE, or a relative path run from the wrong
    directory: opening it would make an empty store, and its secret files
    (whose notification secret no service signs with), and say 0 deleted."""
    (tmp_path / "missing").mkdir()
    store = f"sqlite:///{tmp_path / where}"
    index = f"sqlite:///{tmp_path / 'missing' / 'index.db'}"
    for env, flag in (
        ({"TETHER_STORE": store}, []),
        ({"TETHER_STORE": "memory://"}, []),
        # a Resonate server: refused before the index is made or the server paired
        ({"TETHER_STORE": "http://127.0.0.1:9", "TETHER_INDEX": index}, []),
        ({}, ["--store", store]),  # as the other store commands take it (an exploratory QA pass)
    ):
        done = subprocess.run(
            [TETHER, "gc", "--older-than", "7", *flag],
            env={"PATH": "/usr/bin:/bin", **env},
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
        assert done.returncode == 2 and done.stdout == "", done
        if env.get("TETHER_STORE", store) == store:
            assert done.stderr == (
                f"tether: no embedded store at {tmp_path / where}: set TETHER_STORE to the store"
                " the services use (a service makes it when it first starts)\n"
            )
        elif env["TETHER_STORE"].startswith("http"):
            assert done.stderr.startswith(
                "tether: the Resonate server store does not support retention"
            ), done.stderr
        else:
            assert done.stderr.startswith("tether: memory:// keeps nothing"), done.stderr
    made = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert made == [Path("missing")], made  # no store, no secret file, no .tether


# ── an outage past a waiting job's deadline ──────────────────────────────────

OUTAGE_DAYS = 2
"""How long no process ran, from before the waiting jobs' deadlines: past their
workflows' own timeouts (`ROOT_GRACE_MS`) and past a day's retention."""


async def waiting_jobs(svc: Any, receiver: Any, *job_ids: str) -> None:
    """Jobs that wait for a callback that never comes (600 s), each stopped at `/stop`."""
    for job_id in job_ids:
        params = {"url": receiver.url("/wait"), "cancel_url": receiver.url("/stop")}
        body = {"id": job_id, "backend": "http_webhook", "params": params, "timeout": 600}
        assert (await svc.client.post("/jobs", json=body)).status_code == 201
    for job_id in job_ids:
        await svc.wait_state(job_id, "running")


async def an_outage(svc: Any, job_ids: tuple[str, ...], postgres: bool) -> None:
    """As if no process had run from before the jobs' deadlines until
    `OUTAGE_DAYS` later: their rows and their promises moved that far back
    (the callback promise's and the workflow's own timeout with them), then
    the store's timers fired, as the first process to open it fires them."""
    shift = OUTAGE_DAYS * 86_400_000
    db = svc.tether.jobs.db
    for job_id in job_ids:
        await db.execute(
            "UPDATE tether_jobs SET deadline = deadline - ?, created_at = created_at - ?,"
            " updated_at = updated_at - ? WHERE id = ?",
            (shift, shift, shift, job_id),
        )
        await db.execute(
            f"UPDATE {'resonate.promises' if postgres else 'r_promises'}"
            " SET timeout_at = timeout_at - ?, created_at = created_at - ?"
            " WHERE id = ? OR id LIKE ?",
            (shift, shift, job_id, f"{job_id}:%"),
        )
    if postgres:
        await db.fetch("SELECT resonate.process_timeouts(?)", (now_ms(),))
    else:
        await svc.tether.store.connection._fire_timers()
    for job_id in job_ids:
        root = await svc.tether.resonate.promises.get(job_id)
        assert root.state == "rejected_timedout"  # the store timed the workflow out


async def test_retention_after_an_outage_keeps_what_waiting_jobs_need(
    start_service, receiver, store_url
):
    """No process ran from before two jobs' deadlines until two days after
    (an outage; a backup restored two days late): the store timed their
    workflows out, a day past retention. Retention must not delete their
    promises while the index holds them open, or neither the watchdog nor a
    cancel can end them (`StoreUnavailable` for good). It keeps them: the
    watchdog times one out and stops its run, a cancel of the other is
    answered (the deadline came first)."""
    store = store_url()  # the embedded store, and Postgres with TETHER_TEST_PG_DSN
    postgres = store.startswith("postgresql")
    svc = await start_service(store=store, watchdog_interval=0)  # the test looks itself
    await waiting_jobs(svc, receiver, "late", "caught")
    await an_outage(svc, ("late", "caught"), postgres)

    assert await svc.tether.collect_garbage(86_400) == (0, 0)
    for job_id in ("late", "caught"):
        assert (await svc.tether.resonate.promises.get(f"{job_id}:1")).state != "pending"

    with logs_of("tether") as logs:
        answer = await svc.client.post("/jobs/caught/cancel", json={})
        assert answer.status_code == 409, answer.text  # answered: the deadline came first
        assert (await svc.job("caught"))["state"] == "timed_out"
        await svc.tether.watchdog.sweep(now_ms())
        late = await svc.wait_state("late", "timed_out")
    assert late["error"]["type"] == "timeout", late
    # each stop is sent by its job's winding up, after its state is written
    # (a loaded CI run looked before caught's had come)
    await eventually(lambda: len(receiver.on("/stop")) >= 2)
    stops = sorted((h.body["job_id"], h.body["reason"]) for h in receiver.on("/stop"))
    assert stops == [("caught", "timed_out"), ("late", "timed_out")]  # their runs stopped
    assert not [line for line in logs.lines if "StoreUnavailable" in line], logs.lines


def clock_ahead(tmp_path: Path, days: float) -> str:
    """A directory whose `sitecustomize` sets a process's clock `days` ahead
    (for PYTHONPATH), as LATER does."""
    ahead = tmp_path / f"ahead-{days:g}"
    ahead.mkdir(exist_ok=True)
    (ahead / "sitecustomize.py").write_text(LATER.replace("8 * 86400", f"{days:g} * 86400"))
    return str(ahead)


def test_tether_gc_and_retention_after_an_outage_leave_a_waiting_job_to_the_watchdog(
    tmp_path, receiver
):
    """The operator's case: a store whose service is down from before a job's
    deadline (600 s) until two days later (an outage; a backup restored two
    days late). `tether gc --older-than 1`, run twice then (the first run's
    opening of the store times the job's workflow out), deletes nothing of
    it; nor does the service's own retention as it starts on that store
    (`TETHER_RETENTION`, a day): its watchdog times the job out and stops
    its run, and never says `StoreUnavailable`."""
    store = f"sqlite:///{tmp_path}/outage.db"
    service = TetherProcess(tmp_path, {"TETHER_STORE": store}).start()
    try:
        with service.client() as client:
            params = {"url": receiver.url("/wait"), "cancel_url": receiver.url("/stop")}
            body = {"id": "late", "backend": "http_webhook", "params": params, "timeout": 600}
            assert client.post("/jobs", json=body).status_code == 201
            wait_until(lambda: client.get("/jobs/late").json()["state"] == "running")
    finally:
        service.terminate()

    ahead = clock_ahead(tmp_path, OUTAGE_DAYS)
    for _ in range(2):
        done = subprocess.run(
            [TETHER, "gc", "--older-than", "1"],
            env={"TETHER_STORE": store, "PATH": "/usr/bin:/bin", "PYTHONPATH": ahead},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "deleted 0 finished jobs and 0 promises"

    later = {"TETHER_STORE": store, "TETHER_RETENTION": "86400", "PYTHONPATH": ahead}
    service = TetherProcess(tmp_path, later, port=service.port).start()
    try:
        with service.client() as client:
            wait_until(lambda: client.get("/jobs/late").json()["state"] == "timed_out")
            job = client.get("/jobs/late").json()
            assert job["error"]["type"] == "timeout", job
        wait_until(lambda: len(receiver.on("/stop")) == 1)
        assert receiver.on("/stop")[0].body["reason"] == "timed_out"
    finally:
        service.terminate()
    assert "StoreUnavailable" not in service.log.read_text()


DAY = 86_400_000


async def a_workflow(parts: Any, root: str, settled_at: int) -> None:
    """Promises as a job's workflow leaves them: its root and its callback
    promise, both settled at `settled_at`."""
    postgres = parts.store.kind == "postgresql"
    for promise_id in (root, f"{root}:1"):
        tags = {"resonate:origin": root}
        await parts.resonate.promises.create(promise_id, now_ms() + DAY, Value(data=None), tags)
        await parts.resonate.promises.resolve(promise_id, Value(data=None))
    await parts.jobs.db.execute(
        f"UPDATE {'resonate.promises' if postgres else 'r_promises'} SET settled_at = ?"
        " WHERE id = ? OR id LIKE ?",
        (settled_at, root, f"{root}:%"),
    )


async def promise_ids(parts: Any) -> set[str]:
    postgres = parts.store.kind == "postgresql"
    rows = await parts.jobs.db.fetch(
        f"SELECT id FROM {'resonate.promises' if postgres else 'r_promises'}", ()
    )
    return {r[0] for r in rows}


async def job_ids(parts: Any) -> set[str]:
    return {r[0] for r in await parts.jobs.db.fetch("SELECT id FROM tether_jobs", ())}


@pytest.mark.parametrize("kind", ["embedded", "postgres"])
async def test_retention_keeps_the_workflows_of_jobs_the_index_holds_open(request, kind):
    """`open` waits, three days past its deadline (600 s): its workflow, timed
    out by the store, settled then. `done` finished two days ago, `old` just
    over three; `gone` waits too, its workflow deleted.
    The embedded store keeps `open`'s lineages as it deletes (read in its
    transaction) and deletes the rest; Postgres's `resonate.gc` takes only a
    time, so retention goes back no further than `open`'s attempt began
    (`kept_since`, less an hour), for promises and job rows alike: `done`
    waits too. Once `open` has ended, the next run takes what was held
    back; `open`'s own row stays its day."""
    store = request.getfixturevalue("fresh_pg_url") if kind == "postgres" else "memory://"
    now = now_ms()
    async with open_parts(store=store) as parts:
        began = now - 3 * DAY
        await parts.add_job("open", created_at=began, timeout=600)
        await a_workflow(parts, "open", began + 600_000 + ROOT_GRACE_MS)
        # open as long, its workflow deleted (by an earlier release's retention): it holds nothing
        await parts.add_job("gone", created_at=now - 4 * DAY, timeout=600)
        for job_id, ago in (("done", 2 * DAY), ("old", 3 * DAY + 3 * ROOT_GRACE_MS)):
            await parts.add_job(job_id, created_at=now - ago - 60_000, timeout=600)
            await parts.jobs.finish(job_id, Outcome(status="succeeded"), now - ago)
            await a_workflow(parts, job_id, now - ago + 1_000)

        with logs_of("tether") as logs:
            assert await collect_garbage(parts.store, 86_400) == (
                (1, 2) if kind == "postgres" else (2, 4)
            )
        held = [line for line in logs.lines if "going back no further" in line]
        if kind == "postgres":  # `open` began three days ago: an hour before that
            since = time.strftime("%Y-%m-%d %H:%M", time.gmtime((began - ROOT_GRACE_MS) / 1000))
            assert len(held) == 1 and held[0].startswith(
                f"INFO retention: going back no further than {since}"
            ), logs.lines
            assert held[0].endswith(
                " UTC: a job open past its deadline has promises from then (the watchdog"
                " times it out; tether_jobs_overdue counts such jobs)"
            )
        else:
            assert held == []
        kept = {"open", "open:1"} | ({"done", "done:1"} if kind == "postgres" else set())
        assert await promise_ids(parts) == kept
        rows = {"open", "gone"} | ({"done"} if kind == "postgres" else set())
        assert await job_ids(parts) == rows

        await parts.jobs.finish("open", Outcome(status="timed_out"), now_ms())
        await collect_garbage(parts.store, 86_400)
        assert await promise_ids(parts) == set()
        assert await job_ids(parts) == {"open", "gone"}


async def test_a_running_job_whose_promises_are_gone_is_ended_by_its_settle(
    start_service, receiver, store_url
):
    """A store the retention of releases before 2026-12-05 damaged: the
    promises of jobs an outage had left waiting were deleted while the index
    held them `running`. Every settle was then a 503 for good ("did not
    create its promise in time"): the job could be neither completed,
    canceled nor timed out. A settle that finds the attempt's workflow gone
    now ends the row itself, and the run is stopped as for any orphan."""
    store = store_url()
    postgres = store.startswith("postgresql")
    svc = await start_service(store=store, watchdog_interval=0)
    await waiting_jobs(svc, receiver, "late", "lost")
    await an_outage(svc, ("late",), postgres)
    table = "resonate.promises" if postgres else "r_promises"
    for job_id in ("late", "lost"):  # what the old retention did (and Postgres' gc)
        await svc.tether.jobs.db.execute(
            f"DELETE FROM {table} WHERE id = ? OR id LIKE ?", (job_id, f"{job_id}:%")
        )

    with logs_of("tether") as logs:
        await svc.tether.watchdog.sweep(now_ms())  # past its deadline: timed out
        late = await svc.wait_state("late", "timed_out")
        callback = next(h for h in receiver.on("/wait") if h.body["job_id"] == "lost")
        answer = await svc.client.post(
            callback.body["callback_url"].removeprefix(svc.settings.base_url),
            json={"status": "succeeded", "result": {"rows": 1}},
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["outcome"] == "accepted"
        lost = await svc.wait_state("lost", "succeeded")
    assert late["error"]["type"] == "timeout" and lost["result"] == {"rows": 1}
    assert [h.body["job_id"] for h in receiver.on("/stop")] == ["late"]  # its run stopped
    assert not [line for line in logs.lines if "StoreUnavailable" in line], logs.lines
