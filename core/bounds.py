"""The bound on what a job keeps of its outcome (`TETHER_MAX_RESULT_BYTES`).

A result may come from anywhere: a callback body, a backend's status check (a
Databricks notebook's exit value is up to 5 MB per task), a plugin's own
reading of an answer. `Settler.settle` passes every outcome through
`bound_outcome` before anything is stored, so the callback promise and the job
index only ever hold a bounded one, whatever the backend.

A result whose JSON takes more than the bound is replaced by a marker that
says so and shows its beginning:

```json
{"truncated": true, "bytes": 5242880, "sha256": "9f86d0…", "preview": "{\"rows\": [[1, …"}
```

`bytes` and `sha256` are of the whole result's JSON (compact, as msgspec
writes it); `preview` is its first part: the text itself for a string result,
its JSON for anything else, cut on a character boundary so that the marker
fits the bound. A result that is already such a marker (a backend that got a
cut value, as Databricks' `truncated` output) keeps its keys and only has its
`preview` cut further. An `error.message` longer than the bound is cut too,
ending in `… (cut from N bytes)`. The same outcome always becomes the same
bounded outcome, so a repeated callback still compares as a duplicate.

Nothing Tether keeps is nested more than `MAX_DEPTH` levels deep: a request
body deeper is refused (`deeper_than`), and a result deeper, from wherever
it came (a backend's status check), is replaced by the marker, with
`"nested_deeper_than": 64` in it (`shallow`), before anything else reads it.

A run's `external` is bounded the same way, field by field, so that what
identifies the run (its id, the keys `cancel` and `check_status` read) stays
whole: `bound_external` cuts a trigger's receipt, `bound_change` the fields a
status check found changed (`Running.external`) before they are merged into
it. The fields that take the most are replaced by the marker first, each
marker at most `FIELD_BYTES` of JSON (and any field nested past `MAX_DEPTH`,
whatever its size), until the whole fits the bound:

```json
{"run_id": 42, "blob": {"truncated": true, "bytes": 20000002, "sha256": "…", "preview": "\"xxxx…"}}
```
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from core.models import ErrorInfo, Outcome

if TYPE_CHECKING:
    from core.store.jobs import JobRecord

log = logging.getLogger("tether")

MARK_ROOM = 512
"""Bytes left for the marker's own keys when its preview is first sized."""

MAX_DEPTH = 64
"""The most levels of arrays and objects a kept JSON value has. Deeper ones
broke what reads values recursively (the dashboard's JSON, the masking of
secrets) short of Python's recursion limit (found in an audit, 2026-12-04)."""

PREVIEW_BYTES = 1024
"""The preview a too-deep result's marker shows of its JSON."""

FIELD_BYTES = 1024
"""Bytes of JSON a field of a run's `external` takes at most once cut
(`bound_external`): its marker, with as much of a preview as fits."""


def deeper_than(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether `value` (JSON: dicts, lists, scalars) nests arrays and objects
    more than `limit` levels deep; found without recursion."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def shallow(outcome: Outcome) -> Outcome:
    """`outcome`, its result replaced by the marker when it is nested deeper
    than `MAX_DEPTH` (its `preview` the first `PREVIEW_BYTES` of its JSON)."""
    if not deeper_than(outcome.result):
        return outcome
    return Outcome(status=outcome.status, result=_deep_marker(outcome.result), error=outcome.error)


def _deep_marker(value: Any) -> dict[str, Any]:
    """The marker of a value nested deeper than `MAX_DEPTH`: its preview the
    first `PREVIEW_BYTES` of its JSON."""
    deep = {"nested_deeper_than": MAX_DEPTH}
    try:
        data = msgspec.json.encode(value)
    except (TypeError, OverflowError, RecursionError):  # too deep even to write out
        return {"truncated": True, **deep, "preview": ""}
    preview = data[:PREVIEW_BYTES].decode("utf-8", "ignore")
    return {**_marker(data), **deep, "preview": preview}


def _marker(data: bytes) -> dict[str, Any]:
    """The marker's keys for a result whose JSON is `data`, but its preview."""
    return {"truncated": True, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def bound_outcome(outcome: Outcome, limit: int | None) -> Outcome:
    """`outcome` with its result and error message within `limit` bytes
    (None: no bound)."""
    if limit is None:
        return outcome
    result = bound_result(outcome.result, limit)
    error = outcome.error
    if error is not None and len(error.message) > limit // 4:  # may pass: measure the bytes
        message = _cut_message(error.message, limit)
        if message is not error.message:
            error = ErrorInfo(message=message, type=error.type)
    if result is outcome.result and error is outcome.error:
        return outcome
    return Outcome(status=outcome.status, result=result, error=error)


def bound_result(value: Any, limit: int) -> Any:
    """`value` if its JSON takes at most `limit` bytes, else the marker that
    stands for it (see the module docstring)."""
    try:
        data = msgspec.json.encode(value)
    except (TypeError, OverflowError):  # not JSON at all: nothing of it can be kept
        data = repr(value).encode()
    if len(data) <= limit:
        return value
    if _is_marker(value):
        rest = {k: v for k, v in value.items() if k != "preview"}
        if len(msgspec.json.encode(rest)) <= limit - MARK_ROOM:
            return _fit(rest, value["preview"].encode(), limit)
    text = value.encode() if isinstance(value, str) else data
    return _fit(_marker(data), text, limit)


def _is_marker(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and value.get("truncated") is True
        and isinstance(value.get("preview"), str)
    )


def _fit(marker: dict[str, Any], text: bytes, limit: int) -> dict[str, Any]:
    """`marker` with as much of `text` as its `preview` as keeps it within
    `limit` bytes of JSON (escaping may make the preview longer than the text)."""
    room = max(limit - len(msgspec.json.encode(marker)) - MARK_ROOM // 4, 0)
    size = min(len(text), room)
    while True:
        preview = text[:size].decode("utf-8", "ignore")  # a cut character is dropped
        fitted = {**marker, "preview": preview}
        if size == 0 or len(msgspec.json.encode(fitted)) <= limit:
            return fitted
        size = size * 2 // 3


def _cut_message(message: str, limit: int) -> str:
    data = message.encode()
    if len(data) <= limit:
        return message
    tail = f"… (cut from {len(data)} bytes)"
    keep = data[: max(limit - len(tail.encode()), 0)].decode("utf-8", "ignore")
    return keep + tail


def bound_external(external: dict[str, Any], limit: int | None) -> tuple[dict[str, Any], list[str]]:
    """`external`, a run's receipt (what a backend's trigger returned, as
    JSON decodes it), within `limit` bytes of JSON (None: no bound) and
    `MAX_DEPTH` levels, and the names of the fields cut (none: `external`
    itself). Its largest fields become markers (see the module docstring),
    so the fields that name the run stay as the backend wrote them. Only
    when that is not enough (thousands of small fields, or a name itself
    too long) is the whole receipt the marker of its JSON: the backend's
    `cancel` and `check_status` then get that marker."""
    bounded, cut, size = _cut(external, list(external), limit)
    if limit is not None and size > limit:
        return bound_result(bounded, limit), sorted(map(str, external))
    return bounded, cut


def bound_change(
    changed: dict[str, Any], external: Mapping[str, Any] | None, limit: int | None
) -> tuple[dict[str, Any], list[str]]:
    """The fields a status check found changed in a run's `external`
    (`Running.external`), such that `external` (the job's, as read before the
    check) with them merged in stays within `limit` bytes of JSON and
    `MAX_DEPTH` levels: the largest of them become markers, as
    `bound_external` cuts a receipt; when that is not enough (the fields
    kept take the bound already), those `external` does not have yet are
    left out. Returns the fields to merge and the names of those cut or
    left out (none: `changed` itself). Fields that are not JSON are left as
    they are (the store refuses them, as before)."""
    merged = {**(external or {}), **changed}
    try:
        bounded, cut, size = _cut(merged, list(changed), limit)
    except (TypeError, OverflowError):
        return changed, []
    if not cut and (limit is None or size <= limit):
        return changed, []
    kept = {key: bounded[key] for key in changed}
    if limit is not None and size > limit:
        new = [key for key in changed if external is None or key not in external]
        for key in new:
            del kept[key]
        cut += [key for key in new if key not in cut]
    return kept, cut


def bound_learnt(
    rec: JobRecord, learnt: tuple[int, dict[str, Any]] | None, limit: int | None
) -> tuple[int, dict[str, Any]] | None:
    """`learnt` (`core.callbacks.learnt`: the attempt and the fields of
    `rec.external` a status check of `rec` found changed) bounded by
    `bound_change`, for `JobIndex.record`, without the fields whose (cut)
    value the job has already; a warning names the job, its backend and the
    fields cut or left out."""
    if learnt is None:
        return None
    attempt, changed = learnt
    kept, cut = bound_change(changed, rec.external, limit)
    before = rec.external or {}
    kept = {key: value for key, value in kept.items() if before.get(key, kept) != value}
    cut = [key for key in cut if key in kept or key not in before]
    if cut:  # said once for a run that reports the same large details at every check
        log.warning(
            "job %s: backend %r reported run details (Running.external) past the bound of"
            " %s bytes (TETHER_MAX_RESULT_BYTES); kept cut or left out: %s",
            rec.id,
            rec.backend,
            limit,
            ", ".join(map(str, cut)),
            extra=rec.log_extra(),
        )
    return (attempt, kept) if kept else None


def _cut(
    value: dict[str, Any], keys: Sequence[Any], limit: int | None
) -> tuple[dict[str, Any], list[Any], int]:
    """`value` with fields among `keys` replaced by their marker: each one
    nested deeper than `MAX_DEPTH` counting `value`'s own level, then the
    largest while `value`'s JSON takes more than `limit` bytes (a field no
    larger than its marker is never cut). Returns it, the names cut and
    the size of its JSON."""
    out, cut = dict(value), []
    for key in keys:
        if deeper_than(value[key], MAX_DEPTH - 1):
            out[key] = _deep_marker(value[key])
            cut.append(key)
    size = len(msgspec.json.encode(out))
    if limit is None or size <= limit:
        return out, cut, size
    sizes = [(len(msgspec.json.encode(out[key])), key) for key in keys if key not in cut]
    for was, key in sorted(sizes, key=lambda pair: pair[0], reverse=True):
        if size <= limit:
            break
        marker = bound_result(out[key], FIELD_BYTES)
        now = len(msgspec.json.encode(marker))
        if now >= was:  # the rest are no larger than a marker: nothing to gain
            break
        out[key] = marker
        cut.append(key)
        size -= was - now
    return out, cut, size
