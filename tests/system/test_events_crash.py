"""Job history with real `tether serve` processes: SIGKILL between a change
and the step that made it loses and doubles nothing; a stream sees events
written by another worker process and by another service on the same store;
SIGTERM with an open stream still stops the service promptly."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from tests.api.test_events import answering
from tests.conftest import Hit, Receiver, wait_until
from tests.process import TetherProcess, wait_for

SSE = {"accept": "text/event-stream"}


def service(tmp_path: Path, port: int | None = None, args: tuple[str, ...] = ()) -> TetherProcess:
    env = {"TETHER_STORE": f"sqlite:///{tmp_path}/tether.db", "TETHER_TASK_TTL": "2"}
    return TetherProcess(tmp_path, env, port=port, args=args)


def start_job(client: httpx.Client, receiver: Receiver, job_id: str) -> None:
    body = {"id": job_id, "backend": "http_webhook", "params": {"url": receiver.url()}}
    response = client.post("/jobs", json=body)
    assert response.status_code == 201, response.text


def callback_url(receiver: Receiver, job_id: str) -> str:
    [url] = {h.body["callback_url"] for h in receiver.hits if h.body["job_id"] == job_id}
    return str(url)


def history(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = client.get(f"/jobs/{job_id}/events").json()["items"]
    return items


class Stream:
    """A server-sent-event stream read on a thread: the messages so far, and
    whether the server ended it."""

    def __init__(self, url: str, job_id: str, headers: dict[str, str] | None = None) -> None:
        self.messages: list[dict[str, Any]] = []
        self.ended = threading.Event()
        self.opened = threading.Event()
        self._args = (f"{url}/jobs/{job_id}/events", {**SSE, **(headers or {})})
        threading.Thread(target=self._read, daemon=True).start()
        assert self.opened.wait(10), "the stream did not open"

    def _read(self) -> None:
        url, headers = self._args
        message: dict[str, Any] = {}
        try:
            with httpx.stream("GET", url, headers=headers, timeout=60, trust_env=False) as r:
                self.opened.set()
                for line in r.iter_lines():
                    if not line:
                        if message:
                            self.messages.append(message)
                        message = {}
                        continue
                    field, _, value = line.partition(": ")
                    message[field or "comment"] = json.loads(value) if field == "data" else value
        except httpx.HTTPError:
            pass
        finally:
            self.opened.set()
            self.ended.set()

    def types(self) -> list[str]:
        """The events' types (not the stream's `end`)."""
        return [m["event"] for m in self.messages if m.get("event") not in (None, "end")]

    def said_end(self) -> bool:
        """The server ended the stream with its `end` (not by stopping)."""
        return bool(self.messages) and self.messages[-1].get("event") == "end"


def test_a_kill_inside_the_trigger_step_records_one_triggered_and_one_finished(tmp_path, receiver):
    """The receiver holds its answer to the first trigger while the service is
    killed; the restarted service replays the step: one `triggered`, one
    `finished`, seqs 1..n without gaps or repeats."""
    first_hit, release = threading.Event(), threading.Event()

    def respond(hit: Hit) -> tuple[int, Any]:
        if not first_hit.is_set():
            first_hit.set()
            release.wait(10)
        return 202, {"run": len(receiver.hits)}

    receiver.respond = respond
    first = service(tmp_path).start()
    with first.client() as client:
        start_job(client, receiver, "slow")
        assert first_hit.wait(10)
    first.kill()
    release.set()

    second = service(tmp_path, port=first.port).start()
    try:
        with second.client() as client:
            wait_for(client, "slow", "running", recorded=True, timeout=30)
            assert len(receiver.hits) == 2  # tried again, with the same key
            answer = httpx.post(
                callback_url(receiver, "slow"), json={"status": "succeeded"}, trust_env=False
            )
            assert answer.status_code == 200
            wait_for(client, "slow", "succeeded")
            items = wait_until(
                lambda: (h := history(client, "slow")) and h[-1]["type"] == "finished" and h,
                holds=1.0,
            )
    finally:
        second.kill()
    assert [e["seq"] for e in items] == list(range(1, len(items) + 1))
    assert [e["type"] for e in items] == ["accepted", "triggered", "callback", "finished"]


def test_streams_see_events_of_other_workers_and_other_services(tmp_path, receiver):
    """Two worker processes behind one port, and a second service on the same
    file: whichever process records an event, every open stream sends it."""
    workers = service(tmp_path, args=("--workers", "2")).start()
    other = service(tmp_path).start()
    try:
        with workers.client() as client:
            start_job(client, receiver, "shared")
            wait_for(client, "shared", "running", recorded=True)
        streams = [Stream(workers.url, "shared") for _ in range(4)]  # on both workers, likely
        streams.append(Stream(other.url, "shared"))
        wait_until(lambda: all(s.types() == ["accepted", "triggered"] for s in streams))
        # the other service settles it: its workflow step may run anywhere
        url = callback_url(receiver, "shared").replace(workers.url, other.url)
        assert httpx.post(url, json={"status": "failed"}, trust_env=False).status_code == 200
        for s in streams:
            assert s.ended.wait(10), s.messages
            assert s.said_end(), s.messages
            assert s.types() == ["accepted", "triggered", "callback", "finished"]
            assert [m["id"] for m in s.messages[:-1]] == ["1", "2", "3", "4"]
        # reconnecting where one left off: nothing missed, nothing twice
        again = Stream(other.url, "shared", {"last-event-id": "1"})
        assert again.ended.wait(10)
        assert [m.get("id") for m in again.messages] == ["2", "3", "4", None]  # then `end`
    finally:
        workers.kill()
        other.kill()


def test_streams_of_every_process_wait_for_what_is_filed_after_finished(tmp_path, receiver):
    """A canceled job whose backend refuses, late, to stop the run, and whose
    completion notification is answered late: every stream, on whichever
    process (the one running the job's workflow or not), sends `finished`,
    then `cancel_failed` and `notified` (filed by any process), then ends."""
    receiver.respond = answering(cancel=[(1.0, 400)], notify=[(1.5, 200)])
    workers = service(tmp_path, args=("--workers", "2")).start()
    other = service(tmp_path).start()
    try:
        with workers.client() as client:
            body = {
                "id": "late",
                "backend": "http_webhook",
                "params": {"url": receiver.url(), "cancel_url": receiver.url("/cancel")},
                "notify": {"url": receiver.url("/notify")},
            }
            assert client.post("/jobs", json=body).status_code == 201
            wait_for(client, "late", "running", recorded=True)
        streams = [Stream(workers.url, "late") for _ in range(4)]
        streams.append(Stream(other.url, "late"))
        wait_until(lambda: all(s.types() == ["accepted", "triggered"] for s in streams))
        with httpx.Client(base_url=other.url, trust_env=False) as client:
            assert client.post("/jobs/late/cancel", json={}).status_code == 200
            for s in streams:
                assert s.ended.wait(20), s.messages
                assert s.said_end(), s.messages
            items = history(client, "late")
        for s in streams:
            assert s.types()[:4] == ["accepted", "triggered", "cancel_requested", "finished"]
            assert sorted(s.types()[4:]) == ["cancel_failed", "notified"], s.types()
            assert [m["data"] for m in s.messages if "id" in m] == items  # all, then the end
    finally:
        workers.kill()
        other.kill()


def test_sigterm_with_an_open_stream_stops_the_service_promptly(tmp_path, receiver):
    served = service(tmp_path).start()
    with served.client() as client:
        start_job(client, receiver, "open")
        wait_for(client, "open", "running", recorded=True)
    stream = Stream(served.url, "open")
    wait_until(lambda: stream.types() == ["accepted", "triggered"])
    began = time.monotonic()
    served.terminate(wait=8)
    assert time.monotonic() - began < 5
    assert stream.ended.wait(5)
    assert not stream.said_end()  # stopped, not ended: a client reconnects
