"""The engine refuses what resonate.sql refuses and answers as it answers.

One test per rule that a caller other than the SDK can see (the SDK never
sends most of these requests); ``test_differential.py`` checks the same
against resonate.sql itself when a Postgres is at hand. The last section pins
the differences that are deliberate (``resonate_sqlite/README.md``).
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.resonate_sqlite.protocol_server import (
    GROUP,
    HOUR,
    T0,
    Server,
    fence_create,
    root_tags,
    start,
    sub,
    suspend_on,
)


def fulfill(server: Server, tid: str, version: int, state: str) -> tuple[int, Any]:
    settle = {"id": tid, "state": state, "value": {"data": "MQ=="}}
    return server("task.fulfill", id=tid, version=version, action=sub("promise.settle", settle))


def fence_settle(server: Server, tid: str, version: int, pid: str, state: str) -> tuple[int, Any]:
    settle = {"id": pid, "state": state, "value": {}}
    return server("task.fence", id=tid, version=version, action=sub("promise.settle", settle))


def stored(server: Server, pid: str) -> dict[str, Any]:
    return server("promise.get", id=pid)[1]["promise"]  # type: ignore[no-any-return]


# -- envelopes --------------------------------------------------------------------------------


def test_the_envelope_echoes_kind_corr_id_and_version(server: Server) -> None:
    raw, _, _ = server.engine.handle('{"kind": "promise.get", "head": {"corrId": 7}, "data": {}}')
    assert raw == (
        b'{"kind":"promise.get","head":{"corrId":"7","status":404,"version":"1"},'
        b'"data":"not found: promise None not found"}'
    )
    raw, _, _ = server.engine.handle("[1, 2]")  # not an object: no kind
    assert raw.startswith(b'{"kind":null,"head":{"corrId":null,"status":501,"version":"1"}')


def test_a_missing_id_is_looked_up_and_not_found(server: Server) -> None:
    """resonate.sql looks up a NULL id and finds nothing."""
    assert server("promise.get")[0] == 404
    assert server("promise.settle", state="resolved")[0] == 404
    assert server("task.acquire", version=0, pid="p", ttl=1)[0] == 404
    assert server("promise.create", id=7, timeoutAt=str(T0 + HOUR))[0] == 200  # "->>" reads
    assert stored(server, "7")["timeoutAt"] == T0 + HOUR


# -- promise.settle / task.fulfill / task.fence: the timeout state is the server's ------------


def test_a_client_cannot_settle_as_timed_out(server: Server) -> None:
    server("promise.create", id="p", timeoutAt=T0 + HOUR)
    status, data = server("promise.settle", id="p", state="rejected_timedout", value={})
    assert (status, data) == (400, "bad request: invalid settle state: 'rejected_timedout'")
    assert stored(server, "p")["state"] == "pending"
    # the state is checked before the promise is looked up
    assert server("promise.settle", id="nope", state="pending", value={})[0] == 400

    start(server, "wf")
    assert fulfill(server, "wf", 1, "rejected_timedout")[0] == 400
    assert fulfill(server, "nope", 1, "rejected_timedout")[0] == 400  # before the 404
    assert stored(server, "wf")["state"] == "pending"


def test_a_fence_answers_200_carrying_its_inner_refusal(server: Server) -> None:
    start(server, "wf")
    status, data = fence_settle(server, "wf", 1, "missing", "resolved")
    assert status == 200
    assert data == {
        "action": {
            "kind": "promise.settle",
            "head": {"corrId": "c1", "status": 404, "version": "v"},
            "data": "not found: promise missing not found",
        },
        "preload": [],
    }
    fence_create(server, "wf", 1, "wf:1")
    status, data = fence_settle(server, "wf", 1, "wf:1", "rejected_timedout")
    assert (status, data["action"]["head"]["status"]) == (200, 400)
    assert stored(server, "wf:1")["state"] == "pending"
    # a fence acting on something else than promise.create settles (as resonate.sql)
    odd = sub("promise.frob", {"id": "wf:1", "state": "resolved", "value": {}})
    status, data = server("task.fence", id="wf", version=1, action=odd)
    assert (data["action"]["kind"], stored(server, "wf:1")["state"]) == (
        "promise.settle",
        "resolved",
    )
    # a cast that fails is the outer request's 400, and applies nothing
    bad = sub("promise.create", {"id": "wf:2", "timeoutAt": "later"})
    assert server("task.fence", id="wf", version=1, action=bad)[0] == 400


def test_a_fence_cannot_touch_its_own_promise(server: Server) -> None:
    start(server, "wf")
    assert fence_settle(server, "wf", 1, "wf", "resolved")[0] == 400
    own = sub("promise.create", {"id": "wf", "timeoutAt": T0 + HOUR})
    assert server("task.fence", id="wf", version=1, action=own)[0] == 400
    assert stored(server, "wf")["state"] == "pending"
    assert server("task.get", id="wf")[1]["task"]["state"] == "acquired"
    # checked before the task is looked up
    assert fence_settle(server, "ghost", 1, "ghost", "resolved")[0] == 400


# -- task.create needs a target ---------------------------------------------------------------


def test_task_create_needs_a_target_tag_pid_and_ttl(server: Server) -> None:
    create = {"id": "wf", "timeoutAt": T0 + HOUR, "tags": {"resonate:origin": "wf"}}
    status, data = server("task.create", pid="me", ttl=1000, action=sub("promise.create", create))
    assert (status, data) == (400, "bad request: task.create needs a resonate:target tag")
    assert server("promise.get", id="wf")[0] == 404
    create["tags"] = root_tags("wf")
    assert server("task.create", ttl=1000, action=sub("promise.create", create))[0] == 400
    assert server("task.create", pid="me", action=sub("promise.create", create))[0] == 400
    # and the task.create of a promise past its deadline: fulfilled, version 0
    create["timeoutAt"] = T0 - 1
    status, data = server("task.create", pid="me", ttl=1000, action=sub("promise.create", create))
    assert status == 200
    assert data["promise"]["state"] == "rejected_timedout"
    assert data["task"] == {
        "id": "wf",
        "state": "fulfilled",
        "version": 0,
        "resumes": 0,
        "ttl": None,
        "pid": None,
    }


def test_task_acquire_needs_pid_and_ttl_and_a_version(server: Server) -> None:
    server("promise.create", id="r", timeoutAt=T0 + HOUR, tags={"resonate:target": GROUP})
    assert server("task.acquire", id="r", version=0, ttl=1000)[0] == 400
    assert server("task.acquire", id="r", version=0, pid="me")[0] == 400
    assert server("task.acquire", id="r", pid="me", ttl=1000)[0] == 409  # no version
    assert server("task.acquire", id="r", version="0", pid="me", ttl=1000)[0] == 200


# -- task.suspend: what can be awaited --------------------------------------------------------


def test_suspend_refuses_malformed_awaits_before_looking_anything_up(server: Server) -> None:
    start(server, "wf")
    fence_create(server, "wf", 1, "wf:1")
    empty: list[Any] = []
    assert server("task.suspend", id="wf", version=1, actions=empty)[0] == 400
    assert server("task.suspend", id="wf", version=1)[0] == 400
    twice = [sub("promise.register_callback", {"awaited": "wf:1", "awaiter": "wf"})] * 2
    assert server("task.suspend", id="wf", version=1, actions=twice)[0] == 400
    assert server("task.suspend", id="ghost", version=1, actions=empty)[0] == 400
    assert server("task.get", id="wf")[1]["task"]["state"] == "acquired"
    assert suspend_on(server, "wf", 1, "wf:1") == (200, {"preload": []})


def test_resumes_count_the_awaited_promises_that_settled(server: Server) -> None:
    start(server, "wf")
    fence_create(server, "wf", 1, "wf:1")
    fence_create(server, "wf", 1, "wf:2")
    awaits = [
        sub("promise.register_callback", {"awaited": a, "awaiter": "wf"}) for a in ("wf:1", "wf:2")
    ]
    assert server("task.suspend", id="wf", version=1, actions=awaits)[0] == 200
    server("promise.settle", id="wf:1", state="resolved", value={})
    task = server("task.get", id="wf")[1]["task"]
    assert (task["state"], task["resumes"]) == ("pending", 1)
    server("promise.settle", id="wf:2", state="resolved", value={})
    assert server("task.get", id="wf")[1]["task"]["resumes"] == 2
    _, data = server("task.acquire", id="wf", version=1, pid="me", ttl=1000)
    assert data["task"]["resumes"] == 0


# -- listeners --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address", ["poll://uni@g/me", "poll://any@g", "http://example.test/x", "https://e.test/"]
)
def test_listener_addresses_someone_can_deliver_to(server: Server, address: str) -> None:
    server("promise.create", id="p", timeoutAt=T0 + HOUR)
    assert server("promise.register_listener", awaited="p", address=address)[0] == 200


@pytest.mark.parametrize("address", ["poll://g", "udp://x@y", "", None, 7])
def test_listener_addresses_no_one_can_deliver_to_are_refused(server: Server, address: Any) -> None:
    server("promise.create", id="p", timeoutAt=T0 + HOUR)
    assert server("promise.register_listener", awaited="p", address=address)[0] == 400
    assert server("promise.register_listener", awaited="nope", address=address)[0] == 400
    assert server.engine.db is not None
    assert server.engine.db.execute("SELECT count(*) FROM r_listeners").fetchone()[0] == 0


# -- reads do not move state; the timer does --------------------------------------------------


def test_a_read_past_the_deadline_projects_and_the_timer_applies(server: Server) -> None:
    start(server, "wf")
    fence_create(server, "wf", 1, "wf:1", timeout=1000)
    assert suspend_on(server, "wf", 1, "wf:1")[0] == 200
    server.take()
    server.clock.now += 1000  # no tick yet
    assert stored(server, "wf:1")["state"] == "rejected_timedout"
    assert stored(server, "wf:1")["settledAt"] == T0 + 1000
    # a settle now finds it timed out and changes nothing
    _, data = server("promise.settle", id="wf:1", state="resolved", value={})
    assert data["promise"]["state"] == "rejected_timedout"
    assert server("task.get", id="wf")[1]["task"]["state"] == "suspended"
    assert server.take() == []
    server.tick(0)  # the timer settles it for real, and resumes the awaiter
    assert server("task.get", id="wf")[1]["task"]["state"] == "pending"
    assert [m["kind"] for m in server.take()] == ["execute"]


def test_a_task_whose_promise_is_past_its_deadline_reads_fulfilled(server: Server) -> None:
    start(server, "wf")
    server.clock.now += HOUR
    assert server("task.get", id="wf")[1]["task"] == {
        "id": "wf",
        "state": "fulfilled",
        "version": 1,
        "resumes": 0,
        "ttl": None,
        "pid": None,
    }
    assert fence_create(server, "wf", 1, "wf:1")[0] == 409


# -- the deliberate differences (README) ------------------------------------------------------


def test_difference_an_internal_promise_times_out_at_its_deadline(server: Server) -> None:
    """resonate.sql leaves an internal promise pending (it only reads as timed
    out); here its timer settles it, and its listeners hear of it."""
    server("promise.create", id="step", timeoutAt=T0 + 1000, tags={"resonate:scope": "local"})
    server("promise.register_listener", awaited="step", address="poll://uni@g/other")
    server.tick(1000)
    assert server.engine.db is not None
    row = server.engine.db.execute("SELECT state FROM r_promises WHERE id = 'step'").fetchone()
    assert row == ("rejected_timedout",)
    [(address, body)] = server.outbox()
    assert address == "poll://uni@g/other"
    assert body["data"]["promise"]["state"] == "rejected_timedout"


def test_difference_an_internal_promise_may_be_awaited(server: Server) -> None:
    """resonate.sql answers 422 to awaiting a promise without an enforced
    timeout; here every promise has one."""
    start(server, "wf")
    step = sub("promise.create", {"id": "wf:1", "timeoutAt": T0 + HOUR, "tags": {}})
    server("task.fence", id="wf", version=1, action=step)
    assert suspend_on(server, "wf", 1, "wf:1") == (200, {"preload": []})
    call = {"awaited": "wf:1", "awaiter": "wf"}
    assert server("promise.register_callback", **call)[0] == 200


def test_difference_tags_are_an_object_of_strings(server: Server) -> None:
    assert server("promise.create", id="p", timeoutAt=T0 + HOUR, tags={"n": 1})[0] == 400
    assert server("promise.create", id="p", timeoutAt=T0 + HOUR, tags=["x"])[0] == 400
    _, data = server("promise.create", id="p", timeoutAt=T0 + HOUR, tags=None)
    assert data["promise"]["tags"] == {}


def test_difference_a_heartbeat_version_must_be_an_integer(server: Server) -> None:
    start(server, "wf")
    tasks = [{"id": "elsewhere", "version": "one"}]
    assert server("task.heartbeat", pid="me", tasks=tasks)[0] == 400
