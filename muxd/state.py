"""The state the event loop shares with its rooms, and the one way to end a connection.

The loop (``loop.py``) and each room (``admission.py``, ``stopping.py``,
``reload.py``, ``housekeeping.py``, ``report.py``) work on one ``Shared``
object instead of on each other. It holds:

* the connection table (``conns``, fd -> ``Connection``) and the count of
  connections per client group (``per_client``): admission adds to them,
  ``close`` is the only thing that removes from them;
* the listeners and UDP endpoints: only ``close_listener``/``close_udp`` (called
  by stopping and at exit) remove them; admission may unregister and register
  a listener in the poller to pause and resume accepting;
* the poller, the timers and the notifier, which every room may use;
* the configuration and what is derived from it (``access``, ``udp_guard``),
  which only reload replaces;
* the counters, and each listener's tally (``tallies``, by listener fd: the
  metrics' per-listener figures), which admission and ``close`` add to and
  report and figures read; a connection's ``origin`` is its listener's tally;
* ``stopping``, which only stopping (and a hand-over) sets, and ``now``, the
  loop's clock reading for the current turn, which only the loop sets;
* ``kept``: the hand-over room (handover.py) when systemd gave muxd a file
  descriptor store, else None. Admission tells it of every connection it
  admits, ``close`` and ``close_listener`` of every one that ends, so that
  what the store holds is what muxd serves. Only the loop sets it.

This module knows no room and no loop: it is the floor they stand on.
"""

from __future__ import annotations

import logging
from _socket import socket as _c_socket
from collections.abc import Sequence
from typing import Protocol

from muxd.access import AccessPolicy
from muxd.config import Config
from muxd.connection import Close, Connection
from muxd.listeners import Listener
from muxd.notify import Notifier
from muxd.pollers import Poller
from muxd.timers import Timers
from muxd.udp import UdpEndpoint, UdpGuard

logger = logging.getLogger("muxd")
# socket.socket.close is two Python frames (close, _real_close) around the C close, which
# is all a connection needs: it has no makefile() to wait for.
_socket_close = _c_socket.close


class Counters:
    """What the daemon has done since it started (SIGUSR1 dumps them)."""

    def __init__(self) -> None:
        self.accepted = 0
        self.closed = dict.fromkeys(Close, 0)
        self.bytes_in = 0  # of closed connections; live ones are added when reported
        self.bytes_out = 0
        self.taken_over = 0  # connections handed over by the previous process
        self.dropped = 0  # input read and thrown away while stopping (stopping.py)

    @property
    def refused(self) -> int:
        return self.closed[Close.LIMIT] + self.closed[Close.ACCESS] + self.closed[Close.PROXY]


class Keeper(Protocol):
    """What Shared and admission need of the hand-over room."""

    def track(self, conn: Connection) -> None: ...

    def flush(self) -> None: ...

    def forget(self, conn: Connection) -> None: ...

    def forget_listener(self, listener: Listener) -> None: ...

    def figures(self) -> dict[str, int]: ...


class ListenerTally:
    """One listener's connections since the start (the metrics' per-listener figures)."""

    __slots__ = ("name", "accepted", "closed", "refused", "bytes_in", "bytes_out")

    def __init__(self, name: str) -> None:
        self.name = name
        self.accepted = 0
        self.closed = dict.fromkeys(Close, 0)
        self.refused: dict[str, int] = {}  # by the rule that refused: "max_connections" ...
        self.bytes_in = 0  # of closed connections; live ones are added when gathered
        self.bytes_out = 0

    def refuse(self, kind: str, reason: Close, count: int = 1) -> None:
        self.closed[reason] += count
        self.refused[kind] = self.refused.get(kind, 0) + count


class Shared:
    def __init__(
        self,
        config: Config,
        config_path: str | None,
        listeners: Sequence[Listener],
        udp_endpoints: Sequence[UdpEndpoint],
        poller: Poller,
        notifier: Notifier,
        now: float,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.poller = poller
        self.notifier = notifier
        self.timers = Timers()
        self.listeners = {listener.fd: listener for listener in listeners}
        self.udp = {endpoint.fd: endpoint for endpoint in udp_endpoints}
        self.access = AccessPolicy.from_config(config)
        self.udp_guard = UdpGuard(config, self.access)
        self.udp_guard.know_endpoints(udp_endpoints)
        self.conns: dict[int, Connection] = {}
        self.per_client: dict[object, int] = {}  # connections held per client group
        self.counters = Counters()
        self.tallies = {listener.fd: ListenerTally(listener.name) for listener in listeners}
        self.stopping = False
        self.now = now
        self.kept: Keeper | None = None

    def close(self, conn: Connection, reason: int) -> None:
        """End ``conn``: out of the table and the poller, closed, counted, logged."""
        if self.stopping and reason == Close.EOF:
            reason = Close.SHUTDOWN
        fd = conn.fd
        del self.conns[fd]
        if conn.group is not None:
            remaining = self.per_client[conn.group] - 1
            if remaining:
                self.per_client[conn.group] = remaining
            else:
                del self.per_client[conn.group]
        try:
            self.poller.unregister(fd)
        except (OSError, KeyError):
            pass
        if self.kept is not None:
            self.kept.forget(conn)  # out of the store too, or the peer never sees the end
        _socket_close(conn.sock)
        # The counts are keyed by Close members, which an int reason finds
        # (IntEnum hashes and compares as its value): no Close(reason) call,
        # which is Python code in enum.py. bytes_out is a property: read once.
        bytes_in = conn.bytes_in
        bytes_out = conn.bytes_out
        counters = self.counters
        counters.closed[reason] += 1
        counters.bytes_in += bytes_in
        counters.bytes_out += bytes_out
        tally = conn.origin
        if tally is not None:
            tally.closed[reason] += 1
            tally.bytes_in += bytes_in
            tally.bytes_out += bytes_out
        if self.config.log_connections:
            logger.info("disconnect %s (%s): %d bytes in, %d echoed",
                        peer_name(conn.peer), Close(reason).name.lower(), bytes_in, bytes_out)

    def close_all(self, reason: int = Close.SHUTDOWN) -> None:
        for conn in list(self.conns.values()):
            self.close(conn, reason)

    def close_listener(self, listener: Listener) -> None:
        del self.listeners[listener.fd]
        try:
            self.poller.unregister(listener.fd)
        except (OSError, KeyError):
            pass  # not registered while accepting is paused
        if self.kept is not None:
            self.kept.forget_listener(listener)
        listener.sock.close()

    def close_udp(self) -> None:
        for endpoint in self.udp.values():
            self.poller.unregister(endpoint.fd)
            endpoint.close()
        self.udp.clear()


def peer_name(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer) if peer else "unknown peer"
