"""PostgreSQL and RabbitMQ for the fault suite, on their own ports, stopped and started at will.

The fault suite stops its database and its broker. The machine's own PostgreSQL and RabbitMQ serve
every other test running at the same time, so by default the suite starts a private PostgreSQL
cluster and a private RabbitMQ node (from the same installed binaries, on free ports, in a
temporary folder) and stops only those. ``CLIPCHAT_CHAOS_BACKENDS=system`` uses the machine's
own instead (``pg_ctlcluster … main`` and the default RabbitMQ node), for a machine that runs
nothing else.

Private servers are started like the rigs' services (``tests.e2e.conftest.spawn``): the kernel
kills them when the test process dies. When run as root they run as the ``postgres`` and
``rabbitmq`` users (PostgreSQL refuses root).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from tests.conftest import free_port
from tests.processes import spawn

READY_WITHIN = 120.0  # seconds: a bounded wait for a server to accept work, not a speed check
COMMAND_TIMEOUT = 120.0


class BackendError(RuntimeError):
    """A server could not be started, stopped or reached in time."""


class Postgres(Protocol):
    admin_dsn: str  # plain libpq DSN of the ``postgres`` database

    def stop(self) -> None:
        """Fast shutdown (``-m fast``); returns once the server is down."""

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""

    def is_up(self) -> bool: ...

    def close(self) -> None:
        """Stop for good and remove what was created (no-op for the machine's own)."""


class RabbitMQ(Protocol):
    amqp_url: str

    def ctl(self, *args: str, timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """Run ``rabbitmqctl`` against this node."""

    def stop_app(self) -> None: ...

    def start_app(self) -> None:
        """``start_app`` then ``await_startup``: returns once the node takes connections."""

    def is_up(self) -> bool: ...

    def close(self) -> None: ...


def start_backends() -> tuple[Postgres, RabbitMQ]:
    """The PostgreSQL and RabbitMQ the suite may stop (see the module docstring).

    Raises ``BackendError`` when they cannot be started."""
    if os.environ.get("CLIPCHAT_CHAOS_BACKENDS", "private") == "system":
        return SystemPostgres(), SystemRabbitMQ()
    postgres = PrivatePostgres()
    try:
        return postgres, PrivateRabbitMQ()
    except BaseException:
        postgres.close()
        raise


# ---- running things as the server's user --------------------------------------------------------


def _service_user(name: str) -> pwd.struct_passwd | None:
    """The account to run a server as: ``name`` when we are root, else None (ourselves)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(name)
    except KeyError as exc:
        raise BackendError(f"running as root, but there is no {name!r} user to run the server as") from exc


def _become(user: pwd.struct_passwd | None) -> Callable[[], None] | None:
    if user is None:
        return None

    def switch() -> None:
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)

    return switch


def _run(args: list[str], *, user: pwd.struct_passwd | None = None, env: dict[str, str] | None = None,
         timeout: float = COMMAND_TIMEOUT, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command (as ``user``); ``BackendError`` with its output when ``check`` and it fails."""
    try:
        done = subprocess.run(args, preexec_fn=_become(user), env=env, capture_output=True, text=True,
                              timeout=timeout, cwd="/")
    except subprocess.TimeoutExpired as exc:
        raise BackendError(f"{' '.join(args)} did not finish in {timeout:.0f} s") from exc
    if check and done.returncode != 0:
        raise BackendError(f"{' '.join(args)} failed ({done.returncode}): {done.stdout[-2000:]}{done.stderr[-2000:]}")
    return done


def _private_dir(prefix: str, user: pwd.struct_passwd | None) -> Path:
    """A fresh folder under /tmp the server's user owns (pytest's own folders are root-only)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    if user is not None:
        os.chown(folder, user.pw_uid, user.pw_gid)
    return folder


def _wait(ready: Callable[[], bool], what: str, limit: float = READY_WITHIN) -> None:
    deadline = time.monotonic() + limit
    while not ready():
        if time.monotonic() > deadline:
            raise BackendError(f"{what} not ready after {limit:.0f} s")
        time.sleep(0.2)


# ---- PostgreSQL -------------------------------------------------------------------------------------


def _postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    if found:
        return Path(found[-1]).parent
    postgres = shutil.which("postgres")
    if postgres is None:
        raise BackendError("no PostgreSQL server binaries (postgres, initdb, pg_ctl) found")
    return Path(postgres).parent


class PrivatePostgres:
    """A PostgreSQL cluster of our own: ``initdb`` in /tmp, trust auth, a free port on 127.0.0.1."""

    def __init__(self) -> None:
        self.bin = _postgres_bin()
        self.user = _service_user("postgres")
        self.folder = _private_dir("clipchat-chaos-pg-", self.user)
        self.data = self.folder / "data"
        self.port = free_port()
        self.admin_dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._proc: subprocess.Popen[str] | None = None
        try:
            _run([str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--no-sync"], user=self.user)
            self.start()
        except BaseException:
            self.close()
            raise

    def start(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        with open(self.folder / "server.log", "a") as log:  # the server keeps its own copy of the file
            self._proc = spawn([str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port),
                                "-k", str(self.folder), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                                "-c", "max_connections=200"],
                               preexec_fn=_become(self.user), stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, cwd=str(self.folder))
        _wait(self.is_up, "private PostgreSQL")

    def stop(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        _run([str(self.bin / "pg_ctl"), "-D", str(self.data), "stop", "-m", "fast", "-t", "60"], user=self.user)
        self._proc.wait(30)

    def is_up(self) -> bool:
        if self._proc is None or self._proc.poll() is not None:
            return False
        probe = _run([str(self.bin / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)], check=False,
                     timeout=10)
        return probe.returncode == 0

    def close(self) -> None:
        try:
            if self._proc is not None and self._proc.poll() is None:
                self._proc.kill()  # a throw-away cluster: no need for a clean shutdown
                self._proc.wait(30)
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


class SystemPostgres:
    """The machine's own cluster (``pg_ctlcluster --skip-systemctl-redirect VERSION main``)."""

    def __init__(self, admin_dsn: str = "postgresql://postgres@127.0.0.1:5432/postgres") -> None:
        versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
        if not versions:
            raise BackendError("no PostgreSQL cluster under /etc/postgresql")
        self.version = versions[-1]
        self.admin_dsn = os.environ.get("CLIPCHAT_TEST_PG_DSN", admin_dsn)

    def _ctl(self, action: str, *extra: str) -> None:
        _run(["pg_ctlcluster", "--skip-systemctl-redirect", self.version, "main", action, *extra])

    def stop(self) -> None:
        self._ctl("stop", "-m", "fast")

    def start(self) -> None:
        if not self.is_up():
            self._ctl("start")
        _wait(self.is_up, "PostgreSQL")

    def is_up(self) -> bool:
        return _run(["pg_isready", "-q", "-h", "127.0.0.1"], check=False, timeout=10).returncode == 0

    def close(self) -> None:
        self.start()  # never leave the machine's database down


# ---- RabbitMQ ------------------------------------------------------------------------------------------


def _rabbitmq_script(name: str) -> str:
    for candidate in (f"/usr/lib/rabbitmq/bin/{name}", *sorted(glob.glob(f"/usr/lib/rabbitmq/lib/*/sbin/{name}"))):
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(name)
    if found is None:
        raise BackendError(f"{name} not found")
    return found


class _RabbitMQApp:
    """Stopping, starting and asking a node through its ``ctl`` (``rabbitmqctl``)."""

    def ctl(self, *args: str, timeout: float = COMMAND_TIMEOUT,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        raise NotImplementedError

    def stop_app(self) -> None:
        self.ctl("stop_app")

    def start_app(self) -> None:
        self.ctl("start_app")
        self.ctl("await_startup", "--timeout", str(int(READY_WITHIN)))

    def is_up(self) -> bool:
        return self.ctl("await_startup", "--timeout", "5", check=False, timeout=30).returncode == 0


class PrivateRabbitMQ(_RabbitMQApp):
    """A RabbitMQ node of our own (node name, AMQP and distribution ports, data in /tmp)."""

    def __init__(self) -> None:
        self.user = _service_user("rabbitmq")
        self.folder = _private_dir("clipchat-chaos-rmq-", self.user)
        self.port = free_port()
        self.node = f"clipchat-chaos-{self.port}@localhost"
        self.amqp_url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        self._env = self._environment()
        self._proc: subprocess.Popen[str] | None = None
        try:
            self._start_node()
        except BaseException:
            self.close()
            raise

    def _environment(self) -> dict[str, str]:
        folder = self.folder
        (folder / "rabbitmq.conf").write_text(f"listeners.tcp.1 = 127.0.0.1:{self.port}\nloopback_users = none\n")
        (folder / "enabled_plugins").write_text("[].\n")
        if self.user is not None:
            for path in folder.iterdir():
                os.chown(path, self.user.pw_uid, self.user.pw_gid)
        return {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LANG": "C.UTF-8",
            "HOME": str(folder),  # the Erlang cookie is made here, shared with our rabbitmqctl
            "RABBITMQ_NODENAME": self.node, "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_CONFIG_FILE": str(folder / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(folder / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(folder / "mnesia"), "RABBITMQ_LOG_BASE": str(folder / "log"),
            "RABBITMQ_PID_FILE": str(folder / "node.pid"),
            "RABBITMQ_CONF_ENV_FILE": str(folder / "rabbitmq-env.conf"),  # not the machine's
            # Exec the VM in place of the start script, so the parent-death signal reaches it.
            "RABBITMQ_ALLOW_INPUT": "1",
        }

    def _start_node(self) -> None:
        # stdin stays an open pipe: the VM reads it (RABBITMQ_ALLOW_INPUT) and would stop at its end.
        with open(self.folder / "node.log", "a") as log:
            self._proc = spawn([_rabbitmq_script("rabbitmq-server")], env=self._env,
                               preexec_fn=_become(self.user), stdin=subprocess.PIPE, stdout=log,
                               stderr=subprocess.STDOUT, cwd=str(self.folder))
        _wait(lambda: self._proc is not None and self._proc.poll() is None
              and self.ctl("await_startup", "--timeout", "5", check=False).returncode == 0,
              "private RabbitMQ")

    def ctl(self, *args: str, timeout: float = COMMAND_TIMEOUT,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run([_rabbitmq_script("rabbitmqctl"), "-n", self.node, *args], user=self.user, env=self._env,
                    timeout=timeout, check=check)

    def close(self) -> None:
        try:
            if self._proc is not None and self._proc.poll() is None:
                self.ctl("stop", check=False, timeout=60)
                try:
                    self._proc.wait(30)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(30)
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


class SystemRabbitMQ(_RabbitMQApp):
    """The machine's own default node (``rabbitmqctl stop_app`` / ``start_app``)."""

    def __init__(self) -> None:
        self.amqp_url = os.environ.get("CLIPCHAT_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")

    def ctl(self, *args: str, timeout: float = COMMAND_TIMEOUT,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run(["rabbitmqctl", *args], timeout=timeout, check=check)

    def close(self) -> None:
        self.start_app()  # never leave the machine's broker down
