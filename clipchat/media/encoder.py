"""Pick the H.264 encoder (NVENC where it really works, libx264 otherwise) and its arguments.

Data-centre GPUs (H100, H200) list ``h264_nvenc`` yet have no NVENC unit, so the only honest test
is a real one-second encode. Both encoders get the same GOP rules: every segment starts on an IDR
frame with a closed GOP, so segments encoded separately join by stream copy.

The test encode's command is built with ffmpeg-python (``nvenc_probe_command``). **Kept
hand-written: its test picture**, ``testsrc=…`` read through the lavfi device: ffmpeg-python's
filters all need an input stream, so a source filter cannot be a node of its graph; the
package's own way is this, the source graph as the "file name" of a lavfi input. The encoder
options stay lists of strings (``video_encoder_args``), as the composer's cache keys hash them;
``commands.options`` turns them into ffmpeg-python keywords.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import get_args

import ffmpeg

from clipchat.media.commands import command, merged, options
from clipchat.media.ffmpeg import FfmpegError, FfmpegRunner
from clipchat.settings import X264Preset

log = logging.getLogger("clipchat.composer")

LIBX264 = "libx264"
H264_NVENC = "h264_nvenc"
PREFERENCES = ("auto", LIBX264, H264_NVENC)

# Longer than any segment: the only keyframe of a segment is its first frame, forced at 0.
GOP_FRAMES = 300
# Two frame threads: enough to keep two cores busy with one encoder (decoding and filtering run
# in ffmpeg's other threads), with one frame set (~45 MB at 1080p) more than a single thread. A
# fixed count, not "auto", makes x264's output bit-identical on every machine, so cached segments
# from any replica match fresh ones.
X264_THREADS = 2
# Not "ultrafast": without CABAC and 8x8 transforms x264 writes Constrained Baseline, and the
# composer's output is High profile.
X264_PRESETS: tuple[str, ...] = get_args(X264Preset)
# The NVENC test encode's picture (a lavfi source graph; see the module docstring).
_TEST_PICTURE = "testsrc=size=640x360:rate=30:duration=1"


@dataclass(frozen=True)
class EncoderChoice:
    name: str  # an ffmpeg encoder name: "libx264" or "h264_nvenc"
    reason: str  # why it was chosen, for the logs


async def detect_encoder(ffmpeg: FfmpegRunner, preference: str) -> EncoderChoice:
    """The encoder to use for ``preference`` ("auto", "libx264" or "h264_nvenc").

    "auto" and "h264_nvenc" try a real NVENC encode of a generated test picture and fall back to
    libx264 (logging why) when it fails. Raises ``ValueError`` for an unknown preference, which
    is a configuration mistake.
    """
    if preference not in PREFERENCES:
        raise ValueError(f"Unknown encoder preference {preference!r}; expected one of {PREFERENCES}")
    if preference == LIBX264:
        return EncoderChoice(LIBX264, "configured")
    try:
        # A small real encode: listing the encoder proves nothing (H100s list it and cannot open it).
        await ffmpeg.run(nvenc_probe_command(), quiet=True, makes="nvenc probe")
    except FfmpegError as exc:
        reason = f"h264_nvenc test encode failed: {_failure_reason(exc.detail)}"
        # Asked for NVENC by name and not getting it is worth an operator's attention.
        level = logging.WARNING if preference == H264_NVENC else logging.INFO
        log.log(level, "encoder.fallback", extra={"encoder": LIBX264, "preference": preference,
                                                  "reason": reason})
        return EncoderChoice(LIBX264, reason)
    log.info("encoder.selected", extra={"encoder": H264_NVENC, "preference": preference})
    return EncoderChoice(H264_NVENC, "h264_nvenc test encode succeeded")


def nvenc_probe_command() -> list[str]:
    """One second of a generated 640x360 picture encoded by NVENC as the composer would, discarded."""
    picture = ffmpeg.input(_TEST_PICTURE, format="lavfi")
    return command(ffmpeg.output(picture, "-", **merged(
        {"pix_fmt": "yuv420p"}, options(video_encoder_args(H264_NVENC, x264_preset="veryfast")),
        {"format": "null"})))


def _failure_reason(detail: str) -> str:
    """The stderr line that says why NVENC failed (no driver, no device), else the last one."""
    lines = [line.strip() for line in detail.splitlines() if line.strip()]
    # The encoder's own messages ("[h264_nvenc @ 0x…] Cannot load libcuda.so.1"), not the stream map.
    telling = [line for line in lines if "->" not in line and any(
        word in line.lower() for word in ("nvenc @", "cuda", "cannot load", "no capable", "driver"))]
    chosen = telling[0] if telling else (lines[-1] if lines else "no error output")
    # "[h264_nvenc @ 0x55d1…] Cannot load libcuda.so.1": the address changes on every run.
    return re.sub(r"^\[[\w:#/.-]+ @ 0x[0-9a-f]+\]\s*", "", chosen)[:200]


def video_encoder_args(encoder: str, *, x264_preset: str) -> list[str]:
    """Output arguments for ``encoder``: identical for every segment so they concatenate by copy.

    Raises ``ValueError`` for an unknown encoder or x264 preset (a configuration mistake).
    """
    if encoder == LIBX264:
        if x264_preset not in X264_PRESETS:
            raise ValueError(f"Unknown x264 preset {x264_preset!r}; expected one of {X264_PRESETS}")
        return ["-c:v", LIBX264, "-preset", x264_preset, "-profile:v", "high", "-crf", "20",
                "-threads", str(X264_THREADS),
                "-g", str(GOP_FRAMES), "-sc_threshold", "0",
                "-x264-params", "open-gop=0", "-force_key_frames", "0"]
    if encoder == H264_NVENC:
        return ["-c:v", H264_NVENC, "-preset", "p4", "-tune", "hq", "-rc", "vbr", "-cq", "23",
                "-b:v", "0", "-profile:v", "high", "-g", str(GOP_FRAMES), "-bf", "0",
                "-no-scenecut", "1", "-forced-idr", "1", "-force_key_frames", "0"]
    raise ValueError(f"Unsupported encoder {encoder!r}")
