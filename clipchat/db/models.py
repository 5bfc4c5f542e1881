"""The one schema every part shares (PostgreSQL in production, SQLite embedded)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    Uuid,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from clipchat.domain import JobStatus, RegenerationStatus


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on both backends (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


JsonType = JSON().with_variant(JSONB(), "postgresql")
Money = Numeric(10, 4, asdecimal=True)

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    owner: Mapped[str] = mapped_column(String(200))
    title: Mapped[str] = mapped_column(String(200), default="")
    status: Mapped[str] = mapped_column(String(20), default=JobStatus.COMPOSING)
    audio_key: Mapped[str] = mapped_column(String(512))
    transitions: Mapped[list[dict[str, Any]]] = mapped_column(JsonType, default=list)
    beat_timestamps: Mapped[list[float]] = mapped_column(JsonType, default=list)
    aspect_ratio: Mapped[str] = mapped_column(String(8), default="16:9")
    fit: Mapped[str] = mapped_column(String(8), default="pad")
    current_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    total_cost: Mapped[Decimal] = mapped_column(Money, default=Decimal("0"))
    budget_limit: Mapped[Decimal] = mapped_column(Money)
    lease_token: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    active_regeneration_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True)
    # The work under the lease: which queue's task may claim it, how many claims so far, and the
    # delivery that holds it now (renewed by its heartbeat; another delivery waits until it lapses).
    work_phase: Mapped[str | None] = mapped_column(String(16), nullable=True)
    work_attempt: Mapped[int] = mapped_column(Integer, default=0)
    claim_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    claim_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_event_sequence: Mapped[int] = mapped_column(BigInteger, default=0)
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    error_retryable: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    clips: Mapped[list[Clip]] = relationship(back_populates="job", cascade="all, delete-orphan",
                                             passive_deletes=True, order_by="(Clip.clip_index, Clip.revision)")
    versions: Mapped[list[VideoVersion]] = relationship(back_populates="job", cascade="all, delete-orphan",
                                                        passive_deletes=True, order_by="VideoVersion.version")

    # An owner's jobs, newest first, one page at a time (keyset on created_at, id).
    __table_args__ = (Index("ix_jobs_status_lease", "status", "lease_expires_at"),
                      Index("ix_jobs_owner_created_at_id", "owner", "created_at", "id"))


class Clip(Base):
    """One revision of one clip; a regenerated clip is a new revision, the old one kept."""

    __tablename__ = "clips"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    clip_index: Mapped[int] = mapped_column(Integer)
    revision: Mapped[int] = mapped_column(Integer, default=0)
    prompt: Mapped[str] = mapped_column(Text)
    duration: Mapped[float] = mapped_column(Float)
    video_key: Mapped[str] = mapped_column(String(512))
    thumbnail_key: Mapped[str] = mapped_column(String(512), default="")
    status: Mapped[str] = mapped_column(String(20), default="ready")
    cost: Mapped[Decimal] = mapped_column(Money, default=Decimal("0"))
    created_by_regeneration_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    job: Mapped[Job] = relationship(back_populates="clips")

    __table_args__ = (UniqueConstraint("job_id", "clip_index", "revision"),)


class ClipRegeneration(Base):
    __tablename__ = "clip_regenerations"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    clip_index: Mapped[int] = mapped_column(Integer)
    original_prompt: Mapped[str] = mapped_column(Text)
    modified_prompt: Mapped[str | None] = mapped_column(Text, nullable=True)
    user_instruction: Mapped[str] = mapped_column(Text)
    conversation_history: Mapped[list[dict[str, Any]]] = mapped_column(JsonType, default=list)
    cost: Mapped[Decimal] = mapped_column(Money, default=Decimal("0"))
    status: Mapped[str] = mapped_column(String(20), default=RegenerationStatus.QUEUED)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # What the product needs beyond the seed's columns.
    stage: Mapped[str] = mapped_column(String(20), default="queued")
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    estimated_cost: Mapped[Decimal] = mapped_column(Money, default=Decimal("0"))
    llm_cost: Mapped[Decimal] = mapped_column(Money, default=Decimal("0"))
    generation_cost: Mapped[Decimal] = mapped_column(Money, default=Decimal("0"))
    composition_cost: Mapped[Decimal] = mapped_column(Money, default=Decimal("0"))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    change_summary: Mapped[str | None] = mapped_column(Text, nullable=True)
    rewriter: Mapped[str | None] = mapped_column(String(20), nullable=True)
    checkpoints: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    base_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    technical_detail: Mapped[str | None] = mapped_column(Text, nullable=True)
    retryable: Mapped[bool] = mapped_column(Boolean, default=False)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # A change of several clips: the id of its first clip's regeneration (which holds the job's
    # lease and names the change in events), on every clip's row; NULL for a one-clip change.
    change_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True)

    __table_args__ = (
        UniqueConstraint("job_id", "clip_index", "created_at"),
        Index("ix_clip_regenerations_job_clip", "job_id", "clip_index"),
        Index("ix_clip_regenerations_change", "change_id"),
    )


class VideoVersion(Base):
    __tablename__ = "video_versions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    storage_key: Mapped[str] = mapped_column(String(512))
    duration: Mapped[float] = mapped_column(Float)
    encoder: Mapped[str] = mapped_column(String(32), default="")
    # The clip revision used for each clip index: [revision of clip 0, revision of clip 1, ...].
    clip_revisions: Mapped[list[int]] = mapped_column(JsonType, default=list)
    created_by_regeneration_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    job: Mapped[Job] = relationship(back_populates="versions")

    __table_args__ = (UniqueConstraint("job_id", "version"),)


class JobEvent(Base):
    """The per-job, gap-free event log that WatchJob and SSE replay from."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    sequence: Mapped[int] = mapped_column(BigInteger)
    type: Mapped[str] = mapped_column(String(64))
    stage: Mapped[str] = mapped_column(String(20), default="")
    fraction: Mapped[float] = mapped_column(Float, default=0.0)
    payload: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (UniqueConstraint("job_id", "sequence"),)


class RegenerationCharge(Base):
    """One paid call of a regeneration's step, recorded once: its key is (regeneration, step, attempt)."""

    __tablename__ = "regeneration_charges"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    regeneration_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("clip_regenerations.id", ondelete="CASCADE"),
                                                       index=True)
    charge_key: Mapped[str] = mapped_column(String(200), unique=True)
    step: Mapped[str] = mapped_column(String(20))
    cost: Mapped[Decimal] = mapped_column(Money)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class OutboxMessage(Base):
    """A work message written in the same transaction as the state change that causes it.

    The status service's relay publishes unsent rows (oldest first, with publisher confirms) and
    marks them sent, so no committed state waits on the broker and no message is lost with it.
    """

    __tablename__ = "outbox_messages"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    queue: Mapped[str] = mapped_column(String(100))
    message_id: Mapped[str] = mapped_column(String(200))
    body: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    __table_args__ = (Index("ix_outbox_messages_unsent", "published_at", "id"),)
