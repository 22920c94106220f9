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
* Unsent bytes wait in ``pending``. Writability is watched only while
  ``pending`` is non-empty; reading pauses at ``high_water`` bytes and
  resumes below a quarter of it, so a client that sends without reading
  costs at most ``high_water`` bytes (plus one read) of our memory.
"""

from __future__ import annotations

import socket
from enum import IntEnum

from muxd.pollers import READ, WRITE

AGAIN = 4  # "call on_readable again next turn, even without a new event"

READ_CHUNK = 65536
MAX_READS_PER_EVENT = 16

# One receive buffer for the whole process: the loop is single-threaded and a
# chunk is echoed (or copied into ``pending``) before the next read, so no
# connection needs a buffer of its own while it is idle.
_buffer = bytearray(READ_CHUNK)
_view = memoryview(_buffer)


class Close(IntEnum):
    """Why a connection was closed. Values are negative so they cannot be
    mistaken for an interest."""

    EOF = -1  # the peer finished sending and got everything echoed
    RESET = -2  # the peer reset the connection, or a socket error
    IDLE = -3  # no byte moved either way for idle_timeout seconds
    LIMIT = -4  # refused: max_connections reached, or fd beyond the backend's reach
    SHUTDOWN = -5  # the daemon is stopping


class Connection:
    __slots__ = (
        "sock", "fd", "peer", "pending", "paused", "read_closed", "interest",
        "high_water", "last_active", "bytes_in", "bytes_out",
    )

    def __init__(self, sock: socket.socket, peer: object, high_water: int, now: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.pending: bytearray | None = None  # allocated only when a write falls short
        self.paused = False
        self.read_closed = False
        self.interest = READ
        self.high_water = high_water
        self.last_active = now
        self.bytes_in = 0
        self.bytes_out = 0

    def on_readable(self, peer_may_have_hung_up: int) -> int:
        sock = self.sock
        recv_into = sock.recv_into
        for _ in range(MAX_READS_PER_EVENT):
            try:
                received = recv_into(_buffer)
            except BlockingIOError:
                break
            except OSError:
                return Close.RESET
            if not received:
                self.read_closed = True
                break
            self.bytes_in += received
            pending = self.pending
            if pending:
                pending += _view[:received]
            else:
                try:
                    sent = sock.send(_view[:received])
                except BlockingIOError:
                    sent = 0
                except OSError:
                    return Close.RESET
                self.bytes_out += sent
                if sent == received:
                    if received < READ_CHUNK and not peer_may_have_hung_up:
                        return READ  # the common case: all echoed, nothing owed
                    continue
                if pending is None:
                    self.pending = pending = bytearray()
                pending += _view[sent:received]
            if len(pending) >= self.high_water:
                self.paused = True
                break
            if received < READ_CHUNK and not peer_may_have_hung_up:
                break
        else:
            return self._wanted() | AGAIN
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
            self.bytes_out += sent
            if self.paused and len(pending) < self.high_water >> 2:
                self.paused = False
        return self._wanted()

    def stop_reading(self) -> int:
        """Stop taking input (shutdown): finish echoing what is pending, then close."""
        self.read_closed = True
        return self._wanted()

    def _wanted(self) -> int:
        if self.pending:
            if self.read_closed or self.paused:
                return WRITE
            return READ | WRITE
        if self.read_closed:
            return Close.EOF
        return READ
