"""The timeline in frames: length rule, transitions, beat snapping and segments."""

from __future__ import annotations

import pytest

from clipchat.errors import InvalidInput
from services.composer.timeline import (
    BEAT_SNAP_TOLERANCE,
    FPS,
    MAX_SEGMENT_FRAMES,
    TRANSITIONS,
    ClipWindow,
    plan_timeline,
)


def test_length_is_clip_frames_minus_transition_frames() -> None:
    timeline = plan_timeline([2.0, 3.0, 1.0], [("crossfade", 0.5), ("cut", 0.5)], [])

    assert timeline.total_frames == 60 + 90 + 30 - 15
    assert timeline.transition_frames == (15, 0)
    assert sum(s.frames for s in timeline.segments) == timeline.total_frames
    # Segments tile the timeline in order, each starting where the last ended.
    position = 0
    for segment in timeline.segments:
        assert segment.timeline_start == position
        position += segment.frames


def test_a_transition_borrows_the_end_of_one_clip_and_the_start_of_the_next() -> None:
    timeline = plan_timeline([2.0, 2.0], [("wipeleft", 0.5)], [])

    body_a, transition, body_b = timeline.segments
    assert body_a.windows == (ClipWindow(0, 0, 45),)
    assert transition.kind == "transition" and transition.xfade == "wipeleft"
    assert transition.windows == (ClipWindow(0, 45, 15), ClipWindow(1, 0, 15))
    assert body_b.windows == (ClipWindow(1, 15, 45),)
    assert transition.label == "clips 1 and 2"


def test_no_transitions_means_all_cuts() -> None:
    timeline = plan_timeline([1.0, 1.0, 1.0], [], [])

    assert [s.kind for s in timeline.segments] == ["body", "body", "body"]
    assert timeline.total_frames == 90


def test_transitions_are_clamped_so_every_clip_keeps_a_frame_of_its_own() -> None:
    # A 1-frame clip between two crossfades: both become cuts.
    timeline = plan_timeline([1.0, 1 / FPS, 1.0], [("crossfade", 0.5), ("crossfade", 0.5)], [])
    assert timeline.transition_frames == (0, 0)
    assert timeline.total_frames == 61

    # A 5-frame clip allows transitions of at most 2 frames on each side.
    timeline = plan_timeline([1.0, 5 / FPS, 1.0], [("crossfade", 1.0), ("crossfade", 1.0)], [])
    assert timeline.transition_frames == (2, 2)
    bodies = [s for s in timeline.segments if s.kind == "body"]
    assert all(body.frames >= 1 for body in bodies)


@pytest.mark.parametrize("kind", ["sparkle", "fade'; movie=/etc/passwd", "CROSSFADE", ""])
def test_unknown_transition_kinds_are_refused(kind: str) -> None:
    with pytest.raises(InvalidInput, match="Transition 1 has an unknown kind"):
        plan_timeline([1.0, 1.0], [(kind, 0.5)], [])


def test_only_plain_xfade_names_can_reach_ffmpeg() -> None:
    assert all(name.isalpha() and name.islower() for name in TRANSITIONS.values())
    assert TRANSITIONS["crossfade"] == "fade"
    assert TRANSITIONS["fade_black"] == "fadeblack"
    assert TRANSITIONS["dip_white"] == "fadewhite"


@pytest.mark.parametrize(("durations", "transitions", "beats"), [
    ([], [], []),
    ([0.0], [], []),
    ([float("nan")], [], []),
    ([1.0, 1.0], [("crossfade", 0.5), ("cut", 0)], []),
    ([1.0, 1.0], [("crossfade", -1.0)], []),
    ([1.0, 1.0], [("crossfade", float("inf"))], []),
    ([1.0], [], [-1.0]),
])
def test_impossible_specs_are_refused(durations: list[float], transitions: list[tuple[str, float]],
                                      beats: list[float]) -> None:
    with pytest.raises(InvalidInput):
        plan_timeline(durations, transitions, beats)


def test_a_cut_snaps_to_the_nearest_beat_within_tolerance() -> None:
    # Nominal cut at 2.0 s (frame 60); the nearest beat is 1.9 s (frame 57).
    timeline = plan_timeline([2.0, 2.0], [], [0.5, 1.9, 2.6])

    assert timeline.cut_frames == (57,)
    assert timeline.clip_slots == (57, 63)  # clip 1 trimmed, clip 2 held longer
    assert timeline.total_frames == 120  # the length never changes


def test_a_beat_beyond_the_tolerance_is_ignored() -> None:
    far = 2.0 + BEAT_SNAP_TOLERANCE + 0.1
    timeline = plan_timeline([2.0, 2.0], [], [far])

    assert timeline.cut_frames == (60,)


def test_a_transition_is_centred_on_its_beat() -> None:
    # Crossfade of 16 frames starting at frame 60 - 16 = 44: its middle is frame 52; beat at 54.
    timeline = plan_timeline([2.0, 2.0], [("crossfade", 16 / FPS)], [54 / FPS])

    transition = next(s for s in timeline.segments if s.kind == "transition")
    assert timeline.cut_frames == (54,)
    assert transition.timeline_start == 54 - 8
    assert timeline.total_frames == 120 - 16


def test_snaps_do_not_accumulate() -> None:
    # Every cut is 4 frames late against a beat grid; each snaps from its own nominal place.
    beats = [(60 * i - 4) / FPS for i in range(1, 5)]
    timeline = plan_timeline([2.0] * 5, [], beats)

    assert timeline.cut_frames == (56, 116, 176, 236)
    assert timeline.clip_slots == (56, 60, 60, 60, 64)


def test_a_snap_that_would_swallow_a_clip_is_not_made() -> None:
    # Clip 2 spans frames 30-33. Moving the first cut to the beat at 35 would leave it nothing,
    # so that cut stays; the second cut may move there, lengthening clip 2 instead.
    timeline = plan_timeline([1.0, 3 / FPS, 1.0], [], [35 / FPS])

    assert timeline.cut_frames == (30, 35)
    assert timeline.clip_slots == (30, 5, 28)


def test_long_bodies_are_split_into_equal_chunks() -> None:
    frames = MAX_SEGMENT_FRAMES * 2 + 10
    timeline = plan_timeline([frames / FPS], [], [])

    sizes = [s.frames for s in timeline.segments]
    assert len(sizes) == 3 and sum(sizes) == frames and max(sizes) - min(sizes) <= 1
    starts = [s.windows[0].start_frame for s in timeline.segments]
    assert starts == [0, sizes[0], sizes[0] + sizes[1]]
