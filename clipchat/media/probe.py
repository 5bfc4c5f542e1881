"""Read what a media file holds (streams, size, rate, duration) with PyAV, off the event loop.

The bundled ffmpeg has no ffprobe, and PyAV links its own FFmpeg libraries, so probing needs no
subprocess at all. Files are opened only as real media containers (``MEDIA_DEMUXERS``) from the
local file system: a "clip" that is really a playlist or a concat script pointing elsewhere is
refused as unreadable, here and (with the same list) in every ffmpeg run the composer makes.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av

from clipchat.errors import MediaError

log = logging.getLogger("clipchat.media")

# Demuxers a clip or music track may use (ffmpeg matches these against each demuxer's name list):
# MP4/MOV/M4A, Matroska/WebM, MP3, WAV, ADTS AAC, Ogg and FLAC. Never concat, HLS, image2 or lavfi.
MEDIA_DEMUXERS = "mov,matroska,mp3,wav,aac,ogg,flac"
_OPEN_OPTIONS = {"format_whitelist": MEDIA_DEMUXERS, "protocol_whitelist": "file"}


@dataclass(frozen=True)
class MediaInfo:
    """What one file holds. Video fields are None without a video stream, audio fields likewise."""

    path: Path
    duration: float  # seconds: the container's, else the longest stream's
    has_video: bool
    has_audio: bool
    width: int | None = None
    height: int | None = None
    fps: float | None = None  # average frame rate
    video_codec: str | None = None
    pix_fmt: str | None = None
    rotation: int = 0  # degrees counter-clockwise from the display matrix, 0 when absent
    frame_count: int | None = None  # from the container index where it has one
    video_duration: float | None = None
    video_start: float | None = None  # seconds, the stream's first timestamp
    video_profile: str | None = None  # e.g. "High"
    color_matrix: int | None = None  # FFmpeg's AVColorSpace of the first frame (2: unspecified)
    sample_aspect_ratio: Fraction | None = None  # None when unknown (square pixels assumed)
    audio_codec: str | None = None
    sample_rate: int | None = None
    channels: int | None = None
    audio_duration: float | None = None
    audio_start: float | None = None
    format_name: str = ""


async def probe(path: Path, *, label: str = "file") -> MediaInfo:
    """Open ``path`` and describe it, decoding its first video frame to prove it is readable.

    ``label`` names the file's role for the person reading the error ("clip 3", "music track").
    Raises ``MediaError`` ("Clip 3 could not be read.") for a missing, corrupt or empty file.
    """
    try:
        return await asyncio.to_thread(_probe, Path(path))
    except (av.FFmpegError, OSError, ValueError, IndexError, StopIteration) as exc:
        log.info("media.unreadable", extra={"path": str(path), "label": label, "error": repr(exc)[:300]})
        raise MediaError(f"{label[:1].upper()}{label[1:]} could not be read.") from exc


def _probe(path: Path) -> MediaInfo:
    with av.open(str(path), mode="r", container_options=dict(_OPEN_OPTIONS)) as container:
        video = container.streams.video[0] if container.streams.video else None
        audio = container.streams.audio[0] if container.streams.audio else None
        if video is None and audio is None:
            raise ValueError("no audio or video stream")
        fields: dict[str, object] = {}
        if video is not None:
            fields.update(_video_fields(container, video))
        if audio is not None:
            fields.update(_audio_fields(audio))
            if video is None:
                next(container.decode(audio))
        stream_durations = [d for d in (fields.get("video_duration"), fields.get("audio_duration"))
                            if isinstance(d, float)]
        if container.duration is not None:
            duration = container.duration / av.time_base
        elif stream_durations:
            duration = max(stream_durations)
        else:
            raise ValueError("unknown duration")
        if duration <= 0:
            raise ValueError("empty media")
        return MediaInfo(path=path, duration=duration, has_video=video is not None,
                         has_audio=audio is not None, format_name=container.format.name,
                         **fields)  # type: ignore[arg-type]


def _video_fields(container: av.container.InputContainer, stream: av.VideoStream) -> dict[str, object]:
    rate = stream.average_rate or stream.guessed_rate
    # A file whose header parses but whose picture data does not must fail here, not mid-compose.
    # One decoding thread: a single frame gains nothing from more, and each would hold buffers.
    stream.thread_type = "NONE"
    first = next(container.decode(stream))
    return {
        "width": first.width,
        "height": first.height,
        "fps": float(rate) if rate else None,
        "video_codec": stream.codec_context.name,
        "pix_fmt": stream.codec_context.pix_fmt,
        "rotation": int(first.rotation or 0),
        "frame_count": stream.frames or None,
        "video_duration": _stream_seconds(stream),
        "video_start": _stream_start(stream),
        "video_profile": stream.codec_context.profile,
        "color_matrix": int(first.colorspace),
        "sample_aspect_ratio": _sample_aspect_ratio(stream),
    }


def _audio_fields(stream: av.AudioStream) -> dict[str, object]:
    ctx = stream.codec_context
    return {
        "audio_codec": ctx.name,
        "sample_rate": ctx.sample_rate or None,
        "channels": ctx.channels or None,
        "audio_duration": _stream_seconds(stream),
        "audio_start": _stream_start(stream),
    }


def _stream_seconds(stream: av.stream.Stream) -> float | None:
    if stream.duration is None or stream.time_base is None:
        return None
    return float(stream.duration * stream.time_base)


def _stream_start(stream: av.stream.Stream) -> float | None:
    if stream.start_time is None or stream.time_base is None:
        return None
    return float(stream.start_time * stream.time_base)


def _sample_aspect_ratio(stream: av.VideoStream) -> Fraction | None:
    sar = stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio
    return Fraction(sar) if sar else None


async def moov_before_mdat(path: Path) -> bool:
    """Whether an MP4's index comes before its media data ("faststart": playable while loading)."""
    return await asyncio.to_thread(_moov_before_mdat, Path(path))


def _moov_before_mdat(path: Path) -> bool:
    with path.open("rb") as mp4:
        while header := mp4.read(8):
            if len(header) < 8:
                return False
            size, kind = struct.unpack(">I4s", header)
            if kind == b"moov":
                return True
            if kind == b"mdat":
                return False
            if size == 1:  # 64-bit size follows the type
                size = struct.unpack(">Q", mp4.read(8))[0] - 8
            elif size == 0:  # the box runs to the end of the file
                return False
            mp4.seek(size - 8, 1)
    return False
