"""Shared fixtures: real PostgreSQL, RabbitMQ, ffmpeg and a moto S3 server.

With ``CI=true`` a test whose backend is missing fails; elsewhere it is skipped with the reason.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tests.processes import spawn, stop_process

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PG_ADMIN_DSN = os.environ.get("CLIPCHAT_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
AMQP_URL = os.environ.get("CLIPCHAT_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def missing(what: str) -> None:
    """Fail under CI, skip elsewhere: a backend this test needs is not there."""
    if IN_CI:
        pytest.fail(f"{what} is required under CI=true but is not available", pytrace=False)
    pytest.skip(f"{what} not available")


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _reachable(url: str, default_port: int) -> bool:
    parsed = urlparse(url)
    return port_open(parsed.hostname or "127.0.0.1", parsed.port or default_port)


@pytest.fixture(scope="session")
def ffmpeg_exe() -> str:
    exe = os.environ.get("CLIPCHAT_TEST_FFMPEG", "")
    if not exe:
        try:
            import imageio_ffmpeg

            exe = imageio_ffmpeg.get_ffmpeg_exe()
        except Exception as exc:  # depends on the machine
            missing(f"ffmpeg ({exc})")
    if not Path(exe).is_file():
        missing(f"ffmpeg at {exe}")
    return exe


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    if not _reachable(AMQP_URL, 5672):
        missing(f"RabbitMQ at {urlparse(AMQP_URL).netloc}")
    return AMQP_URL


@pytest.fixture(scope="session")
def postgres_admin_dsn() -> str:
    if not _reachable(PG_ADMIN_DSN, 5432):
        missing(f"PostgreSQL at {urlparse(PG_ADMIN_DSN).netloc}")
    return PG_ADMIN_DSN


async def _create_database(admin_dsn: str, name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def _drop_database(admin_dsn: str, name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
def postgres_url(postgres_admin_dsn: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test (SQLAlchemy asyncpg URL)."""
    name = f"clipchat_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_create_database(postgres_admin_dsn, name))
    base = postgres_admin_dsn.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    yield f"{base}/{name}"
    asyncio.run(_drop_database(postgres_admin_dsn, name))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'clipchat.db'}"


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Both database backends: the same test runs on SQLite and PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'clipchat.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[str]:
    """A moto S3 server on localhost; yields its endpoint URL."""
    moto = Path(sys.executable).with_name("moto_server")
    if not moto.exists():
        missing("moto_server (moto[server])")
    port = free_port()
    proc = spawn([str(moto), "-H", "127.0.0.1", "-p", str(port)],
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not port_open("127.0.0.1", port):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            missing("moto S3 server (did not start)")
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    stop_process(proc, grace=10)


@pytest.fixture
def s3_bucket(moto_s3: str) -> str:
    """A fresh bucket on the moto server."""
    import boto3

    name = f"clipchat-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1", aws_access_key_id="test",
                 aws_secret_access_key="test").create_bucket(Bucket=name)
    return name


@pytest.fixture
async def unused() -> AsyncIterator[None]:
    yield None
