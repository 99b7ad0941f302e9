"""One place that turns errors into HTTP answers of one shape:
`{"error": {"code": "...", "message": "...", "details": ...}}`."""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from resonate.error import DecodingError, ServerError

from api.access import shown_path
from api.ui import error_page, is_page, missing_page
from core.bounds import MAX_DEPTH
from core.errors import (
    Conflict,
    InvalidRequest,
    MalformedBody,
    NotFound,
    StoreUnavailable,
    TetherError,
    Unauthorized,
)
from core.models import field_of
from core.plugins import PluginFault
from core.settle import store_refusal

log = logging.getLogger("tether.api")

STATUS: dict[type[TetherError], int] = {  # most specific first
    MalformedBody: 400,
    InvalidRequest: 422,
    NotFound: 404,
    Conflict: 409,
    Unauthorized: 401,
    StoreUnavailable: 503,
}

MESSAGE_MAX = 300
"""At most this many characters of a validation message are kept: msgspec
quotes the value it refused (`Invalid enum value '…'`), escaped, but whole."""

HTTP_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
}


class ErrorBody(msgspec.Struct, frozen=True, omit_defaults=True):
    code: str
    message: str
    details: Any = None


class ErrorResponse(msgspec.Struct, frozen=True):
    error: ErrorBody


RETRY_AFTER = "1"
"""Seconds a 503 (the store did not answer) asks a client to wait before it
tries again (`Retry-After`)."""
UNKNOWN_EFFECT = (
    "; the request may have taken effect all the same (the store may have applied it late):"
    " repeat it as it was (a job with its id is reattached, a callback is a duplicate, a"
    " cancel of a job it canceled is 409, a retry with `attempt` starts no other)"
)
"""What a 503 adds to a request that changes something when the store was
asked and did not answer in time, which is not the same as refused."""


def error_response(status: int, code: str, message: str, details: Any = None) -> Response[Any]:
    headers = None
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    elif status == 503:
        headers = {"Retry-After": RETRY_AFTER}
    return Response(
        ErrorResponse(ErrorBody(code, message, details)), status_code=status, headers=headers
    )


def tether_error(request: Request[Any, Any, Any], exc: TetherError) -> Response[Any]:
    status = next((s for cls, s in STATUS.items() if isinstance(exc, cls)), 400)
    message = exc.message
    if isinstance(exc, StoreUnavailable) and exc.unknown_effect and request.method == "POST":
        message += UNKNOWN_EFFECT
    return error_response(status, exc.code, message, exc.details)


def bad_request(message: str, field: str, where: str = "query") -> HTTPException:
    """A 400 naming the field (or query parameter) at fault."""
    return BadRequest(message, {"field": field, "in": where})


class BadRequest(HTTPException):
    """A malformed request found in the web layer (a query parameter the route
    does not take, one given twice): 400 with `details`."""

    status_code = 400

    def __init__(self, message: str, details: dict[str, Any]) -> None:
        super().__init__(detail=message)
        self.details = details


def _public_name(request: Request[Any, Any, Any], key: str, source: str) -> str:
    """The name a client uses for what Litestar reports as `key` (a handler's
    argument name, such as `job_state` for `?state=`, or `data` for the body)."""
    if source == "body":
        return "body" if key in ("", "data") else key.removeprefix("data.")
    try:
        kwarg = request.route_handler.parsed_fn_signature.parameters[key].kwarg_definition
    except (KeyError, AttributeError):
        return key
    for alias in ("query", "name", "header"):
        if isinstance(getattr(kwarg, alias, None), str):
            return str(getattr(kwarg, alias))
    return key


def validation_error(request: Request[Any, Any, Any], exc: ValidationException) -> Response[Any]:
    """Litestar's "validation failed" (a body or a parameter that does not fit
    its type): 400, the message and `details.field` naming what a client sent."""
    found = []
    for item in exc.extra if isinstance(exc.extra, list) else []:
        if not isinstance(item, dict):
            continue
        message = str(item.get("message", "invalid"))
        source = str(getattr(item.get("source"), "value", None) or item.get("source") or "body")
        field = field_of(message) if source == "body" else None
        field = field or _public_name(request, str(item.get("key") or ""), source)
        where = {"body": "body field", "query": "query parameter", "path": "path parameter"}
        what = where.get(source, source)
        text = message.split(" - at `")[0]
        if len(text) > MESSAGE_MAX:  # msgspec quotes the value it refused, however long
            text = f"{text[:MESSAGE_MAX]}…"
        details: dict[str, Any] = {"field": field, "in": source}
        about = "invalid body" if field == "body" else f"invalid {what} {field!r}"
        found.append((f"{about}: {text}", details))
    if not found:
        return error_response(400, "invalid_request", exc.detail or "invalid request")
    message, details = found[0]
    if len(found) > 1:
        message += f" (and {len(found) - 1} more)"
        details = {**details, "errors": [{"message": m, **d} for m, d in found]}
    return error_response(400, "invalid_request", message, details)


def http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    code = HTTP_CODES.get(exc.status_code, "error")
    message, details = exc.detail, getattr(exc, "details", None)
    if exc.status_code == 400 and details is None:  # Litestar could not read the body
        details = {"field": "body", "in": "body"}
        if message.startswith("JSON is malformed"):
            message = "the body is not valid JSON: " + message.removeprefix("JSON is malformed: ")
        else:
            message = "invalid body: " + message.split(" - at `")[0]
    if exc.status_code == 403 and is_page(request.url.path):  # a host not known: a page
        return error_page(message, 403)
    if exc.status_code == 404 and message == "Not Found":  # no route has this path
        if is_page(request.url.path):
            return missing_page(shown_path(request.url.path))
        message = (
            f"nothing at {shown_path(request.url.path)}: the API's routes are listed at /schema"
        )
        if request.url.path.startswith("/jobs/"):
            message += " (a job's id holds no '/')"
    if exc.status_code == 413:
        limit = request.route_handler.resolve_request_max_body_size()
        message = f"the body is larger than this service takes: at most {limit} bytes"
        details = {"field": "body", "limit_bytes": limit}
    response = error_response(exc.status_code, code, message, details)
    response.headers.update(exc.headers or {})  # `Allow` on a 405 (RFC 9110)
    return response


def too_deep(request: Request[Any, Any, Any], exc: RecursionError) -> Response[Any]:
    """A body too deep for msgspec's decoder (thousands of levels; what is
    decoded is refused past `MAX_DEPTH` where it is read) is the client's
    400, as the callbacks say it. Any other RecursionError is a fault of the
    service: 500, logged."""
    if "while deserializing" not in str(exc):  # msgspec's own words
        return internal_error(request, exc)
    message = f"invalid body: JSON nested more than {MAX_DEPTH} levels deep"
    return error_response(
        400, "invalid_request", message, {"field": "body", "in": "body", "limit_depth": MAX_DEPTH}
    )


def store_error(request: Request[Any, Any, Any], exc: ServerError | DecodingError) -> Response[Any]:
    """The store answered, but not as the protocol has it (a status of its
    own, a refused token, a proxy's error page): 503, as a store that does not
    answer."""
    what = (
        store_refusal(exc)
        if isinstance(exc, ServerError)
        else "an answer that is not the Resonate protocol's"
    )
    log.warning("the store refused %s %s (%s)", request.method, shown_path(request.url.path), what)
    return error_response(503, StoreUnavailable.code, f"the store refused the request ({what})")


def internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.error(
        "unhandled %s on %s %s",
        type(exc).__name__,
        request.method,
        shown_path(request.url.path),
        exc_info=exc,
    )
    return error_response(500, "internal", "internal error; the service log has the details")


def plugin_fault(request: Request[Any, Any, Any], exc: PluginFault) -> Response[Any]:
    """A backend's plugin broke its contract (core has logged it, in one line
    naming the backend): 500, with no traceback of Tether's to add."""
    return error_response(500, "internal", "internal error; the service log has the details")


EXCEPTION_HANDLERS: Any = {
    PluginFault: plugin_fault,
    TetherError: tether_error,
    ServerError: store_error,
    DecodingError: store_error,
    ValidationException: validation_error,
    HTTPException: http_error,
    RecursionError: too_deep,
    Exception: internal_error,
}
