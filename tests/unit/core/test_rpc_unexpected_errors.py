"""An exception no servicer mapped: a failed connection is UNAVAILABLE (retryable), the rest INTERNAL."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from clipchat.errors import ClipChatError, DependencyUnavailable, unexpected_error
from clipchat.rpc import GrpcServer, call, create_server, rpc_method
from clipchat.v1 import composer_pb2, composer_pb2_grpc


class Failing(composer_pb2_grpc.ComposerServiceServicer):
    def __init__(self) -> None:
        self.error: Exception = RuntimeError()

    @rpc_method
    async def Describe(self, request: composer_pb2.DescribeRequest, context: Any) -> composer_pb2.ComposerInfo:
        raise self.error


@pytest.fixture
async def servicer() -> AsyncIterator[tuple[Failing, str]]:
    failing = Failing()
    server: GrpcServer = await create_server([(composer_pb2_grpc.add_ComposerServiceServicer_to_server,
                                               failing, "clipchat.v1.ComposerService")])
    yield failing, f"127.0.0.1:{server.port}"
    await server.stop(0)


@pytest.mark.parametrize("error", [ConnectionRefusedError(111, "refused"), ConnectionResetError(),
                                   TimeoutError(),
                                   socket.gaierror(-2, "Name or service not known")],
                         ids=lambda e: type(e).__name__)
def test_connection_failures_are_unavailable(error: Exception) -> None:
    mapped = unexpected_error(error)
    assert isinstance(mapped, DependencyUnavailable) and mapped.retryable


@pytest.mark.parametrize("error", [KeyError("lease"), ValueError(), OSError(28, "No space left on device")],
                         ids=lambda e: type(e).__name__)
def test_other_errors_are_internal(error: Exception) -> None:
    mapped = unexpected_error(error)
    assert type(mapped) is ClipChatError and mapped.status is grpc.StatusCode.INTERNAL


async def test_a_raw_connection_error_in_a_servicer_reaches_the_client_as_unavailable(
        servicer: tuple[Failing, str]) -> None:
    failing, addr = servicer
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = composer_pb2_grpc.ComposerServiceStub(channel)
        failing.error = ConnectionRefusedError(111, "Connect call failed ('10.0.0.7', 5432)")
        with pytest.raises(DependencyUnavailable) as unavailable:
            await call(stub.Describe, composer_pb2.DescribeRequest(), timeout=5)
        assert unavailable.value.retryable and "10.0.0.7" not in unavailable.value.message
        failing.error = KeyError("lease")
        with pytest.raises(ClipChatError) as internal:
            await call(stub.Describe, composer_pb2.DescribeRequest(), timeout=5)
        assert internal.value.status is grpc.StatusCode.INTERNAL and not internal.value.retryable
