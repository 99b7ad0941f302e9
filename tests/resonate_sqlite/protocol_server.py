"""Speaking JSON to an :class:`~resonate_sqlite.engine.Engine` on a controlled
clock, for the protocol tests: timers fire exactly when a test moves the clock."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from resonate_sqlite.engine import Engine

GROUP = "poll://any@g"
ME = "poll://uni@g/me"
OTHER = "poll://uni@g/other"
T0 = 1_700_000_000_000
HOUR = 3_600_000


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


class Server:
    """An engine plus helpers to speak JSON to it."""

    def __init__(self, path: Path, *, local: set[str] | None = None) -> None:
        self.clock = Clock()
        self.engine = Engine(path, clock=self.clock, local_addresses=local)
        self.engine.open(timeout=1)
        self.pushed: list[dict[str, Any]] = []

    def __call__(self, kind: str, **data: Any) -> tuple[int, Any]:
        req = json.dumps({"kind": kind, "head": {"corrId": "c1", "version": "v"}, "data": data})
        raw, out, _ = self.engine.handle(req)
        resp = json.loads(raw)
        assert resp["kind"] == kind
        assert resp["head"]["corrId"] == "c1"
        self.pushed += [json.loads(m) for m in out]
        return resp["head"]["status"], resp["data"]

    def tick(self, ms: int) -> None:
        self.clock.now += ms
        _, out = self.engine.fire(*self.engine.due(100))
        self.pushed += [json.loads(m) for m in out]

    def outbox(self) -> list[tuple[str, dict[str, Any]]]:
        assert self.engine.db is not None
        rows = self.engine.db.execute("SELECT address, body FROM r_outbox ORDER BY seq")
        return [(a, json.loads(b)) for a, b in rows]

    def take(self) -> list[dict[str, Any]]:
        pushed, self.pushed = self.pushed, []
        return pushed


def sub(kind: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"kind": kind, "head": {"corrId": "s", "version": "v"}, "data": data}


def root_tags(pid: str) -> dict[str, str]:
    return {
        "resonate:origin": pid,
        "resonate:branch": pid,
        "resonate:parent": pid,
        "resonate:scope": "global",
        "resonate:target": GROUP,
    }


def external_tags(pid: str, root: str) -> dict[str, str]:
    return {"resonate:scope": "global", "resonate:origin": root, "resonate:external": "true"}


def start(server: Server, root: str, *, ttl: int = 10_000) -> None:
    """task.create a workflow root, acquired by pid 'me' at version 1."""
    status, data = server(
        "task.create",
        pid="me",
        ttl=ttl,
        action=sub(
            "promise.create",
            {
                "id": root,
                "timeoutAt": T0 + HOUR,
                "param": {"data": "e30="},
                "tags": root_tags(root),
            },
        ),
    )
    assert status == 200
    assert data["task"] == {
        "id": root,
        "state": "acquired",
        "version": 1,
        "resumes": 0,
        "pid": "me",
        "ttl": ttl,
    }


def fence_create(server: Server, root: str, version: int, pid: str, timeout: int = HOUR) -> Any:
    return server(
        "task.fence",
        id=root,
        version=version,
        action=sub(
            "promise.create",
            {"id": pid, "timeoutAt": server.clock.now + timeout, "tags": external_tags(pid, root)},
        ),
    )


def suspend_on(server: Server, root: str, version: int, awaited: str) -> Any:
    return server(
        "task.suspend",
        id=root,
        version=version,
        actions=[sub("promise.register_callback", {"awaited": awaited, "awaiter": root})],
    )
