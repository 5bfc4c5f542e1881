"""Hostile text through the whole embedded system: the real gateway, status service, regenerator
(template rewriter, local ffmpeg video generator), composer (ffmpeg) and local storage.

A job whose title, prompts and file names, and a regeneration whose instruction and history, hold
filter-graph syntax, shell syntax and path traversal is composed and regenerated like any other:
the videos are produced, the text comes back byte for byte, no shell ran it, and nothing is
written outside the data folder (the process's temporary folder is left empty too).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import httpx
import pytest

from tests.conftest import free_port
from tests.processes import spawn, stop_process

ROOT = Path(__file__).resolve().parents[2]
CLIPCHAT = str(Path(sys.executable).with_name("clipchat"))
TOKEN = "hostile-token"

pytestmark = [pytest.mark.ffmpeg, pytest.mark.timeout(600)]


def _hostile(marker: Path) -> dict[str, str]:
    """Hostile texts; ``marker`` is created only if a shell ever runs one of them."""
    return {
        "title": f"'[0:v]drawtext=text=x[v];[v]null $(touch {marker}) `touch {marker}`",
        "prompt": f"a neon city at night'[0:v];[1:v]xfade=transition=fade:duration=1[out]; $(touch {marker})"
                  " \u202etxt.exe ../../etc/passwd",
        "second_prompt": "../../../../tmp/evil\r\nsecond line ; rm -rf / ünïcødé 🎬",
        "file_name": "../../../evil'[0:v];$(id).mp4",
        "instruction": f"make it rainy'[0:v]split[a][b];$(touch {marker}) `touch {marker}` ../../etc/passwd",
        "history": f"earlier:\r\n\"quoted\" \\backslash\\ $(touch {marker}) \u202eoverride",
    }


@pytest.fixture
def embedded(tmp_path: Path, ffmpeg_exe: str) -> Iterator[tuple[str, Path, Path]]:
    """``clipchat up --no-demo`` with its own data folder and temporary folder; yields (url, data, tmp)."""
    data_dir, temp_dir = tmp_path / "data", tmp_path / "tmp"
    temp_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPCHAT_")}
    env.update({"CLIPCHAT_DATA_DIR": str(data_dir), "CLIPCHAT_AUTH_TOKENS": f"{TOKEN}=hostile",
                "CLIPCHAT_X264_PRESET": "superfast", "CLIPCHAT_FFMPEG_PATH": ffmpeg_exe,
                "TMPDIR": str(temp_dir), "PYTHONUNBUFFERED": "1"})
    port = free_port()
    output = tmp_path / "clipchat-up.log"
    with output.open("w") as sink:
        proc = spawn([CLIPCHAT, "up", "--no-demo", "--port", str(port)], env=env, cwd=ROOT, stdout=sink,
                     stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while "ClipChat is running" not in output.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"clipchat up did not start:\n{output.read_text()[-4000:]}")
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}", data_dir, temp_dir
    finally:
        stop_process(proc)


def _wait(client: httpx.Client, job_id: str, done: Any) -> dict[str, Any]:
    """The job once ``done(job)`` holds (a readiness wait, not a speed check)."""
    deadline = time.monotonic() + 400
    while True:
        job: dict[str, Any] = client.get(f"/api/v1/jobs/{job_id}").json()
        if done(job) or job["status"] == "failed":
            return job
        if time.monotonic() > deadline:
            pytest.fail(f"job {job_id} stayed {job['status']}")
        time.sleep(0.3)


def _log_tail(data_dir: Path) -> str:
    log = data_dir / "clipchat.log"
    return log.read_text()[-4000:] if log.exists() else ""


def _frames(client: httpx.Client, url: str, dest: Path) -> int:
    response = client.get(url, follow_redirects=True)
    assert response.status_code == 200, response.text[:200]
    dest.write_bytes(response.content)
    with av.open(str(dest)) as container:
        return sum(1 for _ in container.decode(video=0))


def test_hostile_text_goes_through_composition_and_regeneration_as_data(
        embedded: tuple[str, Path, Path], tmp_path: Path, ffmpeg_exe: str) -> None:
    url, data_dir, temp_dir = embedded
    marker = tmp_path / "a-shell-ran"
    text = _hostile(marker)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name, source in [("a.mp4", "testsrc=size=320x240:rate=30:duration=1.2"),
                         ("b.mp4", "testsrc2=size=320x240:rate=30:duration=1.2")]:
        subprocess.run([ffmpeg_exe, "-v", "error", "-f", "lavfi", "-i", source, "-c:v", "libx264",
                        "-pix_fmt", "yuv420p", "-y", str(inputs / name)], check=True, timeout=60)
    subprocess.run([ffmpeg_exe, "-v", "error", "-f", "lavfi", "-i", "sine=frequency=440:duration=2",
                    "-y", str(inputs / "track.wav")], check=True, timeout=60)
    manifest = {"title": text["title"], "aspect_ratio": "1:1",
                "clips": [{"prompt": text["prompt"], "duration": 1.0},
                          {"prompt": text["second_prompt"], "duration": 1.0}],
                "transitions": [{"kind": "crossfade", "duration": 0.3}]}
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as client:
        files = [("clips", (text["file_name"], (inputs / "a.mp4").read_bytes(), "video/mp4")),
                 ("clips", (text["file_name"], (inputs / "b.mp4").read_bytes(), "video/mp4")),
                 ("audio", (text["file_name"], (inputs / "track.wav").read_bytes(), "audio/wav"))]
        created = client.post("/api/v1/jobs", data={"manifest": json.dumps(manifest)}, files=files)
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]
        job = _wait(client, job_id, lambda j: j["status"] == "completed")
        assert job["status"] == "completed", (job["error"], _log_tail(data_dir))
        assert job["title"] == text["title"]
        assert [c["prompt"] for c in job["clips"]] == [text["prompt"], text["second_prompt"]]
        first_frames = _frames(client, job["video_url"], tmp_path / "v1.mp4")
        assert first_frames >= 30

        history = [{"role": "user", "content": text["history"]}, {"role": "assistant", "content": text["history"]}]
        started = client.post(f"/api/v1/jobs/{job_id}/clips/0/regenerate",
                              json={"instruction": text["instruction"], "conversation_history": history})
        assert started.status_code == 202, started.text
        job = _wait(client, job_id, lambda j: j["status"] == "completed" and j["current_version"] == 2)
        assert job["status"] == "completed" and job["current_version"] == 2, (job["error"], _log_tail(data_dir))
        assert _frames(client, job["video_url"], tmp_path / "v2.mp4") == first_frames
        [regeneration] = client.get(f"/api/v1/jobs/{job_id}/regenerations").json()["regenerations"]
        assert regeneration["status"] == "completed", regeneration
        assert regeneration["instruction"] == text["instruction"]
        assert regeneration["original_prompt"] == text["prompt"]

    assert not marker.exists(), "a shell ran user text"
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    outside = [p for p in written if not p.is_relative_to(data_dir) and not p.is_relative_to(inputs)
               and p.name not in {"clipchat-up.log", "v1.mp4", "v2.mp4"}]
    assert outside == [], f"written outside the data folder: {outside}"
    assert not any(temp_dir.iterdir()), f"left in the temporary folder: {list(temp_dir.iterdir())}"
    for path in data_dir.rglob("*"):
        relative = str(path.relative_to(data_dir))
        assert "evil" not in relative and "passwd" not in relative and "$(" not in relative, relative
