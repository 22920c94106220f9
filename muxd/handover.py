"""Hand-over: keeping every connection across restarts, upgrades and crashes
through systemd's file descriptor store (the protocol itself is fdstore.py).

How a connection survives:

* **Stored when accepted.** Each accepted connection is queued by ``track``
  and sent to the store with the others of its loop turn (``flush``, called
  once per accepting turn, never per message). A crash leaves no time to store
  anything, so this is what makes a ``kill -9`` or a watchdog kill survivable.
* **Removed when closed.** ``forget`` shuts the socket down before the loop
  closes it: PID 1 sees the hang-up and drops its copy, so the peer sees the
  end. (FDSTOREREMOVE would need a unique name per connection, which would
  make batching impossible: a message carries one name.)
* **Restart or stop.** SIGTERM looks the same for both. The unit's root stop
  hook signals ``RESTART_SIGNAL`` (SIGURG) just before systemd's SIGTERM when
  the job is a restart; a SIGTERM within ``ARM_WINDOW`` seconds of it hands
  over (``hand_over``), any other SIGTERM is today's graceful stop.
* **State that is not a descriptor** (pending echo, pause, half-close, byte
  counts, and behind a balancer the client its PROXY header named) is written
  at hand-over into a memfd stored as ``state-<pid>``, keyed by socket inode.
  The next process reads it once (``pread`` at 0: the offset is shared with
  the old copy), asks the store to remove it, and ignores it (with a log
  line) if it does not parse. Its format: see ``encode_state``.
* **Waiting for a PROXY header.** A connection whose header has not arrived
  (or not whole) is not served yet, so it is not stored while serving; at
  hand-over it is stored as ``state-wait`` with the header bytes read so far,
  and the next process's waiting room (proxy_wait.py) reads on from there.

What a crash loses (README, "Restarts, upgrades and crashes"): per connection, the
echo muxd held in memory at that instant: its pending echo and the chunk
being echoed, together at most ``buffer_size`` (connection.py bounds them).
Also the connections accepted in the turn of the crash, before their batch
was sent, and the connections still waiting for a PROXY header (never stored
before a hand-over). Every byte the kernel holds (unread input, unacknowledged
echo) survives. Behind a balancer, the clients the headers named were only in
memory: with ``proxy_protocol`` on, a connection taken over without them is
treated as one whose header named no client (logged with the balancer's
address, counted under no client), never as the balancer's own.

Of the shared state (state.py) it may: add the connections it takes over to
the connection table, the poller and the per-client counts; at a hand-over,
set ``stopping``, close listeners and endpoints, and empty the table without
closing the connections (the store keeps them); take the waiting room's
connections at a hand-over and give them back to it at a take-over; schedule
its retry timer. It is ``Shared.kept``: told of every connection admitted and
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
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from muxd.access import client_address, client_group
from muxd.connection import Close, Connection
from muxd.fdstore import FdStore, Received, drop, release
from muxd.listeners import Listener
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
STATE_FORMAT = 2
RETRY_DELAY = 0.01  # PID 1's queue was full: try the batch again this soon

PAUSED, READ_CLOSED, PEER_FINISHED = 1, 2, 4


class StateError(ValueError):
    """A state file that is not muxd's, or is damaged."""


@dataclass
class Record:
    inode: int
    bytes_in: int
    flags: int
    pending: bytes
    # Connection.client: None (no PROXY header), () (it named no client, or
    # that was lost), or (host, port). None too in a format-1 state.
    client: tuple | None = None


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
    closed: int = 0  # connections the writer closed at hand-over: not in the store
    # The writer's hand-over totals (HandOver.totals), carried on so that the
    # muxd_handover_* counters never go back at a restart (format 2; else 0s).
    totals: dict[str, int] = field(default_factory=dict)

    @property
    def pending_bytes(self) -> int:
        return sum(len(record.pending) for record in self.records.values())


def encode_state(pid: int, version: str, records: Iterable[Record],
                 waiting: Iterable[WaitingRecord] = (), closed: int = 0,
                 totals: dict[str, int] | None = None) -> bytes:
    """The state memfd's contents: ``STATE_MAGIC``, the length of a JSON header
    (8 bytes, big-endian), the header, then every connection's pending echo in
    the order of its ``connections`` entries ([inode, bytes in, flags, pending
    length]).

    Versioning: the magic names that layout, and a reader that does not know
    the magic ignores the whole state. The header's ``format`` counts what was
    *added* to it, as keys an older reader skips without harm: format 1 (no
    ``format`` key) is the layout alone; format 2 adds ``clients`` (the client
    each proxied connection's PROXY header named: [inode, host, port], host and
    port null when it named none), ``waiting`` (connections stored as
    ``WAITING_NAME``: [inode, seconds waited, bytes taken, header read so far
    in hex], ``closed`` (connections closed at hand-over, not in the store) and
    ``totals`` (the writer's hand-over counters, carried on). A change an older
    reader could not skip (a field of ``connections``, bytes after the pending
    echo) needs a new magic."""
    records = list(records)
    header = json.dumps({
        "format": STATE_FORMAT, "pid": pid, "version": version,
        "written": time.clock_gettime(time.CLOCK_BOOTTIME),
        "connections": [[r.inode, r.bytes_in, r.flags, len(r.pending)] for r in records],
        "clients": [[r.inode, *(r.client or (None, None))] for r in records
                    if r.client is not None],
        "waiting": [[w.inode, round(w.waited, 3), w.taken, w.header.hex()] for w in waiting],
        "closed": closed,
        "totals": totals or {},
    }).encode()
    return b"".join([STATE_MAGIC, struct.pack("!Q", len(header)), header,
                     *(r.pending for r in records)])


def decode_state(data: bytes) -> State:
    """Read a state of format 1 or later (``encode_state``); StateError if damaged."""
    if not data.startswith(STATE_MAGIC):
        raise StateError("not a muxd hand-over state (no magic)")
    offset = len(STATE_MAGIC)
    try:
        (length,) = struct.unpack_from("!Q", data, offset)
        offset += 8
        header = json.loads(data[offset:offset + length])
        offset += length
        pid, version = int(header["pid"]), str(header["version"])
        written = float(header["written"])
        state_format = int(header.get("format", 1))
        records: dict[int, Record] = {}
        for inode, bytes_in, flags, size in header["connections"]:
            if size < 0 or offset + size > len(data):
                raise StateError("pending echo runs past the end of the state")
            records[int(inode)] = Record(int(inode), int(bytes_in), int(flags),
                                         data[offset:offset + size])
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
    except StateError:
        raise
    except (struct.error, ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        raise StateError(f"damaged header ({err})") from None
    if offset != len(data):
        raise StateError(f"{len(data) - offset} unexpected bytes after the pending echo")
    return State(pid, version, written, records, state_format, waiting, closed, totals)


def write_memfd(data: bytes) -> int:
    fd = os.memfd_create("muxd-handover", os.MFD_CLOEXEC)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    return fd


def read_memfd(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    chunks = []
    offset = 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


@dataclass
class Inheritance:
    """What the previous process left in the store, sorted."""

    own_listeners: list[Received] = field(default_factory=list)  # stored by muxd, name "listen"
    connections: list[Received] = field(default_factory=list)  # stored by muxd, name "conn"
    waiting: list[Received] = field(default_factory=list)  # name WAITING_NAME
    state: State | None = None
    dropped: int = 0
    # A foreign descriptor stored under one of muxd's own names: only removing
    # the whole name takes it out of the store (and the rest is stored again).
    restore_names: set[str] = field(default_factory=set)


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
                store.remove(WAITING_NAME)
                removed.add(WAITING_NAME)
            if item.kind == "stream" and item.family in (socket.AF_INET, socket.AF_INET6):
                found.waiting.append(item)
                continue
            _drop(found, item, "stored as waiting for a PROXY header but is not a "
                               "connected TCP socket")
        elif item.name.startswith(STATE_PREFIX):
            if store is not None:
                store.remove(item.name)  # read once: a later crash must not replay it
            if item.kind != "file":
                _drop(found, item, "stored as hand-over state but is not a file")
                continue
            try:
                data = read_memfd(item.fd)
                states.append((item, decode_state(data)))
            except (OSError, StateError) as err:
                logger.warning("ignored the hand-over state %s: %s", item.describe(), err)
                found.dropped += 1
            finally:
                os.close(item.fd)
        else:
            _drop(found, item, "not a name muxd stores under")
    if states:
        # Normally one; more only if a removal was lost: the newest writer wins.
        found.state = max(states, key=lambda pair: pair[1].written)[1]
        if len(states) > 1:
            logger.warning("%d hand-over states inherited; used the one of PID %d",
                           len(states), found.state.pid)
    return found


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
    """The loop's room for the store: track, forget, hand over, take over."""

    def __init__(self, shared: Shared, store: FdStore, capacity: int,
                 stored_listeners: Iterable[Listener]) -> None:
        self.shared = shared
        self.store = store
        self._stored_listeners = {listener.fd for listener in stored_listeners}
        # The state memfd needs one place; listeners hold theirs already.
        self.connection_capacity = max(0, capacity - len(self._stored_listeners) - 1)
        self._stored: set[int] = set()  # fds of live connections in (or queued for) the store
        self._retry_scheduled = False
        self._armed_at: float | None = None
        self._released = False
        self.not_stored = 0  # connections beyond the store's size (never kept)
        self.store_errors = 0  # connections whose message to the store failed (never kept)
        self._warned_full = False
        self._warned_failed = False
        # The metrics' muxd_handover_* counters: connections and pending echo
        # bytes taken over, connections a hand-over could not keep. Counted at
        # take-over, and carried on from the previous process's totals (the
        # state), so that a restart never sets them back: increase() then
        # counts each restart's figures, however alike consecutive ones are.
        self.totals = dict.fromkeys(("connections", "bytes", "lost"), 0)

    # --- serving: per admitted connection, per accepting turn, per close ------

    def track(self, conn: Connection) -> None:
        if len(self._stored) >= self.connection_capacity:
            self.not_stored += 1
            if not self._warned_full:
                self._warned_full = True
                logger.warning("the file descriptor store is full (%d connections; "
                               "FileDescriptorStoreMax= too small for max_connections?): "
                               "connections beyond it are closed at a restart",
                               self.connection_capacity)
            return
        self._stored.add(conn.fd)
        self.store.queue(conn.fd, CONNECTION_NAME)

    def flush(self) -> None:
        """End of an accepting turn: one message per 253 connections admitted."""
        failed = self.store.failed
        if not self.store.flush() and not self._retry_scheduled:
            self._retry_scheduled = True
            self.shared.timers.call_at(self.shared.now + RETRY_DELAY, self._retry)
        if self.store.rejected:
            self._take_rejected()
        if self.store.failed != failed and not self._warned_failed:
            self._warned_failed = True
            logger.error("could not store connections in systemd's file descriptor store "
                         "(%s); they are closed at a restart", self.store.last_error)

    def _take_rejected(self) -> list[int]:
        """Connections whose message to the store failed are not in it: a restart
        closes them as it closes those beyond its size."""
        rejected, self.store.rejected = self.store.rejected, []
        for fd in rejected:
            self._stored.discard(fd)
        self.store_errors += len(rejected)
        return rejected

    def _retry(self) -> None:
        self._retry_scheduled = False
        self.flush()

    def forget(self, conn: Connection) -> None:
        """Before a connection is closed: take it out of the store."""
        fd = conn.fd
        if fd in self._stored:
            self._stored.discard(fd)
            if self._released:
                return  # handed over: the next process owns it now
            if not self.store.unqueue(fd):
                release(conn.sock)

    def forget_listener(self, listener: Listener) -> None:
        """A stored listener closed at a graceful stop stops listening now, rather
        than queueing connections nobody will accept."""
        if listener.fd in self._stored_listeners:
            self._stored_listeners.discard(listener.fd)
            if not self._released:
                release(listener.sock)

    def figures(self) -> dict[str, int]:
        """For the metrics, at scrape time: what the take-over found, and the
        connections a restart now would close (open, but not in the store)."""
        stored = self._stored
        return {**self.totals, "unstored_store_full": self.not_stored,
                "unstored_store_error": self.store_errors,
                "unstored_open": sum(1 for fd in self.shared.conns if fd not in stored)}

    # --- restart or stop --------------------------------------------------

    def arm(self) -> None:
        self._armed_at = self.shared.now
        logger.info("the stop hook says this stop is a restart: connections will be handed over")

    def restarting(self) -> bool:
        armed = self._armed_at
        return armed is not None and self.shared.now - armed <= ARM_WINDOW

    def hand_over(self, version: str, waiting_room: HeaderWait | None = None) -> None:
        """SIGTERM of a restart: leave every connection in the store for the next
        process, with the state it needs, and let the loop end without closing any.
        Blocks for at most a few seconds (waiting for PID 1), once, on the way out."""
        shared = self.shared
        shared.stopping = True
        shared.notifier.send("STOPPING=1", "STATUS=restarting: handing connections over")
        listeners = len(self._stored_listeners)
        for listener in list(shared.listeners.values()):
            if listener.fd not in self._stored_listeners:
                shared.close_listener(listener)  # a socket unit's: systemd holds it
        shared.close_udp()
        # Connections still waiting for their PROXY header, as far as the store has
        # room; the room closes the others (the balancer sees them end).
        waiting = []
        closed = 0
        if waiting_room is not None:
            waiting, closed = waiting_room.hand_over(
                max(0, self.connection_capacity - len(self._stored)))
        for sock, *_ in waiting:
            self.store.queue(sock.fileno(), WAITING_NAME)
        self.store.flush_all()
        rejected = set(self._take_rejected())
        waiting_records = []
        for sock, header, taken, waited in waiting:
            if sock.fileno() in rejected:
                sock.close()
                closed += 1
                continue
            waiting_records.append(WaitingRecord(os.fstat(sock.fileno()).st_ino, header, taken,
                                                 waited))
        records = []
        unstored = []
        pending = 0
        for conn in shared.conns.values():
            if conn.fd not in self._stored:
                unstored.append(conn)
                continue
            flags = ((PAUSED if conn.paused else 0) | (READ_CLOSED if conn.read_closed else 0)
                     | (PEER_FINISHED if conn.peer_finished else 0))
            data = bytes(conn.pending) if conn.pending else b""
            pending += len(data)
            records.append(Record(os.fstat(conn.fd).st_ino, conn.bytes_in, flags, data,
                                  conn.client))
        fd = write_memfd(encode_state(os.getpid(), version, records, waiting_records,
                                      closed + len(unstored), self.totals))
        try:
            stored = self.store.store_now(fd, f"{STATE_PREFIX}{os.getpid()}")
        finally:
            os.close(fd)
        confirmed = self.store.barrier()
        logger.info("handing over %d connection(s)%s and %d listener(s) to the next process "
                    "(%s of pending echo)%s%s", len(records),
                    f" and {len(waiting_records)} waiting for a PROXY header"
                    if waiting_records else "", listeners, _kib(pending),
                    "" if stored else "; the state could not be stored: pending echo is lost",
                    "" if confirmed else "; systemd did not confirm (BARRIER) in time")
        if unstored or closed:
            logger.warning("%d connection(s) were not in the file descriptor store: "
                           "closing them", len(unstored) + closed)
        for conn in unstored:
            # Not in the store: closed now, its echo sent as far as the socket takes it.
            if conn.pending:
                conn.on_writable()
            conn.discard_input()
            shared.close(conn, Close.SHUTDOWN)
        self._released = True
        for sock, *_ in waiting:
            sock.close()  # our copy only (closed already if rejected: a no-op)
        poller = shared.poller
        for conn in shared.conns.values():
            poller.unregister(conn.fd)
            conn.sock.close()  # our copy only: the store keeps the connection open
        shared.conns.clear()
        shared.per_client.clear()
        for listener in list(shared.listeners.values()):
            shared.close_listener(listener)

    # --- taking over --------------------------------------------------------

    def take_over(self, inherited: Inheritance, waiting_room: HeaderWait | None = None
                  ) -> None:
        """Serve the connections of the previous process, with their echo state and,
        behind a balancer, the client each one's header named; give those still
        waiting for a header to ``waiting_room``."""
        shared = self.shared
        config = shared.config
        state = inherited.state
        records = state.records if state else {}
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
        for item in inherited.connections:
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
                if record.pending:
                    conn.pending = bytearray(record.pending)
                conn.paused = bool(record.flags & PAUSED)
                conn.read_closed = bool(record.flags & READ_CLOSED)
                conn.peer_finished = bool(record.flags & PEER_FINISHED)
            self._stored.add(conn.fd)
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
        if CONNECTION_NAME in inherited.restore_names:
            # A foreign descriptor was stored as a connection: only removing the
            # name takes it out; then the real ones go back in.
            self.store.remove(CONNECTION_NAME)
            for conn in adopted:
                self.store.queue(conn.fd, CONNECTION_NAME)
            self.flush()
        resumed = self._resume_waiting(inherited.waiting, state, listeners, waiting_room)
        shared.counters.taken_over = len(adopted) + resumed
        totals = self.totals
        if state is not None:
            for name in totals:
                totals[name] += state.totals.get(name, 0)
            totals["lost"] += state.closed
        totals["connections"] += len(adopted) + resumed
        totals["bytes"] += sum(len(conn.pending) for conn in adopted if conn.pending)
        if records:
            # systemd drops a stored connection that hangs up (its client reset or went
            # away during the restart), and refuses descriptors beyond its store's size.
            logger.warning("%d connection(s) of the hand-over state were not in the store "
                           "(their clients went away during the restart, or systemd refused "
                           "them: FileDescriptorStoreMax= below FDSTORE=?)", len(records))
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
                   "proxy_protocol is off now" if waiting_room is None else
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


def _local_port(sock: socket.socket) -> int | None:
    try:
        name = sock.getsockname()
    except OSError:
        return None
    return name[1] if isinstance(name, tuple) else None


def _kib(count: int) -> str:
    return f"{count / 1024:.0f} KiB" if count >= 1024 or count == 0 else f"{count} bytes"

