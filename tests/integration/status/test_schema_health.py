"""Migrations before traffic: the status service is NOT_SERVING while its schema is behind the code."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import text

from clipchat.broker.memory import InMemoryBroker
from clipchat.db import Database
from clipchat.db.migrate import head_revision, schema_at_head, upgrade
from clipchat.health import dependency_service_name
from clipchat.settings import Settings
from services.status.server import SERVICE_NAME
from services.status.service import StatusService


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database(database_url)
    yield database
    await database.dispose()


async def _health(port: int, name: str) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=name),
                                                                 timeout=5)
        return int(answer.status)


async def test_schema_at_head_only_after_every_migration(database_url: str, db: Database) -> None:
    assert await schema_at_head(db) is False  # nothing migrated: no alembic_version table
    await upgrade(database_url, "0002")
    assert await schema_at_head(db) is False
    await upgrade(database_url)
    assert await schema_at_head(db) is True
    assert head_revision() == await _version(db)


async def _version(db: Database) -> str:
    async with db.read() as session:
        return str((await session.execute(text("SELECT version_num FROM alembic_version"))).scalar_one())


async def test_status_service_serves_only_once_the_schema_is_at_head(database_url: str, db: Database) -> None:
    await upgrade(database_url, "0002")  # the previous release's schema: a rollout before its migration
    settings = Settings(database_url=database_url, health_check_interval_seconds=3600)
    broker = InMemoryBroker()
    await broker.connect()
    service = StatusService(settings, db, broker)
    grpc_server = await service.start(port=0)
    try:
        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        assert await _health(grpc_server.port, dependency_service_name("schema")) == not_serving
        assert await _health(grpc_server.port, dependency_service_name("database")) == serving
        assert await _health(grpc_server.port, SERVICE_NAME) == not_serving

        await upgrade(database_url)
        assert grpc_server.watcher is not None
        await grpc_server.watcher.check_now()
        assert await _health(grpc_server.port, dependency_service_name("schema")) == serving
        assert await _health(grpc_server.port, SERVICE_NAME) == serving
    finally:
        await service.stop()
        await broker.close()
