"""Object storage in a local folder (embedded mode, and local caches).

An object is the file ``root/<key>``. Writes go to a temporary file under ``root/.tmp`` (the same
file system, and a name no key can take since keys start with a letter or digit) and are then
hard-linked into place: ``os.link`` fails when the target exists, so "visible only when complete"
and "never overwrite" hold even between processes, with no check-then-write race.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from clipchat.errors import Conflict, NotFound
from clipchat.storage import ObjectInfo, check_key

log = logging.getLogger("clipchat.storage")

_TMP_DIR = ".tmp"
# Small enough that several uploads copying at once hold little memory, large enough to be fast.
_COPY_CHUNK = 256 * 1024
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS})


class LocalStorage:
    """A ``Storage`` backed by a folder.

    Every blocking file operation runs in a worker thread, so large clips never stall the event
    loop. Errors: ``InvalidInput`` for a bad key, ``Conflict`` when writing a key that exists (or
    whose path is taken by a folder or crosses a file), ``NotFound`` when reading a missing key;
    other ``OSError`` (disk full, permissions) propagate unchanged.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()

    async def put_file(self, key: str, path: Path, *, content_type: str | None = None) -> None:
        """Copy the local file ``path`` to ``key``. Raises ``Conflict`` when ``key`` exists.

        If reading ``path`` fails half-way (the ``OSError`` propagates), nothing becomes visible
        under ``key``. ``content_type`` is not kept: a folder has nowhere to store it.
        """
        target = self._path(key)

        def copy_from_source(out: BinaryIO) -> None:
            with path.open("rb") as src:
                shutil.copyfileobj(src, out, _COPY_CHUNK)

        await asyncio.to_thread(self._write_new, key, target, copy_from_source)

    async def put_bytes(self, key: str, data: bytes, *, content_type: str | None = None) -> None:
        """Store ``data`` under ``key``. Raises ``Conflict`` when ``key`` exists."""
        target = self._path(key)
        await asyncio.to_thread(self._write_new, key, target, lambda out: out.write(data))

    async def get_file(self, key: str, dest: Path) -> None:
        """Copy ``key`` to ``dest`` through a temporary file beside it, so ``dest`` is whole or
        untouched. Raises ``NotFound``."""
        source = self._path(key)
        await asyncio.to_thread(self._copy_out, key, source, Path(dest))

    async def get_bytes(self, key: str) -> bytes:
        """The object's bytes. Raises ``NotFound``."""
        source = self._path(key)
        with self._missing_as_not_found(key):
            return await asyncio.to_thread(source.read_bytes)

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self._path(key).is_file)

    async def stat(self, key: str) -> ObjectInfo:
        """Size and modification time. Raises ``NotFound``."""
        source = self._path(key)
        with self._missing_as_not_found(key):
            st = await asyncio.to_thread(source.stat)
        return ObjectInfo(key=key, size=st.st_size, modified=st.st_mtime)

    async def list(self, prefix: str) -> list[ObjectInfo]:
        """Objects whose key starts with ``prefix`` (``""`` for all), sorted by key."""
        if prefix:
            check_key(prefix)
        return await asyncio.to_thread(_list_objects, self.root, prefix)

    async def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is ignored."""
        await asyncio.to_thread(self._path(key).unlink, missing_ok=True)
        log.debug("storage.deleted", extra={"key": key})

    async def touch(self, key: str) -> None:
        """Set the object's modification time to now (LRU bookkeeping). Raises ``NotFound``."""
        target = self._path(key)
        with self._missing_as_not_found(key):
            await asyncio.to_thread(os.utime, target)

    def local_path(self, key: str) -> Path | None:
        """The file behind ``key`` (which may not exist yet)."""
        return self._path(key)

    async def presigned_url(self, key: str, expires_seconds: int) -> str | None:
        """Always None: a folder has no URLs of its own (the gateway serves these files)."""
        check_key(key)
        return None

    async def close(self) -> None:
        """Nothing to release."""

    # --- internals -------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _write_new(self, key: str, target: Path, fill: Callable[[BinaryIO], object]) -> None:
        """Write a temporary file with ``fill`` then link it to ``target`` if ``target`` is free."""
        tmp_dir = self.root / _TMP_DIR
        tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=tmp_dir, prefix="put-")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                fill(out)
                out.flush()
                # Without fsync a crash could leave a visible but empty object behind the link.
                os.fsync(out.fileno())
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError) as exc:
                raise Conflict("A storage path is already taken.") from exc
            self._link_new(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        log.debug("storage.stored", extra={"key": key})

    @staticmethod
    def _link_new(tmp: Path, target: Path) -> None:
        try:
            os.link(tmp, target)
        except FileExistsError as exc:
            raise Conflict("This object already exists.") from exc
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
            # File systems without hard links (FAT, some network mounts): fall back to
            # check-then-rename, which leaves a small window in which two writers can both win.
            log.warning("storage.hard_links_unsupported", extra={"path": str(target.parent)})
            if target.exists():
                raise Conflict("This object already exists.") from exc
            os.replace(tmp, target)

    def _copy_out(self, key: str, source: Path, dest: Path) -> None:
        with self._missing_as_not_found(key):
            src = source.open("rb")
        with src:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
            try:
                with tmp.open("wb") as out:
                    shutil.copyfileobj(src, out, _COPY_CHUNK)
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)

    @staticmethod
    @contextmanager
    def _missing_as_not_found(key: str) -> Iterator[None]:
        try:
            yield
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise NotFound("The stored object was not found.") from exc


def _list_objects(root: Path, prefix: str) -> list[ObjectInfo]:
    # Walk only the deepest folder the prefix names, not the whole store.
    folder, _, _ = prefix.rpartition("/")
    base = root / folder if folder else root
    found: list[ObjectInfo] = []
    for path in _walk_files(root, base):
        key = path.relative_to(root).as_posix()
        if not key.startswith(prefix):
            continue
        try:
            st = path.stat()
        except FileNotFoundError:  # deleted while listing
            continue
        found.append(ObjectInfo(key=key, size=st.st_size, modified=st.st_mtime))
    return sorted(found, key=lambda info: info.key)


def _walk_files(root: Path, base: Path) -> Iterator[Path]:
    if not base.is_dir():
        return
    for dirpath, dirnames, filenames in os.walk(base):
        if Path(dirpath) == root:
            dirnames[:] = [d for d in dirnames if d != _TMP_DIR]
        for name in filenames:
            yield Path(dirpath, name)
