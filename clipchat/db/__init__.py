"""Database access: async engines for PostgreSQL (asyncpg) and SQLite (aiosqlite).

Error contract: a database that cannot be reached, refuses new connections or drops the
connection mid-transaction raises ``DependencyUnavailable`` (retryable, gRPC ``UNAVAILABLE``) from
``transaction()``, ``read()`` and ``read_connection()``; see ``is_unavailable`` for what counts.
Errors in the SQL or the data (constraint violations, ``lock_not_available``, …) are raised
unchanged for the caller to map.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from typing import Any

from asyncpg.exceptions import InterfaceError as AsyncpgInterfaceError
from sqlalchemy import event, text
from sqlalchemy.exc import DBAPIError, InvalidatePoolError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from clipchat import telemetry
from clipchat.errors import ClipChatError, DependencyUnavailable

log = logging.getLogger("clipchat.db")

UNAVAILABLE_MESSAGE = "The database is unavailable. Please try again shortly."
# SQLSTATEs that say the server cannot serve this connection now, not that the SQL was wrong
# (besides all of class 08, connection exception): too_many_connections, admin_shutdown,
# crash_shutdown, cannot_connect_now.
_UNAVAILABLE_SQLSTATES = frozenset({"53300", "57P01", "57P02", "57P03"})
# A pooled PostgreSQL connection left idle this long is pinged before it is used again: the server
# may have restarted or dropped it meanwhile. One used moments ago is not: on asyncpg a ping is
# three round trips (BEGIN, an empty statement, ROLLBACK), and pinging at every checkout cost a
# busy service more than its reads. A connection that dies while in use fails that use
# (``DependencyUnavailable``) and SQLAlchemy then replaces every connection the pool held.
PING_AFTER_IDLE_SECONDS = 1.0
_IDLE_SINCE = "clipchat_idle_since"


class Database:
    """Two session factories over one database.

    ``transaction()`` is for writes: on SQLite it opens an immediate transaction (the write lock is
    taken at BEGIN, so two writers never interleave); on PostgreSQL callers lock rows with
    ``SELECT … FOR UPDATE``. ``read()`` is for plain reads.
    """

    def __init__(self, url: str, *, echo: bool = False, connect_timeout: float = 10.0) -> None:
        """``connect_timeout`` bounds opening a PostgreSQL connection (asyncpg waits 60 s by
        default); on SQLite the driver waits up to 30 s for a lock instead."""
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        kwargs: dict[str, Any] = {"echo": echo}
        if self.is_sqlite:
            kwargs["connect_args"] = {"timeout": 30}
        else:
            kwargs.update(pool_size=10, max_overflow=20, pool_recycle=1800,
                          connect_args={"timeout": connect_timeout})
        self.write_engine = create_async_engine(url, **kwargs)
        self.read_engine = create_async_engine(url, **kwargs) if self.is_sqlite else self.write_engine
        if not self.is_sqlite:
            _ping_when_idle(self.write_engine, PING_AFTER_IDLE_SECONDS)
        telemetry.instrument_engine(self.write_engine)
        if self.read_engine is not self.write_engine:
            telemetry.instrument_engine(self.read_engine)
        if self.is_sqlite:
            _sqlite_setup(self.write_engine, begin="BEGIN IMMEDIATE")
            _sqlite_setup(self.read_engine, begin="BEGIN")
        self._writes = async_sessionmaker(self.write_engine, expire_on_commit=False)
        # PostgreSQL reads send no BEGIN and COMMIT: under READ COMMITTED each statement of a
        # transaction sees its own snapshot anyway, so for reads the two are just round trips.
        self._read_bind = (self.read_engine if self.is_sqlite
                           else self.write_engine.execution_options(isolation_level="AUTOCOMMIT"))
        self._reads = async_sessionmaker(self._read_bind, expire_on_commit=False)

    def transaction(self) -> AbstractAsyncContextManager[AsyncSession]:
        """A write transaction, committed on success, rolled back on error."""
        return _session(self._writes)

    def read(self) -> AbstractAsyncContextManager[AsyncSession]:
        """A session for reads (on PostgreSQL outside a transaction: each statement commits)."""
        return _session(self._reads)

    def read_connection(self) -> AbstractAsyncContextManager[AsyncConnection]:
        """A connection for Core reads, as ``read()`` but without a session: for a hot path whose
        statement needs no ORM objects (a session costs more than a small statement)."""
        return _connection(self._read_bind)

    async def ping(self, timeout: float = 5.0) -> bool:
        """Whether the database answers ``SELECT 1`` within ``timeout`` seconds. Never raises:
        unreachable, refusing or too slow is False, and so is any other error (logged), since a
        database that cannot run ``SELECT 1`` cannot serve either."""
        try:
            async with asyncio.timeout(timeout), self.read() as session:
                await session.execute(text("SELECT 1"))
        except DependencyUnavailable as exc:
            log.debug("db.ping_unavailable", extra={"error": type(exc.__cause__).__name__})
            return False
        except TimeoutError:
            log.debug("db.ping_timed_out", extra={"timeout_seconds": timeout})
            return False
        except Exception as exc:
            log.warning("db.ping_failed", extra={"error": type(exc).__name__})
            return False
        return True

    async def dispose(self) -> None:
        await self.write_engine.dispose()
        if self.read_engine is not self.write_engine:
            await self.read_engine.dispose()


def is_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` means the database could not be reached or the connection was lost.

    True for a connection SQLAlchemy marked invalidated; any ``OSError`` (refused, reset, DNS
    ``socket.gaierror``, ``TimeoutError`` while connecting); the pool's checkout timeout; a
    SQLSTATE of class 08 or in ``_UNAVAILABLE_SQLSTATES``; and asyncpg's "connection is closed".
    The cause chain is followed, as raised raw by the driver or wrapped by SQLAlchemy.
    """
    for link in _cause_chain(exc):
        if isinstance(link, DBAPIError) and link.connection_invalidated:
            return True
        if isinstance(link, (OSError, PoolTimeoutError)):
            return True
        if isinstance(link, AsyncpgInterfaceError) and "connection is closed" in str(link):
            return True
        state = getattr(link, "sqlstate", None) or getattr(link, "pgcode", None)
        if isinstance(state, str) and (state.startswith("08") or state in _UNAVAILABLE_SQLSTATES):
            return True
    return False


def _cause_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then what it wraps: SQLAlchemy's ``.orig``, else ``__cause__``."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        yield link
        orig = link.orig if isinstance(link, DBAPIError) else None
        link = orig if isinstance(orig, BaseException) else link.__cause__


@contextmanager
def _unavailable_mapped() -> Iterator[None]:
    """Raise ``DependencyUnavailable`` when ``is_unavailable`` says the database is out of reach,
    whether connecting, inside the block or at commit (an ``OSError`` raised by the block itself
    counts too: it cannot be told apart). Domain errors and SQL errors pass unchanged."""
    try:
        yield
    except ClipChatError:
        raise
    except Exception as exc:
        if is_unavailable(exc):
            raise DependencyUnavailable(UNAVAILABLE_MESSAGE) from exc
        raise


@asynccontextmanager
async def _session(factory: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    """A session in a transaction, committed on success; errors mapped by ``_unavailable_mapped``."""
    with _unavailable_mapped():
        async with factory() as session, session.begin():
            yield session


def _ping_when_idle(engine: AsyncEngine, idle_seconds: float) -> None:
    """Ping a pooled connection at checkout when it was idle ``idle_seconds`` or more; when the
    ping fails, the pool drops it and every older connection, and connects afresh."""
    dialect = engine.dialect

    @event.listens_for(engine.sync_engine, "connect")
    def _connected(_dbapi_connection: Any, record: Any) -> None:
        record.info[_IDLE_SINCE] = None  # fresh: nothing to check

    @event.listens_for(engine.sync_engine, "checkin")
    def _checked_in(_dbapi_connection: Any, record: Any) -> None:
        record.info[_IDLE_SINCE] = time.monotonic()

    @event.listens_for(engine.sync_engine, "checkout")
    def _checked_out(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get(_IDLE_SINCE)
        if idle_since is None or time.monotonic() - idle_since < idle_seconds:
            return
        try:
            dialect.do_ping(dbapi_connection)
        except Exception as exc:
            raise InvalidatePoolError() from exc


@asynccontextmanager
async def _connection(bind: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection in a transaction, committed on success; errors mapped by ``_unavailable_mapped``."""
    with _unavailable_mapped():
        async with bind.begin() as connection:
            yield connection


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
