"""Parking (muxd/parking.py): systemd's store holds a few parking sockets, never one entry
per connection; dead connections are compacted away; what a crash, a compaction cut
short, too few descriptor slots, an in-flight limit and an upgrade from one store entry
per connection leave, and how the next process takes each over.

The test plays PID 1 (fake_systemd.py), as in test_handover.py; the booted-systemd
versions are in tests/systemd/.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
from array import array

from daemon_harness import (
    connect,
    echo_once,
    free_port,
    raise_own_nofile,
    recv_until_eof,
    server_config,
    wait_until,
)
from fake_systemd import Unit

PARK = "state-park-"


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def drain(fd: int) -> list[int]:
    """Every descriptor parked in a parking socket (its writer is gone)."""
    sock = socket.socket(fileno=os.dup(fd))
    sock.setblocking(False)
    fds: list[int] = []
    with sock:
        while True:
            try:
                data, ancillary, _, _ = sock.recvmsg(256, socket.CMSG_SPACE(253 * 4))
            except BlockingIOError:
                break
            if not data and not ancillary:
                break
            for _, _, payload in ancillary:
                received = array("i")
                received.frombytes(payload[:len(payload) - len(payload) % 4])
                fds.extend(received)
    return fds


def parking_socket_holding(fds: list[int]) -> socket.socket:
    """A parking socket's receive end with ``fds`` in flight, as muxd leaves one."""
    receiver, sender = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sender.sendmsg([bytes(len(fds))], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", fds))])
    sender.close()
    return receiver


def park_names(pid1) -> list[str]:
    return [name for name in pid1.names() if name.startswith(PARK)]


def test_closed_connections_are_compacted_away_and_the_live_ones_kept(
        pid1, start_muxd, tmp_path) -> None:
    """One accepting turn per client (each echoes before the next connects): 260
    messages, so the first parking socket is sealed at 200. Once most of its connections
    have closed, its live ones move to the current one and it leaves the store, taking
    the dead sockets with it."""
    raise_own_nofile(2000)
    port = free_port()
    unit = Unit(pid1, start_muxd, server_config(port), tmp_path)
    clients = []
    for index in range(260):
        sock = connect(port)
        assert echo_once(sock, b"%d" % index) == b"%d" % index
        clients.append(sock)
    wait_until(lambda: pid1.parked() == 260, what="260 connections parked")
    first, second = park_names(pid1)
    for sock in clients[:150]:
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b""  # muxd closed it: the parked copy did not hold it
        sock.close()
    wait_until(lambda: first in pid1.removals, what="the first parking socket replaced")
    assert park_names(pid1) == [second]
    # 60 parked there, and the live ones moved in when the dead outnumbered them (after
    # the 101st close or so: the closes after it leave dead copies in the second one).
    assert 110 <= pid1.parked() <= 160, pid1.parked()
    new = unit.restart()
    new.wait_log("took over 110 connections")
    for index, sock in enumerate(clients[150:]):
        assert echo_once(sock, b"after %d" % index) == b"after %d" % index
        sock.close()


def test_slow_arrivals_do_not_multiply_parking_sockets(pid1, start_muxd, tmp_path) -> None:
    """1,500 connections, one per accepting turn: a parking socket is sealed every 200
    messages, and past four sealed ones they are merged (their connections parked again
    in full messages), so the store keeps a handful of entries."""
    raise_own_nofile(4000)
    port = free_port()
    unit = Unit(pid1, start_muxd, server_config(port), tmp_path)
    clients = []
    for _ in range(1500):
        sock = connect(port)
        assert echo_once(sock, b"x") == b"x"
        clients.append(sock)
    wait_until(lambda: len(park_names(pid1)) <= 6, what="at most six parking sockets")
    new = unit.restart()
    new.wait_log("took over 1500 connections")
    assert len(park_names(pid1)) == 1
    for sock in clients:
        assert echo_once(sock, b"y") == b"y"
        sock.close()


def test_a_crash_brings_back_the_live_connections_and_not_the_closed_ones(
        pid1, start_muxd, tmp_path) -> None:
    """A parking socket gives back every connection parked since it was made,
    including one muxd had closed: TCP_INFO's state tells it from the live ones."""
    port = free_port()
    unit = Unit(pid1, start_muxd, server_config(port), tmp_path)
    alive = [connect(port) for _ in range(2)]
    closed = connect(port)
    for sock in (*alive, closed):
        assert echo_once(sock, b"x") == b"x"
    wait_until(lambda: pid1.parked() == 3, what="three connections parked")
    closed.shutdown(socket.SHUT_WR)
    assert recv_until_eof(closed) == b""
    second = unit.crash()
    second.wait_log("took over 2 connections and 1 listeners without hand-over state")
    assert "parking sockets also held 1 connection(s) closed before the take-over" in second.log
    for sock in alive:
        assert echo_once(sock, b"after") == b"after"
        sock.close()
    closed.close()


def test_a_crash_in_the_middle_of_a_compaction_leaves_duplicates_taken_over_once(
        pid1, start_muxd, tmp_path) -> None:
    """A crash after the live connections were parked again but before the old parking
    socket left the store: both hold them. Duplicates go by (st_dev, st_ino)."""
    port = free_port()
    unit = Unit(pid1, start_muxd, server_config(port), tmp_path)
    clients = [connect(port) for _ in range(5)]
    for sock in clients:
        assert echo_once(sock, b"x") == b"x"
    wait_until(lambda: pid1.parked() == 5, what="five connections parked")
    unit.daemon.signal(signal.SIGKILL)
    unit.daemon.wait()
    (parked,) = pid1.take(PARK)
    fds = drain(parked)
    os.close(parked)
    assert len(fds) == 5
    for name in (f"{PARK}1-1", f"{PARK}1-2"):  # the old one and its replacement
        receiver = parking_socket_holding(fds)
        pid1.store_foreign(receiver.fileno(), name, poll=False)
        receiver.close()
    for fd in fds:
        os.close(fd)
    second = unit.start()
    second.wait_log("took over 5 connections")
    assert "5 duplicate(s)" in second.log
    wait_until(lambda: len(park_names(pid1)) == 1 and pid1.parked() == 5,
               what="one parking socket holding the five")
    for sock in clients:
        assert echo_once(sock, b"after") == b"after"
        sock.close()


def test_too_few_descriptor_slots_at_take_over_is_counted_as_loss(
        pid1, start_muxd, tmp_path) -> None:
    """The kernel installs only what fits the free descriptor slots, sets MSG_CTRUNC and
    closes the rest: muxd counts them (one payload byte per descriptor), logs them, and
    serves the others."""
    raise_own_nofile(2000)
    port = free_port()
    unit = Unit(pid1, start_muxd, server_config(port), tmp_path)
    clients = [connect(port) for _ in range(300)]
    for sock in clients:
        assert echo_once(sock, b"x") == b"x"
    wait_until(lambda: pid1.parked() == 300, what="300 connections parked")
    unit.hand_over()
    second = unit.start(nofile=(160, 160))
    second.wait_log("parked connection(s) lost at take-over")
    lost = int(re.search(r"(\d+) parked connection\(s\) lost", second.log).group(1))
    taken = int(re.search(r"took over (\d+) connections", second.log).group(1))
    assert lost > 0 and taken + lost == 300, (taken, lost)
    echoed = 0
    for sock in clients:
        sock.settimeout(5)
        try:
            sock.sendall(b"y")
            echoed += sock.recv(1) == b"y"
        except OSError:
            pass
        sock.close()
    assert echoed == taken


def test_an_upgrade_from_one_store_entry_per_connection_parks_them_and_removes_the_entries(
        pid1, start_muxd, tmp_path) -> None:
    """The release before parking stored its listener as "listen" and each connection
    as "conn" (here the test stores them as it did). The new one takes every one over,
    parks them, and removes the "conn" entries from the store."""
    port = free_port()
    listener = socket.create_server(("127.0.0.1", port))
    clients = [connect(port) for _ in range(3)]
    served = [listener.accept()[0] for _ in clients]
    pid1.store_foreign(listener.fileno(), "listen")
    for sock in served:
        pid1.store_foreign(sock.fileno(), "conn")
        sock.close()
    listener.close()
    unit = Unit(pid1, start_muxd, server_config(port), tmp_path)
    unit.daemon.wait_log("took over 3 connections and 1 listeners without hand-over state")
    wait_until(lambda: pid1.count("conn") == 0, what="the conn entries removed")
    assert "conn" in pid1.removals
    assert len(park_names(pid1)) == 1 and pid1.parked() == 3
    for sock in clients:
        assert echo_once(sock, b"upgraded") == b"upgraded"
    second = unit.crash()  # parked now: a crash keeps them
    second.wait_log("took over 3 connections")
    for sock in clients:
        assert echo_once(sock, b"again") == b"again"
        sock.close()


def test_every_held_connection_reconnecting_stays_under_the_in_flight_limit(
        pid1, start_muxd, tmp_path) -> None:
    """90 connections held, all reset at once and 90 new ones opened: the dead ones are
    still in flight until their parking sockets are replaced. With a soft
    RLIMIT_NOFILE of 128 (96 for new connections, a quarter kept back to move live
    ones) muxd replaces the parking sockets that hold the most dead, parks every new
    one, and a restart keeps them all."""
    port = free_port()
    unit = Unit(pid1, start_muxd, server_config(port), tmp_path, nofile=(128, 128))
    baseline = open_fds(unit.daemon.pid)
    first = []
    for _ in range(90):
        sock = connect(port)
        assert echo_once(sock, b"x") == b"x"
        first.append(sock)
    wait_until(lambda: pid1.parked() == 90, what="90 connections parked")
    for sock in first:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # a reset
    wait_until(lambda: open_fds(unit.daemon.pid) <= baseline + 2,
               what="muxd to close the reset connections")
    again = []
    for _ in range(90):
        sock = connect(port)
        assert echo_once(sock, b"y") == b"y"
        again.append(sock)
    daemon = unit.daemon
    if "could not park" in daemon.log:
        daemon.wait_log("parked again")
    new = unit.restart()
    assert "were not kept" not in daemon.log
    new.wait_log("took over 90 connections")
    for sock in again:
        assert echo_once(sock, b"z") == b"z"
        sock.close()
