"""Domain errors survive a trip through gRPC status and trailing metadata."""

from __future__ import annotations

import grpc
import pytest

from clipchat.errors import (
    CODE_KEY,
    RETRYABLE_KEY,
    BudgetExceeded,
    ClipChatError,
    ConcurrentRegeneration,
    Conflict,
    DependencyUnavailable,
    InvalidInput,
    NotFound,
    StaleLease,
    from_rpc_error,
)


class FakeRpcError(grpc.RpcError):
    def __init__(self, error: ClipChatError | None, status: grpc.StatusCode, details: str = "") -> None:
        self._status = status
        self._details = details or (error.message if error else "")
        self._meta = ((CODE_KEY, error.code), (RETRYABLE_KEY, "true" if error.retryable else "false")) \
            if error else ()

    def code(self) -> grpc.StatusCode:
        return self._status

    def details(self) -> str:
        return self._details

    def trailing_metadata(self):  # type: ignore[no-untyped-def]
        return self._meta


@pytest.mark.parametrize("error", [
    InvalidInput("Clip index 9 is out of range."), NotFound(), ConcurrentRegeneration(), Conflict("done"),
    StaleLease(), BudgetExceeded("over"), DependencyUnavailable(),
])
def test_round_trip(error: ClipChatError) -> None:
    back = from_rpc_error(FakeRpcError(error, error.status))
    assert type(back) is type(error)
    assert back.code == error.code and back.message == error.message and back.retryable == error.retryable


def test_transport_text_is_not_shown_to_people() -> None:
    back = from_rpc_error(FakeRpcError(None, grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses"))
    assert isinstance(back, DependencyUnavailable)
    assert "addresses" not in back.message
    internal = from_rpc_error(FakeRpcError(None, grpc.StatusCode.INTERNAL, "Traceback ..."))
    assert "Traceback" not in internal.message
