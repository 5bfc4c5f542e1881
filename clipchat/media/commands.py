"""ffmpeg argument lists built with ffmpeg-python, typed, and guarded where it would garble them.

ffmpeg-python (``import ffmpeg``) builds a graph of inputs, filters and outputs and writes the
argument list for it (``get_args``): each input with its options, one ``-filter_complex`` with a
label on every link (``[0:v:0]fps=…[s0];[s0]trim=…[s1]`` is the same graph as the chain
``[0:v:0]fps=…,trim=…``), and each output with a ``-map`` per stream. Nothing is run through
it: ``FfmpegRunner.run`` runs the list, adding its global options and the protocol whitelist.

The package has no type hints, so its streams are ``Stream`` (``Any``) here, and these habits
of it are guarded:

- **Filter arguments.** It escapes ``\\ ' = :`` in each argument, then ``\\ ' [ ] , ;`` in the
  whole filter, so an argument holding any of those would reach ffmpeg escaped twice, that is
  wrongly. ``apply`` takes only plain tokens (names, numbers, expressions such as
  ``(ow-iw)/2``) and raises ``ValueError`` for anything else.
- **Options.** Keyword arguments become ``-key value`` sorted by key (``None`` gives a bare flag
  such as ``-an``), so an option appears at most once per input or output; ``options`` turns an
  option list (the encoder's) into keywords and refuses a repeated option or a flag without a
  value, and ``merged`` refuses two sources setting one option. An input's ``video_size`` must
  be a (width, height) pair (from "1920x1080" it would write "1x9"); an output's is never used,
  as the package reads it through ``collections.Iterable``, gone since Python 3.10.
- **Identical inputs.** Nodes are compared by value: two inputs of one file with the same
  options become one input, whose decoded frames feed both chains (the same frames either way).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

import ffmpeg

# An ffmpeg-python stream: an input's stream, a filter's output, or an output to be written.
Stream: TypeAlias = Any
Option: TypeAlias = str | int | None

# What a filter argument may hold: nothing ffmpeg-python escapes, no quotes, no spaces.
_PLAIN = re.compile(r"[A-Za-z0-9_.+*/()-]+")


def apply(stream: Stream, name: str, *args: str | int, **kwargs: str | int) -> Stream:
    """``stream`` through the filter ``name`` with these arguments (positional ones first).

    Raises ``ValueError`` for an argument ffmpeg-python would not pass on intact.
    """
    for value in (name, *args, *kwargs, *kwargs.values()):
        if not _PLAIN.fullmatch(str(value)):
            raise ValueError(f"Filter argument {value!r} would be escaped wrongly")
    return ffmpeg.filter(stream, name, *args, **kwargs)


def options(args: Sequence[str]) -> dict[str, Option]:
    """An option list (``["-c:v", "libx264", "-crf", "20"]``) as ffmpeg-python keywords.

    Raises ``ValueError`` for a repeated option or an option without a value.
    """
    if len(args) % 2 or not all(flag.startswith("-") for flag in args[::2]):
        raise ValueError(f"Not a list of options with values: {list(args)!r}")
    keys = [flag[1:] for flag in args[::2]]
    if len(set(keys)) != len(keys):
        raise ValueError(f"An option is given twice: {list(args)!r}")
    return dict(zip(keys, args[1::2], strict=True))


def merged(*groups: Mapping[str, Option]) -> dict[str, Option]:
    """One output's (or input's) options from several groups; raises ``ValueError`` on an overlap."""
    result: dict[str, Option] = {}
    for group in groups:
        overlap = result.keys() & group.keys()
        if overlap:
            raise ValueError(f"Options given twice: {sorted(overlap)}")
        result.update(group)
    return result


def command(*outputs: Stream) -> list[str]:
    """The argument list writing ``outputs`` (from ``ffmpeg.output``), in order, in one run."""
    spec = outputs[0] if len(outputs) == 1 else ffmpeg.merge_outputs(*outputs)
    return [str(arg) for arg in ffmpeg.get_args(spec)]
