"""Fixtures of the status service's tests: a migrated database (SQLite and PostgreSQL) and a clock."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import pytest

from clipchat.db import Database
from clipchat.db.migrate import upgrade
from clipchat.db.models import utcnow


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
