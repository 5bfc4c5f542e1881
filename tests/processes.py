"""Processes the test rigs start: they never outlive the test run.

Each one gets its own session (tests signal its whole process group), so a Ctrl-C in the terminal
does not reach it and nothing tells it the test run ended. Two things make it go anyway:
- Linux's parent-death signal: the kernel SIGKILLs it when the process that started it dies,
  however that happens (kill -9 included);
- an exit sweep: when the test process exits normally, whatever is still running is stopped.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import ctypes
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1
_RUNNING: set[subprocess.Popen[str]] = set()
_spawner: concurrent.futures.ThreadPoolExecutor | None = None
_spawner_lock = threading.Lock()


def die_with_parent(parent_pid: int, then: Callable[[], None] | None = None) -> Callable[[], None]:
    """A ``preexec_fn`` (run in the child, before exec) that asks the kernel to SIGKILL the child
    when its parent dies, then runs ``then`` (for example a change of user; the signal is set after
    it, since a change of credentials clears it). If the parent is already gone, the child kills
    itself. No-op where ``prctl`` is missing (not Linux)."""
    prctl = _prctl()  # looked up here: the child of a threaded parent must not load libraries

    def preexec() -> None:
        if then is not None:
            then()
        if prctl is None:
            return
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before the signal was set
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def _prctl() -> Callable[..., int] | None:
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return prctl


def spawn(args: list[str], **popen: object) -> subprocess.Popen[str]:
    """``subprocess.Popen(args, **popen)`` in a new session, killed when this process dies and
    stopped at its exit (see above). Raises what ``Popen`` raises.

    The kernel sends the parent-death signal when the *thread* that started the child ends, so a
    call from any thread other than the main one is made on one long-lived spawner thread."""
    if threading.current_thread() is threading.main_thread():
        return _spawn(args, popen)
    return _spawner_pool().submit(_spawn, args, popen).result()


def _spawn(args: list[str], popen: dict[str, object]) -> subprocess.Popen[str]:
    then = popen.pop("preexec_fn", None)
    proc: subprocess.Popen[str] = subprocess.Popen(  # type: ignore[call-overload]
        args, start_new_session=True, preexec_fn=die_with_parent(os.getpid(), then), **popen)
    _RUNNING.add(proc)
    return proc


def _spawner_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="process-spawner")
        return _spawner


def stop_process(proc: subprocess.Popen[str], grace: float = 20) -> None:
    """SIGTERM the process group, SIGKILL it after ``grace`` seconds; waits until it is gone."""
    if proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait(10)
    _RUNNING.discard(proc)


def _signal_group(proc: subprocess.Popen[str], sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:  # already gone (and reaped by someone else's wait)
        pass


@atexit.register
def stop_leftover_processes() -> None:
    """At exit, stop every process a rig started and nobody stopped (an interrupted run), with
    what is left of their process groups (an encoder whose service died first, for example)."""
    leftovers = list(_RUNNING)
    for proc in leftovers:
        _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + 5
    for proc in leftovers:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        _signal_group(proc, signal.SIGKILL)
        _RUNNING.discard(proc)
