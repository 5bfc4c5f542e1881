"""The template rewriter: common, fully understood instructions applied with a fixed table."""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from services.regenerator.rewrite.base import REFERENCE, RewriteRequest, RewriteResult
from services.regenerator.rewrite.template_table import (
    CATEGORIES,
    FILLER_WORDS,
    MILD_WORDS,
    NEGATION_WORDS,
    STRONG_WORDS,
)
from services.regenerator.rewrite.text import clean_text

MILD, NORMAL, STRONG = 0, 1, 2
# What "like clip 2" takes from clip 2's prompt: its look, not its action or camera.
STYLE_CATEGORIES = ("time of day", "weather", "season", "color palette", "visual style", "mood")


@dataclass(frozen=True)
class _Option:
    """One choice within a category ("night" in "time of day").

    ``aliases`` are what a person may type; ``phrases`` what goes into the prompt at mild, normal
    and strong intensity; ``markers`` the prompt terms that mean this option is already there
    (the phrases' comma-separated pieces are added to them); ``conflicts`` options of other
    categories whose terms this one removes (night removes "sunny"). ``adjectives`` are markers
    that describe a noun ("a *rainy* street"): where one is replaced, this option's ``adjective``
    takes its place ("a snowy street") instead of leaving "a street".
    """

    key: str
    category: str
    aliases: tuple[str, ...]
    phrases: tuple[str, str, str]
    labels: tuple[str, str, str]
    markers: tuple[str, ...]
    adjectives: frozenset[str] = frozenset()
    adjective: str | None = None
    conflicts: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Category:
    name: str
    additive: bool  # summary says "added rain" rather than "set weather to rain"
    options: tuple[_Option, ...]


def _option(category: str, entry: dict[str, Any]) -> _Option:
    """An option of ``category`` built from its table entry (see ``template_table``)."""
    key, phrase = entry["key"], entry["phrase"]
    normal_label = entry.get("label") or key.replace("_", " ")
    mild_phrase, mild_label = entry.get("mild") or (phrase, normal_label)
    strong_phrase, strong_label = entry.get("strong") or (phrase, normal_label)
    phrases = (mild_phrase, phrase, strong_phrase)
    pieces = {piece.strip() for p in phrases for piece in p.split(",")}
    adjective_list = [_term_key(a) for a in entry.get("adjectives", ())]
    all_markers = set(entry.get("markers", ())) | pieces | set(adjective_list)
    return _Option(key=key, category=category, aliases=tuple(entry["aliases"]),
                   phrases=phrases, labels=(mild_label, normal_label, strong_label),
                   markers=tuple(sorted(all_markers)), adjectives=frozenset(adjective_list),
                   adjective=adjective_list[0] if adjective_list else None,
                   conflicts=tuple(entry.get("conflicts", ())))


# Words after which a negation no longer applies ("no rain but make it night").
_RESETS = frozenset({"make", "add", "turn", "change", "set", "give", "but", "then", "use", "apply"})
_CONNECTORS = frozenset({"and", "or", "nor"})
_SEPARATORS = frozenset(",.;:!?")
_MORE = "more"  # one step stronger than the degree before it (see _parse_instruction)


@dataclass(frozen=True)
class _Entry:
    kind: str  # option | level | more | negation | filler
    option: _Option | None = None
    level: int = NORMAL


@dataclass(frozen=True)
class _Edit:
    option: _Option
    positive: bool
    level: int


class TemplateRewriter:
    """Applies common instructions to the prompt with a fixed table, for free and deterministically.

    The table has mutually exclusive options per category (time of day, weather, season, speed,
    color palette, camera movement, framing, visual style, mood). Choosing an option removes every
    term of its category (and of the options it conflicts with, like "sunny" for night) from the
    prompt and appends the option's phrasing at the requested intensity ("a bit warmer", "much
    slower", "more rain"). Negations ("no rain", "remove the fog", "without snow", "night instead
    of day") remove the option's terms.

    The rule for "recognized": ``rewrite`` handles an instruction only when *every* word in it is
    accounted for (an option's alias, an intensity, a negation, or a filler word such as "make",
    "it", "please", "style") and the changes are consistent. It returns ``None``, leaving the
    instruction to the next rewriter, when any other word appears ("anime style, keep the same
    dancer"), when nothing is recognized, when two options of one category are asked for at once
    ("night and sunset"), when an option is both asked for and negated, or when the result would
    be longer than ``max_prompt_chars``. It never raises for any input.
    """

    name = "template"

    def __init__(self, max_prompt_chars: int = 1000) -> None:
        self._max_prompt_chars = max_prompt_chars

    async def rewrite(self, req: RewriteRequest) -> RewriteResult | None:
        reference = REFERENCE.search(req.instruction) if req.reference_prompt is not None else None
        if reference is not None:
            edits = _match_reference(req.instruction, reference, req.original_prompt, req.reference_prompt or "")
            lead = f"matched the look of clip {reference.group(1)}: "
        else:
            edits, lead = _parse_instruction(req.instruction), ""
        if edits is None:
            return None
        prompt, notes = _apply_edits(req.original_prompt, edits)
        if len(prompt) > self._max_prompt_chars:
            return None
        summary = lead + "; ".join(notes)
        return RewriteResult(prompt=prompt, summary=summary[:1].upper() + summary[1:] + ".",
                             cost=Decimal("0"), rewriter=self.name)


def _match_reference(instruction: str, reference: re.Match[str], prompt: str, reference_prompt: str
                     ) -> list[_Edit] | None:
    """The edits that give ``prompt`` the look of ``reference_prompt`` ("like clip 2"): for each
    style category, the option the reference mentions first, unless ``prompt`` has it already;
    with the rest of the instruction's own edits ("like clip 2 but with snow"), which win in their
    category. ``None`` when the rest holds words the table does not know or nothing would change."""
    rest = re.sub(r"\bbut\b", " ", f"{instruction[:reference.start()]} {instruction[reference.end():]}",
                  flags=re.IGNORECASE)
    lexicon, _ = _lexicon()
    only_filler = all(w in _SEPARATORS or w in _RESETS or lexicon.get((w,), _Entry("?")).kind == "filler"
                      for w in _words(rest))
    own = [] if only_filler else _parse_instruction(rest)
    if own is None:
        return None
    taken = {e.option.category for e in own if e.positive}
    borrowed = []
    for category in _categories():
        if category.name not in STYLE_CATEGORIES or category.name in taken:
            continue
        found = [(match.start(), option) for option in category.options
                 if (match := _pattern_for(option.markers).search(reference_prompt)) is not None]
        if found:
            option = min(found, key=lambda pair: pair[0])[1]
            if not _mentions(prompt, option.markers):
                borrowed.append(_Edit(option, True, NORMAL))
    return _resolve(borrowed + own)


def _parse_instruction(instruction: str) -> list[_Edit] | None:
    """The edits an instruction asks for, in the order it names them; ``None`` when it holds a
    word the table does not know or asks for contradictory changes."""
    words = _words(instruction)
    lexicon, longest = _lexicon()
    edits: list[_Edit] = []
    level: int | None = None
    negating = False
    negated: _Option | None = None  # the option just negated, which "or"/"and" may extend
    connector: str | None = None
    i = 0
    while i < len(words):
        if words[i] in _SEPARATORS:
            level, negating, negated, connector = None, False, None, None
            i += 1
            continue
        for size in range(min(longest, len(words) - i), 0, -1):
            entry = lexicon.get(tuple(words[i:i + size]))
            if entry is not None:
                break
        else:
            return None
        word, i = words[i], i + size
        if entry.kind == "option":
            assert entry.option is not None
            # "no rain or snow" negates both; "no rain and slower" only the rain.
            extends = (negated is not None and connector is not None
                       and (connector != "and" or entry.option.category == negated.category))
            positive = not (negating or extends)
            edits.append(_Edit(entry.option, positive, NORMAL if level is None or not positive else level))
            level, negating, connector = None, False, None
            negated = None if positive else entry.option
        elif entry.kind == "level":
            level = entry.level
        elif entry.kind == "more":
            # "more" raises whatever degree came before it by one step: "more rain" is heavy rain,
            # "a bit more rain" ordinary rain, "much more rain" still heavy.
            level = STRONG if level is None else min(STRONG, level + 1)
        elif entry.kind == "negation":
            negating, negated, connector = True, None, None
        elif word in _RESETS and size == 1:
            negating, negated, connector = False, None, None
        elif word in _CONNECTORS and size == 1 and negated is not None:
            connector = word
    return _resolve(edits)


def _resolve(edits: list[_Edit]) -> list[_Edit] | None:
    """Merge repeats and check that the edits can all apply; ``None`` when they contradict."""
    merged: dict[tuple[str, bool], _Edit] = {}
    for edit in edits:
        key = (edit.option.key, edit.positive)
        earlier = merged.get(key)
        if earlier is None or edit.level != NORMAL:  # "rain, more rain": the stated degree wins
            merged[key] = edit
    if not merged:
        return None
    positives = [e for e in merged.values() if e.positive]
    wanted = {e.option.key for e in positives}
    categories = [e.option.category for e in positives]
    if len(set(categories)) != len(categories):
        return None
    if any(e.option.key in wanted for e in merged.values() if not e.positive):
        return None
    if any(conflict in wanted for e in positives for conflict in e.option.conflicts):
        return None
    implied = set(categories) | {c for e in positives for c in e.option.conflicts}
    return [e for e in merged.values()
            if e.positive or (e.option.category not in implied and e.option.key not in implied)]


def _apply_edits(prompt: str, edits: list[_Edit]) -> tuple[str, list[str]]:
    """The edited prompt and one note per edit for the summary."""
    categories = {c.name: c for c in _categories()}
    by_key = {o.key: o for c in categories.values() for o in c.options}
    text = clean_text(prompt)
    additions: list[str] = []
    notes: list[str] = []
    for edit in edits:
        option = edit.option
        category = categories[option.category]
        if edit.positive:
            present = any(_mentions(text, o.markers) for o in category.options)
            replaced = [*category.options, *(by_key[key] for key in option.conflicts)]
            text = _strip_terms(text, [m for o in replaced for m in o.markers],
                                adjectives=frozenset().union(*(o.adjectives for o in replaced)),
                                substitute=option.adjective)
            additions.append(option.phrases[edit.level])
            label = option.labels[edit.level]
            if present:
                notes.append(f"changed {category.name} to {label}")
            elif category.additive:
                notes.append(f"added {label}")
            else:
                notes.append(f"set {category.name} to {label}")
        elif _mentions(text, option.markers):
            text = _strip_terms(text, option.markers)
            notes.append(f"removed {option.labels[NORMAL]}")
        else:
            notes.append(f"there was no {option.labels[NORMAL]} to remove")
    if text != clean_text(prompt):
        text = _fix_articles(_tidy(text), prompt)
    parts = [text.rstrip(" .")] if text.rstrip(" .") else []
    for piece in (p.strip() for addition in additions for p in addition.split(",")):
        # Two changes may bring the same words ("black and white" from film noir and monochrome).
        if not any(_mentions(part, [piece]) for part in parts):
            parts.append(piece)
    return ", ".join(parts), notes


@functools.cache
def _categories() -> tuple[_Category, ...]:
    return tuple(_Category(c["name"], c["additive"], tuple(_option(c["name"], o) for o in c["options"]))
                 for c in CATEGORIES)


@functools.cache
def _lexicon() -> tuple[dict[tuple[str, ...], _Entry], int]:
    """Every phrase the parser knows, by its words, and the longest phrase's length.

    Raises ``RuntimeError`` when a phrase means two things, so the table stays unambiguous.
    """
    lexicon: dict[tuple[str, ...], _Entry] = {}

    def add(phrase: str, entry: _Entry) -> None:
        key = tuple(_words(phrase))
        if key in lexicon and lexicon[key] != entry:
            raise RuntimeError(f"template phrase {phrase!r} is ambiguous")
        lexicon[key] = entry

    for word in FILLER_WORDS:
        add(word, _Entry("filler"))
    for phrase in NEGATION_WORDS:
        add(phrase, _Entry("negation"))
    for phrase in STRONG_WORDS:
        add(phrase, _Entry("level", level=STRONG))
    for phrase in MILD_WORDS:
        add(phrase, _Entry("level", level=MILD))
    add(_MORE, _Entry("more"))
    for category in _categories():
        for option in category.options:
            for alias in option.aliases:
                if tuple(_words(alias)) in lexicon and lexicon[tuple(_words(alias))].kind == "filler":
                    raise RuntimeError(f"template alias {alias!r} is also a filler word")
                add(alias, _Entry("option", option))
    return lexicon, max(len(key) for key in lexicon)


def _words(text: str) -> list[str]:
    """Lower-case words and sentence punctuation; hyphens and slashes split words."""
    text = unicodedata.normalize("NFKC", text).lower().replace("’", "'").replace("‘", "'")
    text = re.sub(r"\bb\s*&\s*w\b", " black and white ", text)
    text = re.sub(r"[-_/]", " ", text.replace("&", " and ").replace("+", " and "))
    return re.findall(r"[^\W_]+(?:'[^\W_]+)?|[,.;:!?]", text)


# What may precede a removed term and goes with it when the term ends a phrase:
# "on a sunny afternoon" goes whole, but "on a rainy street" only loses "rainy".
_LEAD = (r"(?P<lead>\b(?:(?:at|in|on|during|under|with|into|by|amid|beneath|through)\s+"
         r"(?:(?:an?|the)\s+)?|(?:an?|the)\s+))?")
_PHRASE_END = re.compile(r"\s*(?:$|[,.;:!?)]|(?:and|or|with|in|on|at|under|near|by|while|as|during|over|"
                         r"through|from|for|beneath|against)\b)", re.IGNORECASE)


@functools.lru_cache(maxsize=512)
def _terms_pattern(terms: tuple[str, ...]) -> re.Pattern[str]:
    alternatives = "|".join(r"[\s-]+".join(re.escape(part) for part in re.split(r"[\s-]+", term))
                            for term in terms)
    return re.compile(_LEAD + r"(?<![\w-])(?P<term>" + alternatives + r")(?![\w-])", re.IGNORECASE)


def _pattern_for(terms: Iterable[str]) -> re.Pattern[str]:
    # Longest first, so "sunny afternoon" is removed whole before "sunny" could match.
    return _terms_pattern(tuple(sorted(set(terms), key=lambda t: (-len(t), t))))


def _mentions(text: str, terms: Iterable[str]) -> bool:
    return _pattern_for(terms).search(text) is not None


def _strip_terms(text: str, terms: Iterable[str], *, adjectives: frozenset[str] = frozenset(),
                 substitute: str | None = None) -> str:
    """``text`` without ``terms``; one of ``adjectives`` that describes a following noun becomes
    ``substitute`` when given ("a rainy street" → "a snowy street")."""
    def replace(match: re.Match[str]) -> str:
        if _PHRASE_END.match(match.string, match.end()):
            return ""
        lead = match.group("lead") or ""
        if substitute and _term_key(match.group("term")) in adjectives:
            return f"{lead}{substitute}"
        return lead

    return _pattern_for(terms).sub(replace, text)


def _term_key(term: str) -> str:
    return " ".join(re.split(r"[\s-]+", term.strip().lower()))


def _tidy(text: str) -> str:
    """Remove the debris that removing terms leaves: empty list items, dangling "and"/"with"."""
    text = re.sub(r"\(\s*\)", " ", text)
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)
    text = re.sub(r"\b(and|or|with)(?:\s+(?:and|or|with)\b)+", r"\1", text, flags=re.IGNORECASE)
    text = re.sub(r"(^|[,.;:!?])\s*(?:and|or|with)\b\s*", r"\1 ", text, flags=re.IGNORECASE)
    text = re.sub(r"\s*\b(?:and|or|with)\s*(?=[,.;:!?]|$)", "", text, flags=re.IGNORECASE)
    text = re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", text)
    text = re.sub(r"[,;:]\s*([.!?])", r"\1", text)
    text = re.sub(r"([.!?])\s*[,;:]", r"\1", text)
    text = re.sub(r"\s+", " ", text).strip(" ,;:")
    return re.sub(r"^[.!?]+\s*", "", text)


def _fix_articles(text: str, original: str) -> str:
    """Fix "a"/"an" where a removal changed the next word ("on a sunny afternoon" minus "sunny");
    articles the original already had are left as written."""
    def pairs(s: str) -> set[str]:
        return {f"{a.lower()} {w.lower()}" for a, w in re.findall(r"\b(an?)\s+(\w+)", s, re.IGNORECASE)}

    before = pairs(original)

    def replace(match: re.Match[str]) -> str:
        article, word = match.group(1), match.group(2)
        if f"{article.lower()} {word.lower()}" in before:
            return match.group(0)
        vowel = word[0].lower() in "aeio"
        if article.lower() == "a" and vowel:
            return f"{article}n {word}"
        if article.lower() == "an" and not vowel and word[0].lower() not in "hu":
            return f"{article[0]} {word}"
        return match.group(0)

    return re.sub(r"\b(an?)\s+(\w+)", replace, text, flags=re.IGNORECASE)
