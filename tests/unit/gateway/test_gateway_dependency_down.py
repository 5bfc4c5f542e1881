"""A dependency that is down: readiness names it, API answers are 503 "unavailable" with Retry-After,
and liveness and the page stay up."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from clipchat.errors import ClipChatError, DeadlineExceeded, DependencyUnavailable
from clipchat.health import DependencyWatcher
from clipchat.storage.local import LocalStorage
from gateway.app import create_app
from gateway.errors import RETRY_AFTER_SECONDS
from tests.unit.gateway.gateway_rig import ALICE, Backend, SettingsFactory, error_of, running


@dataclass
class FakeDependency:
    up: bool = True

    async def __call__(self) -> bool:
        return self.up


@dataclass
class Dependencies:
    database: FakeDependency
    status_broker: FakeDependency
    regenerator_broker: FakeDependency
    watchers: list[DependencyWatcher] = field(default_factory=list)

    async def recheck(self) -> None:
        """One round of the servers' checks now, instead of waiting for their interval."""
        for watcher in self.watchers:
            await watcher.check_now()


@pytest.fixture
async def dependencies(backend: Backend) -> Dependencies:
    """The fake status and regenerator servers report their dependencies as the real ones do."""
    deps = Dependencies(FakeDependency(), FakeDependency(), FakeDependency())
    status_server, regenerator_server = backend.servers[0], backend.servers[1]
    deps.watchers = [
        await status_server.watch({"database": deps.database, "broker": deps.status_broker}, interval=60),
        await regenerator_server.watch({"broker": deps.regenerator_broker}, interval=60)]
    return deps


def assert_retry_after(response: httpx.Response) -> None:
    assert response.headers["Retry-After"] == str(RETRY_AFTER_SECONDS)


# --- readiness ------------------------------------------------------------------------------------


async def test_ready_when_every_reported_dependency_is_up(client: httpx.AsyncClient,
                                                          dependencies: Dependencies) -> None:
    response = await client.get("/api/v1/readyz")
    assert response.status_code == 200
    assert response.json()["checks"] == {"status": "ok", "regenerator": "ok", "storage": "ok",
                                         "database": "ok", "broker": "ok"}


async def test_dependencies_nobody_reports_are_unknown_and_do_not_fail_readiness(
        client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1/readyz")  # the rig's servers watch nothing
    assert response.status_code == 200
    assert response.json()["checks"] == {"status": "ok", "regenerator": "ok", "storage": "ok",
                                         "database": "unknown", "broker": "unknown"}


async def test_a_database_down_makes_readiness_503_and_names_it(
        client: httpx.AsyncClient, dependencies: Dependencies) -> None:
    dependencies.database.up = False
    await dependencies.recheck()
    response = await client.get("/api/v1/readyz")
    assert response.status_code == 503
    assert_retry_after(response)
    body = response.json()
    assert body["down"] == ["status", "database"]  # the status service is down because of it
    assert body["checks"]["database"] == "unavailable" and body["checks"]["broker"] == "ok"
    assert body["checks"]["regenerator"] == "ok"
    assert body["error"]["code"] == "not_ready" and body["error"]["retryable"] is True
    assert "the database is unavailable" in body["error"]["message"]

    dependencies.database.up = True
    await dependencies.recheck()
    assert (await client.get("/api/v1/readyz")).status_code == 200


async def test_a_broker_down_for_one_service_is_down(client: httpx.AsyncClient,
                                                     dependencies: Dependencies) -> None:
    dependencies.regenerator_broker.up = False
    await dependencies.recheck()
    response = await client.get("/api/v1/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["down"] == ["regenerator", "broker"]
    assert body["checks"]["broker"] == "unavailable" and body["checks"]["database"] == "ok"
    assert "the message broker is unavailable" in body["error"]["message"]


async def test_liveness_and_the_page_stay_up_while_a_dependency_is_down(
        client: httpx.AsyncClient, dependencies: Dependencies) -> None:
    dependencies.database.up = False
    dependencies.status_broker.up = False
    await dependencies.recheck()
    assert (await client.get("/api/v1/readyz")).status_code == 503
    assert (await client.get("/api/v1/healthz")).json() == {"status": "ok"}
    page = await client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]


# --- API answers while a dependency is down -------------------------------------------------------


async def test_unavailable_from_grpc_is_503_unavailable_with_retry_after(client: httpx.AsyncClient,
                                                                         backend: Backend) -> None:
    backend.status.fail["ListJobs"] = DependencyUnavailable("The database is unavailable. Please try "
                                                            "again shortly.")
    response = await client.get("/api/v1/jobs")
    assert response.status_code == 503
    assert error_of(response)["code"] == "unavailable" and error_of(response)["retryable"] is True
    assert_retry_after(response)


async def test_a_service_that_cannot_be_reached_is_503_unavailable_with_retry_after(
        make_settings: SettingsFactory, storage: LocalStorage) -> None:
    dead = "127.0.0.1:9"  # the discard port: nothing listens there
    async with running(create_app(make_settings(status_addr=dead), storage=storage)) as client:
        response = await client.get("/api/v1/jobs")
    assert response.status_code == 503
    assert error_of(response)["code"] == "unavailable" and error_of(response)["retryable"] is True
    assert_retry_after(response)


async def test_a_timeout_is_503_with_retry_after(client: httpx.AsyncClient, backend: Backend) -> None:
    backend.status.fail["ListJobs"] = DeadlineExceeded()
    response = await client.get("/api/v1/jobs")
    assert response.status_code == 503 and error_of(response)["retryable"] is True
    assert_retry_after(response)


async def test_a_non_retryable_503_has_no_retry_after(client: httpx.AsyncClient, backend: Backend) -> None:
    backend.status.fail["ListJobs"] = ClipChatError("KeyError: 'lease'")
    response = await client.get("/api/v1/jobs")
    assert response.status_code == 503 and error_of(response)["retryable"] is False
    assert "Retry-After" not in response.headers


class DownStorage(LocalStorage):
    """A store with no local files whose reads fail as ``error`` says (S3 that is down)."""

    def __init__(self, root: Path, error: Exception) -> None:
        super().__init__(root)
        self.error = error

    def local_path(self, key: str) -> Path | None:
        return None

    async def presigned_url(self, key: str, expires_seconds: int) -> str | None:
        return None

    async def get_bytes(self, key: str) -> bytes:
        raise self.error


@asynccontextmanager
async def served_without_raising(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """Like ``running``, but an exception the app re-raises after answering does not fail the test
    (Starlette re-raises what its catch-all handler answered, for the server to log)."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway",
                                     headers={"Authorization": f"Bearer {ALICE}"}) as client:
            yield client


@pytest.mark.parametrize("error", [
    DependencyUnavailable("Storage is unavailable right now. Please try again shortly."),
    ConnectionRefusedError(111, "Connect call failed ('10.1.2.3', 9000)"),
    TimeoutError(),
], ids=["DependencyUnavailable", "ConnectionRefusedError", "TimeoutError"])
async def test_storage_down_in_the_gateway_is_503_unavailable(make_settings: SettingsFactory, tmp_path: Path,
                                                              error: Exception) -> None:
    app = create_app(make_settings(), storage=DownStorage(tmp_path / "store", error))
    async with served_without_raising(app) as client:
        response = await client.get(app.state.signer.url("jobs/abc/videos/v1.mp4"))
    assert response.status_code == 503
    body = error_of(response)
    assert body["code"] == "unavailable" and body["retryable"] is True
    assert "10.1.2.3" not in body["message"]
    assert_retry_after(response)

