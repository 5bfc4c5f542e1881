"""The segment cache on a real local store: hits and misses, write-once, LRU eviction by size."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from clipchat.retry import RetryPolicy
from clipchat.storage.local import LocalStorage
from services.composer.cache import SegmentCache


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "store")


def make_cache(storage: LocalStorage, max_bytes: int) -> SegmentCache:
    return SegmentCache(storage, max_bytes=max_bytes, retry=RetryPolicy(attempts=1))


def a_file(tmp_path: Path, name: str, size: int) -> Path:
    path = tmp_path / name
    path.write_bytes(os.urandom(size))
    return path


def test_keys_are_hashes_of_the_material() -> None:
    one = SegmentCache.key("segments", {"a": 1, "b": [2, 3]}, ".mp4")
    assert one == SegmentCache.key("segments", {"b": [2, 3], "a": 1}, ".mp4")  # order does not matter
    assert one != SegmentCache.key("segments", {"a": 1, "b": [3, 2]}, ".mp4")
    assert one.startswith("cache/segments/") and one.endswith(".mp4") and len(one) == len("cache/segments/") + 68


async def test_lookup_store_fetch_and_counts(storage: LocalStorage, tmp_path: Path) -> None:
    cache = make_cache(storage, 10**9)
    key = SegmentCache.key("segments", {"n": 1}, ".mp4")

    assert not await cache.lookup(key)
    await cache.store(key, a_file(tmp_path, "s.mp4", 100))
    await cache.store(key, a_file(tmp_path, "t.mp4", 100))  # someone else's equal entry: kept as it was
    assert await cache.lookup(key)
    fetched = await cache.fetch(key, tmp_path / "out.mp4")
    assert fetched is not None and fetched.read_bytes() == (tmp_path / "s.mp4").read_bytes()

    stats = cache.stats
    assert (stats.hits, stats.misses, stats.stores, stats.evictions) == (1, 1, 1, 0)


async def test_eviction_removes_the_least_recently_used_until_under_the_cap(storage: LocalStorage,
                                                                           tmp_path: Path) -> None:
    cache = make_cache(storage, 2500)
    keys = [SegmentCache.key("segments", {"n": n}, ".mp4") for n in range(4)]
    for number, key in enumerate(keys):
        await cache.store(key, a_file(tmp_path, f"{number}.mp4", 1000))
        local = storage.local_path(key)
        assert local is not None
        os.utime(local, (time.time() - 100 + number, time.time() - 100 + number))
    assert await cache.lookup(keys[0])  # used again just now: the newest

    assert await cache.evict() == 2
    assert [await storage.exists(key) for key in keys] == [True, False, False, True]
    assert cache.stats.evictions == 2
    assert await cache.evict() == 0
