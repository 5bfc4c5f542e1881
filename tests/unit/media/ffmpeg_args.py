"""Read back the argument lists ffmpeg-python writes: inputs, filter links, outputs.

ffmpeg-python writes every filter as its own link (``[s0]trim=…[s1]``); ``chain`` follows the
links back from an output's label, so a test states a line of filters the way ffmpeg runs it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LINK = re.compile(r"((?:\[[^\]]+\])*)([^\[\]]+)((?:\[[^\]]+\])*)")
_LABEL = re.compile(r"\[([^\]]+)\]")
_BARE_FLAGS = {"-an", "-vn", "-sn", "-dn"}


@dataclass(frozen=True)
class Link:
    inputs: tuple[str, ...]
    filter: str
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class Input:
    path: str
    options: dict[str, str]


@dataclass(frozen=True)
class Output:
    path: str
    maps: list[str]
    options: dict[str, str | None]  # None: a flag without a value (-an)


def links(args: list[str]) -> list[Link]:
    """The ``-filter_complex`` graph of ``args`` as its links."""
    found = []
    for spec in args[args.index("-filter_complex") + 1].split(";"):
        match = _LINK.fullmatch(spec)
        assert match, spec
        found.append(Link(tuple(_LABEL.findall(match[1])), match[2], tuple(_LABEL.findall(match[3]))))
    return found


def chain(args: list[str], label: str) -> tuple[str, list[str]]:
    """Where the line of filters leading to ``label`` starts, and its filters in order.

    It starts at an input stream (``0:v:0``), or at the output of a filter with several inputs
    (named then as ``"*"`` and that filter: ``"*xfade=…"``).
    """
    made_by = {output: link for link in links(args) for output in link.outputs}
    filters: list[str] = []
    while label in made_by:
        link = made_by[label]
        if len(link.inputs) != 1:
            return f"*{link.filter}", filters
        filters.insert(0, link.filter)
        label = link.inputs[0]
    return label, filters


def producer(args: list[str], label: str) -> Link:
    """The link whose output is ``label``."""
    return next(link for link in links(args) if label in link.outputs)


def inputs(args: list[str]) -> list[Input]:
    """Each input in order, with its options (all of them take a value here)."""
    return _split(args)[0]


def outputs(args: list[str]) -> list[Output]:
    """Each output in order: its file, its ``-map`` values and its other options."""
    return _split(args)[1]


def _split(args: list[str]) -> tuple[list[Input], list[Output]]:
    found_inputs = []
    at = start = 0
    while "-i" in args[at:]:
        at = args.index("-i", at)
        part = args[start:at]
        assert len(part) % 2 == 0, part
        found_inputs.append(Input(args[at + 1], {f.lstrip("-"): v for f, v in zip(part[::2], part[1::2],
                                                                                     strict=True)}))
        at = start = at + 2
    if args[at:at + 1] == ["-filter_complex"]:
        at += 2
    found_outputs = []
    while at < len(args):
        maps: list[str] = []
        options: dict[str, str | None] = {}
        while args[at] != "-" and args[at].startswith("-"):
            flag = args[at]
            if flag in _BARE_FLAGS:
                options[flag[1:]] = None
                at += 1
                continue
            if flag == "-map":
                maps.append(args[at + 1])
            else:
                assert flag[1:] not in options, flag
                options[flag[1:]] = args[at + 1]
            at += 2
        found_outputs.append(Output(args[at], maps, options))
        at += 1
    return found_inputs, found_outputs
