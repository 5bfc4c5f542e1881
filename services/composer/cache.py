"""The segment cache: encoded pieces of compositions, kept in storage under a hash of their inputs.

Living in the shared store, the cache serves every composer replica and survives restarts. An
entry's key is the SHA-256 of everything that determines its bytes (source objects, frame
windows, canvas, encoder arguments, pipeline version), so an entry is never stale, only unused.
Entries are written once and never changed (the store refuses overwrites; two replicas caching
the same entry write equivalent bytes, and the second write is dropped).

Eviction is least-recently-used: reusing an entry ``touch``es it, and ``evict`` deletes the
oldest entries until the cache is back under its size cap. An entry a composition is using was
touched when that composition looked it up, so it is among the newest and goes last.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from clipchat import metrics
from clipchat.aio import settled
from clipchat.errors import ClipChatError, Conflict, NotFound
from clipchat.retry import RetryPolicy
from clipchat.storage import Storage

log = logging.getLogger("clipchat.composer")

CACHE_PREFIX = "cache/"
# Evicting down to a little under the cap means the next few compositions need not evict again.
_EVICT_TO = 0.9


@dataclass(frozen=True)
class CacheStats:
    """Counts since the cache was made: lookups that found an entry, that did not, entries written,
    entries evicted."""

    hits: int = 0
    misses: int = 0
    stores: int = 0
    evictions: int = 0


class SegmentCache:
    """Entries under ``cache/`` in ``storage``, at most about ``max_bytes`` in all."""

    def __init__(self, storage: Storage, *, max_bytes: int, retry: RetryPolicy) -> None:
        self._storage = storage
        self._max_bytes = max_bytes
        self._retry = retry
        self._stats = CacheStats()

    @property
    def stats(self) -> CacheStats:
        return self._stats

    @staticmethod
    def key(kind: str, material: Mapping[str, object], suffix: str) -> str:
        """The entry key for ``material`` (JSON-serializable): ``cache/<kind>/<sha256><suffix>``."""
        digest = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
        return f"{CACHE_PREFIX}{kind}/{digest}{suffix}"

    async def lookup(self, key: str, *, counted: bool = True) -> bool:
        """Whether ``key`` is cached; counts a hit or a miss (unless not ``counted``: an aid such as
        a kept window, not a piece of the composition), and marks a hit as recently used."""
        try:
            await self._retry.run(lambda: self._storage.touch(key), what="cache touch")
        except NotFound:
            if counted:
                self._stats = replace(self._stats, misses=self._stats.misses + 1)
                metrics.segment_cache_lookup(hit=False)
            return False
        if counted:
            self._stats = replace(self._stats, hits=self._stats.hits + 1)
        return True

    async def fetch(self, key: str, dest: Path, *, counted: bool = True) -> Path | None:
        """A local file with the entry's bytes (the store's own file when storage is a folder), or
        None when the entry has been evicted since it was looked up (``forget_hit`` then).

        The hit is counted in the metrics here, once the entry is in hand."""
        local = self._storage.local_path(key)
        if local is not None:
            if not local.is_file():
                return None
        else:
            try:
                await self._retry.run(lambda: settled(self._storage.get_file(key, dest)), what="cache download")
            except NotFound:
                return None
            local = dest
        if counted:
            metrics.segment_cache_lookup(hit=True)
        return local

    def forget_hit(self) -> None:
        """Record that a hit turned out to be gone when fetched (and was made again)."""
        self._stats = replace(self._stats, hits=self._stats.hits - 1, misses=self._stats.misses + 1)
        metrics.segment_cache_lookup(hit=False)

    async def store(self, key: str, path: Path, *, counted: bool = True) -> None:
        """Cache the file at ``path`` under ``key``; an entry someone else stored first is kept."""
        try:
            await self._retry.run(lambda: settled(self._storage.put_file(key, path)), what="cache upload")
        except Conflict:
            return
        if counted:
            self._stats = replace(self._stats, stores=self._stats.stores + 1)

    async def drop(self, key: str) -> None:
        """Delete the entry ``key`` (one found unreadable), so it is not read again; best effort."""
        try:
            await self._storage.delete(key)
        except ClipChatError as exc:
            log.warning("composer.cache_drop_failed", extra={"key": key, "code": exc.code})

    async def evict(self) -> int:
        """Delete least-recently-used entries until the cache is under its cap; returns how many."""
        entries = await self._storage.list(CACHE_PREFIX)
        total = sum(entry.size for entry in entries)
        if total <= self._max_bytes:
            return 0
        goal = self._max_bytes * _EVICT_TO
        evicted = 0
        for entry in sorted(entries, key=lambda e: (e.modified, e.key)):
            if total <= goal:
                break
            await self._storage.delete(entry.key)
            total -= entry.size
            evicted += 1
        self._stats = replace(self._stats, evictions=self._stats.evictions + evicted)
        log.info("composer.cache_evicted", extra={"entries": evicted, "bytes_left": total,
                                                  "max_bytes": self._max_bytes})
        return evicted
