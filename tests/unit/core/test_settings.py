"""Settings refuse, in production, what is only safe on a developer's machine."""

from __future__ import annotations

import os
from decimal import Decimal
from typing import Any

import pytest
from pydantic import ValidationError

from clipchat.settings import DEV_AUTH_TOKENS, DEV_MEDIA_SIGNING_KEY, InvalidSettings, Settings

GOOD_KEY = "k" * 32
GOOD_TOKENS = f"{'a' * 24}=alice,{'b' * 32}=bob"


@pytest.fixture(autouse=True)
def _no_clipchat_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in os.environ:
        if name.startswith("CLIPCHAT_"):
            monkeypatch.delenv(name)


def production(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"environment": "production", "media_signing_key": GOOD_KEY,
                              "auth_tokens": GOOD_TOKENS, "service_token": "s" * 24}
    values.update(overrides)
    return Settings(**values)


def refusal(**overrides: Any) -> str:
    with pytest.raises(InvalidSettings) as caught:
        production(**overrides)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("CLIPCHAT_ENVIRONMENT=production refuses unsafe settings: ")
    return message


def test_dev_defaults_need_no_configuration() -> None:
    settings = Settings()
    assert settings.environment == "dev"
    assert settings.auth_tokens == DEV_AUTH_TOKENS
    assert settings.media_signing_key == DEV_MEDIA_SIGNING_KEY


def test_test_environment_accepts_the_defaults_too() -> None:
    assert Settings(environment="test").token_owners() == {"dev-token": "demo"}


def test_production_with_real_secrets_builds() -> None:
    settings = production(page_token="p" * 24, llm_api_key="sk-" + "x" * 40)
    assert settings.token_owners() == {"a" * 24: "alice", "b" * 32: "bob"}


def test_production_reads_the_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIPCHAT_ENVIRONMENT", "production")
    with pytest.raises(InvalidSettings, match="CLIPCHAT_MEDIA_SIGNING_KEY is the development default"):
        Settings()


def test_production_refuses_the_default_signing_key() -> None:
    message = refusal(media_signing_key=DEV_MEDIA_SIGNING_KEY)
    assert "CLIPCHAT_MEDIA_SIGNING_KEY is the development default" in message
    assert "openssl rand -hex 32" in message


@pytest.mark.parametrize("key", ["short", "x" * 31, "é" * 15])
def test_production_refuses_a_signing_key_under_32_bytes(key: str) -> None:
    message = refusal(media_signing_key=key)
    assert f"CLIPCHAT_MEDIA_SIGNING_KEY is {len(key.encode())} bytes" in message
    assert key not in message


def test_a_32_byte_key_of_multibyte_characters_is_enough() -> None:
    assert production(media_signing_key="é" * 16).media_signing_key == "é" * 16


def test_production_refuses_the_default_token() -> None:
    assert "CLIPCHAT_AUTH_TOKENS is the development default (dev-token=demo)" in \
        refusal(auth_tokens=DEV_AUTH_TOKENS)


def test_production_refuses_any_token_under_24_characters() -> None:
    message = refusal(auth_tokens=f"{'a' * 24}=alice,{'b' * 23}=bob")
    assert "CLIPCHAT_AUTH_TOKENS has a token shorter than 24 characters (owner bob)" in message
    assert "b" * 23 not in message


def test_production_refuses_a_short_page_token() -> None:
    assert "CLIPCHAT_PAGE_TOKEN is shorter than 24 characters" in refusal(page_token="demo")


@pytest.mark.parametrize(("setting", "value"), [
    ("media_signing_key", "CHANGE_ME" + "x" * 40),
    ("auth_tokens", "change-me-please-change-me-now=alice"),
    ("s3_secret_access_key", "CHANGE_ME"),
    ("llm_api_key", "changeme"),
    ("generator_api_token", "REPLACE_ME"),
    ("database_url", "postgresql+asyncpg://clipchat:CHANGE_ME@db:5432/clipchat"),
    ("broker_url", "amqp://clipchat:Change-Me@rabbit:5672/"),
])
def test_production_refuses_placeholders(setting: str, value: str) -> None:
    message = refusal(**{setting: value})
    assert f"CLIPCHAT_{setting.upper()} holds a placeholder (CHANGE_ME); set the real value" in message
    assert f"={value}" not in message and f" {value}" not in message  # URLs carry passwords


def test_every_problem_is_named_in_one_line() -> None:
    message = refusal(media_signing_key=DEV_MEDIA_SIGNING_KEY, auth_tokens=DEV_AUTH_TOKENS,
                      s3_access_key_id="CHANGE_ME")
    for setting in ("MEDIA_SIGNING_KEY", "AUTH_TOKENS", "S3_ACCESS_KEY_ID"):
        assert f"CLIPCHAT_{setting} " in message


@pytest.mark.parametrize("environment", ["prod", "Production", "staging", ""])
def test_environment_is_a_closed_set(environment: str) -> None:
    with pytest.raises(InvalidSettings, match="is not one of dev, test, production"):
        Settings(environment=environment)  # type: ignore[arg-type]


def test_the_default_budget_must_be_within_the_maximum() -> None:
    assert Settings().max_budget_limit == 10000
    assert Settings(budget_limit=Decimal(10000)).budget_limit == 10000
    with pytest.raises(InvalidSettings, match=r"CLIPCHAT_BUDGET_LIMIT \(2000\) is above "
                                              r"CLIPCHAT_MAX_BUDGET_LIMIT \(1000\)"):
        Settings(budget_limit=Decimal(2000), max_budget_limit=Decimal(1000))


@pytest.mark.parametrize(("field", "value"), [("x264_preset", "ultrafast"), ("x264_preset", "Fast"),
                                              ("encoder", "nvenc"), ("encoder", "h265")])
def test_media_settings_are_closed_sets(field: str, value: str) -> None:
    # ultrafast would start and then fail every composition; refuse it at start instead.
    with pytest.raises(ValidationError, match=field):
        Settings(**{field: value})


def test_the_composer_knows_every_preset_the_settings_accept() -> None:
    from clipchat.media.encoder import video_encoder_args

    for preset in ("superfast", "veryfast", "medium", "placebo"):
        assert preset in video_encoder_args("libx264", x264_preset=preset)
