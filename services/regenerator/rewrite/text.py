"""Text clean-up shared by the rewriters."""

from __future__ import annotations

import unicodedata

# Control, invisible formatting (zero-width, bidi overrides) and lone surrogates, which cannot
# even be encoded as UTF-8 for the provider.
_INVISIBLE = frozenset({"Cc", "Cf", "Cs"})


def clean_text(text: str) -> str:
    """One line of visible text: NFC, invisible characters removed, whitespace collapsed."""
    text = unicodedata.normalize("NFC", text)
    kept = (" " if ch.isspace() else ch for ch in text
            if ch.isspace() or unicodedata.category(ch) not in _INVISIBLE)
    return " ".join("".join(kept).split())


def truncate_words(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, at a word boundary where there is one."""
    if limit <= 0:
        return ""
    if len(text) <= limit:
        return text
    cut = text[:limit]
    head = cut.rsplit(" ", 1)[0] if " " in cut else cut
    return head.rstrip(" ,;:")
