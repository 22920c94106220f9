"""Hand-over: keeping every connection across restarts, upgrades and crashes
through systemd's file descriptor store (the protocol itself is fdstore.py).

How a connection survives:

* **Parked when accepted.** Each accepted connection is noted by ``track`` and
  sent, with the others of its loop turn, into a parking socket that systemd's
  store holds once (``flush``, once per accepting turn, never per message;
  parking.py). The store holds the listeners, a few parking sockets and, at a
  hand-over, the state: never one entry per connection. A crash leaves no time
  to store anything, so this is what makes a ``kill -9`` or a watchdog kill
  survivable.
* **Shut down when closed.** ``forget`` shuts a parked socket down before the
  loop closes it: the parked copy would otherwise keep it open, and the peer
  would never see the end. Its dead copy goes when its parking socket is
  replaced (compaction, parking.py).
* **Unix stream connections** (a socket unit's ``ListenStream=/path``) are
  never parked: the kernel's unix garbage collector would get involved. They
  are stored one entry each under ``conn``, as every connection was before
  parking, and shut down before they are closed so that PID 1 drops its copy.
  Rare by design; TCP, the common case, never costs PID 1 an entry.
* **Not kept** (the kernel's in-flight limit, a store that refused a unix
  connection): served all the same, counted (``unstored_open``), retried, and
  closed gracefully at a restart (echo owed sent as far as the socket takes
  it, then the end).
* **Restart or stop.** SIGTERM looks the same for both. The unit's root stop
  hook signals ``RESTART_SIGNAL`` (SIGURG) just before systemd's SIGTERM when
  the job is a restart; a SIGTERM within ``ARM_WINDOW`` seconds of it hands
  over (``hand_over``), any other SIGTERM is today's graceful stop (which also
  removes the parking sockets from the store once every connection is closed).
* **State that is not a descriptor** (pending echo, pause, half-close, byte
  counts, and behind a balancer the client its PROXY header named) is written
  at hand-over into a memfd stored as ``state-<pid>``, keyed by socket inode:
  each connection's pending echo straight from its buffer, read back by the
  next process straight into the new connection's buffer (``write_state``,
  ``read_state``), so neither process holds more than the pending echo itself
  plus a small constant. The next process reads it once (``pread``: the offset
  is shared with the old copy), asks the store to remove it, and ignores it
  (with a log line) if it does not parse. Its format: see ``write_state``.
* **Waiting for a PROXY header.** A connection whose header has not arrived
  (or not whole) is not served yet, so it is not parked while serving; at
  hand-over it is parked with the others and named in the state's ``waiting``
  with the header bytes read so far, and the next process's waiting room
  (proxy_wait.py) reads on from there.
* **Taking over** (``take_over``): a fresh parking socket is stored first,
  every inherited one is read out (parking.unpark: duplicates and connections
  the old process had closed are dropped), the live connections are parked in
  the fresh one as they are read, in full messages, and only then are the old
  ones removed from the store (a crash in between loses at most the batch in
  hand, up to 253). An upgrade from the release that stored each connection as
  ``conn`` takes those over the same way and then removes the name.

What a crash loses (README, "Restarts, upgrades and crashes"): per connection, the
echo muxd held in memory at that instant: its pending echo and the chunk
being echoed, together at most ``buffer_size`` (connection.py bounds them).
Also the connections accepted in the turn of the crash, before their batch
was parked, and the connections still waiting for a PROXY header (never parked
before a hand-over). Every byte the kernel holds (unread input, unacknowledged
echo) survives. Behind a balancer, the clients the headers named were only in
memory: with ``proxy_protocol`` on, a connection taken over without them is
treated as one whose header named no client (logged with the balancer's
address, counted under no client), never as the balancer's own.

Of the shared state (state.py) it may: add the connections it takes over to
the connection table, the poller and the per-client counts; at a hand-over,
set ``stopping``, close listeners and endpoints, and empty the table without
closing the connections (their parked copies keep them); take the waiting room's
connections at a hand-over and give them back to it at a take-over; schedule
its parking's timers. It is ``Shared.kept``: told of every connection admitted and
closed. Its figures (``figures``) are counted at take-over and hand-over, or
at scrape time, never per message.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from muxd.access import client_address, client_group
from muxd.connection import Close, Connection
from muxd.fdstore import FdStore, Received, drop, release
from muxd.listeners import Listener
from muxd.parking import Parking, inode_key, is_parking_name, is_segment, unpark
from muxd.state import Shared

if TYPE_CHECKING:
    from muxd.proxy_wait import HeaderWait  # imported by the loop only with proxy_protocol

logger = logging.getLogger("muxd")

RESTART_SIGNAL = signal.SIGURG  # default-ignored: harmless to a process that does not know it
ARM_WINDOW = 5.0  # seconds from the stop hook's signal within which a SIGTERM means restart
CONNECTION_NAME = "conn"
LISTENER_NAME = "listen"
STATE_PREFIX = "state-"
# Connections still waiting for their PROXY header, stored at hand-over. Under
# the state prefix on purpose: a muxd of the previous format reads any name it
# does not know as a socket unit's and refuses to start on a connected socket,
# and one it knows as a connection it would serve as echo (echoing the rest of
# the header); a "state-" name it removes, and closes the socket as not a file.
WAITING_NAME = STATE_PREFIX + "wait"
STATE_MAGIC = b"muxd-handover-1\n"
STATE_FORMAT = 3
RETRY_DELAY = 0.01  # PID 1's queue was full: try the batch again this soon

PAUSED, READ_CLOSED, PEER_FINISHED = 1, 2, 4
WRITE_CHUNK = 1 << 20  # os.write takes at most this per call (a view: no copy)


class StateError(ValueError):
    """A state file that is not muxd's, or is damaged."""


@dataclass
class Record:
    inode: int
    bytes_in: int
    flags: int
    # The pending echo: the connection's own buffer when written (never copied), the
    # bytes when decoded from bytes, empty when read from a state file (``size`` and
    # ``offset`` say where it is: ``State.read_pending`` reads it into a buffer).
    pending: bytes | bytearray
    # Connection.client: None (no PROXY header), () (it named no client, or
    # that was lost), or (host, port). None too in a format-1 state.
    client: tuple | None = None
    size: int = -1
    offset: int = 0

    @property
    def length(self) -> int:
        return len(self.pending) if self.size < 0 else self.size


@dataclass
class WaitingRecord:
    """A connection still waiting for its PROXY header at hand-over."""

    inode: int
    header: bytes  # the header bytes read so far (HeaderReader.progress)
    taken: int  # bytes of the stream the header has taken (more, past v2 TLVs)
    waited: float  # seconds it had waited: the next process's timeout goes on


@dataclass
class State:
    pid: int
    version: str
    written: float  # CLOCK_BOOTTIME at hand-over: the newest of several wins
    records: dict[int, Record]  # by socket inode
    format: int = STATE_FORMAT
    waiting: dict[int, WaitingRecord] = field(default_factory=dict)  # by socket inode
    closed: int = 0  # connections the writer closed at hand-over: not kept
    # The writer's hand-over totals (HandOver.totals), carried on so that the
    # muxd_handover_* counters never go back at a restart (format 2; else 0s).
    totals: dict[str, int] = field(default_factory=dict)
    parked: int = -1  # connections the writer parked (format 3; else -1: unknown)
    fd: int = -1  # the state file the pending echo is read from (read_state)

    @property
    def pending_bytes(self) -> int:
        return sum(record.length for record in self.records.values())

    def read_pending(self, record: Record) -> bytearray:
        """A record's pending echo, read from the state file straight into a new buffer."""
        if self.fd < 0 or record.size < 0:
            return bytearray(record.pending)
        buffer = bytearray(record.size)
        view = memoryview(buffer)
        done = 0
        while done < record.size:
            count = os.preadv(self.fd, [view[done:]], record.offset + done)
            if count <= 0:
                raise StateError("the state file ended inside a pending echo")
            done += count
        return buffer

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _header(pid: int, version: str, records: list[Record], waiting: Iterable[WaitingRecord],
            closed: int, totals: dict[str, int] | None, parked: int) -> bytes:
    return json.dumps({
        "format": STATE_FORMAT, "pid": pid, "version": version,
        "written": time.clock_gettime(time.CLOCK_BOOTTIME),
        "connections": [[r.inode, r.bytes_in, r.flags, len(r.pending)] for r in records],
        "clients": [[r.inode, *(r.client or (None, None))] for r in records
                    if r.client is not None],
        "waiting": [[w.inode, round(w.waited, 3), w.taken, w.header.hex()] for w in waiting],
        "closed": closed,
        "totals": totals or {},
        "parked": parked,
    }).encode()


def encode_state(pid: int, version: str, records: Iterable[Record],
                 waiting: Iterable[WaitingRecord] = (), closed: int = 0,
                 totals: dict[str, int] | None = None, parked: int = 0) -> bytes:
    """The state's contents as bytes (tests; muxd itself streams it: ``write_state``):
    ``STATE_MAGIC``, the length of a JSON header (8 bytes, big-endian), the header,
    then every connection's pending echo in the order of its ``connections`` entries
    ([inode, bytes in, flags, pending length]).

    Versioning: the magic names that layout, and a reader that does not know
    the magic ignores the whole state. The header's ``format`` counts what was
    *added* to it, as keys an older reader skips without harm: format 1 (no
    ``format`` key) is the layout alone; format 2 adds ``clients`` (the client
    each proxied connection's PROXY header named: [inode, host, port], host and
    port null when it named none), ``waiting`` (connections waiting for their
    PROXY header: [inode, seconds waited, bytes taken, header read so far in
    hex], ``closed`` (connections closed at hand-over, not kept) and ``totals``
    (the writer's hand-over counters, carried on); format 3 adds ``parked`` (how
    many connections the writer left parked: the connections are in parking
    sockets now, not stored one by one). A change an older reader could not skip
    (a field of ``connections``, bytes after the pending echo) needs a new magic."""
    records = list(records)
    header = _header(pid, version, records, waiting, closed, totals, parked)
    return b"".join([STATE_MAGIC, struct.pack("!Q", len(header)), header,
                     *(r.pending for r in records)])


def write_state(pid: int, version: str, records: list[Record],
                waiting: Iterable[WaitingRecord] = (), closed: int = 0,
                totals: dict[str, int] | None = None, parked: int = 0) -> int:
    """A memfd holding ``encode_state``'s layout, written piece by piece: each pending
    echo straight from its connection's buffer, never joined or copied."""
    fd = os.memfd_create("muxd-handover", os.MFD_CLOEXEC)
    try:
        header = _header(pid, version, records, waiting, closed, totals, parked)
        _write_all(fd, STATE_MAGIC + struct.pack("!Q", len(header)))
        _write_all(fd, header)
        del header
        for record in records:
            if record.pending:
                _write_all(fd, record.pending)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view[:WRITE_CHUNK]):]


def decode_state(data: bytes) -> State:
    """Read a state of format 1 or later from bytes (``encode_state``); StateError if
    damaged."""
    return _parse(lambda offset, size: data[offset:offset + size], len(data), lazy=False)


def read_state(fd: int) -> State:
    """Read a state file's header; the pending echoes stay in the file until
    ``State.read_pending`` (the State keeps ``fd``: ``State.close`` closes it)."""
    size = os.fstat(fd).st_size

    def read(offset: int, count: int) -> bytes:
        chunks = []
        while count > 0:
            chunk = os.pread(fd, count, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
            count -= len(chunk)
        return b"".join(chunks)

    state = _parse(read, size, lazy=True)
    state.fd = fd
    return state


def _parse(read: Callable[[int, int], bytes], total: int, lazy: bool) -> State:
    if read(0, len(STATE_MAGIC)) != STATE_MAGIC:
        raise StateError("not a muxd hand-over state (no magic)")
    offset = len(STATE_MAGIC)
    try:
        (length,) = struct.unpack("!Q", read(offset, 8))
        offset += 8
        if length > total - offset:
            raise StateError("damaged header (its length runs past the end of the state)")
        header = json.loads(read(offset, length))
        offset += length
        pid, version = int(header["pid"]), str(header["version"])
        written = float(header["written"])
        state_format = int(header.get("format", 1))
        records: dict[int, Record] = {}
        for inode, bytes_in, flags, size in header["connections"]:
            size = int(size)
            if size < 0 or offset + size > total:
                raise StateError("pending echo runs past the end of the state")
            if lazy:
                record = Record(int(inode), int(bytes_in), int(flags), b"", size=size,
                                offset=offset)
            else:
                record = Record(int(inode), int(bytes_in), int(flags), read(offset, size))
            records[int(inode)] = record
            offset += size
        for inode, host, port in header.get("clients", ()):
            record = records.get(int(inode))
            if record is None:
                continue
            if host is None:
                record.client = ()
            else:
                client_address(host)  # ValueError if it is not an address
                if not 0 <= int(port) <= 65535:
                    raise ValueError(f"port {port}")
                record.client = (str(host), int(port))
        waiting: dict[int, WaitingRecord] = {}
        for inode, waited, taken, header_hex in header.get("waiting", ()):
            waiting[int(inode)] = WaitingRecord(int(inode), bytes.fromhex(header_hex),
                                                int(taken), max(0.0, float(waited)))
        closed = max(0, int(header.get("closed", 0)))
        totals = {str(name): max(0, int(value))
                  for name, value in header.get("totals", {}).items()}
        parked = int(header.get("parked", -1))
    except StateError:
        raise
    except (struct.error, ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        raise StateError(f"damaged header ({err})") from None
    if offset != total:
        raise StateError(f"{total - offset} unexpected bytes after the pending echo")
    return State(pid, version, written, records, state_format, waiting, closed, totals, parked)


@dataclass
class Inheritance:
    """What the previous process left in the store, sorted."""

    own_listeners: list[Received] = field(default_factory=list)  # stored by muxd, name "listen"
    # Stored one by one by the release before parking (name "conn"): an upgrade from it.
    connections: list[Received] = field(default_factory=list)
    waiting: list[Received] = field(default_factory=list)  # name WAITING_NAME (ditto)
    segments: list[Received] = field(default_factory=list)  # parking sockets (parking.py)
    state: State | None = None
    dropped: int = 0
    # A foreign descriptor stored under one of muxd's own names: only removing
    # the whole name takes it out of the store (and the rest is stored again).
    restore_names: set[str] = field(default_factory=set)
    # Names whose removal PID 1's full queue refused: sent again by the parking.
    removals: list[str] = field(default_factory=list)


def is_store_name(name: str) -> bool:
    """A name muxd gives what it stores (everything else came from a socket unit);
    ``WAITING_NAME`` is one of the state prefix's."""
    return name in (CONNECTION_NAME, LISTENER_NAME) or name.startswith(STATE_PREFIX)


def sort_inherited(items: list[Received], store: FdStore | None) -> Inheritance:
    """Sort inherited descriptors by name *and* by what they are; drop (close and
    log) whatever is not what its name says. The state is read and removed."""
    found = Inheritance()
    states: list[tuple[Received, State]] = []
    removed: set[str] = set()
    for item in items:
        if item.name == CONNECTION_NAME:
            if item.kind == "stream" and item.family in (socket.AF_INET, socket.AF_INET6,
                                                          socket.AF_UNIX):
                found.connections.append(item)
                continue
            _drop_misstored(found, item, "a connected stream socket")
        elif item.name == LISTENER_NAME:
            if item.kind == "listener":
                found.own_listeners.append(item)
                continue
            _drop_misstored(found, item, "a listening stream socket")
        elif item.name == WAITING_NAME:
            if store is not None and WAITING_NAME not in removed:
                # Out of the store at once, like the state: once admitted, such a
                # connection is stored again under "conn"; until then it is not
                # stored (a crash ends it, as it ends any still waiting).
                _remove(store, WAITING_NAME, found)
                removed.add(WAITING_NAME)
            if item.kind == "stream" and item.family in (socket.AF_INET, socket.AF_INET6):
                found.waiting.append(item)
                continue
            _drop(found, item, "stored as waiting for a PROXY header but is not a "
                               "connected TCP socket")
        elif is_parking_name(item.name):
            # Removed from the store only once its connections are parked again
            # (take_over), or a crash in between would lose them.
            if is_segment(item):
                found.segments.append(item)
                continue
            if store is not None:
                _remove(store, item.name, found)
            _drop(found, item, "stored as a parking socket but is not one")
        elif item.name.startswith(STATE_PREFIX):
            if store is not None:
                _remove(store, item.name, found)  # read once: a crash must not replay it
            if item.kind != "file":
                _drop(found, item, "stored as hand-over state but is not a file")
                continue
            try:
                states.append((item, read_state(item.fd)))
            except (OSError, StateError) as err:
                logger.warning("ignored the hand-over state %s: %s", item.describe(), err)
                found.dropped += 1
                os.close(item.fd)
        else:
            _drop(found, item, "not a name muxd stores under")
    if states:
        # Normally one; more only if a removal was lost: the newest writer wins.
        found.state = max(states, key=lambda pair: pair[1].written)[1]
        for _, state in states:
            if state is not found.state:
                state.close()
        if len(states) > 1:
            logger.warning("%d hand-over states inherited; used the one of PID %d",
                           len(states), found.state.pid)
    return found


def _remove(store: FdStore, name: str, found: Inheritance) -> None:
    if not store.remove(name):
        found.removals.append(name)  # take_over has the parking send it again


def _drop(found: Inheritance, item: Received, why: str) -> None:
    drop(item, why)
    found.dropped += 1


def _drop_misstored(found: Inheritance, item: Received, expected: str) -> None:
    """Drop what was stored under muxd's own name (a connection's or a listener's) but
    is not ``expected``; one that is not a socket at all also has its whole name
    removed from the store (``Inheritance.restore_names``)."""
    what = "a connection" if item.name == CONNECTION_NAME else "a listener"
    _drop(found, item, f"stored as {what} but is not {expected}")
    if item.kind not in ("stream", "listener", "datagram", "socket"):
        found.restore_names.add(item.name)


class HandOver:
    """The loop's room for keeping connections: track, forget, hand over, take over."""

    def __init__(self, shared: Shared, store: FdStore, capacity: int,
                 stored_listeners: Iterable[Listener]) -> None:
        self.shared = shared
        self.store = store
        self._stored_listeners = {listener.fd for listener in stored_listeners}
        # The store's room: the listeners, the state at a hand-over, and parking sockets.
        self.parking = Parking(store, shared.timers, lambda: shared.now,
                               max(1, capacity - len(self._stored_listeners) - 1))
        # Once per accepting turn and once per close: the parking's own methods, without
        # a call of ours around them.
        self.flush = self.parking.flush  # type: ignore[method-assign]
        self._park_later = self.parking.pending.append  # the list is never replaced
        # Unix stream connections are never parked (the kernel's unix garbage collector
        # would get involved): stored one entry each, as before parking.
        self._unix_origins = {shared.tallies[fd] for fd, listener in shared.listeners.items()
                              if listener.sock.family == socket.AF_UNIX and fd in shared.tallies}
        self.unix_kept: set[int] = set()  # unix stream connections queued or stored
        self.unix_total = 0  # unix stream connections the store refused
        if not self._unix_origins:
            self.forget = self.parking.forget  # type: ignore[method-assign]
            self.track = self._track_tcp  # type: ignore[method-assign]
        else:
            self.flush = self._flush_with_unix  # type: ignore[method-assign]
        self._unix_retry = False
        self._armed_at: float | None = None
        self._released = False
        self._opened = False
        # The metrics' muxd_handover_* counters: connections and pending echo
        # bytes taken over, connections a hand-over could not keep. Counted at
        # take-over, and carried on from the previous process's totals (the
        # state), so that a restart never sets them back: increase() then
        # counts each restart's figures, however alike consecutive ones are.
        self.totals = dict.fromkeys(("connections", "bytes", "lost"), 0)

    def open(self) -> None:
        """The first parking socket into the store, before anything is parked."""
        if not self._opened:
            self._opened = True
            self.parking.open()

    # --- serving: per admitted connection, per accepting turn, per close ------

    def _track_tcp(self, conn: Connection) -> None:
        self._park_later(conn.fd)

    def track(self, conn: Connection) -> None:
        if conn.origin in self._unix_origins:
            self.store.queue(conn.fd, CONNECTION_NAME)
            self.unix_kept.add(conn.fd)
            return
        self._park_later(conn.fd)

    def _flush_with_unix(self) -> None:
        """flush, when a unix stream listener is served: its connections of this turn
        go to the store, one entry each (a full queue: retried from a timer)."""
        self.parking.flush()
        store = self.store
        if store.backlog and not store.flush() and not self._unix_retry:
            self._unix_retry = True
            self.shared.timers.call_at(self.shared.now + RETRY_DELAY, self._retry_unix)
        if store.rejected:
            refused = store.rejected[:]
            store.rejected.clear()
            self.unix_kept.difference_update(refused)
            self.unix_total += len(refused)

    def _retry_unix(self) -> None:
        self._unix_retry = False
        self._flush_with_unix()

    def _store_unix_again(self, fds: list[int]) -> None:
        """Take-over: the unix stream connections inherited under ``conn``, stored again
        once the removal of that name has reached PID 1 (start-up: may wait briefly)."""
        if not fds:
            return
        if not self.parking.flush_removals():
            logger.warning("%d unix stream connection(s) could not be stored again: they "
                           "are served, and closed at a restart", len(fds))
            self.unix_total += len(fds)
            return
        for fd in fds:
            if self.store.store_now(fd, CONNECTION_NAME):
                self.unix_kept.add(fd)
            else:
                self.unix_total += 1

    def flush(self) -> None:
        """End of an accepting turn: one parking message per 253 connections admitted.
        (Replaced in __init__ by Parking.flush itself: one Python call less per turn.)"""
        self.parking.flush()

    def forget(self, conn: Connection) -> None:
        """Before a connection is closed: a parked copy would keep it open, so it is
        shut down first (the client sees the end). After a hand-over nothing is parked
        here any more (Parking.release): the next process owns them. (Replaced in
        __init__ by Parking.forget itself when no unix stream listener is served.)"""
        fd = conn.fd
        if fd in self.unix_kept:
            self.unix_kept.discard(fd)
            if not self.store.unqueue(fd) and not self._released:
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)  # PID 1 sees the hang-up
                except OSError:
                    pass
            return
        self.parking.forget(conn)

    def forget_listener(self, listener: Listener) -> None:
        """A stored listener closed at a graceful stop stops listening now, rather
        than queueing connections nobody will accept."""
        if listener.fd in self._stored_listeners:
            self._stored_listeners.discard(listener.fd)
            if not self._released:
                release(listener.sock)

    def finish(self) -> None:
        """The loop ended without a hand-over (a stop): every connection is closed, so
        the parking sockets leave the store, and the dead sockets in them with it."""
        if not self._released:
            self.parking.remove_all()

    def figures(self) -> dict[str, int]:
        """For the metrics, at scrape time: what the take-over found, and the
        connections a restart now would close (open, but not parked)."""
        where = self.parking.where
        parking = self.parking
        return {**self.totals, "unstored_store_full": parking.refused,
                "unstored_store_error": parking.errors + self.unix_total,
                "unstored_open": sum(1 for fd in self.shared.conns
                                     if fd not in where and fd not in self.unix_kept)}

    # --- restart or stop --------------------------------------------------

    def arm(self) -> None:
        self._armed_at = self.shared.now
        logger.info("the stop hook says this stop is a restart: connections will be handed over")

    def restarting(self) -> bool:
        armed = self._armed_at
        return armed is not None and self.shared.now - armed <= ARM_WINDOW

    def hand_over(self, version: str, waiting_room: HeaderWait | None = None) -> None:
        """SIGTERM of a restart: leave every connection parked for the next process,
        with the state it needs, and let the loop end without closing any.
        Blocks for at most a few seconds (waiting for PID 1), once, on the way out."""
        shared = self.shared
        parking = self.parking
        shared.stopping = True
        shared.notifier.send("STOPPING=1", "STATUS=restarting: handing connections over")
        listeners = len(self._stored_listeners)
        for listener in list(shared.listeners.values()):
            if listener.fd not in self._stored_listeners:
                shared.close_listener(listener)  # a socket unit's: systemd holds it
        shared.close_udp()
        parking.flush()
        if parking.unparked:
            parking.step()  # one more try for those the limit refused
        if self.unix_kept and not self.store.flush_all():
            self.unix_kept.clear()  # PID 1 did not take them in time: not kept
        # Connections still waiting for their PROXY header: parked with the others
        # (the room closes those that cannot be: the balancer sees them end).
        waiting = []
        closed = 0
        if waiting_room is not None:
            waiting, closed = waiting_room.hand_over(len(waiting_room.waiting))
        not_parked = set(parking.park_now(sock.fileno() for sock, *_ in waiting))
        waiting_records = []
        for sock, header, taken, waited in waiting:
            if sock.fileno() in not_parked:
                _close_gracefully(sock)
                closed += 1
                continue
            waiting_records.append(WaitingRecord(os.fstat(sock.fileno()).st_ino, header, taken,
                                                 waited))
        records = []
        unparked = []
        where = parking.where
        for conn in shared.conns.values():
            if conn.fd not in where and conn.fd not in self.unix_kept:
                unparked.append(conn)
                continue
            flags = ((PAUSED if conn.paused else 0) | (READ_CLOSED if conn.read_closed else 0)
                     | (PEER_FINISHED if conn.peer_finished else 0))
            records.append(Record(os.fstat(conn.fd).st_ino, conn.bytes_in, flags,
                                  conn.pending or b"", conn.client))
        pending = sum(len(record.pending) for record in records)
        try:
            fd = write_state(os.getpid(), version, records, waiting_records,
                             closed + len(unparked), self.totals,
                             len(records) + len(waiting_records))
        except OSError as err:  # out of descriptors or memory: the connections still go
            logger.error("could not write the hand-over state: %s", err)
            stored = False
        else:
            try:
                stored = self.store.store_now(fd, f"{STATE_PREFIX}{os.getpid()}")
            finally:
                os.close(fd)
        parking.step()  # removals still owed to PID 1 (a compaction's last one)
        confirmed = self.store.barrier()
        logger.info("handing over %d connection(s)%s and %d listener(s) to the next process "
                    "(%s of pending echo; %d parking socket(s))%s%s", len(records),
                    f" and {len(waiting_records)} waiting for a PROXY header"
                    if waiting_records else "", listeners, _kib(pending),
                    len(parking.segments),
                    "" if stored else "; the state could not be stored: pending echo is lost",
                    "" if confirmed else "; systemd did not confirm (BARRIER) in time")
        if unparked or closed:
            logger.warning("%d connection(s) were not kept for the next process (not parked): "
                           "closing them", len(unparked) + closed)
        for conn in unparked:
            # Not kept: closed now, its echo sent as far as the socket takes it.
            if conn.pending:
                conn.on_writable()
            conn.discard_input()
            shared.close(conn, Close.SHUTDOWN)
        self._released = True
        parking.release()
        for sock, *_ in waiting:
            sock.close()  # our copy only (closed already if not parked: a no-op)
        poller = shared.poller
        for conn in shared.conns.values():
            poller.unregister(conn.fd)
            conn.sock.close()  # our copy only: the parked copy keeps the connection open
        shared.conns.clear()
        shared.per_client.clear()
        for listener in list(shared.listeners.values()):
            shared.close_listener(listener)

    # --- taking over --------------------------------------------------------

    def take_over(self, inherited: Inheritance, waiting_room: HeaderWait | None = None
                  ) -> None:
        """Serve the connections of the previous process, with their echo state and,
        behind a balancer, the client each one's header named; give those still
        waiting for a header to ``waiting_room``. Everything inherited is parked in a
        fresh parking socket, as it is read (253 at a time), before the old ones (and
        an older release's ``conn`` entries) leave the store: a crash in the middle
        loses at most the batch in hand."""
        shared = self.shared
        config = shared.config
        state = inherited.state
        records = state.records if state else {}
        waiting_records = state.waiting if state else {}
        self.open()
        for name in inherited.removals:
            self.parking.remove_later(name)
        seen: set[tuple[int, int]] = set()
        legacy = []
        for item in inherited.connections:
            key = inode_key(item.fd)
            if key is None or key in seen:
                os.close(item.fd)  # a duplicate: the one already had stays
                continue
            seen.add(key)
            legacy.append(item)
        # Parked again as they are read, message by message (those still waiting for a
        # header are not: as in the old process, they are parked once admitted); an
        # older release's "conn" entries right after.
        found = unpark(inherited.segments, seen, self.parking.park_now, set(waiting_records))
        waiting_items = list(inherited.waiting)
        items = []
        for item in [*legacy, *found.live]:
            (waiting_items if item.inode in waiting_records and item.name == "parked"
             else items).append(item)
        parkable = [item.fd for item in legacy if item.family != socket.AF_UNIX]
        not_parked = set(self.parking.park_now(parkable)) | found.not_parked
        for item in inherited.segments:
            self.parking.remove_later(item.name)
            os.close(item.fd)
        if inherited.connections or CONNECTION_NAME in inherited.restore_names:
            # The older release's entries, one each (or something foreign under that
            # name): all parked now, so the whole name goes. Unix stream connections
            # are stored again under it after the removal (PID 1 would take storing
            # one it still holds as a duplicate, and the removal would then end it).
            self.parking.remove_later(CONNECTION_NAME)
            self._store_unix_again([item.fd for item in legacy
                                    if item.family == socket.AF_UNIX])
        # A format-1 state, or none (a crash), does not say which client a header
        # named: with proxy_protocol on, a connection's socket peer is the
        # balancer, so one not in a format-2 state is taken over as one whose
        # header named no client (never counted as the balancer's own).
        clients_known = state is not None and state.format >= 2
        limit = config.max_connections_per_ip
        adopted = []
        unknown = 0
        listeners = {_local_port(listener.sock): listener
                     for listener in shared.listeners.values()}
        tallies = {port: shared.tallies.get(listener.fd) for port, listener in listeners.items()}
        for item in items:
            sock = socket.socket(fileno=item.fd)
            sock.setblocking(False)
            record = records.pop(item.inode, None)
            if record is not None and clients_known:
                client = record.client
            elif config.proxy_protocol:
                client = ()
                unknown += 1
            else:
                client = None
            # As admission and the waiting room set it: a proxied connection keeps
            # the client its header named (or the balancer's address), a direct
            # one its peer only for the log.
            peer = client or None
            if peer is None and (client is not None or config.log_connections or limit):
                try:
                    peer = sock.getpeername()
                except OSError:
                    peer = None
            conn = Connection(sock, peer if client is not None or config.log_connections
                              else None, config.buffer_size, shared.now)
            conn.client = client
            conn.origin = tallies.get(_local_port(sock))  # its listener's, by port
            if record is not None:
                conn.bytes_in = record.bytes_in
                if record.length:
                    try:
                        conn.pending = state.read_pending(record)
                    except (OSError, StateError) as err:
                        logger.warning("lost the pending echo of a connection: %s", err)
                conn.paused = bool(record.flags & PAUSED)
                conn.read_closed = bool(record.flags & READ_CLOSED)
                conn.peer_finished = bool(record.flags & PEER_FINISHED)
            if item.fd in not_parked:
                self.parking.unparked.add(item.fd)
            shared.conns[conn.fd] = conn
            want = conn.wanted()
            if want < 0:  # finished in the old process's last turn: only the close is left
                shared.close(conn, want)
                continue
            shared.poller.register(conn.fd, want)
            conn.interest = want
            host = client[0] if client else peer[0] if client is None and isinstance(
                peer, tuple) else None
            if limit and host:
                conn.group = client_group(client_address(host), config.ipv6_prefix)
                shared.per_client[conn.group] = shared.per_client.get(conn.group, 0) + 1
            adopted.append(conn)
        if state is not None:
            state.close()
        if self.parking.unparked:
            self.parking.refused += len(self.parking.unparked)
            logger.error("%d connection(s) taken over could not be parked again (%s): they "
                         "are served, and closed at a restart unless a retry succeeds",
                         len(self.parking.unparked), self.parking.last_error)
            self.parking.step()
        resumed = self._resume_waiting(waiting_items, state, listeners, waiting_room)
        shared.counters.taken_over = len(adopted) + resumed
        totals = self.totals
        if state is not None:
            for name in totals:
                totals[name] += state.totals.get(name, 0)
            totals["lost"] += state.closed
        totals["lost"] += found.lost
        totals["connections"] += len(adopted) + resumed
        totals["bytes"] += sum(len(conn.pending) for conn in adopted if conn.pending)
        if found.duplicates or found.ended or found.foreign:
            logger.info("parking sockets also held %d connection(s) closed before the "
                        "take-over, %d duplicate(s) and %d descriptor(s) that were not TCP "
                        "connections: closed", found.ended, found.duplicates, found.foreign)
        if records:
            # A parked connection reset by its client during the restart is dropped
            # as ended; one the kernel could not install is counted as lost.
            logger.warning("%d connection(s) of the hand-over state were not handed over "
                           "(their clients went away during the restart%s)", len(records),
                           f", or {found.lost} lost at take-over" if found.lost else "")
        if unknown:
            logger.warning("%d proxied connection(s) taken over without the client their "
                           "PROXY header named (%s): counted under no client, logged with "
                           "the balancer's address", unknown,
                           "no hand-over state: a crash" if state is None
                           else f"a format-{state.format} hand-over state")
        if state is not None or adopted or resumed or inherited.own_listeners:
            logger.info("%s", describe_takeover(adopted, len(inherited.own_listeners), state,
                                                resumed))

    def _resume_waiting(self, items: list[Received], state: State | None,
                        listeners: dict[int | None, Listener],
                        waiting_room: HeaderWait | None) -> int:
        """Connections that were waiting for their PROXY header at hand-over: back
        into the waiting room, reading on from the header bytes read so far, the
        longest-waiting first (the room's sweep expects arrival order)."""
        records = state.waiting if state is not None else {}
        resumable = []
        for item in items:
            record = records.get(item.inode)
            sock = socket.socket(fileno=item.fd)
            listener = listeners.get(_local_port(sock))
            why = ("not in the hand-over state" if record is None else
                   "[server] proxy_protocol is off now" if waiting_room is None else
                   "its listener is not served now" if listener is None else None)
            if why is not None:
                logger.warning("closed a connection that was waiting for its PROXY header: "
                               "%s", why)
                release(sock)
                sock.close()
                self.totals["lost"] += 1
                continue
            resumable.append((record, sock, listener))
        resumed = 0
        assert waiting_room is not None or not resumable
        for record, sock, listener in sorted(resumable, key=lambda entry: -entry[0].waited):
            if waiting_room.resume(sock, listener, record.header, record.taken, record.waited):
                resumed += 1
            else:
                self.totals["lost"] += 1
        return resumed


def describe_takeover(adopted: list[Connection], listeners: int,
                      state: State | None, waiting: int = 0) -> str:
    pending = sum(len(conn.pending) for conn in adopted if conn.pending)
    if state is not None:
        origin = f"from PID {state.pid} (muxd {state.version}, {_kib(pending)} of pending echo)"
    else:
        origin = "without hand-over state (after a crash: echo held in memory is lost)"
    also = f" ({waiting} still waiting for a PROXY header)" if waiting else ""
    if state is not None and not adopted and not waiting:  # an idle restart: no news
        return f"no connection to take over from PID {state.pid} (muxd {state.version})"
    return (f"took over {len(adopted) + waiting} connections{also} and {listeners} listeners "
            f"{origin}")


def _close_gracefully(sock: socket.socket) -> None:
    release(sock)  # a parked copy may exist: the end must reach the client
    sock.close()


def _local_port(sock: socket.socket) -> int | None:
    try:
        name = sock.getsockname()
    except OSError:
        return None
    return name[1] if isinstance(name, tuple) else None


def _kib(count: int) -> str:
    return f"{count / 1024:.0f} KiB" if count >= 1024 or count == 0 else f"{count} bytes"

