"""What workers report to the supervisor, and the one report the supervisor
makes of theirs: the datagram socket every worker's notify protocol reaches
(the kernel names the sender, SO_PASSCRED, as it does for systemd) and the
combined STATUS= line.

It owns the inbox socket and changes nothing else: ``read`` returns who said
what, and the supervisor decides what that means for its workers.
"""

from __future__ import annotations

import os
import re
import socket
import struct
from collections.abc import Iterable, Iterator

from muxd.config import Config
from muxd.pollers import available_backends

_SERVING = re.compile(r"serving (\d+) connection")
_CREDENTIALS_SIZE = socket.CMSG_SPACE(struct.calcsize("3i"))


class Inbox:
    """The supervisor's notify socket, at an abstract address of its own."""

    def __init__(self) -> None:
        name = f"\0muxd-supervisor-{os.getpid()}-{os.urandom(4).hex()}"
        self.address = "@" + name[1:]  # NOTIFY_SOCKET's spelling of an abstract address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(name)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._sock.setblocking(False)

    @property
    def fd(self) -> int:
        return self._sock.fileno()

    def read(self) -> Iterator[tuple[int, str, str]]:
        """(sender PID, KEY, VALUE) for every assignment queued, until none is left."""
        while True:
            try:
                data, ancillary, _, _ = self._sock.recvmsg(4096, _CREDENTIALS_SIZE)
            except BlockingIOError:
                return
            pid = None
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", payload[:12])[0]
            if pid is None:
                continue
            for line in data.decode(errors="replace").splitlines():
                key, _, value = line.partition("=")
                yield pid, key, value

    def close(self) -> None:
        self._sock.close()


def combined_status(statuses: Iterable[str], ready: int, slots: int, config: Config,
                    inherited: tuple | None) -> str:
    """One STATUS= for all workers, from each worker's own STATUS= line."""
    serving = 0
    for status in statuses:
        match = _SERVING.match(status)
        serving += int(match.group(1)) if match else 0
    backend = config.backend
    if backend == "auto":
        backend = available_backends()[0]
    noun = "connection" if serving == 1 else "connections"
    return (f"serving {serving} {noun} on {_addresses(config, inherited)} ({backend}, "
            f"{ready}/{slots} workers)")


def _addresses(config: Config, inherited: tuple | None) -> str:
    if inherited is not None:
        listeners, endpoints = inherited
        return ", ".join([*(item.name for item in listeners),
                          *(item.name for item in endpoints)])
    return ", ".join([*map(str, config.listen), *(f"udp {address}" for address in config.udp)])
