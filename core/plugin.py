"""Everything a Tether plugin author imports, from one stable path.

A complete plugin (this is `examples/tether_echo/tether_echo.py`, which the
tests load and run):

```python
from typing import Any

import msgspec

from core.plugin import Backend, Job, Outcome, Trigger, hookimpl


class EchoParams(msgspec.Struct, forbid_unknown_fields=True):
    message: str


class Echo(Backend):
    name = "echo"
    params_type = EchoParams

    async def trigger(self, trigger: Trigger) -> dict[str, str]:
        # A real backend starts the external job here and hands it
        # trigger.callback_url; echo only remembers what it was asked.
        return {"echoed": trigger.params.message}

    def parse_callback(self, job: Job, body: Any) -> Outcome | None:
        # Echo's native callback body: {"echo_done": <result>}
        if isinstance(body, dict) and "echo_done" in body:
            return Outcome(status="succeeded", result=body["echo_done"])
        return None


@hookimpl
def tether_backends() -> list[Backend]:
    return [Echo()]
```

Make it installable and Tether finds it through the `tether` entry-point group:

```toml
[project.entry-points.tether]
echo = "tether_echo"
```

Every hook and backend method is documented in :mod:`core.hookspecs`.
"""

from core.aside import aside
from core.errors import BackendError, NotFound, Unauthorized, os_reason, retry_after_seconds
from core.hookspecs import Backend, Readiness, hookimpl
from core.models import (
    HTTP_URL_SCHEMA,
    SENDABLE_URL,
    SENDABLE_URL_SCHEMA,
    CheckNow,
    ErrorInfo,
    Job,
    Notice,
    NoticeAbout,
    Outcome,
    Running,
    Trigger,
    read_json,
    url_fault,
)
from core.redact import USERINFO, redact, redact_bytes, without_whole
from core.settings import Secret
from core.settings import from_env as settings_from_env
from core.workflow import callback_promise_id

__all__ = [
    "HTTP_URL_SCHEMA",
    "SENDABLE_URL",
    "SENDABLE_URL_SCHEMA",
    "USERINFO",
    "Backend",
    "BackendError",
    "CheckNow",
    "ErrorInfo",
    "Job",
    "NotFound",
    "Notice",
    "NoticeAbout",
    "Outcome",
    "Readiness",
    "Running",
    "Secret",
    "Trigger",
    "Unauthorized",
    "aside",
    "callback_promise_id",
    "hookimpl",
    "os_reason",
    "read_json",
    "redact",
    "redact_bytes",
    "retry_after_seconds",
    "settings_from_env",
    "url_fault",
    "without_whole",
]
