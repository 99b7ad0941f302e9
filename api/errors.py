"""One place that turns errors into HTTP answers of one shape:
`{"error": {"code": "...", "message": "...", "details": ...}}`."""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

from core.errors import (
    Conflict,
    InvalidRequest,
    MalformedBody,
    NotFound,
    StoreUnavailable,
    TetherError,
    Unauthorized,
)

log = logging.getLogger("tether.api")

STATUS: dict[type[TetherError], int] = {  # most specific first
    MalformedBody: 400,
    InvalidRequest: 422,
    NotFound: 404,
    Conflict: 409,
    Unauthorized: 401,
    StoreUnavailable: 503,
}

HTTP_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
}


class ErrorBody(msgspec.Struct, frozen=True, omit_defaults=True):
    code: str
    message: str
    details: Any = None


class ErrorResponse(msgspec.Struct, frozen=True):
    error: ErrorBody


def error_response(status: int, code: str, message: str, details: Any = None) -> Response[Any]:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return Response(
        ErrorResponse(ErrorBody(code, message, details)), status_code=status, headers=headers
    )


def tether_error(_: Request[Any, Any, Any], exc: TetherError) -> Response[Any]:
    status = next((s for cls, s in STATUS.items() if isinstance(exc, cls)), 400)
    return error_response(status, exc.code, exc.message, exc.details)


def validation_error(_: Request[Any, Any, Any], exc: ValidationException) -> Response[Any]:
    details = [
        {k: v for k, v in item.items() if k in ("key", "message", "source")}
        for item in (exc.extra if isinstance(exc.extra, list) else [])
        if isinstance(item, dict)
    ]
    return error_response(400, "invalid_request", exc.detail or "invalid request", details or None)


def http_error(_: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    code = HTTP_CODES.get(exc.status_code, "error")
    return error_response(exc.status_code, code, exc.detail)


def too_deep(_: Request[Any, Any, Any], exc: RecursionError) -> Response[Any]:
    return error_response(400, "invalid_request", "JSON nested too deeply")


def internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.error(
        "unhandled %s on %s %s", type(exc).__name__, request.method, request.url.path, exc_info=exc
    )
    return error_response(500, "internal", "internal error; the service log has the details")


EXCEPTION_HANDLERS: Any = {
    TetherError: tether_error,
    ValidationException: validation_error,
    HTTPException: http_error,
    RecursionError: too_deep,
    Exception: internal_error,
}
