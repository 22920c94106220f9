"""Hand-over through the file descriptor store, with the test playing PID 1.

``FdStoreSystemd`` (fake_systemd.py) receives what muxd stores the way systemd
does and starts the next muxd with it (LISTEN_FDS/LISTEN_FDNAMES/LISTEN_PID).
A restart is what the unit's stop hook and systemd do: SIGURG, then SIGTERM.
The booted-systemd versions of these are in tests/systemd/test_systemd_handover.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import tempfile

import pytest
from daemon_harness import (
    connect,
    connect_slow_reader,
    echo_once,
    free_port,
    push_until_stalled,
    raise_own_nofile,
    recv_exactly,
    recv_until_eof,
    server_config,
    wait_until,
)
from fake_systemd import Unit
from test_proxy_protocol_daemon import (
    BALANCER,
    connect_from,
    held,
    proxied_config,
    served,
    tlv,
    v1,
    v2,
)

from muxd.handover import STATE_MAGIC, decode_state


def test_an_idle_restart_says_there_was_nothing_to_take_over(pid1, start_muxd, tmp_path) -> None:
    # Not "took over 0 connections and 1 listeners ... 0 KiB of pending echo" at every
    # restart of an idle muxd: one short line naming the previous process.
    port = free_port()
    unit = Unit(pid1, start_muxd, server_config(port), tmp_path)
    first = unit.daemon
    second = unit.restart()
    second.wait_log(f"no connection to take over from PID {first.pid} (muxd ")
    assert "took over" not in second.log, second.log
    with connect(port) as fresh:
        assert echo_once(fresh, b"served") == b"served"


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
    # Echo is checked against stream[:sent]: a wrapped (cyclic) send would not match it.
    assert max(slow_sent, closer_sent) < len(stream)
    closer.shutdown(socket.SHUT_WR)  # half-closed, with echo still owed to it
    wait_until(lambda: pid1.parked() == 3, what="three connections parked")

    second = unit.restart()
    assert second.pid != first.pid
    second.wait_log(f"took over 3 connections and 1 listeners from PID {first.pid}")
    assert "KiB of pending echo" in second.log
    assert pid1.removals and pid1.removals[0].startswith("state-")
    assert not any(name.startswith("state-") and not name.startswith("state-park-")
               for name in pid1.names())

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
    wait_until(lambda: pid1.segments() == 0, what="the store to drop the parking sockets")
    for sock in (talker, slow, closer):
        sock.close()


def test_a_closed_connection_leaves_the_store_so_its_peer_sees_the_end(
        pid1, start_muxd, tmp_path) -> None:
    port = free_port()
    Unit(pid1, start_muxd, server_config(port, idle_timeout=0.3), tmp_path)
    idle = connect(port)
    assert echo_once(idle, b"x") == b"x"
    wait_until(lambda: pid1.parked() == 1, what="the connection parked")
    idle.settimeout(5)
    assert idle.recv(10) == b""  # idle_timeout closed it: shut down, the parked copy too
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
    assert sent < len(stream)  # checked against stream[:sent]: a wrapped send would not match
    wait_until(lambda: pid1.parked() == 2, what="both connections parked")

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
    wait_until(lambda: sorted(pid1.names())[0] == "listen" and len(pid1.names()) == 2
               and pid1.segments() == 1,
               what="only muxd's listener and its parking socket left in the store")


def test_a_store_of_four_entries_keeps_hundreds_of_connections(
        pid1, start_muxd, tmp_path) -> None:
    """The store holds the listener, one parking socket and, at a hand-over, the state:
    never one entry per connection (the release before stored each connection: a
    store of 4 kept 2 of them)."""
    raise_own_nofile(2000)
    port = free_port()
    pid1.store_max = 4
    unit = Unit(pid1, start_muxd, server_config(port), tmp_path, store_size=4)
    clients = [connect(port) for _ in range(300)]
    for index, sock in enumerate(clients):
        assert echo_once(sock, b"%d" % index) == b"%d" % index
    wait_until(lambda: pid1.parked() == 300, what="300 connections parked")
    # The listener and one parking socket (two if the accepts took over 200 loop turns).
    assert len(pid1.names()) <= 3, pid1.names()
    new = unit.restart()
    new.wait_log("took over 300 connections")
    assert pid1.closed_over_max == 0
    assert len(pid1.names()) == 2, pid1.names()  # the state read and removed, one segment
    for index, sock in enumerate(clients):
        assert echo_once(sock, b"again %d" % index) == b"again %d" % index
        sock.close()


def test_connections_that_cannot_be_parked_are_served_counted_and_closed_gracefully(
        pid1, start_muxd, tmp_path) -> None:
    """Descriptors in flight stay under the soft RLIMIT_NOFILE (here 128; a quarter is
    kept back for replacing parking sockets): the 97th connection is served but not
    kept, and the restart lets it read its echo and then ends it (a FIN, not a reset)."""
    port = free_port()
    unit = Unit(pid1, start_muxd, server_config(port), tmp_path, nofile=(128, 128))
    kept = [connect(port) for _ in range(96)]
    for sock in kept:
        assert echo_once(sock, b"k") == b"k"
    wait_until(lambda: pid1.parked() == 96, what="96 connections parked")
    beyond = connect(port)
    beyond.sendall(b"owed")  # and not read before the restart
    unit.daemon.wait_log("could not park 1 connection(s)")
    old = unit.daemon
    new = unit.restart()
    assert "1 connection(s) were not kept for the next process (not parked)" in old.log
    new.wait_log("took over 96 connections")
    beyond.settimeout(10)
    assert recv_until_eof(beyond) == b"owed"  # its echo, then the end (not a reset)
    for sock in kept:
        assert echo_once(sock, b"after") == b"after"
        sock.close()
    beyond.close()


def test_sigterm_without_the_stop_hook_is_the_graceful_stop(pid1, start_muxd, tmp_path) -> None:
    port = free_port()
    unit = Unit(pid1, start_muxd, server_config(port), tmp_path)
    sock = connect(port)
    assert echo_once(sock, b"x") == b"x"
    wait_until(lambda: pid1.parked() == 1, what="the connection parked")
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
    wait_until(lambda: pid1.parked() == 1, what="the proxied connection parked")

    second = unit.restart()
    second.wait_log(f"took over 1 connections and 1 listeners from PID {first.pid}")
    assert echo_once(client, b"PROXY after") == b"PROXY after"  # echo, not a header
    client.close()


# --- behind a balancer: the client a PROXY header named -------------------------


def unread_by_muxd(client: socket.socket) -> int:
    """Bytes ``client`` sent that muxd's end has not read yet (its receive queue,
    from /proc/net/tcp), so a test knows muxd has taken a partial header."""
    def hex_address(host: str, port: int) -> str:
        return f"{int.from_bytes(socket.inet_aton(host), 'little'):08X}:{port:04X}"

    server, peer = hex_address(*client.getpeername()), hex_address(*client.getsockname())
    with open("/proc/net/tcp") as table:
        for line in table:
            fields = line.split()
            if fields[1:3] == [server, peer]:
                return int(fields[4].split(":")[1], 16)
    raise AssertionError("muxd's end of the connection is not in /proc/net/tcp")


def format_1(data: bytes) -> bytes:
    """A state as the previous format wrote it: no "format", "clients", "waiting"."""
    state = decode_state(data)
    records = list(state.records.values())
    header = json.dumps({
        "pid": state.pid, "version": state.version, "written": state.written,
        "connections": [[r.inode, r.bytes_in, r.flags, len(r.pending)] for r in records],
    }).encode()
    return b"".join([STATE_MAGIC, struct.pack("!Q", len(header)), header,
                     *(r.pending for r in records)])


def test_a_proxied_connection_keeps_the_client_its_header_named_across_a_restart(
        pid1, start_muxd, tmp_path) -> None:
    """Limits, grouping, the log and a reload's regrouping see the client the header
    named, after the restart exactly as before it (not the balancer, 127.0.0.1)."""
    port = free_port()
    unit = Unit(pid1, start_muxd, proxied_config(port, max_connections_per_ip=2), tmp_path)
    first = unit.daemon
    mine = [held(port, v1("198.51.100.7", 40000 + index)) for index in range(2)]
    other = held(port, v2("2001:db8::9", 41000))
    assert not served(port, v1("198.51.100.7"))  # at its limit
    wait_until(lambda: pid1.parked() == 3, what="the proxied connections parked")

    second = unit.restart()
    second.wait_log(f"took over 3 connections and 1 listeners from PID {first.pid}")
    assert "without the client" not in second.log
    assert not served(port, v1("198.51.100.7"))  # its two are still counted under it
    second.wait_log("max_connections_per_ip (2) reached for 198.51.100.7")
    assert served(port, v1("198.51.100.8"))
    for sock in (*mine, other):
        assert echo_once(sock, b"after") == b"after"
    mine.pop(0).close()
    second.wait_log("disconnect 198.51.100.7:40000 (eof)")
    wait_until(lambda: served(port, v1("198.51.100.7")), what="its freed slot, counted back")

    # A reload's new limit regroups the taken-over connections by their clients too.
    unit.config_path.write_text(proxied_config(port, max_connections_per_ip=1))
    second.signal(signal.SIGHUP)
    second.notify.wait_for("READY", "1")
    assert not served(port, v1("198.51.100.7"))  # holds one
    assert not served(port, v2("2001:db8::1"))  # the /64 of 2001:db8::9 holds one
    assert served(port, v1("198.51.100.8"))
    for sock in (*mine, other):
        sock.close()


def test_connections_waiting_for_their_header_are_handed_over_with_what_was_read(
        pid1, start_muxd, tmp_path) -> None:
    """Not admitted yet, so not in the store while serving: stored at hand-over with
    the header as far as it had come (a v1 line in part, a v2 header into its TLVs,
    nothing yet), and the next process reads each on from there."""
    port = free_port()
    unit = Unit(pid1, start_muxd, proxied_config(port), tmp_path)
    first = unit.daemon
    line = v1("198.51.100.9", 40009)
    binary = v2("2001:db8::5", 40005, tlv(0x04, os.urandom(600)))
    cut_line, cut_binary = 20, 16 + 36 + 300
    half_line, half_binary, silent = (connect_from(port) for _ in range(3))
    half_line.sendall(line[:cut_line])
    half_binary.sendall(binary[:cut_binary])
    assert served(port, v1("198.51.100.1"))  # accepted after the three: they are in
    for sock in (half_line, half_binary):
        wait_until(lambda sock=sock: unread_by_muxd(sock) == 0, what="muxd to read its part")

    second = unit.restart()
    first.wait_log("handing over 0 connection(s) and 3 waiting for a PROXY header")
    second.wait_log("took over 3 connections (3 still waiting for a PROXY header) and "
                    f"1 listeners from PID {first.pid}")
    assert pid1.count("state-wait") == 0, "read once, and out of the store"
    for sock, rest in ((half_line, line[cut_line:]), (half_binary, binary[cut_binary:]),
                       (silent, v1("198.51.100.10", 40010))):
        payload = b"after the header: " + os.urandom(100)
        sock.sendall(rest + payload)
        assert recv_exactly(sock, len(payload)) == payload
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b"", "more than the payload came back"
        sock.close()
    for client in ("198.51.100.9:40009", "[2001:db8::5]:40005", "198.51.100.10:40010"):
        second.wait_log(f"disconnect {client} (eof)")


def test_a_format_1_state_is_read_and_its_proxied_clients_are_counted_under_none(
        pid1, start_muxd, tmp_path) -> None:
    """A state of the previous format (an upgrade from it) keeps every pending echo;
    the clients the headers named are not in it, so those connections count under
    no client: neither under their clients nor under the balancer."""
    port = free_port()
    unit = Unit(pid1, start_muxd, proxied_config(port, max_connections_per_ip=1,
                                                 buffer_size=65536), tmp_path)
    mine = held(port, v1("198.51.100.7"))
    slow = connect_slow_reader(port)
    slow.sendall(v1("198.51.100.8"))
    stream = os.urandom(16 << 20)
    sent = push_until_stalled(slow, stream)
    assert sent < len(stream)  # checked against stream[:sent]: a wrapped send would not match
    wait_until(lambda: pid1.parked() == 2, what="both parked")
    old = unit.hand_over()
    pid1.rewrite("state-", format_1)
    second = unit.start()
    second.wait_log(f"took over 2 connections and 1 listeners from PID {old.pid}")
    assert "KiB of pending echo" in second.log
    assert ("2 proxied connection(s) taken over without the client their PROXY header "
            "named (a format-1 hand-over state)") in second.log
    slow.settimeout(10)
    assert recv_exactly(slow, sent) == stream[:sent]  # the state was read
    assert echo_once(mine, b"after") == b"after"
    assert served(port, v1(BALANCER))  # (HAProxy's v1 check names the balancer itself)
    assert served(port, v1("198.51.100.7"))
    for sock in (mine, slow):
        sock.close()


def test_after_a_crash_proxied_connections_count_under_no_client_not_the_balancer(
        pid1, start_muxd, tmp_path) -> None:
    port = free_port()
    unit = Unit(pid1, start_muxd, proxied_config(port, max_connections_per_ip=1), tmp_path)
    mine = held(port, v1("198.51.100.7"))
    wait_until(lambda: pid1.parked() == 1, what="the connection parked")
    second = unit.crash()
    second.wait_log("took over 1 connections and 1 listeners without hand-over state")
    assert ("1 proxied connection(s) taken over without the client their PROXY header named "
            "(no hand-over state: a crash)") in second.log
    assert echo_once(mine, b"after") == b"after"
    assert served(port, v1(BALANCER))  # not refused as if the balancer held one
    assert served(port, v1("198.51.100.7"))  # its client is not known any more
    mine.close()


def test_the_state_is_written_from_and_read_into_each_connections_buffer() -> None:
    """write_state writes each pending echo straight from its buffer into the memfd and
    read_state keeps only the header, reading each pending echo when asked; a state of
    format 2 (no "parked") and one of format 1 read the same way."""
    from muxd.handover import Record, encode_state, read_state, write_state

    pending = [bytearray(os.urandom(size)) for size in (0, 1, 70_000)]
    records = [Record(100 + index, 10 * index, index, data) for index, data in
               enumerate(pending)]
    fd = write_state(1234, "0.1.0", records, closed=2, parked=3)
    try:
        # The layout encode_state describes (the bytes differ only in "written").
        whole = decode_state(os.pread(fd, os.fstat(fd).st_size, 0))
        assert [whole.records[r.inode].pending for r in records] == pending
        state = read_state(os.dup(fd))
    finally:
        os.close(fd)
    assert state.parked == 3 and state.closed == 2 and state.pending_bytes == 70_001
    for record, data in zip(records, pending, strict=True):
        read = state.records[record.inode]
        assert read.pending == b"" and state.read_pending(read) == data
    state.close()
    def format_2(data: bytes) -> bytes:
        """As the release before parking wrote it: the same, without "parked"."""
        (length,) = struct.unpack_from("!Q", data, len(STATE_MAGIC))
        start = len(STATE_MAGIC) + 8
        header = json.loads(data[start:start + length])
        del header["parked"]
        header["format"] = 2
        text = json.dumps(header).encode()
        return STATE_MAGIC + struct.pack("!Q", len(text)) + text + data[start + length:]

    for older in (format_1, format_2):
        text = older(encode_state(1234, "0.1.0", records, closed=2, parked=3))
        copy = os.memfd_create("older")
        os.write(copy, text)
        state = read_state(copy)
        assert state.parked == -1
        assert [state.read_pending(state.records[r.inode]) for r in records] == pending
        state.close()


def test_a_socket_units_unix_stream_connections_are_kept_one_store_entry_each(
        pid1, start_muxd, tmp_path) -> None:
    # A socket unit with ListenStream=/path: its connections are AF_UNIX, which are
    # never parked (the kernel's unix garbage collector would get involved), but they
    # were kept across restarts before parking and must still be: one store entry each,
    # as before, dropped by PID 1 when the connection is shut down.
    path = str(tmp_path / "echo.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    pid1.store_foreign(listener.fileno(), "muxd.socket", poll=False)  # the socket unit's
    listener.close()
    unit = Unit(pid1, start_muxd, server_config(free_port()), tmp_path)

    def unix_client() -> socket.socket:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(10)
        client.connect(path)
        return client

    kept, closing = unix_client(), unix_client()
    assert echo_once(kept, b"before") == b"before"
    assert echo_once(closing, b"before") == b"before"
    wait_until(lambda: pid1.count("conn") == 2, what="both unix connections in the store")
    closing.shutdown(socket.SHUT_WR)
    assert recv_until_eof(closing) == b""  # muxd's end: the stored copy does not hold it
    closing.close()
    wait_until(lambda: pid1.count("conn") == 1, what="PID 1 to drop the closed one")
    unit.restart()
    assert echo_once(kept, b"after a restart") == b"after a restart"
    unit.crash()
    assert echo_once(kept, b"after a crash") == b"after a crash"
    unit.daemon.wait_log("took over 1 connection")
    kept.close()
