"""Wires the regenerator: rewriters, generator, pipeline, gRPC server and queue consumer."""

from __future__ import annotations

import logging
from typing import Any

from clipchat.broker import REGENERATE_QUEUE, Broker
from clipchat.media.ffmpeg import FfmpegRunner
from clipchat.queue_service import QueueService
from clipchat.rpc import GrpcServer
from clipchat.settings import Settings
from clipchat.status_client import StatusClient
from clipchat.storage import Storage
from services.regenerator import server as regenerator_server
from services.regenerator.generator import VideoGenerator
from services.regenerator.pipeline import RegenerationPipeline
from services.regenerator.rewrite import (
    ChainRewriter,
    LLMRewriter,
    ModifierRewriter,
    PromptRewriter,
    TemplateRewriter,
)
from services.regenerator.worker import RegenerateWorker

log = logging.getLogger("clipchat.regenerator")


def build_rewriter(settings: Settings) -> PromptRewriter:
    """Templates first; then the LLM when one is configured, else the honest modifier fallback."""
    rewriters: list[PromptRewriter] = [TemplateRewriter()]
    if settings.llm_base_url:
        rewriters.append(LLMRewriter(
            base_url=settings.llm_base_url, model=settings.llm_model, api_key=settings.llm_api_key,
            timeout_seconds=settings.llm_timeout_seconds,
            price_per_1k_input=settings.llm_price_per_1k_input,
            price_per_1k_output=settings.llm_price_per_1k_output,
            history_turns=settings.llm_history_turns, max_instruction_chars=settings.max_instruction_chars))
    else:
        rewriters.append(ModifierRewriter())
    return ChainRewriter(rewriters)


def build_generator(settings: Settings, ffmpeg: FfmpegRunner) -> VideoGenerator:
    """The generator ``CLIPCHAT_GENERATOR`` names, with its provider's CDN as the default output hosts."""
    if settings.generator == "local":
        from services.regenerator.local_generator import LocalVideoGenerator

        return LocalVideoGenerator(ffmpeg)
    from services.regenerator.fal_generator import FAL_OUTPUT_HOSTS, FalVideoGenerator
    from services.regenerator.http_generator import HttpVideoGenerator
    from services.regenerator.replicate_generator import REPLICATE_OUTPUT_HOSTS, ReplicateVideoGenerator

    adapters: dict[str, tuple[type[HttpVideoGenerator], tuple[str, ...]]] = {
        "http": (HttpVideoGenerator, ()), "replicate": (ReplicateVideoGenerator, REPLICATE_OUTPUT_HOSTS),
        "fal": (FalVideoGenerator, FAL_OUTPUT_HOSTS)}
    adapter, cdn_hosts = adapters[settings.generator]
    listed = [h.strip() for h in settings.generator_output_hosts.split(",") if h.strip()]
    options: dict[str, Any] = {"prefer_wait": settings.generator_prefer_wait_seconds} \
        if adapter is ReplicateVideoGenerator else {}
    return adapter(settings.generator_url, settings.generator_api_token, settings.generator_model,
                   price_per_second=settings.generation_price_per_second,
                   price_per_compute_second=settings.generator_price_per_compute_second,
                   aspect_ratio=settings.generator_aspect_ratio,
                   output_hosts=listed or cdn_hosts,
                   allow_http_loopback=settings.generator_allow_http_loopback,
                   request_timeout=settings.generator_request_timeout_seconds,
                   generation_timeout=settings.generator_timeout_seconds,
                   poll_initial=settings.generator_poll_initial_seconds,
                   poll_max=settings.generator_poll_max_seconds, **options)


class RegeneratorService(QueueService):
    def __init__(self, settings: Settings, *, storage: Storage, broker: Broker,
                 rewriter: PromptRewriter | None = None, generator: VideoGenerator | None = None) -> None:
        super().__init__(settings, broker=broker, grace=2.0,
                         status=StatusClient(settings.status_addr, deadline=settings.grpc_deadline_seconds,
                                             settings=settings))
        ffmpeg = FfmpegRunner(settings.ffmpeg_path or None)
        self.generator = generator or build_generator(settings, ffmpeg)
        self.pipeline = RegenerationPipeline(status=self.status, storage=storage,
                                             rewriter=rewriter or build_rewriter(settings),
                                             generator=self.generator, ffmpeg=ffmpeg, settings=settings)
        self.worker = RegenerateWorker(self.pipeline, self.status, delivery_limit=settings.delivery_limit)
        self.servicer = regenerator_server.RegeneratorServicer(status=self.status, generator=self.generator,
                                                               settings=settings)

    async def start(self, *, host: str = "127.0.0.1", port: int = 0, consume: bool = True) -> GrpcServer:
        """Serve, then take ``worker_concurrency`` regenerate tasks at once. The work in hand gets
        2 s at ``stop`` (a paid step is checkpointed, so a redelivery resumes it)."""
        server = await self._serve(
            [(regenerator_server.add_to_server, self.servicer, regenerator_server.SERVICE_NAME)],
            queue=REGENERATE_QUEUE, handler=self.worker.handle, prefetch=self.settings.worker_concurrency,
            host=host, port=port, consume=consume)
        log.info("regenerator.started", extra={"port": server.port})
        return server
