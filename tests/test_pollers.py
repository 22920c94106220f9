"""The backends' side of the loop's one-comparison fast path (pollers.py, loop.py).

The loop takes its fast path (read, echo, nothing owed) when ``event == conn.interest``. That
is right only because every backend's plain "readable" event is ``READ`` itself and no backend
ever reports an event equal to another interest. If one did (say EPOLLIN | EPOLLPRI, which is
3, on a connection whose interest is READ | WRITE because it owes bytes), the loop would echo
new input ahead of what it owes. Real sockets on loopback, in the states a connection meets.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
from collections.abc import Iterator

import pytest

from muxd.pollers import READ, WRITE, create_poller

INTERESTS = (READ, WRITE, READ | WRITE)
STATES = ("data", "urgent", "owing-urgent", "fin", "reset")


@contextlib.contextmanager
def connected_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(muxd's side, non-blocking; the peer's side) of one loopback TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        peer = socket.create_connection(listener.getsockname())
        ours, _ = listener.accept()
    ours.setblocking(False)
    with ours, peer:
        yield ours, peer


def fill_send_buffer(sock: socket.socket) -> None:
    """Send until the kernel takes no more and says so: a connection that owes bytes.

    EAGAIN alone is not enough: the ACKs in flight free room again a moment later. Full is
    when, after EAGAIN, the socket does not become writable within a generous moment (on
    loopback ACKs come back at once; the peer never reads and its window is closed)."""
    chunk = bytes(65536)
    watch = select.poll()
    watch.register(sock, select.POLLOUT)
    for _ in range(1_000):  # bounded: a few MB fill any loopback queue
        with contextlib.suppress(BlockingIOError):
            while True:
                sock.send(chunk)
        if not watch.poll(200):
            return
    raise AssertionError("the send buffer never filled")


def enter(state: str, ours: socket.socket, peer: socket.socket) -> None:
    if state == "owing-urgent":
        fill_send_buffer(ours)
    if state in ("data", "urgent", "owing-urgent"):
        peer.send(b"x")
    if state in ("urgent", "owing-urgent"):
        peer.send(b"!", socket.MSG_OOB)
    elif state == "fin":
        peer.shutdown(socket.SHUT_WR)
    elif state == "reset":
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()


@pytest.mark.parametrize("interest", INTERESTS)
@pytest.mark.parametrize("state", STATES)
def test_no_event_equals_an_interest_but_plain_readable_on_read(
    backend: str, state: str, interest: int
) -> None:
    poller = create_poller(backend)
    assert poller.readable_only == READ
    with connected_pair() as (ours, peer):
        fd = ours.fileno()
        enter(state, ours, peer)
        poller.register(fd, interest)
        # A connection that owes bytes and only wants to write is not ready: nothing to wait for.
        expect_event = not (state == "owing-urgent" and interest == WRITE)
        events = poller.poll(2.0 if expect_event else 0.0)
        poller.close()
    if expect_event:
        assert [reported for reported, _ in events] == [fd]
    for _, event in events:
        assert event not in (WRITE, READ | WRITE), (
            f"{backend} reported {event:#x} for {state} with interest {interest}: "
            "the loop would take it for a plain readable event"
        )
        if event == READ:
            assert event == poller.readable_only


@pytest.mark.parametrize("state", ["data", "urgent"])
def test_plain_input_on_a_reading_connection_is_the_fast_path_event(
    backend: str, state: str
) -> None:
    poller = create_poller(backend)
    with connected_pair() as (ours, peer):
        fd = ours.fileno()
        enter(state, ours, peer)
        poller.register(fd, READ)
        events = poller.poll(2.0)
        poller.close()
    assert events == [(fd, READ)]
