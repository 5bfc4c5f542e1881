"""Under CI=true a test whose PostgreSQL, RabbitMQ or ffmpeg is missing fails; elsewhere it skips."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROBE = '''
def test_needs_{name}({fixture}):
    assert {fixture}
'''
MISSING = {
    "postgres": ("postgres_admin_dsn", {"CLIPCHAT_TEST_PG_DSN": "postgresql://postgres@127.0.0.1:9/postgres"}),
    "rabbitmq": ("rabbitmq_url", {"CLIPCHAT_TEST_AMQP_URL": "amqp://guest:guest@127.0.0.1:9/"}),
    "ffmpeg": ("ffmpeg_exe", {"CLIPCHAT_TEST_FFMPEG": "/nonexistent/ffmpeg"}),
}


def run_probe(tmp_path: Path, name: str, ci: str) -> subprocess.CompletedProcess[str]:
    fixture, env_overrides = MISSING[name]
    test_file = tmp_path / f"test_probe_{name}.py"
    test_file.write_text(PROBE.format(name=name, fixture=fixture))
    env = {**os.environ, **env_overrides, "CI": ci}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "--rootdir",
                           str(tmp_path), "-c", os.devnull, str(test_file)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", sorted(MISSING))
def test_missing_backend_fails_under_ci(tmp_path: Path, name: str) -> None:
    result = run_probe(tmp_path, name, "true")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 error" in result.stdout or "1 failed" in result.stdout  # a fixture failure is an error
    assert "required under CI=true" in result.stdout


@pytest.mark.parametrize("name", sorted(MISSING))
def test_missing_backend_skips_elsewhere(tmp_path: Path, name: str) -> None:
    result = run_probe(tmp_path, name, "")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 skipped" in result.stdout
