"""UDP echo (RFC 862), guarded against reflection and packet loops.

An open UDP echo port is a classic abuse target (CVE-1999-0103): a datagram
with a spoofed source makes the server send to a victim, and a spoofed source
that is another echo/chargen service starts a loop between the two that
never ends. So, before echoing, a datagram must pass the guard:

* its source port must be 1024 or above: every UDP "small service" (echo 7,
  discard 9, daytime 13, chargen 19, time 37) lives below that, and real
  clients send from ephemeral ports;
* its source must not be a broadcast, multicast or unspecified address (no
  real sender has one), nor the address and port of any of muxd's own UDP
  endpoints: a datagram that claims to come from one of them would start a
  loop between two of our own sockets (or one socket and itself);
* the access lists must allow it;
* its source address must be within its token bucket (``udp_rate``
  datagrams per second), and the whole service within ``udp_total_rate``.

Dropped datagrams are counted by reason and summarised in a rate-limited
log line, never a line per datagram. Each answer leaves from the local
address the datagram arrived on: on a wildcard socket that address comes
from IP_PKTINFO/IPV6_PKTINFO and goes back in the reply's ancillary data.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections import Counter
from collections.abc import Iterable

from muxd.access import AccessPolicy, IPAddress, TokenBuckets, client_address
from muxd.config import Address, Config
from muxd.connection import RECV_BUFFER, RECV_VIEW
from muxd.listeners import bind_socket, describe
from muxd.logs import RateLimitedLog

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)  # Linux's value; CPython does not export it
MAX_DATAGRAMS_PER_EVENT = 64
_ANCILLARY_SIZE = socket.CMSG_SPACE(20)  # room for in6_pktinfo (the larger of the two)
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


# Why the guard refuses a datagram: the words logged, and (DROP_LABELS) the
# reason label of muxd_udp_datagrams_dropped_total. One table, so the two cannot
# drift apart (they once did: "self" drops were counted as send_failed).
LOW_PORT = "source port below 1024"
BAD_SOURCE = "broadcast, multicast or unspecified source"
OWN_ENDPOINT = "source is one of muxd's own endpoints"
DENIED = "denied by [access]"
OVER_RATE = "over [limits] udp_rate for its source"
OVER_TOTAL_RATE = "over [limits] udp_total_rate"
DROP_LABELS = {
    LOW_PORT: "source_port",
    BAD_SOURCE: "bad_source",
    OWN_ENDPOINT: "self",
    DENIED: "access",
    OVER_RATE: "rate",
    OVER_TOTAL_RATE: "total_rate",
}

class UdpGuard:
    """Decides, per datagram, whether to echo it; counts what it drops."""

    def __init__(self, config: Config, access: AccessPolicy) -> None:
        self.dropped: Counter[str] = Counter()
        self.echoed = 0
        self._log = RateLimitedLog(logging.WARNING)
        # Where our own endpoints answer from: exact (address, port) pairs for
        # those bound to an address, and the ports of wildcard ones, which
        # answer from any local address.
        self._own: set[tuple[IPAddress, int]] = set()
        self._own_wildcard_ports: set[int] = set()
        self._own_ports: frozenset[int] = frozenset()
        self._local_cache: dict[IPAddress, bool] = {}
        self.configure(config, access)

    def know_endpoints(self, endpoints: Iterable[UdpEndpoint]) -> None:
        """Learn every address muxd's UDP endpoints answer from."""
        for endpoint in endpoints:
            host, port = endpoint.local
            if endpoint.wildcard:
                self._own_wildcard_ports.add(port)
            else:
                self._own.add((client_address(host), port))
        self._own_ports = frozenset({port for _, port in self._own} | self._own_wildcard_ports)

    def configure(self, config: Config, access: AccessPolicy) -> None:
        self.access = access
        self.per_source = TokenBuckets(config.udp_rate) if config.udp_rate else None
        self.total = TokenBuckets(config.udp_total_rate) if config.udp_total_rate else None

    def refusal(self, host: str, port: int, local: tuple[str, int], now: float) -> str | None:
        """Why this datagram must not be echoed, or None to echo it."""
        if port < 1024:
            return LOW_PORT
        address = client_address(host)
        if address.is_multicast or address.is_unspecified or address == _BROADCAST:
            return BAD_SOURCE
        if port in self._own_ports and self._is_own(address, port, local[0]):
            return OWN_ENDPOINT
        if self.access.active and not self.access.permits(address):
            return DENIED
        if self.per_source is not None and not self.per_source.allow(address, now):
            return OVER_RATE
        if self.total is not None and not self.total.allow(None, now):
            return OVER_TOTAL_RATE
        return None

    def _is_own(self, address: IPAddress, port: int, destination: str) -> bool:
        if (address, port) in self._own:
            return True
        if port not in self._own_wildcard_ports:
            return False
        # A wildcard endpoint of ours on this port answers from any local
        # address: the one this datagram was sent to, a loopback one, or
        # another of this host's.
        if address == client_address(destination) or address.is_loopback:
            return True
        local = self._local_cache.get(address)
        if local is None:
            if len(self._local_cache) >= 256:  # rare (a port collision), but bounded
                self._local_cache.clear()
            local = self._local_cache[address] = _is_local_address(address)
        return local

    def drop(self, reason: str, host: str, port: int) -> None:
        self.dropped[reason] += 1
        self._log.log(f"UDP: dropped a datagram from {host}:{port} ({reason})")

    def flush_log(self) -> None:
        self._log.flush()

    def describe(self) -> str:
        dropped = ", ".join(f"{reason} {count}" for reason, count in sorted(self.dropped.items()))
        return f"UDP datagrams: {self.echoed} echoed, {sum(self.dropped.values())} dropped" + (
            f" ({dropped})" if dropped else "")


class UdpEndpoint:
    def __init__(self, sock: socket.socket, name: str) -> None:
        self.sock = sock
        self.name = name
        self.fd = sock.fileno()
        host, port = sock.getsockname()[:2]
        self.local = (host, port)
        # Only a wildcard socket needs to be told which address a datagram
        # was sent to; a specific one answers from that address anyway.
        self.wildcard = client_address(host).is_unspecified
        if self.wildcard:
            if sock.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)

    def on_readable(self, guard: UdpGuard, now: float) -> bool:
        """Echo queued datagrams; True if some may be left (per-event cap reached)."""
        sock = self.sock
        for _ in range(MAX_DATAGRAMS_PER_EVENT):
            try:
                if self.wildcard:
                    size, ancillary, _, peer = sock.recvmsg_into([RECV_BUFFER], _ANCILLARY_SIZE)
                else:
                    size, peer = sock.recvfrom_into(RECV_BUFFER)
            except BlockingIOError:
                return False
            except OSError:
                continue  # e.g. an ICMP error queued for an earlier answer
            host, port = peer[0], peer[1]
            local = self.local
            reply_from = ()
            if self.wildcard:
                reply_from = _reply_source(ancillary)
                if reply_from:
                    local = (_destination(ancillary) or local[0], local[1])
            reason = guard.refusal(host, port, local, now)
            if reason is not None:
                guard.drop(reason, host, port)
                continue
            try:
                if reply_from:
                    sock.sendmsg([RECV_VIEW[:size]], reply_from, 0, peer)
                else:
                    sock.sendto(RECV_VIEW[:size], peer)
            except OSError as err:  # a full send buffer: UDP may drop, and so do we
                guard.drop(f"send failed: {err.strerror}", host, port)
                continue
            guard.echoed += 1
        return True

    def close(self) -> None:
        self.sock.close()


def _is_local_address(address: IPAddress) -> bool:
    """Whether ``address`` is one of this host's (binding to it succeeds)."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((str(address), 0))
    except OSError:
        return False
    return True


def _reply_source(ancillary: list[tuple[int, int, bytes]]) -> list[tuple[int, int, bytes]]:
    """Ancillary data that makes a reply leave from where the datagram arrived."""
    for level, kind, data in ancillary:
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO:
            return [(level, kind, data)]  # in6_pktinfo: the destination address and interface
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
            # in_pktinfo {ifindex, spec_dst, addr}: send from addr (the
            # datagram's destination), routing as usual (ifindex 0).
            return [(level, kind, bytes(4) + data[8:12] + bytes(4))]
    return []


def _destination(ancillary: list[tuple[int, int, bytes]]) -> str | None:
    for level, kind, data in ancillary:
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO:
            return socket.inet_ntop(socket.AF_INET6, data[:16])
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
            return socket.inet_ntop(socket.AF_INET, data[8:12])
    return None


def bind_udp(addresses: tuple[Address, ...], reuse_port: bool = False) -> list[UdpEndpoint]:
    endpoints: list[UdpEndpoint] = []
    try:
        for address in addresses:
            sock = bind_socket(address, socket.SOCK_DGRAM, reuse_port, f"udp {address}")
            endpoints.append(UdpEndpoint(sock, f"udp {address}"))
    except BaseException:
        for endpoint in endpoints:
            endpoint.close()
        raise
    return endpoints


def inherited_endpoint(sock: socket.socket, label: str) -> UdpEndpoint:
    sock.setblocking(False)
    return UdpEndpoint(sock, f"udp {describe(sock)} ({label})")

