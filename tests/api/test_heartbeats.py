"""Heartbeats on the real service (`POST /callbacks/{promise_id}/heartbeat`)
and what a missed one does: the run's progress and liveness shown on the job,
the answers for a stranger, an unknown promise and an ended job, the bounds on
progress and on `heartbeat_timeout`, the history's throttling, and the three
answers a backend may give when a heartbeat is overdue (still running, ended,
cannot tell), with `http_webhook`'s `status_url` served by the test receiver."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

from click.testing import CliRunner

import core.callbacks
from api.cli import cli as main_group
from core.models import PROGRESS_LIMIT
from core.store.jobs import now_ms
from tests.conftest import Hit, Receiver, Service, eventually


async def start_job(
    svc: Service, receiver: Receiver, job_id: str, **request: Any
) -> tuple[dict[str, Any], str]:
    """A running `http_webhook` job on the receiver; the job and the heartbeat
    URL its trigger carried."""
    params = {"url": receiver.url(), **request.pop("params", {})}
    body = {"id": job_id, "backend": "http_webhook", "params": params, **request}
    response = await svc.client.post("/jobs", json=body)
    assert response.status_code == 201, response.text
    job = await svc.wait_state(job_id, "running")
    [hit] = [h for h in receiver.on("/hook") if h.body["job_id"] == job_id]
    return job, hit.body["heartbeat_url"]


async def events(svc: Service, job_id: str) -> list[dict[str, Any]]:
    response = await svc.client.get(f"/jobs/{job_id}/events")
    assert response.status_code == 200, response.text
    return response.json()["items"]  # type: ignore[no-any-return]


def of_type(items: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in items if e["type"] == kind]


async def test_a_heartbeat_shows_its_progress_and_time_on_the_job(start_service, receiver):
    svc = await start_service()
    job, url = await start_job(svc, receiver, "beat", timeout=60, heartbeat_timeout=30)
    assert (job["heartbeat_timeout"], job["heartbeat_at"], job["progress"]) == (30.0, None, None)

    answer = await svc.client.post(url, json={"progress": {"done": 3, "of": 10}})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["state"] == "running"
    assert body["heartbeat_timeout"] == 30.0
    assert '"heartbeat_timeout":30.0' in answer.text  # written as the job writes it
    assert body["heartbeat_due"] < body["deadline"]  # 30 s from now, and 60 s from the start
    job = await svc.job("beat")
    assert job["progress"] == {"done": 3, "of": 10}
    first = job["heartbeat_at"]
    assert first is not None

    # The token as a bearer header, and a body without progress: alive, same progress.
    path, _, query = url.partition("?")
    token = parse_qs(query)["token"][0]
    await asyncio.sleep(0.01)
    bare = await svc.client.post(path, headers={"authorization": f"Bearer {token}"})
    assert bare.status_code == 200, bare.text
    job = await svc.job("beat")
    assert job["progress"] == {"done": 3, "of": 10}
    # (compared as times: a time on a whole second is written without a fraction)
    assert datetime.fromisoformat(job["heartbeat_at"]) > datetime.fromisoformat(first)
    assert (await svc.client.post(url, content=b"null")).status_code == 200

    [noted] = of_type(await events(svc, "beat"), "heartbeat")
    assert noted["data"] == {"progress": {"done": 3, "of": 10}}
    assert token not in str(await events(svc, "beat"))


async def test_a_wrong_token_and_an_unknown_promise_change_nothing(start_service, receiver):
    svc = await start_service()
    _, url = await start_job(svc, receiver, "guarded")
    before = await events(svc, "guarded")
    forged = url.split("?")[0] + "?token=forged"
    for answer in (
        await svc.client.post(forged, json={"progress": 1}),
        await svc.client.post(url.split("?")[0], json={"progress": 1}),
    ):
        assert answer.status_code == 401, answer.text
        assert answer.json()["error"]["code"] == "unauthorized"
    job = await svc.job("guarded")
    assert (job["progress"], job["heartbeat_at"]) == (None, None)
    assert await events(svc, "guarded") == before

    token = svc.tether.signer.token("nobody:1")
    missing = await svc.client.post(f"/callbacks/nobody:1/heartbeat?token={token}")
    assert missing.status_code == 404, missing.text


async def test_a_heartbeat_after_the_job_ended_is_gone(start_service, receiver):
    svc = await start_service()
    _, url = await start_job(svc, receiver, "ended")
    assert (await svc.client.post(url, json={"progress": "half"})).status_code == 200
    callback = url.replace("/heartbeat", "")
    assert (await svc.client.post(callback, json={"status": "succeeded"})).status_code == 200
    late = await svc.client.post(url, json={"progress": "all"})
    assert late.status_code == 410, late.text
    assert late.json()["error"] == {
        "code": "gone",
        "message": "the job is succeeded; it takes no more heartbeats",
        "details": {"state": "succeeded", "attempt": 1},
    }
    job = await svc.job("ended")
    assert (job["state"], job["progress"]) == ("succeeded", "half")


async def test_a_heartbeat_whose_attempt_ended_and_was_retried_before_its_write_is_gone(
    start_service, receiver, monkeypatch
):
    """The heartbeat read the job open at attempt 1; before its write the
    attempt failed and a retry started attempt 2. The beat is not written
    onto attempt 2 (its `heartbeat_due` would be set from a run that is not
    its own, and a queued attempt 2 timed out for silence with no run to
    ask): 410, as for a beat to a replaced attempt's URL."""
    svc = await start_service()
    _, url = await start_job(svc, receiver, "raced", timeout=60, heartbeat_timeout=30)
    callback = url.replace("/heartbeat", "")
    jobs = svc.tether.jobs
    real = jobs.beat

    async def ended_and_retried_first(*args: Any) -> Any:
        failed = await svc.client.post(callback, json={"status": "failed"})
        assert failed.status_code == 200, failed.text
        retried = await svc.client.post("/jobs/raced/retry")
        assert (retried.status_code, retried.json()["attempt"]) == (200, 2), retried.text
        return await real(*args)

    monkeypatch.setattr(jobs, "beat", ended_and_retried_first)
    late = await svc.client.post(url, json={"progress": "attempt 1's"})
    assert late.status_code == 410, late.text
    assert late.json()["error"]["details"] == {"attempt": 1, "current_attempt": 2}
    job = await svc.job("raced")
    assert (job["attempt"], job["progress"], job["heartbeat_at"]) == (2, None, None)
    assert of_type(await events(svc, "raced"), "heartbeat") == []


async def test_a_bad_heartbeat_body_is_refused_and_changes_nothing(start_service, receiver):
    svc = await start_service()
    _, url = await start_job(svc, receiver, "bodies")
    big = {"progress": "x" * PROGRESS_LIMIT}
    too_big = await svc.client.post(url, json=big)
    assert too_big.status_code == 422, too_big.text
    error = too_big.json()["error"]
    assert error["details"] == {"field": "progress", "limit_bytes": PROGRESS_LIMIT}
    assert f"at most {PROGRESS_LIMIT} bytes" in error["message"]
    for nope in (b"{nope", b"\x0b", b"\x0c"):  # JSON's white space is space, \t, \r, \n only
        not_json = await svc.client.post(url, content=nope)
        assert (not_json.status_code, not_json.json()["error"]["details"]) == (
            400,
            {"field": "body"},
        )
    lone = await svc.client.post(url, content=b'{"progress": "\\udbff"}')  # msgspec: "truncated"
    assert lone.json()["error"]["message"] == (
        "the heartbeat body is not valid JSON: the escape \\udbff at byte 14 is half a"
        " surrogate pair, with no \\udc00-\\udfff escape after it: a lone surrogate is not"
        " a character"
    )
    unknown = await svc.client.post(url, json={"progres": 1})
    assert unknown.status_code == 422, unknown.text
    assert unknown.json()["error"]["details"]["field"] == "progres"
    assert "callback URL" not in unknown.json()["error"]["message"]
    outcome = await svc.client.post(url, json={"status": "succeeded"})  # `tether complete` here
    assert outcome.status_code == 422, outcome.text
    assert (
        "(an outcome goes to the job's callback URL, not its heartbeat URL)"
        in outcome.json()["error"]["message"]
    )
    assert (await svc.job("bodies"))["state"] == "running"
    fits = {"progress": "x" * (PROGRESS_LIMIT - 2)}  # its JSON is exactly the limit
    assert (await svc.client.post(url, json=fits)).status_code == 200
    job = await svc.job("bodies")
    assert job["progress"] == fits["progress"]


async def test_heartbeat_timeout_is_bounded_and_part_of_the_request(start_service, receiver):
    svc = await start_service()
    body = {"id": "hb", "backend": "http_webhook", "params": {"url": receiver.url()}}
    for bad in (0, -1, [5], svc.settings.max_timeout + 1):
        refused = await svc.client.post("/jobs", json={**body, "heartbeat_timeout": bad})
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["details"]["field"] == "heartbeat_timeout"
    assert (await svc.client.get("/jobs/hb")).status_code == 404
    # Longer than the job's timeout: taken (the deadline simply comes first).
    long = {**body, "id": "hb-long", "timeout": 10, "heartbeat_timeout": 20}
    assert (await svc.client.post("/jobs", json=long)).status_code == 201

    made = await svc.client.post("/jobs", json={**body, "timeout": 10, "heartbeat_timeout": 5})
    assert made.status_code == 201, made.text
    again = await svc.client.post("/jobs", json={**body, "timeout": 10, "heartbeat_timeout": 5.0})
    assert again.status_code == 200, again.text
    other = await svc.client.post("/jobs", json={**body, "timeout": 10, "heartbeat_timeout": 6})
    assert other.status_code == 409, other.text
    assert other.json()["error"]["details"]["differs"] == ["heartbeat_timeout"]
    none = await svc.client.post("/jobs", json={**body, "timeout": 10})
    assert none.json()["error"]["details"]["differs"] == ["heartbeat_timeout"]
    [accepted] = of_type(await events(svc, "hb"), "accepted")
    assert accepted["data"]["heartbeat_timeout"] == 5.0


async def test_heartbeat_events_are_throttled_and_only_for_new_progress(
    start_service, receiver, monkeypatch
):
    # The heartbeat's clock, moved on by hand: a one-second window with 20
    # heartbeats "well within" it failed on a slow machine (2026-12-07).
    later = 0
    monkeypatch.setattr(core.callbacks, "now_ms", lambda: now_ms() + later)
    every = int(core.callbacks.HEARTBEAT_EVENT_EVERY * 1000)
    svc = await start_service()
    _, url = await start_job(svc, receiver, "chatty")
    for n in range(20):  # within the window
        assert (await svc.client.post(url, json={"progress": n})).status_code == 200
    assert (await svc.job("chatty"))["progress"] == 19
    assert [e["data"] for e in of_type(await events(svc, "chatty"), "heartbeat")] == [
        {"progress": 0}
    ]
    later = every + 1
    await svc.client.post(url, json={"progress": 0})  # the progress last recorded: no event
    await svc.client.post(url)  # no progress: no event
    assert len(of_type(await events(svc, "chatty"), "heartbeat")) == 1
    await svc.client.post(url, json={"progress": 20})
    await svc.client.post(url, json={"progress": 21})  # within the window of the last event
    noted = [e["data"] for e in of_type(await events(svc, "chatty"), "heartbeat")]
    assert noted == [{"progress": 0}, {"progress": 20}]
    assert (await svc.job("chatty"))["progress"] == 21
    later = 2 * every + 2
    await svc.client.post(url, json={"progress": 22})  # a window past it: an event
    assert len(of_type(await events(svc, "chatty"), "heartbeat")) == 3


def status_answer(status: dict[str, Any]) -> Any:
    """A receiver answering the trigger 202 and `/status` with `status`."""

    def respond(hit: Hit) -> tuple[int, Any]:
        return (200, status) if hit.path == "/status" else (202, {"accepted": True})

    return respond


async def test_hook_check_status_confirms_a_silent_run_is_going(start_service, receiver):
    receiver.respond = status_answer({"status": "running", "progress": {"step": 2}})
    svc = await start_service()
    params = {"status_url": receiver.url("/status"), "status_interval": 3600}
    await start_job(svc, receiver, "quiet", timeout=60, heartbeat_timeout=1, params=params)

    async def missed_twice() -> list[dict[str, Any]] | None:
        found = of_type(await events(svc, "quiet"), "heartbeat_missed")
        return found if len(found) >= 2 else None

    missed = await eventually(missed_twice, timeout=10)
    assert missed[0]["data"] == {
        "heartbeat_timeout": 1.0,
        "said": "running",
        "progress": {"step": 2},
    }
    job = await svc.job("quiet")
    assert (job["state"], job["progress"]) == ("running", None)
    asked = [h.at for h in receiver.on("/status")]
    assert len(asked) >= 2
    assert asked[1] - asked[0] >= 0.35  # asked again after another heartbeat_timeout


async def test_a_heartbeat_after_a_miss_brings_the_next_miss_on_time(start_service, receiver):
    """After a miss the next look is put off (S, 2S, 4S ... of silence); a
    heartbeat moves the next miss to S after it, and the watchdog, which no
    event woke, found it up to its nap late (a QA pass, 2026-12-07)."""
    receiver.respond = status_answer({"status": "running"})
    svc = await start_service(watchdog_interval=60)  # a nap longer than the test
    params = {"status_url": receiver.url("/status"), "status_interval": 3600}
    _, url = await start_job(svc, receiver, "late", timeout=60, heartbeat_timeout=1, params=params)

    async def missed(n: int) -> list[dict[str, Any]] | None:
        found = of_type(await events(svc, "late"), "heartbeat_missed")
        return found if len(found) >= n else None

    await eventually(lambda: missed(3), timeout=15)  # after 1, 2 and 4 s: the next after 8
    beat = await svc.client.post(url)
    assert beat.status_code == 200, beat.text
    due = datetime.fromisoformat(beat.json()["heartbeat_due"])
    fourth = (await eventually(lambda: missed(4), timeout=15))[3]
    late = (datetime.fromisoformat(fourth["at"]) - due).total_seconds()
    assert 0 <= late < 1.5, late


async def test_hook_check_status_settles_a_silent_run_that_ended(start_service, receiver):
    receiver.respond = status_answer({"status": "succeeded", "result": {"rows": 7}})
    svc = await start_service()
    params = {"status_url": receiver.url("/status"), "status_interval": 3600}
    await start_job(svc, receiver, "done", timeout=60, heartbeat_timeout=1, params=params)
    job = await svc.wait_state("done", "succeeded")
    assert job["result"] == {"rows": 7}
    kinds = [e["type"] for e in await events(svc, "done")]
    assert kinds[-2:] == ["heartbeat_missed", "finished"]
    missed = of_type(await events(svc, "done"), "heartbeat_missed")
    assert [e["data"] for e in missed] == [
        {"heartbeat_timeout": 1.0, "said": "ended", "status": "succeeded"}
    ]


async def test_a_silent_run_its_backend_cannot_see_times_out(start_service, receiver):
    svc = await start_service()
    params = {"cancel_url": receiver.url("/cancel")}
    await start_job(svc, receiver, "lost", timeout=60, heartbeat_timeout=1, params=params)
    job = await svc.wait_state("lost", "timed_out")
    assert job["error"]["type"] == "heartbeat_timeout"
    assert "no heartbeat within 1 seconds" in job["error"]["message"]
    items = await events(svc, "lost")
    assert [e["type"] for e in items][-2:] == ["heartbeat_missed", "finished"]
    assert items[-2]["data"] == {"heartbeat_timeout": 1.0, "said": "unknown"}
    assert items[-1]["data"] == {"state": "timed_out", "error_type": "heartbeat_timeout"}
    await eventually(lambda: receiver.on("/cancel"))  # the run is told to stop


async def test_heartbeats_keep_a_job_alive_until_they_stop(start_service, receiver):
    svc = await start_service()
    # a heartbeat_timeout ten beats long: a loaded machine may stall the
    # loop (this test's and the service's) for most of a second between beats
    _, url = await start_job(svc, receiver, "alive", timeout=60, heartbeat_timeout=2)
    for n in range(20):  # 4 s: two heartbeat_timeouts
        assert (await svc.client.post(url, json={"progress": n})).status_code == 200
        await asyncio.sleep(0.2)
    job = await svc.job("alive")
    assert (job["state"], job["progress"]) == ("running", 19)
    assert not of_type(await events(svc, "alive"), "heartbeat_missed")
    job = await svc.wait_state("alive", "timed_out", timeout=10)
    assert job["error"]["type"] == "heartbeat_timeout"


def test_the_heartbeat_command_reports_progress_and_never_shows_the_token(tmp_path, receiver):
    from tests.process import TetherProcess, wait_for

    service = TetherProcess(tmp_path, {"TETHER_STORE": "memory://"}).start()
    try:
        env = {"TETHER_URL": service.url, "TETHER_API_TOKEN": None}
        params = f'{{"url": "{receiver.url()}"}}'
        submitted = CliRunner().invoke(
            main_group,
            ["submit", "http_webhook", "--id", "cli-beat", "--params", params,
             "--timeout", "60", "--heartbeat-timeout", "30", "--json"],
            env=env,
        )  # fmt: skip
        assert submitted.exit_code == 0, submitted.output
        with service.client() as http:
            wait_for(http, "cli-beat", "running")
        url = receiver.hits[0].body["callback_url"]
        token = parse_qs(urlsplit(url).query)["token"][0]
        beat = CliRunner().invoke(main_group, ["heartbeat", url, "--progress", '{"n": 1}'], env=env)
        assert beat.exit_code == 0, beat.output
        assert "running" in beat.stdout and token not in beat.output
        with service.client() as http:
            job = http.get("/jobs/cli-beat").json()
        assert (job["progress"], job["heartbeat_timeout"]) == ({"n": 1}, 30.0)
        # the heartbeat URL the trigger handed out works as well
        beat_url = receiver.hits[0].body["heartbeat_url"]
        assert beat_url != url
        beat = CliRunner().invoke(main_group, ["heartbeat", beat_url, "--progress", "2"], env=env)
        assert beat.exit_code == 0, beat.output
        assert token not in beat.output
        with service.client() as http:
            assert http.get("/jobs/cli-beat").json()["progress"] == 2
        with service.client() as http:
            http.post(url, json={"status": "failed"})
        late = CliRunner().invoke(main_group, ["heartbeat", url, "--json"], env=env)
        assert late.exit_code == 4
        assert "takes no more heartbeats (HTTP 410)" in late.stderr and token not in late.output
    finally:
        service.kill()


async def test_progress_that_quotes_the_jobs_urls_is_kept_without_their_token(
    start_service, receiver
):
    """A run that reports what it was sent (its callback and heartbeat URLs,
    whole or cut) shows them on the job, in its history and in its
    notification without the token (found in an audit, 2026-12-04)."""
    svc = await start_service()
    _, url = await start_job(svc, receiver, "echo", timeout=60, heartbeat_timeout=30)
    [hit] = receiver.on("/hook")
    token = parse_qs(urlsplit(url).query)["token"][0]
    said = {"callback": hit.body["callback_url"], "tail": f"…{token[5:]}", "beat": url}

    answer = await svc.client.post(url, json={"progress": said})

    assert answer.status_code == 200, answer.text
    job = await svc.job("echo")
    assert job["progress"] == {
        "callback": hit.body["callback_url"].replace(token, "***"),
        "tail": "…***",
        "beat": url.replace(token, "***"),
    }
    [noted] = of_type(await events(svc, "echo"), "heartbeat")
    assert noted["data"] == {"progress": job["progress"]}
    listed = await svc.client.get("/jobs", params={"limit": 10})
    assert token[:8] not in listed.text
    assert token[:8] not in (await svc.client.get("/jobs/echo/events")).text


async def test_a_status_check_that_quotes_the_jobs_url_is_kept_without_its_token(
    start_service, receiver
):
    """`status_url` answering that the run goes on, with progress and run
    details that echo the callback URL the run was sent."""

    def respond(hit: Hit) -> tuple[int, Any]:
        if hit.path != "/status":
            return 202, {"accepted": True}
        [trigger] = receiver.on("/hook")
        sent = trigger.body["callback_url"]
        return 200, {"status": "running", "progress": {"sent": sent}, "external": {"url": sent}}

    receiver.respond = respond
    svc = await start_service()
    params = {"status_url": receiver.url("/status"), "status_interval": 3600}
    await start_job(svc, receiver, "told", timeout=60, heartbeat_timeout=1, params=params)
    [trigger] = receiver.on("/hook")
    token = parse_qs(urlsplit(trigger.body["callback_url"]).query)["token"][0]

    async def missed() -> list[dict[str, Any]] | None:
        return of_type(await events(svc, "told"), "heartbeat_missed") or None

    [first, *_] = await eventually(missed, timeout=10)
    assert first["data"]["progress"] == {"sent": trigger.body["callback_url"].replace(token, "***")}
    job = await svc.job("told")
    assert token[:8] not in str(job)
    assert token[:8] not in (await svc.client.get("/jobs/told/events")).text


async def test_a_silent_run_whose_status_answer_cannot_be_read_waits_on(start_service, receiver):
    """A `status_url` that answers 200 with a status Tether does not know
    (`{"status": "queued"}`) is a failed check, as a 503 is: the missed
    heartbeat is noted (`said: error`) and the job waits on, its run not
    asked to stop. Before, it was read as "cannot tell": the job timed out
    and its live run was cancelled (found by an exploratory QA pass)."""
    receiver.respond = lambda hit: (
        (200, {"status": "queued"}) if hit.path == "/status" else (202, {"accepted": True})
    )
    svc = await start_service()
    params = {"cancel_url": receiver.url("/cancel"), "status_url": receiver.url("/status")}
    await start_job(svc, receiver, "queued", timeout=60, heartbeat_timeout=1, params=params)

    async def missed() -> list[dict[str, Any]]:
        return of_type(await events(svc, "queued"), "heartbeat_missed")

    [first, *_] = await eventually(missed)
    assert first["data"] == {
        "heartbeat_timeout": 1.0,
        "said": "error",
        "error_type": "BackendError",
    }
    assert (await svc.job("queued"))["state"] == "running"
    assert receiver.on("/cancel") == []
