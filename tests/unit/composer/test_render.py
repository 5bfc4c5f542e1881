"""ffmpeg command lines: only computed numbers, our own paths and table names reach them."""

from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path

import pytest

from clipchat.media.encoder import LIBX264, video_encoder_args
from clipchat.media.probe import MEDIA_DEMUXERS, MediaInfo
from services.composer.render import (
    Canvas,
    ClipOutput,
    SourceClip,
    clip_command,
    concat_listing,
    fit_filters,
    input_matrix,
    soundtrack_command,
    transition_command,
)
from services.composer.timeline import TRANSITIONS, ClipWindow

ENCODER = video_encoder_args(LIBX264, x264_preset="veryfast")
HD = Canvas(1920, 1080, "pad")


def info(**fields: object) -> MediaInfo:
    base: dict[str, object] = {"path": Path("/work/clip"), "duration": 6.0, "has_video": True,
                               "has_audio": True, "width": 1280, "height": 720, "video_duration": 6.0}
    base.update(fields)
    return MediaInfo(**base)  # type: ignore[arg-type]


def graph_of(args: list[str]) -> str:
    return args[args.index("-filter_complex") + 1]


def test_a_clip_run_reads_from_the_start_and_splits_into_its_outputs() -> None:
    source = SourceClip(Path("/work/clip-003"), info())
    outputs = [ClipOutput(ClipWindow(3, 15, 120), Path("/work/segment.mp4"), encoded=True),
               ClipOutput(ClipWindow(3, 0, 15), Path("/work/head.yuv"), encoded=False)]

    args = clip_command(source, HD, outputs, ENCODER)

    assert "-ss" not in args
    assert args[args.index("-i") - 2:args.index("-i") + 2] == ["-format_whitelist", MEDIA_DEMUXERS, "-i",
                                                               "/work/clip-003"]
    graph = graph_of(args)
    assert graph.startswith("[0:v:0]fps=30:start_time=0,tpad=stop_mode=clone:stop=135,"
                            "trim=start_frame=0:end_frame=135,")
    assert "split=2" in graph
    assert "[s0]trim=start_frame=15:end_frame=135" in graph
    assert "[s1]trim=start_frame=0:end_frame=15" in graph
    encoded = args[args.index("[o0]") + 1:args.index("[o1]") - 1]
    assert "-frames:v" in encoded and "120" in encoded and "libx264" in encoded
    assert args[-3:] == ["-f", "rawvideo", "/work/head.yuv"]


@pytest.mark.parametrize(("first", "seek"), [(0, 0), (59, 0), (60, 30), (240, 210), (250, 210)])
def test_a_run_seeks_to_a_whole_second_at_least_a_second_before_its_first_frame(first: int, seek: int) -> None:
    source = SourceClip(Path("/work/clip"), info(duration=20.0, video_duration=20.0))
    args = clip_command(source, HD, [ClipOutput(ClipWindow(0, first, 200), Path("/work/s.mp4"), True)], ENCODER)

    assert args[:2] == (["-ss", f"{seek / 30:.6f}"] if seek else args[:2])
    assert ("-ss" in args) == bool(seek)
    assert f"trim=start_frame={first - seek}:end_frame={first + 200 - seek}" in graph_of(args)


def test_a_seek_past_the_source_end_stops_short_so_a_frame_is_held() -> None:
    source = SourceClip(Path("/work/clip"), info(duration=2.0, video_duration=2.0))  # 60 frames
    args = clip_command(source, HD, [ClipOutput(ClipWindow(0, 90, 30), Path("/work/s.mp4"), True)], ENCODER)

    assert args[:2] == ["-ss", "1.000000"]  # a second before the end
    assert "tpad=stop_mode=clone:stop=90,trim=start_frame=60:end_frame=90" in graph_of(args)


@pytest.mark.parametrize("xfade", sorted(set(TRANSITIONS.values())))
def test_transition_runs_blend_raw_windows(xfade: str) -> None:
    args = transition_command(xfade, 15, Path("/work/a.yuv"), Path("/work/b.yuv"), HD, ENCODER, Path("/work/t.mp4"))

    assert graph_of(args) == (f"[0:v][1:v]xfade=transition={xfade}:duration=0.500000:offset=0,setsar=1,"
                              "setparams=range=tv:color_primaries=bt709:color_trc=bt709:colorspace=bt709[out]")
    assert args.count("-i") == 2 and args[args.index("-frames:v") + 1] == "15"


def test_fit_pads_or_crops_to_bt709_yuv420p() -> None:
    padded = fit_filters(info(), Canvas(1080, 1920, "pad"))
    cropped = fit_filters(info(), Canvas(1080, 1080, "crop"))

    assert "force_original_aspect_ratio=decrease" in padded and "pad=1080:1920" in padded
    assert "force_original_aspect_ratio=increase" in cropped and "crop=1080:1080" in cropped
    for chain in (padded, cropped):
        assert chain.endswith("format=yuv420p,setsar=1,"
                              "setparams=range=tv:color_primaries=bt709:color_trc=bt709:colorspace=bt709")
        assert "out_color_matrix=bt709:out_range=tv" in chain


def test_non_square_pixels_are_made_square_first() -> None:
    chain = fit_filters(info(width=720, height=576, sample_aspect_ratio=Fraction(16, 15)), HD)
    assert chain.startswith("scale=w=trunc(iw*16/15/2)*2:h=ih,")
    assert not fit_filters(info(sample_aspect_ratio=Fraction(1)), HD).startswith("scale=w=")


@pytest.mark.parametrize(("fields", "matrix"), [
    ({"color_matrix": 1}, "bt709"),
    ({"color_matrix": 6}, "smpte170m"),
    ({"color_matrix": 2, "width": 1920, "height": 1080}, "bt709"),  # untagged HD
    ({"color_matrix": 2, "width": 640, "height": 480}, "bt601"),  # untagged SD
    ({"color_matrix": None, "width": 1080, "height": 1920}, "bt709"),
])
def test_the_input_matrix_is_the_tag_or_what_players_assume(fields: dict[str, object], matrix: str) -> None:
    assert input_matrix(info(**fields)) == matrix


def test_music_longer_than_the_video_is_cut_and_fades_out_at_the_end() -> None:
    args = soundtrack_command(Path("/work/music"), info(has_video=False, duration=20.0, audio_duration=20.0),
                              300, Path("/work/a.m4a"))

    graph = graph_of(args)
    assert "apad=whole_len=480000,atrim=end_sample=480000" in graph  # 300 frames x 1,600 samples
    assert "afade=t=out:start_sample=432000:nb_samples=48000" in graph  # the last second
    assert args[args.index("-i") - 2:args.index("-i")] == ["-format_whitelist", MEDIA_DEMUXERS]


def test_music_shorter_than_the_video_fades_at_its_own_end_then_silence() -> None:
    args = soundtrack_command(Path("/work/music"), info(has_video=False, duration=1.5, audio_duration=1.5),
                              90, Path("/work/a.m4a"))

    graph = graph_of(args)
    assert "apad=whole_len=144000" in graph
    # It ends at sample 72,000; the fade (a quarter of it at most) ends there too.
    assert "afade=t=out:start_sample=54000:nb_samples=18000" in graph


def test_clip_sound_is_mixed_under_the_music() -> None:
    args = soundtrack_command(Path("/work/music"), info(has_video=False), 30, Path("/work/a.m4a"),
                              clip_audio=Path("/work/clips.pcm"))

    assert "amix=inputs=2:duration=first:normalize=0" in graph_of(args)
    assert args[args.index("/work/clips.pcm") - 7:args.index("/work/clips.pcm")] == [
        "-f", "s16le", "-ar", "48000", "-ac", "2", "-i"]


def test_concat_listing_quotes_paths() -> None:
    listing = concat_listing([Path("/work/a b/s-000.mp4"), Path("/work/it's/s-001.mp4")])
    assert listing == ("ffconcat version 1.0\nfile '/work/a b/s-000.mp4'\n"
                       "file '/work/it'\\''s/s-001.mp4'\n")


def test_filter_graphs_hold_only_known_tokens() -> None:
    source = SourceClip(Path("/work/clip"), info())
    args = clip_command(source, HD, [ClipOutput(ClipWindow(0, 0, 30), Path("/work/s.mp4"), True)], ENCODER)
    words = set(re.findall(r"[a-z_]+", graph_of(args)))
    allowed = {"v", "fps", "start_time", "tpad", "stop_mode", "clone", "stop", "trim", "start_frame", "end_frame",
               "setpts", "pts", "startpts", "scale", "force_original_aspect_ratio", "decrease",
               "force_divisible_by", "in_color_matrix", "out_color_matrix", "out_range", "tv", "pad", "ow", "iw",
               "oh", "ih", "color", "black", "setsar", "format", "yuv", "p", "o", "bt", "setparams", "range",
               "color_primaries", "color_trc", "colorspace"}
    assert words <= allowed, words - allowed
