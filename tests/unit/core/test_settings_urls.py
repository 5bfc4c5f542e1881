"""Settings that are URLs are checked as URLs of their schemes, and closed sets as Literals: a
mistake is one line naming the setting, at start-up, never echoing the value (URLs carry passwords)."""

from __future__ import annotations

import os
from typing import Any

import pytest
from pydantic import ValidationError

from clipchat.settings import InvalidSettings, Settings
from tests.unit.test_startup_errors import serve


@pytest.fixture(autouse=True)
def _no_clipchat_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in os.environ:
        if name.startswith("CLIPCHAT_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize(("setting", "value", "problem"), [
    ("database_url", "postgres://clipchat:s3cret@db/clipchat", "must start with postgresql+asyncpg:// or sqlite+aiosqlite://"),
    ("database_url", "postgresql+asyncpg://clipchat:s3cret@:5432/clipchat", "names no host"),
    ("broker_url", "amqp//guest:s3cret@rabbit", "must start with amqp:// or amqps:// or memory://"),
    ("storage_url", "s3://", "names no bucket"),
    ("storage_url", "file://", "names no folder"),
    ("storage_url", "FILE:///srv/s3cret", "must start with s3:// or file://"),
    ("s3_endpoint_url", "s3.amazonaws.com/s3cret", "must start with https:// or http://"),
    ("public_url", "https://clipchat.example.com:99999/s3cret", "is not a valid URL"),
    ("llm_base_url", "https://api.example.com/v1 s3cret", "has white space in it"),
    ("generator_url", "ftp://files.example.com/s3cret", "must start with https:// or http://"),
    ("otlp_endpoint", "collector:4317/s3cret", "must start with http:// or https://"),
])
def test_a_bad_url_is_one_line_naming_the_setting(setting: str, value: str, problem: str) -> None:
    values: dict[str, Any] = {setting: value}
    with pytest.raises(InvalidSettings) as caught:
        Settings(**values)
    message = str(caught.value)
    assert message.startswith(f"CLIPCHAT_{setting.upper()} {problem}; set a URL such as ")
    assert "\n" not in message and "s3cret" not in message


@pytest.mark.parametrize("values", [
    # What the embedded mode and the tests use, and the deployment's examples.
    {"database_url": "", "broker_url": "memory://", "storage_url": "", "s3_endpoint_url": None},
    {"database_url": "sqlite+aiosqlite:///tmp/clipchat.db", "storage_url": "file:///tmp/storage"},
    {"database_url": "sqlite+aiosqlite://", "storage_url": "file://relative/storage"},
    {"database_url": "postgresql+asyncpg://clipchat:pw@postgres.example.internal:5432/clipchat",
     "broker_url": "amqp://clipchat:pw@rabbitmq.example.internal:5672/clipchat", "storage_url": "s3://clipchat-media",
     "s3_endpoint_url": "https://s3.us-east-1.amazonaws.com", "public_url": "https://clipchat.example.com",
     "otlp_endpoint": "http://otel-collector.observability:4317"},
    {"broker_url": "amqps://u:p@[::1]:5671/", "storage_url": "s3://bucket/prefix", "s3_endpoint_url": "",
     "llm_base_url": "http://127.0.0.1:8080/v1", "generator_url": "http://127.0.0.1:8090"},
])
def test_the_urls_in_use_are_accepted_as_they_are(values: dict[str, Any]) -> None:
    settings = Settings(**values)
    assert {name: getattr(settings, name) for name in values} == values


def test_the_log_level_is_a_closed_set_in_any_case() -> None:
    assert Settings(log_level="debug").log_level == "DEBUG"  # type: ignore[arg-type]
    with pytest.raises(InvalidSettings, match=r"^CLIPCHAT_LOG_LEVEL='verbose' is not one of DEBUG, INFO, WARNING, "):
        Settings(log_level="verbose")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="x264_preset"):
        Settings(x264_preset="ultrafast")  # type: ignore[arg-type]


def test_a_bad_url_stops_start_up_with_one_line() -> None:
    done = serve("gateway", CLIPCHAT_DATABASE_URL="postgres://clipchat:s3cret@db/clipchat")
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "error: invalid CLIPCHAT_* configuration: CLIPCHAT_DATABASE_URL must start with postgresql+asyncpg:// or "
        "sqlite+aiosqlite://; set a URL such as postgresql+asyncpg://user:password@host:5432/clipchat, or leave "
        "it unset.")
    assert "Traceback" not in done.stderr + done.stdout and "s3cret" not in done.stderr
