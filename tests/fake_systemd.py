"""PID 1's side of the file descriptor store, played by a test (sd_notify(3)).

``FdStoreSystemd`` is a NotifySocket that also does what systemd does with
FDSTORE=1 / FDSTOREREMOVE=1 / BARRIER=1 messages: it binds its datagram
socket with SO_PASSCRED, receives the SCM_RIGHTS descriptors and keeps them
by name, closes extras beyond ``store_max`` (FileDescriptorStoreMax=), drops
a stored descriptor that reports hang-up or error (PID 1 watches them with
EPOLLHUP|EPOLLERR only, and not at all those sent with FDPOLL=0) and closes a
barrier's pipe end once every earlier message is processed. ``launch`` then
starts the next process the way systemd does: the stored descriptors from fd 3
on, LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID (its own PID, through a shell
that execs muxd). A background thread receives, so the daemon's queue drains
as it would under systemd.

``Unit`` is one service's generations of muxd sharing that store (``restart``:
the stop hook's SIGURG, SIGTERM, then the next process; ``crash``: kill -9,
then the next); conftest's ``pid1`` fixture is the store itself. ``parked``
counts the connections parked in the parking sockets it holds (FIONREAD: muxd
sends one payload byte per descriptor).
"""

from __future__ import annotations

import array
import fcntl
import os
import queue
import select
import signal
import socket
import sys
import termios
import threading
from collections.abc import Callable
from pathlib import Path

from daemon_harness import Muxd, NotifySocket

SCM_MAX_FD = 253
STORE_SIZE = 64


class FdStoreSystemd(NotifySocket):
    def __init__(self, path: Path, store_max: int = 1024) -> None:
        super().__init__(path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.store_max = store_max
        self.stored: list[tuple[int, str]] = []  # (fd, name), in the order received
        self.closed_over_max = 0
        self.dropped_on_hangup = 0
        self.removals: list[str] = []
        self.unpolled: set[int] = set()  # stored with FDPOLL=0: never watched
        self._lock = threading.Lock()
        self._inbox: queue.Queue[dict[str, str]] = queue.Queue()
        self._stop_reading = threading.Event()
        self._thread = threading.Thread(target=self._pump, name="fake-pid1", daemon=True)
        self._thread.start()

    # NotifySocket.wait_for reads messages through this.
    def _receive(self, timeout: float) -> dict[str, str] | None:
        try:
            fields = self._inbox.get(timeout=max(timeout, 0.001))
        except queue.Empty:
            return None
        self.messages.append(fields)
        return fields

    def names(self) -> list[str]:
        with self._lock:
            return [name for _, name in self.stored]

    def count(self, name: str) -> int:
        return self.names().count(name)

    def _pump(self) -> None:
        space = socket.CMSG_SPACE(SCM_MAX_FD * 4) + socket.CMSG_SPACE(64)
        while not self._stop_reading.is_set():
            with self._lock:
                watched = list(self.stored)
            poller = select.poll()
            poller.register(self.sock, select.POLLIN)
            for fd, _ in watched:
                if fd in self.unpolled:
                    continue
                poller.register(fd, 0)  # hang-up and error are always reported
            for fd, event in poller.poll(50):
                if fd == self.sock.fileno():
                    self._receive_one(space)
                elif event & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                    self._drop_fd(fd)

    def _receive_one(self, space: int) -> None:
        try:
            data, ancillary, _, _ = self.sock.recvmsg(65536, space, socket.MSG_DONTWAIT)
        except (BlockingIOError, OSError):
            return
        fds: list[int] = []
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                received = array.array("i")
                received.frombytes(payload[:len(payload) - len(payload) % received.itemsize])
                fds.extend(received)
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        if fields.get("FDSTORE") == "1":
            name = fields.get("FDNAME", "stored")
            with self._lock:
                for fd in fds:
                    if len(self.stored) >= self.store_max:
                        os.close(fd)
                        self.closed_over_max += 1
                    else:
                        self.stored.append((fd, name))
                        if fields.get("FDPOLL") == "0":
                            self.unpolled.add(fd)
            fds = []
        if fields.get("FDSTOREREMOVE") == "1":
            name = fields.get("FDNAME", "")
            self.removals.append(name)
            with self._lock:
                for fd, stored_name in list(self.stored):
                    if stored_name == name:
                        os.close(fd)
                        self.stored.remove((fd, stored_name))
                        self.unpolled.discard(fd)
        for fd in fds:  # BARRIER=1's pipe, or anything else: closed once processed
            os.close(fd)
        if not fields.get("FDSTORE") and not fields.get("FDSTOREREMOVE"):
            self._inbox.put(fields)

    def _drop_fd(self, fd: int) -> None:
        with self._lock:
            for entry in self.stored:
                if entry[0] == fd:
                    self.stored.remove(entry)
                    os.close(fd)
                    self.dropped_on_hangup += 1
                    return

    def parked(self) -> int:
        """Descriptors parked in the stored parking sockets (live and closed ones)."""
        total = 0
        with self._lock:
            for fd, name in self.stored:
                if name.startswith("state-park-"):
                    count = array.array("i", [0])
                    fcntl.ioctl(fd, termios.FIONREAD, count)
                    total += count[0]
        return total

    def segments(self) -> int:
        return sum(name.startswith("state-park-") for name in self.names())

    def store_foreign(self, fd: int, name: str, poll: bool = True) -> None:
        """Put a descriptor of the test's own into the store (a duplicate is kept);
        ``poll=False`` as if sent with FDPOLL=0."""
        with self._lock:
            copy = os.dup(fd)
            self.stored.append((copy, name))
            if not poll:
                self.unpolled.add(copy)

    def take(self, prefix: str) -> list[int]:
        """Take the descriptors stored under names starting with ``prefix`` out of the
        store, as FDSTOREREMOVE would, but hand them to the test instead of closing."""
        with self._lock:
            taken = [fd for fd, name in self.stored if name.startswith(prefix)]
            self.stored = [(fd, name) for fd, name in self.stored if fd not in taken]
            self.unpolled.difference_update(taken)
        return taken

    def launch_command(self, config_path: Path) -> tuple[list[str], dict[str, str],
                                                          tuple[int, ...]]:
        """Command, environment and pass_fds for the next muxd: a shim (as PID 1's
        exec does) moves the stored descriptors to fds 3, 4, ... in the order
        stored, sets LISTEN_FDS/LISTEN_FDNAMES/LISTEN_PID and execs muxd."""
        with self._lock:
            entries = list(self.stored)
        sources = tuple(fd for fd, _ in entries)
        env = {"FAKE_PID1_FDS": ",".join(map(str, sources)),
               "FAKE_PID1_NAMES": ":".join(name for _, name in entries)}
        command = [sys.executable, "-c", _EXEC_SHIM, sys.executable, "-m", "muxd",
                   "--config", str(config_path)]
        return command, env, sources

    def entries(self) -> list[tuple[int, str]]:
        with self._lock:
            return list(self.stored)

    def read(self, prefix: str) -> bytes:
        """The contents of the one stored memfd whose name starts with ``prefix`` (not
        a parking socket's, though those start with "state-" too)."""
        with self._lock:
            (fd,) = [fd for fd, name in self.stored if _is_file(name, prefix)]
            return os.pread(fd, os.fstat(fd).st_size, 0)

    def rewrite(self, prefix: str, change: Callable[[bytes], bytes]) -> None:
        """Replace that memfd by one holding ``change(contents)``, under the same name."""
        with self._lock:
            ((index, (fd, name)),) = [(index, entry) for index, entry in enumerate(self.stored)
                                      if _is_file(entry[1], prefix)]
            data = change(os.pread(fd, os.fstat(fd).st_size, 0))
            replacement = os.memfd_create("rewritten")
            os.write(replacement, data)
            os.close(fd)
            self.stored[index] = (replacement, name)

    def close(self) -> None:
        self._stop_reading.set()
        self._thread.join(5)
        with self._lock:
            for fd, _ in self.stored:
                os.close(fd)
            self.stored.clear()
            self.unpolled.clear()
        super().close()


def _is_file(name: str, prefix: str) -> bool:
    return name.startswith(prefix) and not name.startswith("state-park-")


class Unit:
    """One muxd 'service' whose generations share the fake PID 1's store."""

    def __init__(self, pid1: FdStoreSystemd, start_muxd: Callable[..., Muxd], config: str,
                 tmp_path: Path, store_size: int = STORE_SIZE, **kwargs: object) -> None:
        self.pid1 = pid1
        self.start_muxd = start_muxd
        self.config_path = tmp_path / "unit.ini"
        self.config_path.write_text(config)
        self.env = {"FDSTORE": str(store_size)}
        self.daemon = self.start(**kwargs)

    def start(self, **kwargs: object) -> Muxd:
        """The next process, given what the store holds (``kwargs``: for start_muxd,
        e.g. ``preexec``; remembered for the generations after it)."""
        self.kwargs = {**getattr(self, "kwargs", {}), **kwargs}
        command, env, fds = self.pid1.launch_command(self.config_path)
        self.daemon = self.start_muxd(None, command=command, env={**self.env, **env},
                                      pass_fds=fds, notify_socket=self.pid1, **self.kwargs)
        return self.daemon

    def hand_over(self) -> Muxd:
        """The stop half of `systemctl restart` with the unit's stop hook: SIGURG,
        SIGTERM, and the process has handed over and exited."""
        old = self.daemon
        old.signal(signal.SIGURG)
        old.signal(signal.SIGTERM)
        assert old.wait() == 0, old.log
        old.wait_log("handing over")
        return old

    def restart(self, **kwargs: object) -> Muxd:
        """What `systemctl restart` does with the unit's stop hook."""
        self.hand_over()
        return self.start(**kwargs)

    def crash(self, **kwargs: object) -> Muxd:
        """kill -9 and Restart=on-failure."""
        self.daemon.signal(signal.SIGKILL)
        self.daemon.wait()
        return self.start(**kwargs)


_EXEC_SHIM = """
import fcntl, os, sys
sources = [int(fd) for fd in os.environ.pop("FAKE_PID1_FDS").split(",") if fd]
names = os.environ.pop("FAKE_PID1_NAMES")
floor = 3 + len(sources) + 8
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, floor) for fd in sources]
for fd in sources:
    os.close(fd)
for index, fd in enumerate(high):
    os.dup2(fd, 3 + index)
    os.close(fd)
if sources:  # systemd sets none of these when it passes nothing
    os.environ.update(LISTEN_FDS=str(len(sources)), LISTEN_FDNAMES=names,
                      LISTEN_PID=str(os.getpid()))
os.execv(sys.argv[1], sys.argv[1:])
"""
