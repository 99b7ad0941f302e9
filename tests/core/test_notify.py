"""Completion notifications (`core/notify.py`) on the service in this process,
over real HTTP: jobs of the `http_webhook` backend end, and a receiver of our
own on 127.0.0.1 (`NotifyReceiver`) takes the signed `job.finished` POSTs.
Each signature is checked by `verify`, written here from the Standard
Webhooks spec (hmac and base64), not with the library the service signs with.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import msgspec
import pytest

from core.errors import StoreConfigError
from core.models import Outcome, url_fault
from core.notify import MAX_BACKOFF, Notifier, backoff, failure
from core.settings import Settings
from core.store import open_store
from core.store.base import check_notify_secret, new_notify_secret
from core.store.embedded import notify_secret_path
from core.store.jobs import JobIndex, JobRecord, Notification, now_ms
from core.views import finished_message, origin, view
from tests.conftest import POLL, Receiver, Service, eventually
from tests.core.parts import logs_of, open_parts
from tests.core.store.test_index_writes import job

ROOT = Path(__file__).resolve().parents[2]
SECRET = "whsec_" + base64.b64encode(b"a test key of the notifications!").decode()
TOKEN = "T0KEN-in-the-path"
"""Part of every notify URL's path here: it must never be shown or logged."""


# ── a notification receiver, and the signature checked by hand ────────────────


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes
    path: str
    status: int
    at: float = field(default_factory=time.monotonic)

    @property
    def message(self) -> Any:
        return json.loads(self.body)


@dataclass
class NotifyReceiver:
    """A real HTTP server on 127.0.0.1 keeping each POST whole (raw body and
    headers). `answers` is consumed one status per request; once empty,
    `then` answers."""

    answers: list[int] = field(default_factory=list)
    then: int = 200
    retry_after: str | None = None  # sent with each 429 and 503
    got: list[Delivery] = field(default_factory=list)
    port: int = 0
    server: ThreadingHTTPServer | None = None

    def url(self, path: str = f"/hooks/{TOKEN}?key=q-{TOKEN}") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def accepted(self) -> list[Delivery]:
        return [d for d in self.got if 200 <= d.status < 300]

    def start(self, port: int = 0) -> NotifyReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                status = receiver.answers.pop(0) if receiver.answers else receiver.then
                headers = {k.lower(): v for k, v in self.headers.items()}
                receiver.got.append(Delivery(headers, body, self.path, status))
                self.send_response(status)
                if status in (429, 503) and receiver.retry_after is not None:
                    self.send_header("retry-after", receiver.retry_after)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", port or self.port), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, args=(POLL,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


@pytest.fixture
def notified() -> Iterator[NotifyReceiver]:
    receiver = NotifyReceiver().start()
    yield receiver
    receiver.stop()


def verify(secret: str, delivery: Delivery) -> None:
    """The Standard Webhooks signature, by hand: base64 of HMAC-SHA256 under
    the secret's key over `id.timestamp.body`, one of the `v1,` signatures of
    the header, and a timestamp within five minutes."""
    headers = delivery.headers
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + delivery.body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    signatures = [s.partition(",") for s in headers["webhook-signature"].split(" ")]
    assert ("v1", ",", expected) in signatures, headers["webhook-signature"]
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 300
    assert headers["content-type"] == "application/json"


# ── helpers ───────────────────────────────────────────────────────────────────


async def serve(start_service: Callable[..., Any], **settings: Any) -> Service:
    settings.setdefault("notify_secret", SECRET)
    settings.setdefault("notify_backoff", 0.1)
    svc: Service = await start_service(**settings)
    return svc


async def canceled_job(
    svc: Service, backend: Receiver, job_id: str, notify: str, **extra: Any
) -> dict[str, Any]:
    """A job of `http_webhook` with `notify`, canceled once running."""
    body = {
        "id": job_id,
        "backend": "http_webhook",
        "params": {"url": backend.url()},
        "notify": {"url": notify},
        **extra,
    }
    answer = await svc.client.post("/jobs", json=body)
    assert answer.status_code == 201, answer.text
    await svc.wait_state(job_id, "running")
    canceled = await svc.client.post(f"/jobs/{job_id}/cancel", json={"reason": "test"})
    assert canceled.status_code == 200, canceled.text
    return canceled.json()  # type: ignore[no-any-return]


async def events(svc: Service, job_id: str, *types: str) -> list[dict[str, Any]]:
    page = (await svc.client.get(f"/jobs/{job_id}/events", params={"limit": 1000})).json()
    return [e for e in page["items"] if not types or e["type"] in types]


async def until_events(
    svc: Service, job_id: str, kind: str, count: int, timeout: float = 10
) -> list[dict[str, Any]]:
    async def enough() -> list[dict[str, Any]] | None:
        found = await events(svc, job_id, kind)
        return found if len(found) >= count else None

    found: list[dict[str, Any]] = await eventually(enough, timeout)
    return found


# ── delivery ──────────────────────────────────────────────────────────────────


async def test_a_receiver_failing_twice_then_accepting_gets_three_tries_of_one_message(
    start_service, receiver, notified
):
    svc = await serve(start_service)
    notified.answers = [500, 500]
    await canceled_job(svc, receiver, "n1", notified.url())
    tries = await until_events(svc, "n1", "notified", 3)
    assert [(t["data"]["try"], t["data"]["status"]) for t in tries] == [
        (1, 500),
        (2, 500),
        (3, 200),
    ]
    assert [t["data"].get("error") for t in tries] == ["answered 500", "answered 500", None]
    assert [t["attempt"] for t in tries] == [1, 1, 1]
    ids = {t["data"]["webhook_id"] for t in tries}
    assert len(ids) == 1 and ids.pop().startswith("msg_")
    await eventually(lambda: len(notified.got) == 3, holds=0.5)  # and nothing after
    assert [d.status for d in notified.got] == [500, 500, 200]
    assert {d.headers["webhook-id"] for d in notified.got} == {tries[0]["data"]["webhook_id"]}
    assert {d.body for d in notified.got} == {notified.got[0].body}  # the body as stored
    for delivery in notified.got:
        verify(SECRET, delivery)
        assert delivery.path == f"/hooks/{TOKEN}?key=q-{TOKEN}"
    first, second = notified.got[0].at, notified.got[1].at
    assert second - first >= 0.09  # notify_backoff apart
    message = notified.got[-1].message
    job = await svc.job("n1")
    assert message["type"] == "job.finished"
    assert message["job"] == {**job, "updated_at": message["job"]["updated_at"]}
    assert message["job"]["state"] == "canceled"
    assert message["job"]["notify"] == {"origin": notified.origin}
    finished = await events(svc, "n1", "finished")
    assert finished[0]["seq"] < tries[0]["seq"]


async def test_a_throttled_receiver_is_tried_again_no_sooner_than_it_asked(
    start_service, receiver, notified
):
    """429 with `Retry-After: 1.5` while the backoff is 0.1 s: the next try
    waits the 1.5 s asked (tries came at the backoff's pace, whatever the
    receiver said: a QA pass, 2026-12-07); a 500's plain backoff is kept."""
    svc = await serve(start_service)
    notified.answers, notified.retry_after = [429, 500], "1.5"
    await canceled_job(svc, receiver, "n-throttled", notified.url())
    tries = await until_events(svc, "n-throttled", "notified", 3)
    assert [t["data"]["status"] for t in tries] == [429, 500, 200]
    first, second, third = (d.at for d in notified.got[:3])
    assert second - first >= 1.5
    assert third - second < 1.5  # 0.2 s: the backoff after the second try


async def test_a_receiver_that_asked_to_wait_is_sent_no_other_notification_meanwhile(
    start_service, receiver, notified
):
    """A 429 asking 1.5 s for one job's notification: another job's, due
    meanwhile at the same receiver (another path), waits too (it was sent at
    once: a review, 2026-12-07); a receiver elsewhere is not held up."""
    svc = await serve(start_service)
    notified.answers, notified.retry_after = [429], "1.5"
    elsewhere = NotifyReceiver().start()
    try:
        await canceled_job(svc, receiver, "n-asked", notified.url())
        await eventually(lambda: notified.got)
        await canceled_job(svc, receiver, "n-same-site", notified.url("/other"))
        await canceled_job(svc, receiver, "n-other-site", elsewhere.url())
        await until_events(svc, "n-same-site", "notified", 1)
        await until_events(svc, "n-asked", "notified", 2)
        asked_at = notified.got[0].at
        same_site = [d for d in notified.got if d.path == "/other"]
        assert len(same_site) == 1 and same_site[0].status == 200
        assert same_site[0].at - asked_at >= 1.5
        assert elsewhere.got[0].at - asked_at < 1.5
    finally:
        elsewhere.stop()


async def test_a_notification_is_signed_with_the_stores_own_secret_when_none_is_set(
    start_service, receiver, notified, tmp_path
):
    # only the embedded store keeps a secret of its own (Postgres and a
    # Resonate server need TETHER_NOTIFY_SECRET)
    svc = await serve(start_service, notify_secret="", store=f"sqlite:///{tmp_path}/own.db")
    secret = svc.tether.store.notify_secret
    assert secret.startswith("whsec_") and secret != SECRET
    check_notify_secret(secret)
    await canceled_job(svc, receiver, "own", notified.url())
    await eventually(lambda: notified.accepted())
    verify(secret, notified.got[0])
    with pytest.raises(AssertionError):
        verify(SECRET, notified.got[0])  # the check can fail


async def test_several_notifications_are_delivered_at_once(start_service, receiver, notified):
    """Five receivers' answers held back together: the deliveries overlap."""
    svc = await serve(start_service)
    gate = threading.Event()
    inside: list[int] = []
    handler = notified.server.RequestHandlerClass  # type: ignore[union-attr]
    plain = handler.do_POST

    def held(self: Any) -> None:
        inside.append(1)
        gate.wait(5)
        plain(self)

    handler.do_POST = held
    for n in range(5):
        await canceled_job(svc, receiver, f"many-{n}", notified.url())
    await eventually(lambda: len(inside) == 5, timeout=10)
    gate.set()
    await eventually(lambda: len(notified.accepted()) == 5)
    assert len({d.headers["webhook-id"] for d in notified.got}) == 5


async def test_a_retried_job_notifies_again_for_each_attempt_with_a_new_webhook_id(
    start_service, receiver, notified
):
    svc = await serve(start_service)
    await canceled_job(svc, receiver, "again", notified.url())
    await eventually(lambda: len(notified.accepted()) == 1)
    assert (await svc.client.post("/jobs/again/retry")).status_code == 200
    await svc.wait_state("again", "running")
    assert (await svc.client.post("/jobs/again/cancel")).status_code == 200
    await eventually(lambda: len(notified.accepted()) == 2, holds=0.3)
    one, two = notified.got
    assert one.headers["webhook-id"] != two.headers["webhook-id"]
    assert (one.message["job"]["attempt"], two.message["job"]["attempt"]) == (1, 2)
    tries = await until_events(svc, "again", "notified", 2)
    assert [(t["attempt"], t["data"]["webhook_id"]) for t in tries] == [
        (1, one.headers["webhook-id"]),
        (2, two.headers["webhook-id"]),
    ]


async def test_a_notification_delivered_after_a_retry_is_filed_under_its_own_attempt(
    start_service, receiver, notified
):
    svc = await serve(start_service, notify_backoff=1.0)
    notified.answers = [503]
    await canceled_job(svc, receiver, "late", notified.url())
    await until_events(svc, "late", "notified", 1)
    assert (await svc.client.post("/jobs/late/retry")).status_code == 200  # before the 2nd try
    tries = await until_events(svc, "late", "notified", 2)
    assert [(t["attempt"], t["data"]["status"]) for t in tries] == [(1, 503), (1, 200)]
    (retried,) = await events(svc, "late", "retried")
    assert tries[0]["seq"] < retried["seq"] < tries[1]["seq"]  # delivered during attempt 2
    assert notified.accepted()[0].message["job"]["attempt"] == 1
    assert (await svc.job("late"))["attempt"] == 2


async def test_running_out_of_the_retry_window_gives_up_with_notify_failed(
    start_service, receiver, notified
):
    # tries at about 0, 0.05, 0.15, 0.35 and 0.75 s after the first: three with
    # room to spare on a loaded machine (in a window of 0.5 s the first try
    # once came late enough that only two fitted)
    svc = await serve(start_service, notify_retry_for=1.5, notify_backoff=0.05)
    notified.then = 502
    await canceled_job(svc, receiver, "gone", notified.url())
    given_up = await until_events(svc, "gone", "notify_failed", 1)
    tries = await events(svc, "gone", "notified")
    assert len(tries) >= 3 and all(t["data"]["status"] == 502 for t in tries)
    assert given_up[0]["data"] == {
        "webhook_id": tries[0]["data"]["webhook_id"],
        "tries": len(tries),
        "error": "answered 502",
    }
    assert given_up[0]["seq"] == tries[-1]["seq"] + 1
    count = len(notified.got)
    await eventually(lambda: len(notified.got) == count, holds=0.5)  # out of the outbox
    assert len(notified.got) == len(tries)
    assert await svc.tether.jobs.next_notification_at() is None
    assert (await svc.job("gone"))["state"] == "canceled"  # nothing else changed


async def test_a_receiver_that_is_down_is_retried_and_the_error_names_no_url(
    start_service, receiver, notified, caplog
):
    caplog.set_level(logging.INFO, logger="tether")
    svc = await serve(start_service, notify_backoff=0.2)
    url = notified.url()
    notified.stop()  # nothing listens there now
    await canceled_job(svc, receiver, "down", url)
    tries = await until_events(svc, "down", "notified", 2)
    assert tries[0]["data"]["status"] is None
    assert tries[0]["data"]["error"] == "ClientConnectorError: connection refused"
    notified.start(notified.port)
    tries = await until_events(svc, "down", "notified", len(tries) + 1)
    assert tries[-1]["data"]["status"] == 200 and len(notified.got) == 1
    verify(SECRET, notified.got[0])
    shown = json.dumps([await svc.job("down"), await events(svc, "down")])
    listed = (await svc.client.get("/jobs")).text
    assert TOKEN not in shown + listed + caplog.text
    assert notified.origin in caplog.text  # the logs name where it went, by origin


async def test_the_job_shows_only_the_notify_urls_origin(start_service, receiver, notified):
    svc = await serve(start_service)
    url = f"https://User.Example.com:8443/{TOKEN}/x?token={TOKEN}#frag"
    body = {"id": "shown", "backend": "http_webhook", "params": {"url": receiver.url()}}
    answer = await svc.client.post("/jobs", json={**body, "notify": {"url": url}})
    assert answer.status_code == 201, answer.text
    assert answer.json()["notify"] == {"origin": "https://user.example.com:8443"}
    again = await svc.client.post("/jobs", json={**body, "notify": {"url": url}})
    assert again.status_code == 200  # the same request: reattached
    other = await svc.client.post("/jobs", json={**body, "notify": {"url": url + "2"}})
    assert other.status_code == 409 and TOKEN not in other.text
    assert TOKEN not in json.dumps([await svc.job("shown"), await events(svc, "shown")])


BAD_URLS = (
    "https://user:s3cret@hooks.example.com/x",
    "https://s3cret@hooks.example.com/x",
    "ftp://hooks.example.com/x",
    "https://hooks.example.com/a b",
    " https://hooks.example.com/x",
    "hooks.example.com/x",
    "https://",
    "http://[::1::]:18513/x",  # bracketed, but not an IP address: Python's parser refuses it
    "http://[1:2:3]/hook",
    "http://[:]/x",
    "http://hooks.example.com:99999/x",  # no request can be sent to these
    "http://bücher.example/x",
    "http://a%41.example/x",
)


async def test_a_bad_notify_url_is_400_and_creates_nothing(start_service, receiver):
    svc = await serve(start_service)
    body = {"id": "bad", "backend": "http_webhook", "params": {"url": receiver.url()}}
    for url in BAD_URLS:
        answer = await svc.client.post("/jobs", json={**body, "notify": {"url": url}})
        assert answer.status_code == 400, (url, answer.text)
        assert "notify" in json.dumps(answer.json()["error"]), url
        assert "s3cret" not in answer.text  # the credential is never echoed
    assert (await svc.client.get("/jobs/bad")).status_code == 404
    assert (await svc.client.get("/jobs")).json()["items"] == []


async def test_a_service_without_a_notification_secret_refuses_jobs_asking_for_one(
    start_service, receiver, notified
):
    """As on Postgres without TETHER_NOTIFY_SECRET: 422 naming the setting,
    nothing created; jobs without `notify` go on."""
    svc = await serve(start_service)
    svc.tether.store.notify_secrets = ()
    body = {"id": "refused", "backend": "http_webhook", "params": {"url": receiver.url()}}
    answer = await svc.client.post("/jobs", json={**body, "notify": {"url": notified.url()}})
    assert answer.status_code == 422, answer.text
    assert "TETHER_NOTIFY_SECRET" in answer.json()["error"]["message"]
    assert answer.json()["error"]["details"] == {"field": "notify.url"}
    assert (await svc.client.get("/jobs/refused")).status_code == 404
    assert (await svc.client.post("/jobs", json=body)).status_code == 201


def doc_examples() -> dict[str, Any]:
    """The Python examples of docs/lifecycle.md's "Verifying a message", run."""
    text = (ROOT / "docs" / "lifecycle.md").read_text()
    section = text.split("### Verifying a message", 1)[1].split("\n### ", 1)[0]
    names: dict[str, Any] = {}
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    for block in blocks:
        exec(compile(block, "docs/lifecycle.md", "exec"), names)
    return names


async def test_the_docs_verification_examples_accept_a_real_message_and_refuse_a_forged_one(
    start_service, receiver, notified
):
    examples = doc_examples()
    svc = await serve(start_service)
    await canceled_job(svc, receiver, "docs", notified.url())
    await eventually(lambda: notified.accepted())
    delivery = notified.got[0]
    for check in (examples["verified"], examples["verified_by_hand"]):
        message = check(SECRET, delivery.headers, delivery.body)
        assert message == delivery.message and message["job"]["id"] == "docs"
        assert SECRET.endswith("=")  # Tether takes the secret without its padding too
        assert check(SECRET.rstrip("="), delivery.headers, delivery.body) == message
        forged = delivery.body.replace(b'"canceled"', b'"succeeded"')
        assert forged != delivery.body and check(SECRET, delivery.headers, forged) is None
        assert check(new_notify_secret(), delivery.headers, delivery.body) is None
        stale = {**delivery.headers, "webhook-timestamp": str(int(time.time()) - 600)}
        assert check(SECRET, stale, delivery.body) is None


async def ended_with_a_notification(jobs: JobIndex, notified: NotifyReceiver) -> int:
    """Job `n`, ended now with a notification to `notified` in the outbox:
    when it ended."""
    jobs.message = lambda rec: "{}"
    at = now_ms()
    await jobs.insert(msgspec.structs.replace(job("n", at=at), notify_url=notified.url()))
    await jobs.end("n", Outcome(status="canceled"), at)
    return at


async def claim(jobs: JobIndex, until: int) -> Notification:
    """The notification due by `until`, claimed until then, as a try holds it."""
    [note] = await jobs.notifications_due(until, 10)
    assert await jobs.claim_notification(note, until)
    return msgspec.structs.replace(note, due_at=until, tries=note.tries + 1)


async def two_claims_in_turn(
    notified: NotifyReceiver,
) -> AsyncIterator[tuple[JobIndex, Notifier, Notification, Notifier, Notification]]:
    """A job's notification, claimed by one process, whose claim then ran
    out and was claimed by a second; each process with its claimed copy, at
    the end of the retry window (`notify_retry_for` 0: a failed try gives up)."""
    async with open_parts(notify_retry_for=0.0) as parts:
        jobs = parts.jobs
        at = await ended_with_a_notification(jobs, notified)
        first, second = (Notifier(parts.settings, jobs, [SECRET]) for _ in range(2))
        # far off: their loops leave it be; the second due once the first claim ran out
        claimed = [await claim(jobs, until) for until in (at + 600_000, at + 1_200_000)]
        first.start()
        second.start()
        try:
            yield jobs, first, claimed[0], second, claimed[1]
        finally:
            await first.stop()
            await second.stop()


@pytest.mark.parametrize(
    ("asked", "waits"),
    [(None, 5.0), (1.0, 5.0), (30.0, 30.0), (86_400.0, MAX_BACKOFF)],
)
async def test_a_throttled_try_waits_what_was_asked_past_the_backoff_at_most_an_hour(
    notified, asked: float | None, waits: float
):
    """The next try after a 429 or 503: the backoff (5 s after the first), or
    the `Retry-After` asked when longer, never past `MAX_BACKOFF` (a day
    asked: an hour; the retry window is a day)."""
    async with open_parts(notify_retry_for=86_400.0) as parts:
        jobs = parts.jobs
        note = await claim(jobs, await ended_with_a_notification(jobs, notified) + 60_000)
        before = now_ms()
        await Notifier(parts.settings, jobs, [SECRET])._tried(note, 429, "answered 429", asked)
        due = await jobs.next_notification_at()
    assert due is not None
    assert before + waits * 1000 <= due <= now_ms() + waits * 1000


async def test_a_notification_delivered_by_a_lost_claim_is_not_given_up_by_a_failed_try(notified):
    """One process delivered the notification, but recorded it after its
    claim ran out; a second process's try, failing at the end of the window,
    is recorded after that. The notification stays delivered: the second
    try is filed as a failed try, not given up (no `notify_failed`, which
    `tether_notifications_failed_total` counts)."""
    notified.answers = [200, 503]
    async with contextlib.asynccontextmanager(two_claims_in_turn)(notified) as (
        jobs,
        first,
        delivered,
        second,
        failing,
    ):
        assert await first.post(delivered) == (200, None, None)
        assert await second.post(failing) == (503, "answered 503", None)
        await first._tried(delivered, 200, None)
        with logs_of("tether.notify") as logs:
            await second._tried(failing, 503, "answered 503")
        _, history, _ = await jobs.history("n", 0, 10)
        assert await jobs.next_notification_at() is None  # delivered: out of the outbox
    assert [(e.type, e.data.get("try"), e.data.get("status")) for e in history] == [
        ("finished", None, None),
        ("notified", 1, 200),
        ("notified", 2, 503),
    ]
    assert logs.lines == [
        f"WARNING job n: notification {delivered.id} to {notified.origin} failed (try 2:"
        " answered 503); its claim ran out meanwhile, so another process has it (or"
        " delivered it)"
    ]


async def test_a_failed_try_whose_claim_was_taken_over_leaves_the_notification_to_the_holder(
    notified,
):
    """A failed try recorded after its claim ran out and another process
    claimed the notification: neither given up nor rescheduled (the holder
    records its own outcome); the holder's failure gives it up, once."""
    async with contextlib.asynccontextmanager(two_claims_in_turn)(notified) as (
        jobs,
        first,
        lost,
        second,
        held,
    ):
        assert await jobs.next_notification_at() == held.due_at
        assert not await jobs.notification_tried(lost, lost.due_at + 5_000, [], now_ms())
        await first._tried(lost, 503, "answered 503")
        assert await jobs.next_notification_at() == held.due_at  # still the holder's
        await second._tried(held, 502, "answered 502")
        _, history, _ = await jobs.history("n", 0, 10)
        assert await jobs.next_notification_at() is None
    assert [(e.type, e.data.get("tries") or e.data.get("try")) for e in history] == [
        ("finished", None),
        ("notified", 1),
        ("notified", 2),
        ("notify_failed", 2),
    ]


# ── the secret ────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("s3cr3t-value", "does not start with whsec_"),
        ("whsec_s3cr3t-value_", "is not whsec_ followed by base64"),
        ("whsec_short", "is whsec_ and 5 base64 characters, which make no whole bytes"),
        ("whsec_" + base64.b64encode(b"short").decode(), "holds 5 bytes, not 24 to 64"),
        ("whsec_" + base64.b64encode(bytes(65)).decode(), "holds 65 bytes, not 24 to 64"),
    ],
)
async def test_a_malformed_notification_secret_stops_the_store_opening_unshown(
    tmp_path, value, problem
):
    settings = Settings.from_env({}, store=f"sqlite:///{tmp_path}/t.db", notify_secret=value)
    with pytest.raises(StoreConfigError) as refused:
        await open_store(settings, "p")
    assert f"TETHER_NOTIFY_SECRET {problem}" in str(refused.value)
    assert value.removeprefix("whsec_") not in str(refused.value)
    assert not (tmp_path / "t.db").exists()  # refused before anything was made


async def test_the_embedded_store_keeps_one_notification_secret_beside_its_database(tmp_path):
    settings = Settings.from_env({}, store=f"sqlite:///{tmp_path}/t.db")
    first = await open_store(settings, "p1")
    second = await open_store(settings, "p2")
    try:
        path = notify_secret_path(tmp_path / "t.db")
        assert path == tmp_path / "t.db.notify-secret"
        assert first.notify_secret == second.notify_secret == path.read_text().strip()
        assert path.stat().st_mode & 0o777 == 0o600
        assert first.notify_secret != first.callback_secret
        assert not list(tmp_path.glob(".secret-*"))  # no temporary file left
    finally:
        await first.close()
        await second.close()
    configured = Settings.from_env({}, store=settings.store, notify_secret=SECRET)
    third = await open_store(configured, "p3")
    try:
        assert third.notify_secret == SECRET  # the setting wins over the file
    finally:
        await third.close()


async def test_a_damaged_notification_secret_file_is_named_not_shown(tmp_path):
    path = notify_secret_path(tmp_path / "t.db")
    path.write_text("whsec_not base64!\n")
    with pytest.raises(StoreConfigError) as refused:
        await open_store(Settings.from_env({}, store=f"sqlite:///{tmp_path}/t.db"), "p")
    assert f"the notification secret file {path} is not whsec_" in str(refused.value)
    assert "not base64!" not in str(refused.value)


def test_new_secrets_are_standard_webhooks_secrets_and_differ():
    made = {new_notify_secret() for _ in range(3)}
    assert len(made) == 3
    for secret in made:
        assert check_notify_secret(secret) == secret
        assert len(base64.b64decode(secret.removeprefix("whsec_"))) == 32


# ── backoff and errors ────────────────────────────────────────────────────────


def test_backoff_doubles_from_the_setting_up_to_an_hour():
    settings = Settings.from_env({}, notify_backoff=5)
    assert [backoff(settings, n) for n in (1, 2, 3, 4)] == [5, 10, 20, 40]
    assert backoff(settings, 11) == 3600 and backoff(settings, 40) == 3600
    # from the 1,025th try an int's power made no float: OverflowError, and
    # each later try went unrecorded (a QA pass, 2026-12-07)
    assert backoff(settings, 1025) == 3600 and backoff(settings, 10**9) == 3600
    tiny = Settings.from_env({}, notify_backoff=1e-300)  # doubling to past a float's range
    assert backoff(tiny, 1) == 1e-300 and backoff(tiny, 2000) == 3600


def test_a_failure_is_said_without_the_exceptions_text():
    try:
        raise ConnectionRefusedError(111, f"Connect call failed /hooks/{TOKEN}")
    except OSError as exc:
        said = failure(exc)
    assert said == "ConnectionRefusedError: connection refused"
    assert failure(TimeoutError()) == "timed out after 10s"
    assert failure(ValueError(f"bad /hooks/{TOKEN}")) == "ValueError"


def test_a_notify_url_whose_host_cannot_be_read_is_shown_without_failing():
    # A row an earlier release accepted: the job's view (its page, the list,
    # its notification) must not fail on it, nor show its path or query.
    assert origin("http://[::1::]:18513/x?tok=SECRET") == "http://(unreadable host)"
    assert origin("HTTPS://[::1]:8443/x?tok=SECRET") == "https://[::1]:8443"
    assert not url_fault("http://[::1]:8443/x") and url_fault("http://[1:2:3]/x")


def test_a_job_winding_up_says_so_and_its_notification_shows_it_as_it_ended():
    """`winding_up` says what an ended job's row holds still to do; the
    notification, written in the same transaction as the end (with the
    stop due, for a job no workflow finishes), is the job as it ended."""
    base = JobRecord(
        id="w", backend="http_webhook", state="canceled", params={}, metadata={}, timeout=60.0,
        fingerprint="f", deadline=2_000, created_at=1_000, updated_at=1_500,
        notify_url="https://hooks.example/x", stop_due=9_000,
    )  # fmt: skip
    ran = msgspec.structs.replace(base, external={"run": 1})
    assert (view(base).winding_up, view(ran).winding_up) == ("late_trigger_call", "stopping_run")
    stopped = msgspec.structs.replace(ran, stop_due=None)
    running = msgspec.structs.replace(ran, state="running")
    earlier = msgspec.structs.replace(ran, attempt=2, stop_attempt=1)  # a mixed release's retry
    assert [view(r).winding_up for r in (stopped, running, earlier)] == [None, None, None]
    message = json.loads(finished_message(ran))
    assert message["job"]["winding_up"] is None
    assert message["job"]["state"] == "canceled"
