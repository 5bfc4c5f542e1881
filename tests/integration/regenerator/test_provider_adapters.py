"""The Replicate and fal adapters against local fakes that follow the providers' API references."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from clipchat.errors import MediaError, ProviderMisconfigured
from clipchat.media.ffmpeg import FfmpegRunner
from clipchat.settings import Settings
from services.regenerator.fal_generator import FAL_OUTPUT_HOSTS, FalVideoGenerator
from services.regenerator.generator import VideoGenerator
from services.regenerator.http_generator import GenerationRejected, HttpVideoGenerator, TransientGenerationError
from services.regenerator.replicate_generator import REPLICATE_OUTPUT_HOSTS, ReplicateVideoGenerator
from services.regenerator.service import build_generator
from tests.fakes import fal_server, replicate_server
from tests.fakes.fal_server import FalServer
from tests.fakes.prediction_server import PredictionServer, render_sample_mp4
from tests.fakes.replicate_server import ReplicateServer

PRICE = Decimal("0.05")  # per second of video
COMPUTE_PRICE = Decimal("0.0014")  # per second of compute


@dataclass(frozen=True)
class Provider:
    """One adapter and its fake, so that each test runs against both."""

    name: str
    fake: Callable[..., PredictionServer]
    adapter: type[HttpVideoGenerator]
    model: str
    auth: str  # the Authorization scheme


PROVIDERS = [
    Provider("replicate", ReplicateServer, ReplicateVideoGenerator, replicate_server.MODEL, "Bearer"),
    Provider("fal", FalServer, FalVideoGenerator, fal_server.MODEL, "Key"),
]


@pytest.fixture(scope="module")
def sample_mp4(tmp_path_factory: pytest.TempPathFactory, ffmpeg_exe: str) -> bytes:
    return render_sample_mp4(tmp_path_factory.mktemp("video") / "sample.mp4", ffmpeg=ffmpeg_exe).read_bytes()


@pytest.fixture(params=PROVIDERS, ids=[p.name for p in PROVIDERS])
def provider(request: pytest.FixtureRequest) -> Provider:
    chosen: Provider = request.param
    return chosen


@pytest.fixture
def server(provider: Provider, sample_mp4: bytes) -> Iterator[PredictionServer]:
    with provider.fake(video=sample_mp4, steps=2) as fake:
        yield fake


def make(provider: Provider, server: PredictionServer, *, token: str = "test-token", model: str = "",
         output_hosts: tuple[str, ...] = ("localhost",), **options: Any) -> HttpVideoGenerator:
    """The adapter on the fake: its CDN (``localhost``) listed, plain http allowed for loopback."""
    options.setdefault("allow_http_loopback", True)
    return provider.adapter(server.url, token, model or provider.model, price_per_second=PRICE,
                            request_timeout=2.0, generation_timeout=10.0, poll_initial=0.01, poll_max=0.04,
                            output_hosts=output_hosts, **options)


def test_both_satisfy_the_video_generator_interface() -> None:
    replicate: VideoGenerator = ReplicateVideoGenerator("", "t", "acme/video-1", price_per_second=PRICE)
    fal: VideoGenerator = FalVideoGenerator("", "t", "fal-ai/x/y", price_per_second=PRICE)
    assert (replicate.name, fal.name) == ("replicate", "fal")


# Happy path: the documented request, an output on the CDN host, the cost to the cent.


async def test_a_clip_from_each_provider(provider: Provider, server: PredictionServer, tmp_path: Path) -> None:
    started: list[str] = []

    async def on_started(prediction_id: str) -> None:
        started.append(prediction_id)

    async with make(provider, server) as generator:
        clip = await generator.generate("a lighthouse at night", 4.2, tmp_path / "clip.mp4",
                                        idempotency_key="r1:generate:1.1", on_started=on_started)

    assert clip.path.read_bytes() == server.video
    assert clip.cost == Decimal("0.2100")  # 4.2 s × 0.05, no compute price configured
    assert started == [clip.provider_id]
    [create] = server.creates
    assert create.headers["authorization"] == f"{provider.auth} test-token"
    expected_input = {"prompt": "a lighthouse at night", "aspect_ratio": "16:9",
                      "duration": 5 if provider.name == "replicate" else "5"}
    assert (create.body["input"] if provider.name == "replicate" else create.body) == expected_input
    [download] = server.downloads
    assert download.headers["host"].startswith("localhost:")  # the CDN host, not the API's 127.0.0.1
    assert "authorization" not in download.headers  # the token never leaves the API's origin
    assert len(server.polls) >= 2


async def test_compute_time_prices_the_clip_when_a_compute_price_is_set(
        provider: Provider, server: PredictionServer, tmp_path: Path) -> None:
    async with make(provider, server, price_per_compute_second=COMPUTE_PRICE) as generator:
        clip = await generator.generate("a forest", 4, tmp_path / "clip.mp4")

    # Replicate reports metrics.predict_time 12.5 s, fal metrics.inference_time 8.25 s.
    expected = {"replicate": Decimal("0.0175"), "fal": Decimal("0.0116")}[provider.name]
    assert clip.cost == expected


async def test_replicate_with_a_version_uses_the_predictions_endpoint(sample_mp4: bytes, tmp_path: Path) -> None:
    model = f"{replicate_server.MODEL}:{replicate_server.VERSION}"
    with ReplicateServer(video=sample_mp4, steps=1, output_as_list=True) as server:
        async with make(PROVIDERS[0], server, model=model) as generator:
            clip = await generator.generate("a forest", 2, tmp_path / "clip.mp4")

    [create] = server.creates
    assert create.body == {"version": model, "input": {"prompt": "a forest", "duration": 5, "aspect_ratio": "16:9"}}
    assert clip.path.read_bytes() == server.video  # the output was a one-item list


async def test_replicate_prefer_wait_finishes_in_the_create_call(sample_mp4: bytes, tmp_path: Path) -> None:
    with ReplicateServer(video=sample_mp4, steps=3) as server:
        async with make(PROVIDERS[0], server, prefer_wait=30) as generator:
            await generator.generate("a forest", 2, tmp_path / "clip.mp4")

    assert server.creates[0].headers["prefer"] == "wait=30"
    assert not server.polls and len(server.downloads) == 1


def test_the_replicate_fake_refuses_a_body_without_version(sample_mp4: bytes) -> None:
    """The fake follows the reference, so a client that sends ``model`` instead fails its tests."""
    with ReplicateServer(video=sample_mp4) as server:
        answer = httpx.post(f"{server.url}/v1/predictions", headers={"Authorization": "Bearer test-token"},
                            json={"model": replicate_server.MODEL, "input": {"prompt": "a forest"}})

    assert answer.status_code == 422
    assert answer.json()["invalid_fields"][0]["description"] == "version is required"


# Provider errors.


async def test_rate_limit_carries_retry_after(provider: Provider, server: PredictionServer, tmp_path: Path) -> None:
    server.script(create=["429:7"])

    async with make(provider, server) as generator:
        with pytest.raises(TransientGenerationError) as caught:
            await generator.generate("a forest", 2, tmp_path / "clip.mp4")

    assert caught.value.code == "rate_limited" and caught.value.retryable is True
    assert caught.value.retry_after == 7.0
    assert not server.polls


@pytest.mark.parametrize(("provider_name", "status", "code"), [
    ("replicate", "402", "generator_payment_required"),
    ("replicate", "422", "generator_request_invalid"),
    ("fal", "422", "generator_request_invalid"),
    ("fal", "403", "generator_unauthorized"),
])
async def test_a_refusal_of_our_request_is_an_operator_error(
        sample_mp4: bytes, tmp_path: Path, provider_name: str, status: str, code: str) -> None:
    provider = next(p for p in PROVIDERS if p.name == provider_name)
    with provider.fake(video=sample_mp4) as server:
        server.script(create=[status])
        async with make(provider, server) as generator:
            with pytest.raises(ProviderMisconfigured) as caught:
                await generator.generate("a forest", 2, tmp_path / "clip.mp4")

    assert caught.value.code == code and caught.value.retryable is False
    assert "rephras" not in caught.value.message.lower() and "contact support" in caught.value.message
    assert f"HTTP {status}" in caught.value.detail or caught.value.detail


@pytest.mark.parametrize("kind", ["token", "model"])
async def test_a_wrong_token_or_model_is_an_operator_error(
        provider: Provider, server: PredictionServer, tmp_path: Path, kind: str) -> None:
    options = {"token": "wrong"} if kind == "token" else {"model": provider.model.replace("video", "nothing")}
    async with make(provider, server, **options) as generator:  # type: ignore[arg-type]
        with pytest.raises(ProviderMisconfigured) as caught:
            await generator.generate("a forest", 2, tmp_path / "clip.mp4")

    expected = "generator_unauthorized" if kind == "token" else "generator_model_not_found"
    assert caught.value.code == expected
    assert "wrong" not in caught.value.message and "rephras" not in caught.value.message.lower()


async def test_an_input_the_model_schema_refuses_is_an_operator_error(
        provider: Provider, server: PredictionServer, tmp_path: Path) -> None:
    """An aspect ratio the model does not take: Replicate refuses the create, fal the result."""
    async with make(provider, server, aspect_ratio="4:3") as generator:
        with pytest.raises(ProviderMisconfigured) as caught:
            await generator.generate("a forest", 2, tmp_path / "clip.mp4")

    assert caught.value.code == "generator_request_invalid"
    assert "aspect_ratio" in caught.value.detail


async def test_a_failed_prediction(provider: Provider, server: PredictionServer, tmp_path: Path) -> None:
    failure = "failed:CUDA out of memory" if provider.name == "replicate" else "failed:runner_server_error:boom"
    server.script(poll=[failure])

    async with make(provider, server) as generator:
        with pytest.raises((GenerationRejected, TransientGenerationError)) as caught:
            await generator.generate("a forest", 2, tmp_path / "clip.mp4")

    assert caught.value.code in ("invalid_prompt", "generation_failed")
    assert not server.downloads and not server.cancels  # over on the provider's side already


async def test_a_timed_out_fal_request_is_transient(sample_mp4: bytes, tmp_path: Path) -> None:
    with FalServer(video=sample_mp4, steps=1) as server:
        server.script(poll=["failed:request_timeout:Request timed out"])
        async with make(PROVIDERS[1], server) as generator:
            with pytest.raises(TransientGenerationError) as caught:
                await generator.generate("a forest", 2, tmp_path / "clip.mp4")

    assert caught.value.code == "generation_failed" and caught.value.retryable is True


async def test_a_fal_content_policy_refusal(sample_mp4: bytes, tmp_path: Path) -> None:
    with FalServer(video=sample_mp4, steps=1) as server:
        server.script_result(["content_policy"])
        async with make(PROVIDERS[1], server) as generator:
            with pytest.raises(GenerationRejected) as caught:
                await generator.generate("something forbidden", 2, tmp_path / "clip.mp4")

    assert caught.value.code == "content_policy" and caught.value.retryable is False
    assert len(server.results) == 1 and not server.downloads


# Cancel and resume.


async def test_cancelling_the_task_cancels_remotely(
        provider: Provider, server: PredictionServer, tmp_path: Path) -> None:
    server.script(poll=["ok", "stall"])
    running = asyncio.Event()

    async def on_progress(fraction: float) -> None:
        running.set()

    async with make(provider, server) as generator:
        task = asyncio.create_task(generator.generate("a forest", 2, tmp_path / "clip.mp4", on_progress=on_progress))
        async with asyncio.timeout(5):
            await running.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    [cancel] = server.cancels
    assert cancel.prediction_id == server.polls[0].prediction_id
    assert cancel.headers["authorization"] == f"{provider.auth} test-token"
    assert server.cancelled_ids == [cancel.prediction_id]


async def test_resume_follows_the_recorded_prediction(
        provider: Provider, server: PredictionServer, tmp_path: Path) -> None:
    """A prediction an earlier worker created (here straight through the provider's API) is
    followed, not created again."""
    async with httpx.AsyncClient() as client:
        if provider.name == "replicate":
            created = (await client.post(f"{server.url}/v1/models/{provider.model}/predictions",
                                         headers={"Authorization": "Bearer test-token"},
                                         json={"input": {"prompt": "a forest", "duration": 5}})).json()["id"]
        else:
            created = (await client.post(f"{server.url}/{provider.model}", headers={"Authorization": "Key test-token"},
                                         json={"prompt": "a forest", "duration": "5"})).json()["request_id"]

    async with make(provider, server) as generator:
        clip = await generator.generate("a forest", 2, tmp_path / "clip.mp4", resume_id=created)

    assert clip.provider_id == created and len(server.creates) == 1
    assert {c.prediction_id for c in server.polls} == {created}


# Output hosts.


async def test_an_output_on_a_foreign_host_is_refused(
        provider: Provider, server: PredictionServer, tmp_path: Path) -> None:
    port = server.url.rsplit(":", 1)[1]
    server.output_url = f"http://127.0.0.2:{port}/files/x.mp4"

    async with make(provider, server) as generator:
        with pytest.raises(MediaError) as caught:
            await generator.generate("a forest", 2, tmp_path / "clip.mp4")

    assert caught.value.code == "untrusted_output_url" and not server.downloads


async def test_the_cdn_over_plain_http_is_refused_without_the_loopback_allowance(
        provider: Provider, server: PredictionServer, tmp_path: Path) -> None:
    async with make(provider, server, allow_http_loopback=False) as generator:
        with pytest.raises(MediaError):
            await generator.generate("a forest", 2, tmp_path / "clip.mp4")

    assert not server.downloads


# Wiring from settings.


@pytest.mark.parametrize(("name", "adapter", "hosts", "model"), [
    ("replicate", ReplicateVideoGenerator, REPLICATE_OUTPUT_HOSTS, "kwaivgi/kling-v2.1"),
    ("fal", FalVideoGenerator, FAL_OUTPUT_HOSTS, "fal-ai/kling-video/v2.1/standard/text-to-video"),
])
def test_settings_choose_the_adapter_and_its_cdn(name: str, adapter: type[HttpVideoGenerator], hosts: tuple[str, ...],
                                                 model: str) -> None:
    settings = Settings(_env_file=None, generator=name, generator_api_token="t",  # type: ignore[call-arg, arg-type]
                        generator_model=model)
    generator = build_generator(settings, FfmpegRunner(None))

    assert isinstance(generator, adapter)
    assert isinstance(generator, HttpVideoGenerator)
    assert generator._output_hosts == frozenset(hosts)
    assert generator._base_url == adapter.default_base_url
    generator._check_output_url("https://v3.fal.media/files/x.mp4" if name == "fal"
                                else "https://replicate.delivery/xezq/x.mp4")
    with pytest.raises(MediaError):
        generator._check_output_url("https://evil.example/x.mp4")
