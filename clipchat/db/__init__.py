"""Database access: async engines for PostgreSQL (asyncpg) and SQLite (aiosqlite)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from clipchat.errors import DependencyUnavailable


class Database:
    """Two session factories over one database.

    ``transaction()`` is for writes: on SQLite it opens an immediate transaction (the write lock is
    taken at BEGIN, so two writers never interleave); on PostgreSQL callers lock rows with
    ``SELECT … FOR UPDATE``. ``read()`` is for plain reads.
    """

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        kwargs: dict[str, Any] = {"echo": echo}
        if self.is_sqlite:
            kwargs["connect_args"] = {"timeout": 30}
        else:
            kwargs.update(pool_size=10, max_overflow=20, pool_pre_ping=True, pool_recycle=1800)
        self.write_engine = create_async_engine(url, **kwargs)
        self.read_engine = create_async_engine(url, **kwargs) if self.is_sqlite else self.write_engine
        if self.is_sqlite:
            _sqlite_setup(self.write_engine, begin="BEGIN IMMEDIATE")
            _sqlite_setup(self.read_engine, begin="BEGIN")
        self._writes = async_sessionmaker(self.write_engine, expire_on_commit=False)
        self._reads = async_sessionmaker(self.read_engine, expire_on_commit=False)

    def transaction(self) -> AbstractAsyncContextManager[AsyncSession]:
        """A write transaction, committed on success, rolled back on error."""
        return _session(self._writes)

    def read(self) -> AbstractAsyncContextManager[AsyncSession]:
        """A read-only transaction."""
        return _session(self._reads)

    async def ping(self) -> bool:
        try:
            async with self.read() as session:
                await session.connection()
            return True
        except Exception:
            return False

    async def dispose(self) -> None:
        await self.write_engine.dispose()
        if self.read_engine is not self.write_engine:
            await self.read_engine.dispose()


@asynccontextmanager
async def _session(factory: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    """A session in a transaction; a lost connection becomes ``DependencyUnavailable`` (retryable)."""
    try:
        async with factory() as session, session.begin():
            yield session
    except (OperationalError, DBAPIError) as exc:
        if _is_connection_error(exc):
            raise DependencyUnavailable("The database is unavailable. Please try again shortly.") from exc
        raise


def _is_connection_error(exc: Exception) -> bool:
    return bool(getattr(exc, "connection_invalidated", False)) or isinstance(
        getattr(exc, "orig", None), (ConnectionError, OSError))


def _sqlite_setup(engine: AsyncEngine, *, begin: str) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide when transactions begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql(begin)
