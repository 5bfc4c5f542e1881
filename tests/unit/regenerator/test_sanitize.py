"""``sanitize_instruction``: one clean line of visible text, or a readable ``InvalidInput``."""

from __future__ import annotations

import pytest

from clipchat.errors import InvalidInput
from services.regenerator.rewrite import sanitize_instruction


def test_plain_text_is_unchanged() -> None:
    assert sanitize_instruction("make it nighttime", 100) == "make it nighttime"


@pytest.mark.parametrize(("raw", "clean"), [
    ("  make it   nighttime  ", "make it nighttime"),
    ("make it\nnighttime\r\n", "make it nighttime"),
    ("slower,\tmore rain", "slower, more rain"),
    ("make\x00 it\x07 night\x1b[31m", "make it night[31m"),
    ("night\u200b\u200dtime", "nighttime"),  # zero-width characters
    ("\u202eemit thgin\u202c", "emit thgin"),  # bidi override characters
    ("\ufeffmake it night", "make it night"),  # byte order mark
    ("rain\u2028snow\u00a0fog", "rain snow fog"),  # line separator, no-break space
    ("cafe\u0301 at night", "café at night"),  # composed to NFC
    ("anime style 🌙 with a dancer", "anime style 🌙 with a dancer"),
    ("night\ud800", "night"),  # a lone surrogate cannot even be sent as UTF-8
])
def test_cleans(raw: str, clean: str) -> None:
    assert sanitize_instruction(raw, 100) == clean


@pytest.mark.parametrize("raw", ["", "   ", "\n\t\r", "\x00\x01\x02", "\u200b\u200c"])
def test_empty_is_refused_with_a_readable_message(raw: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        sanitize_instruction(raw, 100)
    assert caught.value.code == "empty_instruction"
    assert "nighttime" in caught.value.message  # shows an example of what to type
    assert caught.value.retryable is False


def test_too_long_is_refused_with_the_limit_in_the_message() -> None:
    with pytest.raises(InvalidInput) as caught:
        sanitize_instruction("a" * 10_000, 2000)
    assert caught.value.code == "instruction_too_long"
    assert caught.value.message == ("The instruction is too long (10,000 characters). "
                                    "Keep it under 2,000 characters.")


def test_the_limit_counts_the_cleaned_text() -> None:
    assert sanitize_instruction("night" + " " * 500, 5) == "night"
    assert sanitize_instruction("a" * 2000, 2000) == "a" * 2000
    with pytest.raises(InvalidInput):
        sanitize_instruction("a" * 2001, 2000)


def test_max_chars_must_be_positive() -> None:
    with pytest.raises(ValueError):
        sanitize_instruction("night", 0)
