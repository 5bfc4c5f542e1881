"""The thumbnail command, built with ffmpeg-python."""

from __future__ import annotations

from pathlib import Path

from clipchat.media.thumbnail import thumbnail_command
from tests.unit.media.ffmpeg_args import chain, inputs, outputs


def test_one_small_jpeg_of_the_picture_at_the_given_time() -> None:
    args = thumbnail_command(Path("/work/clip.mp4"), 0.75, Path("/work/thumb.jpg"))

    assert [(i.path, i.options) for i in inputs(args)] == [("/work/clip.mp4", {"ss": "0.750"})]
    [out] = outputs(args)
    assert chain(args, out.maps[0].strip("[]")) == ("0:v:0", ["scale=320:-2", "format=yuvj420p"])
    assert (out.path, out.options) == ("/work/thumb.jpg", {"f": "image2", "frames:v": "1", "q:v": "4",
                                                            "update": "1"})
