"""The store relay's contract (muxd/store_relay.py), between a WorkerStore and the
supervisor's StoreRelay over their real channel, with the test playing PID 1
(fake_systemd.py): what reaches PID 1 and under which name, and which copies the
supervisor keeps for a replacement worker (the store's semantics: removal by name,
dropped on hang-up unless stored with FDPOLL=0). The whole path, daemon and all, is
in test_workers.py."""

from __future__ import annotations

import os
import select
import socket
import threading
import time

import pytest
from daemon_harness import wait_until

from muxd.fdstore import FdStore
from muxd.store_relay import StoreRelay, WorkerStore, slot_name, split_name
from muxd.timers import Timers


@pytest.fixture
def relay(pid1):
    store = FdStore(str(pid1.path))
    relay = StoreRelay(store, 2, Timers(), time.monotonic)
    yield relay
    relay.close()


def worker_store(relay: StoreRelay, slot: int) -> WorkerStore:
    """The worker's end of a new channel, as the supervisor makes one before a fork."""
    theirs = relay.channel_for(slot)
    child = WorkerStore(socket.socket(fileno=os.dup(theirs.fileno())))
    relay.worker_started(slot)  # closes its copy of the worker's end, as after a fork
    return child


def serve(relay: StoreRelay, until, what: str) -> None:
    """The supervisor's loop, for the relay's descriptor only."""
    def turn() -> bool:
        if select.select([relay.fd], [], [], 0.05)[0]:
            relay.on_ready()
        return until()

    wait_until(turn, what=what)


def test_names_carry_the_slot_and_are_split_back() -> None:
    assert slot_name(1, "conn") == "state-w1.conn"
    assert split_name("state-w12.state-345") == (12, "state-345")
    assert split_name("conn") == (None, "conn")
    assert split_name("state-wx.conn") == (None, "state-wx.conn")


def test_stores_reach_pid1_under_the_slot_and_copies_follow_the_store(pid1, relay) -> None:
    worker = worker_store(relay, 1)
    watched_a, watched_b = socket.socketpair()
    unwatched_a, unwatched_b = socket.socketpair()
    state = os.memfd_create("state")
    worker.queue(watched_a.fileno(), "conn")
    worker.queue(unwatched_a.fileno(), "park", poll=False)
    assert worker.flush()
    assert worker.store_now(state, "state-1")
    os.close(state)
    expected = ["state-w1.conn", "state-w1.park", "state-w1.state-1"]
    serve(relay, lambda: sorted(pid1.names()) == expected,
          "the three in PID 1's store under worker 1's names")
    assert sorted(name for _, name in relay.handed_to(1)) == ["conn", "park", "state-1"]
    assert relay.handed_to(0) == []

    # Both peers hang up: only the watched copy goes (PID 1 drops its own the same way;
    # an FDPOLL=0 one stays, in PID 1 and here).
    for sock in (watched_a, watched_b, unwatched_a, unwatched_b):
        sock.close()
    serve(relay, lambda: sorted(name for _, name in relay.handed_to(1)) == ["park", "state-1"],
          "the watched copy dropped on hang-up")

    # A removal by the worker's own name goes to PID 1 under the slot's name.
    worker.remove("state-1")
    serve(relay, lambda: [name for _, name in relay.handed_to(1)] == ["park"],
          "the state's copy removed")
    wait_until(lambda: "state-w1.state-1" in pid1.removals, what="its FDSTOREREMOVE=1")

    # A barrier comes back once PID 1 has processed everything before it.
    worker.remove("park")
    confirmed: list[bool] = []
    waiter = threading.Thread(target=lambda: confirmed.append(worker.barrier(5)))
    waiter.start()
    serve(relay, lambda: confirmed, "the barrier confirmed")
    waiter.join()
    assert confirmed == [True]
    assert "state-w1.park" in pid1.removals and relay.handed_to(1) == []
    worker.close()


def test_what_systemd_passed_back_is_sorted_by_slot_modulo_the_workers(relay) -> None:
    fds = [os.memfd_create(f"x{index}") for index in range(4)]
    names = ["state-w0.conn", "state-w1.conn", "state-w2.conn", "conn"]
    relay.assign(list(zip(fds, names, strict=True)))
    assert sorted(relay.handed_to(0)) == sorted([(fds[0], "conn"), (fds[2], "conn"),
                                                 (fds[3], "conn")])
    assert relay.handed_to(1) == [(fds[1], "conn")]


def test_an_inherited_parking_socket_is_not_dropped_when_its_peer_is_gone(relay) -> None:
    """LISTEN_FDS does not say what was stored with FDPOLL=0: an inherited AF_UNIX socket
    (a parking socket, whose sending end went with the process before) is kept, as PID 1
    keeps it; an inherited socket that hung up otherwise is dropped, as PID 1 drops it."""
    parked, sender = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sender.close()
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    client.close()
    accepted.shutdown(socket.SHUT_RDWR)  # both directions shut: it reports hang-up
    relay.assign([(parked.detach(), "state-w0.state-park-1-1"),
                  (accepted.detach(), "state-w0.conn")])
    serve(relay, lambda: [name for _, name in relay.handed_to(0)] == ["state-park-1-1"],
          "the hung-up connection dropped, the parking socket kept")
    listener.close()
