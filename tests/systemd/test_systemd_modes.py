"""Configurations that change how muxd uses the sandbox: worker processes and UDP echo."""

from __future__ import annotations

import pytest
from nspawn import (
    Container,
    add_drop_in,
    connected,
    echo_roundtrip,
    edit_ini,
    udp_echo,
    wait_until,
)

pytestmark = pytest.mark.systemd

UDP_ON_THE_SOCKET = """\
[Socket]
ListenDatagram=7
"""


def test_workers_run_under_the_sandbox_and_stop_cleanly(muxd: Container) -> None:
    edit_ini(muxd, {("server", "workers"): "2"})
    muxd.systemctl("start", "muxd")
    assert muxd.show("muxd", "ActiveState") == "active"
    supervisor = muxd.main_pid()
    children = muxd.path(f"/proc/{supervisor}/task/{supervisor}/children")
    wait_until(lambda: len(children.read_text().split()) == 2, timeout=10, what="two workers")
    for attempt in range(20):
        payload = f"to some worker {attempt}\n".encode()
        with connected(muxd) as sock:
            assert echo_roundtrip(sock, payload) == payload

    muxd.systemctl("reload", "muxd", timeout=20)
    wait_until(lambda: muxd.show("muxd", "ActiveState") == "active", timeout=10, what="reload")
    assert muxd.main_pid() == supervisor

    muxd.systemctl("stop", "muxd")
    assert muxd.show("muxd", "Result") == "success"


def test_udp_echo_when_configured(muxd: Container) -> None:
    edit_ini(muxd, {("server", "udp"): "[::]:7"})
    muxd.systemctl("start", "muxd")
    assert udp_echo(muxd, b"datagram v4") == b"datagram v4"
    assert udp_echo(muxd, b"datagram v6", host="::1") == b"datagram v6"


def test_udp_echo_under_socket_activation(muxd: Container) -> None:
    add_drop_in(muxd, "muxd.socket", "udp", UDP_ON_THE_SOCKET)
    muxd.systemctl("start", "muxd.socket")
    # The first datagram starts muxd; it must still be answered, from the inherited socket.
    assert udp_echo(muxd, b"wake up by datagram") == b"wake up by datagram"
    with connected(muxd) as sock:
        assert echo_roundtrip(sock, b"and tcp too\n") == b"and tcp too\n"
