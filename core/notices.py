"""Backend notifications: what an external system posts to `POST
/backends/{name}/notifications`, one endpoint per backend rather than a
callback URL per job (a Databricks workspace's notification destination).

```
request ─► the backend, by name (404 if none, or it takes no notifications)
        ─► the body decoded from JSON (400 if it is not)
        ─► backend.receive_notification(notice)   authenticates (401), reads (422)
        ─► NoticeAbout(keys, kind)
        ─► jobs_of_run_keys(backend, keys)        one indexed read; none: 200, no write
        ─► for each job: a `notification` event, then, if the key is its current
           run's, check_status at once: only what it says settles the job
```

The endpoint is not behind the API token: the backend authenticates each
request itself, from credentials its plugin is configured with. A request it
refuses is recorded nowhere (the access log has it). A notification about a
run no job of this service started (the external system's other runs notify
the same destination) costs one read and no write, so a burst of them is cheap.

The keys come from `Backend.run_keys`, asked right after each trigger
(`run_keys_of`), and are written with the job's `external` in one
transaction (`JobIndex.set_external`). A key of an earlier attempt's run
still finds the job, but it is only recorded: the job's current run is what
`check_status` reads.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from core.callbacks import Callbacks, decode_json
from core.errors import SHOWN_MAX, InvalidRequest, NotFound, Unauthorized, escaped, shown
from core.events import body_digest
from core.hookspecs import Backend
from core.models import JobState, Notice, NoticeAbout
from core.plugins import PLUGIN_FAULTS, Plugins, cancelling
from core.settle import store_call
from core.store.jobs import JobIndex, JobRecord, NewEvent, now_ms

log = logging.getLogger("tether")

MAX_KEYS = 16
"""Run keys one notification may name: more are cut (and logged)."""
MAX_KEY_LENGTH = 200
"""Characters a run key may have; a longer one is not indexed or looked up."""
MAX_RUN_KEYS = 64
"""Run keys one run may be indexed by (`run_keys`): the first are kept, the
rest logged. (Some 11,000 made the write that records the run fail on every
try, and the trigger's step tried it again without end; found by a QA pass.)"""
NOTICE_TIMEOUT = 10.0
"""Seconds a backend's `receive_notification` may take."""


class NoticeJob(msgspec.Struct, frozen=True):
    """What a notification did to one job it concerned."""

    id: str
    state: JobState
    """The job's state after the status check the notification caused."""
    message: str


class NoticeResult(msgspec.Struct, frozen=True):
    """The answer to a backend notification: the jobs it concerned (none for
    a run this service did not start) and what happened, in words."""

    jobs: list[NoticeJob]
    message: str


def takes_notifications(backend: Backend) -> bool:
    """Whether the backend implements `receive_notification`."""
    return type(backend).receive_notification is not Backend.receive_notification


def _usable(keys: Sequence[Any]) -> list[str]:
    return [k for k in dict.fromkeys(keys) if isinstance(k, str) and 0 < len(k) <= MAX_KEY_LENGTH]


def run_keys_of(backend: Backend, external: Mapping[str, Any] | None) -> list[str]:
    """The backend's `run_keys` of a run (none for a job not triggered):
    strings of 1 to `MAX_KEY_LENGTH` characters, each once, the first
    `MAX_RUN_KEYS` of them. A backend that fails, or answers a string (which
    would be read as one key a character), is logged and gives none: a key
    index never fails a trigger."""
    if external is None:
        return []
    try:
        answer = backend.run_keys(external)
        if isinstance(answer, str | bytes):
            raise TypeError("a string, not a list of keys")
        keys = list(answer)
    except PLUGIN_FAULTS as exc:
        log.warning("backend %s: run_keys failed: %s", backend.name, type(exc).__name__)
        return []
    usable = _usable(keys)
    if len(usable) < len(keys):
        log.warning(
            "backend %s: run_keys gave %d key(s) that are not strings of 1 to %d characters"
            " (or repeated); they are not indexed",
            backend.name,
            len(keys) - len(usable),
            MAX_KEY_LENGTH,
        )
    if len(usable) > MAX_RUN_KEYS:
        log.warning(
            "backend %s: run_keys gave %d keys; the first %d are indexed",
            backend.name,
            len(usable),
            MAX_RUN_KEYS,
        )
    return usable[:MAX_RUN_KEYS]


class Notices:
    def __init__(self, plugins: Plugins, jobs: JobIndex, callbacks: Callbacks) -> None:
        self.plugins = plugins
        self.jobs = jobs
        self.callbacks = callbacks

    async def take(
        self,
        name: str,
        headers: Mapping[str, str],
        query: Mapping[str, list[str]],
        body: bytes,
    ) -> NoticeResult:
        """Take a notification for backend `name` (see the module docstring)."""
        backend = self.plugins.backends.get(name)
        if backend is None:
            installed = ", ".join(sorted(self.plugins.backends)) or "(none installed)"
            raise NotFound(
                f"no backend {shown(name)}; installed backends: {installed}",
                {"backend": name[:SHOWN_MAX]},
            )
        if not takes_notifications(backend):
            raise NotFound(
                f"backend {shown(name)} takes no notifications (its plugin does not implement"
                " receive_notification)",
                {"backend": name},
            )
        decoded = decode_json("notification", body, empty=None)
        notice = Notice(headers=dict(headers), query=dict(query), body=decoded, raw=body)
        about = await self._ask(backend, notice)
        keys = _usable(about.keys)
        if len(keys) > MAX_KEYS:
            log.warning(
                "backend %s: a notification named %d run keys; only the first %d are looked up",
                name,
                len(keys),
                MAX_KEYS,
            )
            keys = keys[:MAX_KEYS]
        found = await store_call(self.jobs.jobs_of_run_keys(name, keys))
        if not found:
            runs = ", ".join(keys) if keys else "no run"
            return NoticeResult(
                [],
                f"{escaped(about.kind) or 'notification'} about {runs}: no job of this service"
                " started it; nothing changed",
            )
        matched: dict[str, tuple[JobRecord, list[str]]] = {}
        for key, rec in found:
            matched.setdefault(rec.id, (rec, []))[1].append(key)
        digest = body_digest(body)
        told = [
            await self._tell(backend, rec, sorted(ks), about, digest)
            for rec, ks in matched.values()
        ]
        return NoticeResult(
            told, f"{escaped(about.kind) or 'notification'} noted for {len(told)} job(s)"
        )

    async def _ask(self, backend: Backend, notice: Notice) -> NoticeAbout:
        """The backend's reading of the notice; its refusals as Tether's errors."""
        name = backend.name
        try:
            about = await asyncio.wait_for(backend.receive_notification(notice), NOTICE_TIMEOUT)
        except (Unauthorized, NotFound):
            raise
        except ValueError as exc:
            raise InvalidRequest(
                f"invalid {name} notification: {exc}", {"field": "body", "backend": name}
            ) from None
        except PLUGIN_FAULTS as exc:  # a bug or a stall
            if isinstance(exc, asyncio.CancelledError) and cancelling():
                raise  # the request's own
            # no message: it may quote secrets
            log.warning("backend %s: receive_notification failed: %s", name, type(exc).__name__)
            raise RuntimeError(
                f"backend {name!r} could not read a notification ({type(exc).__name__})"
            ) from None
        if about is None:
            raise NotFound(f"backend {shown(name)} takes no notifications", {"backend": name})
        if not isinstance(about, NoticeAbout):
            raise RuntimeError(
                f"backend {name!r}: receive_notification returned {type(about).__name__},"
                " not NoticeAbout"
            )
        return about

    async def _tell(
        self,
        backend: Backend,
        rec: JobRecord,
        keys: list[str],
        about: NoticeAbout,
        digest: dict[str, Any],
    ) -> NoticeJob:
        """Record the notification on one of its jobs; if it is about the
        job's current run, ask the backend at once (as a callback's hint does)."""
        current = not set(keys).isdisjoint(run_keys_of(backend, rec.external))
        data = {"kind": about.kind, "keys": keys, "current": current, **digest}
        await store_call(self.jobs.record(rec.id, [NewEvent("notification", data)], now_ms()))
        if not current:
            return NoticeJob(
                rec.id,
                rec.state,
                "about a run that is not the job's current one; recorded, nothing checked",
            )
        checked = await self.callbacks.check_now(rec, about.kind)
        state = rec.state if checked.job is None else checked.job.state  # (always a job)
        return NoticeJob(rec.id, state, checked.message)
