"""``make bench``: run every benchmark in ``BENCHES`` and print one table of their rows.

Each benchmark is a function taking nothing and returning a list of ``Row``. To add one (for
example the embedded end-to-end regenerate benchmark), write it in its own module and append it
to ``BENCHES``. Outputs go under ``bench-out/`` (git-ignored).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from bench import composer, regenerate
from bench.table import Row, print_rows

BENCHES: list[Callable[[], list[Row]]] = [
    composer.run,
    regenerate.run,
]


def main() -> int:
    rows: list[Row] = []
    for bench in BENCHES:
        rows += bench()
    print_rows(rows)
    return 1 if any(row.ok is False for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
