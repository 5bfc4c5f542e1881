"""The one table from domain errors to gRPC status, as a real servicer answers it: ``rpc_method``
turns each ``ClipChatError`` subclass into its status code, its message as the details and its code
and retryability as trailing metadata; an exception nothing mapped is INTERNAL (a failed connection
UNAVAILABLE), never its text.

The calls go through grpc_testing's in-process server (no port, no channel) to the real
``RegeneratorServicer``, whose status client is made to fail with the error under test. grpc_testing
serves synchronous servicers and its ``abort`` sends no trailing metadata; ``_Async`` runs each async
method on an event loop of grpc_testing's calling thread and aborts as grpc.aio does: status, details
and the trailing metadata set before it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import grpc
import grpc_testing
import pytest

from clipchat import errors
from clipchat.errors import CODE_KEY, RETRYABLE_KEY, ClipChatError
from clipchat.settings import Settings
from clipchat.v1 import common_pb2, regenerator_pb2
from services.regenerator.server import RegeneratorServicer

# Every domain error: the status it must travel as, and its code and retryability.
EXPECTED: dict[type[ClipChatError], tuple[grpc.StatusCode, str, bool]] = {
    errors.ClipChatError: (grpc.StatusCode.INTERNAL, "internal", False),
    errors.InvalidInput: (grpc.StatusCode.INVALID_ARGUMENT, "invalid_input", False),
    errors.NotFound: (grpc.StatusCode.NOT_FOUND, "not_found", False),
    errors.ConcurrentRegeneration: (grpc.StatusCode.ABORTED, "regeneration_in_progress", True),
    errors.Conflict: (grpc.StatusCode.FAILED_PRECONDITION, "conflict", False),
    errors.StaleLease: (grpc.StatusCode.FAILED_PRECONDITION, "stale_lease", False),
    errors.BudgetExceeded: (grpc.StatusCode.RESOURCE_EXHAUSTED, "budget_exceeded", False),
    errors.DependencyUnavailable: (grpc.StatusCode.UNAVAILABLE, "unavailable", True),
    errors.DeadlineExceeded: (grpc.StatusCode.DEADLINE_EXCEEDED, "timeout", True),
    errors.MediaError: (grpc.StatusCode.INVALID_ARGUMENT, "invalid_media", False),
    errors.TransientError: (grpc.StatusCode.UNAVAILABLE, "transient", True),
    errors.ProviderUnavailable: (grpc.StatusCode.UNAVAILABLE, "provider_unavailable", True),
    errors.ProviderRefused: (grpc.StatusCode.INVALID_ARGUMENT, "provider_refused", False),
    errors.ProviderMisconfigured: (grpc.StatusCode.FAILED_PRECONDITION, "provider_misconfigured", False),
    errors.Cancelled: (grpc.StatusCode.CANCELLED, "cancelled", False),
}
SERVICE = regenerator_pb2.DESCRIPTOR.services_by_name["RegeneratorService"]
ESTIMATE = SERVICE.methods_by_name["EstimateRegeneration"]


class _Aborted(Exception):
    """Ends an async servicer method that aborted (grpc.aio's abort raises too)."""


class _AioContext:
    """The part of ``grpc.aio.ServicerContext`` the servicers use, over grpc_testing's context."""

    def __init__(self, context: Any) -> None:
        self._context = context

    def set_trailing_metadata(self, metadata: Any) -> None:
        self._context.set_trailing_metadata(metadata)

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self._context.set_code(code)
        self._context.set_details(details)
        raise _Aborted()


class _Async:
    """An async servicer as grpc_testing calls a synchronous one."""

    def __init__(self, servicer: Any) -> None:
        self._servicer = servicer

    def __getattr__(self, name: str) -> Callable[[Any, Any], Any]:
        method = getattr(self._servicer, name)

        def call(request: Any, context: Any) -> Any:
            try:
                return asyncio.run(method(request, _AioContext(context)))
            except _Aborted:
                return None
        return call


class FailingStatus:
    """The status client of the servicer under test: asked for a job, it raises ``error``, or
    answers a job of two clips."""

    deadline = 5.0

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error

    async def get_job(self, job_id: str, owner: str = "") -> common_pb2.Job:
        if self.error is not None:
            raise self.error
        return common_pb2.Job(job_id=job_id, owner=owner, total_cost="0", budget_limit="50",
                              clips=[common_pb2.Clip(clip_index=i, duration=2.0) for i in range(2)])


class PricedGenerator:
    name = "priced"

    def estimate_cost(self, duration: float) -> Decimal:
        return Decimal("0.05") * Decimal(str(duration))


@pytest.fixture
def status() -> FailingStatus:
    return FailingStatus()


@pytest.fixture
def server(status: FailingStatus) -> Iterator[grpc_testing.Server]:
    servicer = RegeneratorServicer(status=status, generator=PricedGenerator(),  # type: ignore[arg-type]
                                   settings=Settings())
    yield grpc_testing.server_from_dictionary({SERVICE: _Async(servicer)}, grpc_testing.strict_real_time())


def estimate(server: grpc_testing.Server, **fields: Any) -> tuple[Any, dict[str, str], grpc.StatusCode, str]:
    request = regenerator_pb2.EstimateRegenerationRequest(job_id="j", **fields)
    rpc = server.invoke_unary_unary(ESTIMATE, (), request, None)
    response, trailing, code, details = rpc.termination()
    return response, dict(trailing or ()), code, details


def _every_error(base: type[ClipChatError] = ClipChatError) -> Iterator[type[ClipChatError]]:
    yield base
    for subclass in base.__subclasses__():
        yield from _every_error(subclass)


def test_the_table_names_every_domain_error() -> None:
    """Every error of clipchat.errors (the services' own subclasses share their bases' status)."""
    assert {cls for cls in _every_error() if cls.__module__ == errors.__name__} == set(EXPECTED)


@pytest.mark.parametrize("error_class", list(EXPECTED), ids=lambda cls: cls.__name__)
def test_each_domain_error_travels_as_its_status_code(server: grpc_testing.Server, status: FailingStatus,
                                                      error_class: type[ClipChatError]) -> None:
    status.error = error_class("What to do about it.")
    _, trailing, code, details = estimate(server, owner="alice", clip_index=0)
    expected_code, domain_code, retryable = EXPECTED[error_class]
    assert code is expected_code
    assert details == "What to do about it."
    assert (trailing[CODE_KEY], trailing[RETRYABLE_KEY]) == (domain_code, "true" if retryable else "false")


@pytest.mark.parametrize(("error", "expected_code", "domain_code"), [
    (RuntimeError("lease 5f3c… in table jobs"), grpc.StatusCode.INTERNAL, "internal"),
    (KeyError("owner"), grpc.StatusCode.INTERNAL, "internal"),
    (ConnectionRefusedError(111, "refused"), grpc.StatusCode.UNAVAILABLE, "unavailable"),
    (TimeoutError(), grpc.StatusCode.UNAVAILABLE, "unavailable"),
], ids=lambda value: type(value).__name__ if isinstance(value, Exception) else None)
def test_an_error_nothing_mapped_says_nothing_of_itself(server: grpc_testing.Server, status: FailingStatus,
                                                         error: Exception, expected_code: grpc.StatusCode,
                                                         domain_code: str) -> None:
    status.error = error
    _, trailing, code, details = estimate(server, owner="alice", clip_index=0)
    assert code is expected_code and trailing[CODE_KEY] == domain_code
    assert details and (not str(error) or str(error) not in details)


def test_the_servicers_own_checks_and_an_answer(server: grpc_testing.Server) -> None:
    _, trailing, code, details = estimate(server, clip_index=0)
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "needs an owner" in details
    _, trailing, code, _ = estimate(server, owner="alice", clip_indices=[0, 2])
    assert code is grpc.StatusCode.INVALID_ARGUMENT and trailing[CODE_KEY] == "clip_index_out_of_range"
    response, _, code, _ = estimate(server, owner="alice", all_clips=True)
    assert code is grpc.StatusCode.OK and response.estimated_cost == "0.2040"  # 2 × 0.10, and 0.004 to compose 4 s
