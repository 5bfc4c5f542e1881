"""Service-to-service authentication: the shared token, open health checks, reflection, TLS, settings."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from clipchat.rpc import GrpcServer, create_server, open_channel, rpc_method
from clipchat.settings import InvalidSettings, Settings
from clipchat.status_client import StatusClient
from clipchat.v1 import composer_pb2, composer_pb2_grpc, regenerator_pb2, regenerator_pb2_grpc
from services.regenerator import server as regenerator_server

TOKEN = "t" * 32


class Composer(composer_pb2_grpc.ComposerServiceServicer):
    @rpc_method
    async def Describe(self, request: composer_pb2.DescribeRequest, context: Any) -> composer_pb2.ComposerInfo:
        return composer_pb2.ComposerInfo(encoder="libx264")

    @rpc_method
    async def Compose(self, request: composer_pb2.ComposeRequest,
                      context: Any) -> AsyncIterator[composer_pb2.ComposeProgress]:
        yield composer_pb2.ComposeProgress(fraction=1.0)


async def serve(settings: Settings) -> GrpcServer:
    return await create_server([(composer_pb2_grpc.add_ComposerServiceServicer_to_server, Composer(),
                                 "clipchat.v1.ComposerService")], settings=settings)


@pytest.fixture
async def guarded() -> AsyncIterator[str]:
    server = await serve(Settings(service_token=TOKEN, grpc_reflection=False))
    yield f"127.0.0.1:{server.port}"
    await server.stop(0)


async def describe(channel: grpc.aio.Channel, **kwargs: Any) -> composer_pb2.ComposerInfo:
    stub = composer_pb2_grpc.ComposerServiceStub(channel)
    return await stub.Describe(composer_pb2.DescribeRequest(), timeout=5, **kwargs)


async def test_a_call_without_the_token_is_unauthenticated(guarded: str) -> None:
    async with grpc.aio.insecure_channel(guarded) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await describe(channel)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        stream = composer_pb2_grpc.ComposerServiceStub(channel).Compose(composer_pb2.ComposeRequest(), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as refused_stream:
            async for _ in stream:
                pass
        assert refused_stream.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("header", [f"Bearer {'u' * 32}", TOKEN, f"Bearer {TOKEN[:-1]}", "Bearer "])
async def test_a_wrong_token_is_unauthenticated(guarded: str, header: str) -> None:
    async with grpc.aio.insecure_channel(guarded) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await describe(channel, metadata=(("authorization", header),))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_channels_of_the_project_send_the_token(guarded: str) -> None:
    async with open_channel(guarded, Settings(service_token=TOKEN)) as channel:
        assert (await describe(channel)).encoder == "libx264"
        progress = [p async for p in composer_pb2_grpc.ComposerServiceStub(channel).Compose(
            composer_pb2.ComposeRequest(), timeout=5)]
        assert [p.fraction for p in progress] == [1.0]


async def test_health_needs_no_token(guarded: str) -> None:
    async with grpc.aio.insecure_channel(guarded) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                                timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def list_services(channel: grpc.aio.Channel) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                     timeout=5)
    return [s.name async for reply in call for s in reply.list_services_response.service]


async def test_reflection_is_absent_when_disabled(guarded: str) -> None:
    async with open_channel(guarded, Settings(service_token=TOKEN)) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as absent:
            await list_services(channel)
        assert absent.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_dev_without_a_token_is_open_with_reflection() -> None:
    settings = Settings()
    assert settings.service_token == "" and settings.reflection_enabled
    server = await serve(settings)
    try:
        async with open_channel(f"127.0.0.1:{server.port}", settings) as channel:
            assert (await describe(channel)).encoder == "libx264"
            assert "clipchat.v1.ComposerService" in await list_services(channel)
    finally:
        await server.stop(0)


def test_production_turns_reflection_off_unless_asked() -> None:
    assert not Settings(environment="test", grpc_reflection=False).reflection_enabled
    assert Settings(environment="production", media_signing_key="k" * 32, auth_tokens=f"{'a' * 24}=alice",
                    service_token="s" * 24).reflection_enabled is False


def self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "clipchat-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


async def test_tls_round_trip(tmp_path: Path) -> None:
    cert_file, key_file = self_signed(tmp_path)
    server = await serve(Settings(service_token=TOKEN, grpc_tls_cert_file=cert_file,
                                  grpc_tls_key_file=key_file))
    addr = f"127.0.0.1:{server.port}"
    try:
        async with open_channel(addr, Settings(service_token=TOKEN, grpc_tls_ca_file=cert_file)) as channel:
            assert (await describe(channel)).encoder == "libx264"
        # A plaintext client does not get through a TLS port.
        async with grpc.aio.insecure_channel(addr) as plain:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await describe(plain, metadata=(("authorization", f"Bearer {TOKEN}"),))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(0)


def test_tls_needs_both_the_certificate_and_its_key(tmp_path: Path) -> None:
    with pytest.raises(InvalidSettings, match="CLIPCHAT_GRPC_TLS_CERT_FILE and CLIPCHAT_GRPC_TLS_KEY_FILE"):
        Settings(grpc_tls_cert_file=tmp_path / "cert.pem")


@pytest.mark.parametrize("token", ["", "s" * 23])
def test_production_refuses_an_empty_or_short_service_token(token: str) -> None:
    with pytest.raises(InvalidSettings) as caught:
        Settings(environment="production", media_signing_key="k" * 32, auth_tokens=f"{'a' * 24}=alice",
                 service_token=token)
    message = str(caught.value)
    assert "\n" not in message and "CLIPCHAT_SERVICE_TOKEN is" in message
    assert message.startswith("CLIPCHAT_ENVIRONMENT=production refuses unsafe settings: ")


async def test_the_regenerator_refuses_an_empty_owner() -> None:
    settings = Settings()
    # The owner is checked before the status service is asked anything: nothing listens there.
    status = StatusClient("127.0.0.1:1", deadline=1, settings=settings)
    servicer = regenerator_server.RegeneratorServicer(status=status, generator=None,  # type: ignore[arg-type]
                                                      settings=settings)
    server = await create_server([(regenerator_server.add_to_server, servicer, regenerator_server.SERVICE_NAME)],
                                 settings=settings)
    try:
        async with open_channel(f"127.0.0.1:{server.port}", settings) as channel:
            stub = regenerator_pb2_grpc.RegeneratorServiceStub(channel)
            for rpc, request in [(stub.StartRegeneration, regenerator_pb2.StartRegenerationRequest(
                                      job_id="j", clip_index=0, instruction="brighter")),
                                 (stub.ListRegenerations, regenerator_pb2.ListJobRegenerationsRequest(job_id="j"))]:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await rpc(request, timeout=5)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "needs an owner" in (refused.value.details() or "")
    finally:
        await server.stop(0)
        await status.close()
