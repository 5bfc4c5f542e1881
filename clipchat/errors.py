"""Domain errors and the one table that maps them to gRPC status codes.

Each error carries a message a person can act on, a stable code and whether a retry can help.
The gateway maps gRPC status codes to HTTP with one other table (``gateway/errors.py``).
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from decimal import Decimal

import grpc


class ClipChatError(Exception):
    """Base of every domain error."""

    code = "internal"
    status = grpc.StatusCode.INTERNAL
    retryable = False
    default_message = "Something went wrong. Please try again."

    def __init__(self, message: str | None = None, *, code: str | None = None,
                 retryable: bool | None = None) -> None:
        super().__init__(message or self.default_message)
        self.message = message or self.default_message
        if code is not None:
            self.code = code
        if retryable is not None:
            self.retryable = retryable


class InvalidInput(ClipChatError):
    code = "invalid_input"
    status = grpc.StatusCode.INVALID_ARGUMENT
    default_message = "The request is not valid."


class NotFound(ClipChatError):
    code = "not_found"
    status = grpc.StatusCode.NOT_FOUND
    default_message = "Not found."


class ConcurrentRegeneration(ClipChatError):
    code = "regeneration_in_progress"
    status = grpc.StatusCode.ABORTED
    retryable = True
    default_message = "Another regeneration is running for this video. Wait for it to finish or cancel it."


class Conflict(ClipChatError):
    code = "conflict"
    status = grpc.StatusCode.FAILED_PRECONDITION
    default_message = "That is not possible in the current state."


class StaleLease(ClipChatError):
    """A write carried a lease token that is no longer the job's live lease (fencing)."""

    code = "stale_lease"
    status = grpc.StatusCode.FAILED_PRECONDITION
    default_message = "This work was cancelled or taken over; its result was discarded."


class BudgetExceeded(ClipChatError):
    code = "budget_exceeded"
    status = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_message = "This regeneration would exceed the video's budget."


class DependencyUnavailable(ClipChatError):
    code = "unavailable"
    status = grpc.StatusCode.UNAVAILABLE
    retryable = True
    default_message = "A service is unavailable right now. Please try again shortly."


class DeadlineExceeded(ClipChatError):
    code = "timeout"
    status = grpc.StatusCode.DEADLINE_EXCEEDED
    retryable = True
    default_message = "The request took too long. Please try again."


class MediaError(ClipChatError):
    """A clip or track that cannot be read or composed (permanent)."""

    code = "invalid_media"
    status = grpc.StatusCode.INVALID_ARGUMENT
    default_message = "A media file could not be read."


class TransientError(ClipChatError):
    """A failure a retry may fix (download, upload, a killed process)."""

    code = "transient"
    status = grpc.StatusCode.UNAVAILABLE
    retryable = True


class ProviderUnavailable(TransientError):
    """An outside provider (LLM, video generator) could not answer usefully now; a later attempt may succeed.

    ``retry_after`` is the wait in seconds the provider asked for, when it said; ``detail`` is
    technical context for logs, never shown to users.
    """

    code = "provider_unavailable"

    def __init__(self, message: str | None = None, *, code: str | None = None,
                 retry_after: float | None = None, detail: str = "") -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after
        self.detail = detail


class ProviderRefused(InvalidInput):
    """An outside provider refused the request for good; retrying the same input will not help.

    ``detail`` carries the provider's response for support; ``cost`` and ``usage`` are what the
    refusal was billed, when the provider said.
    """

    code = "provider_refused"

    def __init__(self, message: str | None = None, *, code: str | None = None, detail: str = "",
                 cost: Decimal = Decimal("0"), usage: Mapping[str, int] | None = None) -> None:
        super().__init__(message, code=code)
        self.detail = detail
        self.cost = cost
        self.usage = dict(usage or {})


class ProviderMisconfigured(ProviderRefused):
    """An outside provider refused ClipChat's own request: its credentials, the account's credit, the
    configured model or version, or the input schema. An operator must fix the configuration; the
    person's instruction is not at fault and retrying as it is will not help.

    ``detail`` carries the provider's answer for the operator.
    """

    code = "provider_misconfigured"
    status = grpc.StatusCode.FAILED_PRECONDITION
    default_message = "An AI service ClipChat uses is not set up correctly. Please contact support."


class Cancelled(ClipChatError):
    code = "cancelled"
    status = grpc.StatusCode.CANCELLED
    default_message = "The regeneration was cancelled."


def unexpected_error(exc: Exception) -> ClipChatError:
    """The domain error to report for an exception that nothing mapped.

    A connection refused, reset or timed out, or a name that did not resolve, means a dependency
    did not answer: ``DependencyUnavailable`` (retryable). Anything else is a bug: a generic
    internal error, whose detail belongs in the logs, not in the message.
    """
    if isinstance(exc, (ConnectionError, TimeoutError, socket.gaierror)):
        return DependencyUnavailable()
    return ClipChatError()


_BY_STATUS: dict[grpc.StatusCode, type[ClipChatError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInput,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ABORTED: ConcurrentRegeneration,
    grpc.StatusCode.FAILED_PRECONDITION: Conflict,
    grpc.StatusCode.RESOURCE_EXHAUSTED: BudgetExceeded,
    grpc.StatusCode.UNAVAILABLE: DependencyUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
}

# Domain errors that share their gRPC status with a more general one, told apart by their code.
_BY_CODE: dict[str, type[ClipChatError]] = {StaleLease.code: StaleLease}

# Trailing metadata keys that carry the domain code and retryability across gRPC.
CODE_KEY = "clipchat-error-code"
RETRYABLE_KEY = "clipchat-retryable"


def from_rpc_error(error: grpc.aio.AioRpcError | grpc.RpcError) -> ClipChatError:
    """Rebuild the domain error a server raised from the gRPC error a client received."""
    status = error.code()  # type: ignore[union-attr]
    meta = {k: v for k, v in (error.trailing_metadata() or ())}  # type: ignore[union-attr]
    cls = _BY_STATUS.get(status, ClipChatError)
    special = _BY_CODE.get(meta.get(CODE_KEY, ""))
    if special is not None and special.status is status:
        cls = special
    retryable = meta.get(RETRYABLE_KEY)
    details = error.details() or None  # type: ignore[union-attr]
    if status in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and CODE_KEY not in meta:
        details = None  # transport text is not for people
    if status is grpc.StatusCode.INTERNAL or status is grpc.StatusCode.UNKNOWN:
        details = None
    return cls(details, code=meta.get(CODE_KEY) or None,
               retryable=None if retryable is None else retryable == "true")
