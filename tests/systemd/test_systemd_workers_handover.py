"""Hand-over with ``workers = 2`` in a booted systemd: the supervisor is the unit's main
process and relays each worker's store (muxd/store_relay.py). Clients (some with echo
piled up in muxd) keep echoing through a restart, a kill -9 of one worker (its
replacement takes its connections over) and a kill -9 of the supervisor (systemd
restarts the unit with the store); then a plain stop ends them all gracefully.
"""

from __future__ import annotations

import os
import random
import re
import socket

import pytest
from nspawn import (
    Container,
    add_drop_in,
    echo_roundtrip,
    edit_ini,
    pending_echo,
    pile_budget,
    pile_up,
    receive_exactly,
    wait_until,
)

pytestmark = pytest.mark.systemd

CLIENTS = 40  # in both modes: muxd's own port, and muxd.socket
PILERS = 4  # stop reading, so that each worker holds pending echo at the restart
BUFFER_SIZE = 65536
TOOK_OVER = re.compile(r"worker (\d+): took over (\d+) connections")

# This test's quick succession of restarts must not hit the start limit (it would
# empty the store).
TEST_UNIT = """\
[Unit]
StartLimitBurst=50
"""


def workers_of(container: Container, main: int) -> set[int]:
    text = container.path(f"/proc/{main}/task/{main}/children").read_text()
    return {int(pid) for pid in text.split()}


def sockets_of(container: Container, pid: int) -> int:
    fds = container.path(f"/proc/{pid}/fd")
    return sum(os.readlink(fds / name).startswith("socket:") for name in os.listdir(fds))


def took_over(container: Container, mark: int, expected: int) -> list[tuple[int, int, str]]:
    """(slot, connections, message) of the 'took over' lines since ``mark``, once
    they add up to ``expected``."""
    def lines() -> list[tuple[int, int, str]] | None:
        found = []
        for entry in container.journal("-u", "muxd", after=mark):
            match = TOOK_OVER.search(entry["MESSAGE"])
            if match:
                found.append((int(match.group(1)), int(match.group(2)), entry["MESSAGE"]))
        return found if sum(count for _, count, _ in found) >= expected else None

    return wait_until(lambda: lines(), timeout=30, interval=0.2,
                      what=f"{expected} connections taken over")


def all_echo(clients: list[socket.socket], word: bytes) -> None:
    for index, sock in enumerate(clients):
        message = b"%s %d\n" % (word, index)
        assert echo_roundtrip(sock, message) == message, index


@pytest.mark.parametrize("unit", ["muxd.service", "muxd.socket"])
def test_workers_keep_every_connection_through_restart_worker_kill_and_supervisor_kill(
        muxd: Container, unit: str) -> None:
    edit_ini(muxd, {("server", "workers"): "2", ("limits", "buffer_size"): str(BUFFER_SIZE)})
    add_drop_in(muxd, "muxd.service", "test-workers-handover", TEST_UNIT)
    muxd.systemctl("start", unit)  # muxd.socket: the workers share its listener
    clients = [muxd.connect(7) for _ in range(CLIENTS)]
    all_echo(clients, b"hello")
    rng = random.Random(7)
    budget = pile_budget(muxd)
    pilers = []
    for _ in range(PILERS):
        sock = muxd.connect(7)
        assert echo_roundtrip(sock, b"pile\n") == b"pile\n"
        sent = bytearray()
        pile_up(sock, rng, budget, sent)  # its worker holds buffer_size of echo, paused
        pilers.append((sock, sent))
    everyone = CLIENTS + PILERS

    # 1. systemctl restart: the stop hook's SIGURG reaches the supervisor, which arms
    #    the workers; each hands over through the relay.
    first = muxd.main_pid()
    mark = muxd.journal_mark()
    muxd.systemctl("restart", "muxd", timeout=60)
    second = muxd.main_pid()
    assert second != first
    found = took_over(muxd, mark, everyone)
    assert sum(count for _, count, _ in found) == everyone, found
    assert {slot for slot, _, _ in found} == {0, 1}, found
    assert sum(pending_echo(message) for _, _, message in found) > 0, found
    all_echo(clients, b"after the restart")
    for sock, sent in pilers:  # every byte it sent comes back, none lost
        assert receive_exactly(sock, len(sent), timeout=30) == bytes(sent)
    all_echo([sock for sock, _ in pilers], b"read again")

    # 2. kill -9 of one worker: its replacement takes over its connections.
    workers = workers_of(muxd, second)
    assert len(workers) == 2
    # The one holding more sockets: under muxd.socket the workers share one accept
    # queue, and one of them may have accepted every connection.
    victim = max(workers, key=lambda pid: sockets_of(muxd, pid))
    mark = muxd.journal_mark()
    muxd.run(["kill", "-9", str(victim)])
    wait_until(lambda: len(workers_of(muxd, second) - workers) == 1, timeout=30,
               what="a replacement worker")
    replaced = took_over(muxd, mark, 1)
    assert all("without hand-over state" in message for _, _, message in replaced), replaced
    assert muxd.main_pid() == second  # the unit never noticed
    all_echo([*clients, *(sock for sock, _ in pilers)], b"after a worker kill")

    # 3. kill -9 of the supervisor: its workers die with it, systemd restarts the unit
    #    and the new workers take over every connection from the store.
    mark = muxd.journal_mark()
    muxd.systemctl("kill", "--kill-who=main", "--signal=SIGKILL", "muxd")
    wait_until(lambda: muxd.main_pid() not in (0, second), timeout=30, interval=0.1,
               what="a new main PID")
    found = took_over(muxd, mark, everyone)
    assert sum(count for _, count, _ in found) == everyone, found
    all_echo([*clients, *(sock for sock, _ in pilers)], b"after a supervisor kill")

    # 4. A plain stop stays the graceful stop: last echo, then the end.
    for sock in clients:
        sock.sendall(b"last words\n")
    muxd.systemctl("stop", "muxd", timeout=60)
    for sock in clients:
        assert receive_exactly(sock, len(b"last words\n")) == b"last words\n"
        sock.settimeout(10)
        assert sock.recv(10) == b""
    for sock in (*clients, *(sock for sock, _ in pilers)):
        sock.close()
    assert muxd.show("muxd", "NFileDescriptorStore") == "0"
