"""S3 that cannot be reached, or never answers, is ``DependencyUnavailable`` (retryable), soon."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import grpc
import pytest

from clipchat.errors import DependencyUnavailable
from clipchat.storage.s3 import S3Storage
from tests.conftest import free_port

MIB = 1024 * 1024
Operation = Callable[[S3Storage, Path], Awaitable[object]]

OPERATIONS: dict[str, Operation] = {
    "exists": lambda s, _: s.exists("jobs/a/clip.mp4"),
    "stat": lambda s, _: s.stat("jobs/a/clip.mp4"),
    "get_bytes": lambda s, _: s.get_bytes("jobs/a/clip.mp4"),
    "get_file": lambda s, tmp: s.get_file("jobs/a/clip.mp4", tmp / "out.mp4"),
    "list": lambda s, _: s.list("jobs/a"),
    "delete": lambda s, _: s.delete("jobs/a/clip.mp4"),
    "put_bytes": lambda s, _: s.put_bytes("jobs/a/new.mp4", b"x" * 1000),
    "put_file_multipart": lambda s, tmp: s.put_file("jobs/a/big.mp4", big_file(tmp)),
}


def big_file(tmp: Path) -> Path:
    path = tmp / "big.bin"
    path.write_bytes(os.urandom(12 * MIB))  # over the threshold below: three parts
    return path


def storage_at(endpoint: str) -> S3Storage:
    return S3Storage(bucket="clipchat", endpoint_url=endpoint, access_key_id="test",
                     secret_access_key="test", connect_timeout=0.5, read_timeout=0.5, max_attempts=1,
                     multipart_threshold=6 * MIB, part_size=5 * MIB, min_upload_rate=64 * MIB)


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """A server that accepts TCP connections (the kernel's backlog) and never reads or answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


async def assert_unavailable_within(operation: Operation, storage: S3Storage, tmp_path: Path,
                                    seconds: float) -> None:
    started = time.monotonic()
    try:
        with pytest.raises(DependencyUnavailable) as caught:
            await operation(storage, tmp_path)
    finally:
        await storage.close()
    assert time.monotonic() - started < seconds
    assert caught.value.retryable is True and caught.value.status is grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("name", list(OPERATIONS))
async def test_a_refused_endpoint_is_unavailable(name: str, tmp_path: Path) -> None:
    storage = storage_at(f"http://127.0.0.1:{free_port()}")
    await assert_unavailable_within(OPERATIONS[name], storage, tmp_path, seconds=5)


@pytest.mark.parametrize("name", ["get_bytes", "put_bytes", "put_file_multipart"])
async def test_an_endpoint_that_never_answers_is_unavailable(name: str, silent_endpoint: str,
                                                             tmp_path: Path) -> None:
    # Uploads wait for "100 Continue", where aiohttp's read timeout does not run: without the
    # upload deadline (here about 1 s) they would wait for ever.
    await assert_unavailable_within(OPERATIONS[name], storage_at(silent_endpoint), tmp_path, seconds=10)
