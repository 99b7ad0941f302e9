"""The OpenAPI document (`/schema/openapi.json`, `.yaml`) and the docs page
(`/schema`), which works offline.

Litestar writes the document from the handlers: their docstrings, parameters
and declared answers. `Document.complete` adds what only the running service
knows, so that the document says exactly what this service accepts:

- `POST /jobs` is one schema per installed backend (`<Backend>JobRequest`, a
  `oneOf` with a discriminator on `backend`), each with its backend's
  `params_type` as a named schema, so a generated client has typed params;
  the timeout's bound is the service's own `TETHER_MAX_TIMEOUT`;
- request bodies come from msgspec's schemas, so a body that refuses unknown
  fields says `additionalProperties: false`;
- query parameters are never `null`; `state` and `backend` are arrays; an
  integer one says it is written in decimal digits only (a `pattern` applies
  to strings, so the words carry the rule `api.controllers.strict_query` checks);
- the bearer security schemes, applied to `/jobs*` when `TETHER_API_TOKEN` is
  set (read tokens, `TETHER_READ_TOKEN`, on its GET routes only), and to the
  callback;
- links from a created job to reading and cancelling it, and realistic examples.

The docs page is Swagger UI, its scripts and styles served by Tether from the
`swagger-ui-py` package: nothing comes from a CDN.
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import importlib.util
import json
import logging
import re
from pathlib import Path
from typing import Any

import msgspec
from litestar import Request, Response, Router, get
from litestar.datastructures import ResponseHeader
from litestar.exceptions import NotFoundException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, OpenAPIRenderPlugin, YamlRenderPlugin
from litestar.params import FromPath

from api.controllers import INTEGER_RULE
from api.ui import SECURITY_HEADERS
from core import version
from core.errors import SHOWN_MAX
from core.hookspecs import Backend
from core.models import (
    HEARTBEAT_TIMEOUT_MIN,
    JOB_ID_PATTERN,
    CallbackBody,
    CancelRequest,
    HeartbeatBody,
    Notify,
    RetryRequest,
    Tag,
    Tags,
)
from core.plugins import Plugins
from core.settings import Settings
from core.views import duration

log = logging.getLogger("tether.api")

VERSION = version()
SCHEMA_PATH = "/schema"
ASSETS = f"{SCHEMA_PATH}/assets"
REF = "#/components/schemas/{name}"

DESCRIPTION = """\
Tether runs jobs on external systems and waits for them durably. `POST /jobs`
starts a job on a backend; Tether hands the external system a callback URL and
holds the job until that URL is called (`POST /callbacks/{promise_id}`), the
job is canceled, or it times out.

Errors always look like `{"error": {"code", "message", "details"?}}`; when a
field is at fault, `details.field` names it. **400** means the request is
malformed: not JSON, a wrong type, an unknown field or query parameter, a
single-valued parameter given twice, or a value outside what this document
states. **422** means it is well formed but cannot be done: an unknown backend,
params the backend's plugin refuses, a callback body neither Tether's nor the
backend's. A different request under a used job id is **409**.
""" + (
    "A message quotes an id from the request as Python's `repr` writes it (control"
    f" characters as escapes), at most {SHOWN_MAX} characters of it.\n"
)

JOB_PATHS = ("/jobs",)
"""Paths under these prefixes need the API token when one is set."""


# ── the docs page and its assets ─────────────────────────────────────────────


def assets_dir() -> Path:
    """Where `swagger-ui-py` keeps Swagger UI's files (found without importing
    the package, which would import its framework adapters)."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the swagger-ui-py package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "static"


ASSET_TYPES = {
    "swagger-ui.css": "text/css",  # (Litestar adds the charset to text/*)
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui-standalone-preset.js": "text/javascript",
    "favicon-32x32.png": "image/png",
    "docs.js": "text/javascript",
}
"""The files the page uses; nothing else from the package is served."""

DOCS_JS = b"""window.ui = SwaggerUIBundle({
  url: document.getElementById("docs").dataset.document,
  dom_id: "#docs",
  deepLinking: true,
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
  layout: "StandaloneLayout",
});
"""
"""The page's own script (`docs.js`), a file rather than inline, so the
page's `DOCS_HEADERS` allow no inline script."""

DOCS_HEADERS = [
    ResponseHeader(
        name="content-security-policy",
        value="default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline';"
        " object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    *(h for h in SECURITY_HEADERS if h.name in ("x-content-type-options", "referrer-policy")),
]
"""Every answer under `/schema`, as the dashboard's pages (`api.ui.
SECURITY_HEADERS`): no script but the service's own files, never framed,
nothing sniffed. It shares the dashboard's origin, whose session a script
run there could use (found by a security QA pass). Swagger UI sets styles
inline: those are allowed."""


@functools.cache
def asset(name: str) -> bytes:
    if name == "docs.js":
        return DOCS_JS
    return (assets_dir() / name).read_bytes()


@get("/assets/{name:str}", include_in_schema=False, sync_to_thread=False)
def serve_asset(name: FromPath[str]) -> Response[bytes]:
    """One of the docs page's scripts, styles or icon."""
    if name not in ASSET_TYPES:
        raise NotFoundException(f"no asset {name!r}")
    return Response(
        asset(name),
        media_type=ASSET_TYPES[name],
        headers={"cache-control": "public, max-age=86400"},
    )


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Tether API {version}</title>
<link rel="icon" type="image/png" href="{assets}/favicon-32x32.png">
<link rel="stylesheet" href="{assets}/swagger-ui.css">
<style>body {{ margin: 0 }}</style>
</head>
<body>
<div id="docs" data-document="{document}"></div>
<script src="{assets}/swagger-ui-bundle.js"></script>
<script src="{assets}/swagger-ui-standalone-preset.js"></script>
<script src="{assets}/docs.js"></script>
</body>
</html>
"""


class DocsPage(OpenAPIRenderPlugin):
    """Swagger UI at `/schema` (and `/schema/swagger`), with every script and
    style served by Tether; the page loads the document by URL, so it holds no
    URL of another host."""

    def __init__(self) -> None:
        super().__init__(path=["/", "/swagger"])

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        page = PAGE.format(
            version=VERSION, assets=ASSETS, document=self.get_openapi_json_route(request)
        )
        return page.encode()

    def receive_router(self, router: Router) -> None:
        router.register(serve_asset)


class JsonDocument(JsonRenderPlugin):
    """`/schema/openapi.json`: the completed document."""

    def __init__(self, document: Document) -> None:
        super().__init__()
        self.document = document

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        return super().render(request, self.document.complete(openapi_schema))


class YamlDocument(YamlRenderPlugin):
    """`/schema/openapi.yaml`: the completed document."""

    def __init__(self, document: Document) -> None:
        super().__init__()
        self.document = document

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        return super().render(request, self.document.complete(openapi_schema))


def openapi_config(settings: Settings, plugins: Plugins) -> OpenAPIConfig:
    document = Document(settings, plugins)
    return OpenAPIConfig(
        title="Tether",
        version=VERSION,
        description=DESCRIPTION,
        path=SCHEMA_PATH,
        openapi_router=Router(
            SCHEMA_PATH,
            route_handlers=[],
            include_in_schema=False,
            dto=None,
            return_dto=None,
            response_headers=DOCS_HEADERS,
        ),
        use_handler_docstrings=True,
        render_plugins=[DocsPage(), JsonDocument(document), YamlDocument(document)],
    )


# ── the document ─────────────────────────────────────────────────────────────


def camel(name: str) -> str:
    """`http_webhook` → `HttpWebhook`: a backend's name as part of a schema name."""
    return "".join(part[:1].upper() + part[1:] for part in re.split(r"[^A-Za-z0-9]+", name))


def needs_params(backend: Backend) -> bool:
    """Whether `params` must be sent: its type refuses `{}`."""
    try:
        msgspec.convert({}, backend.params_type)
    except (msgspec.ValidationError, TypeError, ValueError):
        return True
    return False


def ref(name: str) -> dict[str, str]:
    return {"$ref": REF.format(name=name)}


ID_SCHEMA = {
    "anyOf": [
        {"type": "string", "pattern": JOB_ID_PATTERN.pattern, "minLength": 1, "maxLength": 128},
        {"type": "null"},
    ],
    "description": "The job's id, 1 to 128 of `A-Z a-z 0-9 . _ -`; a new unique id when absent."
    " The same id with the same request again reattaches to the job (200).",
    "examples": ["nightly-sales-2026-11-24"],
}
TAGS_SCHEMA = msgspec.json.schema(Tags)
"""`tags` as `JobRequest` states it (`core.models.Tags`)."""
NOTIFY_SCHEMA = {
    "anyOf": [msgspec.json.schema_components([Notify])[1]["Notify"], {"type": "null"}],
    "description": "Where to POST a signed `job.finished` message when the job ends"
    " (docs/lifecycle.md); needs a notification secret (422 without one).",
}
"""`notify` as `JobRequest` states it (`core.models.Notify`)."""
METADATA_SCHEMA = {
    "type": "object",
    "additionalProperties": True,
    "description": "Anything the caller wants kept with the job; Tether does not read it.",
    "examples": [{"team": "data", "ticket": "OPS-112"}],
}

JOB_EXAMPLE = {
    "id": "nightly-sales-2026-11-24",
    "backend": "http_webhook",
    "state": "running",
    "params": {"url": "https://etl.example.com/hooks/sales", "payload": {"table": "sales"}},
    "metadata": {"team": "data"},
    "timeout": 3600.0,
    "external": {"status_code": 202, "response": {"accepted": True}},
    "result": None,
    "error": None,
    "created_at": "2026-11-24T02:00:00.120000Z",
    "updated_at": "2026-11-24T02:00:00.480000Z",
    "finished_at": None,
    "deadline": "2026-11-24T03:00:00.120000Z",
}
FINISHED_EXAMPLE = {
    **JOB_EXAMPLE,
    "state": "succeeded",
    "result": {"rows": 42},
    "updated_at": "2026-11-24T02:41:07.300000Z",
    "finished_at": "2026-11-24T02:41:07.300000Z",
}

CANCELED_EXAMPLE = {
    **JOB_EXAMPLE,
    "state": "canceled",
    "error": {"message": "canceled by request: the nightly window closed", "type": "canceled"},
    "updated_at": "2026-11-24T02:10:00.000000Z",
    "finished_at": "2026-11-24T02:10:00.000000Z",
}

RETRIED_EXAMPLE = {
    **JOB_EXAMPLE,
    "state": "pending",
    "external": None,
    "updated_at": "2026-11-24T03:05:00.000000Z",
    "attempt": 2,
    "deadline": "2026-11-24T04:05:00.000000Z",
}

REQUEST_EXAMPLES = {
    "http_webhook": {
        "summary": "Any HTTP service",
        "value": {
            "id": "nightly-sales-2026-11-24",
            "backend": "http_webhook",
            "params": {"url": "https://etl.example.com/hooks/sales", "payload": {"table": "sales"}},
            "timeout": 3600,
            "metadata": {"team": "data"},
        },
    },
    "databricks": {
        "summary": "An existing Databricks job",
        "value": {
            "id": "daily-report-2026-11-24",
            "backend": "databricks",
            "params": {"job_id": 123, "job_parameters": {"date": "2026-11-24"}},
            "timeout": 7200,
        },
    },
    "databricks_sql": {
        "summary": "A SQL statement on a Databricks SQL warehouse",
        "value": {
            "id": "row-count-2026-11-24",
            "backend": "databricks_sql",
            "params": {
                "warehouse_id": "abcdef1234567890",
                "statement": "SELECT count(*) AS n FROM sales WHERE day = :day",
                "parameters": {"day": "2026-11-24"},
            },
            "timeout": 600,
            "tags": ["team-a", "nightly"],
            "notify": {"url": "https://hooks.example.com/tether"},
        },
    },
}
"""Examples for the built-in backends, shown when they are installed."""


def error(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        body["details"] = details
    return {"error": body}


UNKNOWN_QUERY = error(
    "invalid_request",
    "unknown query parameter 'status' (this route takes: none)",
    {"field": "status", "in": "query"},
)
ERROR_EXAMPLES: dict[int, dict[str, Any]] = {
    400: UNKNOWN_QUERY,
    401: error("unauthorized", "missing or invalid API token"),
    403: error(
        "forbidden",
        "this token may only read; POST /jobs needs the API token (TETHER_API_TOKEN)",
    ),
    404: error("not_found", "no job 'nightly-sales-2026-11-24'"),
    413: error(
        "body_too_large",
        "the body is larger than this service takes: at most 1048576 bytes",
        {"field": "body", "limit_bytes": 1048576},
    ),
    415: error("unsupported_media_type", "send the body as application/json, not 'text/plain'"),
    429: error(
        "too_many_requests",
        "30 wrong tokens from this address (yours or another client's at the same address) in"
        " the last minute: no token from it is read for 42 s more",
    ),
    503: error("store_unavailable", "the store did not answer: TimeoutError"),
}
"""An example of each error answer; `OPERATION_ERRORS` has the ones particular
to an operation."""

OPERATION_ERRORS: dict[tuple[str, int], dict[str, Any]] = {
    ("createJob", 400): error(
        "invalid_request",
        "invalid job id: use 1 to 128 characters from A-Z a-z 0-9 . _ -",
        {"field": "id"},
    ),
    ("createJob", 409): error(
        "conflict",
        "job 'nightly-sales-2026-11-24' exists with a different request (params.url, timeout"
        " differ); use another id",
        {"field": "id", "differs": ["params.url", "timeout"]},
    ),
    ("createJob", 422): error(
        "invalid_request",
        "unknown backend 'databrick'; valid backends: databricks, databricks_sql, http_webhook",
        {"field": "backend", "valid": ["databricks", "databricks_sql", "http_webhook"]},
    ),
    ("listJobs", 400): error(
        "invalid_request",
        "invalid query parameter 'state': Invalid enum value 'done'",
        {"field": "state", "in": "query"},
    ),
    ("cancelJob", 403): error(
        "forbidden",
        "this token may only read; POST /jobs/nightly-sales-2026-11-24/cancel needs the API"
        " token (TETHER_API_TOKEN)",
    ),
    ("cancelJob", 409): error(
        "conflict",
        "job 'nightly-sales-2026-11-24' already finished (succeeded)",
        {"state": "succeeded"},
    ),
    ("retryJob", 403): error(
        "forbidden",
        "this token may only read; POST /jobs/nightly-sales-2026-11-24/retry needs the API"
        " token (TETHER_API_TOKEN)",
    ),
    ("retryJob", 409): error(
        "conflict",
        "job 'nightly-sales-2026-11-24' is at attempt 1 (succeeded); only a failed,"
        " timed-out or canceled job can be retried",
        {"attempt": 1, "state": "succeeded"},
    ),
    ("settleJob", 400): error(
        "invalid_request",
        "the callback body is not valid JSON: malformed data",
        {"field": "body"},
    ),
    ("settleJob", 401): error("unauthorized", "missing or invalid callback token"),
    ("settleJob", 404): error("not_found", "no promise 'nightly-sales-2026-11-24:1'"),
    ("heartbeat", 401): error("unauthorized", "missing or invalid callback token"),
    ("heartbeat", 404): error("not_found", "no promise 'nightly-sales-2026-11-24:1'"),
    ("heartbeat", 410): error(
        "gone",
        "the job is succeeded; it takes no more heartbeats",
        {"state": "succeeded", "attempt": 1},
    ),
    ("heartbeat", 422): error(
        "invalid_request",
        "progress is 20480 bytes of JSON; at most 16384 bytes are kept; nothing changed",
        {"field": "progress", "limit_bytes": 16384},
    ),
    ("settleJob", 422): error(
        "invalid_request",
        "invalid callback body: Object missing required field `status`; expected"
        ' {"status": "succeeded"|"failed", "result"?, "error"?: {"message", "type"?}};'
        " nothing changed",
        {"field": "status"},
    ),
    ("backendNotification", 400): error(
        "invalid_request",
        "the notification body is not valid JSON: malformed data",
        {"field": "body"},
    ),
    ("backendNotification", 401): error(
        "unauthorized",
        "missing or wrong credentials for Databricks notifications: use the destination's basic"
        " auth (TETHER_DATABRICKS_NOTIFY_USER / _PASSWORD) or ?token="
        " (TETHER_DATABRICKS_NOTIFY_TOKEN)",
    ),
    ("backendNotification", 404): error(
        "not_found",
        "backend 'http_webhook' takes no notifications (its plugin does not implement"
        " receive_notification)",
        {"backend": "http_webhook"},
    ),
    ("backendNotification", 422): error(
        "invalid_request",
        "invalid databricks notification: `run.run_id` is missing (jobs.on_success)",
        {"field": "body", "backend": "databricks"},
    ),
}

NOTIFICATION_EXAMPLES: dict[str, Any] = {
    "ours": {
        "summary": "A run a job of this service started: checked at once",
        "value": {
            "jobs": [
                {
                    "id": "nightly-sales-2026-11-24",
                    "state": "succeeded",
                    "message": "noted (jobs.on_success); the run's state says succeeded",
                }
            ],
            "message": "jobs.on_success noted for 1 job(s)",
        },
    },
    "foreign": {
        "summary": "Another run of the workspace: nothing changed",
        "value": {
            "jobs": [],
            "message": "jobs.on_success about 5112: no job of this service started it;"
            " nothing changed",
        },
    },
}

CALLBACK_EXAMPLES: dict[str, dict[str, Any]] = {
    "200": {
        "accepted": {
            "summary": "This outcome ended the job",
            "value": {
                "outcome": "accepted",
                "job": FINISHED_EXAMPLE,
                "message": "outcome recorded",
            },
        },
        "duplicate": {
            "summary": "The same outcome again",
            "value": {
                "outcome": "duplicate",
                "job": FINISHED_EXAMPLE,
                "message": "the same outcome was already recorded; nothing changed",
            },
        },
    },
    "202": {
        "noted": {
            "summary": "A backend-native hint",
            "value": {
                "outcome": "noted",
                "job": JOB_EXAMPLE,
                "message": "noted; the run has not ended; Tether keeps checking",
            },
        }
    },
    "409": {
        "conflict": {
            "summary": "A different outcome came first",
            "value": {
                "outcome": "conflict",
                "job": FINISHED_EXAMPLE,
                "message": "a different outcome was already recorded (succeeded); nothing changed",
                "error": {
                    "code": "conflict",
                    "message": "a different outcome was already recorded (succeeded);"
                    " nothing changed",
                },
            },
        }
    },
    "410": {
        "gone": {
            "summary": "The job was canceled",
            "value": {
                "outcome": "gone",
                "job": CANCELED_EXAMPLE,
                "message": "the job is canceled; its wait accepts nothing more",
                "error": {
                    "code": "gone",
                    "message": "the job is canceled; its wait accepts nothing more",
                },
            },
        }
    },
}

PING_EXAMPLE = 'event: ping\ndata: {"type": "ping"}\n\n'
"""What a stream sends after 15 s of silence (`core.events.PING`)."""
EVENTS_EXAMPLE: dict[str, Any] = {
    "items": [
        {
            "seq": 1,
            "at": "2026-11-24T02:00:00.120000Z",
            "type": "accepted",
            "attempt": 1,
            "data": {"backend": "http_webhook", "timeout": 3600.0},
        },
        {
            "seq": 2,
            "at": "2026-11-24T02:00:00.310000Z",
            "type": "triggered",
            "attempt": 1,
            "data": {"try": 1, "external": {"status_code": 202, "response": {"accepted": True}}},
        },
        {
            "seq": 3,
            "at": "2026-11-24T02:14:07.500000Z",
            "type": "callback",
            "attempt": 1,
            "data": {
                "verdict": "accepted",
                "status": "succeeded",
                "body_bytes": 48,
                "body_sha256": "9f2c4e0d1b7a5c3e8f6a2d4b0c9e7f1a3b5d7c9e1f2a4b6c8d0e2f4a6b8c0d2e",
            },
        },
        {
            "seq": 4,
            "at": "2026-11-24T02:14:07.510000Z",
            "type": "finished",
            "attempt": 1,
            "data": {"state": "succeeded"},
        },
    ],
    "next_cursor": None,
    "dropped": 0,
}

HEARTBEAT_EXAMPLE = {
    "state": "running",
    "deadline": "2026-11-24T03:00:00.120000Z",
    "heartbeat_timeout": 300.0,
    "heartbeat_due": "2026-11-24T02:19:07.500000Z",
}

CALLBACK_OPERATIONS = ("settleJob", "heartbeat")
"""Operations that take the callback URL's token, not the API token."""

JOB_LINKS = {
    "getJob": {
        "operationId": "getJob",
        "parameters": {"job_id": "$response.body#/id"},
        "description": "Read the job",
    },
    "cancelJob": {
        "operationId": "cancelJob",
        "parameters": {"job_id": "$response.body#/id"},
        "description": "Cancel the job",
    },
}


class Document:
    """Completes the document Litestar writes, once per app."""

    def __init__(self, settings: Settings, plugins: Plugins) -> None:
        self.settings = settings
        self.plugins = plugins
        self._done: dict[str, Any] | None = None

    def complete(self, generated: dict[str, Any]) -> dict[str, Any]:
        if self._done is None:
            self._done = self._complete(copy.deepcopy(generated))
        return self._done

    def _complete(self, doc: dict[str, Any]) -> dict[str, Any]:
        components = doc.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        schemas.update(self.request_schemas())
        components["securitySchemes"] = self.security_schemes()
        for path, item in doc.get("paths", {}).items():
            for method, op in item.items():
                if isinstance(op, dict) and "responses" in op:
                    self._operation(path, method, op)
        return doc

    # ── request bodies ───────────────────────────────────────────────────────

    def timeout_schema(self) -> dict[str, Any]:
        settings = self.settings
        return {
            "anyOf": [
                {"type": "number", "exclusiveMinimum": 0, "maximum": settings.max_timeout},
                {"type": "null"},
            ],
            "description": "Seconds the job may wait for its outcome: more than 0, at most"
            f" {duration(settings.max_timeout)}; {duration(settings.default_timeout)}"
            " when absent.",
            "examples": [3600],
        }

    def heartbeat_timeout_schema(self) -> dict[str, Any]:
        return {
            "anyOf": [
                {
                    "type": "number",
                    "minimum": HEARTBEAT_TIMEOUT_MIN,
                    "maximum": self.settings.max_timeout,
                },
                {"type": "null"},
            ],
            "description": f"Seconds (at least {HEARTBEAT_TIMEOUT_MIN:g}) the run may go"
            " without a heartbeat (`POST"
            " /callbacks/{promise_id}/heartbeat`); one longer than the job's `timeout`"
            " never passes before the deadline. When that long passes without one, Tether"
            " asks the backend:"
            " a run that ended settles the job, one confirmed running waits on, and if"
            " the backend cannot tell the job ends `timed_out`. Absent: no heartbeats needed.",
            "examples": [300],
        }

    def request_schemas(self) -> dict[str, Any]:
        """The named schemas of every request body: one `JobRequest` variant per
        backend with its params type, and the bodies of cancel and callbacks."""
        schemas: dict[str, Any] = {}
        for kind in (CancelRequest, CallbackBody, HeartbeatBody, RetryRequest):
            (_,), found = msgspec.json.schema_components([kind], ref_template=REF)
            schemas.update(found)
        variants: dict[str, str] = {}
        for name, backend in sorted(self.plugins.backends.items()):
            variant = f"{camel(name)}JobRequest"
            schemas[variant] = self.job_request(backend, self.params_schema(backend, schemas))
            variants[name] = REF.format(name=variant)
        if variants:
            schemas["JobRequest"] = {
                "title": "JobRequest",
                "description": "Body of `POST /jobs`: one shape per installed backend,"
                " told apart by `backend`.",
                "oneOf": [{"$ref": target} for target in variants.values()],
                "discriminator": {"propertyName": "backend", "mapping": variants},
            }
        return schemas

    def params_schema(self, backend: Backend, schemas: dict[str, Any]) -> dict[str, Any]:
        """A reference to the backend's `params_type` as a named schema (added
        to `schemas`); an open object if msgspec cannot describe the type."""
        try:
            (found,), more = msgspec.json.schema_components([backend.params_type], ref_template=REF)
        except (TypeError, ValueError) as exc:
            log.warning("backend %s: no schema for its params_type: %s", backend.name, exc)
            found, more = {"type": "object"}, {}
        for name, schema in more.items():
            if schemas.setdefault(name, schema) != schema:
                log.warning("two params types are both called %s; the document shows one", name)
        if "$ref" not in found:
            name = f"{camel(backend.name)}Params"
            schemas[name] = found
            return ref(name)
        # A Struct annotated with `Meta(extra_json_schema=...)` (a `oneOf` of the
        # shapes its `__post_init__` allows): that belongs to the named schema,
        # where a reader (and a tool reading `$ref` alone) sees it.
        target = found.pop("$ref")
        if found:
            name = target.rsplit("/", 1)[-1]
            schemas[name] = {**schemas[name], **found}
        return {"$ref": target}

    def job_request(self, backend: Backend, params: dict[str, Any]) -> dict[str, Any]:
        name = backend.name
        return {
            "title": f"{camel(name)}JobRequest",
            "description": f"`POST /jobs` for the `{name}` backend.",
            "type": "object",
            "properties": {
                "backend": {"type": "string", "enum": [name], "description": "The backend."},
                "params": {
                    **params,
                    "description": f"The `{name}` backend's parameters; its plugin checks"
                    " them (422 when it refuses them).",
                },
                "id": ID_SCHEMA,
                "timeout": self.timeout_schema(),
                "metadata": METADATA_SCHEMA,
                "heartbeat_timeout": self.heartbeat_timeout_schema(),
                "tags": TAGS_SCHEMA,
                "notify": NOTIFY_SCHEMA,
            },
            "required": ["backend", "params"] if needs_params(backend) else ["backend"],
            "additionalProperties": False,
        }

    def request_body(self, operation_id: str) -> dict[str, Any] | None:
        if operation_id == "createJob":
            examples = {
                name: example
                for name, example in REQUEST_EXAMPLES.items()
                if name in self.plugins.backends
            }
            media: dict[str, Any] = {"schema": ref("JobRequest")}
            if examples:
                media["examples"] = examples
            return {"required": True, "content": {"application/json": media}}
        if operation_id == "cancelJob":
            return {
                "required": False,
                "description": "Optional (none, or `null`, is no reason); a `reason` is kept"
                " in the job's `error.message`.",
                "content": {
                    "application/json": {
                        "schema": {"anyOf": [ref("CancelRequest"), {"type": "null"}]},
                        "examples": {
                            "reason": {"value": {"reason": "the nightly window closed"}},
                        },
                    }
                },
            }
        if operation_id == "retryJob":
            return {
                "required": False,
                "description": "Optional (none, or `null`: start the next attempt). With"
                " `attempt`, the attempt that should exist afterwards: safe to repeat.",
                "content": {
                    "application/json": {
                        "schema": {"anyOf": [ref("RetryRequest"), {"type": "null"}]},
                        "examples": {"attempt": {"value": {"attempt": 2}}},
                    }
                },
            }
        if operation_id == "settleJob":
            return {
                "required": True,
                "description": "Tether's uniform body, or the backend's native payload"
                " (which its plugin reads). `status` is required in the uniform body.",
                "content": {
                    "application/json": {
                        "schema": {
                            "anyOf": [
                                ref("CallbackBody"),
                                {"description": "A backend's native payload."},
                            ]
                        },
                        "examples": {
                            "succeeded": {"value": {"status": "succeeded", "result": {"rows": 42}}},
                            "failed": {
                                "value": {
                                    "status": "failed",
                                    "error": {"message": "disk full", "type": "IOError"},
                                }
                            },
                        },
                    }
                },
            }
        if operation_id == "backendNotification":
            return {
                "required": True,
                "description": "The external system's own notification; its backend reads"
                " it (and authenticates the request).",
                "content": {
                    "application/json": {
                        "schema": {"description": "A backend's native payload."},
                        "examples": {
                            "databricks": {
                                "value": {
                                    "event_type": "jobs.on_success",
                                    "workspace_id": "1234567890123456",
                                    "run": {"run_id": 5112},
                                    "job": {"job_id": 7, "name": "nightly sales"},
                                }
                            },
                        },
                    }
                },
            }
        if operation_id == "heartbeat":
            return {
                "required": False,
                "description": "Optional (none, or `null`, is a heartbeat without progress).",
                "content": {
                    "application/json": {
                        "schema": {"anyOf": [ref("HeartbeatBody"), {"type": "null"}]},
                        "examples": {
                            "progress": {"value": {"progress": {"done": 120, "of": 400}}},
                        },
                    }
                },
            }
        return None

    # ── security ─────────────────────────────────────────────────────────────

    def security_schemes(self) -> dict[str, Any]:
        schemes: dict[str, Any] = {
            "callbackToken": {
                "type": "apiKey",
                "in": "query",
                "name": "token",
                "description": "The token in the callback URL a backend hands out.",
            },
            "callbackBearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "The callback URL's token, sent as `Authorization: Bearer`.",
            },
        }
        if self.settings.api_token:
            schemes["apiToken"] = {
                "type": "http",
                "scheme": "bearer",
                "description": "A token of `TETHER_API_TOKEN` (any of them: several may be"
                " set, comma-separated), as `Authorization: Bearer`. A read token"
                " (`TETHER_READ_TOKEN`) is accepted the same way on GET only: listing and"
                " reading jobs; any other method answers 403 for it.",
            }
        return schemes

    def security(self, path: str, operation_id: str) -> list[dict[str, list[str]]] | None:
        if operation_id in CALLBACK_OPERATIONS:
            return [{"callbackToken": []}, {"callbackBearer": []}]
        if self.settings.api_token and path.startswith(JOB_PATHS):
            return [{"apiToken": []}]
        return None

    # ── one operation ────────────────────────────────────────────────────────

    def _operation(self, path: str, method: str, op: dict[str, Any]) -> None:
        operation_id = op.get("operationId", "")
        body = self.request_body(operation_id)
        if body is not None:
            op["requestBody"] = body
        params = [self._parameter(p) for p in op.get("parameters", [])]
        if operation_id in CALLBACK_OPERATIONS:  # the token is a security scheme
            params = [p for p in params if p.get("name") != "token"]
        if params:
            op["parameters"] = params
        else:
            op.pop("parameters", None)
        security = self.security(path, operation_id)
        if security is not None:
            op["security"] = security
        for status, response in op["responses"].items():
            self._response(operation_id, int(status), response)

    def _parameter(self, param: dict[str, Any]) -> dict[str, Any]:
        """A query or path parameter: never `null`; arrays as repeated keys."""
        param = {k: v for k, v in param.items() if k not in ("allowEmptyValue", "allowReserved")}
        schema = without_null(param.get("schema", {}))
        items = schema.get("items", {})
        if param.get("in") == "path" and param.get("name") == "job_id":
            # Looked up as given: an id no job can have (outside `JOB_ID_PATTERN`)
            # is a 404 naming it, as an unknown one is, not the 400 the pattern
            # stated (found by an exploratory QA pass).
            schema = {"type": "string", "minLength": 1}
            param["description"] = (
                "The job's id, as given when it was created; one no job has (an id"
                f" outside the pattern ids are made of, {JOB_ID_PATTERN.pattern}, too) is 404"
            )
        if param.get("in") == "query" and param.get("name") == "tag":
            schema["items"] = msgspec.json.schema(Tag)  # checked by `Tether.list_jobs`
        if param.get("in") == "query" and param.get("name") == "backend":
            schema["items"] = {"type": "string", "minLength": 1}  # (as `Tether.list_jobs`)
        if schema.get("type") == "array":
            param["style"], param["explode"] = "form", True
        if param.get("in") == "query" and "integer" in (schema.get("type"), items.get("type")):
            # no `pattern` on an integer: the rule the guard checks is stated in words
            param["description"] = f"{param.get('description', 'An integer')}; {INTEGER_RULE}"
            schema["description"] = param["description"]
        param["schema"] = schema
        return param

    def _response(self, operation_id: str, status: int, response: dict[str, Any]) -> None:
        media = response.get("content", {}).get("application/json")
        if media is None:
            return
        media.pop("examples", None)
        if operation_id == "settleJob" and str(status) in CALLBACK_EXAMPLES:
            media["examples"] = CALLBACK_EXAMPLES[str(status)]
        elif status >= 400:
            if status in (429, 503):  # each asks to come back (a 503: `Retry-After: 1`)
                response["headers"] = {
                    "Retry-After": {
                        "description": "Seconds to wait before asking again",
                        "schema": {"type": "integer"},
                    }
                }
            example = OPERATION_ERRORS.get((operation_id, status)) or ERROR_EXAMPLES.get(status)
            if example is not None:
                media["examples"] = {"error": {"value": example}}
        elif operation_id == "cancelJob":
            media["examples"] = {"canceled": {"value": CANCELED_EXAMPLE}}
        elif operation_id == "retryJob":
            media["examples"] = {"retried": {"value": RETRIED_EXAMPLE}}
        elif operation_id == "heartbeat":
            media["examples"] = {"noted": {"value": HEARTBEAT_EXAMPLE}}
        elif operation_id == "backendNotification":
            media["examples"] = NOTIFICATION_EXAMPLES
        elif operation_id in ("createJob", "getJob"):
            media["examples"] = {"job": {"value": JOB_EXAMPLE}}
            if operation_id == "createJob":
                response["links"] = JOB_LINKS
        elif operation_id == "listJobs":
            example = {"items": [JOB_EXAMPLE], "next_cursor": "00000000000004d2"}
            media["examples"] = {"page": {"value": example}}
            response["content"]["text/event-stream"] = {  # with `Accept: text/event-stream`
                "schema": {"type": "string"},
                "example": f"event: job\ndata: {json.dumps(JOB_EXAMPLE)}\n\n"
                f'event: page\ndata: {{"ids": [{json.dumps(JOB_EXAMPLE["id"])}]}}\n\n'
                + PING_EXAMPLE,
            }
        elif operation_id == "jobEvents":
            media["examples"] = {"page": {"value": EVENTS_EXAMPLE}}
            response["content"]["text/event-stream"] = {
                "schema": {"type": "string"},
                "example": "".join(
                    f"id: {e['seq']}\nevent: {e['type']}\ndata: {json.dumps(e)}\n\n"
                    for e in EVENTS_EXAMPLE["items"]
                )
                + PING_EXAMPLE,
            }
        elif operation_id == "health":
            backends = sorted(self.plugins.backends)
            example = {"status": "ok", "store": "sqlite", "backends": backends}
            media["examples"] = {"ok": {"value": example}}


def without_null(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` without its `null` alternative (a query parameter is absent,
    never null)."""
    schema = dict(schema)
    for key in ("oneOf", "anyOf"):
        if key in schema:
            options = [s for s in schema[key] if s != {"type": "null"}]
            if len(options) == 1:
                del schema[key]
                schema.update(options[0])
            else:
                schema[key] = options
    if isinstance(schema.get("type"), list):
        types = [t for t in schema["type"] if t != "null"]
        schema["type"] = types[0] if len(types) == 1 else types
    if "enum" in schema:
        schema["enum"] = [v for v in schema["enum"] if v is not None]
    return schema
