"""Thin controllers: each is a docstring, one call into `core.service`, a response."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.connection import ASGIConnection
from litestar.di import NamedDependency
from litestar.exceptions import HTTPException, NotAuthorizedException
from litestar.handlers import BaseRouteHandler
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter

from api.errors import ErrorBody, ErrorResponse
from core.models import Job, JobPage, JobRequest, JobState
from core.service import Tether
from core.settings import Settings


def errors(*codes: int) -> dict[int, ResponseSpec]:
    """OpenAPI entries for the error answers a route may give."""
    return {c: ResponseSpec(ErrorResponse, description=ERROR_TEXT[c]) for c in codes}


ERROR_TEXT = {
    400: "Malformed request",
    401: "Missing or invalid token",
    404: "Not found",
    409: "Conflicts with what is recorded; nothing changed",
    413: "Body too large",
    415: "The body is not sent as application/json",
    422: "Invalid request; the message names what is wrong",
    503: "The store did not answer",
}


async def require_json(
    connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
) -> None:
    """A body sent as something other than JSON is refused (415), not guessed at."""
    media = connection.headers.get("content-type", "application/json").split(";")[0].strip()
    if media != "application/json" and not media.endswith("+json"):
        raise HTTPException(
            status_code=415, detail=f"send the body as application/json, not {media[:100]!r}"
        )


Guard = Callable[[ASGIConnection[Any, Any, Any, Any], BaseRouteHandler], Awaitable[None]]


def api_token_guard(settings: Settings) -> Guard:
    """When TETHER_API_TOKEN is set, `/jobs*` need `Authorization: Bearer <token>`."""
    expected = settings.api_token.encode()

    async def require_api_token(  # async: Litestar runs a sync guard in a thread
        connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
    ) -> None:
        if not expected:
            return
        given = bearer(connection)
        if given is None or not hmac.compare_digest(given.encode(), expected):
            raise NotAuthorizedException("missing or invalid API token")

    return require_api_token


def bearer(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, if there is one."""
    scheme, _, given = connection.headers.get("authorization", "").partition(" ")
    return given if scheme.lower() == "bearer" else None


class JobController(Controller):
    path = "/jobs"
    tags = ["jobs"]  # noqa: RUF012

    @post(
        "/",
        status_code=201,
        guards=[require_json],
        responses={
            200: ResponseSpec(Job, description="The same request again: the existing job"),
            **errors(400, 401, 409, 413, 415, 422, 503),
        },
    )
    async def create(
        self, tether: NamedDependency[Tether], data: JSONBody[JobRequest]
    ) -> Response[Job]:
        """Start a job. 201 when new; 200 when the same id came with the same
        request before (nothing is triggered again); 409 for the same id with a
        different request; 422 for an unknown backend or bad params."""
        job, created = await tether.create_job(data)
        return Response(job, status_code=201 if created else 200)

    @get("/", responses=errors(400, 401, 422, 503))
    async def list_jobs(
        self,
        tether: NamedDependency[Tether],
        job_state: Annotated[JobState | None, QueryParameter(name="state")] = None,
        backend: FromQuery[str | None] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
        cursor: FromQuery[str | None] = None,
    ) -> JobPage:
        """Jobs, newest first, optionally of one state and one backend. Pass
        `next_cursor` back as `cursor` for the next page."""
        return await tether.list_jobs(job_state, backend, limit, cursor)

    @get("/{job_id:str}", responses=errors(400, 401, 404, 503))
    async def get_job(self, tether: NamedDependency[Tether], job_id: FromPath[str]) -> Job:
        """One job."""
        return await tether.get_job(job_id)

    @post("/{job_id:str}/cancel", status_code=200, responses=errors(400, 401, 404, 409, 503))
    async def cancel(self, tether: NamedDependency[Tether], job_id: FromPath[str]) -> Job:
        """Cancel a waiting job: it becomes `canceled` and its backend is asked
        to stop the external run. 409 when the job already finished."""
        return await tether.cancel_job(job_id)


class CallbackResponse(msgspec.Struct, frozen=True, omit_defaults=True):
    outcome: str
    """`accepted`, `duplicate`, `noted` (a hint: the backend was asked), `conflict` or `gone`."""
    job: Job
    message: str
    error: ErrorBody | None = None


CALLBACK_STATUS = {
    "accepted": 200,
    "duplicate": 200,
    "noted": 202,
    "conflict": 409,
    "gone": 410,
}


class CallbackController(Controller):
    path = "/callbacks"
    tags = ["callbacks"]  # noqa: RUF012

    @post(
        "/{promise_id:str}",
        status_code=200,
        responses={
            202: ResponseSpec(CallbackResponse, description="A hint: the backend was asked"),
            409: ResponseSpec(CallbackResponse, description="A different outcome came first"),
            410: ResponseSpec(CallbackResponse, description="The job was canceled or timed out"),
            **errors(400, 401, 404, 413, 422, 503),
        },
    )
    async def settle(
        self,
        request: Request[Any, Any, Any],
        tether: NamedDependency[Tether],
        promise_id: FromPath[str],
        token: FromQuery[str | None] = None,
    ) -> Response[CallbackResponse]:
        """Report how an external job ended. The token comes from the callback
        URL (`?token=`) or as `Authorization: Bearer`. Body:
        `{"status": "succeeded"|"failed", "result"?: any, "error"?: {"message", "type"?}}`
        (or the backend's native shape). 200 accepted or duplicate, 409 a
        different outcome was recorded first, 202 a backend-native hint (the
        backend was asked about the run at once), 410 the job was canceled or timed
        out, 404 unknown promise, 401 bad token, 400/422 malformed body."""
        if token is None:
            token = bearer(request)
        body = await request.body()
        result = await tether.callback(promise_id, token, body)
        error = None
        if result.outcome in ("conflict", "gone"):
            error = ErrorBody(code=result.outcome, message=result.message)
        return Response(
            CallbackResponse(result.outcome, result.job, result.message, error),
            status_code=CALLBACK_STATUS[result.outcome],
        )


@get("/health", tags=["health"], responses=errors(503))
async def health(tether: NamedDependency[Tether]) -> dict[str, Any]:
    """200 `{"status": "ok", ...}` when the store answers, else 503."""
    return await tether.health()
