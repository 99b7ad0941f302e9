"""Databricks job notifications at `POST /backends/databricks/notifications`.

A workspace admin creates a notification destination once (a webhook with
this URL, optionally with basic auth) and jobs name it in their
`webhook_notifications`; Databricks then POSTs, for each run event:

```json
{"event_type": "jobs.on_success", "workspace_id": "123", "run": {"run_id": "456"},
 "job": {"job_id": "789", "name": "nightly"}}
```

A task-level notification adds `"task": {"task_key": ...}` and its `run` is
`{"run_id": <task run>, "parent_run_id": <job run>}`. Ids come as numbers or
strings. The body carries no job parameters and no signature: it only names a
run, which Tether maps to its job through the run ids indexed at the trigger
(`run_keys`), then reads with `jobs.get_run` (`check_status`) before settling.

Authentication, from the plugin's settings (`NotifySettings`): basic auth
(`TETHER_DATABRICKS_NOTIFY_USER` and `TETHER_DATABRICKS_NOTIFY_PASSWORD`,
both compared) and/or a token (`TETHER_DATABRICKS_NOTIFY_TOKEN`, in the URL's
`?token=` or as `Authorization: Bearer`). Each comparison is of SHA-256
digests with `hmac.compare_digest`, every configured one made, so neither the
time taken nor the order tells which part was wrong. With none configured the
endpoint answers 404 saying so.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping
from typing import Any

import msgspec

from core.plugin import NotFound, Notice, NoticeAbout, Secret, Unauthorized, settings_from_env

NOTIFY_PREFIX = "TETHER_DATABRICKS_"
"""The notification settings share the plugin's prefix: `TETHER_DATABRICKS_NOTIFY_*`."""

EVENT_TYPES = frozenset(
    {
        "jobs.on_start",
        "jobs.on_success",
        "jobs.on_failure",
        "jobs.on_duration_warning_threshold_exceeded",
        "jobs.on_streaming_backlog_exceeded",
    }
)
"""The job notifications Databricks documents. Another `event_type` is read
the same way (Databricks adds kinds): the status check decides anyway."""

MAX_ID_DIGITS = 20
"""A run id is a 64-bit integer: at most 20 digits."""

NOT_CONFIGURED = (
    "Databricks notifications are not configured on this service: set"
    " TETHER_DATABRICKS_NOTIFY_USER and TETHER_DATABRICKS_NOTIFY_PASSWORD (the destination's"
    " basic auth), or TETHER_DATABRICKS_NOTIFY_TOKEN (?token= in the destination's URL)"
)
REFUSED = (
    "missing or wrong credentials for Databricks notifications: use the destination's basic"
    " auth (TETHER_DATABRICKS_NOTIFY_USER / _PASSWORD) or ?token= (TETHER_DATABRICKS_NOTIFY_TOKEN)"
)


class NotifySettings(msgspec.Struct, frozen=True, kw_only=True):
    """Who may post Databricks notifications, from `TETHER_DATABRICKS_NOTIFY_*`.
    Secrets: never shown (the repr masks them)."""

    notify_user: str = ""
    """`TETHER_DATABRICKS_NOTIFY_USER`: the destination's basic-auth user name."""
    notify_password: Secret = ""
    """`TETHER_DATABRICKS_NOTIFY_PASSWORD`: its password (both or neither)."""
    notify_token: Secret = ""
    """`TETHER_DATABRICKS_NOTIFY_TOKEN`: a token the destination's URL carries
    (`...?token=`), for destinations without basic auth."""

    def __repr__(self) -> str:
        shown = {f: "***" if getattr(self, f) else "" for f in self.__struct_fields__}
        shown["notify_user"] = self.notify_user
        return "NotifySettings(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> NotifySettings:
        settings = settings_from_env(cls, NOTIFY_PREFIX, env)
        if bool(settings.notify_user) != bool(settings.notify_password):
            given, missing = ("USER", "PASSWORD") if settings.notify_user else ("PASSWORD", "USER")
            raise ValueError(
                f"TETHER_DATABRICKS_NOTIFY_{given} is set but TETHER_DATABRICKS_NOTIFY_{missing}"
                " is not: basic auth for Databricks notifications needs both"
            )
        if ":" in settings.notify_user:
            raise ValueError(
                "invalid setting TETHER_DATABRICKS_NOTIFY_USER: a basic-auth user name has no `:`"
            )
        return settings

    @property
    def configured(self) -> bool:
        """Some credential is set: basic auth (user and password, both) or a token."""
        return bool((self.notify_user and self.notify_password) or self.notify_token)


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


def _same(given: str, expected: str) -> bool:
    """Constant time, whatever the lengths: the digests are compared."""
    return hmac.compare_digest(_digest(given), _digest(expected))


def _basic(header: str) -> tuple[str, str]:
    """The user and password of an `Authorization: Basic` header; empty ones
    when there is none or it cannot be read."""
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return "", ""
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return "", ""
    user, _, password = decoded.partition(":")
    return user, password


def _token(notice: Notice) -> str:
    """The token a request carries: the URL's one `token`, else a bearer token."""
    given = notice.query.get("token", [])
    if len(given) == 1:
        return given[0]
    scheme, _, value = notice.headers.get("authorization", "").strip().partition(" ")
    return value.strip() if scheme.lower() == "bearer" and len(given) == 0 else ""


def authenticate(settings: NotifySettings, notice: Notice) -> None:
    """Pass a request with the configured credentials; else `Unauthorized`
    (`NotFound` when none are configured). Every configured credential is
    compared, in full, whatever the others gave."""
    if not settings.configured:
        raise NotFound(NOT_CONFIGURED, {"backend": "databricks"})
    ok = False
    if settings.notify_user:
        user, password = _basic(notice.headers.get("authorization", ""))
        same_user = _same(user, settings.notify_user)
        same_password = _same(password, settings.notify_password)
        ok = same_user & same_password
    if settings.notify_token:
        ok = _same(_token(notice), settings.notify_token) | ok
    if not ok:
        raise Unauthorized(REFUSED)


JSON_KINDS = {
    str: "a string of other characters",
    float: "a number with a fraction or an exponent",
    bool: "true or false",
    list: "a list",
    dict: "an object",
    type(None): "null",
}
"""What a value that is no run id is, in JSON's words."""


def run_id(value: Any, where: str) -> str:
    """A run id as its key: the number's decimal digits. Databricks sends ids
    as numbers or as strings of digits."""
    too_long = ValueError(f"`{where}` has more than {MAX_ID_DIGITS} digits: not a run id")
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"`{where}` is negative: not a run id")
        if value >= 10**MAX_ID_DIGITS:  # (str() of a huge int is refused by Python itself)
            raise too_long
        text = str(value)
    elif isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        text = value.strip().lstrip("0") or "0"  # its digits, as int() would, at any length
    else:
        given = JSON_KINDS.get(type(value), type(value).__name__)
        raise ValueError(
            f"`{where}` must be a run id (a whole number, or a string of digits), not {given}"
        )
    if len(text) > MAX_ID_DIGITS:
        raise too_long
    return text


def read(body: Any) -> NoticeAbout:
    """The runs a Databricks notification is about: `run.parent_run_id` (a
    task-level notification's job run) and `run.run_id`. `ValueError` naming
    the field for a body of another shape."""
    if not isinstance(body, dict):
        raise ValueError(
            'expected a JSON object such as {"event_type": "jobs.on_success", "run":'
            ' {"run_id": 123}}'
        )
    kind = body.get("event_type")
    if not isinstance(kind, str) or not kind:
        raise ValueError("`event_type` is missing (e.g. jobs.on_success)")
    run = body.get("run")
    if not isinstance(run, dict) or run.get("run_id") is None:
        raise ValueError(f"`run.run_id` is missing ({kind[:100]})")
    keys = []
    if run.get("parent_run_id") is not None:
        keys.append(run_id(run["parent_run_id"], "run.parent_run_id"))
    keys.append(run_id(run["run_id"], "run.run_id"))
    task = body.get("task")
    task_key = task.get("task_key") if isinstance(task, dict) else None
    shown = kind[:100]
    if isinstance(task_key, str) and task_key:
        shown += f" (task {task_key[:100]})"
    return NoticeAbout(keys=keys, kind=shown)


def run_keys(external: Mapping[str, Any]) -> list[str]:
    """The keys of a run Tether started: its run id (a repair keeps it)."""
    value = external.get("run_id")
    if isinstance(value, int) and not isinstance(value, bool):
        return [str(value)]
    return []


def with_notify_settings(base: type[msgspec.Struct]) -> type[msgspec.Struct]:
    """`base`'s fields and `NotifySettings`' in one Struct: what the backend
    declares as its `settings_type`, so that `tether serve` knows every
    `TETHER_DATABRICKS_*` variable (each part is read on its own)."""
    fields = [
        (f.name, f.type, f.default)
        for struct in (base, NotifySettings)
        for f in msgspec.structs.fields(struct)
    ]
    return msgspec.defstruct(f"{base.__name__}WithNotify", fields, kw_only=True, frozen=True)
