"""The fault suite's fixtures and its report.

Fixtures: the suite's own PostgreSQL and RabbitMQ (``tests.chaos.backends``), the broker trace, and
one distributed rig on them (``tests.e2e.rig.start_rig``, wrapped by ``ChaosRig``) shared by the
scenarios. Before each scenario the rig is put back to its baseline; after a scenario that failed
it is thrown away and the next one gets a fresh rig, so one failure does not cascade.

The report: each scenario records, through the ``chaos`` fixture, how many seconds the system took
to recover, how many jobs or versions were lost and how many provider calls were paid twice; the
end of the session prints them with each test's result as a table.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.chaos.backends import BackendError, Postgres, RabbitMQ, start_backends
from tests.chaos.rig import CHAOS_SETTINGS, ChaosRig
from tests.chaos.trace import BrokerTrace
from tests.conftest import missing
from tests.e2e.rig import Rig, start_rig
from tests.report import SuiteRecord, SuiteReport

HERE = Path(__file__).parent


# ---- the report ----------------------------------------------------------------------------------


@dataclass
class ChaosRecord(SuiteRecord):
    """One scenario's line in the report (None: not measured, e.g. the test failed before)."""

    recovery_s: float | None = None
    lost: int | None = None
    paid_twice: int | None = None

    def recovered(self, since: float) -> None:
        """Record the seconds from ``since`` (a ``time.monotonic()``) to now."""
        self.recovery_s = time.monotonic() - since


REPORT = SuiteReport(HERE, lambda name: ChaosRecord(test=name))
_BACKENDS_UP = pytest.StashKey[str]()
_LOGS = pytest.StashKey[Path]()
_CALL_FAILED = pytest.StashKey[bool]()


@pytest.fixture
def chaos(request: pytest.FixtureRequest) -> ChaosRecord:
    """This scenario's line in the report."""
    return REPORT.record(request.config, request.node.nodeid, request.node.name)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, None, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    record = REPORT.on_report(item, report)
    if record is None:
        return
    if report.failed:
        item.stash[_CALL_FAILED] = True
        if report.when == "teardown" and record.result == "passed":
            record.result = "error"


def _figures(r: ChaosRecord) -> str:
    recovery = "-" if r.recovery_s is None else f"{r.recovery_s:.1f}"
    lost = "-" if r.lost is None else str(r.lost)
    paid = "-" if r.paid_twice is None else str(r.paid_twice)
    return f"{recovery:>10}  {lost:>4}  {paid:>10}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int,
                            config: pytest.Config) -> None:
    if not REPORT.print_table(terminalreporter, config, "fault suite",
                              f"{'recovery s':>10}  {'lost':>4}  {'paid twice':>10}", _figures):
        return
    write = terminalreporter.write_line
    if _BACKENDS_UP in config.stash:
        write(config.stash[_BACKENDS_UP])
    if _LOGS in config.stash:
        write(f"the services' logs of each failed scenario: {config.stash[_LOGS]}")


# ---- backends and the rig --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def chaos_backends(request: pytest.FixtureRequest) -> Iterator[tuple[Postgres, RabbitMQ]]:
    """The PostgreSQL and RabbitMQ the scenarios stop and start (private ones unless told)."""
    try:
        postgres, rabbitmq = start_backends()
    except (BackendError, OSError) as exc:
        missing(f"a PostgreSQL and a RabbitMQ the fault suite may stop ({exc})")
    try:
        yield postgres, rabbitmq
    finally:
        # Every fault restores what it stopped; say so at the end, for whoever reads the report.
        state = {"PostgreSQL": postgres.is_up(), "RabbitMQ": rabbitmq.is_up()}
        request.config.stash[_BACKENDS_UP] = "after the suite: " + ", ".join(
            f"{name} {'up' if up else 'DOWN'}" for name, up in state.items())
        postgres.close()
        rabbitmq.close()


class RigHolder:
    """The session's rig: started on first use, thrown away after a failed scenario."""

    def __init__(self, factory: pytest.TempPathFactory, ffmpeg: str, moto_s3: str,
                 backends: tuple[Postgres, RabbitMQ]) -> None:
        self.factory = factory
        self.ffmpeg = ffmpeg
        self.moto_s3 = moto_s3
        self.postgres, self.rabbitmq = backends
        self._running: Generator[Rig, None, None] | None = None
        self._rig: ChaosRig | None = None

    def get(self) -> ChaosRig:
        if self._rig is None:
            trace = BrokerTrace(self.rabbitmq).start()
            try:
                self._running = start_rig(self.factory, ffmpeg=self.ffmpeg,
                                          postgres_admin_dsn=self.postgres.admin_dsn,
                                          rabbitmq_url=self.rabbitmq.amqp_url, moto_s3=self.moto_s3)
                self._rig = ChaosRig(next(self._running), self.postgres, self.rabbitmq, trace)
                self._rig.adopt(CHAOS_SETTINGS)
            except BaseException:
                trace.stop()
                self.discard()
                raise
        return self._rig

    def discard(self) -> None:
        rig, running = self._rig, self._running
        self._rig = self._running = None
        try:
            if running is not None:
                running.close()  # the rig's own teardown: stop services and fakes, drop the database
        finally:
            if rig is not None:
                rig.trace.stop()


@pytest.fixture(scope="session")
def chaos_rigs(tmp_path_factory: pytest.TempPathFactory, ffmpeg_exe: str, moto_s3: str,
               chaos_backends: tuple[Postgres, RabbitMQ]) -> Iterator[RigHolder]:
    holder = RigHolder(tmp_path_factory, ffmpeg_exe, moto_s3, chaos_backends)
    try:
        yield holder
    finally:
        holder.discard()


@pytest.fixture
def rig(request: pytest.FixtureRequest, chaos_rigs: RigHolder,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChaosRig]:
    """The rig at its baseline, on backends that are up; a fresh one after a failed scenario
    (whose services' log is kept in the session's temporary folder, ``chaos-logs``)."""
    for backend in (chaos_rigs.postgres, chaos_rigs.rabbitmq):
        if not backend.is_up():  # a fault that was not undone is a bug of the suite itself
            pytest.fail(f"{type(backend).__name__} was left down by an earlier scenario")
    current = chaos_rigs.get()
    current.baseline()
    yield current
    if request.node.stash.get(_CALL_FAILED, False):
        folder = tmp_path_factory.getbasetemp() / "chaos-logs"
        folder.mkdir(exist_ok=True)
        name = "".join(c if c.isalnum() or c in "-_" else "_" for c in request.node.name)
        (folder / f"{name}.log").write_text("".join(list(current.base.output)))
        request.config.stash[_LOGS] = folder
        chaos_rigs.discard()


@pytest.fixture
def client(rig: ChaosRig) -> Iterator[httpx.Client]:
    """An HTTP client of the rig's gateway, as the job's owner."""
    with rig.base.client() as http:
        yield http
