"""One row of benchmark output, and printing them as a table."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Row:
    bench: str  # which benchmark, e.g. "composer"
    metric: str
    value: str
    target: str = ""  # the acceptance target, when there is one
    ok: bool | None = None  # whether the target is met; None without a target


def print_rows(rows: Sequence[Row]) -> None:
    """Print ``rows`` as an aligned table, with a verdict column where a row has a target."""
    header = Row("bench", "metric", "value", "target")
    table = [header, *rows]
    widths = [max(len(getattr(row, name)) for row in table) for name in ("bench", "metric", "value", "target")]
    for row in table:
        verdict = "" if row.ok is None else ("ok" if row.ok else "MISSED")
        if row is header:
            verdict = "result"
        cells = [row.bench, row.metric, row.value, row.target]
        print("  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)) + "  " + verdict)
