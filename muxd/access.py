"""Who may use the service, and how much: access lists, per-client grouping,
and per-source token buckets for UDP.

Everything here works on ``ipaddress`` objects. IPv4 clients reaching a
dual-stack ``[::]`` socket appear as IPv4-mapped IPv6 (``::ffff:a.b.c.d``);
they are turned back into IPv4 first, so ``10.0.0.0/8`` in an access list
means the same client whichever socket it came through.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from muxd.config import Config, IPNetwork

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def client_address(host: str) -> IPAddress:
    """The client's address from a socket address tuple's host string."""
    address = ipaddress.ip_address(host.partition("%")[0])  # drop an IPv6 scope id
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class NetworkSet:
    """Membership in a list of networks at the cost of one set lookup per
    distinct prefix length (at most 33 for IPv4, 129 for IPv6), not one test
    per network: it is asked per accepted connection and per UDP datagram,
    and a deny list may hold tens of thousands of addresses."""

    def __init__(self, networks: Iterable[IPNetwork]) -> None:
        by_prefix: dict[tuple[int, int], set[int]] = {}
        for network in networks:
            bits = network.max_prefixlen
            shift = bits - network.prefixlen
            by_prefix.setdefault((network.version, shift), set()).add(
                int(network.network_address) >> shift)
        self._tables = {version: tuple((shift, members) for (v, shift), members
                                       in sorted(by_prefix.items()) if v == version)
                        for version in (4, 6)}

    def __contains__(self, address: IPAddress) -> bool:
        value = int(address)
        for shift, members in self._tables[address.version]:
            if value >> shift in members:
                return True
        return False


class AccessPolicy:
    """``deny`` wins; an empty ``allow`` allows everyone not denied."""

    def __init__(self, allow: Iterable[IPNetwork] = (), deny: Iterable[IPNetwork] = ()) -> None:
        self.allow = tuple(allow)
        self.deny = tuple(deny)
        self._allowed = NetworkSet(self.allow)
        self._denied = NetworkSet(self.deny)

    @classmethod
    def from_config(cls, config: Config) -> AccessPolicy:
        return cls(config.allow, config.deny)

    @classmethod
    def for_metrics(cls, config: Config) -> AccessPolicy:
        """Who may scrape: ``[metrics] allow`` alone when it is set, else
        ``[access]`` as for echo. Alone, so that the endpoint has a list of its
        own: a public echo service keeps its metrics to its Prometheus, and a
        Prometheus outside the echo clients' ``allow`` needs no hole in it."""
        if config.metrics_allow:
            return cls(config.metrics_allow)
        return cls.from_config(config)

    @property
    def active(self) -> bool:
        return bool(self.allow or self.deny)

    def permits(self, address: IPAddress) -> bool:
        if address in self._denied:
            return False
        return not self.allow or address in self._allowed


def client_group(address: IPAddress, ipv6_prefix: int) -> int | tuple[int, int]:
    """The key under which per-client limits count: the IPv4 address, or the
    IPv6 address cut to ``ipv6_prefix`` bits (one customer usually holds a
    whole /64, so counting single IPv6 addresses would limit nothing)."""
    if address.version == 4:
        return int(address)
    return (6, int(address) >> (128 - ipv6_prefix))


class TokenBuckets:
    """A token bucket per key: ``rate`` tokens a second, bursts up to ``rate``
    (at least one).

    The table holds at most ``max_keys`` sources; when it is full, buckets
    that have refilled completely (their sources have been quiet for a
    second or more) are forgotten, and if none has, a new source is refused
    until one has: a flood from many spoofed addresses cannot grow memory."""

    def __init__(self, rate: float, max_keys: int = 65536) -> None:
        self.rate = rate
        self.capacity = max(rate, 1.0)
        self.max_keys = max_keys
        self._buckets: dict[object, list[float]] = {}  # key -> [tokens, last refill time]

    def allow(self, key: object, now: float) -> bool:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys and not self._forget_idle(now):
                return False
            self._buckets[key] = [self.capacity - 1.0, now]
            return True
        tokens = min(self.capacity, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1.0
        return True

    def _forget_idle(self, now: float) -> bool:
        rate, capacity = self.rate, self.capacity
        idle = [key for key, (tokens, last) in self._buckets.items()
                if tokens + (now - last) * rate >= capacity]
        for key in idle:
            del self._buckets[key]
        return bool(idle)

    def __len__(self) -> int:
        return len(self._buckets)
