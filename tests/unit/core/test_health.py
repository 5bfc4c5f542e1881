"""Health that follows dependencies, on a real in-process ``grpc.aio`` server (port 0)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clipchat.db import Database
from clipchat.health import LIVENESS_SERVICE, dependency_service_name
from clipchat.rpc import GrpcServer, create_server
from clipchat.v1 import composer_pb2_grpc
from tests.conftest import free_port

SERVICE = "clipchat.v1.ComposerService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
INTERVAL = 0.05


@dataclass
class FakeDependency:
    """A check whose answer the test sets; counts its pings."""

    up: bool = True
    pings: int = 0

    async def __call__(self) -> bool:
        self.pings += 1
        return self.up


@pytest.fixture
async def server() -> AsyncIterator[GrpcServer]:
    running = await create_server([(composer_pb2_grpc.add_ComposerServiceServicer_to_server,
                                    composer_pb2_grpc.ComposerServiceServicer(), SERVICE)])
    yield running
    await running.stop(0)


@pytest.fixture
async def health(server: GrpcServer) -> AsyncIterator[Callable[[str], Awaitable[int]]]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        async def status(name: str) -> int:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            return int(reply.status)
        yield status


async def eventually(read: Callable[[], Awaitable[object]], expected: object, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while (value := await read()) != expected:
        assert time.monotonic() < deadline, f"still {value!r}, expected {expected!r}"
        await asyncio.sleep(0.01)


async def statuses(health: Callable[[str], Awaitable[int]]) -> dict[str, int]:
    names = ["", SERVICE, dependency_service_name("database"), dependency_service_name("broker")]
    return {name: await health(name) for name in names}


async def test_health_follows_each_dependency_and_names_the_one_that_is_down(
        server: GrpcServer, health: Callable[[str], Awaitable[int]]) -> None:
    database, broker = FakeDependency(), FakeDependency()
    await server.watch({"database": database, "broker": broker}, interval=INTERVAL)
    everything_up = {"": SERVING, SERVICE: SERVING, "clipchat.dependency.database": SERVING,
                     "clipchat.dependency.broker": SERVING}
    assert await statuses(health) == everything_up  # known as soon as watch() returns

    database.up = False
    await eventually(lambda: statuses(health), {"": NOT_SERVING, SERVICE: NOT_SERVING,
                                                "clipchat.dependency.database": NOT_SERVING,
                                                "clipchat.dependency.broker": SERVING})
    database.up = True
    await eventually(lambda: statuses(health), everything_up)


async def test_liveness_stays_serving_while_a_dependency_is_down(
        server: GrpcServer, health: Callable[[str], Awaitable[int]]) -> None:
    await server.watch({"database": FakeDependency(up=False)}, interval=INTERVAL)
    assert await health("") == NOT_SERVING
    assert await health(LIVENESS_SERVICE) == SERVING


async def test_a_check_that_hangs_or_raises_is_down(server: GrpcServer,
                                                    health: Callable[[str], Awaitable[int]]) -> None:
    async def hangs() -> bool:
        await asyncio.Event().wait()
        return True

    async def raises() -> bool:
        raise ConnectionResetError("reset by peer")

    started = time.monotonic()
    await server.watch({"slow": hangs, "broken": raises, "fine": FakeDependency()}, interval=1.0,
                       timeout=0.1)
    assert time.monotonic() - started < 1.0  # the hanging ping was cut at its timeout
    assert await health(dependency_service_name("slow")) == NOT_SERVING
    assert await health(dependency_service_name("broken")) == NOT_SERVING
    assert await health(dependency_service_name("fine")) == SERVING
    assert await health("") == NOT_SERVING


async def test_a_database_on_a_closed_port_makes_the_server_not_serving(
        server: GrpcServer, health: Callable[[str], Awaitable[int]]) -> None:
    db = Database(f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/test")
    try:
        watcher = await server.watch({"database": db.ping}, interval=INTERVAL, timeout=2.0)
        assert watcher.states == {"database": False}
        assert await health(dependency_service_name("database")) == NOT_SERVING
        assert await health("") == NOT_SERVING and await health(SERVICE) == NOT_SERVING
    finally:
        await server.stop(0)
        await db.dispose()


async def test_transitions_are_logged_once_not_per_ping(server: GrpcServer,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    database = FakeDependency()
    caplog.set_level(logging.INFO, logger="clipchat.health")
    watcher = await server.watch({"database": database}, interval=0.01)

    async def pings_pass(count: int) -> None:
        target = database.pings + count
        await eventually(lambda: asyncio.sleep(0, database.pings >= target), True)

    database.up = False
    await pings_pass(5)
    assert watcher.states == {"database": False}
    database.up = True
    await pings_pass(5)
    events = [(r.getMessage(), getattr(r, "dependency", None)) for r in caplog.records]
    assert events == [("health.dependency_down", "database"), ("health.dependency_up", "database")]


async def test_draining_is_not_undone_by_healthy_dependencies(server: GrpcServer,
                                                              health: Callable[[str], Awaitable[int]]) -> None:
    database = FakeDependency()
    await server.watch({"database": database}, interval=0.01)
    await server.set_serving(False)  # draining before a stop
    pings = database.pings
    await eventually(lambda: asyncio.sleep(0, database.pings >= pings + 3), True)
    assert await health("") == NOT_SERVING
    assert await health(dependency_service_name("database")) == SERVING


async def test_stop_cancels_the_watcher_and_reports_not_serving_first(server: GrpcServer) -> None:
    database = FakeDependency()
    watcher = await server.watch({"database": database}, interval=0.01)
    seen_at_stop: list[int] = []
    stop_server = server.server.stop

    async def stop_spy(grace: float | None) -> None:
        # The servicer answers Check for a known name without touching the context.
        reply = await server.health.Check(health_pb2.HealthCheckRequest(service=""), None)
        seen_at_stop.append(reply.status)
        await stop_server(grace)

    server.server.stop = stop_spy  # type: ignore[method-assign]
    await server.stop(grace=1)
    assert seen_at_stop == [NOT_SERVING]
    assert watcher._task is None
    pings = database.pings
    await asyncio.sleep(0.05)
    assert database.pings == pings  # no more pings after stop


async def test_watch_twice_is_refused(server: GrpcServer) -> None:
    await server.watch({"database": FakeDependency()}, interval=1.0)
    with pytest.raises(RuntimeError):
        await server.watch({"broker": FakeDependency()}, interval=1.0)
