"""One upstream ``WatchJob`` per job per gateway process, fanned out to every watcher of the job.

A ``FeedHub`` keeps a ``JobFeed`` per (owner, job). The first subscriber opens the feed's
``WatchJob`` stream; every event it reads goes into each subscriber's bounded queue; the last
subscriber to leave cancels it. A subscriber whose queue is full is dropped (its stream ends and
EventSource resumes with ``Last-Event-ID``) so one slow reader never holds the others back.

A subscriber first replays the events after its resume point: from the feed's history of recent
events when the job's feed is open and reaches back that far, else with a ``replay_only`` call of its
own. Then it reads the shared feed. Event sequences of a job are contiguous (1, 2, 3, …), so it skips what
it already sent and fills any gap (an event it joined too late to get from the feed, or a feed that
started ahead of it) with another replay: every watcher gets every event once, in order.

Each event is encoded for the wire once per feed (``FeedHub.stream``), not once per watcher: with a
thousand watchers that is most of the gateway's work per event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
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
# Encoded events a feed keeps for the watchers still behind it; each is made afresh after a minute,
# since the encoding may carry signed media URLs that expire.
_ENCODED_KEPT = 64
_ENCODED_SECONDS = 60.0


class SubscriberOverflow(Exception):
    """The subscriber did not keep up with the feed; its stream ends and the client resumes."""


@dataclass(eq=False)
class _Subscriber:
    queue: asyncio.Queue[common_pb2.JobEvent | BaseException]


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
    subscribers: set[_Subscriber] = field(default_factory=set)
    task: asyncio.Task[None] | None = None
    # The job's latest events, contiguous and ending at ``after``: a watcher who joins replays its
    # missed events from here instead of asking the status service.
    history: deque[common_pb2.JobEvent] = field(default_factory=lambda: deque(maxlen=_HISTORY_KEPT))
    _encoded: dict[int, tuple[bytes, float]] = field(default_factory=dict)

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
                        self._publish(event)
                except ClipChatError as exc:
                    if exc.status is not grpc.StatusCode.DEADLINE_EXCEEDED:
                        raise
                    continue  # the planned end of a bounded call: reopen where it stopped
                return  # the service ended the stream (it is shutting down): subscribers resume
        except ClipChatError as exc:
            self._publish_end(exc)
        finally:
            watch.cancel()
            on_end(self)
            # Subscribers still reading learn the feed is gone and end their streams.
            self._publish_end(SubscriberOverflow("feed ended"))

    def _publish(self, event: common_pb2.JobEvent) -> None:
        for subscriber in list(self.subscribers):
            try:
                subscriber.queue.put_nowait(event)
            except asyncio.QueueFull:
                self._drop(subscriber, SubscriberOverflow("queue full"))
                log.info("gateway.watcher_dropped", extra={"job_id": self.job_id, "reason": "slow"})

    def _publish_end(self, reason: BaseException) -> None:
        for subscriber in list(self.subscribers):
            self._drop(subscriber, reason)

    def _drop(self, subscriber: _Subscriber, reason: BaseException) -> None:
        self.subscribers.discard(subscriber)
        while not subscriber.queue.empty():
            subscriber.queue.get_nowait()
        subscriber.queue.put_nowait(reason)


class FeedHub:
    """The job feeds of one gateway process."""

    def __init__(self, *, queue_size: int, stream_seconds: float) -> None:
        self._queue_size = queue_size
        self._stream_seconds = stream_seconds
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

    def _subscribe(self, method: WatchMethod, owner: str, job_id: str, after: int,
                   replayed: list[common_pb2.JobEvent]) -> tuple[JobFeed, _Subscriber]:
        key = (owner, job_id)
        feed = self._feeds.get(key)
        if feed is None:
            feed = self._feeds[key] = JobFeed(owner, job_id, after)
            feed.remember(replayed)
            feed.task = asyncio.create_task(feed.run(method, self._stream_seconds, self._forget),
                                            name=f"job-feed-{job_id}")
        return feed, self._join(feed)

    def _join(self, feed: JobFeed) -> _Subscriber:
        subscriber = _Subscriber(asyncio.Queue(maxsize=self._queue_size))
        feed.subscribers.add(subscriber)
        return subscriber

    def _forget(self, feed: JobFeed) -> None:
        if self._feeds.get((feed.owner, feed.job_id)) is feed:
            del self._feeds[(feed.owner, feed.job_id)]

    def _leave(self, feed: JobFeed, subscriber: _Subscriber) -> None:
        feed.subscribers.discard(subscriber)
        if not feed.subscribers and feed.task is not None:
            self._forget(feed)
            feed.task.cancel()

    async def _replay(self, method: WatchMethod, owner: str, job_id: str, after: int,
                      ) -> AsyncIterator[common_pb2.JobEvent]:
        watch = _CallCanceller(method)
        request = jobs_pb2.WatchJobRequest(job_id=job_id, owner=owner, after_sequence=after, replay_only=True)
        try:
            async for event in stream(watch, request, timeout=self._stream_seconds):
                yield event
        finally:
            watch.cancel()

    async def stream(self, method: WatchMethod, owner: str, job_id: str, after: int, encode: Encoder,
                     ) -> AsyncIterator[bytes]:
        """``events``, each as ``encode`` makes it, encoded once for every watcher of the job's feed.

        Ends as ``events`` does."""
        async for event in self.events(method, owner, job_id, after):
            feed = self._feeds.get((owner, job_id))
            yield encode(event) if feed is None else feed.encoded(event, encode)

    async def events(self, method: WatchMethod, owner: str, job_id: str, after: int,
                     ) -> AsyncIterator[common_pb2.JobEvent]:
        """The job's events after ``after``, then new ones, each once and in order.

        Ends by raising ``SubscriberOverflow`` when this subscriber fell behind or the feed ended,
        or the feed's ``ClipChatError`` when the status service failed.
        """
        last = after
        live = self._feeds.get((owner, job_id))
        remembered = live.replay_after(after) if live is not None and self.is_watched(owner, job_id) else None
        if remembered is not None and live is not None:
            # Joined in the same step as the history was read: nothing can fall in between.
            feed, subscriber = live, self._join(live)
        else:
            replayed: list[common_pb2.JobEvent] = []
            async for event in self._replay(method, owner, job_id, last):
                yield event
                last = event.sequence
                replayed.append(event)
            feed, subscriber = self._subscribe(method, owner, job_id, last, replayed)
        try:
            for event in remembered or ():
                yield event
                last = event.sequence
            while True:
                item = await subscriber.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.sequence <= last:
                    continue  # already sent from the replay
                if item.sequence > last + 1:
                    # Events between what was sent and the feed: they are in the log already.
                    async for event in self._replay(method, owner, job_id, last):
                        if event.sequence >= item.sequence:
                            break
                        yield event
                        last = event.sequence
                yield item
                last = item.sequence
        finally:
            self._leave(feed, subscriber)


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
