"""Start-up that explains itself: a busy port or a missing dependency is one line, never a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from clipchat.settings import Settings
from launcher.errors import StartupError
from launcher.system import gateway_socket

CLIPCHAT = str(Path(sys.executable).with_name("clipchat"))


@pytest.fixture
def busy_port() -> Iterator[int]:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    yield holder.getsockname()[1]
    holder.close()


def test_embedded_mode_takes_the_next_free_port(busy_port: int) -> None:
    sock = gateway_socket(Settings(gateway_port=busy_port), search=True)
    try:
        assert sock.getsockname()[1] > busy_port
    finally:
        sock.close()


def test_distributed_mode_names_the_busy_port_and_the_setting(busy_port: int) -> None:
    with pytest.raises(StartupError, match=f"127.0.0.1:{busy_port}.*CLIPCHAT_GATEWAY_PORT"):
        gateway_socket(Settings(gateway_port=busy_port), search=False)


def serve(service: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CLIPCHAT_")}
    return subprocess.run([CLIPCHAT, "serve", service], env={**clean, **env}, capture_output=True, text=True,
                          timeout=60)


def test_serve_on_a_busy_port_is_one_line_and_a_non_zero_exit(busy_port: int) -> None:
    done = serve("gateway", CLIPCHAT_GATEWAY_PORT=str(busy_port))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("error: cannot listen on 127.0.0.1:")
    assert "Traceback" not in done.stderr + done.stdout


def test_serve_without_its_broker_says_which_setting_to_check() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = serve("composer", CLIPCHAT_BROKER_URL=f"amqp://guest:guest@127.0.0.1:{port}/", CLIPCHAT_ENCODER="libx264")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "error: the message broker cannot be reached; check CLIPCHAT_BROKER_URL and that RabbitMQ is running")
    assert "Traceback" not in done.stderr + done.stdout


def test_a_setting_of_the_wrong_type_is_named_in_one_line() -> None:
    done = serve("gateway", CLIPCHAT_GATEWAY_PORT="abc")
    assert done.returncode == 1
    assert done.stderr.strip() == ("error: invalid CLIPCHAT_* configuration: CLIPCHAT_GATEWAY_PORT: "
                                   "Input should be a valid integer, unable to parse string as an integer")
