"""ComposerService: the ``Compose`` server stream for internal callers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc

from clipchat.errors import InvalidInput
from clipchat.proto_enums import stage_to_proto
from clipchat.rpc import rpc_method
from clipchat.storage import check_key
from clipchat.v1 import common_pb2, composer_pb2, composer_pb2_grpc
from services.composer.pipeline import ClipSpec, Composer, CompositionResult, CompositionSpec, TransitionSpec

SERVICE_NAME = "clipchat.v1.ComposerService"


def spec_from_request(request: composer_pb2.ComposeRequest) -> CompositionSpec:
    if not request.clips:
        raise InvalidInput("A composition needs at least one clip.")
    if not request.audio_key:
        raise InvalidInput("A composition needs a music track.")
    return CompositionSpec(
        job_id=request.job_id,
        clips=[ClipSpec(video_key=check_key(c.video_key), duration=c.duration) for c in request.clips],
        audio_key=check_key(request.audio_key),
        transitions=[TransitionSpec(kind=t.kind or "cut", duration=t.duration) for t in request.transitions],
        beat_timestamps=list(request.beat_timestamps), aspect_ratio=request.aspect_ratio or "16:9",
        fit=request.fit or "pad")


class ComposerServicer(composer_pb2_grpc.ComposerServiceServicer):
    def __init__(self, composer: Composer) -> None:
        self.composer = composer

    @rpc_method
    async def Compose(self, request: composer_pb2.ComposeRequest,
                      context: grpc.aio.ServicerContext) -> AsyncIterator[composer_pb2.ComposeProgress]:
        """Stream progress while composing; cancelling the call kills the ffmpeg work."""
        spec = spec_from_request(request)
        output_key = check_key(request.output_key)
        updates: asyncio.Queue[composer_pb2.ComposeProgress] = asyncio.Queue()

        async def on_progress(stage: str, fraction: float, eta: float | None) -> None:
            updates.put_nowait(composer_pb2.ComposeProgress(
                stage=stage_to_proto(stage), fraction=fraction,
                eta_seconds=eta or 0.0))

        task: asyncio.Task[CompositionResult] = asyncio.create_task(
            self.composer.compose(spec, output_key, on_progress=on_progress))
        try:
            while not task.done() or not updates.empty():
                getter = asyncio.ensure_future(updates.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
            result = task.result()
            yield composer_pb2.ComposeProgress(
                stage=common_pb2.STAGE_DONE, fraction=1.0,
                result=composer_pb2.ComposeResult(
                    video_key=result.video_key, duration=result.duration, encoder=result.encoder,
                    segments_encoded=result.segments_encoded, segments_reused=result.segments_reused,
                    seconds=result.seconds))
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task


    @rpc_method
    async def Describe(self, request: composer_pb2.DescribeRequest,
                       context: grpc.aio.ServicerContext) -> composer_pb2.ComposerInfo:
        """The encoder this replica uses and why, its preset and workers, and its cache counts."""
        info = await self.composer.describe()
        stats = info.cache
        return composer_pb2.ComposerInfo(
            encoder=info.encoder.name, encoder_reason=info.encoder.reason, encoder_fallback=info.fell_back,
            x264_preset=info.x264_preset,
            workers=info.workers, cache=composer_pb2.CacheStats(hits=stats.hits, misses=stats.misses,
                                                                 stores=stats.stores, evictions=stats.evictions))


def add_to_server(servicer: ComposerServicer, server: Any) -> None:
    composer_pb2_grpc.add_ComposerServiceServicer_to_server(servicer, server)
