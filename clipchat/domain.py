"""The domain's closed sets of values, one ``StrEnum`` each.

They are stored as their string values (``String`` columns), so a row reads back as a plain ``str``
that compares equal to the member; the conversion to and from the protos' enums happens only at the
gRPC boundary (``services/status/server.py``).
"""

from __future__ import annotations

from enum import StrEnum


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
