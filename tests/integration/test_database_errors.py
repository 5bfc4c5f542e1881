"""A database that is down is ``DependencyUnavailable`` (retryable); errors in the SQL are not."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlparse

import asyncpg
import grpc
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, IntegrityError

from clipchat.db import UNAVAILABLE_MESSAGE, Database
from clipchat.errors import DependencyUnavailable
from tests.conftest import free_port

pytestmark = pytest.mark.postgres


@pytest.fixture
async def db(postgres_url: str) -> AsyncIterator[Database]:
    database = Database(postgres_url)
    async with database.transaction() as session:
        await session.execute(text("CREATE TABLE items (id integer PRIMARY KEY)"))
        await session.execute(text("INSERT INTO items VALUES (1)"))
    yield database
    await database.dispose()


def plain_dsn(sqlalchemy_url: str) -> str:
    return sqlalchemy_url.replace("postgresql+asyncpg://", "postgresql://")


def assert_unavailable(exc: DependencyUnavailable) -> None:
    assert exc.retryable is True
    assert exc.status is grpc.StatusCode.UNAVAILABLE
    assert exc.code == "unavailable" and exc.message == UNAVAILABLE_MESSAGE


async def test_a_closed_port_is_unavailable_at_once() -> None:
    db = Database(f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/test")
    started = time.monotonic()
    try:
        for open_session in (db.read, db.transaction):
            with pytest.raises(DependencyUnavailable) as caught:
                async with open_session() as session:
                    await session.execute(text("SELECT 1"))
            assert_unavailable(caught.value)
            assert isinstance(caught.value.__cause__, ConnectionRefusedError)
        assert await db.ping() is False
    finally:
        await db.dispose()
    assert time.monotonic() - started < 5


async def test_a_terminated_backend_is_unavailable_then_the_pool_reconnects(
        db: Database, postgres_url: str) -> None:
    admin = await asyncpg.connect(plain_dsn(postgres_url))
    try:
        with pytest.raises(DependencyUnavailable) as caught:
            async with db.transaction() as session:
                pid = (await session.execute(text("SELECT pg_backend_pid()"))).scalar_one()
                assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid) is True
                await session.execute(text("INSERT INTO items VALUES (2)"))
        assert_unavailable(caught.value)
        # The dead connection was dropped from the pool; the next use gets a fresh one.
        async with db.read() as session:
            assert (await session.execute(text("SELECT count(*) FROM items"))).scalar_one() == 1
        assert await db.ping() is True
    finally:
        await admin.close()


async def test_a_backend_terminated_before_commit_is_unavailable(db: Database, postgres_url: str) -> None:
    admin = await asyncpg.connect(plain_dsn(postgres_url))
    try:
        with pytest.raises(DependencyUnavailable):
            async with db.transaction() as session:
                await session.execute(text("INSERT INTO items VALUES (3)"))
                pid = (await session.execute(text("SELECT pg_backend_pid()"))).scalar_one()
                await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
                await asyncio.sleep(0.2)  # let the client see the close before COMMIT
    finally:
        await admin.close()
    async with db.read() as session:
        assert (await session.execute(text("SELECT count(*) FROM items"))).scalar_one() == 1


async def test_too_many_connections_is_unavailable(postgres_admin_dsn: str, postgres_url: str) -> None:
    role = f"clipchat_nolimit_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(postgres_admin_dsn)
    await admin.execute(f'CREATE ROLE "{role}" LOGIN CONNECTION LIMIT 0')
    parsed = urlparse(postgres_url)
    db = Database(parsed._replace(netloc=f"{role}@{parsed.hostname}:{parsed.port or 5432}").geturl())
    try:
        with pytest.raises(DependencyUnavailable) as caught:
            async with db.read() as session:
                await session.execute(text("SELECT 1"))
        assert_unavailable(caught.value)
        assert getattr(caught.value.__cause__, "orig", None) is not None
        assert caught.value.__cause__.orig.pgcode == "53300"  # type: ignore[union-attr]
    finally:
        await db.dispose()
        await admin.execute(f'DROP ROLE IF EXISTS "{role}"')
        await admin.close()


async def test_a_constraint_violation_is_raised_as_it_was(db: Database) -> None:
    with pytest.raises(IntegrityError) as caught:
        async with db.transaction() as session:
            await session.execute(text("INSERT INTO items VALUES (1)"))
    assert caught.value.orig.pgcode == "23505"  # type: ignore[union-attr]
    assert await db.ping() is True


async def test_lock_not_available_is_left_to_the_caller(db: Database) -> None:
    async with db.transaction() as holder:
        await holder.execute(text("SELECT id FROM items WHERE id = 1 FOR UPDATE"))
        with pytest.raises(DBAPIError) as caught:
            async with db.transaction() as session:
                await session.execute(text("SELECT id FROM items WHERE id = 1 FOR UPDATE NOWAIT"))
    assert not isinstance(caught.value, DependencyUnavailable)
    assert caught.value.orig.pgcode == "55P03"  # type: ignore[union-attr]
