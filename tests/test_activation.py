"""Socket activation with what muxd cannot serve: each refused at start with a
clear message and EX_CONFIG, never a traceback, a spin or a silent fallback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable

import pytest
from daemon_harness import free_port, server_config

from muxd.config import EX_CONFIG


def run_activated(tmp_path, make_socket: Callable[[], socket.socket] | None,
                  listen_fds: str = "1", workers: int = 1) -> subprocess.CompletedProcess[str]:
    """Run muxd with ``make_socket()`` as fd 3 and LISTEN_PID set to muxd's own PID."""
    config = tmp_path / "activated.ini"
    config.write_text(server_config(free_port()).replace("[limits]",
                                                         f"workers = {workers}\n[limits]"))
    sock = make_socket() if make_socket is not None else None

    def become_fd_3() -> None:
        if sock is not None:
            os.dup2(sock.fileno(), 3)
            os.set_inheritable(3, True)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
    shell = (f'LISTEN_PID=$$ LISTEN_FDS={listen_fds} exec "{sys.executable}" -m muxd '
             f'--config {config}')
    try:
        return subprocess.run(["/bin/sh", "-c", shell], capture_output=True, text=True,
                              timeout=15, env=env, stdin=subprocess.DEVNULL,
                              preexec_fn=become_fd_3, pass_fds=(3,) if sock else ())
    finally:
        if sock is not None:
            sock.close()


def _unix_datagram(tmp_path):
    def make() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(f"\0muxd-test-{os.getpid()}-{id(sock)}")
        return sock
    return make


def _netlink(tmp_path):
    return lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)


def _icmp(tmp_path):
    return lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)


def _raw(tmp_path):
    return lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)


def _connected_tcp(tmp_path):
    def make() -> socket.socket:
        server = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(server.getsockname())
        server.close()
        return client
    return make


UNSERVABLE = {
    "unix datagram": (_unix_datagram, "AF_UNIX SOCK_DGRAM"),
    "netlink": (_netlink, "AF_NETLINK SOCK_RAW"),
    "icmp ping": (_icmp, "AF_INET SOCK_DGRAM socket (protocol 1)"),
    "raw": (_raw, "AF_INET SOCK_RAW"),
    "connected tcp": (_connected_tcp, "not listening"),
}


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("kind", sorted(UNSERVABLE))
def test_an_unservable_inherited_socket_is_refused(tmp_path, kind, workers) -> None:
    factory, words = UNSERVABLE[kind]
    make = factory(tmp_path)
    try:
        make().close()
    except PermissionError:
        pytest.skip(f"this host does not let the test open a {kind} socket")
    result = run_activated(tmp_path, make, workers=workers)
    assert result.returncode == EX_CONFIG, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "socket activation: fd 3" in result.stderr and words in result.stderr, result.stderr


@pytest.mark.parametrize("value", ["abc", "-1", "1_0", "\u0661", ""])
def test_a_malformed_listen_fds_is_refused_not_ignored(tmp_path, value) -> None:
    result = run_activated(tmp_path, None, listen_fds=f"'{value}'")
    assert result.returncode == EX_CONFIG, result.stderr
    assert "LISTEN_FDS=" in result.stderr and "not a number" in result.stderr, result.stderr
    assert "listening on" not in result.stderr


def run_unactivated(tmp_path, required: str, workers: int = 1
                    ) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "plain.ini"
    config.write_text(server_config(free_port()).replace("[limits]",
                                                         f"workers = {workers}\n[limits]"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
    env["MUXD_SOCKET_ACTIVATION"] = required
    return subprocess.run([sys.executable, "-m", "muxd", "--config", str(config)],
                          capture_output=True, text=True, timeout=15, env=env,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_unit_meant_for_socket_activation_binds_nothing_without_a_socket(
        tmp_path, workers) -> None:
    """The socket-mode drop-in's MUXD_SOCKET_ACTIVATION=required: started without
    muxd.socket (issue 19), muxd says why and exits 78 instead of binding the port."""
    result = run_unactivated(tmp_path, "required", workers)
    assert result.returncode == EX_CONFIG, result.stderr
    assert "MUXD_SOCKET_ACTIVATION=required, but systemd passed no listening socket" \
        in result.stderr, result.stderr
    assert "systemctl start muxd.socket" in result.stderr
    assert "listening on" not in result.stderr and "Traceback" not in result.stderr


def test_a_bad_socket_activation_requirement_is_refused(tmp_path) -> None:
    result = run_unactivated(tmp_path, "yes")
    assert result.returncode == EX_CONFIG, result.stderr
    assert "MUXD_SOCKET_ACTIVATION='yes'" in result.stderr and "expected 'required'" \
        in result.stderr, result.stderr
    assert "listening on" not in result.stderr

