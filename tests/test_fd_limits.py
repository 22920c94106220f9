"""Descriptor limits: select's FD_SETSIZE and running out of descriptors (EMFILE)."""

from __future__ import annotations

import socket
import time

from daemon_harness import (
    connect,
    echo_once,
    free_port,
    raise_own_nofile,
    sees_connection_end,
    server_config,
    wait_until,
)


def _open_many(port: int, count: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(count)]


def _close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


def test_select_backend_survives_more_than_1024_connections(start_muxd) -> None:
    raise_own_nofile(4096)
    port = free_port()
    daemon = start_muxd(server_config(port, "select", nofile=4096, idle_timeout=0))
    first = connect(port)
    assert echo_once(first, b"first") == b"first"
    crowd = _open_many(port, 1100)
    # Past fd 1023 the daemon must close the newcomers, not die.
    daemon.wait_log("cannot watch fd")
    assert sees_connection_end(crowd[-1], timeout=5)
    assert daemon.process.poll() is None
    assert echo_once(first, b"still served") == b"still served"
    served = sum(1 for sock in crowd[:900] if echo_once(sock, b"?") == b"?")
    assert served == 900
    # Refusals are logged rate-limited, not one line per connection.
    assert daemon.log.count("cannot watch fd") < 10
    _close_all(crowd)
    wait_until(lambda: _echo_ok(port), what="new connections served after the crowd left")
    first.close()


def test_epoll_holds_more_than_1024_connections(start_muxd) -> None:
    raise_own_nofile(4096)
    port = free_port()
    start_muxd(server_config(port, "epoll", nofile=4096))
    crowd = _open_many(port, 1500)
    for sock in crowd[::50] + crowd[-5:]:
        assert echo_once(sock, b"ok") == b"ok"
    _close_all(crowd)


def _echo_ok(port: int) -> bool:
    try:
        with connect(port, timeout=2) as sock:
            return echo_once(sock, b"ping") == b"ping"
    except OSError:
        return False


def test_out_of_descriptors_neither_spins_nor_stalls_the_listener(start_muxd, backend) -> None:
    raise_own_nofile(1024)
    port = free_port()
    # A hard limit of 64: a handful for the daemon itself, the rest for clients.
    daemon = start_muxd(server_config(port, backend, nofile=64), nofile=(64, 64))
    crowd = _open_many(port, 120)
    daemon.wait_log("out of file descriptors")
    # Clients beyond the limit are closed promptly instead of hanging in the queue.
    assert sees_connection_end(crowd[-1], timeout=5), "a queued client was stranded"
    cpu_before = daemon.cpu_seconds()
    time.sleep(1.0)  # measuring a quiet second, not synchronising
    assert daemon.cpu_seconds() - cpu_before < 0.3, "the loop spins at EMFILE"
    accepted = [sock for sock in crowd[:40] if _still_echoes(sock)]
    assert accepted, "no connection below the limit is being served"
    _close_all(crowd)
    wait_until(lambda: _echo_ok(port), what="the listener to serve again once fds are free")
    assert daemon.process.poll() is None


def _still_echoes(sock: socket.socket) -> bool:
    try:
        sock.settimeout(2)
        return echo_once(sock, b"x") == b"x"
    except OSError:
        return False
