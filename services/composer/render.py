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
from the two clips itself. A run holds at most one x264 encoder. A frame's pixels do not depend
on which run read it, so the composer groups the work into runs as suits it (each clip decoded
once, or runs that all start at once).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

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
_PCM_FORMAT = ["-f", "s16le", "-ar", str(AUDIO_SAMPLE_RATE), "-ac", "2"]
_PCM_OUTPUT = ["-c:a", "pcm_s16le", *_PCM_FORMAT]
# FFmpeg's AVColorSpace values → the scale filter's names; anything else counts as untagged.
_MATRIX_NAMES = {1: "bt709", 4: "fcc", 5: "bt470", 6: "smpte170m", 7: "smpte240m", 9: "bt2020", 10: "bt2020"}

# Frames are tagged in the filter graph: ffmpeg takes an encoder's colour description from the
# frames it gets, so output options alone would leave primaries and transfer unspecified. Square
# pixels and the same tags on every segment also keep their SPS headers identical.
_FRAME_TAGS = "setsar=1,setparams=range=tv:color_primaries=bt709:color_trc=bt709:colorspace=bt709"

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
    ``canvas`` and write ``outputs``."""
    first = min(o.window.start_frame for o in outputs)
    last = max(o.window.end_frame for o in outputs)
    args, chain = _read_clip(source, canvas, ClipWindow(outputs[0].window.clip_index, first, last - first))
    labels = [f"[o{number}]" for number in range(len(outputs))]
    graph = f"[0:v:0]{chain}"
    if len(outputs) == 1 and outputs[0].window.start_frame == first and outputs[0].window.end_frame == last:
        graph += labels[0]
    else:
        graph += f",split={len(outputs)}" + "".join(f"[s{n}]" for n in range(len(outputs)))
        for number, output in enumerate(outputs):
            start, end = output.window.start_frame - first, output.window.end_frame - first
            graph += f";[s{number}]trim=start_frame={start}:end_frame={end},setpts=PTS-STARTPTS{labels[number]}"
    args += ["-filter_complex", graph]
    for label, output in zip(labels, outputs, strict=True):
        args += ["-map", label, "-frames:v", str(output.window.frames)]
        args += _encoded_output(encoder_args, output.dest) if output.encoded else _raw_output(output.dest)
    return args


def transition_command(xfade: str, frames: int, before: Path, after: Path, canvas: Canvas,
                       encoder_args: list[str], dest: Path) -> list[str]:
    """Blend two raw windows of ``frames`` frames (from ``clip_command``) with the xfade ``xfade``."""
    raw = ["-f", "rawvideo", "-pix_fmt", "yuv420p", "-video_size", f"{canvas.width}x{canvas.height}",
           "-framerate", str(FPS)]
    return [*raw, "-i", str(before), *raw, "-i", str(after), "-filter_complex",
            f"[0:v][1:v]{_blend(xfade, frames)}[out]",
            "-map", "[out]", "-frames:v", str(frames), *_encoded_output(encoder_args, dest)]


def clip_transition_command(xfade: str, frames: int, before: tuple[SourceClip, ClipWindow],
                            after: tuple[SourceClip, ClipWindow], canvas: Canvas, encoder_args: list[str],
                            dest: Path) -> list[str]:
    """Read the two windows straight from their clips and blend them as ``transition_command`` does:
    the same frames, without raw files in between."""
    args: list[str] = []
    chains = []
    for number, (source, window) in enumerate((before, after)):
        reading, chain = _read_clip(source, canvas, window)
        args += reading
        chains.append(f"[{number}:v:0]{chain}[w{number}]")
    return [*args, "-filter_complex", f"{';'.join(chains)};[w0][w1]{_blend(xfade, frames)}[out]",
            "-map", "[out]", "-frames:v", str(frames), *_encoded_output(encoder_args, dest)]


def window_audio_command(window: ClipWindow, source: SourceClip, dest: Path) -> list[str]:
    """The clip's own sound under ``window`` as raw 48 kHz stereo PCM, exactly as long as the window.

    Silence fills in where the clip's sound ends early or starts late.
    """
    start = window.start_frame * SAMPLES_PER_FRAME
    end = window.end_frame * SAMPLES_PER_FRAME
    chain = (f"aresample={AUDIO_SAMPLE_RATE}:async=1:first_pts=0,"
             f"aformat=sample_fmts=s16:channel_layouts=stereo,"
             f"apad=whole_len={end},atrim=start_sample={start}:end_sample={end},asetpts=PTS-STARTPTS")
    return [*_clip_input(source, window.end_frame), "-map", "0:a:0", "-vn", "-sn", "-dn", "-map_metadata", "-1",
            "-filter:a", chain, *_PCM_OUTPUT, str(dest)]


def audio_crossfade_command(before: Path, after: Path, frames: int, dest: Path) -> list[str]:
    """Blend two raw PCM windows of ``frames`` frames each into one of the same length."""
    samples = frames * SAMPLES_PER_FRAME
    return [*_PCM_FORMAT, "-i", str(before), *_PCM_FORMAT, "-i", str(after),
            "-filter_complex", f"[0:a][1:a]acrossfade=ns={samples}:c1=tri:c2=tri[out]", "-map", "[out]",
            *_PCM_OUTPUT, str(dest)]


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
    graph = (f"[0:a:0]asetpts=PTS-STARTPTS,aresample={AUDIO_SAMPLE_RATE},"
             f"aformat=sample_fmts=fltp:channel_layouts=stereo,apad=whole_len={samples},"
             f"atrim=end_sample={samples},afade=t=out:start_sample={max(0, fade_end - fade)}:nb_samples={fade}")
    inputs = ["-format_whitelist", MEDIA_DEMUXERS, "-i", str(music)]
    if clip_audio is not None:
        inputs += [*_PCM_FORMAT, "-i", str(clip_audio)]
        end_fade = max(1, min(round(FADE_OUT_SECONDS * AUDIO_SAMPLE_RATE), samples // 4))
        graph += (f"[music];[1:a]aformat=sample_fmts=fltp:channel_layouts=stereo[clips];"
                  f"[music][clips]amix=inputs=2:duration=first:normalize=0,atrim=end_sample={samples},"
                  f"afade=t=out:start_sample={samples - end_fade}:nb_samples={end_fade}")
    return [*inputs, "-filter_complex", graph + "[out]", "-map", "[out]", "-vn", "-sn", "-dn",
            "-map_metadata", "-1", "-c:a", "aac", "-b:a", AUDIO_BITRATE, "-ar", str(AUDIO_SAMPLE_RATE),
            "-ac", "2", *_TIMESCALES, "-movflags", "+faststart", "-f", "mp4", str(dest)]


def mux_command(listing: Path, soundtrack: Path, dest: Path) -> list[str]:
    """Join the segments named in the concat ``listing`` and the soundtrack, all by stream copy."""
    # Cached pieces may come from a shared bucket: open them as MP4 only (the concat demuxer passes
    # its whitelist on to the files it lists).
    return ["-f", "concat", "-safe", "0", "-format_whitelist", "concat,mov", "-i", str(listing),
            "-format_whitelist", "mov", "-i", str(soundtrack),
            "-map", "0:v:0", "-map", "1:a:0", "-c", "copy", "-map_metadata", "-1",
            "-video_track_timescale", str(TIMESCALE), *_TIMESCALES, "-movflags", "+faststart", "-f", "mp4",
            str(dest)]


def concat_listing(paths: list[Path]) -> str:
    """An ffconcat file naming ``paths`` in order (paths the composer made, quoted for the demuxer)."""
    return "ffconcat version 1.0\n" + "".join(f"file {_concat_quote(path)}\n" for path in paths)


def _read_clip(source: SourceClip, canvas: Canvas, window: ClipWindow) -> tuple[list[str], str]:
    """The input options and the filter chain giving ``window`` of ``source`` normalized to ``canvas``.

    The chain picks 30 fps frames, holds the last one past the source's end, cuts the window out
    (before scaling, so frames outside it cost only their decoding) and fits it to the canvas.
    """
    seek = seek_frame(source, window.start_frame)
    first, last = window.start_frame - seek, window.end_frame - seek
    args = ["-ss", _seconds(seek)] if seek else []
    chain = (f"fps={FPS}:start_time=0,tpad=stop_mode=clone:stop={last},"
             f"trim=start_frame={first}:end_frame={last},setpts=PTS-STARTPTS,{fit_filters(source.info, canvas)}")
    return [*args, *_clip_input(source, last)], chain


def _blend(xfade: str, frames: int) -> str:
    return f"xfade=transition={xfade}:duration={_seconds(frames)}:offset=0,{_FRAME_TAGS}"


def _clip_input(source: SourceClip, frames: int) -> list[str]:
    """Input options reading the first ``frames`` frames of ``source`` (after any ``-ss``)."""
    # One frame past the end, so the fps filter can pick the frame nearest the last slot. One
    # decoding thread: the encoder has the cores, and each decoding thread would hold frames.
    return ["-t", _seconds(frames + 1), "-threads", "1", "-format_whitelist", MEDIA_DEMUXERS,
            "-i", str(source.path)]


def _encoded_output(encoder_args: list[str], dest: Path) -> list[str]:
    return ["-an", "-sn", "-dn", "-map_metadata", "-1", *encoder_args, *SEGMENT_OUTPUT_ARGS, "-f", "mp4",
            str(dest)]


def _raw_output(dest: Path) -> list[str]:
    return ["-an", "-sn", "-dn", "-c:v", "rawvideo", "-pix_fmt", "yuv420p", "-f", "rawvideo", str(dest)]


def fit_filters(info: MediaInfo, canvas: Canvas) -> str:
    """Square pixels, then scaled to fit ``canvas`` (padded or cropped) as BT.709 yuv420p.

    The rotation a phone recorded is applied by ffmpeg before any filter (autorotate).
    """
    steps = []
    sar = info.sample_aspect_ratio
    if sar is not None and sar != 1:
        steps.append(f"scale=w={_even_width(sar)}:h=ih")
    colour = f"in_color_matrix={input_matrix(info)}:out_color_matrix=bt709:out_range=tv"
    w, h = canvas.width, canvas.height
    if canvas.fit == "crop":
        steps += [f"scale={w}:{h}:force_original_aspect_ratio=increase:{colour}", f"crop={w}:{h}"]
    else:
        steps += [f"scale={w}:{h}:force_original_aspect_ratio=decrease:force_divisible_by=2:{colour}",
                  f"pad={w}:{h}:(ow-iw)/2:(oh-ih)/2:color=black"]
    steps += ["format=yuv420p", _FRAME_TAGS]
    return ",".join(steps)


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
