"""Encoder choice and arguments: a real NVENC test encode, libx264 with a logged reason otherwise."""

from __future__ import annotations

import logging
import re
import subprocess

import pytest

from clipchat.media.encoder import (
    GOP_FRAMES,
    H264_NVENC,
    LIBX264,
    X264_THREADS,
    _failure_reason,
    detect_encoder,
    nvenc_probe_command,
    video_encoder_args,
)
from clipchat.media.ffmpeg import FfmpegRunner
from tests.unit.media.ffmpeg_args import inputs, outputs


def test_x264_arguments_make_segments_that_join_by_copy() -> None:
    args = video_encoder_args(LIBX264, x264_preset="veryfast")

    assert args[args.index("-preset") + 1] == "veryfast"
    assert args[args.index("-profile:v") + 1] == "high"
    assert args[args.index("-threads") + 1] == str(X264_THREADS)  # fixed: same bytes on every machine
    assert args[args.index("-g") + 1] == str(GOP_FRAMES)
    assert args[args.index("-force_key_frames") + 1] == "0"
    assert "open-gop=0" in args[args.index("-x264-params") + 1]


def test_unknown_presets_and_encoders_are_configuration_errors() -> None:
    with pytest.raises(ValueError):
        video_encoder_args(LIBX264, x264_preset="ludicrous")
    with pytest.raises(ValueError):  # it would make Constrained Baseline, not High
        video_encoder_args(LIBX264, x264_preset="ultrafast")
    with pytest.raises(ValueError):
        video_encoder_args("h265_magic", x264_preset="veryfast")


def test_the_reason_is_the_encoders_own_complaint() -> None:
    detail = ("Stream mapping:\n  Stream #0:0 -> #0:0 (wrapped_avframe (native) -> h264 (h264_nvenc))\n"
              "[h264_nvenc @ 0x55] Cannot load libcuda.so.1\n[vost#0:0/h264_nvenc @ 0x56] Error while opening "
              "encoder\nConversion failed!")
    assert _failure_reason(detail) == "Cannot load libcuda.so.1"
    assert _failure_reason("[h264_nvenc @ 0x55d1c0] No capable devices found") == "No capable devices found"
    assert _failure_reason("") == "no error output"
    assert _failure_reason("something\nConversion failed!") == "Conversion failed!"


async def test_falls_back_to_libx264_with_a_logged_reason(ffmpeg_exe: str,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="clipchat.composer")
    choice = await detect_encoder(FfmpegRunner(ffmpeg_exe), "auto")

    # NVENC is used only where a real encode works (not without a GPU, nor on an H100).
    if choice.name == H264_NVENC:
        pytest.skip("this machine has a working NVENC")
    assert choice.name == LIBX264
    assert choice.reason.startswith("h264_nvenc test encode failed: ")
    fallback = [r for r in caplog.records if r.getMessage() == "encoder.fallback"]
    assert fallback and getattr(fallback[0], "reason", "") == choice.reason


async def test_configured_libx264_needs_no_probe(ffmpeg_exe: str) -> None:
    choice = await detect_encoder(FfmpegRunner(ffmpeg_exe), LIBX264)
    assert (choice.name, choice.reason) == (LIBX264, "configured")


def test_every_nvenc_option_and_named_value_is_one_this_ffmpeg_knows(ffmpeg_exe: str) -> None:
    # No GPU here to run NVENC: at least make sure a GPU node would not fail on a misspelt option.
    help_text = subprocess.run([ffmpeg_exe, "-hide_banner", "-h", "encoder=h264_nvenc"], capture_output=True,
                               text=True, check=True).stdout
    private: dict[str, set[str]] = {}
    current = ""
    for line in help_text.splitlines():
        option = re.match(r"^  -(\S+)\s+<", line)
        constant = re.match(r"^     (\S+)\s+\S+\s+E", line)
        if option:
            current = option.group(1)
            private[current] = set()
        elif constant and current:
            private[current].add(constant.group(1))
    generic = {"c:v", "b:v", "profile:v", "g", "bf", "force_key_frames"}
    args = video_encoder_args(H264_NVENC, x264_preset="veryfast")
    for name, value in zip(args[::2], args[1::2], strict=True):
        name = name.lstrip("-")
        assert name in generic or name in private, name
        if private.get(name) and not value.lstrip("-").replace(".", "").isdigit():
            assert value in private[name], (name, value)
    assert args[args.index("-forced-idr") + 1] == "1" and args[args.index("-bf") + 1] == "0"


def test_the_nvenc_test_encode_is_the_composers_encoder_on_a_generated_picture() -> None:
    args = nvenc_probe_command()

    [picture] = inputs(args)
    assert (picture.path, picture.options) == ("testsrc=size=640x360:rate=30:duration=1", {"f": "lavfi"})
    [out] = outputs(args)
    assert (out.path, out.maps) == ("-", [])  # the one stream there is, thrown away
    nvenc = video_encoder_args(H264_NVENC, x264_preset="veryfast")
    assert out.options == {"f": "null", "pix_fmt": "yuv420p",
                           **{flag[1:]: value for flag, value in zip(nvenc[::2], nvenc[1::2], strict=True)}}
