"""``is_unavailable``: every way of losing the database, raw or wrapped by SQLAlchemy, and nothing else."""

from __future__ import annotations

import socket

import asyncpg.exceptions as pg
import pytest
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from clipchat.db import is_unavailable

CONNECTIVITY: list[BaseException] = [
    ConnectionRefusedError(111, "Connect call failed"),
    ConnectionResetError(104, "Connection reset by peer"),
    socket.gaierror(-2, "Name or service not known"),
    TimeoutError(),
    pg.CannotConnectNowError("the database system is starting up"),  # 57P03
    pg.AdminShutdownError("terminating connection due to administrator command"),  # 57P01
    pg.CrashShutdownError("terminating connection because of crash of another server process"),  # 57P02
    pg.TooManyConnectionsError("sorry, too many clients already"),  # 53300
    pg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),  # 08003
    pg.ConnectionFailureError("connection failure"),  # 08006
    pg.ClientCannotConnectError("could not connect"),  # 08001
    pg.InterfaceError("connection is closed"),
    PoolTimeoutError("QueuePool limit of size 10 overflow 20 reached"),
]

SQL_ERRORS: list[BaseException] = [
    pg.UniqueViolationError("duplicate key value violates unique constraint"),  # 23505
    pg.LockNotAvailableError("could not obtain lock on row"),  # 55P03
    pg.SerializationError("could not serialize access"),  # 40001
    pg.UndefinedTableError('relation "nope" does not exist'),  # 42P01
    pg.InterfaceError("cannot perform operation: another operation is in progress"),
    ValueError("not a database error"),
]


def _wrapped(orig: BaseException, kind: type[DBAPIError]) -> DBAPIError:
    error = kind("SELECT 1", {}, orig)
    error.__cause__ = orig
    return error


@pytest.mark.parametrize("error", CONNECTIVITY, ids=lambda e: type(e).__name__)
def test_connectivity_failures_are_unavailable_raw(error: BaseException) -> None:
    assert is_unavailable(error)


@pytest.mark.parametrize("kind", [DBAPIError, OperationalError, InterfaceError])
@pytest.mark.parametrize("error", CONNECTIVITY, ids=lambda e: type(e).__name__)
def test_connectivity_failures_are_unavailable_when_wrapped(error: BaseException,
                                                            kind: type[DBAPIError]) -> None:
    assert is_unavailable(_wrapped(error, kind))


@pytest.mark.parametrize("error", SQL_ERRORS, ids=lambda e: type(e).__name__)
def test_sql_errors_are_not_unavailable(error: BaseException) -> None:
    assert not is_unavailable(error)
    assert not is_unavailable(_wrapped(error, DBAPIError))


def test_an_invalidated_connection_is_unavailable_whatever_the_driver_said() -> None:
    assert is_unavailable(DBAPIError("SELECT 1", {}, Exception("gone"), connection_invalidated=True))


def test_an_integrity_error_is_not_unavailable() -> None:
    assert not is_unavailable(IntegrityError("INSERT", {}, pg.UniqueViolationError("duplicate")))
