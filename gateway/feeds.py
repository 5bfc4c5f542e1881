"""One upstream ``WatchJob`` per job per gateway process, fanned out to every watcher of the job.

A ``FeedHub`` keeps a ``JobFeed`` per (owner, job). The first subscriber opens the feed's
``WatchJob`` stream; the last to leave cancels it. The feed appends what it reads to one ring of
recent entries (events, and a heartbeat every ``heartbeat_seconds``) that all its subscribers
share: each subscriber only holds its place in the ring, and one wake-up per new entry tells every
waiting subscriber to read on from there. A subscriber takes everything it has not read yet in one
go, so one that was busy catches up with one write.

Slow watchers never hold the others back and never grow memory: a subscriber the ring has moved
past (more than ``queue_size`` entries behind) ends with ``SubscriberOverflow``, and EventSource
resumes with ``Last-Event-ID``. (A client that stops reading altogether is the event stream's to
cut off: ``gateway.routes.events.EventStream``.)

A subscriber first replays the events after its resume point: from the feed's history of recent
events when the job's feed is open and reaches back that far, else with a ``replay_only`` call of its
own. Then it reads the shared feed. Event sequences of a job are contiguous (1, 2, 3, …), so it skips what
it already sent and fills any gap (an event it joined too late to get from the feed, or a feed that
started ahead of it) with another replay: every watcher gets every event once, in order.

Each event is encoded for the wire once per feed, not once per watcher: with a thousand watchers
that is most of the gateway's work per event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import grpc

from clipchat.errors import ClipChatError
from clipchat.rpc import stream
from clipchat.v1 import common_pb2, jobs_pb2

log = logging.getLogger("clipchat.gateway")

WatchMethod = Callable[..., Any]
"""``JobStatusServiceStub.WatchJob``: ``(request, *, timeout) -> call``."""
Encoder = Callable[[common_pb2.JobEvent], bytes]
"""Makes the bytes a watcher is sent for one event."""

# The events a feed keeps for watchers who join it late.
_HISTORY_KEPT = 256
# Encoded events a feed keeps; each is made afresh after a minute, since the encoding may carry
# signed media URLs that expire.
_ENCODED_KEPT = 64
_ENCODED_SECONDS = 60.0
# A ring entry that is a heartbeat, not an event.
_HEARTBEAT = None


class SubscriberOverflow(Exception):
    """The subscriber did not keep up with the feed; its stream ends and the client resumes."""


@dataclass(eq=False)
class _Subscriber:
    # How many of the feed's entries it has read (an index into every entry the feed published).
    read: int


class _CallCanceller:
    """Opens a streaming call and remembers it, so leaving cancels the call at once."""

    def __init__(self, method: WatchMethod) -> None:
        self._method = method
        self.call: Any = None

    def __call__(self, request: jobs_pb2.WatchJobRequest, *, timeout: float | None) -> Any:
        self.call = self._method(request, timeout=timeout)
        return self.call

    def cancel(self) -> None:
        if self.call is not None and not self.call.done():
            self.call.cancel()


@dataclass(eq=False)
class JobFeed:
    """The shared upstream stream of one job's events."""

    owner: str
    job_id: str
    after: int
    queue_size: int
    subscribers: set[_Subscriber] = field(default_factory=set)
    task: asyncio.Task[None] | None = None
    # The job's latest events, contiguous and ending at ``after``: a watcher who joins replays its
    # missed events from here instead of asking the status service.
    history: deque[common_pb2.JobEvent] = field(default_factory=lambda: deque(maxlen=_HISTORY_KEPT))
    # What the feed published last (events and heartbeats), shared by its subscribers; ``published``
    # counts every entry so far, so a subscriber's unread entries are the last ``published - read``.
    ring: deque[common_pb2.JobEvent | None] = field(init=False)
    published: int = 0
    # Why the feed ended; its subscribers raise it once they have read what it published before.
    ended: BaseException | None = None
    _waiters: list[asyncio.Future[None]] = field(default_factory=list)
    _encoded: dict[int, tuple[bytes, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ring = deque(maxlen=self.queue_size)

    def remember(self, events: list[common_pb2.JobEvent]) -> None:
        """Seed the history with events read before the feed started (they end at ``after``)."""
        if not self.history and events and events[-1].sequence == self.after:
            self.history.extend(events[-(self.history.maxlen or 0):])

    def replay_after(self, after: int) -> list[common_pb2.JobEvent] | None:
        """The events after ``after`` up to ``after`` of the feed, from the history; None when
        the history does not reach back that far."""
        if after >= self.after:
            return []
        if not self.history or self.history[0].sequence > after + 1:
            return None
        return [event for event in self.history if event.sequence > after]

    def encoded(self, event: common_pb2.JobEvent, encode: Encoder) -> bytes:
        """``encode(event)``, made once for all the feed's watchers (events never change)."""
        now = time.monotonic()
        kept = self._encoded.get(event.sequence)
        if kept is not None and now - kept[1] < _ENCODED_SECONDS:
            return kept[0]
        data = encode(event)
        if len(self._encoded) >= _ENCODED_KEPT:
            del self._encoded[min(self._encoded)]
        self._encoded[event.sequence] = (data, now)
        return data

    def join(self) -> _Subscriber:
        """A subscriber that reads what the feed publishes from now on."""
        subscriber = _Subscriber(read=self.published)
        self.subscribers.add(subscriber)
        return subscriber

    async def unread(self, subscriber: _Subscriber) -> list[common_pb2.JobEvent | None]:
        """The entries ``subscriber`` has not read yet (waits for one); a ``None`` is a heartbeat.

        Raises ``SubscriberOverflow`` when the ring has moved past its place, or why the feed
        ended once it has read everything the feed published."""
        while subscriber.read == self.published:
            if self.ended is not None:
                raise self.ended.with_traceback(None)  # one exception for every subscriber: no traceback piles up
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter
        behind = self.published - subscriber.read
        if behind > len(self.ring):
            log.info("gateway.watcher_dropped", extra={"job_id": self.job_id, "reason": "slow"})
            raise SubscriberOverflow("fell behind")
        subscriber.read = self.published
        if behind == 1:
            return [self.ring[-1]]
        return list(islice(self.ring, len(self.ring) - behind, None))

    async def run(self, method: WatchMethod, stream_seconds: float, on_end: Callable[[JobFeed], None]) -> None:
        watch = _CallCanceller(method)
        try:
            while True:
                request = jobs_pb2.WatchJobRequest(job_id=self.job_id, owner=self.owner,
                                                   after_sequence=self.after)
                try:
                    async for event in stream(watch, request, timeout=stream_seconds):
                        if event.sequence != self.after + 1:
                            self.history.clear()  # not contiguous with what it holds (never expected)
                        self.after = event.sequence
                        self.history.append(event)
                        self.publish(event)
                except ClipChatError as exc:
                    if exc.status is not grpc.StatusCode.DEADLINE_EXCEEDED:
                        raise
                    continue  # the planned end of a bounded call: reopen where it stopped
                return  # the service ended the stream (it is shutting down): subscribers resume
        except ClipChatError as exc:
            self._end(exc)
        finally:
            watch.cancel()
            on_end(self)
            # Subscribers still reading learn the feed is gone and end their streams.
            self._end(SubscriberOverflow("feed ended"))

    async def beat(self, heartbeat_seconds: float) -> None:
        """Publish a heartbeat every ``heartbeat_seconds``."""
        while True:
            await asyncio.sleep(heartbeat_seconds)
            self.publish(_HEARTBEAT)

    def publish(self, entry: common_pb2.JobEvent | None) -> None:
        self.ring.append(entry)
        self.published += 1
        self._wake()

    def _end(self, reason: BaseException) -> None:
        if self.ended is None:
            self.ended = reason
        self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


class FeedHub:
    """The job feeds of one gateway process."""

    def __init__(self, *, queue_size: int, stream_seconds: float, heartbeat_seconds: float = 10.0) -> None:
        self._queue_size = queue_size
        self._stream_seconds = stream_seconds
        self._heartbeat_seconds = heartbeat_seconds
        self._feeds: dict[tuple[str, str], JobFeed] = {}

    @property
    def upstream_streams(self) -> int:
        """How many ``WatchJob`` follow streams are open (one per watched job)."""
        return len(self._feeds)

    def is_watched(self, owner: str, job_id: str) -> bool:
        """Whether a feed of ``owner``'s ``job_id`` is open: the job exists and is theirs (its
        ``WatchJob`` checked), so a new watcher need not ask the status service again."""
        feed = self._feeds.get((owner, job_id))
        return feed is not None and feed.task is not None and not feed.task.done()

    def watchers(self, owner: str, job_id: str) -> int:
        """How many subscribers read the shared feed of ``job_id`` now."""
        feed = self._feeds.get((owner, job_id))
        return len(feed.subscribers) if feed else 0

    async def stream(self, method: WatchMethod, owner: str, job_id: str, after: int, encode: Encoder,
                     heartbeat: bytes) -> AsyncGenerator[bytes, None]:
        """The job's events after ``after``, then new ones, each once and in order, as ``encode``
        makes them (``heartbeat`` for a heartbeat). One chunk holds what arrived together.

        Ends by raising ``SubscriberOverflow`` when this subscriber fell behind or the feed ended,
        or the feed's ``ClipChatError`` when the status service failed.
        """
        last = after
        live = self._feeds.get((owner, job_id))
        remembered = live.replay_after(after) if live is not None and self.is_watched(owner, job_id) else None
        if remembered is not None and live is not None:
            # Joined in the same step as the history was read: nothing can fall in between.
            feed, subscriber = live, live.join()
        else:
            replayed: list[common_pb2.JobEvent] = []
            async for event in self._replay(method, owner, job_id, last):
                yield encode(event)
                last = event.sequence
                replayed.append(event)
            feed = self._open(method, owner, job_id, last, replayed)
            subscriber = feed.join()
        try:
            if remembered:
                yield b"".join(feed.encoded(event, encode) for event in remembered)
                last = remembered[-1].sequence
            while True:
                chunk, last = await self._unread_chunk(method, feed, subscriber, last, encode, heartbeat)
                if chunk:
                    yield chunk
        finally:
            self._leave(feed, subscriber)

    async def _unread_chunk(self, method: WatchMethod, feed: JobFeed, subscriber: _Subscriber, last: int,
                            encode: Encoder, heartbeat: bytes) -> tuple[bytes, int]:
        """What ``subscriber`` has not been sent yet after event ``last``, as one chunk, and the
        last event in it (waits for the feed to publish)."""
        parts: list[bytes] = []
        for entry in await feed.unread(subscriber):
            if entry is None:
                parts.append(heartbeat)
                continue
            if entry.sequence <= last:
                continue  # already sent from the replay
            if entry.sequence > last + 1:
                # Events between what was sent and the feed: they are in the log already.
                async with aclosing(self._replay(method, feed.owner, feed.job_id, last)) as missed:
                    async for event in missed:
                        if event.sequence >= entry.sequence:
                            break
                        parts.append(encode(event))
                        last = event.sequence
            parts.append(feed.encoded(entry, encode))
            last = entry.sequence
        return parts[0] if len(parts) == 1 else b"".join(parts), last

    def _open(self, method: WatchMethod, owner: str, job_id: str, after: int,
              replayed: list[common_pb2.JobEvent]) -> JobFeed:
        key = (owner, job_id)
        feed = self._feeds.get(key)
        if feed is None:
            feed = self._feeds[key] = JobFeed(owner, job_id, after, self._queue_size)
            feed.remember(replayed)
            feed.task = asyncio.create_task(self._run(feed, method), name=f"job-feed-{job_id}")
        return feed

    async def _run(self, feed: JobFeed, method: WatchMethod) -> None:
        beat = asyncio.create_task(feed.beat(self._heartbeat_seconds),
                                   name=f"job-feed-beat-{feed.job_id}")
        try:
            await feed.run(method, self._stream_seconds, self._forget)
        finally:
            beat.cancel()

    def _forget(self, feed: JobFeed) -> None:
        if self._feeds.get((feed.owner, feed.job_id)) is feed:
            del self._feeds[(feed.owner, feed.job_id)]

    def _leave(self, feed: JobFeed, subscriber: _Subscriber) -> None:
        feed.subscribers.discard(subscriber)
        if not feed.subscribers and feed.task is not None:
            self._forget(feed)
            feed.task.cancel()

    async def _replay(self, method: WatchMethod, owner: str, job_id: str, after: int,
                      ) -> AsyncGenerator[common_pb2.JobEvent, None]:
        watch = _CallCanceller(method)
        request = jobs_pb2.WatchJobRequest(job_id=job_id, owner=owner, after_sequence=after, replay_only=True)
        try:
            async for event in stream(watch, request, timeout=self._stream_seconds):
                yield event
        finally:
            watch.cancel()


class StreamSlots:
    """Open event streams per owner, capped (``sse_max_streams_per_owner``) in this process."""

    def __init__(self, per_owner: int) -> None:
        self.per_owner = per_owner
        self._open: dict[str, int] = {}

    def take(self, owner: str) -> bool:
        """Take a slot for a new stream of ``owner``; False when they have none left."""
        held = self._open.get(owner, 0)
        if held >= self.per_owner:
            return False
        self._open[owner] = held + 1
        return True

    def give_back(self, owner: str) -> None:
        held = self._open.get(owner, 0) - 1
        if held > 0:
            self._open[owner] = held
        else:
            self._open.pop(owner, None)

    def held(self, owner: str) -> int:
        return self._open.get(owner, 0)
