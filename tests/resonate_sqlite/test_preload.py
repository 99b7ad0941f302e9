"""The ``preload`` of a task's answers: the promises of the task's branch,
and the bare promises its branch promise made.

The protocol (and the Resonate server, and resonate-sdk's in-process server):
task.create and task.acquire when they acquire, and task.suspend's 300, carry
every promise whose ``resonate:branch`` tag is the task promise's, the task's
own left out, as promise.get reads them. resonate-sdk caches them by id, so a
body replayed after a resume does not ask again for the steps it already ran.
Here, also the branch promise's children without a ``resonate:target``
(``ctx.promise``, each a branch of its own, so the protocol's
rule leaves them out, and a replayed body would fence them again: a job's
callback promise). Bounded (``PRELOAD_MAX`` promises, ``PRELOAD_BYTES``
characters) and only among the ids under the branch; a fence carries none
(as resonate.sql).
"""

from __future__ import annotations

import json
from typing import Any

from resonate.connections.local import ServerState

from resonate_sqlite import transitions
from tests.resonate_sqlite.protocol_server import (
    GROUP,
    HOUR,
    T0,
    Server,
    root_tags,
    start,
    sub,
    suspend_on,
)


def step_tags(branch: str, parent: str, origin: str) -> dict[str, str]:
    """A ``ctx.run`` step's tags: the branch of the task that runs it."""
    return {
        "resonate:scope": "local",
        "resonate:branch": branch,
        "resonate:parent": parent,
        "resonate:origin": origin,
    }


def own_branch_tags(pid: str, parent: str, origin: str, **extra: str) -> dict[str, str]:
    """``ctx.promise``/``ctx.rpc``/``ctx.detached``: a branch of its own."""
    return {
        "resonate:scope": "global",
        "resonate:branch": pid,
        "resonate:parent": parent,
        "resonate:origin": origin,
        **extra,
    }


def fence(server: Server, task: str, version: int, pid: str, tags: dict[str, str]) -> Any:
    action = sub("promise.create", {"id": pid, "timeoutAt": T0 + HOUR, "param": {}, "tags": tags})
    status, data = server("task.fence", id=task, version=version, action=action)
    assert (status, data["action"]["head"]["status"]) == (200, 200)
    return data


def fence_settle(server: Server, task: str, version: int, pid: str, data: str) -> None:
    action = sub("promise.settle", {"id": pid, "state": "resolved", "value": {"data": data}})
    status, answer = server("task.fence", id=task, version=version, action=action)
    assert (status, answer["action"]["head"]["status"]) == (200, 200)


def ids(preload: list[dict[str, Any]]) -> list[str]:
    return [p["id"] for p in preload]


def workflow(server: Server, root: str = "wf") -> None:
    """A Tether job's first run: the callback promise (its own branch), the
    trigger step (the root's branch, settled), suspended on the callback; and
    what a richer workflow adds: a pending step, an rpc child with a step of
    its own, a detached child, a timer."""
    start(server, root)
    fence(
        server,
        root,
        1,
        f"{root}:1",
        own_branch_tags(f"{root}:1", root, root, **{"resonate:external": "true"}),
    )
    fence(server, root, 1, f"{root}:2", step_tags(root, root, root))
    fence_settle(server, root, 1, f"{root}:2", "Mg==")
    fence(server, root, 1, f"{root}:3", step_tags(root, root, root))  # still running
    rpc = own_branch_tags(f"{root}:4", root, root, **{"resonate:target": GROUP})
    fence(server, root, 1, f"{root}:4", rpc)
    server(
        "promise.create",
        id=f"{root}:4.1",
        timeoutAt=T0 + HOUR,
        tags=step_tags(f"{root}:4", f"{root}:4", root),
    )
    det = own_branch_tags(f"{root}:d1", root, root, **{"resonate:target": GROUP})
    fence(server, root, 1, f"{root}:d1", det)
    # a ctx.sleep timer: resonate-sdk gives it a target, so it is no bare child
    timer = {"resonate:target": GROUP, "resonate:timer": "true"}
    fence(server, root, 1, f"{root}:5", own_branch_tags(f"{root}:5", root, root, **timer))


def test_acquire_preloads_the_promises_of_the_task_branch_only(server: Server) -> None:
    workflow(server)
    start(server, "wf1")  # a neighbouring root and its step: not in wf's branch
    fence(server, "wf1", 1, "wf1:1", step_tags("wf1", "wf1", "wf1"))
    assert suspend_on(server, "wf", 1, "wf:1") == (200, {"preload": []})
    server("promise.settle", id="wf:1", state="resolved", value={"data": "e30="})
    status, data = server("task.acquire", id="wf", version=1, pid="me", ttl=1000)
    assert status == 200
    # the settled callback promise (a bare child), the settled and the running
    # step (the branch); not the rpc child, its step, the detached child or
    # the timer (each has a target), nor the neighbour's
    assert ids(data["preload"]) == ["wf:1", "wf:2", "wf:3"]
    callback, step, running = data["preload"]
    # as promise.get reads them
    assert callback == server("promise.get", id="wf:1")[1]["promise"]
    assert (callback["state"], callback["value"]["data"]) == ("resolved", "e30=")
    assert step == server("promise.get", id="wf:2")[1]["promise"]
    assert (step["state"], step["value"]["data"]) == ("resolved", "Mg==")
    assert running["state"] == "pending"
    # the rpc child's task preloads its own branch: its step, not its parent's
    status, data = server("task.acquire", id="wf:4", version=0, pid="me", ttl=1000)
    assert (status, ids(data["preload"])) == (200, ["wf:4.1"])


def test_create_preloads_when_it_acquires_and_a_fulfilled_task_has_none(server: Server) -> None:
    server("promise.create", id="wf", timeoutAt=T0 + HOUR, tags=root_tags("wf"))
    server("promise.create", id="wf:2", timeoutAt=T0 + HOUR, tags=step_tags("wf", "wf", "wf"))
    action = sub("promise.create", {"id": "wf", "timeoutAt": T0 + HOUR, "tags": root_tags("wf")})
    status, data = server("task.create", pid="me", ttl=1000, action=action)
    assert (status, data["task"]["state"], ids(data["preload"])) == (200, "acquired", ["wf:2"])
    server(
        "task.fulfill",
        id="wf",
        version=1,
        action=sub("promise.settle", {"id": "wf", "state": "resolved", "value": {}}),
    )
    status, data = server("task.create", pid="me", ttl=1000, action=action)
    assert (status, data["task"]["state"], data["preload"]) == (200, "fulfilled", [])


def test_a_redirected_suspend_preloads_and_a_fence_does_not(server: Server) -> None:
    start(server, "wf")
    fence(server, "wf", 1, "wf:1", own_branch_tags("wf:1", "wf", "wf"))
    data = fence(server, "wf", 1, "wf:2", step_tags("wf", "wf", "wf"))
    assert data["preload"] == []
    fence_settle(server, "wf", 1, "wf:2", "Mg==")
    server("promise.settle", id="wf:1", state="resolved", value={})
    status, data = suspend_on(server, "wf", 1, "wf:1")
    assert (status, ids(data["preload"])) == (300, ["wf:1", "wf:2"])
    assert [p["state"] for p in data["preload"]] == ["resolved", "resolved"]


def test_no_branch_tag_or_an_empty_one_preloads_nothing(server: Server) -> None:
    for root, branch in (("a", None), ("b", "")):
        tags = {"resonate:target": GROUP} | ({} if branch is None else {"resonate:branch": ""})
        action = sub("promise.create", {"id": root, "timeoutAt": T0 + HOUR, "tags": tags})
        server("task.create", pid="me", ttl=1000, action=action)
        fence(server, root, 1, f"{root}:1", {"resonate:branch": "" if branch is not None else root})
        fence(server, root, 1, f"{root}:2", {})
        server("task.release", id=root, version=1)
        status, data = server("task.acquire", id=root, version=1, pid="me", ttl=1000)
        assert (status, data["preload"]) == (200, [])


def test_the_preload_is_bounded(server: Server, monkeypatch: Any) -> None:
    monkeypatch.setattr(transitions, "PRELOAD_MAX", 3)
    monkeypatch.setattr(transitions, "PRELOAD_BYTES", 2_000)
    start(server, "wf")
    for i in range(1, 6):
        fence(server, "wf", 1, f"wf:{i}", step_tags("wf", "wf", "wf"))
    server("task.release", id="wf", version=1)
    status, data = server("task.acquire", id="wf", version=1, pid="me", ttl=1000)
    assert (status, ids(data["preload"])) == (200, ["wf:1", "wf:2", "wf:3"])  # the first by id
    fence_settle(server, "wf", 2, "wf:2", "x" * 2_000)  # bigger than the whole budget
    server("task.release", id="wf", version=2)
    status, data = server("task.acquire", id="wf", version=2, pid="me", ttl=1000)
    assert (status, ids(data["preload"])) == (200, ["wf:1", "wf:3"])


# -- the same as resonate-sdk's in-process server ----------------------------------------


class Both:
    """The engine and resonate-sdk's ServerState, asked the same."""

    def __init__(self, server: Server) -> None:
        self.server, self.state = server, ServerState()
        self.compared = 0
        self.bare: list[str] = []
        self.offset: dict[str, int] = {}

    def __call__(self, kind: str, **data: Any) -> tuple[int, Any]:
        status, answer = self.server(kind, **data)
        flat = json.loads(json.dumps({"kind": kind, "corrId": "c1", **data}))
        if "version" in flat:  # (its tasks count versions from 0 where ours count from 1)
            flat["version"] -= self.offset.get(flat["id"], 0)
        theirs = self.state.apply(self.server.clock.now, flat)
        if status == 200 and "task" in theirs:
            task = theirs["task"]
            self.offset[task["id"]] = answer["task"]["version"] - task["version"]
        # (its success codes differ: 201 for a creation)
        assert theirs["status"] // 100 == status // 100, (kind, data, theirs, answer)
        # where the Resonate server preloads (ServerState also preloads a
        # fence's answer and a fulfilled task.create's)
        acquired = kind == "task.acquire" or (
            kind == "task.create" and answer["task"]["state"] == "acquired"
        )
        if status < 400 and (acquired or kind == "task.suspend"):
            task_id = data["id"] if kind != "task.create" else data["action"]["data"]["id"]
            # ours adds the task's bare children (its own branch's rule: theirs)
            bare = [p for p in answer["preload"] if _bare_child(p, task_id)]
            mine = sorted((p["id"], p["state"]) for p in answer["preload"] if p not in bare)
            ref = sorted((p["id"], p["state"]) for p in theirs.get("preload", []))
            assert mine == ref, (kind, data)
            self.bare += [p["id"] for p in bare]
            self.compared += 1
        return status, answer


def _bare_child(p: dict[str, Any], task_id: str) -> bool:
    tags = p["tags"]
    return bool(
        tags.get("resonate:branch") != task_id
        and tags.get("resonate:parent") == task_id
        and "resonate:target" not in tags
    )


def test_the_preload_is_the_sdk_servers(server: Server) -> None:
    """The same as the SDK's server, but for the bare children ours adds."""
    both = Both(server)
    workflow(both)  # type: ignore[arg-type]
    assert suspend_on(both, "wf", 1, "wf:1")[0] == 200  # type: ignore[arg-type]
    both("promise.settle", id="wf:1", state="resolved", value={"data": "e30="})
    assert both("task.acquire", id="wf", version=1, pid="me", ttl=1000)[0] == 200
    assert both("task.acquire", id="wf:4", version=0, pid="me", ttl=1000)[0] == 200
    assert both.compared == 4  # task.create, task.suspend, 2 task.acquire
    assert both.bare == ["wf:1"]  # the settled callback promise, in wf's acquire


def test_a_task_in_another_branch_preloads_that_branch_by_id(server: Server) -> None:
    """A task whose branch is not itself (the protocol allows it; the SDK's
    tasks are their own branch): the branch promise too, sorted by id."""
    server("promise.create", id="b", timeoutAt=T0 + HOUR, tags=step_tags("b", "b", "b"))
    server("promise.create", id="b:1", timeoutAt=T0 + HOUR, tags=step_tags("b", "b", "b"))
    server("promise.create", id="b.2", timeoutAt=T0 + HOUR, tags=step_tags("b", "b", "b"))
    tags = step_tags("b", "b", "b") | {"resonate:target": GROUP}
    action = sub("promise.create", {"id": "b:9", "timeoutAt": T0 + HOUR, "tags": tags})
    status, data = server("task.create", pid="me", ttl=1000, action=action)
    assert (status, ids(data["preload"])) == (200, ["b", "b.2", "b:1"])
