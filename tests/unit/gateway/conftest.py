"""Fixtures for the gateway tests: real in-process gRPC servers with fakes, local storage, the app."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from clipchat.rpc import create_server
from clipchat.settings import Settings
from clipchat.storage.local import LocalStorage
from clipchat.v1 import composer_pb2_grpc, jobs_pb2_grpc, regenerator_pb2_grpc
from gateway.app import create_app
from tests.unit.gateway.gateway_rig import (
    ALICE,
    BOB,
    Backend,
    FakeComposer,
    FakeRegenerator,
    FakeStatus,
    SettingsFactory,
    running,
)


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    status = FakeStatus()  # type: ignore[abstract]  # implements only what the gateway calls
    regenerator = FakeRegenerator(status)
    status_server = await create_server([(jobs_pb2_grpc.add_JobStatusServiceServicer_to_server, status,
                                          "clipchat.v1.JobStatusService")])
    regen_server = await create_server([(regenerator_pb2_grpc.add_RegeneratorServiceServicer_to_server,
                                         regenerator, "clipchat.v1.RegeneratorService")])
    composer_server = await create_server([(composer_pb2_grpc.add_ComposerServiceServicer_to_server,
                                            FakeComposer(), "clipchat.v1.ComposerService")])
    servers = [status_server, regen_server, composer_server]
    yield Backend(status, regenerator, *(f"127.0.0.1:{server.port}" for server in servers), servers)
    for server in servers:
        await server.stop(0)


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "storage")


@pytest.fixture
def make_settings(backend: Backend, tmp_path: Path) -> SettingsFactory:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "data_dir": tmp_path, "status_addr": backend.status_addr,
            "regenerator_addr": backend.regenerator_addr, "composer_addr": backend.composer_addr,
            "auth_tokens": f"{ALICE}=alice,{BOB}=bob",
            "media_signing_key": "test-signing-key", "sse_heartbeat_seconds": 0.3,
            "rate_limit_per_minute": 600, "grpc_deadline_seconds": 5.0, "page_token": "",
        }
        values.update(overrides)
        return Settings(**values)
    return make


@pytest.fixture
async def client(make_settings: SettingsFactory, storage: LocalStorage) -> AsyncIterator[httpx.AsyncClient]:
    async with running(create_app(make_settings(), storage=storage)) as c:
        yield c


