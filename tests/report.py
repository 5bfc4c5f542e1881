"""What the fault and load suites share: one line of figures per scenario, printed as a table.

A suite keeps a ``SuiteReport`` of its own record type (a ``SuiteRecord`` with its figures); its
fixture hands a scenario its record, its ``pytest_runtest_makereport`` hook passes each report to
``on_report`` (which sets the record's result), and its ``pytest_terminal_summary`` prints
``finished``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import pytest


@dataclass
class SuiteRecord:
    """One scenario's line: its name and how it ended ("not run" until it did)."""

    test: str
    result: str = "not run"


R = TypeVar("R", bound=SuiteRecord)


class SuiteReport(Generic[R]):
    """The records of the scenarios under ``folder``, kept in the session's stash."""

    def __init__(self, folder: Path, make: Callable[[str], R]) -> None:
        self._folder = folder
        self._make = make
        self._key = pytest.StashKey[dict[str, R]]()

    def _records(self, config: pytest.Config) -> dict[str, R]:
        return config.stash.setdefault(self._key, {})

    def record(self, config: pytest.Config, nodeid: str, name: str) -> R:
        """The scenario's record, made on first use."""
        return self._records(config).setdefault(nodeid, self._make(name))

    def on_report(self, item: pytest.Item, report: pytest.TestReport) -> R | None:
        """Set the scenario's result from a phase's report; None for a test outside the suite."""
        if self._folder not in Path(item.path).parents:
            return None
        record = self.record(item.config, item.nodeid, item.name)
        if report.when == "call" or (report.when == "setup" and not report.passed):
            record.result = "error" if report.when == "setup" and report.failed else report.outcome
        return record

    def print_table(self, reporter: pytest.TerminalReporter, config: pytest.Config, title: str,
                    heading: str, cells: Callable[[R], str]) -> list[R]:
        """Print the finished scenarios as a table under ``title``: test, result, then ``heading``
        over ``cells(record)``. Returns the records printed (none: nothing is printed)."""
        records = self.finished(config)
        if records:
            reporter.section(title)
            width = max(len("test"), *(len(r.test) for r in records))
            reporter.write_line(f"{'test':<{width}}  {'result':<7}  {heading}")
            for r in records:
                reporter.write_line(f"{r.test:<{width}}  {r.result:<7}  {cells(r)}")
        return records

    def finished(self, config: pytest.Config) -> list[R]:
        """The records of the scenarios that ran, in the order they ran."""
        return [r for r in self._records(config).values() if r.result != "not run"]
