"""``clipchat regenerate JOB CLIP …``: one clip, several ("1,2,3") or "all"."""

from __future__ import annotations

import pytest

from launcher.cli import CliError, _clip_selection


@pytest.mark.parametrize(("text", "selection"), [
    ("2", 2), ("0", 0), ("1,2,3", [1, 2, 3]), (" 3, 1 ", [3, 1]), ("4,", None), ("all", "all"), ("ALL", "all")])
def test_a_clip_selection_is_one_index_a_list_or_all(text: str, selection: object) -> None:
    if selection is None:
        with pytest.raises(CliError):
            _clip_selection(text)
    else:
        assert _clip_selection(text) == selection


@pytest.mark.parametrize(("text", "message"), [
    ("x", 'a list such as "1,2,3" or "all"'), ("1,a", "not '1,a'"), ("-1", "0 or more"), ("1,1", "each clip once")])
def test_a_bad_clip_selection_is_one_readable_line(text: str, message: str) -> None:
    with pytest.raises(CliError, match=message):
        _clip_selection(text)
