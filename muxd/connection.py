"""One echo connection: read, echo back, buffer what the peer cannot take yet.

The state machine knows nothing of epoll, poll or select. Each handler
returns what the connection wants next: an interest (``READ``, ``WRITE`` or
both, possibly with ``AGAIN``), or a negative ``Close`` reason. The loop
compares that with the current interest and touches the poller only when it
changed, which on the common path (a message read and echoed whole) is never.

It is correct under both edge- and level-triggered readiness:

* Reads go on until EAGAIN, EOF, or a short read. A short read means the
  receive queue was empty at that moment, and any byte arriving later makes a
  new edge. The one exception is a hang-up that arrived together with the
  data: no further edge will come for it, so when the event says the peer may
  have hung up we read on to the end.
* Reads per event are capped (``MAX_READS_PER_EVENT``) so one fast client
  cannot starve the rest (epoll(7), "Possible pitfalls"). Stopping short of
  EAGAIN under edge-triggering needs a promise to come back: ``AGAIN``.
* The loop inlines the commonest case (a plain "readable" on a connection
  that owes nothing: one short read, echoed whole) and hands anything else
  to ``finish_read``, which carries on exactly where ``on_readable`` would.
* Unsent bytes wait in ``pending``. Writability is watched only while
  ``pending`` is non-empty; reading pauses at ``high_water`` bytes and
  resumes below a quarter of it. No read asks for more than the room left
  under ``high_water`` (``read_size``, and less once something is owed), so
  a client that sends without reading costs at most ``high_water`` bytes of
  our memory, whatever ``high_water`` is next to the receive buffer.
"""

from __future__ import annotations

import socket
from enum import IntEnum
from typing import Protocol

from muxd.pollers import READ, WRITE

AGAIN = 4  # "call on_readable again next turn, even without a new event"

READ_CHUNK = 256 * 1024  # larger than common messages, so one read usually drains the queue
MAX_READS_PER_EVENT = 16
MAX_DISCARDS = 1024  # reads of input dropped per connection while stopping: 256 MiB

# One receive buffer for the whole process: the loop is single-threaded and a
# chunk is echoed (or copied into ``pending``) before the next read, so no
# connection needs a buffer of its own while it is idle.
RECV_BUFFER = bytearray(READ_CHUNK)
RECV_VIEW = memoryview(RECV_BUFFER)


def read_size(high_water: int) -> int:
    """The most one read takes while nothing is owed: no more than high_water."""
    return min(READ_CHUNK, high_water)


class Counted(Protocol):
    """Where ``Connection.discard_input`` counts what it drops (state.Counters)."""

    dropped: int


class Close(IntEnum):
    """Why a connection was closed. Values are negative so they cannot be
    mistaken for an interest."""

    EOF = -1  # the peer finished sending and got everything echoed
    RESET = -2  # the peer reset the connection, or a socket error
    IDLE = -3  # no byte moved either way for idle_timeout seconds
    LIMIT = -4  # refused: max_connections(_per_ip), out of fds, or fd beyond select's reach
    SHUTDOWN = -5  # the daemon is stopping
    # (Listed before ACCESS, so the SIGUSR1 counters line still ends with ACCESS.)
    PROXY = -7  # refused: not from proxy_from, or no valid PROXY protocol header in time
    ACCESS = -6  # refused by the [access] lists


class Connection:
    __slots__ = (
        "sock", "fd", "peer", "pending", "paused", "read_closed", "interest",
        "high_water", "bytes_in", "group", "peer_finished", "progress_mark", "idle_since",
        "origin", "client",
    )

    def __init__(self, sock: socket.socket, peer: object, high_water: int, now: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.pending: bytearray | None = None  # allocated only when a write falls short
        self.paused = False
        self.read_closed = False  # no more reading to echo (peer EOF, or we are stopping)
        self.peer_finished = False  # the peer's EOF has been read
        self.interest = READ
        self.high_water = high_water
        # The only byte count kept per message: every byte read is either
        # echoed or still pending, so bytes_out is derived (below).
        self.bytes_in = 0
        self.group: object = None  # the per-client-limit key, when that limit is on
        self.origin: object = None  # its listener's tally (state.ListenerTally)
        # What a PROXY header said (proxy_wait.py): None for a connection that
        # came without one (its socket's peer is the client); for one admitted
        # through a header, the (host, port) of the client it named, or () when
        # it named none (LOCAL, UNKNOWN) or that is no longer known (a crash).
        self.client: tuple | None = None
        # Idleness is judged by the loop's periodic sweep from progress (bytes
        # moved) rather than by a timestamp written on every event.
        self.progress_mark = 0
        self.idle_since = now

    @property
    def bytes_out(self) -> int:
        pending = self.pending
        return self.bytes_in - (len(pending) if pending else 0)

    @property
    def progress(self) -> int:
        """Grows whenever a byte moves either way."""
        return self.bytes_in + self.bytes_out

    def on_readable(self, peer_may_have_hung_up: int) -> int:
        sock = self.sock
        high_water = self.high_water
        full = read_size(high_water)
        reads = 0
        while True:
            pending = self.pending
            # Never more than fits under high_water: the bound on what a
            # client that does not read can make us hold.
            size = min(full, high_water - len(pending)) if pending else full
            if size <= 0:  # owed as much as allowed already (0 would mean "any size")
                self.paused = True
                break
            try:
                received = sock.recv_into(RECV_BUFFER, size)
            except BlockingIOError:
                break
            except OSError:
                return Close.RESET
            if not received:
                self.read_closed = self.peer_finished = True
                break
            self.bytes_in += received
            if pending:
                pending += RECV_VIEW[:received]  # behind what is owed already
            else:
                try:
                    sent = sock.send(RECV_VIEW[:received])
                except BlockingIOError:
                    sent = 0
                except OSError:
                    self.bytes_in -= received  # neither echoed nor pending
                    return Close.RESET
                if sent == received:
                    if received < size and not peer_may_have_hung_up:
                        return READ  # the common case: all echoed, nothing owed
                else:
                    if pending is None:
                        self.pending = pending = bytearray()
                    pending += RECV_VIEW[sent:received]
            if pending and len(pending) >= high_water:
                self.paused = True
                break
            if received < size and not peer_may_have_hung_up:
                break
            reads += 1
            if reads == MAX_READS_PER_EVENT:
                return self._wanted() | AGAIN
        return self._wanted()

    def finish_read(self, received: int, sent: int, asked: int) -> int:
        """Take over from the loop's fast path when a read was not the plain case.

        The fast path (in ``EchoServer._run_until_stopped``) runs only on a
        connection whose interest is exactly ``READ``, which means nothing is
        owed, reading is not paused and the peer has not finished. It asked
        for ``asked`` bytes (``read_size`` of the configured buffer_size),
        read ``received`` into ``RECV_BUFFER`` (0: the peer's EOF) and echoed
        the first ``sent`` of them; it handles a short read echoed whole by
        itself and comes here for everything else: EOF, a full read (there
        may be more to read), or an echo that fell short."""
        if not received:
            self.read_closed = self.peer_finished = True
            return self._wanted()
        self.bytes_in += received
        if sent < received:
            self.pending = bytearray(RECV_VIEW[sent:received])
            if received - sent >= self.high_water:
                self.paused = True
                return self._wanted()
        if received == asked:
            return self.on_readable(False)  # a full read: read on, behind what is owed
        return self._wanted()

    def on_writable(self) -> int:
        pending = self.pending
        if pending:
            try:
                sent = self.sock.send(pending)
            except BlockingIOError:
                return self._wanted()
            except OSError:
                return Close.RESET
            # A partial send means the socket buffer is full: under
            # edge-triggering the next EPOLLOUT edge comes when it drains, so
            # one send per event is enough and a retry would only hit EAGAIN.
            del pending[:sent]
            if self.paused and len(pending) < self.high_water >> 2:
                self.paused = False
        return self._wanted()

    def discard_input(self, reads: int = MAX_READS_PER_EVENT, counters: Counted | None = None
                      ) -> int:
        """While the daemon stops: read and drop what the peer still sends.

        Closing a socket with unread input makes the kernel answer with RST and
        drop whatever echo is still in flight to the peer, so a stopping daemon
        keeps reading (and discarding) while it flushes, and drains what is
        queued just before it closes. At most ``reads`` reads, as while serving:
        returns ``AGAIN`` when it stopped there (more may be queued: the caller
        owes it another turn, stopping.py), 0 at EAGAIN, ``Close.EOF`` once the
        peer has finished sending, or ``Close.RESET`` on an error. The bytes dropped are
        added to ``counters.dropped`` (the SIGUSR1 line shows them)."""
        recv_into = self.sock.recv_into
        dropped = 0
        try:
            for _ in range(reads):
                try:
                    received = recv_into(RECV_BUFFER)
                except BlockingIOError:
                    return 0
                except OSError:
                    return Close.RESET
                if not received:
                    self.peer_finished = True
                    return Close.EOF
                dropped += received
            return AGAIN
        finally:
            if counters is not None:
                counters.dropped += dropped

    def wanted(self) -> int:
        """What the connection wants next, from its state alone (a taken-over one)."""
        return self._wanted()

    def _wanted(self) -> int:
        if self.pending:
            if self.read_closed or self.paused:
                return WRITE
            return READ | WRITE
        if self.read_closed:
            return Close.EOF
        return READ
