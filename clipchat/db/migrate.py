"""Apply the Alembic migrations (``clipchat migrate``)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import text

if TYPE_CHECKING:
    from clipchat.db import Database

log = logging.getLogger("clipchat.db")

MIGRATIONS = Path(__file__).with_name("migrations")


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision() -> str:
    """The revision the code expects the schema at (the migrations' single head)."""
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    if head is None:
        raise RuntimeError("the migrations have no head revision")
    return head


def upgrade_sync(url: str, revision: str = "head") -> None:
    """Migrate the database at ``url`` (runs its own event loop: call from a thread in async code)."""
    if url.startswith("sqlite"):
        Path(url.split("///", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(url), revision)


async def upgrade(url: str, revision: str = "head") -> None:
    await asyncio.to_thread(upgrade_sync, url, revision)


async def schema_at_head(db: Database, head: str | None = None) -> bool:
    """Whether the database's schema is at the code's head revision (``clipchat migrate`` ran).

    A health check: a status pod whose database is behind (a rollout whose migration has not run
    yet) reports NOT_SERVING instead of taking traffic it would answer with errors. Never raises:
    an unreachable database, or none migrated at all, is False."""
    expected = head or head_revision()
    try:
        async with db.read() as session:
            current = (await session.execute(text("SELECT version_num FROM alembic_version"))).scalar()
    except Exception as exc:
        log.debug("db.schema_check_failed", extra={"error": type(exc).__name__})
        return False
    if current != expected:
        log.debug("db.schema_behind", extra={"current": current, "expected": expected})
    return bool(current == expected)
