"""The wire: reading request fields, and the JSON of records and responses.

Requests are read the way resonate.sql reads its ``jsonb`` argument, so a
caller gets the answer it would get there:

* :func:`text` is ``->>``: a missing key, or a field of a request part that is
  not an object, is None (SQL NULL); a string is itself; any other JSON value
  is its JSON text (``{"id": 7}`` names promise ``"7"``);
* :func:`bigint` / :func:`int4` are ``(... ->> key)::bigint`` / ``::int``: None
  stays None, an integer or a string of digits is a number, anything else is a
  400 (resonate.sql's cast error);
* a Value (``param``, ``value``, ``promiseParam``) is stored and answered as
  ``{"headers": <as sent, {} when absent>, "data": <text or null>}``.

Tags are the one stricter field: an object of strings, or 400 (resonate.sql
stores any JSON there).
"""

from __future__ import annotations

import re
from typing import Any, Final

import msgspec

from resonate_sqlite.schema import (
    CREATED_AT,
    ID,
    IS_TIMER,
    PARAM,
    S_CREATED_AT,
    S_CRON,
    S_ID,
    S_LAST_RUN_AT,
    S_NEXT_RUN_AT,
    S_PARAM,
    S_PROMISE_ID,
    S_TAGS,
    S_TIMEOUT,
    SETTLED_AT,
    STATE,
    T_PID,
    T_RESUMES,
    T_STATE,
    T_TTL,
    T_VERSION,
    TAGS,
    TIMEOUT_AT,
    VALUE,
    Row,
)

#: What a response's ``head.version`` is when the request carried none.
DEFAULT_VERSION: Final = "1"
#: The settle states a client may ask for; ``rejected_timedout`` is the timer's.
CLIENT_STATES: Final = frozenset({"resolved", "rejected", "rejected_canceled"})
#: A Value with nothing in it, as stored.
EMPTY_VALUE: Final = '{"headers":{},"data":null}'
I64_MIN: Final = -(1 << 63)
I64_MAX: Final = (1 << 63) - 1
I32_MIN: Final = -(1 << 31)
I32_MAX: Final = (1 << 31) - 1

STATUS_TEXT: Final = {
    400: "bad request",
    404: "not found",
    409: "conflict",
    422: "unprocessable entity",
    501: "not implemented",
}

_INT_TEXT = re.compile(r"[ \t\n\r\f\v]*[+-]?[0-9]+[ \t\n\r\f\v]*")

encode = msgspec.json.Encoder().encode
decode = msgspec.json.Decoder().decode


class Refusal(Exception):
    """A request refused before it changed anything: answered with ``status``
    and its transaction (or savepoint) rolled back, as resonate.sql rolls back
    a request whose casts fail."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


# -- reading requests -----------------------------------------------------------


def obj(value: Any) -> dict[str, Any]:
    """A request part as an object; anything else reads as having no fields."""
    return value if isinstance(value, dict) else {}


def _json_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is True:
        return "true"
    if value is False:
        return "false"
    return encode(value).decode()


def text(part: Any, key: str) -> str | None:
    """``part ->> key``."""
    if not isinstance(part, dict):
        return None
    value = part.get(key)
    return None if value is None else _json_text(value)


def _cast(part: Any, key: str, lo: int, hi: int) -> int | None:
    if not isinstance(part, dict):
        return None
    value = part.get(key)
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and _INT_TEXT.fullmatch(value):
        number = int(value)
    else:
        raise Refusal(400, f"{key} must be an integer, not {_json_text(value)!r}")
    if not lo <= number <= hi:
        raise Refusal(400, f"{key} out of range: {number}")
    return number


def bigint(part: Any, key: str) -> int | None:
    """``(part ->> key)::bigint``."""
    return _cast(part, key, I64_MIN, I64_MAX)


def int4(part: Any, key: str) -> int | None:
    """``(part ->> key)::int``."""
    return _cast(part, key, I32_MIN, I32_MAX)


def bigint_text(value: str, what: str) -> int:
    """``value::bigint`` for a text that is there."""
    number = _cast({what: value}, what, I64_MIN, I64_MAX)
    assert number is not None
    return number


def add(a: int, b: int) -> int:
    """``a + b`` in bigint: an overflow is resonate.sql's 400."""
    total = a + b
    if not I64_MIN <= total <= I64_MAX:
        raise Refusal(400, "bigint out of range")
    return total


def value_text(value: Any) -> str:
    """A Value as stored and answered: ``{"headers": ..., "data": text|null}``."""
    if not isinstance(value, dict):
        return EMPTY_VALUE
    data = value.get("data")
    return encode(
        {
            "headers": value.get("headers", {}),
            "data": None if data is None else _json_text(data),
        }
    ).decode()


def tags_of(part: Any, key: str = "tags") -> dict[str, str]:
    """The tags of a request part: an object of strings (absent or null: none)."""
    tags = obj(part).get(key)
    if tags is None:
        return {}
    if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
        raise Refusal(400, f"{key} must be an object of strings")
    return tags


def tags_text(tags: dict[str, str]) -> str:
    return encode(tags).decode() if tags else "{}"


def valid_address(address: str | None) -> bool:
    """A listener address someone can deliver to: ``http(s)://...``, or
    ``poll://...`` naming a group (``poll://uni@group/pid``, ``poll://any@group``)."""
    if address is None:
        return False
    if address.startswith(("http://", "https://")):
        return True
    return address.startswith("poll://") and "@" in address


# -- records --------------------------------------------------------------------


def timeout_state(row: Row) -> str:
    """What a promise becomes at its deadline: a timer resolves."""
    return "resolved" if row[IS_TIMER] else "rejected_timedout"


def live(row: Row, now: int) -> bool:
    """Pending and not past its deadline."""
    return bool(row[STATE] == "pending" and row[TIMEOUT_AT] > now)


def record(row: Row, now: int | None = None) -> dict[str, Any]:
    """The PromiseRecord of a row; with ``now``, a pending promise past its
    deadline reads as timed out (as resonate.sql's ``_promise_json``)."""
    state, settled_at = row[STATE], row[SETTLED_AT]
    if now is not None and state == "pending" and row[TIMEOUT_AT] <= now:
        state, settled_at = timeout_state(row), row[TIMEOUT_AT]
    return {
        "id": row[ID],
        "state": state,
        "param": msgspec.Raw(row[PARAM]),
        "value": msgspec.Raw(row[VALUE]),
        "tags": msgspec.Raw(row[TAGS]),
        "timeoutAt": row[TIMEOUT_AT],
        "createdAt": row[CREATED_AT],
        "settledAt": settled_at,
    }


def task_record(row: Row) -> dict[str, Any]:
    return {
        "id": row[ID],
        "state": row[T_STATE],
        "version": row[T_VERSION],
        "resumes": row[T_RESUMES] or 0,
        "ttl": row[T_TTL],
        "pid": row[T_PID],
    }


def schedule_record(row: tuple[Any, ...]) -> dict[str, Any]:
    return {
        "id": row[S_ID],
        "cron": row[S_CRON],
        "promiseId": row[S_PROMISE_ID],
        "promiseTimeout": row[S_TIMEOUT],
        "promiseParam": msgspec.Raw(row[S_PARAM]),
        "promiseTags": msgspec.Raw(row[S_TAGS]),
        "nextRunAt": row[S_NEXT_RUN_AT],
        "lastRunAt": row[S_LAST_RUN_AT],
        "createdAt": row[S_CREATED_AT],
    }


# -- messages and responses --------------------------------------------------------


def execute_body(task_id: str, version: int) -> str:
    return (
        '{"kind":"execute","head":{},"data":{"task":{"id":'
        f'{encode(task_id).decode()},"version":{int(version)}}}}}}}'
    )


def unblock_body(row: Row) -> str:
    return '{"kind":"unblock","head":{},"data":{"promise":' + encode(record(row)).decode() + "}}"


def error_data(status: int, reason: str) -> str:
    """The ``data`` of a refusal: resonate.sql's status text, then the reason."""
    return f"{STATUS_TEXT.get(status, 'error')}: {reason}"


def response(kind: str | None, corr: str | None, version: str, status: int, data: Any) -> bytes:
    return encode(
        {
            "kind": kind,
            "head": {"corrId": corr, "status": status, "version": version},
            "data": data,
        }
    )
