"""Fixtures of the status service's tests: a migrated database (SQLite and PostgreSQL) and a clock."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import grpc
import pytest

from clipchat.db import Database
from clipchat.db.migrate import upgrade
from clipchat.db.models import utcnow
from clipchat.v1 import jobs_pb2_grpc
from services.status.service import StatusService


class Clock:
    """A clock the test moves by hand (lease and claim expiry without waiting)."""

    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    await upgrade(database_url)
    database = Database(database_url)
    yield database
    await database.dispose()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def stub(service: StatusService) -> AsyncIterator[jobs_pb2_grpc.JobStatusServiceStub]:
    """A client of the module's ``service`` fixture (the status service over real gRPC)."""
    assert service.grpc is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc.port}") as channel:
        yield jobs_pb2_grpc.JobStatusServiceStub(channel)
