"""The processes a test rig starts never outlive the test run, however the run ends.

Each test runs a small test session of its own (a real pytest, or a plain Python parent) that
starts a long-running child with ``start_process``, the helper the rigs start every service with,
then ends that parent the way an interrupted ``make test`` ends, and checks the child is gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import ROOT

GONE_WITHIN = 15.0  # seconds: a bounded wait for the kernel and the exit sweep, not a speed check
STARTED_WITHIN = 60.0

CHILD = "import time; time.sleep(600)"
# A child that starts a grandchild in its own process group (as a service starts ffmpeg).
CHILD_WITH_GRANDCHILD = ("import subprocess, sys, time; g = subprocess.Popen([sys.executable, '-c', "
                         "'import time; time.sleep(600)']); print(g.pid, flush=True); time.sleep(600)")

SESSION_TEST = '''
import os, sys, time
from pathlib import Path
from tests.e2e.conftest import start_process

def test_holds_a_server() -> None:
    output: list[str] = []
    child = start_process([sys.executable, "-c", {child!r}], dict(os.environ), output)
    deadline = time.monotonic() + 30
    while {needs_grandchild} and not output and time.monotonic() < deadline:
        time.sleep(0.05)
    Path({pids!r}).write_text(" ".join([str(child.pid), *[line.strip() for line in output]]))
    time.sleep(600)
'''

THREADED_PARENT = '''
import os, sys, threading, time
from tests.e2e.conftest import start_process

children = []
worker = threading.Thread(target=lambda: children.append(
    start_process([sys.executable, "-c", {child!r}], dict(os.environ), [])))
worker.start()
worker.join()  # the thread that asked for the child has ended
print(children[0].pid, flush=True)
time.sleep(600)
'''


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def _wait_gone(pids: list[int]) -> list[int]:
    """The pids still alive after ``GONE_WITHIN`` seconds (empty when all went)."""
    deadline = time.monotonic() + GONE_WITHIN
    while (alive := [pid for pid in pids if _alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def _kill_if_alive(pids: list[int]) -> None:
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _start_session(tmp_path: Path, child: str) -> tuple[subprocess.Popen[bytes], list[int]]:
    """A pytest session whose one test starts ``child`` and sleeps; returns it and the pids the
    test started (the child, then the grandchild if any)."""
    pids_file = tmp_path / "pids"
    test_file = tmp_path / "test_session.py"
    test_file.write_text(SESSION_TEST.format(child=child, pids=str(pids_file),
                                             needs_grandchild=child == CHILD_WITH_GRANDCHILD))
    session = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                "--rootdir", str(tmp_path), "-c", os.devnull, str(test_file)],
                               cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + STARTED_WITHIN
    while not pids_file.exists() or not pids_file.read_text():
        if session.poll() is not None or time.monotonic() > deadline:
            session.kill()
            pytest.fail("the inner test session did not start its child")
        time.sleep(0.1)
    time.sleep(0.1)  # the file is written in one call; let it land
    return session, [int(pid) for pid in pids_file.read_text().split()]


def test_a_test_run_killed_with_sigkill_takes_its_servers_with_it(tmp_path: Path) -> None:
    session, pids = _start_session(tmp_path, CHILD)
    try:
        assert all(_alive(pid) for pid in pids)
        session.send_signal(signal.SIGKILL)  # no handler, no atexit, no fixture teardown runs
        session.wait(10)
        assert _wait_gone(pids) == [], "a server outlived the killed test run"
    finally:
        _kill_if_alive(pids)


def test_an_interrupted_test_run_stops_its_servers_and_their_children(tmp_path: Path) -> None:
    session, pids = _start_session(tmp_path, CHILD_WITH_GRANDCHILD)
    try:
        assert len(pids) == 2 and all(_alive(pid) for pid in pids)
        session.send_signal(signal.SIGINT)  # Ctrl-C: the child, in its own session, does not get it
        session.wait(30)
        assert _wait_gone(pids) == [], "a server or its child outlived the interrupted test run"
    finally:
        _kill_if_alive(pids)


def test_a_test_run_terminated_takes_its_servers_with_it(tmp_path: Path) -> None:
    session, pids = _start_session(tmp_path, CHILD)
    try:
        session.send_signal(signal.SIGTERM)  # Python's default: die at once, no atexit
        session.wait(10)
        assert _wait_gone(pids) == [], "a server outlived the terminated test run"
    finally:
        _kill_if_alive(pids)


def test_a_server_started_from_a_short_lived_thread_lives_as_long_as_the_run(tmp_path: Path) -> None:
    # The kernel's parent-death signal follows the thread that forked, not the process.
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(THREADED_PARENT.format(child=CHILD)))
    parent = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                              text=True)
    pids: list[int] = []
    try:
        assert parent.stdout is not None
        pids = [int(parent.stdout.readline())]
        time.sleep(1.0)
        assert _alive(pids[0]), "the server died with the thread that started it"
        parent.kill()
        parent.wait(10)
        assert _wait_gone(pids) == [], "a server outlived its killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
        _kill_if_alive(pids)
