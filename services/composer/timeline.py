"""The composition's timeline in whole frames: where each cut falls and which segments make it up.

Everything here is arithmetic on the spec; nothing touches a file. The rules:

- **Frames.** The output runs at 30 fps; a clip occupies ``round(duration × 30)`` frames (at
  least one). 48 kHz audio is then exactly 1,600 samples a frame.
- **Transitions.** A transition of ``t`` frames between clips A and B overlaps them: it is made
  from A's last ``t`` frames and B's first ``t``. It is clamped so every clip keeps at least one
  frame of its own (at most ``(frames − 1) // 2`` of either neighbour); one clamped to zero is a
  cut. The kind is looked up in ``TRANSITIONS``; only the xfade name found there reaches ffmpeg.
- **Length.** The video is ``sum(clip frames) − sum(transition frames)`` long. Beat snapping never
  changes it, and neither does the music (see ``pipeline`` for how the music is fitted).
- **Beat snapping.** Each cut point (a cut, or the middle of a transition) moves to the nearest
  beat within ``BEAT_SNAP_TOLERANCE`` seconds, provided every clip keeps at least one frame of its
  own; each cut is snapped from its own unsnapped position, so shifts never accumulate. The clips
  on either side are trimmed, or hold their last frame, to fill their new slots.
- **Segments.** The timeline is cut into clip bodies (a clip without its overlaps, in chunks of at
  most ``MAX_SEGMENT_FRAMES`` so one changed clip can be encoded on several cores at once) and
  transition segments. A segment's bytes depend only on its own windows of source frames, never
  on where it sits on the timeline, so a change to one clip leaves every other clip's segments
  valid.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from clipchat.errors import InvalidInput

FPS = 30
MAX_CLIP_SECONDS = 600.0
MAX_TRANSITION_SECONDS = 10.0
BEAT_SNAP_TOLERANCE = 0.25  # seconds
# Clips up to 8 s (most generated clips) are one body segment; a longer one is split, so that
# recomposing it can use several workers. On two cores one segment at a time is as fast: x264's
# own threads use both, and each extra segment costs a start, a seek and a keyframe.
MAX_SEGMENT_FRAMES = 240

CUT = "cut"
# Transition kind (as jobs name them) → ffmpeg xfade transition. The only names that reach ffmpeg.
TRANSITIONS: dict[str, str] = {
    "crossfade": "fade",
    "fade": "fade",
    "dissolve": "dissolve",
    "fade_black": "fadeblack",
    "fadeblack": "fadeblack",
    "dip_white": "fadewhite",
    "fadewhite": "fadewhite",
    "wipeleft": "wipeleft",
    "wiperight": "wiperight",
    "wipeup": "wipeup",
    "wipedown": "wipedown",
    "slideleft": "slideleft",
    "slideright": "slideright",
    "slideup": "slideup",
    "slidedown": "slidedown",
    "circleopen": "circleopen",
    "circleclose": "circleclose",
    "radial": "radial",
    "smoothleft": "smoothleft",
    "smoothright": "smoothright",
}


@dataclass(frozen=True)
class ClipWindow:
    """A run of ``frames`` frames of clip ``clip_index``, from its own frame ``start_frame`` (30 fps)."""

    clip_index: int
    start_frame: int
    frames: int

    @property
    def end_frame(self) -> int:
        return self.start_frame + self.frames


@dataclass(frozen=True)
class SegmentPlan:
    """One piece of the timeline, encoded on its own and joined to the others by stream copy.

    A body has one window; a transition has two (the end of clip ``clip_index`` and the start of
    the next) and the xfade name that blends them.
    """

    kind: Literal["body", "transition"]
    clip_index: int  # the clip shown; for a transition, the clip before it
    timeline_start: int  # first output frame (not part of the segment's identity)
    windows: tuple[ClipWindow, ...]
    xfade: str | None = None

    @property
    def frames(self) -> int:
        return self.windows[0].frames

    @property
    def label(self) -> str:
        """Who to blame in an error message: "clip 3", or "clips 3 and 4"."""
        if self.kind == "transition":
            return f"clips {self.clip_index + 1} and {self.clip_index + 2}"
        return f"clip {self.clip_index + 1}"


@dataclass(frozen=True)
class Timeline:
    segments: tuple[SegmentPlan, ...]
    total_frames: int
    clip_slots: tuple[int, ...]  # frames each clip spans on the timeline, overlaps included
    cut_frames: tuple[int, ...]  # output frame of each cut point (a cut, or a transition's middle)
    transition_frames: tuple[int, ...]  # after clamping; 0 for a cut


def plan_timeline(clip_durations: Sequence[float], transitions: Sequence[tuple[str, float]],
                  beats: Sequence[float]) -> Timeline:
    """Plan the timeline of clips with these durations (seconds), transitions and beats (seconds).

    ``transitions`` holds one ``(kind, seconds)`` per boundary, or nothing for all cuts.
    Raises ``InvalidInput`` for no clips, a bad duration, a wrong number of transitions, an
    unknown transition kind or a bad beat time.
    """
    if not clip_durations:
        raise InvalidInput("A video needs at least one clip.")
    if transitions and len(transitions) != len(clip_durations) - 1:
        raise InvalidInput("There must be one transition between each pair of clips.")
    frames = [_clip_frames(duration, index) for index, duration in enumerate(clip_durations)]
    kinds = [_xfade_name(kind, index) for index, (kind, _) in enumerate(transitions)]
    overlaps = [_transition_frames(transitions[i][1], kinds[i], frames[i], frames[i + 1], i) if transitions
                else 0 for i in range(len(frames) - 1)]
    total = sum(frames) - sum(overlaps)

    # Nominal start of each transition (= of the next clip) on the timeline, then snapped.
    nominal: list[int] = []
    position = 0
    for index, overlap in enumerate(overlaps):
        position += frames[index] - overlap
        nominal.append(position)
    starts = _snap_to_beats(nominal, overlaps, total, _beat_frames(beats))

    slots: list[int] = []
    segments: list[SegmentPlan] = []
    for index in range(len(frames)):
        begin = starts[index - 1] if index > 0 else 0
        end = starts[index] + overlaps[index] if index < len(overlaps) else total
        slot = end - begin
        slots.append(slot)
        head = overlaps[index - 1] if index > 0 else 0
        tail = overlaps[index] if index < len(overlaps) else 0
        segments += _body_segments(index, begin + head, head, slot - head - tail)
        if tail:
            segments.append(SegmentPlan(
                "transition", index, timeline_start=starts[index],
                windows=(ClipWindow(index, slot - tail, tail), ClipWindow(index + 1, 0, tail)),
                xfade=kinds[index]))
    cuts = tuple(start + overlap // 2 for start, overlap in zip(starts, overlaps, strict=True))
    return Timeline(segments=tuple(segments), total_frames=total, clip_slots=tuple(slots), cut_frames=cuts,
                    transition_frames=tuple(overlaps))


def _clip_frames(duration: float, index: int) -> int:
    if not math.isfinite(duration) or duration <= 0 or duration > MAX_CLIP_SECONDS:
        raise InvalidInput(f"Clip {index + 1} needs a duration between 0 and {MAX_CLIP_SECONDS:g} seconds.")
    return max(1, round(duration * FPS))


def _xfade_name(kind: str, index: int) -> str | None:
    if kind == CUT:
        return None
    try:
        return TRANSITIONS[kind]
    except KeyError:
        raise InvalidInput(f"Transition {index + 1} has an unknown kind; use one of "
                           f"{', '.join([CUT, *TRANSITIONS])}.") from None


def _transition_frames(seconds: float, xfade: str | None, before: int, after: int, index: int) -> int:
    if not math.isfinite(seconds) or not 0 <= seconds <= MAX_TRANSITION_SECONDS:
        raise InvalidInput(f"Transition {index + 1} needs a duration between 0 and "
                           f"{MAX_TRANSITION_SECONDS:g} seconds.")
    if xfade is None:
        return 0
    return max(0, min(round(seconds * FPS), (before - 1) // 2, (after - 1) // 2))


def _beat_frames(beats: Sequence[float]) -> list[int]:
    for beat in beats:
        if not math.isfinite(beat) or beat < 0:
            raise InvalidInput("Beat times must be zero or more seconds.")
    return sorted({round(beat * FPS) for beat in beats})


def _snap_to_beats(nominal: list[int], overlaps: list[int], total: int, beats: list[int]) -> list[int]:
    """Transition start frames with each cut point moved to its nearest beat where that fits.

    A cut point is the transition's middle (``start + overlap // 2``). A move is kept only when
    the clips around it still have at least one frame of their own, against the previous
    (already placed) transition and the next one's unsnapped place, so no later snap can break it.
    """
    tolerance = round(BEAT_SNAP_TOLERANCE * FPS)
    starts: list[int] = []
    for index, start in enumerate(nominal):
        overlap = overlaps[index]
        cut = start + overlap // 2
        beat = _nearest(beats, cut)
        placed = start
        if beat is not None and abs(beat - cut) <= tolerance:
            candidate = beat - overlap // 2
            previous_end = starts[-1] + overlaps[index - 1] if index > 0 else 0
            next_start = nominal[index + 1] if index + 1 < len(nominal) else total
            if candidate - previous_end >= 1 and next_start - (candidate + overlap) >= 1:
                placed = candidate
        starts.append(placed)
    return starts


def _nearest(sorted_values: list[int], value: int) -> int | None:
    """The element of ``sorted_values`` closest to ``value`` (the earlier one on a tie)."""
    at = bisect.bisect_left(sorted_values, value)
    around = sorted_values[max(0, at - 1):at + 1]
    return min(around, key=lambda v: (abs(v - value), v)) if around else None


def _body_segments(clip_index: int, timeline_start: int, start_frame: int, frames: int) -> list[SegmentPlan]:
    """A clip's own frames as segments of at most ``MAX_SEGMENT_FRAMES``, sizes as equal as can be."""
    count = math.ceil(frames / MAX_SEGMENT_FRAMES)
    size, extra = divmod(frames, count)
    segments = []
    offset = 0
    for part in range(count):
        length = size + (1 if part < extra else 0)
        segments.append(SegmentPlan("body", clip_index, timeline_start=timeline_start + offset,
                                    windows=(ClipWindow(clip_index, start_frame + offset, length),)))
        offset += length
    return segments
