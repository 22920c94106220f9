"""Hand-over through the file descriptor store, with the test playing PID 1.

``FdStoreSystemd`` (fake_systemd.py) receives what muxd stores the way systemd
does and starts the next muxd with it (LISTEN_FDS/LISTEN_FDNAMES/LISTEN_PID).
A restart is what the unit's stop hook and systemd do: SIGURG, then SIGTERM.
The booted-systemd versions of these are in tests/systemd/test_systemd_handover.py.
"""

from __future__ import annotations

import os
import signal
import socket
import tempfile

import pytest
from daemon_harness import (
    connect,
    connect_slow_reader,
    echo_once,
    free_port,
    push_until_stalled,
    recv_exactly,
    recv_until_eof,
    server_config,
    wait_until,
)
from fake_systemd import Unit

from muxd.handover import STATE_MAGIC


def test_restart_keeps_every_connection_with_its_pending_echo_and_half_close(
        pid1, start_muxd, tmp_path) -> None:
    port = free_port()
    unit = Unit(pid1, start_muxd, server_config(port, buffer_size=65536), tmp_path)
    first = unit.daemon
    talker = connect(port)
    assert echo_once(talker, b"before") == b"before"
    slow = connect_slow_reader(port)
    stream = os.urandom(16 << 20)
    slow_sent = push_until_stalled(slow, stream)  # muxd holds pending echo and paused
    closer = connect_slow_reader(port)
    closer_sent = push_until_stalled(closer, stream)
    closer.shutdown(socket.SHUT_WR)  # half-closed, with echo still owed to it
    wait_until(lambda: pid1.count("conn") == 3, what="three connections in the store")

    second = unit.restart()
    assert second.pid != first.pid
    second.wait_log(f"took over 3 connections and 1 listeners from PID {first.pid}")
    assert "KiB of pending echo" in second.log
    assert pid1.removals and pid1.removals[0].startswith("state-")
    assert not any(name.startswith("state-") for name in pid1.names())

    assert echo_once(talker, b"after") == b"after"
    slow.settimeout(10)
    assert recv_exactly(slow, slow_sent) == stream[:slow_sent]
    closer.settimeout(10)
    assert recv_until_eof(closer) == stream[:closer_sent]
    with connect(port) as fresh:  # the kept listener serves new clients
        assert echo_once(fresh, b"new") == b"new"

    third = unit.restart()  # and once more, from the process that took over
    third.wait_log(f"took over 2 connections and 1 listeners from PID {second.pid}")
    assert echo_once(talker, b"again") == b"again"
    assert echo_once(slow, b"slow") == b"slow"

    # A plain stop: echo, then the end, and nothing left in the store.
    third.signal(signal.SIGTERM)
    assert third.wait() == 0
    talker.settimeout(5)
    assert talker.recv(10) == b""
    assert recv_until_eof(slow) == b""
    wait_until(lambda: pid1.count("conn") == 0, what="the store to drop the closed connections")
    for sock in (talker, slow, closer):
        sock.close()


def test_a_closed_connection_leaves_the_store_so_its_peer_sees_the_end(
        pid1, start_muxd, tmp_path) -> None:
    port = free_port()
    Unit(pid1, start_muxd, server_config(port, idle_timeout=0.3), tmp_path)
    idle = connect(port)
    assert echo_once(idle, b"x") == b"x"
    wait_until(lambda: pid1.count("conn") == 1, what="the connection in the store")
    idle.settimeout(5)
    assert idle.recv(10) == b""  # idle_timeout closed it, and the store's copy went too
    wait_until(lambda: pid1.count("conn") == 0, what="the store to drop it")
    idle.close()


def test_kill_9_loses_at_most_the_echo_held_in_memory(pid1, start_muxd, tmp_path) -> None:
    port = free_port()
    buffer_size = 65536
    unit = Unit(pid1, start_muxd, server_config(port, buffer_size=buffer_size), tmp_path)
    first = unit.daemon
    talker = connect(port)
    assert echo_once(talker, b"before") == b"before"
    slow = connect_slow_reader(port)
    stream = os.urandom(16 << 20)
    sent = push_until_stalled(slow, stream)
    wait_until(lambda: pid1.count("conn") == 2, what="both connections in the store")

    second = unit.crash()
    second.wait_log("took over 2 connections and 1 listeners without hand-over state")
    assert second.pid != first.pid
    assert echo_once(talker, b"after") == b"after"
    # The slow reader gets its stream with one gap: what muxd held in memory.
    slow.settimeout(0.5)
    received = bytearray()
    while True:
        try:
            chunk = slow.recv(1 << 20)
        except TimeoutError:
            break
        assert chunk, "the connection ended"
        received += chunk
    gap_at = next((i for i in range(len(received)) if received[i] != stream[i]), len(received))
    tail = bytes(received[gap_at:])
    resumed = stream.find(tail[:4096], gap_at) if tail else gap_at
    assert resumed >= gap_at
    lost = resumed - gap_at
    assert lost <= buffer_size, f"lost {lost} bytes"  # README: at most buffer_size
    assert bytes(received) == stream[:gap_at] + stream[resumed:resumed + len(tail)]
    assert gap_at + lost + len(tail) <= sent
    second.stop()
    talker.close()
    slow.close()


def test_foreign_and_damaged_descriptors_are_dropped_and_muxd_serves(
        pid1, start_muxd, tmp_path) -> None:
    port = free_port()
    with tempfile.TemporaryFile() as regular:
        regular.write(b"not a socket")
        regular.flush()
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        corrupt = os.memfd_create("corrupt")
        os.write(corrupt, STATE_MAGIC + b"\xff" * 40)
        foreign = os.memfd_create("foreign")
        os.write(foreign, b"PK\x03\x04 someone else's state")
        stray = socket.socket()
        stray.bind(("127.0.0.1", 0))
        stray.listen()
        pid1.store_foreign(regular.fileno(), "conn")
        pid1.store_foreign(regular.fileno(), "listen")
        pid1.store_foreign(udp.fileno(), "conn")
        pid1.store_foreign(corrupt, "state-1")
        pid1.store_foreign(foreign, "state-2")
        pid1.store_foreign(stray.fileno(), "listen")
        for fd in (corrupt, foreign):
            os.close(fd)
        udp.close()
        stray_port = stray.getsockname()[1]
        stray.close()
        unit = Unit(pid1, start_muxd, server_config(port), tmp_path)
    log = unit.daemon.log
    assert "dropped inherited fd" in log and "regular file" in log
    assert "IPv4 datagram socket" in log
    assert "ignored the hand-over state" in log and "damaged header" in log and "no magic" in log
    assert f"its address 127.0.0.1:{stray_port} is no longer in [server] listen" in log
    with connect(port) as sock:
        assert echo_once(sock, b"serving") == b"serving"
    with pytest.raises(ConnectionRefusedError):
        connect(stray_port)  # the dropped listener stopped listening
    # The foreign ones are gone, and so is the connection its client closed.
    wait_until(lambda: pid1.names() == ["listen"], what="only muxd's listener left in the store")


def test_a_full_store_keeps_what_fits_and_closes_the_rest_gracefully(
        pid1, start_muxd, tmp_path) -> None:
    port = free_port()
    # 1 listener + 1 state + 2 connections.
    unit = Unit(pid1, start_muxd, server_config(port), tmp_path, store_size=4)
    clients = [connect(port) for _ in range(5)]
    for index, sock in enumerate(clients):
        assert echo_once(sock, b"%d" % index) == b"%d" % index
    unit.daemon.wait_log("the file descriptor store is full")
    old = unit.daemon
    new = unit.restart()
    assert "3 connection(s) were not in the file descriptor store: closing them" in old.log
    new.wait_log("took over 2 connections")
    kept = 0
    for sock in clients:
        sock.settimeout(5)
        sock.sendall(b"ping")
        try:
            data = sock.recv(10)
        except ConnectionResetError:
            data = b""
        kept += data == b"ping"
    assert kept == 2
    for sock in clients:
        sock.close()


def test_sigterm_without_the_stop_hook_is_the_graceful_stop(pid1, start_muxd, tmp_path) -> None:
    port = free_port()
    unit = Unit(pid1, start_muxd, server_config(port), tmp_path)
    sock = connect(port)
    assert echo_once(sock, b"x") == b"x"
    wait_until(lambda: pid1.count("conn") == 1, what="the connection in the store")
    unit.daemon.signal(signal.SIGTERM)
    assert unit.daemon.wait() == 0
    assert "handing over" not in unit.daemon.log
    sock.settimeout(5)
    assert sock.recv(10) == b""
    wait_until(lambda: pid1.names() == [], what="an empty store after a stop")
    sock.close()




def test_a_proxied_connection_is_stored_once_its_header_is_read_and_kept_at_restart(
        pid1, start_muxd, tmp_path) -> None:
    """With proxy_protocol, admission happens when the header has been read, outside an
    accepting turn; the connection must be in the store all the same, and the next
    process must serve it as echo (its header is gone), not wait for a header again."""
    port = free_port()
    config = server_config(port).replace(
        "[limits]", "proxy_protocol = yes\nproxy_from = 127.0.0.1\n[limits]")
    unit = Unit(pid1, start_muxd, config, tmp_path)
    first = unit.daemon
    client = connect(port)
    client.sendall(b"PROXY TCP4 192.0.2.7 192.0.2.1 40000 7\r\n")
    assert echo_once(client, b"before") == b"before"
    wait_until(lambda: pid1.count("conn") == 1, what="the proxied connection in the store")

    second = unit.restart()
    second.wait_log(f"took over 1 connections and 1 listeners from PID {first.pid}")
    assert echo_once(client, b"PROXY after") == b"PROXY after"  # echo, not a header
    client.close()
