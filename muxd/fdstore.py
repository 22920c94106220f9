"""systemd's file descriptor store: the protocol, and nothing of the loop or of echo.

Sending: descriptors travel to ``NOTIFY_SOCKET`` as SCM_RIGHTS with
``FDSTORE=1`` and ``FDNAME=`` (sd_notify(3)). The ``sdnotify`` package cannot
attach descriptors and ``socket.send_fds`` ignores its address in 3.11
(CPython gh-107898), so this module speaks the protocol itself with
``sendmsg``. Descriptors are queued by name and sent in batches of at most
``MAX_FDS_PER_MESSAGE`` (the kernel's SCM_MAX_FD), once per loop turn rather
than once per accept. The socket is non-blocking: when PID 1's short datagram
queue is full (EAGAIN) the batch stays queued and the caller retries later;
any other failure counts the batch as not stored. Nothing here ever blocks,
except ``barrier``, which only a process on its way out calls.

Removing: the store drops a socket by itself when it reports hang-up or error,
so a connection is removed by shutting it down before closing it (see
``release``), which costs one system call and no message to PID 1; a state
file or a parking socket is removed by name (``FDSTOREREMOVE=1``).

Not watched: ``poll=False`` (``queue``, ``store_now``) adds ``FDPOLL=0``, so
PID 1 never watches that descriptor for hang-up (systemd >= 246). A parking
socket (parking.py) needs it: its peer end is closed when the process ends,
which makes it report hang-up, and PID 1 would otherwise drop it and every
connection parked in it.

Receiving: ``received()`` reads LISTEN_FDS/LISTEN_FDNAMES/LISTEN_PID and says
what each descriptor *is* (socket type, listening or not, family, regular
file) besides what it is called; callers decide by both, never by position.

May touch: its own notify socket, the descriptors handed to it (it never
closes a caller's descriptor, except ``drop``), and the LISTEN_* variables.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import stat
import time
from array import array
from dataclasses import dataclass

logger = logging.getLogger("muxd")

MAX_FDS_PER_MESSAGE = 253  # SCM_MAX_FD: 254 gives EINVAL
SD_LISTEN_FDS_START = 3
BARRIER_TIMEOUT = 5.0


def store_capacity() -> int:
    """How many descriptors the unit's store holds (``$FDSTORE``, set by systemd >= 254
    from FileDescriptorStoreMax=; the shipped unit sets it for older systemd), 0 if none."""
    try:
        return max(0, int(os.environ.get("FDSTORE", "0")))
    except ValueError:
        return 0


def _notify_address(raw: str) -> str | bytes:
    # A leading "@" is the abstract namespace.
    return b"\0" + raw[1:].encode() if raw.startswith("@") else raw


class Batching:
    """What FdStore and a worker's store (store_relay.WorkerStore) share: descriptors
    queued under a name (and FDPOLL), sent one message per name and batch of at most
    MAX_FDS_PER_MESSAGE, the tallies of what went. Each says how a message is worded
    (``_text``) and sent (``_send``)."""

    def __init__(self) -> None:
        # fd -> (name, watched by PID 1), in the order queued
        self._queued: dict[int, tuple[str, bool]] = {}
        self.sent = 0  # descriptors accepted into the receiver's socket queue
        self.failed = 0  # descriptors that could not be sent (never retried)
        self.rejected: list[int] = []  # the queued ones among them, for the caller to take
        self.last_error: OSError | None = None

    def queue(self, fd: int, name: str, poll: bool = True) -> None:
        """Send ``fd`` under ``name`` with the next ``flush``; ``poll=False``: PID 1
        does not watch it for hang-up (FDPOLL=0)."""
        self._queued[fd] = (name, poll)

    def unqueue(self, fd: int) -> bool:
        """Forget a descriptor that is about to be closed before it was sent (its
        number could otherwise be reused by something else); True if it was queued."""
        return self._queued.pop(fd, None) is not None

    def _send_queued(self) -> bool:
        """Send what is queued; stop at EAGAIN. True when all of it has been sent."""
        queued = self._queued
        while queued:
            key = next(iter(queued.values()))
            batch = [fd for fd, fd_key in queued.items() if fd_key == key]
            batch = batch[:MAX_FDS_PER_MESSAGE]
            try:
                self._send(self._text(*key), batch)
            except BlockingIOError:
                return False
            except OSError as err:
                self.failed += len(batch)
                self.rejected += batch
                self.last_error = err
            else:
                self.sent += len(batch)
            for fd in batch:
                del queued[fd]
        return True

    def _barrier(self, text: str, deadline: float, answer_within: float = 0.0) -> bool:
        """Send ``text`` with a pipe's write end and wait until the receiver closes it,
        which it does once it has processed everything sent before: room to send is
        awaited until ``deadline``, the answer until then plus ``answer_within``."""
        reader, writer = os.pipe2(os.O_CLOEXEC)
        try:
            while True:
                try:
                    self._send(text, [writer])
                    break
                except BlockingIOError:
                    remaining = deadline - _monotonic()
                    if remaining <= 0:
                        return False
                    self._wait_for_room(remaining)
                except OSError as err:
                    self.last_error = err
                    return False
            os.close(writer)
            writer = -1
            poller = select.poll()
            poller.register(reader, select.POLLHUP)
            remaining = max(0.0, deadline - _monotonic()) + answer_within
            return bool(poller.poll(remaining * 1000))
        finally:
            os.close(reader)
            if writer >= 0:
                os.close(writer)

    def _wait_for_room(self, remaining: float) -> None:
        raise NotImplementedError

    def _text(self, name: str, poll: bool) -> str:
        raise NotImplementedError

    def _send(self, text: str, fds: list[int]) -> None:
        raise NotImplementedError


class FdStore(Batching):
    """Put descriptors into the store of the unit that runs us, in batches."""

    def __init__(self, notify_socket: str) -> None:
        self._address = _notify_address(notify_socket)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setblocking(False)
        super().__init__()

    @property
    def backlog(self) -> int:
        """Descriptors queued and not yet sent (EAGAIN, or not flushed yet)."""
        return len(self._queued)

    def flush(self) -> bool:
        """Send what is queued, one message per name (and FDPOLL) and batch; stop at
        EAGAIN. True when everything queued has been sent."""
        return self._send_queued()

    def remove(self, name: str) -> bool:
        """Ask PID 1 to close every stored descriptor called ``name``. Never blocks:
        False when the message could not be sent (``last_error``; BlockingIOError
        when PID 1's queue is full: the caller may try again later). Sent after
        everything sent before it, so flush() first what must be stored before."""
        try:
            self._send(f"FDSTOREREMOVE=1\nFDNAME={name}", [])
        except OSError as err:
            self.last_error = err
            return False
        return True

    def store_now(self, fd: int, name: str, timeout: float = BARRIER_TIMEOUT,
                  poll: bool = True) -> bool:
        """Store one descriptor at once, waiting (up to ``timeout``) for room in PID 1's
        queue. Only for start-up and hand-over, never from a serving loop turn.
        ``poll=False``: PID 1 does not watch it for hang-up (FDPOLL=0)."""
        deadline = _monotonic() + timeout
        while True:
            try:
                self._send(_store_text(name, poll), [fd])
            except BlockingIOError:
                if _monotonic() >= deadline:
                    self.failed += 1
                    return False
                select.select([], [], [], 0.005)
                continue
            except OSError as err:
                self.failed += 1
                self.last_error = err
                return False
            self.sent += 1
            return True

    def flush_all(self, timeout: float = BARRIER_TIMEOUT) -> bool:
        """Send everything queued, waiting for room (up to ``timeout``): hand-over only."""
        deadline = _monotonic() + timeout
        while not self.flush():
            if _monotonic() >= deadline:
                return False
            select.select([], [], [], 0.005)
        return True

    def barrier(self, timeout: float = BARRIER_TIMEOUT) -> bool:
        """Wait until PID 1 has processed every message sent before (BARRIER=1: it
        closes the pipe end we pass once it got there). Blocks up to ``timeout``."""
        return self._barrier("BARRIER=1", _monotonic() + timeout)

    def _wait_for_room(self, remaining: float) -> None:
        select.select([], [], [], 0.005)  # PID 1's datagram queue: nothing to wait on

    def close(self) -> None:
        self._sock.close()

    def _text(self, name: str, poll: bool) -> str:
        return _store_text(name, poll)

    def _send(self, text: str, fds: list[int]) -> None:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", fds))] if fds else []
        self._sock.sendmsg([text.encode()], ancillary, 0, self._address)


def _store_text(name: str, poll: bool) -> str:
    return f"FDSTORE=1\nFDNAME={name}" + ("" if poll else "\nFDPOLL=0")


def release(sock: socket.socket) -> None:
    """Take a stored socket out of the store before closing our copy: shut both
    directions, so it reports hang-up and PID 1 drops its duplicate (a listener
    stops listening). Without this the store's copy keeps it open and the peer
    never sees the end."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already reset or never connected: the store drops it by itself


_monotonic = time.monotonic


# --- receiving -------------------------------------------------------------


@dataclass
class Received:
    """One inherited descriptor: what it is called and what it is."""

    fd: int
    name: str
    kind: str  # "listener", "stream", "datagram", "socket", "file" or "other"
    family: int = 0
    inode: int = 0

    def describe(self) -> str:
        family = {socket.AF_INET: "IPv4 ", socket.AF_INET6: "IPv6 ",
                  socket.AF_UNIX: "unix "}.get(self.family, "")
        what = {"listener": "listening TCP socket", "stream": "connected stream socket",
                "datagram": "datagram socket", "file": "regular file"}.get(self.kind, self.kind)
        return f"fd {self.fd} named {self.name!r} ({family}{what})"


def received() -> list[Received] | None:
    """Descriptors systemd passed to this process (socket units first, then the
    store, in no promised order), or None when none were passed to *us*. The
    variables are unset once read, so children do not take them."""
    pid = os.environ.get("LISTEN_PID")
    count = os.environ.get("LISTEN_FDS")
    names = os.environ.get("LISTEN_FDNAMES", "")
    for variable in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(variable, None)
    if count is None or pid is None:
        return None
    try:
        if int(pid) != os.getpid():
            return None
        fd_count = int(count)
    except ValueError:
        return None
    fd_names = names.split(":") if names else []
    found = []
    for index in range(fd_count):
        fd = SD_LISTEN_FDS_START + index
        name = fd_names[index] if index < len(fd_names) else f"fd {fd}"
        found.append(classify(fd, name))
    return found


def classify(fd: int, name: str) -> Received:
    """Say what ``fd`` is: fstat, and for a socket SO_TYPE, SO_ACCEPTCONN, SO_DOMAIN."""
    try:
        info = os.fstat(fd)
    except OSError:
        return Received(fd, name, "closed")
    os.set_inheritable(fd, False)
    if stat.S_ISREG(info.st_mode):
        return Received(fd, name, "file", inode=info.st_ino)
    if not stat.S_ISSOCK(info.st_mode):
        return Received(fd, name, "other", inode=info.st_ino)
    try:
        kind = _getsockopt_int(fd, socket.SO_TYPE)
        family = _getsockopt_int(fd, socket.SO_DOMAIN)
        listening = _getsockopt_int(fd, socket.SO_ACCEPTCONN)
    except OSError:
        return Received(fd, name, "other", inode=info.st_ino)
    if kind == socket.SOCK_STREAM:
        label = "listener" if listening else "stream"
    elif kind == socket.SOCK_DGRAM:
        label = "datagram"
    else:
        label = "socket"
    return Received(fd, name, label, family, info.st_ino)


def _getsockopt_int(fd: int, option: int) -> int:
    # socket.socket(fileno=fd) would take ownership; a detached duplicate-free
    # probe: build the object, ask, and detach so the fd stays open.
    probe = socket.socket(fileno=fd)
    try:
        return probe.getsockopt(socket.SOL_SOCKET, option)
    finally:
        probe.detach()


def drop(item: Received, why: str) -> None:
    """Close an inherited descriptor that is not ours to serve, and say so. A
    socket is shut down first, so the store's copy goes too."""
    logger.warning("dropped inherited %s: %s", item.describe(), why)
    if item.kind in ("stream", "listener", "datagram", "socket"):
        probe = socket.socket(fileno=item.fd)
        release(probe)
        probe.close()
        return
    try:
        os.close(item.fd)
    except OSError as err:
        if err.errno != errno.EBADF:
            raise
