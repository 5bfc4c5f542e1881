"""Run ffmpeg as an asyncio subprocess: list arguments, progress from ``-progress``, kill on cancel.

Callers pass only numbers they computed and file paths the server made; this module never goes
through a shell. Every run is restricted to the ``file`` and ``pipe`` protocols, so even a crafted
input path cannot make ffmpeg open a network URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from opentelemetry import trace

from clipchat.aio import settled
from clipchat.errors import MediaError, TransientError

log = logging.getLogger("clipchat.media")

# Called with the fraction done (0..1) of one ffmpeg run.
FfmpegProgressFn = Callable[[float], Awaitable[None]]

_STDERR_TAIL_LINES = 40
# ffmpeg finishes the frame in hand and closes its outputs on SIGTERM; past this it gets SIGKILL.
_TERM_GRACE_SECONDS = 1.0
_ALLOWED_PROTOCOLS = "file,pipe"
_PARENT_IDS = ("clipchat.job_id", "clipchat.regeneration_id")


class FfmpegError(MediaError):
    """ffmpeg exited with an error. ``detail`` holds the last lines of its stderr (for operators)."""

    code = "ffmpeg_failed"
    default_message = "The video could not be processed."

    def __init__(self, message: str | None = None, *, detail: str = "",
                 returncode: int | None = None) -> None:
        super().__init__(message)
        self.detail = detail
        self.returncode = returncode


class FfmpegKilled(TransientError):
    """ffmpeg was ended by a signal (out of memory, node drain, an operator); a retry may succeed."""

    code = "ffmpeg_killed"
    default_message = "Video processing was interrupted. Please try again."

    def __init__(self, message: str | None = None, *, detail: str = "",
                 returncode: int | None = None) -> None:
        super().__init__(message)
        self.detail = detail
        self.returncode = returncode


class FfmpegRunner:
    """Runs one ffmpeg binary; safe to share between concurrent tasks (each run is its own process)."""

    def __init__(self, ffmpeg_path: str | None = None) -> None:
        if not ffmpeg_path:
            import imageio_ffmpeg

            ffmpeg_path = imageio_ffmpeg.get_ffmpeg_exe()
        self.path = ffmpeg_path

    @classmethod
    def from_settings(cls, settings: object) -> FfmpegRunner:
        """The runner for ``settings.ffmpeg_path``, or the bundled ffmpeg when that is empty."""
        return cls(getattr(settings, "ffmpeg_path", "") or None)

    async def run(self, args: Sequence[str], *, expected_duration: float | None = None,
                  on_progress: FfmpegProgressFn | None = None, quiet: bool = False, makes: str = "") -> None:
        """Run ffmpeg with ``args`` (everything after the fixed global options) to completion.

        ``on_progress`` receives the fraction of ``expected_duration`` (seconds of output) done,
        from ffmpeg's ``-progress`` reports, and 1.0 at the end.

        Raises ``FfmpegError`` when ffmpeg cannot start or exits non-zero, ``FfmpegKilled`` when a
        signal ended it. Cancelling the awaiting task kills ffmpeg's whole process group, waits for
        it to exit and re-raises ``CancelledError``. ``quiet`` leaves a failure's stderr out of
        the log (a probe that is expected to fail on most machines says why itself).

        Each run is an ``ffmpeg`` span, a child of the current one: ``makes`` (a short label of the
        output, never user text; the output format when not given), the expected duration, the
        exit code, and the job and regeneration ids when the current span carries them.
        """
        with trace.get_tracer("clipchat.media").start_as_current_span(
                "ffmpeg", attributes=_span_attributes(args, makes, expected_duration)):
            await self._run(args, expected_duration, on_progress, quiet)

    async def _run(self, args: Sequence[str], expected_duration: float | None,
                   on_progress: FfmpegProgressFn | None, quiet: bool) -> None:
        command = [self.path, "-hide_banner", "-nostdin", "-y", "-progress", "pipe:1", "-nostats",
                   *_restrict_protocols(args)]
        stderr_tail: deque[str] = deque(maxlen=_STDERR_TAIL_LINES)
        try:
            proc = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                # Its own process group, so a cancel can end ffmpeg and anything it started.
                start_new_session=True)
        except OSError as exc:
            raise FfmpegError("The video tool could not be started.", detail=str(exc)) from exc

        assert proc.stdout is not None and proc.stderr is not None
        readers = [asyncio.create_task(_read_progress(proc.stdout, expected_duration, on_progress)),
                   asyncio.create_task(_read_lines(proc.stderr, stderr_tail))]
        try:
            # The progress reader finishes when ffmpeg closes stdout; its errors (a failing
            # callback) surface here and end the run.
            await asyncio.gather(*readers)
            returncode = await proc.wait()
        finally:
            if proc.returncode is None:
                await _kill_group(proc)
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)

        trace.get_current_span().set_attribute("process.exit.code", returncode)
        detail = "\n".join(stderr_tail)
        if returncode < 0 or _ended_by_signal(stderr_tail):
            log.warning("ffmpeg.killed", extra={"returncode": returncode, "stderr_tail": detail[-2000:]})
            raise FfmpegKilled(detail=detail, returncode=returncode)
        if returncode != 0:
            if not quiet:
                log.warning("ffmpeg.failed", extra={"returncode": returncode, "stderr_tail": detail[-2000:]})
            raise FfmpegError(detail=detail, returncode=returncode)
        if on_progress is not None:
            await on_progress(1.0)


def _span_attributes(args: Sequence[str], makes: str, expected_duration: float | None) -> dict[str, Any]:
    attributes: dict[str, Any] = {"clipchat.ffmpeg.makes": makes or _output_format(args)}
    if expected_duration is not None:
        attributes["clipchat.ffmpeg.expected_duration_s"] = expected_duration
    # The caller's span (the composer's compose.message, the generator's step) names the work.
    parent = getattr(trace.get_current_span(), "attributes", None) or {}
    attributes.update({key: parent[key] for key in _PARENT_IDS if key in parent})
    return attributes


def _output_format(args: Sequence[str]) -> str:
    """The last output's ``-f`` format, else its file suffix: "mp4", "null", "m4a" (no user text)."""
    formats = [args[i + 1] for i in range(len(args) - 1) if args[i] == "-f" and "-i" not in args[i + 2:]]
    if formats:
        return formats[-1]
    suffix = os.path.splitext(args[-1])[1].lstrip(".") if args else ""
    return suffix if suffix.isalnum() and len(suffix) <= 8 else "output"


def _restrict_protocols(args: Sequence[str]) -> list[str]:
    """``args`` with the protocol whitelist in front of every input (it is a per-input option)."""
    out: list[str] = []
    for arg in args:
        if arg == "-i":
            out += ["-protocol_whitelist", _ALLOWED_PROTOCOLS]
        out.append(arg)
    return out


def _ended_by_signal(stderr_tail: deque[str]) -> bool:
    # ffmpeg traps SIGTERM/SIGINT, exits with 255 and says so instead of dying by the signal.
    return any("received signal" in line for line in list(stderr_tail)[-3:])


async def _read_progress(stream: asyncio.StreamReader, expected_duration: float | None,
                         on_progress: FfmpegProgressFn | None) -> None:
    """Turn ``-progress`` key=value blocks into fractions of ``expected_duration``."""
    last = -1.0
    out_time_us: int | None = None
    async for raw in stream:
        key, _, value = raw.decode("utf-8", "replace").strip().partition("=")
        if key in ("out_time_us", "out_time_ms"):
            # Both carry microseconds (out_time_ms is misnamed in ffmpeg); "N/A" before output.
            with contextlib.suppress(ValueError):
                out_time_us = int(value)
        elif key == "progress" and on_progress is not None and expected_duration and out_time_us is not None:
            fraction = min(1.0, max(0.0, out_time_us / 1e6 / expected_duration))
            if fraction > last:
                last = fraction
                await on_progress(fraction)


async def _read_lines(stream: asyncio.StreamReader, tail: deque[str]) -> None:
    """Keep the last lines of ``stream``; read in chunks, since a line may pass any length limit."""
    pending = b""
    while chunk := await stream.read(65_536):
        *lines, pending = (pending + chunk).replace(b"\r", b"\n").split(b"\n")
        tail.extend(text for line in lines if (text := line.decode("utf-8", "replace").rstrip()))
        pending = pending[-65_536:]
    if pending.strip():
        tail.append(pending.decode("utf-8", "replace").rstrip())


async def _kill_group(proc: asyncio.subprocess.Process) -> None:
    """End ffmpeg's process group: SIGTERM, a short grace, then SIGKILL; always reaps it.

    Shielded from further cancellation so that a second cancel cannot leave a process behind.
    """

    async def terminate() -> None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), _TERM_GRACE_SECONDS)
        except TimeoutError:
            _signal_group(proc.pid, signal.SIGKILL)
            await proc.wait()

    await settled(terminate())


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
