"""Receiving a job's uploads: a streaming multipart reader with size limits, and content sniffing.

Files are streamed to a private temporary folder as they arrive, so a large upload never sits in
memory and an oversized one is refused as soon as it passes the limit. The client's filename and
declared content type are ignored: what a file is comes from its first bytes, and its storage key
is made by the server.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

import anyio
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from gateway.errors import ApiError, invalid_input

SNIFF_BYTES = 64
MAX_FIELD_BYTES = 1024 * 1024

MediaKind = Literal["video", "audio"]


@dataclass(frozen=True)
class Sniffed:
    """What a file's first bytes say it is."""

    kind: MediaKind
    suffix: str
    content_type: str


@dataclass
class ReceivedFile:
    """One uploaded file, written completely to ``path``."""

    name: str
    path: Path
    size: int = 0
    head: bytes = b""


@dataclass
class ReceivedForm:
    fields: dict[str, str] = field(default_factory=dict)
    files: list[ReceivedFile] = field(default_factory=list)

    def files_named(self, name: str) -> list[ReceivedFile]:
        return [f for f in self.files if f.name == name]


def sniff(head: bytes, expected: MediaKind) -> Sniffed | None:
    """Recognise the containers ClipChat accepts from a file's first bytes, or ``None``.

    Video: MP4/MOV (``ftyp`` box or a QuickTime atom), WebM/Matroska (EBML). Audio: MP3 (ID3 tag or
    an MPEG frame sync), WAV (RIFF/WAVE), M4A (``ftyp``), FLAC. An MP4-family file is accepted as
    either kind because the brand alone cannot tell whether it carries video.
    """
    box = head[4:8]
    brand = head[8:12]
    if box == b"ftyp":
        if expected == "audio":
            return Sniffed("audio", ".m4a", "audio/mp4")
        if brand == b"qt  ":
            return Sniffed("video", ".mov", "video/quicktime")
        return Sniffed("video", ".mp4", "video/mp4")
    if expected == "video":
        if box in (b"moov", b"mdat", b"wide", b"free") and len(head) >= 8:
            return Sniffed("video", ".mov", "video/quicktime")
        if head.startswith(b"\x1a\x45\xdf\xa3"):
            if b"webm" in head:
                return Sniffed("video", ".webm", "video/webm")
            return Sniffed("video", ".mkv", "video/x-matroska")
        return None
    if head.startswith(b"ID3") or (len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return Sniffed("audio", ".mp3", "audio/mpeg")
    if head.startswith(b"RIFF") and head[8:12] == b"WAVE":
        return Sniffed("audio", ".wav", "audio/wav")
    if head.startswith(b"fLaC"):
        return Sniffed("audio", ".flac", "audio/flac")
    return None


class _Collector:
    """python-multipart callbacks queue what they see; ``receive_multipart`` acts on it in order.

    The parser is synchronous, so file writes and limit checks happen after each chunk, in async
    code, rather than inside the callbacks.
    """

    def __init__(self) -> None:
        self.events: list[tuple[str, bytes]] = []
        self.header_field = b""
        self.header_value = b""
        self.headers: dict[bytes, bytes] = {}
        self.ended = False

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self.headers = {}

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def _header_end(self) -> None:
        self.headers[self.header_field.lower()] = self.header_value
        self.header_field = self.header_value = b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self.headers.get(b"content-disposition", b""))
        self.events.append(("begin", options.get(b"name", b"")))

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        self.events.append(("data", bytes(data[start:end])))

    def _part_end(self) -> None:
        self.events.append(("end", b""))

    def _end(self) -> None:
        self.ended = True


class _FormWriter:
    """Turns the parser's part events into a ``ReceivedForm``: file parts streamed to disk, text
    parts collected, every limit checked as the bytes arrive."""

    def __init__(self, workdir: Path, *, file_fields: frozenset[str], text_fields: frozenset[str],
                 max_file_bytes: int, max_files: int) -> None:
        self.workdir = workdir
        self.file_fields, self.text_fields = file_fields, text_fields
        self.max_file_bytes, self.max_files = max_file_bytes, max_files
        self.form = ReceivedForm()
        self.current: ReceivedFile | None = None
        self.out: IO[bytes] | None = None
        self.text_name = ""
        self.text = bytearray()

    async def handle(self, kind: str, data: bytes) -> None:
        if kind == "begin":
            await self._begin(data.decode("latin-1"))
        elif kind == "data":
            await self._data(data)
        elif kind == "end":
            await self._end()

    async def _begin(self, name: str) -> None:
        if name in self.file_fields:
            if len(self.form.files) >= self.max_files:
                raise invalid_input(f"Too many files: at most {self.max_files} in one job.")
            self.current = ReceivedFile(name, self.workdir / f"part-{len(self.form.files)}")
            self.form.files.append(self.current)
            self.out = await anyio.to_thread.run_sync(self.current.path.open, "wb")
        elif name in self.text_fields:
            if name in self.form.fields or name == self.text_name:
                raise invalid_input(f"The form has more than one '{name}' field. Send one.")
            self.text_name, self.text = name, bytearray()
        else:
            raise invalid_input(f"Unexpected form part '{name[:40]}'. Send 'manifest', 'clips' and 'audio'.")

    async def _data(self, data: bytes) -> None:
        current, out = self.current, self.out
        if current is not None and out is not None:
            current.size += len(data)
            if current.size > self.max_file_bytes:
                raise ApiError(413, "payload_too_large", f"A file is larger than {_mib(self.max_file_bytes)} MiB.")
            if len(current.head) < SNIFF_BYTES:
                current.head = (current.head + data)[:SNIFF_BYTES]
            await anyio.to_thread.run_sync(out.write, data)
            return
        self.text += data
        if len(self.text) > MAX_FIELD_BYTES:
            raise ApiError(413, "payload_too_large", f"The '{self.text_name}' field is too large.")

    async def _end(self) -> None:
        if self.out is not None:
            await self.close()
        elif self.text_name:
            try:
                self.form.fields[self.text_name] = self.text.decode("utf-8")
            except UnicodeDecodeError:
                raise invalid_input(f"The '{self.text_name}' field must be UTF-8 text.") from None
            self.text_name = ""

    async def close(self) -> None:
        """Close the file being written, if any (also when the upload stops half-way)."""
        out, self.out, self.current = self.out, None, None
        if out is not None:
            await anyio.to_thread.run_sync(out.close)


async def receive_multipart(request: Request, workdir: Path, *, file_fields: frozenset[str],
                            text_fields: frozenset[str], max_file_bytes: int, max_files: int,
                            max_request_bytes: int) -> ReceivedForm:
    """Read a ``multipart/form-data`` body, streaming the file parts into ``workdir``.

    Parts named in ``file_fields`` are files whatever their headers say; parts in ``text_fields``
    are UTF-8 text of at most ``MAX_FIELD_BYTES``. Raises ``ApiError``: 413 for a file over
    ``max_file_bytes`` or a body over ``max_request_bytes`` (refused before reading when its
    Content-Length says so), 422 for a malformed body, an unexpected part or too many files.
    """
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise invalid_input("Send the job as multipart/form-data with a 'manifest' field and "
                            "'clips' and 'audio' files.")
    too_large = ApiError(413, "payload_too_large", f"The upload is larger than "
                         f"{_mib(max_request_bytes)} MiB in all. Send fewer or smaller files.")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_request_bytes:
        raise too_large
    collector = _Collector()
    try:
        parser = MultipartParser(boundary, collector.callbacks())  # type: ignore[arg-type]
    except MultipartParseError:
        raise invalid_input("The multipart boundary is not valid.") from None
    writer = _FormWriter(workdir, file_fields=file_fields, text_fields=text_fields,
                         max_file_bytes=max_file_bytes, max_files=max_files)
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_request_bytes:
                raise too_large
            _parse(parser, chunk)
            events, collector.events = collector.events, []
            for kind, data in events:
                await writer.handle(kind, data)
    except ClientDisconnect:
        raise invalid_input("The upload was interrupted. Please send it again.") from None
    finally:
        await writer.close()
    if not collector.ended:
        raise invalid_input("The upload was cut off before its end. Please send it again.")
    return writer.form


def _parse(parser: MultipartParser, chunk: bytes) -> None:
    try:
        parser.write(chunk)
    except MultipartParseError as exc:
        # python-multipart bounds a part's headers (8 lines of about 4 KiB each).
        if "maximum header" in str(exc).lower():
            raise ApiError(413, "payload_too_large", "A form part's headers are too large.") from None
        raise invalid_input("The upload is not valid multipart/form-data.") from None


def _mib(size: int) -> str:
    """Bytes as MiB for a message: whole when they are, else to one decimal."""
    mib = size / (1024 * 1024)
    return f"{mib:.0f}" if mib == int(mib) else f"{mib:.1f}"
