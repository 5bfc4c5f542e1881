"""Health that follows a server's dependencies.

A ``DependencyWatcher`` pings each dependency every ``interval`` seconds: a check is an async
function that says whether the dependency is up (``Database.ping``, ``Broker.ping``). Each ping has
its own ``timeout``; a check that raises or overruns counts as down. The watcher logs
``health.dependency_down`` / ``health.dependency_up`` once per change, never per ping, and hands
every change to a ``publish`` callback.

``GrpcServer.watch`` (``clipchat.rpc``) publishes on the standard gRPC health service: each
dependency under ``dependency_service_name(name)`` (``clipchat.dependency.<name>``), so a caller can
ask which one is down, and the server's own names NOT_SERVING while any is down.

``LIVENESS_SERVICE`` stays SERVING for as long as the server runs, whatever its dependencies: it
is what liveness and startup probes ask, so a database outage makes pods unready, never restarts
them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType

log = logging.getLogger("clipchat.health")

HealthCheck = Callable[[], Awaitable[bool]]
"""Whether one dependency is up now."""
Publish = Callable[[Mapping[str, bool]], Awaitable[None]]
"""Receives every dependency's state (True: up) after any of them changed."""

DEPENDENCY_SERVICE_PREFIX = "clipchat.dependency."
LIVENESS_SERVICE = "clipchat.liveness"


def dependency_service_name(dependency: str) -> str:
    """The gRPC health service name under which a server reports ``dependency`` (e.g. ``database``)."""
    return DEPENDENCY_SERVICE_PREFIX + dependency


class DependencyWatcher:
    """Pings named dependencies on a schedule and publishes their states when one changes.

    ``timeout`` bounds each ping (default: ``interval``). ``start()`` runs a first round before it
    returns, so the states are known from then on; ``stop()`` cancels the schedule. An error in
    ``publish`` is logged (``health.watch_failed``) and the schedule goes on.
    """

    def __init__(self, checks: Mapping[str, HealthCheck], publish: Publish, *, interval: float = 5.0,
                 timeout: float | None = None) -> None:
        if not checks:
            raise ValueError("a dependency watcher needs at least one check")
        self._checks = dict(checks)
        self._publish = publish
        self._interval = interval
        self._timeout = interval if timeout is None else timeout
        self._states: dict[str, bool] = {}
        self._task: asyncio.Task[None] | None = None

    @property
    def states(self) -> Mapping[str, bool]:
        """Each dependency's last known state (True: up); empty before the first round."""
        return MappingProxyType(self._states)

    @property
    def all_up(self) -> bool:
        return all(self._states.values())

    async def start(self) -> None:
        """Check every dependency once and publish, then keep checking in the background."""
        if self._task is not None:
            raise RuntimeError("this dependency watcher is already running")
        await self.check_now()
        self._task = asyncio.create_task(self._run(), name="clipchat-health-watch")

    async def stop(self) -> None:
        """Stop checking; the states stay as last published."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def check_now(self) -> None:
        """One round: ping every dependency at once; log and publish if any state changed."""
        names = list(self._checks)
        results = await asyncio.gather(*(self._probe(name) for name in names))
        changed = False
        for name, (up, reason) in zip(names, results, strict=True):
            before = self._states.get(name)
            if up == before:
                continue
            changed = True
            self._states[name] = up
            if not up:
                log.warning("health.dependency_down", extra={"dependency": name, "reason": reason})
            elif before is False:
                log.info("health.dependency_up", extra={"dependency": name})
        if changed:
            await self._publish(self.states)

    async def _probe(self, name: str) -> tuple[bool, str]:
        """Whether ``name`` is up, and if not, why (for the log)."""
        try:
            async with asyncio.timeout(self._timeout):
                up = bool(await self._checks[name]())
        except TimeoutError:
            return False, f"no answer within {self._timeout:g} s"
        except Exception as exc:
            return False, f"the check raised {type(exc).__name__}"
        return up, "" if up else "the check reported it down"

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.check_now()
            except Exception:
                log.exception("health.watch_failed")
