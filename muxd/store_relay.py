"""The file descriptor store with workers: each worker's store is the supervisor,
which alone speaks to systemd's (NotifyAccess=main), and which keeps its own copy
of what each worker stored, so that the worker replacing one that died is given
exactly its slot's descriptors.

Two halves, joined by one SOCK_SEQPACKET socket pair per worker, made before the
fork (a fresh one for every worker started):

* ``WorkerStore``, in the worker: the public interface of ``fdstore.FdStore``
  (queue, unqueue, flush, remove, store_now, flush_all, barrier, backlog, close,
  and the counters ``sent``/``failed``/``rejected``/``last_error``), so that
  handover.py runs unchanged in a worker. What it sends goes to the supervisor,
  in order, without ever blocking a serving loop turn (EAGAIN: it stays queued,
  as with PID 1's queue); only store_now, flush_all and barrier wait, as theirs
  do, on the way out.
* ``StoreRelay``, in the supervisor: forwards every request to PID 1 through the
  real FdStore, with names namespaced by slot (``state-w<slot>.<name>``), in the order
  received; answers a worker's barrier after a real BARRIER=1 with PID 1; and
  keeps a copy of each slot's stored descriptors with the store's semantics:
  removed by name, dropped when it reports hang-up or error (PID 1 watches its
  copies for those and nothing else), unless stored with FDPOLL=0.

At start the supervisor sorts what systemd passed back by slot (``assign``):
``state-w<k>.`` names go to slot ``k mod workers`` (so after a restart worker k takes
over worker k's connections, and with fewer workers the remaining ones share
them), names without a slot (a single muxd's) to slot 0. A removal by a worker
of one of its names also removes those names of the slots it was given.

May touch: the channels, its copies, its own epoll descriptor (which the
supervisor's poller watches), the real FdStore it is handed, and the timers it
is handed for retries. It never closes a worker's descriptors: a copy is the
supervisor's own (received over the channel, or inherited from systemd).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import re
import select
import socket
import time
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from muxd.fdstore import BARRIER_TIMEOUT, MAX_FDS_PER_MESSAGE, Batching, FdStore
from muxd.timers import Timers

logger = logging.getLogger("muxd")

# What a worker sends: one text line per request, descriptors attached.
STORE, REMOVE, BARRIER = "S", "R", "B"
NO_POLL = "FDPOLL=0"
_FDS_SPACE = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * array("i").itemsize)
# Under the state prefix on purpose (as handover.WAITING_NAME): a muxd that does not
# know slot names (a downgrade) reads any name it does not know as a socket unit's and
# refuses to start on a connected socket; a "state-" name it removes and closes.
SLOT_PREFIX = "state-w"
_SLOT_NAME = re.compile(r"state-w(\d{1,4})\.(.+)")
RETRY_DELAY = 0.01  # PID 1's queue was full: try again this soon
_WAIT_STEP = 0.005


def slot_name(slot: int, name: str) -> str:
    """The store's name for worker ``slot``'s ``name`` (printable ASCII, no ':')."""
    return f"{SLOT_PREFIX}{slot}.{name}"


def split_name(name: str) -> tuple[int | None, str]:
    """(slot, the worker's own name) of a stored name; (None, name) without a slot."""
    match = _SLOT_NAME.fullmatch(name)
    if match is None:
        return None, name
    return int(match.group(1)), match.group(2)


def share_stored_listeners(stored: list[tuple[int, str]]) -> set[tuple[str, int]]:
    """(host, port) of every listening socket among ``stored`` (held by the store, so
    not another program's: the supervisor's check for a served port skips them). Each
    gets SO_REUSEPORT before any worker is forked: one a single muxd stored was bound
    without it, and the workers that bind their own on its address must join it."""
    found = set()
    for fd, _ in stored:
        try:
            probe = socket.socket(fileno=fd)
        except OSError:
            continue
        try:
            if probe.type == socket.SOCK_STREAM and probe.getsockopt(
                    socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                host, port = probe.getsockname()[:2]
                found.add((str(ipaddress.ip_address(host)), port))
        except (OSError, ValueError):
            pass
        finally:
            probe.detach()
    return found


# --- the worker's half ------------------------------------------------------


class WorkerStore(Batching):
    """FdStore's interface in a worker: requests go to the supervisor's relay."""

    def __init__(self, channel: socket.socket) -> None:
        super().__init__()
        channel.setblocking(False)
        self._channel = channel
        # Requests that must keep their place behind what was queued before them
        # (a removal, a store_now): (text, fds), sent in order by flush.
        self._ordered: deque[tuple[str, list[int]]] = deque()

    @property
    def backlog(self) -> int:
        return len(self._queued) + len(self._ordered)

    def flush(self) -> bool:
        """Send what is queued, then what is ordered behind it; stop at EAGAIN.
        True when everything has been sent."""
        if not self._send_queued():
            return False
        ordered = self._ordered
        while ordered:
            text, fds = ordered[0]
            try:
                self._send(text, fds)
            except BlockingIOError:
                return False
            except OSError as err:
                self.last_error = err
                if fds:
                    self.failed += len(fds)
            else:
                self.sent += len(fds)
            ordered.popleft()
            for fd in fds:
                os.close(fd)  # our duplicate, made when it was ordered
        return True

    def remove(self, name: str) -> bool:
        """Ask for every descriptor called ``name`` to be closed in the store; it keeps
        its place behind what was queued before."""
        self._ordered.append((f"{REMOVE}\n{name}", []))
        self.flush()
        return True

    def store_now(self, fd: int, name: str, timeout: float = BARRIER_TIMEOUT,
                  poll: bool = True) -> bool:
        """Store one descriptor, waiting (up to ``timeout``) for the channel: start-up and
        hand-over only. The caller may close ``fd`` at once (a duplicate is sent)."""
        copy = os.dup(fd)
        sent_before = self.sent
        self._ordered.append((_store_text(name, poll), [copy]))
        if self.flush_all(timeout):
            return self.sent > sent_before
        self.failed += 1
        self._ordered = deque((text, fds) for text, fds in self._ordered if fds != [copy])
        os.close(copy)
        return False

    def flush_all(self, timeout: float = BARRIER_TIMEOUT) -> bool:
        deadline = time.monotonic() + timeout
        while not self.flush():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            select.select([], [self._channel], [], min(remaining, 0.5))
        return True

    def barrier(self, timeout: float = BARRIER_TIMEOUT) -> bool:
        """Wait until the supervisor has passed everything sent before on to PID 1 and
        PID 1 has processed it (the supervisor closes the pipe end we send then)."""
        deadline = time.monotonic() + timeout
        if not self.flush_all(timeout):
            return False
        # The supervisor waits for PID 1 for up to its own BARRIER_TIMEOUT.
        return self._barrier(BARRIER, deadline, answer_within=BARRIER_TIMEOUT)

    def _wait_for_room(self, remaining: float) -> None:
        select.select([], [self._channel], [], min(remaining, 0.5))

    def close(self) -> None:
        for _, fds in self._ordered:
            for fd in fds:
                os.close(fd)
        self._ordered.clear()
        self._channel.close()

    def _text(self, name: str, poll: bool) -> str:
        return _store_text(name, poll)

    def _send(self, text: str, fds: list[int]) -> None:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", fds))] if fds else []
        self._channel.sendmsg([text.encode()], ancillary)


def _store_text(name: str, poll: bool) -> str:
    return f"{STORE}\n{name}" if poll else f"{STORE}\n{name}\n{NO_POLL}"


# --- the supervisor's half --------------------------------------------------


@dataclass(eq=False)
class Copy:
    """The supervisor's copy of one stored descriptor."""

    fd: int
    slot: int
    name: str  # the worker's own name (as handed to it)
    stored_as: str  # the name in PID 1's store
    poll: bool = True


@dataclass
class _Slot:
    channel: socket.socket | None = None
    unborn: tuple[socket.socket, socket.socket] | None = None
    copies: dict[int, Copy] = field(default_factory=dict)  # by fd


class StoreRelay:
    """The supervisor's side: one channel per worker, the copies, PID 1's store."""

    def __init__(self, store: FdStore, slots: int, timers: Timers,
                 now: Callable[[], float]) -> None:
        self.store = store
        self._slots = [_Slot() for _ in range(slots)]
        self._timers = timers
        self._now = now
        self._epoll = select.epoll()
        self._channels: dict[int, int] = {}  # channel fd -> slot
        self._copies: dict[int, Copy] = {}  # every slot's, by fd
        # Requests for PID 1 in the order received: ("store", [Copy]) / ("remove", name).
        self._outbox: deque[tuple[str, object]] = deque()
        self._retry_scheduled = False
        self._warned = False

    @property
    def fd(self) -> int:
        """Readable when a channel has a request or a copy hung up."""
        return self._epoll.fileno()

    # --- start --------------------------------------------------------------

    def assign(self, stored: list[tuple[int, str]]) -> None:
        """What systemd passed back, by slot: ``state-w<k>.`` to slot k mod workers, names
        without a slot to slot 0. These descriptors become the relay's copies."""
        count = len(self._slots)
        for fd, stored_as in stored:
            slot, name = split_name(stored_as)
            self._keep(Copy(fd, (slot or 0) % count, name, stored_as, _watched(fd)))
        if stored:
            logger.info("file descriptor store: %d descriptor(s) for %d worker(s): %s",
                        len(stored), count, ", ".join(
                            f"worker {index} {len(slot.copies)}"
                            for index, slot in enumerate(self._slots)))

    # --- around a fork --------------------------------------------------------

    def channel_for(self, slot: int) -> socket.socket:
        """Before forking the worker of ``slot``: its end of a new channel."""
        entry = self._slots[slot]
        if entry.unborn is not None:  # a fork that failed left these
            for end in entry.unborn:
                end.close()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        entry.unborn = (ours, theirs)
        return theirs

    def handed_to(self, slot: int) -> list[tuple[int, str]]:
        """(fd, name) of what ``slot``'s worker takes over: the slot's copies, by the
        names the worker gave them (in the worker, after the fork, these are its own)."""
        return [(copy.fd, copy.name) for copy in self._slots[slot].copies.values()]

    def worker_started(self, slot: int) -> None:
        """In the supervisor, after the fork."""
        entry = self._slots[slot]
        assert entry.unborn is not None
        ours, theirs = entry.unborn
        entry.unborn = None
        theirs.close()
        ours.setblocking(False)
        entry.channel = ours
        self._channels[ours.fileno()] = slot
        self._epoll.register(ours.fileno(), select.EPOLLIN)

    def in_worker(self, slot: int) -> None:
        """In the forked worker: close every descriptor of the relay's but the
        worker's own channel end and its own slot's copies (now the worker's)."""
        for index, entry in enumerate(self._slots):
            if entry.unborn is not None:
                ours, theirs = entry.unborn
                ours.close()
                if index != slot:
                    theirs.close()
            if entry.channel is not None:
                entry.channel.close()
            if index != slot:
                for copy in entry.copies.values():
                    os.close(copy.fd)
        self._epoll.close()
        self.store.close()

    def worker_gone(self, slot: int) -> None:
        """Its worker exited: take what it sent before dying, then close the channel."""
        entry = self._slots[slot]
        channel = entry.channel
        if channel is None:
            return
        self._read(slot, channel)
        self._epoll.unregister(channel.fileno())
        del self._channels[channel.fileno()]
        channel.close()
        entry.channel = None

    # --- serving ---------------------------------------------------------------

    def on_ready(self) -> None:
        for fd, event in self._epoll.poll(0):
            slot = self._channels.get(fd)
            if slot is not None:
                channel = self._slots[slot].channel
                assert channel is not None
                self._read(slot, channel)
                if event & (select.EPOLLHUP | select.EPOLLERR):
                    # Its worker is gone; the reaper closes the channel. Until then
                    # nothing more arrives, so stop waking up for it.
                    self._epoll.modify(fd, 0)
            else:
                copy = self._copies.get(fd)
                if copy is not None:
                    self._drop(copy)  # as PID 1 drops its own copy
        self._pump()

    def _read(self, slot: int, channel: socket.socket) -> None:
        while True:
            try:
                data, ancillary, flags, _ = channel.recvmsg(512, _FDS_SPACE)
            except BlockingIOError:
                return
            except OSError as err:
                logger.error("supervisor: the store channel of worker %d failed: %s", slot, err)
                return
            fds = _received_fds(ancillary)
            if not data and not fds:
                return  # the worker's end is closed
            if flags & socket.MSG_CTRUNC:
                logger.error("supervisor: descriptors of worker %d were lost on the way "
                             "(out of descriptors: raise LimitNOFILE=)", slot)
            self._request(slot, data.decode(errors="replace").split("\n"), fds)

    def _request(self, slot: int, words: list[str], fds: list[int]) -> None:
        kind = words[0]
        if kind == STORE and len(words) >= 2:
            name = words[1]
            poll = NO_POLL not in words[2:]
            copies = [Copy(fd, slot, name, slot_name(slot, name), poll) for fd in fds]
            for copy in copies:
                self._keep(copy)
            self._outbox.append(("store", copies))
        elif kind == REMOVE and len(words) >= 2:
            name = words[1]
            entry = self._slots[slot]
            names = {slot_name(slot, name)}
            for copy in list(entry.copies.values()):
                if copy.name == name:
                    names.add(copy.stored_as)
                    self._drop(copy)
            self._outbox.extend(("remove", stored_as) for stored_as in sorted(names))
        elif kind == BARRIER and fds:
            deadline = time.monotonic() + BARRIER_TIMEOUT
            if self._drain(deadline):
                self.store.barrier(max(0.1, deadline - time.monotonic()))
            for fd in fds:
                os.close(fd)  # the worker sees the pipe hang up
            return
        else:
            logger.error("supervisor: worker %d sent the store relay %r", slot, words[0][:20])
            for fd in fds:
                os.close(fd)
        self._pump()

    def _keep(self, copy: Copy) -> None:
        os.set_inheritable(copy.fd, False)
        self._copies[copy.fd] = copy
        self._slots[copy.slot].copies[copy.fd] = copy
        if copy.poll:
            try:
                self._epoll.register(copy.fd, 0)  # hang-up and error are always reported
            except OSError:
                pass  # not pollable (a regular file): nothing to watch, as for PID 1

    def _drop(self, copy: Copy) -> None:
        self._copies.pop(copy.fd, None)
        self._slots[copy.slot].copies.pop(copy.fd, None)
        self.store.unqueue(copy.fd)
        if copy.poll:
            try:
                self._epoll.unregister(copy.fd)
            except OSError:
                pass
        copy.fd, fd = -1, copy.fd
        os.close(fd)

    def _pump(self) -> None:
        """Pass requests on to PID 1 in order: stores are batched by the store; a
        removal waits until everything before it is sent."""
        store = self.store
        outbox = self._outbox
        while outbox:
            kind, what = outbox[0]
            if kind == "store":
                for copy in what:  # type: ignore[union-attr]
                    if copy.fd < 0:
                        continue  # hung up before it was passed on (closed: see _drop)
                    # FDPOLL=0 (a parking socket) stays so: PID 1 must not watch it either.
                    store.queue(copy.fd, copy.stored_as, copy.poll)
                outbox.popleft()
                continue
            if not store.flush():
                break
            if not store.remove(what):  # type: ignore[arg-type]
                error = store.last_error
                if isinstance(error, BlockingIOError) or (
                        error is not None and error.errno == errno.EAGAIN):
                    break
                logger.error("supervisor: could not remove %s from the file descriptor "
                             "store: %s", what, error)
            outbox.popleft()
        else:
            store.flush()
        if store.rejected:
            rejected, store.rejected = store.rejected, []
            if not self._warned:
                self._warned = True
                logger.error("supervisor: systemd's file descriptor store refused %d "
                             "descriptor(s) (%s): they are closed at a restart", len(rejected),
                             store.last_error)
        if (outbox or store.backlog) and not self._retry_scheduled:
            self._retry_scheduled = True
            self._timers.call_at(self._now() + RETRY_DELAY, self._retry)

    def _retry(self) -> None:
        self._retry_scheduled = False
        self._pump()

    # --- the end -------------------------------------------------------------

    def finish(self, timeout: float = BARRIER_TIMEOUT) -> bool:
        """On the way out of a hand-over: everything to PID 1, and PID 1 confirms."""
        deadline = time.monotonic() + timeout
        for slot, entry in enumerate(self._slots):
            if entry.channel is not None:
                self._read(slot, entry.channel)
        if not self._drain(deadline):
            return False
        return self.store.barrier(max(0.1, deadline - time.monotonic()))

    def _drain(self, deadline: float) -> bool:
        """Pass everything on to PID 1, waiting for room in its queue until ``deadline``:
        only at a barrier, which a worker asks for on its way out."""
        while True:
            self._pump()
            if not self._outbox and not self.store.backlog:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(_WAIT_STEP)

    def close(self) -> None:
        """Let go of every copy (a plain close: PID 1's copies keep them open)."""
        for copy in list(self._copies.values()):
            self.store.unqueue(copy.fd)
            os.close(copy.fd)
        self._copies.clear()
        for entry in self._slots:
            entry.copies.clear()
            for sock in (entry.channel, *(entry.unborn or ())):
                if sock is not None:
                    sock.close()
        self._epoll.close()
        self.store.close()


def _watched(fd: int) -> bool:
    """Whether PID 1 watches an inherited descriptor for hang-up: LISTEN_FDS does not
    say if it was stored with FDPOLL=0. muxd stores that way only its parking sockets
    (AF_UNIX, whose peer end is closed once their process ends: watched, they would be
    dropped here at once); its TCP sockets it stores watched."""
    try:
        probe = socket.socket(fileno=fd)
    except OSError:
        return True  # not a socket: nothing to watch anyway
    try:
        return probe.family != socket.AF_UNIX
    finally:
        probe.detach()


def _received_fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = array("i")
            received.frombytes(payload[:len(payload) - len(payload) % received.itemsize])
            fds.extend(received)
    return fds


class AliasedStore:
    """A single muxd given what workers stored (``state-w<k>.`` names, after ``workers``
    went down to 1): the store's interface, where removing a name also removes the
    slot names it was given under. Everything else is the real store's."""

    def __init__(self, store: FdStore, aliases: dict[str, set[str]]) -> None:
        self._store = store
        self._aliases = aliases

    def remove(self, name: str) -> bool:
        done = self._store.remove(name)
        for alias in sorted(self._aliases.pop(name, ())):
            done = self._store.remove(alias) and done
        return done

    def __getattr__(self, attribute: str) -> object:
        return getattr(self._store, attribute)

    def __setattr__(self, attribute: str, value: object) -> None:
        if attribute.startswith("_"):
            object.__setattr__(self, attribute, value)
        else:  # the counters (sent, failed, rejected, last_error) are the real store's
            setattr(self._store, attribute, value)
