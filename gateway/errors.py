"""Errors as the browser sees them.

Every error leaves the gateway in one JSON shape, ``{"error": {"code", "message", "retryable"}}``,
with a message a person can act on. Downstream failures arrive as domain errors
(``clipchat.errors.ClipChatError``, rebuilt from the gRPC status by ``clipchat.rpc``) and
``GRPC_TO_HTTP`` below is the one place that turns them into HTTP status codes. Errors the gateway
decides itself (authentication, signatures, request shape, rate limits) are ``ApiError``.

A dependency that is down (gRPC ``UNAVAILABLE``, ``DependencyUnavailable`` raised here, say by
storage, or a raw connection failure) is 503 ``{"code": "unavailable", "retryable": true}``, never
"internal"; every retryable 503 carries ``Retry-After``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from clipchat.errors import CODE_KEY, BudgetExceeded, ClipChatError, DependencyUnavailable, unexpected_error

log = logging.getLogger("clipchat.gateway")

GENERIC_MESSAGE = "Something went wrong on our side. Please try again in a moment."
RATE_LIMITED_CODE = "rate_limited"
BUDGET_CODE = BudgetExceeded.code
RESOURCE_EXHAUSTED_MESSAGE = ("This answer is too large to send. Ask for less (a smaller page) or try "
                              "again later.")
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
# What a retryable 503 asks the client to wait before trying again (Retry-After, seconds).
RETRY_AFTER_SECONDS = 5

# Downstream gRPC status → HTTP status. A status missing here is dependency trouble we cannot
# explain to a person: it becomes 503 "internal" with a generic message, never a 500.
GRPC_TO_HTTP: Mapping[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 422,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    # The budget (code "budget_exceeded"); "rate_limited" → 429; any other (a message over gRPC's
    # size limit) → 503 "resource_exhausted", never a budget answer.
    grpc.StatusCode.RESOURCE_EXHAUSTED: 402,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 503,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}


class ErrorBody(BaseModel):
    """What went wrong, for a person: a stable code, a message and whether retrying can help."""

    code: str
    message: str
    retryable: bool


class ErrorResponse(BaseModel):
    """The body of every error response."""

    error: ErrorBody


class ApiError(Exception):
    """An error the gateway decides itself (auth, signatures, request shape, rate limits)."""

    def __init__(self, status_code: int, code: str, message: str, *, retryable: bool = False,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.body = ErrorBody(code=code, message=message, retryable=retryable)
        self.headers = dict(headers or {})


def invalid_input(message: str) -> ApiError:
    """A 422 for a request a person has to change before sending it again."""
    return ApiError(422, "invalid_input", message)


def from_domain_error(exc: ClipChatError) -> tuple[int, ErrorBody]:
    """The HTTP status and body for a domain error (most come from a downstream gRPC status)."""
    status = GRPC_TO_HTTP.get(exc.status)
    if status is None:
        return 503, ErrorBody(code="internal", message=GENERIC_MESSAGE, retryable=exc.retryable)
    if exc.status is grpc.StatusCode.RESOURCE_EXHAUSTED:
        if exc.code == RATE_LIMITED_CODE:
            status = 429
        elif exc.code != BUDGET_CODE or not _stated_by_a_service(exc):
            return 503, ErrorBody(code="resource_exhausted", message=RESOURCE_EXHAUSTED_MESSAGE,
                                  retryable=False)
    return status, ErrorBody(code=exc.code, message=exc.message, retryable=exc.retryable)


def _stated_by_a_service(exc: ClipChatError) -> bool:
    """Whether a domain error rebuilt from a gRPC status carried its code in the trailing metadata.

    gRPC itself answers RESOURCE_EXHAUSTED for a message over the size limit, with no ClipChat code;
    ``from_rpc_error`` still rebuilds that as ``BudgetExceeded``, so the code alone cannot tell.
    """
    cause = exc.__cause__
    if not isinstance(cause, grpc.aio.AioRpcError):
        return True  # raised in this process, by ClipChat code
    return any(key == CODE_KEY for key, _ in cause.trailing_metadata() or ())


def error_response(status_code: int, body: ErrorBody,
                   headers: Mapping[str, str] | None = None) -> JSONResponse:
    """The one JSON error shape; a retryable 503 gets ``Retry-After`` unless ``headers`` has one."""
    return JSONResponse(ErrorResponse(error=body).model_dump(), status_code=status_code,
                        headers=with_retry_after(status_code, body.retryable, headers))


def with_retry_after(status_code: int, retryable: bool,
                     headers: Mapping[str, str] | None = None) -> dict[str, str]:
    """``headers`` plus ``Retry-After: RETRY_AFTER_SECONDS`` for a retryable 503 without one."""
    merged = dict(headers or {})
    if status_code == 503 and retryable and not any(k.lower() == "retry-after" for k in merged):
        merged["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return merged


def describe_validation_errors(errors: Sequence[Any], *, prefix: str = "") -> str:
    """One readable sentence for pydantic/FastAPI validation errors (the first few of them)."""
    if any(e.get("type") == "json_invalid" for e in errors):
        return "The request body is not valid JSON."
    parts = []
    for error in list(errors)[:3]:
        loc = [str(p) for p in error.get("loc", ()) if p not in ("body", "path", "query", "header")]
        where = ".".join([prefix, *loc] if prefix else loc) or "request"
        if error.get("type") == "missing":
            parts.append(f"{where} is required")
        else:
            message = str(error.get("msg", "is not valid")).removeprefix("Value error, ")
            parts.append(f"{where}: {message}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "Invalid request: " + "; ".join(parts) + more + "."


_HTTP_CODES: Mapping[int, tuple[str, str]] = {
    # FastAPI answers 400 for a body it cannot decode (JSON that is not UTF-8): invalid input, as
    # every other unreadable body is, and the status every operation with a body documents.
    400: ("invalid_input", "The request body could not be read: send JSON in UTF-8."),
    404: ("not_found", "There is nothing at this address. The API lives under /api/v1 "
                       "(see /openapi.json)."),
    405: ("method_not_allowed", "This method is not allowed here."),
    413: ("payload_too_large", "The request is too large."),
    415: ("unsupported_media_type", "This content type is not supported here."),
}


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status_code, exc.body, exc.headers)


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ClipChatError)
    status, body = from_domain_error(exc)
    if status >= 500:
        log.warning("gateway.dependency_error", extra={"path": request.url.path, "code": exc.code,
                                                       "grpc_status": exc.status.name})
    return error_response(status, body)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(422, ErrorBody(code="invalid_input",
                                         message=describe_validation_errors(exc.errors()),
                                         retryable=False))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code, message = _HTTP_CODES.get(exc.status_code, ("http_error", "The request was not accepted."))
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        # Starlette names only the method of the first route that matched the path.
        message = f"{request.method} is not allowed here; see /openapi.json for this path's methods."
        headers["Allow"] = ", ".join(_allowed_methods(request))
    status = 422 if exc.status_code == 400 else exc.status_code if exc.status_code < 500 else 503
    return error_response(status, ErrorBody(code=code, message=message, retryable=False), headers)


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this request's path (asked of each route, included
    routers too, as if the request had come with that method)."""
    routes = request.app.router.routes
    return [method for method in _METHODS
            if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes)]


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    error = unexpected_error(exc)
    if isinstance(error, DependencyUnavailable):  # a connection failed or timed out
        log.warning("gateway.dependency_unreachable", extra={"path": request.url.path,
                                                             "error": type(exc).__name__})
        return error_response(*from_domain_error(error))
    log.exception("gateway.unhandled", extra={"path": request.url.path}, exc_info=exc)
    return error_response(503, ErrorBody(code="internal", message=GENERIC_MESSAGE, retryable=True))


def install_error_handlers(app: FastAPI) -> None:
    """Give every error response, including FastAPI's and Starlette's own, the one JSON shape."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(ClipChatError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)


_DESCRIPTIONS: Mapping[int, str] = {
    401: "Missing or unknown token.",
    402: "Over the video's budget.",
    403: "Invalid or expired media link.",
    404: "No such job (or not yours), regeneration or version.",
    409: "Conflicting state (another regeneration runs, or it already finished).",
    413: "An upload is larger than allowed (CLIPCHAT_MAX_UPLOAD_BYTES per file, "
         "CLIPCHAT_MAX_REQUEST_BYTES in all).",
    422: "Invalid input.",
    429: "Too many requests, or too many failed sign-ins from this address; see Retry-After.",
    503: "A dependency is unavailable; retry later.",
}


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for these error statuses (503 is always possible, and 429
    wherever 401 is: failed authentications are limited per client address)."""
    codes: Iterable[int] = sorted({*statuses, 503, *((429,) if 401 in statuses else ())})
    return {s: {"model": ErrorResponse, "description": _DESCRIPTIONS[s]} for s in codes}
