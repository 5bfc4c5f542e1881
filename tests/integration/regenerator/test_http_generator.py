"""``HttpVideoGenerator`` against a local fake of the prediction API, failures included."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from email.utils import format_datetime
from pathlib import Path

import av
import httpx
import pytest

from clipchat.errors import InvalidInput, MediaError, ProviderMisconfigured, TransientError
from services.regenerator.generator import VideoGenerator
from services.regenerator.http_generator import (
    REJECTED_MESSAGE,
    TIMEOUT_MESSAGE,
    GenerationRejected,
    HttpVideoGenerator,
    TransientGenerationError,
)
from tests.conftest import free_port
from tests.fakes.prediction_server import CONTENT_POLICY_BODY, PredictionServer, render_sample_mp4

MODEL = "acme/video-1"
PRICE = Decimal("0.05")


@pytest.fixture(scope="module")
def sample_mp4(tmp_path_factory: pytest.TempPathFactory, ffmpeg_exe: str) -> bytes:
    return render_sample_mp4(tmp_path_factory.mktemp("video") / "sample.mp4", ffmpeg=ffmpeg_exe).read_bytes()


@pytest.fixture
def server(sample_mp4: bytes) -> Iterator[PredictionServer]:
    with PredictionServer(video=sample_mp4) as fake:
        yield fake


def make_generator(url: str, token: str = "test-token", *, request_timeout: float = 2.0,
                   generation_timeout: float = 10.0) -> HttpVideoGenerator:
    """Fast polling so the tests take milliseconds per poll, not seconds."""
    return HttpVideoGenerator(url, token, MODEL, price_per_second=PRICE, request_timeout=request_timeout,
                              generation_timeout=generation_timeout, poll_initial=0.01, poll_max=0.04)


@pytest.fixture
async def generator(server: PredictionServer) -> AsyncIterator[HttpVideoGenerator]:
    async with make_generator(server.url) as gen:
        yield gen


def test_satisfies_the_video_generator_interface() -> None:
    implementation: VideoGenerator = make_generator("http://127.0.0.1:1")  # checked by mypy
    assert implementation.name == "http"


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# Happy path.


async def test_generates_a_valid_clip_with_estimated_cost(
        server: PredictionServer, generator: HttpVideoGenerator, tmp_path: Path) -> None:
    dest = tmp_path / "clip.mp4"

    clip = await generator.generate("a neon city at night", 2.5, dest)

    assert clip.path == dest
    assert dest.read_bytes() == server.video
    with av.open(str(dest)) as container:
        assert container.streams.video[0].codec_context.name == "h264"
    assert clip.duration == 2.5
    assert clip.cost == Decimal("0.1250")
    assert leftovers(tmp_path) == ["clip.mp4"]  # no temporary file left beside it
    [create] = server.creates
    assert create.body == {"model": MODEL, "input": {"prompt": "a neon city at night", "duration": 2.5}}
    assert create.headers["authorization"] == "Bearer test-token"
    assert clip.provider_id
    assert {p.prediction_id for p in server.polls} == {clip.provider_id}
    assert len(server.downloads) == 1 and not server.cancels


async def test_cost_and_duration_come_from_the_response_when_present(
        server: PredictionServer, generator: HttpVideoGenerator, tmp_path: Path) -> None:
    server.cost = "0.37"
    server.output_duration = 3.96

    clip = await generator.generate("a forest", 4, tmp_path / "clip.mp4")

    assert clip.cost == Decimal("0.3700")
    assert clip.duration == 3.96


async def test_unreadable_cost_falls_back_to_the_price(
        server: PredictionServer, generator: HttpVideoGenerator, tmp_path: Path) -> None:
    server.cost = "about a dollar"

    clip = await generator.generate("a forest", 4, tmp_path / "clip.mp4")

    assert clip.cost == Decimal("0.2000")


def test_estimate_cost_is_decimal_to_a_hundredth_of_a_cent() -> None:
    gen = HttpVideoGenerator("http://127.0.0.1:1", "t", MODEL, price_per_second=Decimal("0.05"))
    assert gen.estimate_cost(3.33333) == Decimal("0.1667")
    assert gen.estimate_cost(0.1) == Decimal("0.0050")


async def test_progress_is_reported_while_it_runs(
        server: PredictionServer, generator: HttpVideoGenerator, tmp_path: Path) -> None:
    seen: list[float] = []

    async def record(fraction: float) -> None:
        seen.append(fraction)

    await generator.generate("a forest", 2, tmp_path / "clip.mp4", on_progress=record)

    assert seen == [0.25, 0.5, 0.75, 1.0]


async def test_follows_a_redirect_on_the_same_origin(
        server: PredictionServer, generator: HttpVideoGenerator, tmp_path: Path) -> None:
    server.script(download=[f"redirect:{server.url}/files/moved.mp4"])

    clip = await generator.generate("a forest", 2, tmp_path / "clip.mp4")

    assert clip.path.read_bytes() == server.video
    assert len(server.downloads) == 2


# Failures of the create call.


@pytest.mark.parametrize("action", ["500", "503", "408", "502"])
async def test_server_errors_on_create_are_transient(
        server: PredictionServer, generator: HttpVideoGenerator, tmp_path: Path, action: str) -> None:
    server.script(create=[action])

    with pytest.raises(TransientError) as caught:
        await generator.generate("a forest", 2, tmp_path / "clip.mp4")

    assert caught.value.retryable is True
    assert isinstance(caught.value, TransientGenerationError) and caught.value.retry_after is None
    assert not server.polls and leftovers(tmp_path) == []


async def test_rate_limit_carries_retry_after_seconds(
        server: PredictionServer, generator: HttpVideoGenerator, tmp_path: Path) -> None:
    server.script(create=["429:7"])

    with pytest.raises(TransientGenerationError) as caught:
        await generator.generate("a forest", 2, tmp_path / "clip.mp4")

    assert caught.value.code == "rate_limited"
    assert caught.value.retryable is True
    assert caught.value.retry_after == 7.0


async def test_retry_after_as_http_date(
        server: PredictionServer, generator: HttpVideoGenerator, tmp_path: Path) -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    server.script(create=[f"503:{when}"])

    with pytest.raises(TransientGenerationError) as caught:
        await generator.generate("a forest", 2, tmp_path / "clip.mp4")

    assert caught.value.retry_after is not None and 25 <= caught.value.retry_after <= 30


async def test_content_policy_refusal_is_permanent_with_the_provider_body(
        server: PredictionServer, generator: HttpVideoGenerator, tmp_path: Path) -> None:
    server.script(create=["content_policy"])

    with pytest.raises(GenerationRejected) as caught:
        await generator.generate("something forbidden", 2, tmp_path / "clip.mp4")

    error = caught.value
    assert isinstance(error, InvalidInput) and error.retryable is False
    assert error.code == "content_policy"
    assert error.message == REJECTED_MESSAGE
    assert CONTENT_POLICY_BODY["detail"] in error.detail
    assert not server.polls and not server.downloads


async def test_invalid_prompt_is_permanent(
        server: PredictionServer, generator: HttpVideoGenerator, tmp_path: Path) -> None:
    server.script(create=["invalid_prompt"])

    with pytest.raises(GenerationRejected) as caught:
        await generator.generate("a forest", 2, tmp_path / "clip.mp4")

    assert caught.value.code == "invalid_prompt"
    assert caught.value.retryable is False


async def test_wrong_token_is_permanent(server: PredictionServer, tmp_path: Path) -> None:
    async with make_generator(server.url, token="wrong") as gen:
        with pytest.raises(ProviderMisconfigured) as caught:
            await gen.generate("a forest", 2, tmp_path / "clip.mp4")

    assert caught.value.code == "generator_unauthorized"
    assert caught.value.retryable is False
    assert "rephras" not in caught.value.message.lower()


async def test_empty_prompt_is_refused_without_a_generation_call(
        server: PredictionServer, generator: HttpVideoGenerator, tmp_path: Path) -> None:
    with pytest.raises(GenerationRejected):
        await generator.generate("   ", 2, tmp_path / "clip.mp4")

    assert server.calls == []


async def test_malformed_json_is_transient(
        server: PredictionServer, generator: HttpVideoGenerator, tmp_path: Path) -> None:
    server.script(create=["malformed"])

    with pytest.raises(TransientGenerationError) as caught:
        await generator.generate("a forest", 2, tmp_path / "clip.mp4")

    assert caught.value.code == "malformed_response"


async def test_read_timeout_is_transient(server: PredictionServer, tmp_path: Path) -> None:
    server.script(create=["slow:1.5"])

    async with make_generator(server.url, request_timeout=0.3) as gen:
        with pytest.raises(TransientGenerationError) as caught:
            await gen.generate("a forest", 2, tmp_path / "clip.mp4")

    assert caught.value.code == "generator_timeout"


async def test_connection_refused_is_transient(tmp_path: Path) -> None:
    async with make_generator(f"http://127.0.0.1:{free_port()}") as gen:
        with pytest.raises(TransientGenerationError) as caught:
            await gen.generate("a forest", 2, tmp_path / "clip.mp4")

    assert caught.value.retryable is True


# Failures while polling.


@pytest.mark.parametrize(("error_text", "permanent", "code"), [
    ("NSFW content detected in the output", True, "content_policy"),
    ("Invalid input: duration must be at most 10", True, "invalid_prompt"),
    ("Prediction timed out waiting for a GPU", False, "generation_failed"),
    ("No capacity available, try again later", False, "generation_failed"),
])
async def test_failed_prediction_is_classified_by_its_error_text(
        server: PredictionServer, generator: HttpVideoGenerator, tmp_path: Path,
        error_text: str, permanent: bool, code: str) -> None:
    server.script(poll=["ok", f"failed:{error_text}"])

    with pytest.raises((GenerationRejected, TransientGenerationError)) as caught:
        await generator.generate("a forest", 2, tmp_path / "clip.mp4")

    error = caught.value
    assert isinstance(error, GenerationRejected | TransientGenerationError)
    assert isinstance(error, GenerationRejected) is permanent
    assert error.retryable is not permanent
    assert error.code == code
    assert error_text in error.detail
    assert not server.cancels and not server.downloads  # already over on the provider's side


async def test_poll_error_is_transient_and_cancels_the_prediction(
        server: PredictionServer, generator: HttpVideoGenerator, tmp_path: Path) -> None:
    server.script(poll=["ok", "503:2"])

    with pytest.raises(TransientGenerationError) as caught:
        await generator.generate("a forest", 2, tmp_path / "clip.mp4")

    assert caught.value.retry_after == 2.0
    [create_poll, *_] = server.polls
    assert [c.prediction_id for c in server.cancels] == [create_poll.prediction_id]


async def test_malformed_poll_answer_is_transient(
        server: PredictionServer, generator: HttpVideoGenerator, tmp_path: Path) -> None:
    server.script(poll=["malformed"])

    with pytest.raises(TransientGenerationError) as caught:
        await generator.generate("a forest", 2, tmp_path / "clip.mp4")

    assert caught.value.code == "malformed_response"
    assert len(server.cancels) == 1


async def test_prediction_canceled_by_the_provider_is_transient(
        server: PredictionServer, generator: HttpVideoGenerator, tmp_path: Path) -> None:
    server.script(poll=["canceled"])

    with pytest.raises(TransientGenerationError) as caught:
        await generator.generate("a forest", 2, tmp_path / "clip.mp4")

    assert caught.value.code == "generation_canceled"


# Cancellation and the generation timeout.


async def test_cancelling_the_task_cancels_the_remote_prediction(
        server: PredictionServer, generator: HttpVideoGenerator, tmp_path: Path) -> None:
    server.script(poll=["ok", "stall"])
    running = asyncio.Event()

    async def on_progress(fraction: float) -> None:
        running.set()

    task = asyncio.create_task(generator.generate("a forest", 2, tmp_path / "clip.mp4",
                                                  on_progress=on_progress))
    async with asyncio.timeout(5):
        await running.wait()

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert len(server.creates) == 1
    [cancel] = server.cancels
    assert cancel.prediction_id == server.polls[0].prediction_id
    assert cancel.headers["authorization"] == "Bearer test-token"
    assert leftovers(tmp_path) == []


async def test_generation_timeout_cancels_remotely_and_asks_for_a_retry(
        server: PredictionServer, tmp_path: Path) -> None:
    server.script(poll=["stall"])

    async with make_generator(server.url, generation_timeout=0.3) as gen:
        with pytest.raises(TransientError) as caught:
            await gen.generate("a forest", 2, tmp_path / "clip.mp4")

    assert caught.value.message == TIMEOUT_MESSAGE
    assert caught.value.code == "generation_timeout"
    assert caught.value.retryable is True
    assert len(server.cancels) == 1
    assert not server.downloads and leftovers(tmp_path) == []


# No double pay: idempotency keys, the started checkpoint and resuming.

KEY = "regen-42:generation:1"


async def create_directly(server: PredictionServer, prompt: str = "a forest", duration: float = 2) -> str:
    """Start a prediction as another worker would have (with ``KEY``); its id."""
    async with httpx.AsyncClient() as http:
        response = await http.post(f"{server.url}/predictions", headers={
            "Authorization": f"Bearer {server.token}", "Idempotency-Key": KEY},
            json={"model": MODEL, "input": {"prompt": prompt, "duration": duration}})
    assert response.status_code == 201
    prediction_id: str = response.json()["id"]
    return prediction_id


async def wait_until(condition: Callable[[], bool], limit: float = 5.0) -> None:
    """Poll ``condition`` (state of the fake, which lives on another thread) until it holds."""
    for _ in range(int(limit / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the condition did not hold in time")


async def test_the_create_request_carries_the_idempotency_key(
        server: PredictionServer, generator: HttpVideoGenerator, tmp_path: Path) -> None:
    clip = await generator.generate("a forest", 2, tmp_path / "clip.mp4", idempotency_key=KEY)

    [create] = server.creates
    assert create.idempotency_key == KEY
    assert server.paid_for(KEY) == 1 and server.prediction_for(KEY) == clip.provider_id


async def test_without_a_key_no_idempotency_header_is_sent(
        server: PredictionServer, generator: HttpVideoGenerator, tmp_path: Path) -> None:
    await generator.generate("a forest", 2, tmp_path / "clip.mp4")

    [create] = server.creates
    assert "idempotency-key" not in create.headers
    assert server.paid_for("") == 1


async def test_a_repeated_create_with_the_same_key_costs_one_prediction(
        server: PredictionServer, generator: HttpVideoGenerator, tmp_path: Path) -> None:
    first = await generator.generate("a forest", 2, tmp_path / "first.mp4", idempotency_key=KEY)
    again = await generator.generate("a forest", 2, tmp_path / "again.mp4", idempotency_key=KEY)

    assert [c.idempotency_key for c in server.creates] == [KEY, KEY]
    assert server.paid_predictions == 1
    assert again.provider_id == first.provider_id
    assert again.path.read_bytes() == first.path.read_bytes() == server.video


async def test_a_create_whose_answer_was_lost_is_not_paid_twice(server: PredictionServer, tmp_path: Path) -> None:
    """The first create times out on our side but the provider goes on and creates the prediction."""
    server.script(create=["slow:1.0"])

    async with make_generator(server.url, request_timeout=0.3) as gen:
        with pytest.raises(TransientGenerationError) as lost:
            await gen.generate("a forest", 2, tmp_path / "clip.mp4", idempotency_key=KEY)
        # Repeated while the provider is still working on the first one: asked to come back.
        with pytest.raises(TransientGenerationError) as in_flight:
            await gen.generate("a forest", 2, tmp_path / "clip.mp4", idempotency_key=KEY)
        await wait_until(lambda: server.paid_predictions == 1)
        clip = await gen.generate("a forest", 2, tmp_path / "clip.mp4", idempotency_key=KEY)

    assert lost.value.code == "generator_timeout"
    assert in_flight.value.code == "idempotency_conflict" and in_flight.value.retryable is True
    assert in_flight.value.retry_after == 1.0
    assert len(server.creates) == 3 and server.paid_predictions == 1
    assert clip.provider_id == server.prediction_for(KEY)
    assert not server.cancelled_ids


async def test_the_same_key_with_another_prompt_is_refused_without_a_charge(
        server: PredictionServer, generator: HttpVideoGenerator, tmp_path: Path) -> None:
    await generator.generate("a forest", 2, tmp_path / "clip.mp4", idempotency_key=KEY)

    with pytest.raises(GenerationRejected):
        await generator.generate("a desert", 2, tmp_path / "other.mp4", idempotency_key=KEY)

    assert server.paid_predictions == 1


async def test_on_started_gets_the_id_once_before_polling(
        server: PredictionServer, generator: HttpVideoGenerator, tmp_path: Path) -> None:
    events: list[str] = []

    async def on_started(prediction_id: str) -> None:
        events.append(f"started {prediction_id} after {len(server.polls)} polls")

    async def on_progress(fraction: float) -> None:
        events.append(f"progress {fraction}")

    clip = await generator.generate("a forest", 2, tmp_path / "clip.mp4", idempotency_key=KEY,
                                    on_started=on_started, on_progress=on_progress)

    assert events[0] == f"started {clip.provider_id} after 0 polls"
    assert [e for e in events if e.startswith("started")] == events[:1]
    assert events[-1] == "progress 1.0"


async def test_on_started_raising_cancels_the_remote_prediction(
        server: PredictionServer, generator: HttpVideoGenerator, tmp_path: Path) -> None:
    async def on_started(prediction_id: str) -> None:
        raise RuntimeError("the checkpoint could not be written")

    with pytest.raises(RuntimeError, match="checkpoint"):
        await generator.generate("a forest", 2, tmp_path / "clip.mp4", idempotency_key=KEY,
                                 on_started=on_started)

    assert server.cancelled_ids == [server.prediction_for(KEY)]
    assert not server.polls and not server.downloads and leftovers(tmp_path) == []


async def test_resume_polls_the_existing_prediction_and_creates_nothing(
        server: PredictionServer, generator: HttpVideoGenerator, tmp_path: Path) -> None:
    prediction_id = await create_directly(server)
    started: list[str] = []

    async def on_started(provider_id: str) -> None:
        started.append(provider_id)

    clip = await generator.generate("a forest", 2, tmp_path / "clip.mp4", idempotency_key=KEY,
                                    resume_id=prediction_id, on_started=on_started)

    assert clip.provider_id == prediction_id and clip.path.read_bytes() == server.video
    assert len(server.creates) == 1 and server.paid_predictions == 1  # only the other worker's
    assert {p.prediction_id for p in server.polls} == {prediction_id}
    assert started == [] and not server.cancelled_ids


async def test_resume_of_a_finished_prediction_only_downloads_it(
        server: PredictionServer, generator: HttpVideoGenerator, tmp_path: Path) -> None:
    first = await generator.generate("a forest", 2, tmp_path / "first.mp4", idempotency_key=KEY)
    polls = len(server.polls)

    again = await generator.generate("a forest", 2, tmp_path / "again.mp4", resume_id=first.provider_id)

    assert again.provider_id == first.provider_id and again.path.read_bytes() == server.video
    assert len(server.creates) == 1 and server.paid_predictions == 1
    assert len(server.polls) == polls + 1 and len(server.downloads) == 2


async def test_resume_of_an_unknown_prediction_creates_one_with_the_key(
        server: PredictionServer, generator: HttpVideoGenerator, tmp_path: Path) -> None:
    started: list[str] = []

    async def on_started(provider_id: str) -> None:
        started.append(provider_id)

    clip = await generator.generate("a forest", 2, tmp_path / "clip.mp4", idempotency_key=KEY,
                                    resume_id="forgotten-by-the-provider", on_started=on_started)

    assert server.polls[0].prediction_id == "forgotten-by-the-provider"
    [create] = server.creates
    assert create.idempotency_key == KEY and server.paid_for(KEY) == 1
    assert started == [clip.provider_id] == [server.prediction_for(KEY)]


async def test_cancelling_a_resumed_generation_cancels_the_remote_prediction(
        server: PredictionServer, generator: HttpVideoGenerator, tmp_path: Path) -> None:
    prediction_id = await create_directly(server)
    server.script(poll=["ok", "stall"])
    running = asyncio.Event()

    async def on_progress(fraction: float) -> None:
        running.set()

    task = asyncio.create_task(generator.generate("a forest", 2, tmp_path / "clip.mp4", idempotency_key=KEY,
                                                  resume_id=prediction_id, on_progress=on_progress))
    async with asyncio.timeout(5):
        await running.wait()

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert server.cancelled_ids == [prediction_id]
    assert len(server.creates) == 1 and server.paid_predictions == 1
    assert leftovers(tmp_path) == []


# The download.


@pytest.mark.parametrize("action", ["corrupt", "truncated", "empty", "500"])
async def test_bad_download_is_transient_and_leaves_no_file(
        server: PredictionServer, generator: HttpVideoGenerator, tmp_path: Path, action: str) -> None:
    server.script(download=[action])
    dest = tmp_path / "clip.mp4"

    with pytest.raises(TransientGenerationError) as caught:
        await generator.generate("a forest", 2, dest)

    assert caught.value.code == "download_failed"
    assert not dest.exists() and leftovers(tmp_path) == []
    assert len(server.downloads) == 1
    assert not server.cancels  # the prediction had already succeeded


def other_host(server: PredictionServer) -> str:
    return server.url.replace("127.0.0.1", "localhost")


@pytest.mark.parametrize("output", [
    lambda s: other_host(s) + "/files/x.mp4",
    lambda s: s.url.replace("http://", "ftp://") + "/files/x.mp4",
    lambda s: "file:///etc/passwd",
    lambda s: f"http://127.0.0.1:{free_port()}/files/x.mp4",
])
async def test_output_url_off_the_api_origin_is_refused(
        server: PredictionServer, generator: HttpVideoGenerator, tmp_path: Path, output: object) -> None:
    server.output_url = output(server)  # type: ignore[operator]

    with pytest.raises(MediaError) as caught:
        await generator.generate("a forest", 2, tmp_path / "clip.mp4")

    assert caught.value.code == "untrusted_output_url"
    assert caught.value.retryable is False
    assert not server.downloads and leftovers(tmp_path) == []


@pytest.mark.parametrize("target", [
    lambda s: "file:///etc/passwd",
    lambda s: other_host(s) + "/files/x.mp4",
])
async def test_redirect_off_the_api_origin_is_refused(
        server: PredictionServer, generator: HttpVideoGenerator, tmp_path: Path, target: object) -> None:
    server.script(download=[f"redirect:{target(server)}"])  # type: ignore[operator]

    with pytest.raises(MediaError):
        await generator.generate("a forest", 2, tmp_path / "clip.mp4")

    assert len(server.downloads) == 1 and leftovers(tmp_path) == []


async def test_allowed_output_host_is_https_only_and_never_gets_the_token(
        sample_mp4: bytes, tmp_path: Path) -> None:
    """A CDN named in ``output_hosts``; the provider answers the create with a finished prediction."""
    seen: list[httpx.Request] = []
    output = "https://cdn.example.test/out/x.mp4"

    def provider(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.host == "cdn.example.test":
            return httpx.Response(200, content=sample_mp4)
        return httpx.Response(201, json={"id": "p1", "status": "succeeded", "output": output})

    async with httpx.AsyncClient(transport=httpx.MockTransport(provider)) as client:
        gen = HttpVideoGenerator("https://api.example.test", "secret", MODEL, price_per_second=PRICE,
                                 http=client, output_hosts=["cdn.example.test"])
        clip = await gen.generate("a forest", 2, tmp_path / "clip.mp4")
        output = output.replace("https://", "http://")
        with pytest.raises(MediaError):
            await gen.generate("a forest", 2, tmp_path / "other.mp4")

    assert clip.path.read_bytes() == sample_mp4 and clip.provider_id == "p1"
    api, cdn = seen[:2]
    assert api.headers["authorization"] == "Bearer secret"
    assert cdn.url.host == "cdn.example.test" and "authorization" not in cdn.headers
    assert [r.url.host for r in seen[2:]] == ["api.example.test"]  # the http:// output was not fetched
