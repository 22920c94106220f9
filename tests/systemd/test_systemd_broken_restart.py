"""`systemctl restart muxd` right after a broken edit (issue 19, item 1).

With hand-over the old process would leave every connection in the store for a new process
that then exits 78, and systemd would close the store: every client with unread data reset,
its pending echo lost. The unit's stop hook checks the file the next process will read
(`muxd --check-restart`) and, when it does not load, lets the restart be the graceful stop:
every client gets all its echo, then the end; one line in the journal says why; fixing the
file and `systemctl start muxd` serves again.
"""

from __future__ import annotations

import random
import re
import socket
import subprocess
import threading
from pathlib import Path

import pytest
from nspawn import (
    MUXD_CONFIG,
    Container,
    connected,
    echo_roundtrip,
    edit_ini,
    pile_budget,
    pile_up,
)

pytestmark = pytest.mark.systemd

BROKEN = "[server]\nworkers = many\n"  # a key that needs a restart, edited wrongly
README = Path(__file__).resolve().parents[2] / "README.md"
IDLE_CLIENTS = 3
GRACEFUL = "this restart stops muxd gracefully"


class Reader(threading.Thread):
    """Reads a client's echo until the end; records whether the end was an EOF or a reset."""

    def __init__(self, sock: socket.socket, already: bytes) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.received = bytearray(already)  # echo read before
        self.end = "none"

    def run(self) -> None:
        self.sock.setblocking(True)
        self.sock.settimeout(60)
        try:
            while chunk := self.sock.recv(1 << 20):
                self.received += chunk
            self.end = "eof"
        except OSError as err:
            self.end = repr(err)


def test_restart_after_a_broken_edit_is_the_graceful_stop(muxd: Container) -> None:
    pristine = muxd.path(MUXD_CONFIG).read_text()
    # Time for the non-reader to read its echo during a graceful stop, however late it starts.
    edit_ini(muxd, {("logging", "connections"): "yes", ("limits", "shutdown_timeout"): "60"})
    muxd.systemctl("start", "muxd")
    idle = [muxd.connect(7) for _ in range(IDLE_CLIENTS)]
    sent = {sock: bytearray(b"hello\n") for sock in idle}
    for sock in idle:
        assert echo_roundtrip(sock, b"hello\n") == b"hello\n"
    # A client that stopped reading: muxd holds buffer_size of its echo, reading paused,
    # and the kernel queues hold more in both directions.
    piler = muxd.connect(7)
    piler.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    piler_port = piler.getsockname()[1]
    sent[piler] = bytearray()
    pile_up(piler, random.Random(19), pile_budget(muxd), sent[piler])
    for sock in idle:  # echo that may still be on its way when the restart begins
        sock.sendall(b"last words\n")
        sent[sock] += b"last words\n"

    muxd.write_file(MUXD_CONFIG, BROKEN)
    mark = muxd.journal_mark()
    readers = {sock: Reader(sock, b"" if sock is piler else b"hello\n") for sock in sent}
    for sock, reader in readers.items():
        if sock is not piler:
            reader.start()
    outcome: list[subprocess.CompletedProcess[str]] = []
    restarter = threading.Thread(target=lambda: outcome.append(
        muxd.run(["systemctl", "restart", "muxd"], check=False, timeout=120)))
    restarter.start()
    # The non-reader reads again only once the old process has its SIGTERM: what muxd holds
    # for it then must still reach it (a hand-over to a process that never starts loses it).
    muxd.wait_for_journal("-u", "muxd", after=mark, timeout=60, match=lambda e: any(
        word in e["MESSAGE"] for word in ("SIGTERM: stopping", "handing over")))
    readers[piler].start()
    restarter.join(150)
    restart = outcome[0]
    for reader in readers.values():
        reader.join(60)

    # Every client's connection ended cleanly (no reset), after all the echo muxd owed it.
    messages = [e["MESSAGE"] for e in muxd.journal("-u", "muxd", after=mark)]
    read_in = {}  # what muxd read of each client (input it dropped while stopping aside)
    for message in messages:
        found = re.search(r"disconnect \S+:(\d+) \(\w+\): (\d+) bytes in", message)
        if found:
            read_in[int(found.group(1))] = int(found.group(2))
    ends = {}
    for sock, reader in readers.items():
        port = sock.getsockname()[1]
        name = "the non-reader" if port == piler_port else f"client {port}"
        ends[name] = (reader.end, len(reader.received), read_in.get(port))
        assert reader.received == sent[sock][:len(reader.received)], f"{name}: wrong bytes"
        sock.close()
    assert all(end == "eof" and got == owed for end, got, owed in ends.values()), ends
    assert read_in[piler_port] > 1 << 20  # the non-reader's pile was there to lose

    assert restart.returncode != 0, "the new process started with a broken file?"
    assert muxd.show("muxd", "ExecMainStatus") == "78"
    assert muxd.show("muxd", "NFileDescriptorStore") == "0"
    said = [m for m in messages if GRACEFUL in m]
    assert len(said) == 1, messages
    # Word for word the line README "Configure and reload" quotes.
    quoted = [line.strip() for line in README.read_text().splitlines() if GRACEFUL in line
              and line.startswith("    muxd: configuration error: ")]
    assert quoted == [said[0]], (quoted, said[0])
    assert not [m for m in messages if "handing over" in m or "took over" in m], messages

    # Fixed: a plain start serves again.
    muxd.write_file(MUXD_CONFIG, pristine)
    muxd.systemctl("start", "muxd")
    with connected(muxd) as sock:
        assert echo_roundtrip(sock, b"fixed\n") == b"fixed\n"

