"""Job requests in normal form: how a duplicate start is told from a
different request with the same id (reattach or 409 naming the fields)."""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any

import msgspec

from core.plugins import Plugins, stored_params
from core.store.jobs import JobRecord


def canonical(value: Any) -> bytes:
    """`value` as canonical JSON: what "the same" means when comparing requests."""
    return msgspec.json.encode(value, order="sorted")


class NormalRequest(msgspec.Struct, frozen=True, omit_defaults=True):
    """A job request with its defaults spelled out: the backend's params
    converted through its `params_type` and back, the timeout in effect.
    Two requests are the same when their normal forms are. Fields added
    later are left out of the fingerprint at their default, so a request
    without them keeps the fingerprint it had."""

    backend: str
    params: Any
    timeout: float
    metadata: dict[str, Any]
    heartbeat_timeout: float | None = None
    tags: tuple[str, ...] = ()
    """Sorted: the same tags in another order are the same request."""
    notify: str | None = None
    """The notification URL."""

    def fingerprint(self) -> str:
        return hashlib.sha256(canonical(self)).hexdigest()

    def differences(self, other: NormalRequest) -> list[str]:
        """The fields that differ, params by key (`params.url`)."""
        found = [
            name
            for name in ("backend", "timeout", "metadata", "heartbeat_timeout", "tags", "notify")
            if canonical(getattr(self, name)) != canonical(getattr(other, name))
        ]
        mine, theirs = self.params, other.params
        if canonical(mine) != canonical(theirs):
            same_kind = self.backend == other.backend
            if same_kind and isinstance(mine, dict) and isinstance(theirs, dict):
                found += [
                    f"params.{key}"
                    for key in sorted(mine.keys() | theirs.keys())
                    if key not in mine
                    or key not in theirs
                    or canonical(mine[key]) != canonical(theirs[key])
                ]
            else:
                found.append("params")
        order = ("backend", "params", "timeout", "metadata", "heartbeat_timeout", "tags", "notify")
        return sorted(found, key=lambda f: order.index(f.split(".")[0]))


def stored_request(plugins: Plugins, rec: JobRecord) -> NormalRequest:
    """A stored job's request in normal form; its params as stored when its
    backend is gone or no longer takes them."""
    params: Any = rec.params
    backend = plugins.backends.get(rec.backend)
    if backend is not None:
        with contextlib.suppress(msgspec.ValidationError):
            params = msgspec.to_builtins(stored_params(backend, rec.params))
    beat = None if rec.heartbeat_timeout is None else float(rec.heartbeat_timeout)
    return NormalRequest(
        rec.backend,
        params,
        float(rec.timeout),
        rec.metadata,
        beat,
        tuple(sorted(rec.tags)),
        rec.notify_url,
    )
