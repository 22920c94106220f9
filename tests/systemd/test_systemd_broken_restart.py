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
import threading

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

BROKEN = "[limits]\nidle_timeout = forever\n"
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
    edit_ini(muxd, {("logging", "connections"): "yes"})
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
    for reader in readers.values():
        reader.start()
    restart = muxd.run(["systemctl", "restart", "muxd"], check=False, timeout=90)
    for reader in readers.values():
        reader.join(60)

    assert restart.returncode != 0, "the new process started with a broken file?"
    assert muxd.show("muxd", "ExecMainStatus") == "78"
    assert muxd.show("muxd", "NFileDescriptorStore") == "0"
    messages = [e["MESSAGE"] for e in muxd.journal("-u", "muxd", after=mark)]
    said = [m for m in messages if GRACEFUL in m]
    assert len(said) == 1, messages
    assert f"configuration error: {MUXD_CONFIG}: [limits] idle_timeout = 'forever'" in said[0]
    assert not [m for m in messages if "handing over" in m or "took over" in m], messages
    # What muxd read of each client (the rest was input it dropped while stopping).
    read_in = {}
    for message in messages:
        found = re.search(r"disconnect \S+:(\d+) \(\w+\): (\d+) bytes in", message)
        if found:
            read_in[int(found.group(1))] = int(found.group(2))
    for sock, reader in readers.items():
        port = sock.getsockname()[1]
        name = "the non-reader" if sock is piler else f"client {port}"
        assert reader.end == "eof", f"{name}: {reader.end} after {len(reader.received)} bytes"
        assert port in read_in, (name, messages)
        assert len(reader.received) == read_in[port], (name, len(reader.received),
                                                        read_in[port])
        assert reader.received == sent[sock][:len(reader.received)], f"{name}: wrong bytes"
        sock.close()
    assert read_in[piler_port] > 1 << 20  # the non-reader's pile was there to lose

    # Fixed: a plain start serves again.
    muxd.write_file(MUXD_CONFIG, pristine)
    muxd.systemctl("start", "muxd")
    with connected(muxd) as sock:
        assert echo_roundtrip(sock, b"fixed\n") == b"fixed\n"

