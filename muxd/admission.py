"""Accepting: take new clients off a listener, admit or refuse each, survive running out of fds.

Owns the decision whether a new connection is served: ``max_connections``,
``max_connections_per_ip``, the ``[access]`` lists and the poller's fd ceiling
(select's FD_SETSIZE), and what to do when accept(2) fails for want of
descriptors (the spare-descriptor trick, then a timed retry).

Of the shared state it may: add connections to the connection table and the
per-client counts (never remove them: that is ``Shared.close``), register a
new connection in the poller, unregister a listener and register it again
from a timer to pause accepting, and add to ``counters.accepted`` and the
refusal counts, and to the listener's tally (set as the connection's
``origin``), and tell ``kept`` (hand-over) of each connection admitted. It
holds its own spare descriptor and its rate-limited refusal logs, which
housekeeping flushes.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import socket
from collections.abc import Callable

from muxd.access import client_address, client_group
from muxd.connection import Close, Connection
from muxd.listeners import Listener
from muxd.logs import RateLimitedLog
from muxd.pollers import READ, FdOutOfRange
from muxd.state import ListenerTally, Shared, peer_name

logger = logging.getLogger("muxd")

# accept(2) errors that mean "that one client went away before we took it".
_CLIENT_GONE = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN,
                errno.ENOPROTOOPT, errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH,
                errno.EOPNOTSUPP, errno.ENETUNREACH}
_OUT_OF_DESCRIPTORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
ACCEPT_RETRY_DELAY = 0.1
# Connections taken off one listener in one loop turn. A storm of clients
# that connect and reset at once would otherwise keep accept() running while
# the resets of those already taken wait for the next turn: the table fills
# with dead connections and established clients stall. Small enough that a
# turn stays short, large enough that a burst of real clients is taken in a
# few turns.
ACCEPTS_PER_TURN = 64


class Admission:
    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self._spare_fd = _open_spare_fd()
        self._refusals: dict[str, RateLimitedLog] = {}
        self._fd_exhaustion = RateLimitedLog(logging.ERROR)
        # With [server] proxy_protocol: where a new connection waits for its
        # header before it is judged (proxy_wait.HeaderWait.take).
        self.header_wait: Callable[[socket.socket, object, Listener], None] | None = None

    def accept(self, listener: Listener) -> bool:
        """Accept what is queued on ``listener``, to EAGAIN or ``ACCEPTS_PER_TURN``.

        True if it stopped at the budget, so clients may still be queued: the
        caller must come back next turn, as edge-triggering gives no new edge."""
        shared = self.shared
        lsock = listener.sock
        # socket.accept() is Python code that, for every client, reads the
        # listener's family and type as enums (two Enum calls) and its
        # timeout: ~12,300 instructions, over a fifth of a churned connection
        # (Python 3.11, bench.callgrind --churn). The C-level accept, with
        # the listener's family and type as plain ints (Listener.socket_args),
        # makes the same socket.socket (its timeout check is moot: the socket
        # is made non-blocking below).
        accept = lsock._accept
        family, kind, proto = listener.socket_args
        conns = shared.conns
        config = shared.config
        poller = shared.poller
        fd_limit = poller.fd_limit
        set_nodelay = family in (socket.AF_INET, socket.AF_INET6)
        header_wait = self.header_wait if config.proxy_protocol else None
        tally = shared.tallies[listener.fd]
        kept = shared.kept
        for taken in range(ACCEPTS_PER_TURN):
            try:
                fd, peer = accept()
            except BlockingIOError:
                return False
            except OSError as err:
                if err.errno in _CLIENT_GONE:
                    continue
                if err.errno in _OUT_OF_DESCRIPTORS:
                    return self._out_of_descriptors(listener, err, ACCEPTS_PER_TURN - taken)
                self._fd_exhaustion.log(f"accept on {listener.name} failed: {err}")
                self._pause_accepting(listener)
                return False
            sock = socket.socket(family, kind, proto, fd)
            shared.counters.accepted += 1
            tally.accepted += 1
            if len(conns) >= config.max_connections:
                self._refuse(sock, f"[limits] max_connections ({config.max_connections}) reached",
                             tally, "max_connections")
                continue
            if header_wait is not None:
                header_wait(sock, peer, listener)  # judged once the header names the client
                continue
            group = None
            if shared.access.active or config.max_connections_per_ip:
                group = self._admit(sock, peer, tally)
                if group is False:
                    continue
            if fd >= fd_limit:
                self._refuse(sock, f"the {poller.name} backend cannot watch fd {fd} (limit "
                                   f"{fd_limit}; [server] backend = epoll or poll holds more)",
                             tally, "cannot_watch")
                continue
            try:
                sock.setblocking(False)
                if set_nodelay:
                    # Without it, delayed ACK meets Nagle and a 64 KiB echo
                    # takes ~44 ms here instead of ~20 µs.
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                # The peer's address is kept only when it will be logged: it is
                # a tuple and a string per connection held.
                conn = Connection(sock, peer if config.log_connections else None,
                                  config.buffer_size, shared.now)
                poller.register(fd, READ)
            except (OSError, FdOutOfRange) as err:
                self._refuse(sock, f"cannot watch a new connection: {err}", tally,
                             "cannot_watch")
                continue
            conns[fd] = conn
            conn.origin = tally
            if kept is not None:
                kept.track(conn)  # into the store with this turn's batch
            if group is not None:
                conn.group = group
                shared.per_client[group] = shared.per_client.get(group, 0) + 1
            if config.log_connections:
                logger.info("connect %s on %s", peer_name(peer), listener.name)
        return True

    def _admit(self, sock: socket.socket, peer: object, tally: ListenerTally) -> object:
        """Apply [access] and max_connections_per_ip to a new connection: its
        per-client group (None if not limited), or False if it was refused."""
        if not (isinstance(peer, tuple) and peer and peer[0]):
            return None  # not an IP client (a socket-activated unix socket)
        shared = self.shared
        address = client_address(peer[0])
        if shared.access.active and not shared.access.permits(address):
            self._refuse(sock, f"{address} is not allowed by [access]", tally, "access",
                         Close.ACCESS)
            return False
        config = shared.config
        limit = config.max_connections_per_ip
        if not limit:
            return None
        group = client_group(address, config.ipv6_prefix)
        if shared.per_client.get(group, 0) >= limit:
            what = str(address) if address.version == 4 else \
                f"{address}/{config.ipv6_prefix} (grouped)"
            self._refuse(sock, f"[limits] max_connections_per_ip ({limit}) reached for {what}",
                         tally, "max_connections_per_ip")
            return False
        return group

    def admit_client(self, sock: socket.socket, peer: object, tally: ListenerTally) -> object:
        """``_admit`` for a connection whose client a PROXY header has named."""
        return self._admit(sock, peer, tally)

    def _refuse(self, sock: socket.socket, why: str, tally: ListenerTally, kind: str,
                reason: Close = Close.LIMIT) -> None:
        # Closed at once, without reading a byte from it.
        self.shared.counters.closed[reason] += 1
        tally.refuse(kind, reason)
        sock.close()
        kind = why.partition(" (")[0] if reason == Close.LIMIT else "access"
        log = self._refusals.get(kind)
        if log is None:
            log = self._refusals[kind] = RateLimitedLog(logging.WARNING)
        log.log(f"refused a connection: {why}")

    def _out_of_descriptors(self, listener: Listener, err: OSError, budget: int) -> bool:
        # Stopping here would strand every client queued behind this one:
        # under edge-triggering no new edge comes until yet another client
        # connects, and under level-triggering the listener stays readable and
        # the loop would spin. Like libuv (uv__emfile_trick), give up a spare
        # descriptor kept for this moment, accept each waiting client and
        # close it at once, so it sees its connection end instead of hanging,
        # and stop at EAGAIN (Linux reports EMFILE before looking at the
        # queue), or at what is left of this turn's budget, coming back next
        # turn. Where that cannot work (no spare, or the whole system is
        # out: ENFILE), do what nginx does: stop watching the listener and try
        # again shortly. True if stopped at the budget.
        closed = 0
        drained = at_budget = False
        if self._spare_fd is not None:
            os.close(self._spare_fd)
            self._spare_fd = None
            try:
                for _ in range(budget):
                    try:
                        sock, _ = listener.sock.accept()
                    except BlockingIOError:
                        drained = True
                        break
                    except OSError as again:
                        if again.errno in _CLIENT_GONE:
                            continue
                        break
                    sock.close()
                    closed += 1
                else:
                    at_budget = True
            finally:
                self._spare_fd = _open_spare_fd()
        counters = self.shared.counters
        counters.accepted += closed
        counters.closed[Close.LIMIT] += closed
        tally = self.shared.tallies[listener.fd]
        tally.accepted += closed
        tally.refuse("out_of_descriptors", Close.LIMIT, closed)
        message = f"out of file descriptors ({errno.errorcode.get(err.errno, err.errno)}) " \
                  f"on {listener.name}: closed {closed} waiting connection(s) at once"
        if not (drained or at_budget):
            message += f"; retrying in {ACCEPT_RETRY_DELAY:g}s"
            self._pause_accepting(listener)
        self._fd_exhaustion.log(message + f" (RLIMIT_NOFILE is {_soft_nofile()})")
        return at_budget

    def _pause_accepting(self, listener: Listener) -> None:
        shared = self.shared
        shared.poller.unregister(listener.fd)

        def resume() -> None:
            if listener.fd in shared.listeners and not shared.stopping:
                # Registering again makes epoll re-check readiness, so a
                # queue that filled meanwhile is reported without a new edge.
                shared.poller.register(listener.fd, READ)

        shared.timers.call_at(shared.now + ACCEPT_RETRY_DELAY, resume)

    def flush_logs(self) -> None:
        for log in self._refusals.values():
            log.flush()
        self._fd_exhaustion.flush()

    def close(self) -> None:
        if self._spare_fd is not None:
            os.close(self._spare_fd)
            self._spare_fd = None


def _open_spare_fd() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _soft_nofile() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
