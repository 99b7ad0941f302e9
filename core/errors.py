"""Domain errors. `api/errors.py` maps each one to an HTTP status; `core` never
speaks HTTP itself."""

from __future__ import annotations

from typing import Any


class TetherError(Exception):
    """Base of every error Tether reports to a client."""

    code = "error"

    def __init__(self, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidRequest(TetherError):
    """The request is malformed or names something invalid; nothing changed."""

    code = "invalid_request"


class MalformedBody(InvalidRequest):
    """The body could not be read at all (not JSON)."""


class NotFound(TetherError):
    code = "not_found"


class Conflict(TetherError):
    """The request disagrees with what is already recorded; nothing changed."""

    code = "conflict"


class Unauthorized(TetherError):
    code = "unauthorized"


class StoreUnavailable(TetherError):
    """The durable store did not answer."""

    code = "store_unavailable"


class BackendError(Exception):
    """Raised by a backend's `trigger` or `cancel` when the external system refused.

    `retryable=True` (a timeout, a 5xx, a 429) lets Tether try again with backoff;
    `retryable=False` (bad parameters, permission denied, not found) fails the job
    at once. `code` is the external system's own error code, if it has one. Never
    put a credential in the message: it ends up in the job record.
    """

    def __init__(
        self,
        message: str,
        *,
        retryable: bool = False,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.code = code
        self.retry_after = retry_after


class StoreConfigError(ValueError):
    """`TETHER_STORE` names a store Tether cannot open; the message says why."""
