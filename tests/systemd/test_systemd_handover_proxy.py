"""Hand-over behind a balancer in a booted systemd (252 and 257): after `systemctl
restart` a proxied connection still counts under the client its PROXY header named,
and a connection still waiting for its header (stored as `state-wait`, a name only this
case uses) is served once the rest of the header arrives. One restart, kept short: the
many cases are in tests/test_handover.py, with the test as PID 1.
"""

from __future__ import annotations

import socket

import pytest
from nspawn import Container, echo_roundtrip, edit_ini

pytestmark = pytest.mark.systemd


def v1(client: str, port: int = 40000) -> bytes:
    return f"PROXY TCP4 {client} 192.0.2.1 {port} 7\r\n".encode()


def refused(container: Container, header: bytes) -> bool:
    """True if muxd closed the connection without echoing (a limit refused it)."""
    with container.connect(7) as sock:
        sock.sendall(header + b"x\n")
        sock.settimeout(5)
        try:
            return sock.recv(10) == b""
        except ConnectionResetError:
            return True


def test_a_restart_keeps_each_proxied_client_and_a_header_halfway_read(
        muxd: Container) -> None:
    edit_ini(muxd, {("server", "proxy_protocol"): "yes", ("server", "proxy_from"): "127.0.0.1",
                    ("limits", "max_connections_per_ip"): "1",
                    ("logging", "connections"): "yes"})
    muxd.systemctl("start", "muxd")
    held = muxd.connect(7)
    held.sendall(v1("198.51.100.7"))
    assert echo_roundtrip(held, b"one\n") == b"one\n"
    assert refused(muxd, v1("198.51.100.7"))  # at its limit of 1
    waiting = muxd.connect(7)
    waiting.sendall(b"PROXY TCP4 198.51.100.9 ")
    with muxd.connect(7) as probe:  # accepted after `waiting`, so that one is in
        probe.sendall(v1("198.51.100.8"))
        assert echo_roundtrip(probe, b"probe\n") == b"probe\n"
    mark = muxd.journal_mark()
    muxd.systemctl("restart", "muxd")
    muxd.wait_for_journal("-u", "muxd", after=mark, match=lambda e: "took over 2 connections "
                          "(1 still waiting for a PROXY header)" in e["MESSAGE"])
    messages = [e["MESSAGE"] for e in muxd.journal("-u", "muxd", after=mark)]
    assert any("handing over 1 connection(s) and 1 waiting for a PROXY header" in m
               for m in messages), messages
    assert refused(muxd, v1("198.51.100.7"))  # still counted under its client
    waiting.sendall(b"192.0.2.1 40009 7\r\n")
    assert echo_roundtrip(waiting, b"late\n") == b"late\n"
    assert echo_roundtrip(held, b"two\n") == b"two\n"
    muxd.wait_for_journal("-u", "muxd", after=mark, match=lambda e: "connect 198.51.100.9:40009"
                          in e["MESSAGE"])
    for sock in (held, waiting):
        sock.shutdown(socket.SHUT_WR)
        sock.close()
