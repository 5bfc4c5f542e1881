"""The domain's closed sets of values, one ``StrEnum`` each.

They are stored as their string values (``String`` columns), so a row reads back as a plain ``str``
that compares equal to the member; the conversion to and from the protos' enums happens only at the
gRPC boundary (``services/status/server.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum

from clipchat.errors import InvalidInput


class JobStatus(StrEnum):
    COMPOSING = "composing"
    COMPLETED = "completed"
    REGENERATING = "regenerating"
    FAILED = "failed"


class RegenerationStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINISHED_REGENERATION = frozenset({RegenerationStatus.COMPLETED, RegenerationStatus.FAILED,
                                   RegenerationStatus.CANCELLED})
"""A regeneration in one of these states does not change any more."""


class WorkPhase(StrEnum):
    """Which queue's task may claim a job's work under its lease."""

    REGENERATE = "regenerate"
    COMPOSE = "compose"


class ClaimOutcome(StrEnum):
    """What a delivery's claim on a job's work comes to."""

    CLAIMED = "claimed"  # this delivery now holds the work
    BUSY = "busy"  # another delivery holds a live claim: try again later
    OBSOLETE = "obsolete"  # the work is past this phase, finished, cancelled or taken over


class Stage(StrEnum):
    """Where a job's work is, as progress reports it."""

    QUEUED = "queued"
    REWRITING = "rewriting"
    GENERATING = "generating"
    DOWNLOADING = "downloading"
    NORMALIZING = "normalizing"
    TRANSITIONS = "transitions"
    ENCODING = "encoding"
    MUXING = "muxing"
    UPLOADING = "uploading"
    PUBLISHING = "publishing"
    DONE = "done"


class Step(StrEnum):
    """A step of a regeneration a worker records: its cost, and a checkpoint a retry may reuse."""

    REWRITE = "rewrite"
    GENERATE = "generate"
    COMPOSE = "compose"
    # A remote prediction was created, before it is paid: a worker that takes over resumes it.
    GENERATION_STARTED = "generation_started"


# A regeneration's one progress bar, 0 to 1, shared by the two workers: rewriting the prompt, then
# generating the clip (the regenerator), then composing the video (the composer, after the hand-off).
REWRITE_SHARE = (0.0, 0.1)
GENERATE_SHARE = (0.1, 0.6)
COMPOSE_SHARE = (0.6, 1.0)


def overall_progress(share: tuple[float, float], fraction: float) -> float:
    """Where ``fraction`` (0 to 1) of one part of a regeneration falls on its whole progress bar."""
    start, end = share
    return start + (end - start) * min(1.0, max(0.0, fraction))


def check_clip_indices(indices: Sequence[int], count: int) -> None:
    """``InvalidInput`` for a clip index out of range or named twice."""
    if len(set(indices)) != len(indices):
        raise InvalidInput("Name each clip once.", code="duplicate_clip")
    for index in indices:
        if not 0 <= index < count:
            raise InvalidInput(f"Clip index {index} is out of range: this video has clips 0 to {count - 1}.",
                               code="clip_index_out_of_range")
