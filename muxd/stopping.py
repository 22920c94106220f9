"""The graceful stop: stop serving, flush the echo owed, linger, give up at the deadline.

Owns everything between the first SIGTERM and the last close: it sets
``stopping`` (nothing else does), closes the listeners and UDP endpoints,
sends STOPPING=1 and EXTEND_TIMEOUT_USEC=, dispatches connection events while
stopping (flush what is pending, drop the peer's input, never echo again),
lingers on connections whose echo the peer has not yet acknowledged (a close
with unread input would answer with RST and throw that echo away), and
closes whatever is left at ``shutdown_timeout``, or at once on a second
signal.

Input is dropped as it is read while serving: at most ``MAX_READS_PER_EVENT``
reads per connection per event (``Connection.discard_input``); one stopped at
that cap is promised its next share in the next turn through the loop's
promise (``promise``), never in the same one, so a client that floods a
stopping daemon cannot hold a turn away from the signals, the timers (the
deadline, the linger check) and the other connections' flushes. A connection
that has had ``MAX_DISCARDS`` reads dropped is treated as drained: a peer that
floods a stopping daemon gets its RST.

Of the shared state it may: set ``stopping``, close listeners, endpoints and
connections (through ``Shared``), change a connection's poller interest, and
schedule its own timers (the linger check, the deadline).
"""

from __future__ import annotations

import fcntl
import logging
import socket
import struct
import termios
from collections.abc import Callable

from muxd.connection import AGAIN, MAX_DISCARDS, MAX_READS_PER_EVENT, Close, Connection
from muxd.pollers import READ, WRITE
from muxd.state import Shared

logger = logging.getLogger("muxd")

LINGER_CHECK = 0.05  # while stopping: how often to look whether a peer has acknowledged all


class Stopping:
    def __init__(self, shared: Shared, other_event: Callable[[int], None],
                 promise: Callable[[Connection], None]) -> None:
        self.shared = shared
        # The loop's handler for an event that is not a connection's (the
        # signal wakeup socket, or a stale one).
        self._other_event = other_event
        # The loop's promise of a turn next turn (given back through give_turns).
        self._promise = promise
        self._lingering: set[Connection] = set()  # waiting for echo to be acknowledged
        self._capped: dict[Connection, int] = {}  # turns a connection's input hit the cap

    def begin(self, signame: str) -> None:
        """A stop was asked for (SIGTERM or SIGINT): the first one drains, a second one
        closes everything at once."""
        shared = self.shared
        if shared.stopping:
            logger.warning("%s again: closing %d connection(s) without waiting",
                           signame, len(shared.conns))
            shared.close_all()
            return
        shared.stopping = True
        shared.notifier.send("STOPPING=1", f"STATUS=stopping ({signame})")
        for listener in list(shared.listeners.values()):
            shared.close_listener(listener)
        shared.close_udp()
        for conn in list(shared.conns.values()):
            conn.read_closed = True
            self._settle(conn)  # one share of its input each, the rest promised
        timeout = shared.config.shutdown_timeout
        logger.info("%s: stopping; %d connection(s) still flushing echo (up to %gs)",
                    signame, len(shared.conns), timeout)
        if shared.conns:
            # Ask systemd for the drain time on top of its own stop timeout.
            shared.notifier.send(f"EXTEND_TIMEOUT_USEC={int((timeout + 5) * 1e6)}")
            shared.timers.call_at(shared.now + timeout, self._deadline)

    def dispatch(self, events: list[tuple[int, int]]) -> None:
        """Dispatch while stopping: no more echo; flush what is pending while
        dropping the peer's input, then close."""
        shared = self.shared
        conns_get = shared.conns.get
        readable = shared.poller.readable_mask
        writable = shared.poller.writable_mask
        close = shared.close
        for fd, event in events:
            conn = conns_get(fd)
            if conn is None:
                self._other_event(fd)
                continue
            if event & writable and conn.pending and conn.on_writable() == Close.RESET:
                close(conn, Close.RESET)
                continue
            discarded = None
            if event & readable and conn.interest & READ:
                discarded = self._discard(conn)
                if discarded == Close.RESET:
                    close(conn, Close.RESET)
                    continue
            self._settle(conn, discarded)  # at EOF the peer may still read its echo

    def give_turns(self, promised: dict[int, Connection]) -> None:
        """The turns promised in the turn before to connections whose input hit the cap."""
        conns = self.shared.conns
        for conn in promised.values():
            # Identity, not just the number: the descriptor may be another's by now.
            if conns.get(conn.fd) is conn and conn.interest & READ:
                discarded = self._discard(conn)
                if discarded == Close.RESET:
                    self.shared.close(conn, Close.RESET)
                else:
                    self._settle(conn, discarded)

    def _discard(self, conn: Connection) -> int:
        """One share of dropping ``conn``'s input (see discard_input); AGAIN is promised
        another turn by ``_settle``, up to MAX_DISCARDS reads in all."""
        discarded = conn.discard_input(MAX_READS_PER_EVENT, self.shared.counters)
        if discarded == AGAIN:
            turns = self._capped[conn] = self._capped.get(conn, 0) + 1
            if turns * MAX_READS_PER_EVENT >= MAX_DISCARDS:
                return 0  # it floods: as good as drained, and its RST is its own doing
        return discarded

    def _settle(self, conn: Connection, discarded: int | None = None) -> None:
        """Close ``conn`` if it owes nothing that a close could destroy, or watch it.
        ``discarded``: what dropping its input this turn gave, if that was done."""
        shared = self.shared
        if not conn.pending:
            # Nothing left in our buffer, but the kernel may still hold echo
            # the peer has not acknowledged (a slow reader's small window).
            # Closing a socket with unread input answers with RST, which
            # throws that echo away, so: drain the input, and close now only
            # if the peer has finished sending (no input can follow) or
            # everything sent has been acknowledged. Otherwise linger: keep
            # dropping input and check again shortly, until the deadline.
            if not conn.peer_finished and discarded is None:
                discarded = self._discard(conn)
                if discarded == Close.RESET:
                    shared.close(conn, Close.RESET)
                    return
            if conn.peer_finished or (discarded != AGAIN
                                      and _unacknowledged(conn.sock) == 0):
                self._lingering.discard(conn)
                self._capped.pop(conn, None)
                shared.close(conn, Close.SHUTDOWN)
                return
            if discarded != AGAIN and conn not in self._lingering:
                self._lingering.add(conn)
                if len(self._lingering) == 1:
                    shared.timers.call_at(shared.now + LINGER_CHECK, self._check_lingering)
            want = READ
        else:
            # Watch reads only until the peer's EOF: under level-triggering a
            # socket at EOF stays readable and would spin the loop.
            want = WRITE if conn.peer_finished else READ | WRITE
        if discarded == AGAIN:
            self._promise(conn)  # input still queued: its next share, next turn
        if want != conn.interest:
            shared.poller.modify(conn.fd, want)
            conn.interest = want

    def _check_lingering(self) -> None:
        shared = self.shared
        for conn in list(self._lingering):
            if shared.conns.get(conn.fd) is conn:
                self._settle(conn)
            else:
                self._lingering.discard(conn)
        if self._lingering:
            shared.timers.call_at(shared.now + LINGER_CHECK, self._check_lingering)

    def _deadline(self) -> None:
        shared = self.shared
        if shared.conns:
            logger.warning("[limits] shutdown_timeout (%gs) reached: closing %d connection(s) "
                           "with echo still unsent", shared.config.shutdown_timeout,
                           len(shared.conns))
        shared.close_all()


def _unacknowledged(sock: socket.socket) -> int:
    """Bytes sent on ``sock`` that the peer has not acknowledged yet (SIOCOUTQ)."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    except OSError:
        return 0
