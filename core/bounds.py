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
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

from core.models import ErrorInfo, Outcome

MARK_ROOM = 512
"""Bytes left for the marker's own keys when its preview is first sized."""

MAX_DEPTH = 64
"""The most levels of arrays and objects a kept JSON value has. Deeper ones
broke what reads values recursively (the dashboard's JSON, the masking of
secrets) short of Python's recursion limit (found in an audit, 2026-12-04)."""

PREVIEW_BYTES = 1024
"""The preview a too-deep result's marker shows of its JSON."""


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
    deep = {"nested_deeper_than": MAX_DEPTH}
    try:
        data = msgspec.json.encode(outcome.result)
    except (TypeError, OverflowError, RecursionError):  # too deep even to write out
        result = {"truncated": True, **deep, "preview": ""}
    else:
        preview = data[:PREVIEW_BYTES].decode("utf-8", "ignore")
        result = {**_marker(data), **deep, "preview": preview}
    return Outcome(status=outcome.status, result=result, error=outcome.error)


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
