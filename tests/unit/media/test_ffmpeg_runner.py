"""FfmpegRunner against the real ffmpeg: progress, errors, signals, cancellation, protocols."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from clipchat.errors import MediaError, TransientError
from clipchat.media.ffmpeg import FfmpegError, FfmpegKilled, FfmpegRunner

# A source that takes about 30 s to read (-re paces it at real time): long enough to interrupt.
SLOW_INPUT = ["-re", "-f", "lavfi", "-i", "testsrc=size=160x90:rate=10:duration=30"]


def child_pids() -> list[int]:
    """ffmpeg processes whose parent is this test process (read from /proc, no psutil needed).

    Other children (a moto server, the end-to-end systems of a whole-suite run) are not ours.
    """
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may contain spaces and parentheses; fields resume after the last ")".
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == me and "ffmpeg" in stat.split(")", 1)[0]:
            found.append(int(entry.name))
    return found


async def wait_for_child(within: float = 10.0) -> int:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        pids = child_pids()
        if pids:
            return pids[0]
        await asyncio.sleep(0.02)
    raise AssertionError("ffmpeg did not start")


@pytest.fixture
def runner(ffmpeg_exe: str) -> FfmpegRunner:
    return FfmpegRunner(ffmpeg_exe)


async def test_reports_rising_progress_and_finishes_at_one(runner: FfmpegRunner, tmp_path: Path) -> None:
    fractions: list[float] = []

    async def on_progress(fraction: float) -> None:
        fractions.append(fraction)

    out = tmp_path / "out.mp4"
    await runner.run(["-f", "lavfi", "-i", "testsrc=size=320x180:rate=30:duration=2", "-c:v", "libx264",
                      "-preset", "ultrafast", str(out)], expected_duration=2.0, on_progress=on_progress)

    assert out.stat().st_size > 0
    assert fractions and fractions[-1] == 1.0
    assert fractions == sorted(fractions)
    assert all(0.0 <= f <= 1.0 for f in fractions)


def test_defaults_to_the_bundled_ffmpeg(ffmpeg_exe: str) -> None:
    assert FfmpegRunner().path == ffmpeg_exe
    assert FfmpegRunner.from_settings(type("S", (), {"ffmpeg_path": ""})()).path == ffmpeg_exe
    assert FfmpegRunner.from_settings(type("S", (), {"ffmpeg_path": "/opt/ffmpeg"})()).path == "/opt/ffmpeg"


async def test_failure_raises_media_error_with_stderr_tail(runner: FfmpegRunner, tmp_path: Path) -> None:
    with pytest.raises(FfmpegError) as caught:
        await runner.run(["-i", str(tmp_path / "missing.mp4"), "-f", "null", "-"])

    assert isinstance(caught.value, MediaError)
    assert caught.value.returncode not in (0, None)
    assert "missing.mp4" in caught.value.detail
    # The stderr tail is for operators, never the message a person sees.
    assert "missing.mp4" not in caught.value.message
    assert len(caught.value.detail.splitlines()) <= 40


async def test_missing_binary_raises_ffmpeg_error(tmp_path: Path) -> None:
    with pytest.raises(FfmpegError):
        await FfmpegRunner(str(tmp_path / "no-ffmpeg")).run(["-version"])


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
async def test_killed_ffmpeg_raises_transient_ffmpeg_killed(runner: FfmpegRunner,
                                                             sig: signal.Signals) -> None:
    task = asyncio.create_task(runner.run([*SLOW_INPUT, "-f", "null", "-"]))
    pid = await wait_for_child()
    os.kill(pid, sig)

    with pytest.raises(FfmpegKilled) as caught:
        await asyncio.wait_for(task, 10)
    assert isinstance(caught.value, TransientError)
    assert caught.value.retryable
    assert child_pids() == []


async def test_cancel_kills_ffmpeg_and_reraises(runner: FfmpegRunner) -> None:
    task = asyncio.create_task(runner.run([*SLOW_INPUT, "-f", "null", "-"]))
    await wait_for_child()
    started = time.monotonic()

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert time.monotonic() - started < 5
    assert child_pids() == []


async def test_a_failing_progress_callback_stops_ffmpeg(runner: FfmpegRunner) -> None:
    async def on_progress(fraction: float) -> None:
        raise RuntimeError("consumer went away")

    with pytest.raises(RuntimeError):
        await runner.run([*SLOW_INPUT, "-f", "null", "-"], expected_duration=30, on_progress=on_progress)
    assert child_pids() == []


async def test_inputs_are_limited_to_local_files(ffmpeg_exe: str, runner: FfmpegRunner,
                                                  tmp_path: Path) -> None:
    clip = tmp_path / "clip.mp4"
    await runner.run(["-f", "lavfi", "-i", "testsrc=size=160x90:rate=10:duration=1", "-c:v", "libx264",
                      "-preset", "ultrafast", str(clip)])
    # The concat: protocol reads fine in a plain ffmpeg, so only the whitelist can refuse it.
    url = f"concat:{clip}|{clip}"
    plain = await asyncio.create_subprocess_exec(ffmpeg_exe, "-nostdin", "-i", url, "-f", "null", "-",
                                                 stdout=asyncio.subprocess.DEVNULL,
                                                 stderr=asyncio.subprocess.DEVNULL)
    assert await plain.wait() == 0

    with pytest.raises(FfmpegError):
        await runner.run(["-i", url, "-f", "null", "-"])
