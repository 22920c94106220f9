"""Readiness backends behind one small interface: epoll, poll and select.

A backend knows file descriptors and readiness, nothing of echo. The loop
registers an *interest* (``READ``, ``WRITE`` or both) and gets back
``(fd, events)`` pairs whose ``events`` are the backend's native bits. Native
bits are not translated, because that would cost a Python operation per event
on the hot path; instead each backend says which bits mean "try to read"
(``readable_mask``), "try to write" (``writable_mask``) and "the peer may have
hung up, so read to the end" (``hangup_mask``), and which exact value means
"readable and nothing else" (``readable_only``): the event almost every
message arrives with. On every backend it is ``READ`` itself, and no backend
reports an event equal to another interest (2 and 3 would carry POLLPRI, which
muxd never asks for; select's events are 1, 4 and 5), so the loop tells that
event on a connection that wants only to read from everything else with one
comparison, ``event != conn.interest`` (tests/test_pollers.py holds them to it).

Edge- versus level-triggering is the one behavioural difference the loop must
know (``edge_triggered``): under epoll's EPOLLET an fd is reported once per
change, so whoever stops short of EAGAIN must remember to come back.
"""

from __future__ import annotations

import select
from typing import ClassVar

READ = 1
WRITE = 2


class FdOutOfRange(ValueError):
    """The backend cannot watch this descriptor (select: fd >= FD_SETSIZE)."""


class Poller:
    name: ClassVar[str]
    edge_triggered: ClassVar[bool] = False
    # Descriptors at or above this cannot be registered.
    fd_limit: ClassVar[int] = 1 << 62
    readable_mask: ClassVar[int]
    writable_mask: ClassVar[int]
    hangup_mask: ClassVar[int] = 0
    readable_only: ClassVar[int]

    def register(self, fd: int, interest: int) -> None:
        raise NotImplementedError

    def modify(self, fd: int, interest: int) -> None:
        raise NotImplementedError

    def unregister(self, fd: int) -> None:
        raise NotImplementedError

    def poll(self, timeout: float | None) -> list[tuple[int, int]]:
        """Wait up to ``timeout`` seconds (None: forever) for readiness."""
        raise NotImplementedError

    def close(self) -> None:
        pass


if hasattr(select, "epoll"):

    class EpollPoller(Poller):
        """Edge-triggered epoll.

        Registrations are EPOLLET with EPOLLRDHUP. EPOLLERR and EPOLLHUP are
        always reported, asked for or not (epoll_ctl(2)), so they sit in both
        masks: an error is discovered by the read or write that follows.
        Changing an interest with EPOLL_CTL_MOD makes the kernel re-check
        readiness, which is how a paused reader picks up data that arrived
        while it was not listening, with no new edge needed.
        """

        name = "epoll"
        edge_triggered = True
        readable_mask = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP | select.EPOLLRDHUP
        writable_mask = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP
        hangup_mask = select.EPOLLHUP | select.EPOLLRDHUP | select.EPOLLERR
        readable_only = select.EPOLLIN
        _native = {
            READ: select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET,
            WRITE: select.EPOLLOUT | select.EPOLLET,
            READ | WRITE: select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLOUT | select.EPOLLET,
        }

        def __init__(self) -> None:
            self._epoll = select.epoll()
            # epoll.poll already speaks this interface (seconds, None for
            # forever), so the loop calls the builtin itself: no Python
            # frame in between, once per turn.
            self.poll = self._epoll.poll  # type: ignore[method-assign]

        def register(self, fd: int, interest: int) -> None:
            self._epoll.register(fd, self._native[interest])

        def modify(self, fd: int, interest: int) -> None:
            self._epoll.modify(fd, self._native[interest])

        def unregister(self, fd: int) -> None:
            self._epoll.unregister(fd)

        def close(self) -> None:
            self._epoll.close()


if hasattr(select, "poll"):

    class PollPoller(Poller):
        """Level-triggered poll(2): no descriptor limit, but every call hands
        the kernel the whole set, so cost grows with connections held."""

        name = "poll"
        _rdhup = getattr(select, "POLLRDHUP", 0)
        readable_mask = select.POLLIN | select.POLLERR | select.POLLHUP | _rdhup
        writable_mask = select.POLLOUT | select.POLLERR | select.POLLHUP
        hangup_mask = select.POLLHUP | _rdhup | select.POLLERR
        readable_only = select.POLLIN
        _native = {
            READ: select.POLLIN | _rdhup,
            WRITE: select.POLLOUT,
            READ | WRITE: select.POLLIN | _rdhup | select.POLLOUT,
        }

        def __init__(self) -> None:
            self._poll = select.poll()

        def register(self, fd: int, interest: int) -> None:
            self._poll.register(fd, self._native[interest])

        def modify(self, fd: int, interest: int) -> None:
            self._poll.modify(fd, self._native[interest])

        def unregister(self, fd: int) -> None:
            self._poll.unregister(fd)

        def poll(self, timeout: float | None) -> list[tuple[int, int]]:
            # poll() takes milliseconds; round up so a timer is never woken early
            return self._poll.poll(None if timeout is None else -(-timeout * 1000 // 1))


class SelectPoller(Poller):
    """Level-triggered select(2).

    It cannot hold a descriptor at or above FD_SETSIZE (1024) "and this
    limitation will not change" (select(2)); CPython raises ValueError for it
    at call time, which would take the whole loop down. So, like Redis's
    ae_select, this backend refuses such a descriptor when it is registered,
    and the caller closes that one connection instead.
    """

    name = "select"
    fd_limit = 1024
    _IN, _OUT = 1, 4
    readable_mask = _IN
    writable_mask = _OUT
    readable_only = _IN

    def __init__(self) -> None:
        self._readers: set[int] = set()
        self._writers: set[int] = set()

    def register(self, fd: int, interest: int) -> None:
        if fd >= self.fd_limit:
            raise FdOutOfRange(f"select cannot watch fd {fd} (FD_SETSIZE is {self.fd_limit})")
        self.modify(fd, interest)

    def modify(self, fd: int, interest: int) -> None:
        (self._readers.add if interest & READ else self._readers.discard)(fd)
        (self._writers.add if interest & WRITE else self._writers.discard)(fd)

    def unregister(self, fd: int) -> None:
        self._readers.discard(fd)
        self._writers.discard(fd)

    def poll(self, timeout: float | None) -> list[tuple[int, int]]:
        readable, writable, _ = select.select(self._readers, self._writers, (), timeout)
        if not writable:
            return [(fd, 1) for fd in readable]
        events = dict.fromkeys(readable, self._IN)
        for fd in writable:
            events[fd] = events.get(fd, 0) | self._OUT
        return list(events.items())


BACKENDS: dict[str, type[Poller]] = {
    cls.name: cls
    for cls in (globals().get("EpollPoller"), globals().get("PollPoller"), SelectPoller)
    if cls is not None
}


def available_backends() -> list[str]:
    """Backends this platform has, best first."""
    return list(BACKENDS)


def create_poller(name: str) -> Poller:
    """The one place a backend is chosen: ``auto`` takes the best available."""
    if name == "auto":
        name = available_backends()[0]
    return BACKENDS[name]()
