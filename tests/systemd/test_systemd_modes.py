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


def test_workers_stop_drains_every_client_under_the_default_kill_mode(muxd: Container) -> None:
    # KillMode=control-group: systemd sends SIGTERM to the supervisor AND every
    # worker. Each worker must still drain what it owes (it ignores the SIGTERM
    # from systemd and stops once, on its supervisor's word), not close at once.
    import re
    import threading

    from test_systemd_service import fill_until_stalled

    edit_ini(muxd, {("server", "workers"): "2", ("limits", "shutdown_timeout"): "20",
                    ("logging", "connections"): "yes"})
    muxd.systemctl("start", "muxd")
    clients = [muxd.connect(7) for _ in range(6)]
    for sock in clients:
        fill_until_stalled(sock)
    received = [0] * len(clients)

    def read(index: int) -> None:
        sock = clients[index]
        sock.setblocking(True)
        sock.settimeout(30)
        try:
            while chunk := sock.recv(1 << 20):
                received[index] += len(chunk)
        except OSError:
            pass

    mark = muxd.journal_mark()
    readers = [threading.Thread(target=read, args=(index,)) for index in range(len(clients))]
    for reader in readers:
        reader.start()
    muxd.systemctl("stop", "muxd", timeout=60)
    for reader in readers:
        reader.join(30)
    assert muxd.show("muxd", "Result") == "success"
    messages = [entry["MESSAGE"] for entry in muxd.journal("-u", "muxd", after=mark)]
    assert not [m for m in messages if "again: closing" in m], messages
    owed = {}
    for message in messages:
        found = re.search(r"disconnect \S+:(\d+) \(\w+\): (\d+) bytes in", message)
        if found:
            owed[int(found.group(1))] = int(found.group(2))
    for sock, got in zip(clients, received, strict=True):
        port = sock.getsockname()[1]
        assert owed.get(port) == got, f"client {port} got {got} of {owed.get(port)} owed"
        sock.close()
    assert sum(received) > 1 << 20
