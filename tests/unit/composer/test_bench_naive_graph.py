"""The benchmark's naive single graph is made from the composer's own soundtrack command; when that
command changes shape, the graph must still be one ffmpeg accepts (a broken graph only shows up in
``make bench`` otherwise)."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

from bench.composer import _naive_args


def _lavfi(ffmpeg: str, source: str, dest: Path, *extra: str) -> Path:
    subprocess.run([ffmpeg, "-nostdin", "-y", "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i", source,
                    *extra, str(dest)], check=True, capture_output=True, timeout=60)
    return dest


def test_the_naive_graph_runs_in_ffmpeg(ffmpeg_exe: str, tmp_path: Path) -> None:
    clips = [_lavfi(ffmpeg_exe, "testsrc=size=320x180:rate=25:duration=1", tmp_path / f"c{n}.mp4",
                    "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p") for n in range(2)]
    music = _lavfi(ffmpeg_exe, "sine=frequency=440:duration=3", tmp_path / "music.m4a", "-c:a", "aac")
    spec: dict[str, object] = {"clips": [{"path": str(c), "duration": 1.0} for c in clips],
                               "transitions": [{"kind": "crossfade", "duration": 0.5}], "beats": [],
                               "music": str(music)}
    dest = tmp_path / "naive.mp4"

    args = asyncio.run(_naive_args(spec, dest))
    # Ten frames are enough to know the graph was accepted and its labels all connect.
    args[args.index("-frames:v") + 1] = "10"
    done = subprocess.run([ffmpeg_exe, "-nostdin", "-hide_banner", "-v", "error", "-y", *args],
                          capture_output=True, text=True, timeout=120)

    assert done.returncode == 0, done.stderr
    assert dest.stat().st_size > 0
