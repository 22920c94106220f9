"""Echo behaviour, written once and run against every backend."""

from __future__ import annotations

import os
import random
import socket
import threading
import time

from daemon_harness import (
    connect,
    connect_slow_reader,
    echo_once,
    free_port,
    push_until_stalled,
    recv_exactly,
    recv_until_eof,
    sees_connection_end,
    server_config,
    wait_until,
)

from muxd.loop import ECHO_VIEWS


def _exchange_in_random_chunks(port: int, payload: bytes, seed: int) -> bytes:
    """Send ``payload`` in random chunk sizes while reading back concurrently."""
    rng = random.Random(seed)
    sock = connect(port, timeout=30)
    received = bytearray()

    def reader() -> None:
        while len(received) < len(payload):
            chunk = sock.recv(rng.choice((1, 7, 1000, 65536, 300_000)))
            if not chunk:
                return
            received.extend(chunk)

    thread = threading.Thread(target=reader)
    thread.start()
    offset = 0
    while offset < len(payload):
        size = rng.choice((1, 13, 512, 4096, 65536, 200_000))
        sock.sendall(payload[offset:offset + size])
        offset += size
    thread.join(60)
    sock.close()
    return bytes(received)


def test_many_clients_get_exact_echo_of_large_random_payloads(start_muxd, backend) -> None:
    port = free_port()
    start_muxd(server_config(port, backend))
    payloads = [os.urandom(random.randint(1, 3 << 20)) for _ in range(12)]
    results: list[bytes | None] = [None] * len(payloads)

    def client(index: int) -> None:
        results[index] = _exchange_in_random_chunks(port, payloads[index], seed=index)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(payloads))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for index, payload in enumerate(payloads):
        assert results[index] == payload, f"client {index}: echo differs"


def test_half_close_gets_everything_echoed_then_eof(start_muxd, backend) -> None:
    port = free_port()
    start_muxd(server_config(port, backend, buffer_size=4096))
    payload = os.urandom(2 << 20)  # far beyond buffer_size: pausing and resuming on the way
    sock = connect(port, timeout=30)
    writer = threading.Thread(target=lambda: (sock.sendall(payload),
                                              sock.shutdown(socket.SHUT_WR)))
    writer.start()
    assert recv_until_eof(sock) == payload
    writer.join(10)
    sock.close()


def test_tiny_messages_one_at_a_time(start_muxd, backend) -> None:
    port = free_port()
    start_muxd(server_config(port, backend))
    with connect(port) as sock:
        for index in range(200):
            message = f"line {index}\n".encode()
            assert echo_once(sock, message) == message


def test_messages_of_more_lengths_than_the_loop_keeps_views_for(start_muxd, backend) -> None:
    # The fast path echoes through views of the receive buffer kept by length (loop.py,
    # ECHO_VIEWS), emptied when full: every length, before and after, echoes exactly.
    port = free_port()
    start_muxd(server_config(port, backend))
    rng = random.Random(12)
    lengths = [*range(1, 2 * ECHO_VIEWS + 10), *range(3 * ECHO_VIEWS, 0, -1)]
    with connect(port) as sock:
        for length in lengths:
            message = rng.randbytes(length)
            assert echo_once(sock, message) == message, f"a message of {length} bytes"
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b""  # and not a byte more


def test_client_that_never_reads_costs_bounded_memory_and_hurts_nobody(
    start_muxd, backend
) -> None:
    port = free_port()
    daemon = start_muxd(server_config(port, backend, buffer_size=65536))
    with connect(port) as warmup:
        assert echo_once(warmup, b"warm") == b"warm"
    rss_before = daemon.rss_bytes()
    hog = connect_slow_reader(port)
    push_until_stalled(hog, os.urandom(65536))
    growth = daemon.rss_bytes() - rss_before
    assert growth < 8 << 20, f"RSS grew {growth} bytes for one client that never reads"
    with connect(port) as polite:  # others are still served promptly
        payload = os.urandom(100_000)
        assert echo_once(polite, payload) == payload
    hog.close()


def test_idle_connection_is_closed_and_busy_one_is_not(start_muxd, backend) -> None:
    port = free_port()
    start_muxd(server_config(port, backend, idle_timeout=0.6))
    idle = connect(port)
    busy = connect(port)
    started = time.monotonic()
    while time.monotonic() - started < 1.5:  # busy: a byte every 0.1 s, so never idle
        assert echo_once(busy, b"x") == b"x"
        time.sleep(0.1)
    assert sees_connection_end(idle, timeout=0.1), "idle connection still open after 1.5 s"
    assert echo_once(busy, b"still here") == b"still here"
    idle.close()
    busy.close()


def test_max_connections_refuses_the_extra_one_and_serves_the_rest(start_muxd, backend) -> None:
    port = free_port()
    daemon = start_muxd(server_config(port, backend, max_connections=3))
    held = [connect(port) for _ in range(3)]
    for sock in held:  # each is really accepted before the next test step
        assert echo_once(sock, b"hi") == b"hi"
    extra = connect(port)
    assert sees_connection_end(extra, timeout=5), "the 4th connection was not closed"
    for sock in held:
        assert echo_once(sock, b"ok") == b"ok"
    daemon.wait_log("[limits] max_connections (3) reached")
    held[0].close()
    wait_until(lambda: _echoes(port), what="a free slot to be served again")
    for sock in held[1:]:
        sock.close()


def _echoes(port: int) -> bool:
    with connect(port) as sock:
        sock.sendall(b"ping")
        sock.settimeout(1)
        try:
            return recv_exactly(sock, 4) == b"ping"
        except (ConnectionResetError, TimeoutError):
            return False


def test_reset_mid_stream_does_not_disturb_others(start_muxd, backend) -> None:
    port = free_port()
    daemon = start_muxd(server_config(port, backend))
    survivor = connect(port)
    for _ in range(20):
        rude = connect(port)
        rude.sendall(os.urandom(200_000))
        rude.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        rude.close()  # RST with echo still in flight
    payload = os.urandom(300_000)
    assert echo_once(survivor, payload) == payload
    survivor.close()
    assert daemon.process.poll() is None


def test_large_buffer_and_slow_reader_keep_every_byte_in_order(start_muxd, backend) -> None:
    # With a big buffer_size the pending echo outgrows the free space in the
    # daemon's send buffer, so flushing it takes partial writes: the path a
    # small buffer on loopback never reaches.
    port = free_port()
    start_muxd(server_config(port, backend, buffer_size=8 << 20))
    sock = connect_slow_reader(port)
    payload = os.urandom(24 << 20)
    writer = threading.Thread(target=sock.sendall, args=(payload,))
    writer.start()
    received = bytearray()
    sock.settimeout(30)
    while len(received) < len(payload):
        chunk = sock.recv(8192)
        assert chunk, "connection ended early"
        received += chunk
        if len(received) % (256 << 10) < 8192:
            time.sleep(0.001)  # pacing the reader (load shape), not synchronisation
    writer.join(30)
    sock.close()
    assert bytes(received) == payload
