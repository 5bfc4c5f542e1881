"""Job feeds: many watchers of one job share one upstream WatchJob; slow ones are dropped; heartbeats;
a cap per owner."""

from __future__ import annotations

import asyncio
import traceback
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing

import grpc
import httpx
import pytest

from clipchat.errors import DependencyUnavailable
from clipchat.storage.local import LocalStorage
from clipchat.v1 import common_pb2, jobs_pb2, jobs_pb2_grpc
from gateway.app import create_app
from gateway.feeds import FeedHub, SubscriberOverflow, WatchMethod
from tests.unit.gateway.gateway_rig import ALICE, BOB, Backend, SettingsFactory, error_of, make_job, served

WATCHERS = 40


async def _watch(base_url: str, job_id: str, resume: int, until: int) -> list[int]:
    """Event ids of one SSE client, from ``resume`` until it has seen ``until``."""
    ids: list[int] = []
    async with httpx.AsyncClient(base_url=base_url, timeout=20) as client, client.stream(
            "GET", f"/api/v1/jobs/{job_id}/events",
            headers={"Authorization": f"Bearer {ALICE}", "Last-Event-ID": str(resume)}) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("id:"):
                ids.append(int(line[3:]))
                if ids[-1] >= until:
                    return ids
    return ids


async def _until(predicate, timeout: float = 10) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110  (state of another task, polled)
            await asyncio.sleep(0.02)


async def test_watchers_of_one_job_share_one_upstream_stream(make_settings: SettingsFactory,
                                                             storage: LocalStorage, backend: Backend) -> None:
    job_id = backend.status.add_job(make_job("alice")).job_id
    for _ in range(5):
        backend.status.add_event(job_id, "progress")
    app = create_app(make_settings(sse_max_streams_per_owner=WATCHERS), storage=storage)
    feeds: FeedHub = app.state.feeds
    async with served(app) as url:
        # Every watcher resumes from its own point: fresh, mid-log, at the end.
        resumes = [i % 6 for i in range(WATCHERS)]
        clients = [asyncio.create_task(_watch(url, job_id, resume, 15)) for resume in resumes]
        await _until(lambda: feeds.watchers("alice", job_id) == WATCHERS)
        for _ in range(10):
            backend.status.add_event(job_id, "progress")
            await asyncio.sleep(0.02)
        results = await asyncio.wait_for(asyncio.gather(*clients), 20)
        # The last watcher gone, the feed closes its upstream call.
        await _until(lambda: feeds.upstream_streams == 0)
    for resume, ids in zip(resumes, results, strict=True):
        assert ids == list(range(resume + 1, 16)), (resume, ids)
    follows = [r for r in backend.status.watch_requests if not r.replay_only]
    replays = [r for r in backend.status.watch_requests if r.replay_only]
    assert len(follows) == 1 and follows[0].owner == "alice"
    # Watchers who join the open feed replay from its history of recent events, not with a call.
    assert 1 <= len(replays) < WATCHERS


@pytest.fixture
async def status_watch(backend: Backend) -> AsyncIterator[WatchMethod]:
    async with grpc.aio.insecure_channel(backend.status_addr) as channel:
        yield jobs_pb2_grpc.JobStatusServiceStub(channel).WatchJob


def _encode(event: common_pb2.JobEvent) -> bytes:
    return b"%d," % event.sequence


def _stream(hub: FeedHub, watch: WatchMethod, job_id: str, after: int) -> AsyncGenerator[bytes, None]:
    return hub.stream(watch, "alice", job_id, after, _encode, heartbeat=b"~,")


def _ids(chunk: bytes) -> list[int]:
    """The event sequences in one chunk of ``_stream`` (heartbeats left out)."""
    return [int(part) for part in chunk.split(b",") if part and part != b"~"]


async def test_a_slow_watcher_is_dropped_without_holding_back_the_others(backend: Backend,
                                                                          status_watch: WatchMethod) -> None:
    job_id = backend.status.add_job(make_job("alice")).job_id
    hub = FeedHub(queue_size=2, stream_seconds=30)
    slow = _stream(hub, status_watch, job_id, 0)
    fast = _stream(hub, status_watch, job_id, 0)
    first_slow, first_fast = asyncio.create_task(anext(slow)), asyncio.create_task(anext(fast))
    await _until(lambda: hub.watchers("alice", job_id) == 2)
    backend.status.add_event(job_id, "progress")
    assert _ids(await first_slow) == _ids(await first_fast) == [1]
    fast_ids = [1]

    async def read_fast() -> None:
        async for chunk in fast:
            fast_ids.extend(_ids(chunk))
            if fast_ids[-1] == 8:
                return

    reader = asyncio.create_task(read_fast())
    for _ in range(7):
        backend.status.add_event(job_id, "progress")
    await asyncio.wait_for(reader, 10)
    assert fast_ids == list(range(1, 9))
    # It stopped reading and the feed's ring moved past it: its stream ends, to be resumed by the client.
    with pytest.raises(SubscriberOverflow):
        await anext(slow)
    assert hub.watchers("alice", job_id) == 1
    await fast.aclose()
    await _until(lambda: hub.upstream_streams == 0)


async def test_heartbeats_reach_every_watcher(backend: Backend, status_watch: WatchMethod) -> None:
    job_id = backend.status.add_job(make_job("alice")).job_id
    hub = FeedHub(queue_size=64, stream_seconds=30, heartbeat_seconds=0.05)
    got: list[list[bytes]] = [[], []]

    async def read(into: list[bytes]) -> None:
        async with aclosing(_stream(hub, status_watch, job_id, 0)) as chunks:
            async for chunk in chunks:
                into.append(chunk)

    readers = [asyncio.create_task(read(into)) for into in got]
    await _until(lambda: hub.watchers("alice", job_id) == 2)
    backend.status.add_event(job_id, "progress")
    await _until(lambda: all(b"1," in b"".join(chunks) and b"".join(chunks).count(b"~") >= 2 for chunks in got))
    for reader in readers:
        reader.cancel()
    await _until(lambda: hub.upstream_streams == 0)


async def test_streams_per_owner_are_capped(make_settings: SettingsFactory, storage: LocalStorage,
                                            backend: Backend) -> None:
    job_id = backend.status.add_job(make_job("alice")).job_id
    bob_job = backend.status.add_job(make_job("bob")).job_id
    app = create_app(make_settings(sse_max_streams_per_owner=2), storage=storage)
    async with served(app) as url, httpx.AsyncClient(base_url=url, timeout=10,
                                                     headers={"Authorization": f"Bearer {ALICE}"}) as client:
        first = await client.send(client.build_request("GET", f"/api/v1/jobs/{job_id}/events"), stream=True)
        second = await client.send(client.build_request("GET", f"/api/v1/jobs/{job_id}/events"), stream=True)
        assert first.status_code == second.status_code == 200
        over = await client.get(f"/api/v1/jobs/{job_id}/events")
        assert over.status_code == 429 and int(over.headers["Retry-After"]) > 0
        error = error_of(over)
        assert error["code"] == "rate_limited" and error["retryable"]
        # Another owner has slots of their own.
        async with client.stream("GET", f"/api/v1/jobs/{bob_job}/events",
                                 headers={"Authorization": f"Bearer {BOB}"}) as bobs:
            assert bobs.status_code == 200
        # Closing a stream gives its slot back.
        await first.aclose()
        slots = app.state.stream_slots
        await _until(lambda: slots.held("alice") == 1)
        async with client.stream("GET", f"/api/v1/jobs/{job_id}/events") as again:
            assert again.status_code == 200
        await second.aclose()
        await _until(lambda: slots.held("alice") == 0 and slots.held("bob") == 0)
        # Refused streams and unknown jobs hold no slot.
        missing = await client.get("/api/v1/jobs/00000000-0000-4000-8000-000000000000/events")
        assert missing.status_code == 404 and slots.held("alice") == 0


async def test_a_watcher_joining_an_open_feed_replays_from_its_history(backend: Backend,
                                                                        status_watch: WatchMethod) -> None:
    job_id = backend.status.add_job(make_job("alice")).job_id
    for _ in range(5):
        backend.status.add_event(job_id, "progress")
    hub = FeedHub(queue_size=16, stream_seconds=30)
    first = _stream(hub, status_watch, job_id, 0)
    assert [_ids(await anext(first)) for _ in range(5)] == [[1], [2], [3], [4], [5]]
    second_read = asyncio.create_task(anext(first))  # subscribes to the feed once the replay ends
    await _until(lambda: hub.is_watched("alice", job_id))
    replays_before = sum(r.replay_only for r in backend.status.watch_requests)

    late = _stream(hub, status_watch, job_id, 2)
    assert _ids(await anext(late)) == [3, 4, 5]  # the history, in one chunk
    assert sum(r.replay_only for r in backend.status.watch_requests) == replays_before
    backend.status.add_event(job_id, "progress")
    assert _ids(await anext(late)) == [6]
    assert _ids(await second_read) == [6]
    await late.aclose()
    await first.aclose()
    await _until(lambda: hub.upstream_streams == 0)


class _FailingWatch:
    """A ``WatchJob`` whose follow call sends the job's first event, then fails as a status service
    that went away does; its replays find nothing."""

    def __init__(self, request: jobs_pb2.WatchJobRequest, *, timeout: float | None) -> None:
        self._request = request

    def done(self) -> bool:
        return False

    def cancel(self) -> None:
        pass

    async def __aiter__(self) -> AsyncIterator[common_pb2.JobEvent]:
        if self._request.replay_only:
            return
        yield common_pb2.JobEvent(sequence=1, type="progress")
        await asyncio.sleep(0.05)
        raise DependencyUnavailable("The job status service is unavailable.")


async def test_a_failing_feed_ends_every_watcher_with_its_error() -> None:
    hub = FeedHub(queue_size=16, stream_seconds=30)
    streams = [_stream(hub, _FailingWatch, "job-1", 0) for _ in range(3)]

    async def read(chunks: AsyncGenerator[bytes, None]) -> tuple[list[int], int]:
        """The ids read, and how deep the traceback of the error that ended the stream was."""
        ids: list[int] = []
        try:
            async for chunk in chunks:
                ids.extend(_ids(chunk))
        except DependencyUnavailable as exc:
            return ids, len(traceback.extract_tb(exc.__traceback__))
        raise AssertionError("the stream ended without the feed's error")

    results = await asyncio.wait_for(asyncio.gather(*(read(chunks) for chunks in streams)), 10)
    # Each got what the feed read before it failed, then the error; the one error object raised in
    # every watcher does not gather each watcher's frames into its traceback.
    assert [ids for ids, _ in results] == [[1]] * 3
    assert len({depth for _, depth in results}) == 1, results
    assert hub.upstream_streams == 0
