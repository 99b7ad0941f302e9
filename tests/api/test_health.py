"""`GET /health`: a liveness check (200 whenever the store answers) whose body
shows each backend's readiness, checked in the background and cached, and the
backends that waiting jobs need but no plugin offers any more; what happens to
those jobs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from litestar.testing import AsyncTestClient

import core.redact
from api.app import create_app
from api.cli import preflight
from core.plugin import Backend, Readiness, hookimpl
from core.plugins import Plugins, make_plugin_manager
from tests.conftest import eventually, test_settings


class Params(msgspec.Struct):
    pass


class Offers:
    def __init__(self, *backends: Any) -> None:
        self.backends = backends

    @hookimpl
    def tether_backends(self) -> Any:
        return self.backends


class Checked(Backend):
    """A backend whose readiness is `answer` (raised when an exception)."""

    params_type = Params

    def __init__(self, name: str, answer: Readiness | BaseException) -> None:
        self.name = name  # type: ignore[misc]  # one class, several names
        self.answer = answer
        self.asked = 0

    async def trigger(self, trigger: Any) -> dict[str, Any]:
        return {"run": trigger.job.id}

    async def readiness(self) -> Readiness:
        self.asked += 1
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


async def readiness_of(svc: Any) -> dict[str, Any]:
    async def checked() -> dict[str, Any] | None:
        response = await svc.client.get("/health")
        assert response.status_code == 200
        found = response.json()["readiness"]
        return found if all(r["status"] != "unknown" for r in found.values()) else None

    return await eventually(checked)  # type: ignore[no-any-return]


async def test_hook_readiness_shows_per_backend_and_health_stays_200(start_service):
    backends = (
        Checked("fine", Readiness("ok")),
        Checked("bare", Readiness("unconfigured", "set FINE_TOKEN")),
        Checked("down", Readiness("error", "the API answered 503")),
        Checked("broken", RuntimeError("token=hunter2 leaked")),
        # in the check's own task: it stopped the service, at each restart's
        # first /health; and ended the process's checks (found by a review)
        Checked("exits", SystemExit("token=hunter2")),
        Checked("cancels", asyncio.CancelledError()),
    )
    svc = await start_service(plugins=[Offers(*backends)])
    assert [b.asked for b in backends] == [0] * 6  # not at start-up: at the first /health
    found = await readiness_of(svc)
    assert found["fine"] == {"status": "ok", "reason": ""}
    assert found["bare"] == {"status": "unconfigured", "reason": "set FINE_TOKEN"}
    assert found["down"] == {"status": "error", "reason": "the API answered 503"}
    assert found["broken"] == {"status": "error", "reason": "readiness check failed: RuntimeError"}
    assert found["exits"] == {"status": "error", "reason": "readiness check failed: SystemExit"}
    assert found["cancels"] == {
        "status": "error",
        "reason": "readiness check failed: CancelledError",
    }
    assert found["http_webhook"] == {"status": "ok", "reason": ""}  # the default
    health = (await svc.client.get("/health")).json()
    assert health["status"] == "ok" and health["missing"] == []


async def test_a_readiness_reason_quoting_a_secret_is_shown_without_it(start_service, monkeypatch):
    """The open `GET /health` showed a plugin's reason as it was, an API key
    of the environment in a URL included (a review, 2026-12-07)."""
    monkeypatch.setattr(core.redact, "_ENVIRONMENT", ("Zk9q7Xw3Lm2Rt8sVb4Nc7Hd1",))
    said = "login to https://u:pw@acme.example?api_key=Zk9q7Xw3Lm2Rt8sVb4Nc7Hd1 refused"
    svc = await start_service(plugins=[Offers(Checked("acme", Readiness("error", said)))])
    found = await readiness_of(svc)
    shown = "login to https://***@acme.example?api_key=*** refused"
    assert found["acme"] == {"status": "error", "reason": shown}


async def test_readiness_is_checked_in_the_background_and_cached(start_service):
    backend = Checked("fine", Readiness("ok"))
    svc = await start_service(plugins=[Offers(backend)], readiness_interval=3600)
    await readiness_of(svc)
    for _ in range(5):
        assert (await svc.client.get("/health")).status_code == 200
    assert backend.asked == 1


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name} {record.levelname} {record.getMessage()}")

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def logs() -> Iterator[Capture]:
    handler = Capture()
    logger = logging.getLogger("tether")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


async def test_jobs_of_a_backend_no_longer_installed(tmp_path: Path, logs: Capture):
    """Jobs wait on `gone`; the service restarts without its plugin."""
    settings = test_settings(store=f"sqlite:///{tmp_path}/tether.db")
    gone = Checked("gone", Readiness("ok"))
    before = create_app(settings, make_plugin_manager(entry_points=False, extra=[Offers(gone)]))
    async with AsyncTestClient(before, base_url="http://127.0.0.1") as client:
        for job_id in ("a", "b", "c"):
            response = await client.post("/jobs", json={"id": job_id, "backend": "gone"})
            assert response.status_code == 201

        async def running() -> bool:
            jobs = [(await client.get(f"/jobs/{j}")).json() for j in ("a", "b", "c")]
            return all(j["state"] == "running" for j in jobs)

        await eventually(running)

    # At start-up (`tether serve` runs this check once), a warning names it.
    plugins = Plugins(make_plugin_manager(entry_points=False))
    assert await preflight(settings, plugins) is None
    assert "backend 'gone' is not installed, and 3 waiting job(s) use it" in logs.text

    after = create_app(settings, make_plugin_manager(entry_points=False))
    async with AsyncTestClient(after, base_url="http://127.0.0.1") as client:
        # from the first answer on (it was [] until the first background check)
        first = (await client.get("/health")).json()
        assert first["missing"] == [{"backend": "gone", "waiting": 3}]
        assert "gone" not in (await client.get("/health")).json()["readiness"]

        # Their callbacks still settle them, with the uniform body.
        tether = after.dependencies["tether"].dependency()
        path = tether.signer.url("a:1").removeprefix(settings.base_url)
        settled = await client.post(path, json={"status": "succeeded", "result": 1})
        assert settled.status_code == 200, settled.text
        assert settled.json()["job"]["state"] == "succeeded"
        refused = await client.post(tether.signer.url("b:1").removeprefix(settings.base_url))
        assert refused.status_code == 422  # no backend to claim an empty body

        # Cancelling one says the external run could not be stopped.
        canceled = await client.post("/jobs/b/cancel", json={"reason": "cleanup"})
        assert canceled.status_code == 200, canceled.text
        message = canceled.json()["error"]["message"]
        assert message == (
            "canceled by request: cleanup; the external run could not be stopped:"
            " backend 'gone' is not installed"
        )
        assert canceled.json()["error"]["type"] == "canceled"
        await tether.checks.refresh()
        assert (await client.get("/health")).json()["missing"] == [
            {"backend": "gone", "waiting": 1}
        ]


async def test_a_job_timed_out_with_its_backend_gone_says_its_run_was_not_stopped(
    tmp_path: Path, logs: Capture
):
    """A cancel said the run could not be stopped; a timeout said nothing,
    and the run went on unseen (found by a QA pass, 2026-12-07)."""
    settings = test_settings(store=f"sqlite:///{tmp_path}/tether.db")
    gone = Checked("gone", Readiness("ok"))
    before = create_app(settings, make_plugin_manager(entry_points=False, extra=[Offers(gone)]))
    async with AsyncTestClient(before, base_url="http://127.0.0.1") as client:
        made = await client.post("/jobs", json={"id": "t", "backend": "gone", "timeout": 2})
        assert made.status_code == 201, made.text

        async def running() -> bool:
            return (await client.get("/jobs/t")).json()["state"] == "running"

        await eventually(running)

    after = create_app(settings, make_plugin_manager(entry_points=False))
    async with AsyncTestClient(after, base_url="http://127.0.0.1") as client:

        async def ended() -> dict[str, Any] | None:
            job = (await client.get("/jobs/t")).json()
            return job if job["state"] == "timed_out" else None

        job = await eventually(ended, timeout=15)
        assert job["error"]["message"] == (
            "not finished within 2 seconds, the job's timeout; the external run could not be"
            " stopped: backend 'gone' is not installed"
        )
        await eventually(lambda: "its external run was not stopped" in logs.text)


async def test_head_and_options_probes_answer_as_get_does(start_service, monkeypatch):
    """`HEAD /health` was 405, and `OPTIONS /health` (HAProxy's `option
    httpchk /health` probes with it) Litestar's 204 whatever the store did
    (found by an exploratory QA pass)."""
    from core.errors import StoreUnavailable

    svc = await start_service()
    for method in ("GET", "HEAD", "OPTIONS"):
        answer = await svc.client.request(method, "/health")
        assert answer.status_code == 200, (method, answer.text)
        assert (answer.content == b"") == (method == "HEAD")
        if method == "HEAD":  # (it said 4, the length of `null`)
            assert answer.headers.get("content-length", "0") == "0"

    async def down() -> None:
        raise StoreUnavailable("the embedded store failed: disk I/O error")

    monkeypatch.setattr(svc.tether, "health", down)
    for method in ("GET", "HEAD", "OPTIONS"):
        answer = await svc.client.request(method, "/health")
        assert answer.status_code == 503, (method, answer.text)
        assert (answer.content == b"") == (method == "HEAD")
