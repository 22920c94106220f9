"""Waiting for the PROXY protocol header: connections a trusted load balancer
has opened whose header (``proxy_protocol.py``) has not arrived yet.

With ``[server] proxy_protocol = yes`` admission hands every new TCP connection
here (``take``) instead of serving it. A connection from outside
``proxy_from`` is refused at once, without reading a byte. Any other waits
here, off the echo fast path: it is not in the connection table, so its events
reach the loop's dispatch of other descriptors, which calls ``on_readable``.
Once its header is complete, the header is dropped, the connection is judged
by admission's rules (``[access]``, ``max_connections_per_ip``) on the client
the header names, and then enters the connection table like any admitted
connection; the bytes that came after the header are its first echo. A header
that is malformed, cut short by EOF, or not complete within
``HEADER_TIMEOUT`` seconds ends the connection.

A waiting connection costs a socket and at most 107 bytes of header
(``HeaderReader``), and counts towards ``max_connections``; a slow or silent
one is closed by this room's sweep, so a slowloris on the header costs what
an idle client costs, for seconds instead of ``idle_timeout``.

At a restart's hand-over (handover.py) the waiting connections leave with
their header as far as it has come (``hand_over``), and the next process's
room reads on from there (``resume``), with what is left of their time.

Of the shared state it may: register its waiting descriptors in the poller
(and unregister them), add a connection it has admitted to the connection
table and the per-client counts (as admission does), set the connection's
``origin`` to its listener's tally, add to the refusal counts and the tally's
(``Close.PROXY``, by rule ``proxy_from`` or ``proxy_header``; ``Close.SHUTDOWN``
when the daemon stops), and set a timer for its sweep. It reads the
configuration at each use, so a reload's ``proxy_from`` applies to the next
connection.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

from muxd.access import client_address
from muxd.connection import READ_CHUNK, RECV_BUFFER, RECV_VIEW, Close, Connection, read_size
from muxd.listeners import Listener
from muxd.logs import RateLimitedLog
from muxd.pollers import READ, FdOutOfRange
from muxd.proxy_protocol import Header, HeaderReader
from muxd.state import ListenerTally, Shared, peer_name
from muxd.timers import Timer

logger = logging.getLogger("muxd")

# The specification asks for at least 3 s, to cover a lost SYN-ACK retransmit.
HEADER_TIMEOUT = 5.0
SWEEP_INTERVAL = 0.5


class _Waiting:
    __slots__ = ("sock", "fd", "peer", "listener", "tally", "reader", "since")

    def __init__(self, sock: socket.socket, peer: tuple, listener: str, tally: ListenerTally,
                 now: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer  # the balancer's address
        self.listener = listener
        self.tally = tally  # the listener's, for the metrics
        self.reader = HeaderReader()
        self.since = now


class HeaderWait:
    def __init__(self, shared: Shared,
                 admit: Callable[[socket.socket, object, ListenerTally], object],
                 apply: Callable[[Connection, int], None]) -> None:
        """``admit(sock, peer, tally)``: admission's verdict on a client (its
        per-client group, None, or False when it refused, counted and closed
        ``sock``); ``apply(conn, want)``: the loop's way to act on what a
        connection wants next."""
        self.shared = shared
        self._admit = admit
        self._apply = apply
        self.waiting: dict[int, _Waiting] = {}  # in arrival order, which the sweep relies on
        self._sweep: Timer | None = None
        self._refusals: dict[str, RateLimitedLog] = {}
        if shared.config.proxy_protocol:
            logger.info("PROXY protocol: every TCP listener expects a header, from %s only",
                        ", ".join(map(str, shared.config.proxy_from)))

    # --- arriving ----------------------------------------------------------

    def take(self, sock: socket.socket, peer: object, listener: Listener) -> None:
        """A new connection on a listener that expects the header."""
        shared = self.shared
        config = shared.config
        tally = shared.tallies[listener.fd]
        if not self._trusted(peer):
            host = peer[0] if isinstance(peer, tuple) and peer else "a non-IP peer"
            self._refuse(sock, tally, "proxy_from", f"{host} is not in [server] proxy_from")
            return
        if len(shared.conns) + len(self.waiting) >= config.max_connections:
            self._refuse(sock, tally, "max_connections",
                         f"[limits] max_connections ({config.max_connections}) reached",
                         Close.LIMIT)
            return
        fd = sock.fileno()
        try:
            if fd >= shared.poller.fd_limit:
                raise FdOutOfRange(f"the {shared.poller.name} backend cannot watch fd {fd}")
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            shared.poller.register(fd, READ)
        except (OSError, FdOutOfRange) as err:
            self._refuse(sock, tally, "cannot_watch", f"cannot watch a new connection: {err}",
                         Close.LIMIT)
            return
        self.waiting[fd] = _Waiting(sock, peer, listener.name, tally,  # type: ignore[arg-type]
                                    shared.now)
        if self._sweep is None:
            self._sweep = shared.timers.call_at(shared.now + SWEEP_INTERVAL, self._expire)

    def resume(self, sock: socket.socket, listener: Listener, header: bytes, taken: int,
               waited: float) -> bool:
        """A connection that was waiting here in the previous process (handover.py):
        judged by this configuration's ``proxy_from``, then waiting on from where its
        header had come, with what is left of its time. False if it was refused."""
        shared = self.shared
        tally = shared.tallies[listener.fd]
        try:
            peer = sock.getpeername()
        except OSError:
            peer = None
        if not self._trusted(peer):
            host = peer[0] if isinstance(peer, tuple) and peer else "a non-IP peer"
            self._refuse(sock, tally, "proxy_from", f"{host} is not in [server] proxy_from")
            return False
        try:
            reader = HeaderReader.resume(header, taken)
        except ValueError as err:
            self._refuse(sock, tally, "proxy_header", f"a damaged hand-over of its PROXY "
                                                      f"protocol header ({err})")
            return False
        fd = sock.fileno()
        try:
            if fd >= shared.poller.fd_limit:
                raise FdOutOfRange(f"the {shared.poller.name} backend cannot watch fd {fd}")
            sock.setblocking(False)  # TCP_NODELAY lives on the socket: it came with it
            # Registered, a socket whose header arrived meanwhile is reported at
            # once, also under edge-triggering.
            shared.poller.register(fd, READ)
        except (OSError, FdOutOfRange) as err:
            self._refuse(sock, tally, "cannot_watch", f"cannot watch a new connection: {err}",
                         Close.LIMIT)
            return False
        waiting = _Waiting(sock, peer, listener.name, tally,  # type: ignore[arg-type]
                           shared.now - waited)
        waiting.reader = reader
        self.waiting[fd] = waiting
        if self._sweep is None:
            self._sweep = shared.timers.call_at(shared.now + SWEEP_INTERVAL, self._expire)
        return True

    def _trusted(self, peer: object) -> bool:
        if not (isinstance(peer, tuple) and peer and peer[0]):
            return False  # a unix socket has no address to trust
        address = client_address(peer[0])
        return any(address in network for network in self.shared.config.proxy_from)

    # --- reading the header ------------------------------------------------

    def on_readable(self, fd: int) -> None:
        """Read what has arrived (to EAGAIN, EOF or the header's end: at most
        the header's maximum, so bounded) and act on the reader's answer."""
        waiting = self.waiting[fd]
        recv_into = waiting.sock.recv_into
        reader = waiting.reader
        # No more than an echo read takes, so what follows the header is never
        # more than buffer_size: the bound on what one client costs.
        size = read_size(self.shared.config.buffer_size)
        into = RECV_BUFFER if size == READ_CHUNK else RECV_VIEW[:size]
        while True:
            try:
                received = recv_into(into)
            except BlockingIOError:
                return
            except OSError:
                self._drop(waiting, "reset", "reset inside its PROXY protocol header")
                return
            if not received:
                self._drop(waiting, "eof", "the connection ended inside its PROXY protocol "
                                           "header")
                return
            result = reader.feed(RECV_VIEW[:received])
            if result is None:
                continue
            if isinstance(result, Header):
                self._admit_client(waiting, result, received)
            else:
                self._drop(waiting, "malformed",
                           f"malformed PROXY protocol header: {result.reason}")
            return

    def _admit_client(self, waiting: _Waiting, header: Header, received: int) -> None:
        shared = self.shared
        del self.waiting[waiting.fd]
        sock, fd = waiting.sock, waiting.fd
        client = header.client
        peer: tuple = waiting.peer if client is None else (str(client[0]), client[1])
        # Out of the waiting room and through admission's door like any new
        # connection, judged as the client the header names.
        shared.poller.unregister(fd)
        group = self._admit(sock, None if client is None else peer, waiting.tally)
        if group is False:
            return
        try:
            shared.poller.register(fd, READ)
        except (OSError, FdOutOfRange) as err:
            self._refuse(sock, waiting.tally, "cannot_watch",
                         f"cannot watch a new connection: {err}", Close.LIMIT)
            return
        # The connection keeps the client's address (a tuple and a string per
        # connection, as with [logging] connections) for the log and for a
        # reload's regrouping, which cannot ask the socket for it.
        conn = Connection(sock, peer, shared.config.buffer_size, shared.now)
        conn.client = () if client is None else peer  # a hand-over carries it (handover.py)
        shared.conns[fd] = conn
        conn.origin = waiting.tally
        kept = shared.kept
        if kept is not None:
            # Into the store now, not with the next accepting turn's batch: the
            # header is consumed, so a restart that had not stored it would
            # close a connection the next process could not take back.
            kept.track(conn)
            kept.flush()
        if group is not None:
            conn.group = group
            shared.per_client[group] = shared.per_client.get(group, 0) + 1
        if shared.config.log_connections:
            if client is None:
                logger.info("connect %s on %s (PROXY v%d %s: no client address)",
                            peer_name(peer), waiting.listener, header.version,
                            "LOCAL" if header.version == 2 else "UNKNOWN")
            else:
                logger.info("connect %s on %s via %s (PROXY v%d)", peer_name(peer),
                            waiting.listener, peer_name(waiting.peer), header.version)
        # What followed the header in the same read is the client's first
        # message: moved to the buffer's start, it is echoed as the fast path
        # would have. Then read on (to EAGAIN or EOF), as after a hang-up: the
        # edge that announced this data, and perhaps a FIN with it, is spent.
        payload = received - header.payload_start
        want = READ
        if payload:
            RECV_VIEW[:payload] = RECV_VIEW[header.payload_start:received]
            try:
                sent = sock.send(RECV_VIEW[:payload])
            except BlockingIOError:
                sent = 0
            except OSError:
                shared.close(conn, Close.RESET)
                return
            # asked=0: whether more is queued is not finish_read's to judge
            # from a slice of a read; on_readable below reads on.
            want = conn.finish_read(payload, sent, 0)
        if want == READ:
            want = conn.on_readable(True)
        if want != conn.interest:
            self._apply(conn, want)

    # --- ending -------------------------------------------------------------

    def _expire(self) -> None:
        shared = self.shared
        cutoff = shared.now - HEADER_TIMEOUT
        expired = []
        for waiting in self.waiting.values():  # oldest first
            if waiting.since > cutoff:
                break
            expired.append(waiting)
        for waiting in expired:
            self._drop(waiting, "timeout",
                       f"no PROXY protocol header within {HEADER_TIMEOUT:g}s")
        self._sweep = shared.timers.call_at(shared.now + SWEEP_INTERVAL, self._expire) \
            if self.waiting else None

    def _drop(self, waiting: _Waiting, log_kind: str, why: str) -> None:
        """No valid header: the connection is refused (``proxy_header``), its
        log line rate-limited by ``log_kind`` (malformed, eof, timeout ...)."""
        del self.waiting[waiting.fd]
        try:
            self.shared.poller.unregister(waiting.fd)
        except (OSError, KeyError):
            pass
        self._refuse(waiting.sock, waiting.tally, "proxy_header",
                     f"refused a connection from {peer_name(waiting.peer)}: {why}",
                     log_kind=log_kind)

    def _refuse(self, sock: socket.socket, tally: ListenerTally, kind: str, why: str,
                reason: Close = Close.PROXY, log_kind: str | None = None) -> None:
        """Close ``sock``, counted under ``reason`` and (for the metrics) ``kind``."""
        self.shared.counters.closed[reason] += 1
        tally.refuse(kind, reason)
        sock.close()
        log_kind = log_kind or kind
        log = self._refusals.get(log_kind)
        if log is None:
            log = self._refusals[log_kind] = RateLimitedLog(logging.WARNING)
        log.log(why if why.startswith("refused") else f"refused a connection: {why}")

    def hand_over(self, room: int) -> tuple[list[tuple[socket.socket, bytes, int, float]],
                                            int]:
        """A restart's hand-over: every waiting connection leaves the room, unclosed,
        with its header as far as it has come and how long it has waited, for the
        store (at most ``room`` of them, the longest-waiting first; the others are
        closed as at a stop). Returns those and how many were closed."""
        now = self.shared.now
        handed = []
        for waiting in list(self.waiting.values())[:room]:
            del self.waiting[waiting.fd]
            try:
                self.shared.poller.unregister(waiting.fd)
            except (OSError, KeyError):
                pass
            header, taken = waiting.reader.progress()
            handed.append((waiting.sock, header, taken, now - waiting.since))
        closed = len(self.waiting)
        self.close_all()
        return handed, closed

    def close_all(self) -> None:
        """The daemon stops: nothing is owed to a connection that was never served."""
        for waiting in list(self.waiting.values()):
            del self.waiting[waiting.fd]
            try:
                self.shared.poller.unregister(waiting.fd)
            except (OSError, KeyError):
                pass
            waiting.sock.close()
            self.shared.counters.closed[Close.SHUTDOWN] += 1
            waiting.tally.closed[Close.SHUTDOWN] += 1
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None

    def flush_logs(self) -> None:
        for log in self._refusals.values():
            log.flush()

