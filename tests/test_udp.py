"""UDP echo (RFC 862) and its guard against reflection and packet loops."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest
from daemon_harness import free_port, server_config


def udp_config(tcp_port: int, udp: str, **limits: object) -> str:
    return server_config(tcp_port, **limits).replace("[limits]", f"udp = {udp}\n[limits]")


def udp_client(host: str = "127.0.0.1", port: int = 0,
               family: int = socket.AF_INET) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((host, port))
    sock.settimeout(5)
    return sock


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def dump_counters(daemon) -> str:
    """Ask for the counters (SIGUSR1) and return the line once it is logged."""
    before = daemon.log.count("UDP datagrams:")
    daemon.signal(signal.SIGUSR1)
    from daemon_harness import wait_until

    wait_until(lambda: daemon.log.count("UDP datagrams:") > before, what="the counters")
    return [line for line in daemon.log.splitlines() if "UDP datagrams:" in line][-1]


def test_datagrams_echo_whole_up_to_65507_bytes(start_muxd, backend) -> None:
    port = free_udp_port()
    start_muxd(udp_config(free_port(), f"127.0.0.1:{port}", backend=backend))
    client = udp_client()
    for size in (0, 1, 1400, 9000, 65507):
        payload = os.urandom(size)
        client.sendto(payload, ("127.0.0.1", port))
        data, sender = client.recvfrom(70000)
        assert (len(data), data == payload, sender) == (size, True, ("127.0.0.1", port))
    client.close()


def test_wildcard_socket_answers_from_the_address_it_was_sent_to(start_muxd) -> None:
    port = free_udp_port()
    daemon = start_muxd(udp_config(free_port(), f"[::]:{port}"))
    v4 = udp_client()
    for destination in ("127.0.0.1", "127.0.0.7"):
        v4.sendto(b"which address?", (destination, port))
        data, sender = v4.recvfrom(100)
        assert data == b"which address?"
        assert sender == (destination, port)  # not the first address of the host
    v6 = udp_client("::1", family=socket.AF_INET6)
    v6.sendto(b"six", ("::1", port))
    data, sender = v6.recvfrom(100)
    assert data == b"six" and sender[:2] == ("::1", port)
    assert "udp [::]:" in daemon.notify.messages[0]["STATUS"]
    v4.close()
    v6.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="binding a source port below 1024 needs root")
def test_source_port_below_1024_gets_no_answer(start_muxd) -> None:
    port = free_udp_port()
    daemon = start_muxd(udp_config(free_port(), f"127.0.0.1:{port}"))
    service = udp_client(port=19)  # as if chargen answered us
    service.sendto(b"loop?", ("127.0.0.1", port))
    daemon.wait_log("source port below 1024")
    service.settimeout(0.3)
    with pytest.raises(TimeoutError):
        service.recvfrom(100)
    assert "0 echoed, 1 dropped (source port below 1024 1)" in dump_counters(daemon)
    service.close()


def test_a_flood_from_one_address_is_cut_to_the_rate(start_muxd) -> None:
    port = free_udp_port()
    daemon = start_muxd(udp_config(free_port(), f"127.0.0.1:{port}", udp_rate=50))
    flooder = udp_client()
    started = time.monotonic()
    for index in range(250):  # within what the kernel queues for the daemon (~300 here)
        flooder.sendto(b"%d" % index, ("127.0.0.1", port))
    elapsed = time.monotonic() - started
    other = udp_client("127.0.0.2")  # another source keeps its own budget
    other.sendto(b"me too", ("127.0.0.1", port))
    assert other.recvfrom(100)[0] == b"me too"
    answered = 0
    flooder.settimeout(0.5)
    try:
        while True:
            flooder.recvfrom(100)
            answered += 1
    except TimeoutError:
        pass
    assert 50 <= answered <= 50 + 50 * (elapsed + 0.6) + 1, (answered, elapsed)
    daemon.wait_log("over [limits] udp_rate for its source")
    assert daemon.log.count("over udp_rate") <= 2, "one log line per dropped datagram"
    flooder.close()
    other.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="two echo services on port 7 need root")
def test_two_instances_pointed_at_each_other_do_not_loop(start_muxd) -> None:
    # Two echo services on the well-known port, on two loopback addresses; a
    # datagram to A that claims to come from B's echo port would bounce
    # between them forever (CVE-1999-0103).
    a = start_muxd(udp_config(free_port(), "127.0.0.11:7", udp_rate=0))
    b = start_muxd(udp_config(free_port(), "127.0.0.12:7", udp_rate=0))
    spoofer = udp_client("127.0.0.12", 7)  # shares B's address and port (SO_REUSEADDR)
    spoofer.sendto(b"ping-pong", ("127.0.0.11", 7))
    a.wait_log("source port below 1024")
    assert "0 echoed, 1 dropped" in dump_counters(a)
    assert "0 echoed, 0 dropped" in dump_counters(b)
    spoofer.close()


@pytest.mark.parametrize("b_host", ["127.0.0.1", "0.0.0.0"])
def test_a_spoofed_datagram_between_two_own_endpoints_does_not_loop(start_muxd, b_host) -> None:
    # With udp_rate = 0 nothing else would bound it: a datagram to A that claims to
    # come from B (another of this daemon's endpoints) was echoed to B, which
    # echoed it to A, for ever (issue 9, item 11). Every own endpoint is a source
    # to refuse, not only the one receiving; a wildcard one answers from any local
    # address.
    a_port, b_port, metrics_port = free_udp_port(), free_udp_port(), free_port()
    daemon = start_muxd(udp_config(free_port(), f"127.0.0.1:{a_port}, {b_host}:{b_port}",
                                   udp_rate=0)
                        + f"[metrics]\nlisten = 127.0.0.1:{metrics_port}\n")
    spoofer = udp_client("127.0.0.1", b_port)  # shares B's address and port (SO_REUSEADDR)
    daemon.signal(signal.SIGSTOP)  # so that A's answer cannot reach the spoofer instead of B
    try:
        spoofer.sendto(b"ping-pong", ("127.0.0.1", a_port))
        spoofer.close()
    finally:
        daemon.signal(signal.SIGCONT)
    from daemon_harness import wait_until

    first = wait_until(lambda: (lambda line: line if "0 echoed, 0 dropped" not in line else None)(
        dump_counters(daemon)), what="the spoofed datagram to be handled")
    assert "0 echoed, 1 dropped (source is one of muxd's own endpoints 1)" in first, first
    assert "0 echoed, 1 dropped" in dump_counters(daemon)  # and it stays so
    # Counted under its own reason, not as a failed send (they once drifted apart).
    from metrics_harness import read_metrics, total

    samples = read_metrics(metrics_port)
    assert total(samples, "muxd_udp_datagrams_dropped_total", reason="self") == 1, samples
    assert total(samples, "muxd_udp_datagrams_dropped_total") == 1, samples


def test_udp_is_off_by_default(start_muxd) -> None:
    daemon = start_muxd(server_config(free_port()))
    assert "udp" not in daemon.notify.messages[0]["STATUS"]
