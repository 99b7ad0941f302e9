"""`POST /backends/{name}/notifications`, the plugin contract's endpoint for an
external system's own notifications (`Backend.receive_notification`,
`Backend.run_keys`), with a tiny backend of the tests' own, over real HTTP."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import msgspec
import pytest

from core.models import Notice, NoticeAbout, Outcome, Running
from core.notices import MAX_RUN_KEYS
from core.plugin import Backend, ErrorInfo, Job, Trigger, Unauthorized, hookimpl
from core.store.jobs import now_ms
from tests.conftest import Service

KEY = "beacon-key-0123456789"
"""The credential the beacon backend is configured with."""

TABLES = (
    "tether_jobs",
    "tether_events",
    "tether_run_keys",
    "tether_job_tags",
    "tether_notifications",
    "tether_slots",
)


class BeaconParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    run: str = ""
    """The run id the external system gives (default: the job's id); the
    attempt is appended (`r1.1`), as a system starting a new run would."""


class Beacon(Backend):
    """A backend whose system notifies one endpoint about its runs:
    `{"runs": [...], "what": ...}` with the header `X-Beacon-Key`."""

    name = "beacon"
    params_type = BeaconParams

    def __init__(self) -> None:
        self.said: dict[str, Outcome | Running | None] = {}
        """What `check_status` says of each run (default: `Running`)."""
        self.checked: list[str] = []
        self.notices: list[Notice] = []
        self.keys_fail: bool | BaseException = False
        """Whether `run_keys` raises (a RuntimeError, or this exception)."""
        self.keys: Any = None
        """What `run_keys` answers instead of the run's own key."""

    async def trigger(self, trigger: Trigger) -> dict[str, Any]:
        params: BeaconParams = trigger.params
        return {"run": f"{params.run or trigger.job.id}.{trigger.job.attempt}"}

    def run_keys(self, external: Any) -> list[str]:
        if isinstance(self.keys_fail, BaseException):
            raise self.keys_fail
        if self.keys_fail:
            raise RuntimeError("no keys today")
        return [external["run"]] if self.keys is None else self.keys

    async def check_status(self, job: Job) -> Outcome | Running | None:
        assert job.external is not None
        self.checked.append(job.external["run"])
        return self.said.get(job.external["run"], Running(progress={"state": "RUNNING"}))

    async def receive_notification(self, notice: Notice) -> NoticeAbout:
        self.notices.append(notice)
        if notice.headers.get("x-beacon-key") != KEY:
            raise Unauthorized("missing or wrong X-Beacon-Key")
        body = notice.body
        if isinstance(body, dict) and body.get("crash"):
            raise RuntimeError(f"crashed holding {KEY}")
        if isinstance(body, dict) and body.get("exit"):
            raise SystemExit(f"exited holding {KEY}")
        if isinstance(body, dict) and body.get("cancel"):  # of its own
            raise asyncio.CancelledError
        if not isinstance(body, dict) or not isinstance(body.get("runs"), list):
            raise ValueError("`runs` is missing")
        return NoticeAbout(keys=body["runs"], kind=str(body.get("what", "")))


class Plain(Backend):
    """A backend that takes no notifications (the default)."""

    name = "plain"
    params_type = BeaconParams

    async def trigger(self, trigger: Trigger) -> dict[str, Any]:
        return {"run": "plain"}


class Offers:
    def __init__(self, *backends: Backend) -> None:
        self.backends = backends

    @hookimpl
    def tether_backends(self) -> Any:
        return self.backends


@pytest.fixture
def beacon() -> Beacon:
    return Beacon()


@pytest.fixture
def start(start_service, beacon):
    async def go(**settings: Any) -> Service:
        return await start_service(plugins=[Offers(beacon, Plain())], **settings)

    return go


async def running(svc: Service, job_id: str, **params: Any) -> dict[str, Any]:
    response = await svc.client.post(
        "/jobs", json={"id": job_id, "backend": "beacon", "params": params}
    )
    assert response.status_code == 201, response.text
    return await svc.wait_state(job_id, "running")


async def notify(svc: Service, body: Any, key: str | None = KEY, **kwargs: Any) -> Any:
    headers = {} if key is None else {"X-Beacon-Key": key}
    return await svc.client.post(
        "/backends/beacon/notifications", json=body, headers=headers, **kwargs
    )


async def events(svc: Service, job_id: str) -> list[dict[str, Any]]:
    response = await svc.client.get(f"/jobs/{job_id}/events")
    return response.json()["items"]  # type: ignore[no-any-return]


async def tables(svc: Service) -> str:
    """Every row of Tether's own tables: equal before and after means nothing
    was written."""
    db = svc.tether.jobs.db
    rows = [await db.fetch(f"SELECT * FROM {t} ORDER BY 1, 2", ()) for t in TABLES]
    return hashlib.sha256(repr(rows).encode()).hexdigest()


# ── the contract ─────────────────────────────────────────────────────────────


async def test_hook_receive_notification_and_run_keys_settle_only_on_what_check_status_says(
    start, beacon
):
    svc = await start()
    await running(svc, "j", run="r1")

    response = await notify(svc, {"runs": ["r1.1"], "what": "started"}, params={"x": "1"})
    assert response.status_code == 200, response.text
    [told] = response.json()["jobs"]
    assert told["id"] == "j" and told["state"] == "running"
    assert "has not ended" in told["message"]
    assert beacon.checked == ["r1.1"]
    assert (await svc.job("j"))["state"] == "running"
    notice = beacon.notices[-1]
    assert notice.headers["x-beacon-key"] == KEY  # names lower-cased
    assert notice.query == {"x": ["1"]}
    assert notice.body == {"runs": ["r1.1"], "what": "started"}
    assert msgspec.json.decode(notice.raw) == notice.body

    beacon.said["r1.1"] = Outcome("succeeded", result={"rows": 42})
    response = await notify(svc, {"runs": ["r1.1"], "what": "succeeded"})
    assert response.status_code == 200
    assert response.json()["jobs"][0]["state"] == "succeeded"
    job = await svc.job("j")
    assert job["state"] == "succeeded" and job["result"] == {"rows": 42}

    history = await events(svc, "j")
    kinds = [(e["type"], e["data"].get("kind") or e["data"].get("said")) for e in history]
    assert kinds[-5:] == [
        ("notification", "started"),
        ("status_check", "running"),
        ("notification", "succeeded"),
        ("status_check", "ended"),
        ("finished", None),
    ]
    noted = history[-3]["data"]
    assert noted["keys"] == ["r1.1"] and noted["current"] is True
    assert noted["body_bytes"] > 0 and len(noted["body_sha256"]) == 64
    assert KEY not in str(history)


async def test_a_notification_about_a_run_not_ours_is_200_and_writes_nothing(start, beacon):
    svc = await start()
    await running(svc, "j", run="r1")
    before = await tables(svc)
    response = await notify(svc, {"runs": ["elsewhere.1", "r1"], "what": "done"})
    assert response.status_code == 200, response.text
    assert response.json()["jobs"] == []
    assert "no job of this service started it" in response.json()["message"]
    assert await tables(svc) == before
    assert beacon.checked == []


async def test_what_a_plugin_says_a_notification_is_is_quoted_escaped(start, beacon):
    """A backend's `kind` is text from the sender's body: shown in the
    answer's message with its control characters as escapes."""
    svc = await start()
    await running(svc, "j", run="r1")
    response = await notify(svc, {"runs": ["elsewhere.1"], "what": "done\x1b[2J\nok"})
    assert response.status_code == 200, response.text
    assert response.json()["message"].startswith("done\\x1b[2J\\nok about")


async def test_a_burst_of_notifications_about_other_runs_costs_one_read_each(
    start, beacon, monkeypatch
):
    svc = await start(watchdog_interval=3600)  # the watchdog's own reads stay out of the count
    await running(svc, "j", run="r1")
    db = svc.tether.jobs.db
    statements: list[str] = []
    for name in ("fetch", "execute"):
        original = getattr(db, name)

        async def spy(sql: str, args: Any, original: Any = original) -> Any:
            statements.append(sql)
            return await original(sql, args)

        monkeypatch.setattr(db, name, spy)
    transaction, atomic = db.transaction, db.atomic

    def no_transaction() -> Any:
        statements.append("BEGIN")
        return transaction()

    async def no_atomic(body: Any) -> Any:  # its statements may not pass the spies
        statements.append("BEGIN")
        return await atomic(body)

    monkeypatch.setattr(db, "transaction", no_transaction)
    monkeypatch.setattr(db, "atomic", no_atomic)
    before = await tables(svc)
    statements.clear()

    for i in range(200):
        response = await notify(svc, {"runs": [str(5000 + i), f"{5000 + i}.1"], "what": "x"})
        assert response.status_code == 200
        assert response.json()["jobs"] == []

    lookups = [s for s in statements if "tether_run_keys" in s]
    assert len(lookups) == 200
    writes = [s for s in statements if not s.lstrip().upper().startswith("SELECT")]
    assert writes == []
    monkeypatch.undo()
    assert await tables(svc) == before
    if svc.tether.store.kind in ("sqlite", "memory"):  # the lookup is a key search, no scan
        plan = await db.fetch(f"EXPLAIN QUERY PLAN {lookups[0]}", ("beacon", "1", "2"))
        shown = " | ".join(str(row[-1]) for row in plan)
        assert "SCAN" not in shown, shown
        assert "PRIMARY KEY" in shown, shown


async def test_wrong_or_missing_credentials_are_401_and_recorded_nowhere(start, beacon):
    svc = await start()
    await running(svc, "j", run="r1")
    before = await tables(svc)
    for key in (None, "wrong"):
        response = await notify(svc, {"runs": ["r1.1"]}, key=key)
        assert response.status_code == 401, response.text
        assert response.json()["error"]["message"] == "missing or wrong X-Beacon-Key"
    assert await tables(svc) == before
    assert beacon.checked == []


async def test_the_endpoint_is_not_behind_the_api_token(start):
    svc = await start(api_token="api-token-0123456789abcdef")
    await svc.client.post(
        "/jobs",
        json={"id": "j", "backend": "beacon", "params": {"run": "r1"}},
        headers={"Authorization": "Bearer api-token-0123456789abcdef"},
    )
    response = await notify(svc, {"runs": ["r1.1"]})
    assert response.status_code == 200, response.text  # the plugin's own key suffices
    response = await notify(svc, {"runs": ["r1.1"]}, key=None)
    assert response.json()["error"]["message"] == "missing or wrong X-Beacon-Key"


async def test_malformed_json_is_400_and_a_body_the_backend_cannot_read_is_422(start):
    svc = await start()
    await running(svc, "j", run="r1")
    before = await tables(svc)
    response = await svc.client.post(
        "/backends/beacon/notifications",
        content=b'{"runs": [',
        headers={"X-Beacon-Key": KEY, "content-type": "application/json"},
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["details"] == {"field": "body"}
    assert "not valid JSON" in response.json()["error"]["message"]
    response = await notify(svc, {"run": "r1.1"})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["message"] == "invalid beacon notification: `runs` is missing"
    assert error["details"] == {"field": "body", "backend": "beacon"}
    assert await tables(svc) == before


async def test_an_unknown_backend_or_one_without_notifications_is_404_naming_it(start):
    svc = await start()
    response = await svc.client.post("/backends/nope/notifications", json={})
    assert response.status_code == 404
    message = response.json()["error"]["message"]
    assert "'nope'" in message and "beacon" in message and "plain" in message
    for body in (b"{}", b"not json"):
        response = await svc.client.post("/backends/plain/notifications", content=body)
        assert response.status_code == 404, response.text
        assert response.json()["error"]["message"].startswith(
            "backend 'plain' takes no notifications"
        )
        assert response.json()["error"]["details"] == {"backend": "plain"}


async def test_a_body_over_the_services_limit_is_413_before_the_backend_is_asked(start, beacon):
    svc = await start(max_body_bytes=1024)
    response = await notify(svc, {"runs": ["x" * 2000]})
    assert response.status_code == 413, response.text
    assert beacon.notices == []


@pytest.mark.parametrize("how", ["crash", "exit", "cancel"])
async def test_a_plugin_failing_is_500_without_its_message(start, how):
    """Its `sys.exit` too: it left the request's task and stopped the
    service (found by a review)."""
    svc = await start()
    response = await notify(svc, {how: True})
    assert response.status_code == 500
    assert KEY not in response.text
    assert (await svc.client.get("/health")).status_code == 200


async def test_a_notification_about_an_earlier_attempts_run_is_recorded_not_checked(start, beacon):
    svc = await start()
    await running(svc, "j", run="r1")
    beacon.said["r1.1"] = Outcome("failed", error=ErrorInfo(message="boom"))
    await notify(svc, {"runs": ["r1.1"], "what": "failed"})
    await svc.wait_state("j", "failed")
    assert (await svc.client.post("/jobs/j/retry")).status_code == 200
    await svc.wait_state("j", "running")
    checked = list(beacon.checked)

    response = await notify(svc, {"runs": ["r1.1"], "what": "late"})
    assert response.status_code == 200
    [told] = response.json()["jobs"]
    assert told["state"] == "running" and "not the job's current one" in told["message"]
    assert beacon.checked == checked
    last = (await events(svc, "j"))[-1]
    assert last["type"] == "notification" and last["attempt"] == 2
    assert last["data"]["current"] is False and last["data"]["keys"] == ["r1.1"]

    response = await notify(svc, {"runs": ["r1.2"], "what": "now"})
    assert response.json()["jobs"][0]["state"] == "running"
    assert beacon.checked == [*checked, "r1.2"]


@pytest.mark.parametrize(
    "fail", [True, SystemExit(3), asyncio.CancelledError()], ids=["raises", "exits", "cancels"]
)
async def test_hook_run_keys_failing_indexes_nothing_and_the_job_runs_on(start, beacon, fail):
    beacon.keys_fail = fail
    svc = await start()
    await running(svc, "j", run="r1")
    rows = await svc.tether.jobs.db.fetch("SELECT count(*) FROM tether_run_keys", ())
    assert rows[0][0] == 0
    response = await notify(svc, {"runs": ["r1.1"]})
    assert response.json()["jobs"] == []


async def test_run_keys_past_the_most_a_run_takes_are_cut_and_a_string_is_none(start, beacon):
    """100,000 keys made the write recording the run fail on every try (too
    many SQL variables), retried without end with the job pending; a string
    was indexed one key a character (found by a QA pass)."""
    svc = await start()
    count = "SELECT count(*) FROM tether_run_keys"
    beacon.keys = [f"k{n}" for n in range(100_000)]
    await running(svc, "many", run="r1")
    assert (await svc.tether.jobs.db.fetch(count, ()))[0][0] == MAX_RUN_KEYS
    assert (await notify(svc, {"runs": [f"k{MAX_RUN_KEYS - 1}"]})).json()["jobs"] != []
    assert (await notify(svc, {"runs": [f"k{MAX_RUN_KEYS}"]})).json()["jobs"] == []
    beacon.keys = "abc"
    await running(svc, "letters", run="r2")
    assert (await svc.tether.jobs.db.fetch(count, ()))[0][0] == MAX_RUN_KEYS
    assert (await notify(svc, {"runs": ["a"]})).json()["jobs"] == []


async def test_run_keys_go_with_their_job_when_it_is_deleted(start, beacon):
    svc = await start()
    await running(svc, "j", run="r1")
    beacon.said["r1.1"] = Outcome("succeeded")
    await notify(svc, {"runs": ["r1.1"]})
    await svc.wait_state("j", "succeeded")
    count = "SELECT count(*) FROM tether_run_keys"
    assert (await svc.tether.jobs.db.fetch(count, ()))[0][0] == 1
    assert await svc.tether.jobs.delete_finished(now_ms() + 1, 10) == ["j"]  # retention's own
    assert (await svc.tether.jobs.db.fetch(count, ()))[0][0] == 0


async def test_a_key_another_job_had_belongs_to_the_later_job(start, beacon):
    svc = await start()
    await running(svc, "a", run="same")
    await running(svc, "b", run="same")
    response = await notify(svc, {"runs": ["same.1"]})
    assert [j["id"] for j in response.json()["jobs"]] == ["b"]


def test_a_notice_never_shows_its_credentials():
    notice = Notice(
        headers={"authorization": "Basic dXNlcjpzM2NyZXQ=", "x-key": "s3cret"},
        query={"token": ["s3cret-token"]},
        body={"a": 1},
    )
    shown = repr(notice)
    assert "s3cret" not in shown and "dXNlcjpzM2NyZXQ" not in shown
    assert "authorization" in shown and "token" in shown
