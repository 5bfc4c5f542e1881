"""The gateway process collects its young garbage less often; the older generations keep theirs."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from gateway.collector import YOUNG_GENERATION_THRESHOLD, tune_garbage_collector


@pytest.fixture
def thresholds() -> Iterator[tuple[int, int, int]]:
    before = gc.get_threshold()
    yield before
    gc.set_threshold(*before)


def test_only_the_young_generation_threshold_is_raised(thresholds: tuple[int, int, int]) -> None:
    tune_garbage_collector()
    assert gc.get_threshold() == (YOUNG_GENERATION_THRESHOLD, thresholds[1], thresholds[2])
    assert gc.isenabled()
