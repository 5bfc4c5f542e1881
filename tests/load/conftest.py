"""The load suite's rig and its report.

One rig (``tests.load.rig``) serves every scenario of the session. Each scenario records its
figures through the ``load`` fixture; the end of the session prints them with each test's result as
a table. The figures are reported, never asserted: the tests assert what must hold at any speed
(every event to every watcher in order, one 202 and 409s for the rest, no 5xx).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import ROOT
from tests.load.rig import LoadRig, start_load_rig
from tests.processes import spawn, stop_process
from tests.report import SuiteRecord, SuiteReport

HERE = Path(__file__).parent


@dataclass
class LoadRecord(SuiteRecord):
    """One scenario's line in the report."""

    figures: dict[str, str] = field(default_factory=dict)

    def add(self, **figures: object) -> None:
        for name, value in figures.items():
            self.figures[name] = f"{value:.{1 if abs(value) >= 10 else 2}f}" if isinstance(value, float) else str(value)


REPORT = SuiteReport(HERE, lambda name: LoadRecord(test=name))


@pytest.fixture
def load(request: pytest.FixtureRequest) -> LoadRecord:
    """This scenario's line in the report."""
    return REPORT.record(request.config, request.node.nodeid, request.node.name)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, None, None]:
    outcome = yield
    REPORT.on_report(item, outcome.get_result())


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int,
                            config: pytest.Config) -> None:
    REPORT.print_table(terminalreporter, config, "load suite", "figures",
                       lambda r: ", ".join(f"{name} {value}" for name, value in r.figures.items()) or "-")


@pytest.fixture(scope="session")
def load_rig(tmp_path_factory: pytest.TempPathFactory, postgres_admin_dsn: str) -> Iterator[LoadRig]:
    yield from start_load_rig(tmp_path_factory.mktemp("load"), postgres_admin_dsn)


class LoadClient:
    """``python -m tests.load.client`` in its own process (see that module)."""

    def __init__(self, scenario: str, **args: Any) -> None:
        self.proc = spawn([sys.executable, "-m", "tests.load.client", scenario, json.dumps(args)], cwd=ROOT,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def read(self) -> dict[str, Any]:
        """The client's next JSON line; fails with its stderr when it ends without one."""
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(10)
            assert self.proc.stderr is not None
            pytest.fail(f"the load client ended without an answer:\n{self.proc.stderr.read()[-4000:]}")
        result: dict[str, Any] = json.loads(line)
        return result

    def say(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        stop_process(self.proc, grace=5)


@pytest.fixture
def clients() -> Iterator[list[LoadClient]]:
    """Load clients a test starts; stopped at its end, whatever happened."""
    started: list[LoadClient] = []
    yield started
    for client in started:
        client.close()


def run_client(clients: list[LoadClient], scenario: str, **args: Any) -> dict[str, Any]:
    """Start a client, wait for its one answer."""
    client = LoadClient(scenario, **args)
    clients.append(client)
    return client.read()
