"""Faults the chaos suite injects, each undone whatever happens, and the processes they hit.

Every context manager restores what it stopped in ``finally`` and, should the test process be on
its way out, from ``atexit`` too; it returns only once the thing is ready again, and every wait is
bounded. ``Outage`` records when the fault began and ended (``recovery`` seconds are measured from
its end).

Processes are found under ``/proc`` (no psutil): a service's ffmpeg children, whether one is
encoding now, and every process a rig started for a broker namespace.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.chaos.backends import Postgres, RabbitMQ

EXIT_WITHIN = 30.0  # seconds a killed process gets to be gone (a bounded wait)


@dataclass
class Outage:
    """When a fault began and ended (``time.monotonic()``)."""

    began: float = field(default_factory=time.monotonic)
    ended: float | None = None


@contextmanager
def restored_at_exit(restore: Callable[[], None]) -> Iterator[Callable[[], None]]:
    """Run ``restore`` once: when the block ends (however), or at interpreter exit if it never does.
    Yields the idempotent restore, so a test may undo the fault early."""
    done = False

    def once() -> None:
        nonlocal done
        if not done:
            done = True
            restore()

    atexit.register(once)
    try:
        yield once
    finally:
        try:
            once()
        finally:
            atexit.unregister(once)


@contextmanager
def rabbitmq_stopped(broker: RabbitMQ) -> Iterator[Outage]:
    """``rabbitmqctl stop_app`` for the block; ``start_app`` + ``await_startup`` after it."""
    outage = Outage()

    def restore() -> None:
        broker.start_app()
        outage.ended = time.monotonic()

    broker.stop_app()
    with restored_at_exit(restore):
        yield outage


@contextmanager
def postgres_stopped(postgres: Postgres) -> Iterator[Outage]:
    """PostgreSQL stopped (fast shutdown: sessions cut) for the block; started again after it."""
    outage = Outage()

    def restore() -> None:
        postgres.start()
        outage.ended = time.monotonic()

    postgres.stop()
    with restored_at_exit(restore):
        yield outage


def kill9(proc: subprocess.Popen[str], *, group: bool = True) -> None:
    """SIGKILL ``proc`` — with its process group (its ffmpeg children too), as when a pod or a
    node dies — and wait until it is gone."""
    try:
        if group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.send_signal(signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(EXIT_WITHIN)


def sigterm(proc: subprocess.Popen[str]) -> None:
    """SIGTERM ``proc`` alone, as Kubernetes stops a container's main process (no waiting)."""
    proc.send_signal(signal.SIGTERM)


# ---- processes under /proc ------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    ppid: int
    state: str
    argv: tuple[str, ...]

    @property
    def is_ffmpeg(self) -> bool:
        return bool(self.argv) and Path(self.argv[0]).name.startswith("ffmpeg")

    @property
    def is_encoding(self) -> bool:
        """An ffmpeg that encodes video (not a probe, a stream copy or a thumbnail)."""
        return self.is_ffmpeg and any(arg in ("libx264", "h264_nvenc", "hevc_nvenc") for arg in self.argv)


def processes() -> list[ProcessInfo]:
    """Every live process (zombies left out)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (info := _read(int(entry))) is not None and info.state not in ("Z", "X"):
            found.append(info)
    return found


def _read(pid: int) -> ProcessInfo | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:  # gone meanwhile
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return ProcessInfo(pid=pid, ppid=int(fields[1]), state=fields[0],
                       argv=tuple(a.decode(errors="replace") for a in argv if a))


def descendants(pid: int) -> list[ProcessInfo]:
    """Every live process below ``pid`` (children, grandchildren, …)."""
    table = processes()
    below: list[ProcessInfo] = []
    parents = {pid}
    while True:
        found = [p for p in table if p.ppid in parents and p not in below]
        if not found:
            return below
        below.extend(found)
        parents = {p.pid for p in found}


def ffmpeg_children(pid: int) -> list[ProcessInfo]:
    """The ffmpeg processes running under ``pid``."""
    return [p for p in descendants(pid) if p.is_ffmpeg]


def ffmpeg_in_group(pgid: int) -> list[ProcessInfo]:
    """The ffmpeg processes of process group ``pgid`` (they stay in it after their parent dies)."""
    found = []
    for info in processes():
        try:
            if info.is_ffmpeg and os.getpgid(info.pid) == pgid:
                found.append(info)
        except ProcessLookupError:
            continue
    return found


def service_processes(service: str, namespace: str) -> list[ProcessInfo]:
    """The ``clipchat serve <service>`` processes of the rig whose broker namespace is ``namespace``."""
    found = []
    for info in processes():
        if info.argv[-2:] != ("serve", service) or not any(Path(a).name == "clipchat" for a in info.argv[:2]):
            continue
        try:
            environ = Path(f"/proc/{info.pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"CLIPCHAT_BROKER_NAMESPACE={namespace}".encode() in environ:
            found.append(info)
    return found


def wait_for(probe: Callable[[], object], what: str, *, limit: float, interval: float = 0.05) -> object:
    """Poll ``probe`` until it returns something truthy; ``TimeoutError`` after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {limit:.0f} s waiting for {what}")
        time.sleep(interval)
