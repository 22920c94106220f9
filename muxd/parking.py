"""Parking: connections kept across restarts and crashes as descriptors in flight in a
socket pair that systemd's store holds once, instead of one store entry per connection.

Why: PID 1 compares every descriptor stored with every one already there, and again at
every daemon-reload (../shared/notes/fd-store.md, "What PID 1 pays per stored
descriptor"). A descriptor sent with SCM_RIGHTS and not yet received is kept alive by
the message, so a connection sent ("parked") into a ``socketpair(AF_UNIX,
SOCK_SEQPACKET)`` whose receive end is in the store survives the process, crash or
not; the next process receives it back. The store holds a few of these "segments".

* **Parking.** ``track`` notes a new connection; ``flush`` (once per accepting turn)
  sends that turn's connections in one message (253 at most: SCM_MAX_FD). The
  message's payload is one zero byte per descriptor, so the reader knows how many it
  should have got (MSG_CTRUNC loss is counted) and FIONREAD on a segment says how
  many descriptors it holds.
* **Segments.** The receive end is stored with ``FDPOLL=0`` (our end closing makes it
  report hang-up: PID 1 must not drop it), under a unique name under the state prefix
  (``PARK_PREFIX``: a release that does not know it removes it and starts, see README).
  Capacity is counted in messages (~278 per default SO_SNDBUF): a segment is sealed at
  ``SEGMENT_MESSAGES``, at EAGAIN, or at ``segment_fds`` descriptors (a quarter of the
  in-flight limit), and the next one, stored without waiting, takes over. A connection
  is only parked into a segment PID 1 already holds.
* **Closing.** A parked copy keeps the connection open: ``forget`` says so, and the
  caller shuts it down (SHUT_RDWR) before closing, so the client sees the end. The dead
  socket stays in flight until its segment goes.
* **Compaction.** A sealed segment whose closed connections outnumber its live ones (or,
  past ``MAX_SEGMENTS``, or at the in-flight limit, the one with the most dead), has its
  live connections parked
  again into the current segment in full messages (at most ``COMPACT_STEP`` per loop
  turn), then is removed from the store by name (FDSTOREREMOVE), which frees it and its
  dead sockets. Each connection is moved at most once per segment that seals under it
  with more dead than live around it: amortised O(1) per connection.
* **Limits.** Descriptors in flight count against the user's soft RLIMIT_NOFILE
  (ETOOMANYREFS beyond): about live + closed-not-yet-compacted. New connections stop
  a quarter short of it (``reserve``): room to move the live ones of a segment (never
  more than a quarter) and free its dead, which is how a storm of reconnects (every
  held connection dead, as many new) stays under it. A connection that cannot be
  parked is served all the same, retried, and counted (``unparked``): a restart
  closes it gracefully.
* **Take-over** (``unpark``): every message of every inherited segment is received
  (control buffer for 253 descriptors; MSG_CTRUNC or a short count is loss, counted),
  duplicates are dropped by (st_dev, st_ino) (a crash in the middle of a compaction
  leaves a connection in two segments), and those the old process had closed are told
  from live ones by TCP_INFO's state (ESTABLISHED or CLOSE_WAIT: live) and closed.

Owns: its segments, which connection is parked where, the in-flight count, the
retry and compaction timers. Touches: the store only through FdStore's methods
(``store_now``, ``remove``); connections only by descriptor (sending them, fstat and
TCP_INFO at take-over, closing duplicates and dead ones it received). It knows no
loop, no Connection and no state file: handover.py drives it.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import select
import socket
import stat
import struct
import time
from array import array
from collections.abc import Callable, Iterable
from typing import Protocol

from muxd.fdstore import MAX_FDS_PER_MESSAGE, FdStore, Received, classify
from muxd.timers import Timers

logger = logging.getLogger("muxd")

PARK_PREFIX = "state-park-"
SEGMENT_MESSAGES = 240  # of ~278 that fit a default SO_SNDBUF: sealed before EAGAIN
OPEN_NEXT_AT = 200  # messages after which the next segment is stored ahead of time
MAX_SEGMENTS = 4  # sealed ones beyond this: the one with the fewest live is compacted
COMPACT_MIN_CLOSED = 64  # dead sockets a sealed segment must hold to be worth replacing
CURRENT_COMPACT_AT = 1024  # the current one is sealed early past this many dead (and > live)
COMPACT_STEP = 4 * MAX_FDS_PER_MESSAGE  # connections moved per loop turn at most
RETRY_DELAY = 1.0  # connections that could not be parked: try again this soon
CONTROL_SPACE = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * array("i").itemsize)
TCP_ESTABLISHED, TCP_CLOSE_WAIT = 1, 8
_COUNTS = [bytes(n) for n in range(MAX_FDS_PER_MESSAGE + 1)]  # the payloads, made once
_SOL, _RIGHTS = socket.SOL_SOCKET, socket.SCM_RIGHTS
_pack_fd = struct.Struct("i").pack  # one descriptor: cheaper than an array
_SHUT_RDWR = socket.SHUT_RDWR


class Closing(Protocol):
    """What ``Parking.forget`` needs of a connection (connection.Connection)."""

    fd: int
    sock: socket.socket
_SCM = (_SOL, _RIGHTS)


class Segment:
    """One parking socket pair: we keep the sending end, PID 1 the receiving one."""

    __slots__ = ("name", "sock", "receiver", "messages", "parked", "members", "stored",
                 "closes", "moved")

    def __init__(self, name: str) -> None:
        self.name = name
        self.sock, self.receiver = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        self.messages = 0
        self.parked = 0  # descriptors sent into it (live and dead): in flight
        # Every fd parked in it, in order, never removed (a list: appending is cheaper
        # than a set's add and discard per connection). Which are still live and still
        # here is Parking.where's to say; read only when the segment is replaced.
        self.members: list[int] = []
        self.stored = False
        self.closes = 0  # connections closed while parked here: dead copies in flight
        self.moved = 0  # live ones parked again elsewhere (compaction)

    @property
    def live(self) -> int:
        return self.parked - self.closes - self.moved

    def close(self) -> None:
        self.sock.close()
        if self.receiver is not None:
            self.receiver.close()
            self.receiver = None


class Parking:
    def __init__(self, store: FdStore, timers: Timers | None = None,
                 clock: Callable[[], float] | None = None, max_segments: int = 0) -> None:
        self.store = store
        # What the store has room for besides the listeners and the state (0: no bound):
        # PID 1 closes what is beyond FileDescriptorStoreMax= without telling us, so a
        # segment past it would be counted as kept and lost at the restart.
        self.max_segments = max_segments
        self.timers = timers
        self.clock = clock
        self.segments: list[Segment] = []  # stored ones, oldest first; the last takes new ones
        self._next: Segment | None = None  # created, not yet in the store
        self.where: dict[int, Segment] = {}  # fd -> the segment its connection is parked in
        self._where_pop = self.where.pop
        self.pending: list[int] = []  # tracked this turn, parked at flush
        self.unparked: set[int] = set()  # could not be parked: retried, closed at a restart
        self._removals: list[str] = []  # names whose FDSTOREREMOVE is still to be sent
        self._serial = 0
        self._timer_set = False
        self._victim: Segment | None = None
        self.refused = 0  # connections the in-flight limit refused (counted once each)
        self.errors = 0  # connections not parked for another error (counted once each)
        self.last_error: OSError | None = None
        self._warned = False
        # The kernel refuses descriptors in flight beyond the sender's soft RLIMIT_NOFILE
        # (ETOOMANYREFS; not for CAP_SYS_RESOURCE, which muxd does not have under
        # systemd): muxd keeps under it by itself, so that the limit is the same
        # whoever runs it, and so that it knows when to replace a segment early.
        self.limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        # New connections stop short of it by this much: room to move the live ones out
        # of a segment full of dead ones, which is what brings the count down again.
        self.reserve = self.limit // 4
        # A segment holds at most that many descriptors (live and dead), so the live
        # ones of any segment fit in the reserve: the one with the most dead can always
        # be replaced, and the count brought down, however many clients reconnect.
        self.segment_fds = max(16, self.reserve)
        self._min_closed = min(COMPACT_MIN_CLOSED, self.segment_fds // 2)
        self._pressure = False
        self._fast: Segment | None = None  # flush's short path: see _arm_fast
        self._fast_room = 0

    # --- figures ----------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Descriptors this process has in flight: live and dead, in all its segments
        (summed when asked: there are a handful, and the per-turn path stays short)."""
        return sum(segment.parked for segment in self.segments)

    # --- segments ---------------------------------------------------------

    def open(self) -> bool:
        """Start-up: the first segment, stored before anything is parked (may wait a
        little for room in PID 1's queue). False if the store did not take it."""
        try:
            segment = self._make()
        except OSError as err:
            logger.error("could not make a parking socket (%s): connections are not kept "
                         "across a restart", err)
            return False
        if not self.store.store_now(segment.receiver.fileno(), segment.name, poll=False):
            segment.close()
            logger.error("could not store a parking socket in systemd's file descriptor "
                         "store (%s): connections are not kept across a restart",
                         self.store.last_error)
            return False
        self._stored(segment)
        return True

    def _make(self) -> Segment:
        self._serial += 1
        return Segment(f"{PARK_PREFIX}{os.getpid()}-{self._serial}")

    def _stored(self, segment: Segment) -> None:
        segment.stored = True
        segment.receiver.close()  # PID 1 holds it now
        segment.receiver = None
        self.segments.append(segment)

    def _prepare_next(self) -> Segment | None:
        """The segment after the current one, stored without waiting: None until PID 1
        has it (its queue was full: tried again at the next call)."""
        segment = self._next
        if segment is None:
            if self.max_segments and len(self.segments) >= self.max_segments:
                self.last_error = OSError(errno.ENOSPC, "no room for another parking socket "
                                          "in the file descriptor store (FDSTORE=)")
                return None
            try:
                segment = self._next = self._make()
            except OSError as err:  # out of descriptors: the caller counts what is left
                self.last_error = err
                return None
        if self.store.store_now(segment.receiver.fileno(), segment.name, timeout=0, poll=False):
            self._next = None
            self._stored(segment)
            return segment
        return None

    def _current(self) -> Segment | None:
        """The segment to park into: the newest, unless it is nearly full (or being
        replaced), in which case the next one is stored without waiting and takes
        over; the old one goes on taking messages while PID 1 has no room for that."""
        segments = self.segments
        current = segments[-1] if segments else None
        usable = current is not None and current.messages < SEGMENT_MESSAGES \
            and current.parked < self.segment_fds and current is not self._victim
        if usable and current.messages < OPEN_NEXT_AT \
                and current.parked < self.segment_fds * 3 // 4:
            return current
        fresh = self._prepare_next()
        if fresh is not None:
            self._schedule()  # the sealed one may be worth replacing now
            return fresh
        return current if usable else None

    # --- parking ----------------------------------------------------------

    def track(self, fd: int) -> None:
        self.pending.append(fd)

    def flush(self) -> None:
        """End of an accepting turn: park this turn's connections, one message per 253.

        The common case (a current segment with room, nothing near a limit) is one
        sendmsg and the bookkeeping, written out here: it runs once per accepting turn,
        which under churn is about once per connection."""
        pending = self.pending
        if not pending:
            return
        count = len(pending)
        segment = self._fast
        if segment is not None and count <= self._fast_room:
            try:
                segment.sock.sendmsg([_COUNTS[count]], [(
                    _SOL, _RIGHTS, _pack_fd(pending[0]) if count == 1 else array("i", pending))])
            except OSError:
                pass  # the general path below says what it was
            else:
                self._fast_room -= count  # bounds the messages too: see _arm_fast
                segment.parked += count
                segment.messages += 1
                segment.members += pending
                where = self.where
                for fd in pending:
                    where[fd] = segment
                pending.clear()  # the same list: HandOver.track appends to it
                return
        self._fast = None
        fds = pending[:]
        pending.clear()
        left = self._place(fds, None)
        if left:
            self._refuse(left)
        else:
            self._arm_fast()

    def _arm_fast(self) -> None:
        """Let flush take its short path while the current segment has room that no
        limit cuts (recomputed here, after any general placement)."""
        segment = self.segments[-1] if self.segments else None
        if segment is None or segment is self._victim or segment.messages >= OPEN_NEXT_AT:
            self._fast = None
            return
        self._fast_room = min(MAX_FDS_PER_MESSAGE,
                              self.segment_fds * 3 // 4 - segment.parked,
                              self.limit - self.reserve - self.in_flight,
                              OPEN_NEXT_AT - segment.messages)  # each message takes >= 1
        self._fast = segment if self._fast_room > 0 else None

    def park_now(self, fds: Iterable[int]) -> list[int]:
        """Park these at once (take-over, hand-over: up to the limit itself); returns
        those that could not be."""
        return self._place(list(fds), None, reserve=False)

    def _place(self, fds: list[int], source: Segment | None, reserve: bool = True
               ) -> list[int]:
        """Send ``fds`` into the current segment (moving them from ``source`` when
        compacting); returns those not parked. New connections keep ``reserve`` free
        under the limit for compaction."""
        self._fast = None  # counts change: flush's short path is re-armed after
        where = self.where
        done = 0
        limit = self.limit - self.reserve if reserve and source is None else self.limit
        in_flight = self.in_flight
        while done < len(fds):
            segment = self._current()
            if segment is None:
                break
            batch = fds[done:done + min(MAX_FDS_PER_MESSAGE,
                                        self.segment_fds - segment.parked)]
            if in_flight + len(batch) > limit:
                room = limit - in_flight
                if room <= 0:
                    self.last_error = OSError(errno.ETOOMANYREFS, "descriptors in flight near "
                                              f"the soft RLIMIT_NOFILE ({self.limit})")
                    self._pressure = True
                    break
                batch = batch[:room]
            try:
                segment.sock.sendmsg([_COUNTS[len(batch)]], [(*_SCM, array("i", batch))])
            except BlockingIOError:
                segment.messages = SEGMENT_MESSAGES  # full before its count: sealed
                continue
            except OSError as err:
                self.last_error = err
                if err.errno == errno.ETOOMANYREFS:
                    self._pressure = True  # others of our user hold some too
                break
            done += len(batch)
            in_flight += len(batch)
            segment.messages += 1
            segment.parked += len(batch)
            segment.members += batch
            for fd in batch:
                where[fd] = segment
            if source is not None:
                source.moved += len(batch)
        return fds[done:]

    def _refuse(self, fds: list[int]) -> None:
        """Not parked: served all the same, retried, closed gracefully at a restart."""
        fresh = [fd for fd in fds if fd not in self.unparked]
        if fresh:
            if self.last_error is not None and self.last_error.errno in (errno.ETOOMANYREFS,
                                                                          errno.ENOSPC):
                self.refused += len(fresh)  # a limit (the metrics' "store_full")
            else:
                self.errors += len(fresh)
            if not self._warned:
                self._warned = True
                logger.error("could not park %d connection(s) for the next process (%s; "
                             "%d in flight): they are served, and closed at a restart unless "
                             "a retry succeeds", len(fresh), self.last_error or "no segment",
                             self.in_flight)
        self.unparked.update(fds)
        self._schedule(0.0 if self._pressure else RETRY_DELAY)  # at the limit: compact first

    def forget(self, conn: Closing) -> None:
        """A connection is about to be closed. A parked copy would keep it open, so it
        is shut down first (the client sees the end); its dead copy stays in flight
        until its segment is replaced. Called for every close: kept short."""
        fd = conn.fd
        segment = self._where_pop(fd, None)
        if segment is None:
            if self.unparked:
                self.unparked.discard(fd)
            if self.pending and fd in self.pending:
                self.pending.remove(fd)
            return
        try:
            conn.sock.shutdown(_SHUT_RDWR)
        except OSError:
            pass  # already reset
        segment.closes += 1
        if not segment.closes & 7:  # looked at every 8th close: enough, and cheaper
            self._consider(segment)

    def _consider(self, segment: Segment) -> None:
        """Schedule a replacement if this segment now holds more dead than live."""
        members = segment.live
        closed = segment.closes
        if closed > members and closed >= self._min_closed and self._victim is None \
                and not self._timer_set:
            if segment is not self.segments[-1] or closed >= CURRENT_COMPACT_AT:
                self._schedule()

    # --- compaction and retries (from a timer: never within a dispatch) ----

    def _schedule(self, delay: float = 0.0) -> None:
        if self._timer_set or self.timers is None or self.clock is None:
            return
        self._timer_set = True
        self.timers.call_at(self.clock() + delay, self._work)

    def _work(self) -> None:
        self._timer_set = False
        self.step()

    def step(self) -> None:
        """One bounded piece of upkeep: send removals that PID 1's queue refused, retry
        unparked connections, move up to COMPACT_STEP connections out of a segment being
        replaced (removing it once empty). Schedules itself again while work is left."""
        if self._removals:
            self._send_removals()
        self._fast = None
        if self.unparked:
            retry = list(self.unparked)
            self.unparked.clear()
            self._pressure = False
            left = self._place(retry, None)
            if left:
                self.unparked.update(left)
            else:
                logger.info("parked again %d connection(s) that could not be parked before",
                            len(retry))
                self._warned = False  # a later shortage is logged again
        victim = self._victim or self._choose_victim()
        if victim is not None:
            where = self.where
            if victim is not self._victim:
                # Its live connections, read once: parked here and neither closed nor
                # moved since (an fd number parked twice here counts once).
                self._victim = victim
                victim.members = list(dict.fromkeys(
                    fd for fd in victim.members if where.get(fd) is victim))
            moving = [fd for fd in victim.members[:COMPACT_STEP] if where.get(fd) is victim]
            del victim.members[:COMPACT_STEP]
            if moving:
                left = self._place(moving, victim)
                if left:
                    victim.members[:0] = left
                    if len(left) == len(moving):
                        self._schedule(RETRY_DELAY)  # nowhere to move them (limit?): later
                        return
            if not victim.members:
                self._retire(victim)
                self._victim = None
        if self._removals or self._victim is not None or self._choose_victim() is not None:
            self._schedule()
        elif self.unparked:
            self._schedule(RETRY_DELAY)
        if not self.unparked:
            self._arm_fast()

    def _choose_victim(self) -> Segment | None:
        """A sealed segment with more dead than live (and enough dead to be worth it);
        else, past MAX_SEGMENTS, the one with the most dead; else the current one if
        it has gathered many dead (it is sealed by being chosen)."""
        if not self.segments:
            return None
        if self._pressure:
            # At the in-flight limit: free the most dead sockets whose live ones fit.
            room = self.limit - self.in_flight
            candidates = [segment for segment in self.segments
                          if segment.closes and segment.live <= room]
            if candidates:
                return max(candidates, key=lambda segment: segment.closes)
        *sealed, current = self.segments
        for segment in sealed:
            if segment.closes > segment.live and segment.closes >= self._min_closed:
                return segment
        if len(sealed) > MAX_SEGMENTS:
            # Merged into the current one: one with dead sockets, or one sealed by its
            # message count rather than full of live connections (slow arrivals, one
            # message each: they move in full messages). One full of live ones is left
            # be: moving it would only make another.
            half = self.segment_fds // 2
            candidates = [segment for segment in sealed
                          if segment.closes or segment.live < half]
            if candidates:
                return min(candidates,
                           key=lambda segment: segment.live - segment.closes)
        if current.closes >= CURRENT_COMPACT_AT and current.closes > current.live:
            return current
        return None

    def _retire(self, segment: Segment) -> None:
        """Out of the store (which frees it and the dead sockets in it), after every live
        connection it held was parked again elsewhere."""
        if segment is self._fast:
            self._fast = None
        self.segments.remove(segment)
        segment.close()
        self._removals.append(segment.name)
        self._send_removals()

    def remove_later(self, name: str) -> None:
        """Ask PID 1 to remove ``name`` now, or from the next step if its queue is full
        (in order: after everything stored before)."""
        self._removals.append(name)
        self._send_removals()
        if self._removals:
            self._schedule(0.01)

    def flush_removals(self, timeout: float = 5.0) -> bool:
        """Send every removal still owed, waiting for room in PID 1's queue (start-up
        only); True once all are sent."""
        deadline = time.monotonic() + timeout
        self._send_removals()
        while self._removals and time.monotonic() < deadline:
            select.select([], [], [], 0.005)
            self._send_removals()
        return not self._removals

    def _send_removals(self) -> None:
        while self._removals:
            if not self.store.remove(self._removals[0]):
                return  # PID 1's queue is full: the next step sends it
            del self._removals[0]

    # --- the end ------------------------------------------------------------

    def names(self) -> list[str]:
        return [segment.name for segment in self.segments]

    def release(self) -> None:
        """Hand-over: our copies go; the store keeps the segments for the next process."""
        self._fast = None
        for segment in self.segments:
            segment.close()
        if self._next is not None:
            self._next.close()
            self._next = None
        self.segments.clear()
        self.where.clear()

    def remove_all(self) -> None:
        """A stop: the segments leave the store (every connection has been closed)."""
        self._fast = None
        for segment in list(self.segments):
            self._retire(segment)
        if self._next is not None:
            self._next.close()
            self._next = None


# --- take-over --------------------------------------------------------------


class Unparked:
    """What the inherited segments gave back."""

    def __init__(self) -> None:
        self.live: list[Received] = []
        self.lost = 0  # descriptors the kernel could not install (MSG_CTRUNC): closed by it
        self.duplicates = 0
        self.ended = 0  # connections the old process had closed (or their client had)
        self.foreign = 0  # descriptors that are not TCP connections
        self.not_parked: set[int] = set()  # live ones unpark's ``park`` could not park


def is_parking_name(name: str) -> bool:
    return name.startswith(PARK_PREFIX)


def is_segment(item: Received) -> bool:
    if item.kind != "socket" or item.family != socket.AF_UNIX:
        return False
    probe = socket.socket(fileno=item.fd)
    try:
        return probe.type == socket.SOCK_SEQPACKET
    finally:
        probe.detach()


def unpark(segments: Iterable[Received], seen: set[tuple[int, int]],
           park: Callable[[list[int]], list[int]] | None = None,
           skip: frozenset[int] | set[int] = frozenset()) -> Unparked:
    """Receive every connection parked in ``segments`` (their descriptors stay open:
    the caller removes their names once the connections are parked again). ``seen``:
    (st_dev, st_ino) of connections already had; added to. ``park``: called with the
    live ones as they are read, in full messages (but those whose inode is in
    ``skip``), so that between a connection leaving an old segment and entering the
    new one there are at most 253 connections' worth of work, not the whole
    take-over; those it could not park are in ``not_parked``."""
    found = Unparked()
    batch: list[int] = []  # read, live, not parked yet: full messages of the new segment
    for item in segments:
        sock = socket.socket(fileno=item.fd)
        try:
            sock.setblocking(False)
            while True:
                try:
                    data, ancillary, flags, _ = sock.recvmsg(
                        MAX_FDS_PER_MESSAGE + 1, CONTROL_SPACE, socket.MSG_CMSG_CLOEXEC)
                except BlockingIOError:
                    break
                except OSError as err:
                    logger.warning("could not read parked connections from %s: %s",
                                   item.describe(), err)
                    break
                fds = _descriptors(ancillary)
                if not data and not fds:
                    break  # the queue is empty (its writer is gone)
                if flags & socket.MSG_CTRUNC or len(fds) < len(data):
                    found.lost += max(0, len(data) - len(fds))
                start = len(found.live)
                for fd in fds:
                    _sift(fd, seen, found)
                if park is not None:
                    batch += [item.fd for item in found.live[start:] if item.inode not in skip]
                    if len(batch) >= MAX_FDS_PER_MESSAGE:
                        found.not_parked.update(park(batch))
                        batch = []
        finally:
            sock.detach()  # the caller closes it, once the names are removed
    if batch and park is not None:
        found.not_parked.update(park(batch))
    if found.lost:
        logger.error("%d parked connection(s) lost at take-over: the kernel could not install "
                     "their descriptors (MSG_CTRUNC; RLIMIT_NOFILE too low?)", found.lost)
    return found


def _descriptors(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array("i")
    for level, kind, payload in ancillary:
        if (level, kind) == _SCM:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    return list(fds)


def _sift(fd: int, seen: set[tuple[int, int]], found: Unparked) -> None:
    """Keep a live TCP connection not seen before; close anything else."""
    try:
        info = os.fstat(fd)
    except OSError:
        return
    key = (info.st_dev, info.st_ino)
    if key in seen:
        found.duplicates += 1
        os.close(fd)
        return
    if not stat.S_ISSOCK(info.st_mode):
        found.foreign += 1
        os.close(fd)
        return
    state = tcp_state(fd)
    if state is None:
        found.foreign += 1
        os.close(fd)
        return
    if state not in (TCP_ESTABLISHED, TCP_CLOSE_WAIT):
        found.ended += 1
        os.close(fd)  # ours already shut down: nothing is owed
        return
    seen.add(key)
    found.live.append(classify(fd, "parked"))


def tcp_state(fd: int) -> int | None:
    """tcpi_state (TCP_INFO's first byte), or None if ``fd`` is not a TCP socket."""
    probe = socket.socket(fileno=fd)
    try:
        if probe.family not in (socket.AF_INET, socket.AF_INET6) \
                or probe.type != socket.SOCK_STREAM:
            return None
        return probe.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    except OSError:
        return None
    finally:
        probe.detach()


def inode_key(fd: int) -> tuple[int, int] | None:
    try:
        info = os.fstat(fd)
    except OSError:
        return None
    return info.st_dev, info.st_ino
