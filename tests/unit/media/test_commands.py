"""The typed layer over ffmpeg-python: what it refuses, and the argument lists it writes."""

from __future__ import annotations

import ffmpeg
import pytest

from clipchat.media.commands import apply, command, merged, options
from tests.unit.media.ffmpeg_args import chain, inputs, outputs


def test_an_option_list_becomes_keywords() -> None:
    assert options(["-c:v", "libx264", "-crf", "20", "-map_metadata", "-1"]) == {
        "c:v": "libx264", "crf": "20", "map_metadata": "-1"}


@pytest.mark.parametrize("args", [
    ["-crf"],  # no value
    ["-crf", "20", "-crf", "22"],  # twice: ffmpeg-python's keywords could keep only one
    ["crf", "20"],  # not an option
])
def test_an_option_list_it_cannot_keep_is_refused(args: list[str]) -> None:
    with pytest.raises(ValueError):
        options(args)


def test_options_from_several_groups_may_not_overlap() -> None:
    assert merged({"an": None}, {"f": "mp4"}) == {"an": None, "f": "mp4"}
    with pytest.raises(ValueError, match="pix_fmt"):
        merged({"pix_fmt": "yuv420p"}, {"pix_fmt": "yuv444p"})


@pytest.mark.parametrize("value", ["a:b", "x=1", "a,b", "[s0]", "it's", "semi;colon", "back\\slash", "two words"])
def test_a_filter_argument_it_would_escape_wrongly_is_refused(value: str) -> None:
    stream = ffmpeg.input("/work/clip")["v:0"]
    with pytest.raises(ValueError, match="escaped wrongly"):
        apply(stream, "scale", value)
    with pytest.raises(ValueError, match="escaped wrongly"):
        apply(stream, "scale", w=value)


def test_one_command_writes_several_outputs_in_order_from_one_graph() -> None:
    video = apply(ffmpeg.input("/work/clip", t="2.000000")["v:0"], "fps", 30, start_time=0)
    split = video.split()
    args = command(ffmpeg.output(apply(split[0], "trim", end_frame=10), "/work/a.mp4", an=None, format="mp4"),
                   ffmpeg.output(apply(split[1], "trim", start_frame=10), "/work/b.yuv", format="rawvideo"))

    assert "-y" not in args  # the runner adds its own global options
    assert [(i.path, i.options) for i in inputs(args)] == [("/work/clip", {"t": "2.000000"})]
    first, second = outputs(args)
    assert (first.path, first.options) == ("/work/a.mp4", {"f": "mp4", "an": None})
    assert (second.path, second.options) == ("/work/b.yuv", {"f": "rawvideo"})
    assert chain(args, first.maps[0].strip("[]")) == ("0:v:0", ["fps=30:start_time=0", "split=2", "trim=end_frame=10"])
    assert chain(args, second.maps[0].strip("[]")) == ("0:v:0", ["fps=30:start_time=0", "split=2",
                                                                  "trim=start_frame=10"])
