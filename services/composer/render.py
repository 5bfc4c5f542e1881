"""The ffmpeg command lines that make each piece of a composition, built from numbers only.

Every function returns an argument list for ``FfmpegRunner.run``. What goes in: frame counts and
sample counts computed by the timeline, paths of files the composer made or downloaded and
probed, facts read from those files by the probe (size, colour matrix, pixel aspect, duration),
and xfade names from ``timeline.TRANSITIONS``. No text from a user or a model ever does. Source
media are opened only as the containers in ``MEDIA_DEMUXERS``; ``FfmpegRunner`` adds the
``file,pipe`` protocol whitelist to every input.

A clip is read by "clip runs": each seeks near the first frame it needs (see ``seek_frame``),
sets 30 fps, fits the canvas and splits into its outputs: a chunk of the clip's body, encoded
as a segment, and windows that transitions need, written as raw frames. A transition run blends
two windows with xfade and encodes the result: raw windows a clip run wrote, or windows it reads
itself, from the two clips or from windows kept losslessly in the cache (retimed as the fps
filter times frames, so xfade blends them alike). A raw window is kept by a small run of its own
(``kept_windows_command``). A run holds at most one segment encoder. A frame's pixels do not
depend on which run read it, so the composer groups the work into runs as suits it (each clip
decoded once, or runs that all start at once).

**Built with ffmpeg-python.** Every command here is a graph of ffmpeg-python inputs, filters and
outputs (``clipchat.media.commands``), written out by its ``get_args``: the clip runs with their
split, the transitions (from raw windows or from the clips), the clips' sound under a window,
the audio crossfade, the soundtrack with its fade and mix, and the final mux, stream copy and
the concat demuxer's input included. Each filter is its own link of the graph
(``[s0]trim=…[s1]``) rather than a comma chain, options come sorted by name, and the clip's
sound is filtered in ``-filter_complex`` rather than ``-filter:a``; the graph and the options
are the same, so the frames, samples and segment bytes are too. No hardware decoding options
are used; NVENC's options are output options and go through it like x264's.

**Kept hand-written: the concat listing.** ``concat_listing`` writes the ffconcat script naming
the segments. ffmpeg-python makes argument lists, not the files a demuxer reads; the mux command
that reads the script is built with it.

**Kept as option lists: encoder and segment output options.** ``video_encoder_args`` and
``SEGMENT_OUTPUT_ARGS`` stay lists of strings, as before: the segment cache keys hash these very
lists (``pipeline._segments``), so keeping them keeps every key, and a segment cached before
still hits. ``commands.options`` turns them into ffmpeg-python keywords where an output is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TypeAlias

import ffmpeg

from clipchat.media.commands import Option, Stream, apply, command, merged, options
from clipchat.media.probe import MEDIA_DEMUXERS, MediaInfo
from services.composer.timeline import FPS, ClipWindow

AUDIO_SAMPLE_RATE = 48_000
SAMPLES_PER_FRAME = AUDIO_SAMPLE_RATE // FPS  # 1,600: audio and video lengths match exactly
AUDIO_BITRATE = "192k"
FADE_OUT_SECONDS = 1.0
# Every track and the movie itself count time in 1/48,000 s: a frame is exactly 1,600 ticks and an
# audio sample one. With MP4's default movie timescale (1/1,000 s) edit lists round a segment's
# length to the millisecond, and the joined timestamps would drift by that much per segment.
TIMESCALE = 48_000
_TIMESCALES = ["-movie_timescale", str(TIMESCALE)]
# A run starts reading at a whole second at least this far before the first frame it needs (or
# at the start). Past that margin the frames it picks are exactly those a read from the start
# picks: near a seek point an accurate seek drops the source frame just before it, and the fps
# filter's rounding could go the other way on a tie.
_SEEK_MARGIN_FRAMES = FPS
_PCM_FORMAT: dict[str, Option] = {"format": "s16le", "ar": AUDIO_SAMPLE_RATE, "ac": 2}
_PCM_OUTPUT = {"c:a": "pcm_s16le", **_PCM_FORMAT}
_VIDEO_ONLY: dict[str, Option] = {"an": None, "sn": None, "dn": None}
_AUDIO_ONLY: dict[str, Option] = {"vn": None, "sn": None, "dn": None, "map_metadata": "-1"}
_RAW_OUTPUT: dict[str, Option] = {**_VIDEO_ONLY, "c:v": "rawvideo", "pix_fmt": "yuv420p", "format": "rawvideo"}
# A window kept in the segment cache: x264 at quantizer 0 is lossless for 8-bit 4:2:0, so the
# frames decode back to exactly the raw frames, at about a tenth of their size. The cache keys of
# kept windows hash this list.
LOSSLESS_WINDOW_ARGS = ["-c:v", "libx264", "-preset", "ultrafast", "-qp", "0", "-pix_fmt", "yuv420p", "-threads", "1"]
_LOSSLESS_OUTPUT: dict[str, Option] = merged(_VIDEO_ONLY, {"map_metadata": "-1", "format": "mp4"},
                                             options(LOSSLESS_WINDOW_ARGS))
# FFmpeg's AVColorSpace values → the scale filter's names; anything else counts as untagged.
_MATRIX_NAMES = {1: "bt709", 4: "fcc", 5: "bt470", 6: "smpte170m", 7: "smpte240m", 9: "bt2020", 10: "bt2020"}

# Output options every video segment shares, so they join by copy and play with the right colours.
SEGMENT_OUTPUT_ARGS = [
    "-pix_fmt", "yuv420p", "-color_primaries", "bt709", "-color_trc", "bt709", "-colorspace", "bt709",
    "-color_range", "tv", "-video_track_timescale", str(TIMESCALE), *_TIMESCALES, "-movflags", "+faststart",
]


@dataclass(frozen=True)
class Canvas:
    """The output picture every segment is normalized to; ``fit`` is "pad" or "crop"."""

    width: int
    height: int
    fit: str


@dataclass(frozen=True)
class SourceClip:
    """A clip on local disk that the composer downloaded and probed."""

    path: Path
    info: MediaInfo

    @property
    def frames(self) -> int:
        """How many 30 fps frames the clip's picture lasts."""
        seconds = self.info.video_duration or self.info.duration
        return max(1, round(seconds * FPS))


# Where a transition reads a window from: the clip itself, or the window kept losslessly.
WindowSource: TypeAlias = tuple[SourceClip, ClipWindow] | Path


@dataclass(frozen=True)
class ClipOutput:
    """One output of a clip run: ``window`` of the clip, encoded as a segment or as raw frames."""

    window: ClipWindow
    dest: Path
    encoded: bool


def seek_frame(source: SourceClip, first: int) -> int:
    """Where a run that needs frames from ``first`` on starts reading ``source``: a whole second
    at least ``_SEEK_MARGIN_FRAMES`` before ``first``, and before the source's end, so a run for
    frames past the end (held frames) still finds a last frame to hold."""
    latest = min(first, source.frames) - _SEEK_MARGIN_FRAMES
    return max(0, latest // FPS * FPS)


def clip_command(source: SourceClip, canvas: Canvas, outputs: list[ClipOutput],
                 encoder_args: list[str]) -> list[str]:
    """Read ``source`` from a little before the first frame ``outputs`` need, normalize it to
    ``canvas`` and write ``outputs`` (in their order)."""
    first = min(o.window.start_frame for o in outputs)
    last = max(o.window.end_frame for o in outputs)
    video = _read_clip(source, canvas, ClipWindow(outputs[0].window.clip_index, first, last - first))
    if len(outputs) == 1 and outputs[0].window.start_frame == first and outputs[0].window.end_frame == last:
        streams = [video]
    else:
        split = video.split()  # ffmpeg-python counts the split's outputs itself
        streams = [_trimmed(split[number], output.window.start_frame - first, output.window.end_frame - first)
                   for number, output in enumerate(outputs)]
    return command(*(
        ffmpeg.output(stream, str(output.dest), **merged(
            {"frames:v": output.window.frames},
            _encoded_output(encoder_args) if output.encoded else _RAW_OUTPUT))
        for stream, output in zip(streams, outputs, strict=True)))


def transition_command(xfade: str, frames: int, before: Path, after: Path, canvas: Canvas,
                       encoder_args: list[str], dest: Path) -> list[str]:
    """Blend two raw windows of ``frames`` frames (from ``clip_command``) with the xfade ``xfade``."""
    windows = [_read_raw(path, canvas) for path in (before, after)]
    return _encoded_command(_blend(windows, xfade, frames), frames, encoder_args, dest)


def kept_windows_command(windows: list[tuple[Path, Path]], canvas: Canvas) -> list[str]:
    """Encode raw windows (from ``clip_command``) losslessly to be kept in the cache: each pair is
    (raw frames, MP4 to write). One light encoder a window, tagged as a clip run tags its frames."""
    return command(*(
        ffmpeg.output(_tag_frames(_read_raw(raw, canvas)), str(dest), **_LOSSLESS_OUTPUT)
        for raw, dest in windows))


def _read_raw(path: Path, canvas: Canvas) -> Stream:
    """Raw yuv420p frames of ``canvas`` size at 30 fps, as ``clip_command`` writes them."""
    raw: dict[str, Option] = {"format": "rawvideo", "pix_fmt": "yuv420p", "framerate": FPS}
    # ffmpeg-python writes an input's video_size from a (width, height) pair.
    return ffmpeg.input(str(path), video_size=(canvas.width, canvas.height), **raw)["v"]


def clip_transition_command(xfade: str, frames: int, before: WindowSource, after: WindowSource, canvas: Canvas,
                            encoder_args: list[str], dest: Path) -> list[str]:
    """Read the two windows straight from their clips, or from windows kept losslessly
    (``kept_windows_command``), and blend them as ``transition_command`` does: the
    same frames, without raw files in between."""
    windows = [_read_kept(window) if isinstance(window, Path) else _read_clip(window[0], canvas, window[1])
               for window in (before, after)]
    return _encoded_command(_blend(windows, xfade, frames), frames, encoder_args, dest)


def _read_kept(path: Path) -> Stream:
    """A window kept losslessly, its frames timed as the fps filter times them (1/30 s from 0):
    xfade blends by the frames' timestamps."""
    video = ffmpeg.input(str(path), format_whitelist="mov")["v:0"]
    return apply(apply(video, "settb", f"1/{FPS}"), "setpts", "N")


def window_audio_command(window: ClipWindow, source: SourceClip, dest: Path) -> list[str]:
    """The clip's own sound under ``window`` as raw 48 kHz stereo PCM, exactly as long as the window.

    Silence fills in where the clip's sound ends early or starts late.
    """
    start = window.start_frame * SAMPLES_PER_FRAME
    end = window.end_frame * SAMPLES_PER_FRAME
    sound = _clip_input(source, window.end_frame)["a:0"]
    sound = apply(sound, "aresample", AUDIO_SAMPLE_RATE, first_pts=0, **{"async": 1})
    sound = apply(sound, "aformat", sample_fmts="s16", channel_layouts="stereo")
    sound = apply(sound, "apad", whole_len=end)
    sound = apply(sound, "atrim", start_sample=start, end_sample=end)
    sound = apply(sound, "asetpts", "PTS-STARTPTS")
    return command(ffmpeg.output(sound, str(dest), **merged(_AUDIO_ONLY, _PCM_OUTPUT)))


def audio_crossfade_command(before: Path, after: Path, frames: int, dest: Path) -> list[str]:
    """Blend two raw PCM windows of ``frames`` frames each into one of the same length."""
    windows = [ffmpeg.input(str(path), **_PCM_FORMAT)["a"] for path in (before, after)]
    blended = apply(windows, "acrossfade", ns=frames * SAMPLES_PER_FRAME, c1="tri", c2="tri")
    return command(ffmpeg.output(blended, str(dest), **_PCM_OUTPUT))


def soundtrack_command(music: Path, music_info: MediaInfo, total_frames: int, dest: Path,
                       clip_audio: Path | None = None) -> list[str]:
    """The music fitted to the video as 48 kHz stereo AAC, with the clips' sound mixed in if given.

    The music starts with the video and is cut at its end, or runs out early and is followed by
    silence. Its last second fades out: at the video's end, or at its own when it is shorter.
    ``clip_audio`` is raw PCM exactly as long as the video.
    """
    samples = total_frames * SAMPLES_PER_FRAME
    music_samples = round((music_info.audio_duration or music_info.duration) * AUDIO_SAMPLE_RATE)
    fade_end = min(samples, music_samples)
    fade = max(1, min(round(FADE_OUT_SECONDS * AUDIO_SAMPLE_RATE), fade_end // 4))
    sound = ffmpeg.input(str(music), format_whitelist=MEDIA_DEMUXERS)["a:0"]
    sound = apply(sound, "asetpts", "PTS-STARTPTS")
    sound = apply(sound, "aresample", AUDIO_SAMPLE_RATE)
    sound = apply(sound, "aformat", sample_fmts="fltp", channel_layouts="stereo")
    sound = apply(sound, "apad", whole_len=samples)
    sound = apply(sound, "atrim", end_sample=samples)
    sound = apply(sound, "afade", t="out", start_sample=max(0, fade_end - fade), nb_samples=fade)
    if clip_audio is not None:
        clips = ffmpeg.input(str(clip_audio), **_PCM_FORMAT)["a"]
        clips = apply(clips, "aformat", sample_fmts="fltp", channel_layouts="stereo")
        end_fade = max(1, min(round(FADE_OUT_SECONDS * AUDIO_SAMPLE_RATE), samples // 4))
        sound = apply([sound, clips], "amix", inputs=2, duration="first", normalize=0)
        sound = apply(sound, "atrim", end_sample=samples)
        sound = apply(sound, "afade", t="out", start_sample=samples - end_fade, nb_samples=end_fade)
    return command(ffmpeg.output(sound, str(dest), **merged(
        _AUDIO_ONLY, {"c:a": "aac", "b:a": AUDIO_BITRATE, "ar": AUDIO_SAMPLE_RATE, "ac": 2},
        options(_TIMESCALES), {"movflags": "+faststart", "format": "mp4"})))


def mux_command(listing: Path, soundtrack: Path, dest: Path) -> list[str]:
    """Join the segments named in the concat ``listing`` and the soundtrack, all by stream copy."""
    # Cached pieces may come from a shared bucket: open them as MP4 only (the concat demuxer passes
    # its whitelist on to the files it lists).
    video = ffmpeg.input(str(listing), format="concat", safe=0, format_whitelist="concat,mov")["v:0"]
    sound = ffmpeg.input(str(soundtrack), format_whitelist="mov")["a:0"]
    return command(ffmpeg.output(video, sound, str(dest), **merged(
        {"c": "copy", "map_metadata": "-1", "video_track_timescale": TIMESCALE}, options(_TIMESCALES),
        {"movflags": "+faststart", "format": "mp4"})))


def concat_listing(paths: list[Path]) -> str:
    """An ffconcat file naming ``paths`` in order (paths the composer made, quoted for the demuxer)."""
    return "ffconcat version 1.0\n" + "".join(f"file {_concat_quote(path)}\n" for path in paths)


def _read_clip(source: SourceClip, canvas: Canvas, window: ClipWindow) -> Stream:
    """``window`` of ``source`` normalized to ``canvas``: its input and the filters after it.

    The chain picks 30 fps frames, holds the last one past the source's end, cuts the window out
    (before scaling, so frames outside it cost only their decoding) and fits it to the canvas.
    """
    seek = seek_frame(source, window.start_frame)
    first, last = window.start_frame - seek, window.end_frame - seek
    video = _clip_input(source, last, seek)["v:0"]
    video = apply(video, "fps", FPS, start_time=0)
    video = apply(video, "tpad", stop_mode="clone", stop=last)
    return fit_to_canvas(_trimmed(video, first, last), source.info, canvas)


def _trimmed(video: Stream, start: int, end: int) -> Stream:
    """Frames ``start`` (included) to ``end`` (excluded) of ``video``, their timestamps from 0."""
    return apply(apply(video, "trim", start_frame=start, end_frame=end), "setpts", "PTS-STARTPTS")


def _blend(windows: list[Stream], xfade: str, frames: int) -> Stream:
    blended = apply(windows, "xfade", transition=xfade, duration=_seconds(frames), offset=0)
    return _tag_frames(blended)


def _tag_frames(video: Stream) -> Stream:
    """Square pixels and BT.709 tags on every frame.

    Frames are tagged in the filter graph: ffmpeg takes an encoder's colour description from the
    frames it gets, so output options alone would leave primaries and transfer unspecified. Square
    pixels and the same tags on every segment also keep their SPS headers identical.
    """
    return apply(apply(video, "setsar", 1), "setparams", range="tv", color_primaries="bt709",
                 color_trc="bt709", colorspace="bt709")


def _clip_input(source: SourceClip, frames: int, seek: int = 0) -> Stream:
    """``source`` read from frame ``seek`` for ``frames`` frames."""
    # One frame past the end, so the fps filter can pick the frame nearest the last slot. One
    # decoding thread: the encoder has the cores, and each decoding thread would hold frames.
    reading: dict[str, Option] = {"t": _seconds(frames + 1), "threads": 1, "format_whitelist": MEDIA_DEMUXERS}
    if seek:
        reading["ss"] = _seconds(seek)
    return ffmpeg.input(str(source.path), **reading)


def _encoded_command(video: Stream, frames: int, encoder_args: list[str], dest: Path) -> list[str]:
    return command(ffmpeg.output(video, str(dest), **merged({"frames:v": frames}, _encoded_output(encoder_args))))


def _encoded_output(encoder_args: list[str]) -> dict[str, Option]:
    return merged(_VIDEO_ONLY, {"map_metadata": "-1"}, options(encoder_args), options(SEGMENT_OUTPUT_ARGS),
                  {"format": "mp4"})


def fit_to_canvas(video: Stream, info: MediaInfo, canvas: Canvas) -> Stream:
    """``video`` with square pixels, scaled to fit ``canvas`` (padded or cropped) as BT.709 yuv420p.

    The rotation a phone recorded is applied by ffmpeg before any filter (autorotate).
    """
    sar = info.sample_aspect_ratio
    if sar is not None and sar != 1:
        video = apply(video, "scale", w=_even_width(sar), h="ih")
    colour = {"in_color_matrix": input_matrix(info), "out_color_matrix": "bt709", "out_range": "tv"}
    w, h = canvas.width, canvas.height
    if canvas.fit == "crop":
        video = apply(video, "scale", w, h, force_original_aspect_ratio="increase", **colour)
        video = apply(video, "crop", w, h)
    else:
        video = apply(video, "scale", w, h, force_original_aspect_ratio="decrease", force_divisible_by=2, **colour)
        video = apply(video, "pad", w, h, "(ow-iw)/2", "(oh-ih)/2", color="black")
    return _tag_frames(apply(video, "format", "yuv420p"))


def _even_width(sar: Fraction) -> str:
    return f"trunc(iw*{sar.numerator}/{sar.denominator}/2)*2"


def input_matrix(info: MediaInfo) -> str:
    """The source's YUV matrix: its tag, else what players assume (BT.709 for HD, BT.601 for SD)."""
    tagged = _MATRIX_NAMES.get(info.color_matrix if info.color_matrix is not None else -1)
    if tagged:
        return tagged
    return "bt709" if min(info.width or 0, info.height or 0) >= 720 else "bt601"


def _seconds(frames: int) -> str:
    return f"{frames / FPS:.6f}"


def _concat_quote(path: Path) -> str:
    # The concat demuxer's quoting: inside '…' only a quote itself needs escaping.
    return "'" + str(path).replace("'", "'\\''") + "'"
