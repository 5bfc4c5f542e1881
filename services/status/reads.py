"""Job reads for GetJob: the job as the state machine answers it, kept per job while it is unchanged.

Reading a job through the state machine takes three statements and builds ORM objects, and a page
that shows a job reads it again and again while nothing changes. ``JobReads`` keeps the last answer
for each job it served, with the version of the job row it came from, and every read asks the
database for that version first (one small statement). The answer is reused only when the version
is the same, so it is never older than the database, whichever status replica made the change.

The version is the job row's ``last_event_sequence`` and ``updated_at``: every change of a job's
state writes an event, which bumps the first, and any write of the row bumps the second (the ORM's
``onupdate``); writes of a job's clips and versions are made in the same transaction as a write of
its row. A write the version misses would be served stale until the job's next change, so a
change to the state machine that breaks this rule must say so here (see
``tests/integration/status/test_reads.py``).

Errors are the state machine's: ``NotFound`` for an unknown job or another owner's, and
``DependencyUnavailable`` when the database cannot be reached.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import bindparam, select

from clipchat.db.models import Job
from clipchat.errors import NotFound
from clipchat.v1 import common_pb2
from services.status.state_machine import JobSnapshot, JobStateMachine, parse_uuid

# Jobs whose answers are kept (the least recently read go first): a few thousand answers of a few
# kilobytes each.
MAX_KEPT_JOBS = 4096

# The job row's version: (last_event_sequence, updated_at).
Version = tuple[int, datetime]

# Built once, on the table (no ORM): this statement runs on every read.
_JOBS = Job.__table__.c
_VERSION = select(_JOBS.owner, _JOBS.last_event_sequence, _JOBS.updated_at).where(_JOBS.id == bindparam("job_id"))


@dataclass(frozen=True)
class _Kept:
    version: Version
    job: common_pb2.Job


class JobReads:
    """``get_job`` answers as ``JobStateMachine.get_job`` converted by ``to_proto`` would."""

    def __init__(self, machine: JobStateMachine, to_proto: Callable[[JobSnapshot], common_pb2.Job], *,
                 max_jobs: int = MAX_KEPT_JOBS) -> None:
        self.machine = machine
        self.to_proto = to_proto
        self.max_jobs = max_jobs
        self._kept: OrderedDict[uuid.UUID, _Kept] = OrderedDict()

    async def get_job(self, job_id: str, owner: str = "") -> common_pb2.Job:
        """The job (the caller must not change it). Raises ``NotFound`` when there is no such job,
        or it is not ``owner``'s (when given)."""
        key = parse_uuid(job_id)
        version = await self._version(key, owner)
        kept = self._kept.get(key)
        if kept is not None and kept.version == version:
            self._kept.move_to_end(key)
            return kept.job
        snapshot = await self.machine.get_job(job_id, owner)
        job = self.to_proto(snapshot)
        # The snapshot's own row version: it was read before its clips and versions, so what is
        # kept is never older than the version it is kept under.
        self._keep(key, _Kept((snapshot.job.last_event_sequence, snapshot.job.updated_at), job))
        return job

    async def _version(self, key: uuid.UUID, owner: str) -> Version:
        async with self.machine.db.read_connection() as connection:
            row = (await connection.execute(_VERSION, {"job_id": key})).one_or_none()
        if row is None or (owner and row.owner != owner):
            raise NotFound("No such video.", code="job_not_found")
        return row.last_event_sequence, row.updated_at

    def _keep(self, key: uuid.UUID, kept: _Kept) -> None:
        self._kept[key] = kept
        self._kept.move_to_end(key)
        while len(self._kept) > self.max_jobs:
            self._kept.popitem(last=False)
