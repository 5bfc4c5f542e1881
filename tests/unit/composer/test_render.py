"""ffmpeg command lines: only computed numbers, our own paths and table names reach them.

The commands are built with ffmpeg-python; these tests read its argument lists back (inputs, the
filter links from each input to each output, the outputs' maps and options).
"""

from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path

import ffmpeg
import pytest

from clipchat.media.encoder import LIBX264, video_encoder_args
from clipchat.media.probe import MEDIA_DEMUXERS, MediaInfo
from services.composer.render import (
    SEGMENT_OUTPUT_ARGS,
    Canvas,
    ClipOutput,
    SourceClip,
    audio_crossfade_command,
    clip_command,
    clip_transition_command,
    concat_listing,
    fit_to_canvas,
    input_matrix,
    mux_command,
    soundtrack_command,
    transition_command,
    window_audio_command,
)
from services.composer.timeline import TRANSITIONS, ClipWindow
from tests.unit.media.ffmpeg_args import Output, chain, inputs, links, outputs, producer

ENCODER = video_encoder_args(LIBX264, x264_preset="veryfast")
HD = Canvas(1920, 1080, "pad")
TAGS = ["setsar=1", "setparams=color_primaries=bt709:color_trc=bt709:colorspace=bt709:range=tv"]
HD_PAD = ["scale=1920:1080:force_divisible_by=2:force_original_aspect_ratio=decrease:in_color_matrix=bt709:"
          "out_color_matrix=bt709:out_range=tv", "pad=1920:1080:(ow-iw)/2:(oh-ih)/2:color=black", "format=yuv420p",
          *TAGS]


def info(**fields: object) -> MediaInfo:
    base: dict[str, object] = {"path": Path("/work/clip"), "duration": 6.0, "has_video": True,
                               "has_audio": True, "width": 1280, "height": 720, "video_duration": 6.0}
    base.update(fields)
    return MediaInfo(**base)  # type: ignore[arg-type]


def graph_of(args: list[str]) -> str:
    return args[args.index("-filter_complex") + 1]


def only_output(args: list[str]) -> Output:
    [out] = outputs(args)
    assert len(out.maps) == 1
    return out


def assert_encoded_segment(out: Output, frames: int) -> None:
    """The options every encoded segment has: the encoder's, the shared output ones, video only."""
    expected = {**pairs(ENCODER), **pairs(SEGMENT_OUTPUT_ARGS), "frames:v": str(frames), "f": "mp4",
                "an": None, "sn": None, "dn": None, "map_metadata": "-1"}
    assert out.options == expected


def pairs(args: list[str]) -> dict[str, str | None]:
    return {flag[1:]: value for flag, value in zip(args[::2], args[1::2], strict=True)}


def test_a_clip_run_reads_from_the_start_and_splits_into_its_outputs() -> None:
    source = SourceClip(Path("/work/clip-003"), info())
    outs = [ClipOutput(ClipWindow(3, 15, 120), Path("/work/segment.mp4"), encoded=True),
            ClipOutput(ClipWindow(3, 0, 15), Path("/work/head.yuv"), encoded=False)]

    args = clip_command(source, HD, outs, ENCODER)

    [read] = inputs(args)
    assert read.path == "/work/clip-003"
    assert read.options == {"format_whitelist": MEDIA_DEMUXERS, "t": "4.533333", "threads": "1"}  # no -ss
    encoded, raw = outputs(args)  # in the order asked for
    assert (encoded.path, raw.path) == ("/work/segment.mp4", "/work/head.yuv")
    common = ["fps=30:start_time=0", "tpad=stop=135:stop_mode=clone", "trim=end_frame=135:start_frame=0",
              "setpts=PTS-STARTPTS", *HD_PAD, "split=2"]
    assert chain(args, encoded.maps[0].strip("[]")) == (
        "0:v:0", [*common, "trim=end_frame=135:start_frame=15", "setpts=PTS-STARTPTS"])
    assert chain(args, raw.maps[0].strip("[]")) == (
        "0:v:0", [*common, "trim=end_frame=15:start_frame=0", "setpts=PTS-STARTPTS"])
    assert_encoded_segment(encoded, 120)
    assert raw.options == {"f": "rawvideo", "c:v": "rawvideo", "pix_fmt": "yuv420p", "frames:v": "15",
                           "an": None, "sn": None, "dn": None}


def test_a_run_with_one_output_covering_its_window_has_no_split() -> None:
    source = SourceClip(Path("/work/clip"), info())
    args = clip_command(source, HD, [ClipOutput(ClipWindow(0, 0, 30), Path("/work/s.mp4"), True)], ENCODER)

    out = only_output(args)
    assert chain(args, out.maps[0].strip("[]")) == (
        "0:v:0", ["fps=30:start_time=0", "tpad=stop=30:stop_mode=clone", "trim=end_frame=30:start_frame=0",
                  "setpts=PTS-STARTPTS", *HD_PAD])
    assert_encoded_segment(out, 30)


@pytest.mark.parametrize(("first", "seek"), [(0, 0), (59, 0), (60, 30), (240, 210), (250, 210)])
def test_a_run_seeks_to_a_whole_second_at_least_a_second_before_its_first_frame(first: int, seek: int) -> None:
    source = SourceClip(Path("/work/clip"), info(duration=20.0, video_duration=20.0))
    args = clip_command(source, HD, [ClipOutput(ClipWindow(0, first, 200), Path("/work/s.mp4"), True)], ENCODER)

    [read] = inputs(args)
    assert read.options.get("ss") == (f"{seek / 30:.6f}" if seek else None)
    assert f"trim=end_frame={first + 200 - seek}:start_frame={first - seek}" in graph_of(args)


def test_a_seek_past_the_source_end_stops_short_so_a_frame_is_held() -> None:
    source = SourceClip(Path("/work/clip"), info(duration=2.0, video_duration=2.0))  # 60 frames
    args = clip_command(source, HD, [ClipOutput(ClipWindow(0, 90, 30), Path("/work/s.mp4"), True)], ENCODER)

    assert inputs(args)[0].options["ss"] == "1.000000"  # a second before the end
    _, filters = chain(args, only_output(args).maps[0].strip("[]"))
    assert filters[1:3] == ["tpad=stop=90:stop_mode=clone", "trim=end_frame=90:start_frame=60"]


@pytest.mark.parametrize("xfade", sorted(set(TRANSITIONS.values())))
def test_transition_runs_blend_raw_windows(xfade: str) -> None:
    args = transition_command(xfade, 15, Path("/work/a.yuv"), Path("/work/b.yuv"), HD, ENCODER, Path("/work/t.mp4"))

    raw = {"f": "rawvideo", "pix_fmt": "yuv420p", "video_size": "1920x1080", "framerate": "30"}
    assert [(i.path, i.options) for i in inputs(args)] == [("/work/a.yuv", raw), ("/work/b.yuv", raw)]
    out = only_output(args)
    blend = f"xfade=duration=0.500000:offset=0:transition={xfade}"
    assert chain(args, out.maps[0].strip("[]")) == (f"*{blend}", TAGS)
    assert [link.inputs for link in links(args) if link.filter == blend] == [("0:v", "1:v")]  # before, after
    assert_encoded_segment(out, 15)


def test_a_transition_read_from_the_clips_fits_both_windows_then_blends_them() -> None:
    before = (SourceClip(Path("/work/a"), info(duration=4.0, video_duration=4.0)), ClipWindow(0, 105, 15))
    after = (SourceClip(Path("/work/b"), info(color_matrix=6)), ClipWindow(1, 0, 15))
    args = clip_transition_command("wipeleft", 15, before, after, HD, ENCODER, Path("/work/t.mp4"))

    first, second = inputs(args)
    assert (first.path, first.options["ss"], first.options["t"]) == ("/work/a", "2.000000", "2.033333")
    assert (second.path, "ss" in second.options, second.options["t"]) == ("/work/b", False, "0.533333")
    out = only_output(args)
    assert chain(args, out.maps[0].strip("[]")) == ("*xfade=duration=0.500000:offset=0:transition=wipeleft", TAGS)
    [blend] = [link for link in links(args) if link.filter.startswith("xfade=")]
    windows = [chain(args, label) for label in blend.inputs]
    assert [source for source, _ in windows] == ["0:v:0", "1:v:0"]
    assert windows[0][1][:3] == ["fps=30:start_time=0", "tpad=stop=60:stop_mode=clone",
                                 "trim=end_frame=60:start_frame=45"]
    assert "in_color_matrix=smpte170m" in windows[1][1][4]
    assert_encoded_segment(out, 15)


def fitted(source: MediaInfo, canvas: Canvas) -> list[str]:
    stream = fit_to_canvas(ffmpeg.input("/work/clip")["v:0"], source, canvas)
    args = ffmpeg.output(stream, "/work/out.mp4").get_args()
    source_label, filters = chain(args, args[args.index("-map") + 1].strip("[]"))
    assert source_label == "0:v:0"
    return list(filters)


def test_fit_pads_or_crops_to_bt709_yuv420p() -> None:
    padded = fitted(info(), Canvas(1080, 1920, "pad"))
    cropped = fitted(info(), Canvas(1080, 1080, "crop"))

    assert padded[0].startswith("scale=1080:1920:force_divisible_by=2:force_original_aspect_ratio=decrease:")
    assert padded[1] == "pad=1080:1920:(ow-iw)/2:(oh-ih)/2:color=black"
    assert cropped[0].startswith("scale=1080:1080:force_original_aspect_ratio=increase:")
    assert cropped[1] == "crop=1080:1080"
    for filters in (padded, cropped):
        assert filters[2:] == ["format=yuv420p", *TAGS]
        assert filters[0].endswith(":in_color_matrix=bt709:out_color_matrix=bt709:out_range=tv")


def test_non_square_pixels_are_made_square_first() -> None:
    filters = fitted(info(width=720, height=576, sample_aspect_ratio=Fraction(16, 15)), HD)
    assert filters[0] == "scale=h=ih:w=trunc(iw*16/15/2)*2"
    assert not fitted(info(sample_aspect_ratio=Fraction(1)), HD)[0].startswith("scale=h=ih")


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

    [music] = inputs(args)
    assert music.options == {"format_whitelist": MEDIA_DEMUXERS}
    out = only_output(args)
    assert chain(args, out.maps[0].strip("[]")) == ("0:a:0", [
        "asetpts=PTS-STARTPTS", "aresample=48000", "aformat=channel_layouts=stereo:sample_fmts=fltp",
        "apad=whole_len=480000", "atrim=end_sample=480000",  # 300 frames x 1,600 samples
        "afade=nb_samples=48000:start_sample=432000:t=out"])  # the last second
    assert out.options == {"f": "mp4", "c:a": "aac", "b:a": "192k", "ar": "48000", "ac": "2", "vn": None,
                           "sn": None, "dn": None, "map_metadata": "-1", "movie_timescale": "48000",
                           "movflags": "+faststart"}


def test_music_shorter_than_the_video_fades_at_its_own_end_then_silence() -> None:
    args = soundtrack_command(Path("/work/music"), info(has_video=False, duration=1.5, audio_duration=1.5),
                              90, Path("/work/a.m4a"))

    _, filters = chain(args, only_output(args).maps[0].strip("[]"))
    assert "apad=whole_len=144000" in filters
    # It ends at sample 72,000; the fade (a quarter of it at most) ends there too.
    assert filters[-1] == "afade=nb_samples=18000:start_sample=54000:t=out"


def test_clip_sound_is_mixed_under_the_music() -> None:
    args = soundtrack_command(Path("/work/music"), info(has_video=False), 30, Path("/work/a.m4a"),
                              clip_audio=Path("/work/clips.pcm"))

    assert [(i.path, i.options) for i in inputs(args)][1] == (
        "/work/clips.pcm", {"f": "s16le", "ar": "48000", "ac": "2"})
    label = only_output(args).maps[0].strip("[]")
    assert chain(args, label) == ("*amix=duration=first:inputs=2:normalize=0", [
        "atrim=end_sample=48000", "afade=nb_samples=12000:start_sample=36000:t=out"])
    [mix] = [link for link in links(args) if link.filter.startswith("amix=")]
    music, clips = (chain(args, label) for label in mix.inputs)
    assert music[0] == "0:a:0" and music[1][-1] == "afade=nb_samples=12000:start_sample=36000:t=out"
    assert clips == ("1:a", ["aformat=channel_layouts=stereo:sample_fmts=fltp"])


def test_a_windows_sound_is_cut_to_the_sample_as_raw_pcm() -> None:
    source = SourceClip(Path("/work/clip"), info())
    args = window_audio_command(ClipWindow(0, 30, 60), source, Path("/work/sound.pcm"))

    assert inputs(args)[0].options == {"format_whitelist": MEDIA_DEMUXERS, "t": "3.033333", "threads": "1"}
    out = only_output(args)
    assert chain(args, out.maps[0].strip("[]")) == ("0:a:0", [
        "aresample=48000:async=1:first_pts=0", "aformat=channel_layouts=stereo:sample_fmts=s16",
        "apad=whole_len=144000", "atrim=end_sample=144000:start_sample=48000", "asetpts=PTS-STARTPTS"])
    assert out.options == {"f": "s16le", "c:a": "pcm_s16le", "ar": "48000", "ac": "2", "vn": None, "sn": None,
                           "dn": None, "map_metadata": "-1"}


def test_two_sound_windows_crossfade_over_their_whole_length() -> None:
    args = audio_crossfade_command(Path("/work/a.pcm"), Path("/work/b.pcm"), 15, Path("/work/x.pcm"))

    pcm = {"f": "s16le", "ar": "48000", "ac": "2"}
    assert [(i.path, i.options) for i in inputs(args)] == [("/work/a.pcm", pcm), ("/work/b.pcm", pcm)]
    out = only_output(args)
    assert producer(args, out.maps[0].strip("[]")).inputs == ("0:a", "1:a")
    assert chain(args, out.maps[0].strip("[]")) == ("*acrossfade=c1=tri:c2=tri:ns=24000", [])
    assert out.options == {"f": "s16le", "c:a": "pcm_s16le", "ar": "48000", "ac": "2"}


def test_the_mux_copies_the_joined_segments_and_the_soundtrack() -> None:
    args = mux_command(Path("/work/segments.ffconcat"), Path("/work/sound.m4a"), Path("/work/out.mp4"))

    assert "-filter_complex" not in args
    assert [(i.path, i.options) for i in inputs(args)] == [
        ("/work/segments.ffconcat", {"f": "concat", "safe": "0", "format_whitelist": "concat,mov"}),
        ("/work/sound.m4a", {"format_whitelist": "mov"})]
    [out] = outputs(args)
    assert out.maps == ["0:v:0", "1:a:0"]
    assert out.options == {"f": "mp4", "c": "copy", "map_metadata": "-1", "video_track_timescale": "48000",
                           "movie_timescale": "48000", "movflags": "+faststart"}


def test_the_option_lists_segment_cache_keys_hash_are_unchanged() -> None:
    # pipeline._segments hashes these lists: a change would miss every segment cached before.
    assert SEGMENT_OUTPUT_ARGS == [
        "-pix_fmt", "yuv420p", "-color_primaries", "bt709", "-color_trc", "bt709", "-colorspace", "bt709",
        "-color_range", "tv", "-video_track_timescale", "48000", "-movie_timescale", "48000",
        "-movflags", "+faststart"]
    assert ENCODER == ["-c:v", "libx264", "-preset", "veryfast", "-profile:v", "high", "-crf", "20",
                       "-threads", "2", "-g", "300", "-sc_threshold", "0", "-x264-params", "open-gop=0",
                       "-force_key_frames", "0"]


def test_concat_listing_quotes_paths() -> None:
    listing = concat_listing([Path("/work/a b/s-000.mp4"), Path("/work/it's/s-001.mp4")])
    assert listing == ("ffconcat version 1.0\nfile '/work/a b/s-000.mp4'\n"
                       "file '/work/it'\\''s/s-001.mp4'\n")


def test_filter_graphs_hold_only_known_tokens() -> None:
    source = SourceClip(Path("/work/clip"), info())
    args = clip_command(source, HD, [ClipOutput(ClipWindow(0, 0, 30), Path("/work/s.mp4"), True)], ENCODER)
    words = set(re.findall(r"[a-z_]+", graph_of(args)))
    allowed = {"v", "s", "fps", "start_time", "tpad", "stop_mode", "clone", "stop", "trim", "start_frame",
               "end_frame", "setpts", "pts", "startpts", "scale", "force_original_aspect_ratio", "decrease",
               "force_divisible_by", "in_color_matrix", "out_color_matrix", "out_range", "tv", "pad", "ow", "iw",
               "oh", "ih", "color", "black", "setsar", "format", "yuv", "p", "bt", "setparams", "range",
               "color_primaries", "color_trc", "colorspace"}
    assert words <= allowed, words - allowed
