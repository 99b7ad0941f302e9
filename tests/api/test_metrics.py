"""`GET /metrics`: the Prometheus text format, read by prometheus-client's own
parser; counters that follow the job history, gauges read from the store,
request durations by route template, and the API token."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from litestar import Litestar, Router
from prometheus_client.parser import text_string_to_metric_families

import api.app
from api.auth import api_token_guard
from api.metrics import MULTIPROC_ENV, install, metrics, multiprocess_dir
from core.metrics import on_event
from core.scratch import LOCK
from core.settings import Settings
from core.store.jobs import JobRecord, now_ms
from tests.conftest import eventually

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition, by name and labels; a malformed text raises."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 when the series does not exist (yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


class Event(msgspec.Struct):
    """The shape of `core.events.Event`, which the listener gets."""

    type: str
    data: dict[str, Any] = msgspec.field(default_factory=dict)
    seq: int = 0
    at: int = 0
    attempt: int = 1


def record(backend: str, state: str, seconds: float = 0.0) -> JobRecord:
    now = now_ms()
    return JobRecord(
        id="job-1",
        backend=backend,
        state=state,
        params={},
        metadata={},
        timeout=60,
        fingerprint="f",
        deadline=now + 60_000,
        created_at=now - int(seconds * 1000),
        updated_at=now,
        finished_at=now if state in ("succeeded", "failed", "canceled", "timed_out") else None,
    )


@pytest.fixture
def start(start_service: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> Any:
    """`start_service`, with `/metrics` and the request timer in the app even
    before `create_app` puts them there itself."""
    real = api.app.create_app

    def create_app(settings: Settings, pm: Any = None) -> Litestar:
        app = real(settings, pm)
        if not any(route.path == "/metrics" for route in app.routes):
            guard = api_token_guard(settings)
            app.register(Router("/", route_handlers=[metrics], guards=[guard]))
            install(app, ["http_webhook"])
        return app

    # the module that defines `start_service` (conftest is imported under two names)
    monkeypatch.setitem(start_service.__globals__, "create_app", create_app)
    return start_service


async def scrape(svc: Any, **headers: str) -> Samples:
    response = await svc.client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    return parse(response.text)


async def test_events_move_the_counters_and_the_duration_histogram(start):
    svc = await start()
    before = await scrape(svc)
    on_event(record("http_webhook", "pending"), Event("accepted"))
    on_event(record("http_webhook", "pending"), Event("trigger_failed", {"try": 1}))
    waited = {"try": 2, "counted": False}  # a wait that sent nothing: not a try
    on_event(record("http_webhook", "pending"), Event("trigger_failed", waited))
    on_event(record("http_webhook", "running"), Event("triggered"))
    on_event(record("http_webhook", "running"), Event("callback", {"verdict": "accepted"}))
    on_event(record("http_webhook", "succeeded", 90), Event("finished"))
    on_event(record("http_webhook", "succeeded"), Event("callback", {"verdict": "duplicate"}))
    on_event(record("http_webhook", "running"), Event("heartbeat"))  # counted by nothing
    on_event(record("http_webhook", "canceled"), Event("cancel_failed", {"tries": 4}))
    after = await scrape(svc)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("tether_jobs_created_total", backend="http_webhook") == 1
    assert moved("tether_trigger_attempts_total", backend="http_webhook", result="failed") == 1
    assert moved("tether_trigger_attempts_total", backend="http_webhook", result="ok") == 1
    assert moved("tether_callbacks_total", verdict="accepted") == 1
    assert moved("tether_callbacks_total", verdict="duplicate") == 1
    assert moved("tether_callbacks_total", verdict="conflict") == 0
    assert moved("tether_run_cancels_failed_total", backend="http_webhook") == 1
    done = {"backend": "http_webhook", "state": "succeeded"}
    assert moved("tether_jobs_finished_total", **done) == 1
    assert moved("tether_jobs_finished_total", backend="http_webhook", state="failed") == 0
    assert moved("tether_job_duration_seconds_count", **done) == 1
    assert 89 <= moved("tether_job_duration_seconds_sum", **done) <= 91
    assert moved("tether_job_duration_seconds_bucket", le="60.0", **done) == 0
    assert moved("tether_job_duration_seconds_bucket", le="300.0", **done) == 1
    # every series of a known backend exists from the start, at 0 if nothing happened
    assert (
        "tether_jobs_finished_total",
        frozenset({"backend": "http_webhook", "state": "timed_out"}.items()),
    ) in before
    assert not any(name.endswith("_created") for name, _ in after)


async def test_jobs_in_each_state_come_from_the_store(start, receiver):
    svc = await start()
    first = await scrape(svc)
    assert {
        state: value(first, "tether_jobs", state=state) for state in ("pending", "running")
    } == {
        "pending": 0,
        "running": 0,
    }
    assert value(first, "tether_jobs_overdue") == 0
    started_at = now_ms() / 1000
    for n in range(3):
        body = {"id": f"m{n}", "backend": "http_webhook", "params": {"url": receiver.url()}}
        assert (await svc.client.post("/jobs", json=body)).status_code == 201
    for n in range(3):
        await svc.wait_state(f"m{n}", "running")
    assert (await svc.client.post("/jobs/m0/cancel")).status_code == 200
    samples = await scrape(svc)
    assert value(samples, "tether_jobs", state="running") == 2
    assert value(samples, "tether_jobs", state="canceled") == 1
    assert value(samples, "tether_jobs", state="succeeded") == 0
    oldest = value(samples, "tether_jobs_oldest_created_timestamp_seconds", state="running")
    assert started_at - 1 <= oldest <= now_ms() / 1000
    assert (
        "tether_jobs_oldest_created_timestamp_seconds",
        frozenset({("state", "pending")}),
    ) not in samples


async def test_a_retried_jobs_time_in_its_state_counts_from_the_retry(start, receiver):
    """A job that failed and was retried a while later is `pending` from the
    retry: the stuck-jobs gauge counts from then, not from its creation."""
    held = asyncio.Event()
    release = threading.Event()

    def respond(hit: Any) -> tuple[int, Any]:
        if len(receiver.hits) == 1:
            return 400, {}  # attempt 1 is refused
        held.set()
        release.wait(10)  # attempt 2's trigger stays under way: the job stays pending
        return 202, {}

    receiver.respond = respond
    svc = await start()
    body = {"id": "again", "backend": "http_webhook", "params": {"url": receiver.url()}}
    assert (await svc.client.post("/jobs", json=body)).status_code == 201
    created = (await svc.wait_state("again", "failed"))["created_at"]
    await asyncio.sleep(1.1)
    retried_at = now_ms() / 1000
    try:
        assert (await svc.client.post("/jobs/again/retry")).status_code == 200
        await eventually(held.is_set)
        samples = await scrape(svc)
    finally:
        release.set()
    assert value(samples, "tether_jobs", state="pending") == 1
    oldest = value(samples, "tether_jobs_oldest_created_timestamp_seconds", state="pending")
    entered = value(samples, "tether_jobs_oldest_entered_timestamp_seconds", state="pending")
    assert abs(oldest - datetime.fromisoformat(created).timestamp()) < 0.002
    assert oldest < retried_at - 1 and retried_at - 0.01 <= entered <= now_ms() / 1000


async def test_a_slow_trigger_is_counted_and_in_the_jobs_history(start, receiver, monkeypatch):
    """A backend that takes long to answer a trigger (`TRIGGER_SLOW`): the
    job's history says so while it is `pending`, and a counter an alert can
    watch moves, once a call."""
    import core.steps

    monkeypatch.setattr(core.steps, "TRIGGER_WATCH", 0.05)
    monkeypatch.setattr(core.steps, "TRIGGER_SLOW", 0.3)
    release = threading.Event()

    def respond(hit: Any) -> tuple[int, Any]:
        release.wait(10)  # the external system takes its time to start the run
        return 202, {}

    receiver.respond = respond
    svc = await start()
    before = await scrape(svc)
    body = {"id": "slow", "backend": "http_webhook", "params": {"url": receiver.url()}}
    assert (await svc.client.post("/jobs", json=body)).status_code == 201

    async def slow_events() -> list[dict[str, Any]]:
        items = (await svc.client.get("/jobs/slow/events")).json()["items"]
        return [e for e in items if e["type"] == "trigger_slow"]

    try:
        [event] = await eventually(slow_events)
        assert (await svc.client.get("/jobs/slow")).json()["state"] == "pending"
        assert event["data"]["try"] == 1 and event["data"]["seconds"] >= 0.3
        after = await scrape(svc)
    finally:
        release.set()
    await svc.wait_state("slow", "running")
    assert len(await slow_events()) == 1
    moved = value(after, "tether_triggers_slow_total", backend="http_webhook") - value(
        before, "tether_triggers_slow_total", backend="http_webhook"
    )
    assert moved == 1
    assert ("tether_triggers_slow_total", frozenset({("backend", "http_webhook")})) in before


async def test_a_job_past_its_deadline_is_overdue_while_no_watchdog_ends_it(start, receiver):
    svc = await start(watchdog_interval=0)  # no watchdog
    body = {"id": "late", "backend": "http_webhook", "params": {"url": receiver.url()}}
    assert (await svc.client.post("/jobs", json={**body, "timeout": 0.2})).status_code == 201
    await svc.wait_state("late", "running")

    async def overdue() -> bool:
        return value(await scrape(svc), "tether_jobs_overdue") == 1

    await eventually(overdue, timeout=5)
    assert (await svc.job("late"))["state"] == "running"


async def test_requests_are_timed_by_route_template_never_by_path(start):
    svc = await start()
    before = await scrape(svc)
    token = svc.tether.signer.token("secret-job:1")
    assert (await svc.client.get("/jobs/secret-job")).status_code == 404
    callback = await svc.client.post(f"/callbacks/secret-job:1?token={token}", json={})
    assert callback.status_code == 404
    assert (await svc.client.get("/no/secret-job")).status_code == 404
    assert (await svc.client.request("PROPFIND", "/jobs")).status_code == 405
    assert (await svc.client.get("/health")).status_code == 200
    after = await scrape(svc)

    def moved(**labels: str) -> float:
        name = "tether_http_request_duration_seconds_count"
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved(method="GET", route="/jobs/{job_id}", status="404") == 1
    assert moved(method="POST", route="/callbacks/{promise_id}", status="404") == 1
    assert moved(method="GET", route="unmatched", status="404") == 1
    assert moved(method="other", route="unmatched", status="405") == 1
    assert moved(method="GET", route="/health", status="200") == 1
    assert moved(method="GET", route="/metrics", status="200") == 1  # the first scrape
    labels = {v for _, series in after for _, v in series}
    assert not any("secret-job" in v or token in v for v in labels)


async def test_openmetrics_when_the_scraper_asks_for_it(start):
    svc = await start()
    response = await svc.client.get(
        "/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.headers["content-type"].count("charset") == 1
    assert response.text.endswith("# EOF\n")
    assert "tether_jobs_created_total" in response.text


async def test_the_api_token_guards_metrics(start):
    svc = await start(api_token="metrics-token")
    assert (await svc.client.get("/metrics")).status_code == 401
    wrong = await svc.client.get("/metrics", headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 401
    samples = await scrape(svc, authorization="Bearer metrics-token")
    assert value(samples, "tether_jobs", state="running") == 0


async def test_a_read_token_may_scrape(start):
    svc = await start(api_token="write-token", read_token="scrape-token")
    assert (await svc.client.get("/metrics")).status_code == 401
    await scrape(svc, authorization="Bearer scrape-token")
    await scrape(svc, authorization="Bearer write-token")


def test_multiprocess_dir_is_fresh_private_and_removed(monkeypatch):
    monkeypatch.setenv(MULTIPROC_ENV, "/somewhere/else")
    with multiprocess_dir(1):
        assert os.environ[MULTIPROC_ENV] == "/somewhere/else"  # one process: untouched
    seen = []
    for _ in range(2):
        with multiprocess_dir(2):
            path = Path(os.environ[MULTIPROC_ENV])
            assert path.is_dir() and [p.name for p in path.iterdir()] == [LOCK]
            assert path.stat().st_mode & 0o077 == 0
            (path / "counter_1.db").write_bytes(b"x")
            seen.append(path)
        assert not path.exists()
        assert os.environ[MULTIPROC_ENV] == "/somewhere/else"
    assert seen[0] != seen[1]
    monkeypatch.delenv(MULTIPROC_ENV)
    with multiprocess_dir(3):
        assert MULTIPROC_ENV in os.environ
    assert MULTIPROC_ENV not in os.environ
