"""PID 1's file descriptor store, played for the benchmark (``python -m bench.fakestore``).

What systemd does with a service's ``FDSTORE=1`` messages (sd_notify(3)), as far as
muxd's hand-over needs it: receive the SCM_RIGHTS batches on ``NOTIFY_SOCKET`` and keep
every descriptor by name (at most ``store_max``; extras are closed, as beyond
FileDescriptorStoreMax=); watch each kept descriptor for hang-up or error only (PID 1
registers them with no events, so EPOLLHUP/EPOLLERR) and close it then; remove by name
on ``FDSTOREREMOVE=1``; close a ``BARRIER=1`` pipe end once every earlier message is
processed (here: at once, messages being handled in order). It does not reproduce
systemd's own costs, in particular the comparison of every new descriptor with every
stored one (README, "What it costs"): it is the least a store can do.

Two uses:

* ``store_process`` (the churn scenario): the store as its own process, so that its
  CPU is measured apart from muxd's; it prints one JSON line of counts when stopped.
* ``FakeStore`` in-process, with ``launch`` (bench/restart.py): the caller plays PID 1
  and starts the next process with the stored descriptors at fd 3, 4, ... and
  LISTEN_FDS / LISTEN_FDNAMES / LISTEN_PID, as systemd does.

Why not tests/fake_systemd.py: that one is a thread inside the test process that polls
every stored descriptor each turn (fine for a few dozen), and tests/ is no package the
benchmark can import; this one is an epoll loop that holds 10,000 descriptors cheaply
and runs as a process of its own.

May touch: its socket path, the descriptors it receives, and the processes it launches.
"""

from __future__ import annotations

import argparse
import array
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCM_MAX_FD = 253
# systemd raises its notify socket's buffer to 8 MiB (NOTIFY_RCVBUF_SIZE); the queue
# length (net.unix.max_dgram_qlen) is what bounds a burst, as for PID 1.
RCVBUF = 8 * 1024 * 1024
# FileDescriptorStoreMax= of the shipped unit (packaging/), which muxd reads as $FDSTORE.
DEFAULT_STORE_MAX = 10240
STARTUP_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
_ANCILLARY_SPACE = socket.CMSG_SPACE(SCM_MAX_FD * 4) + socket.CMSG_SPACE(12)
_STORE_KEYS = frozenset({"FDSTORE", "FDSTOREREMOVE", "FDNAME", "FDPOLL", "BARRIER"})


@dataclass
class Counts:
    received: int = 0  # descriptors stored (FDSTORE=1)
    dropped_on_hangup: int = 0
    closed_over_max: int = 0
    removed_by_name: int = 0
    truncated: int = 0  # messages whose descriptors did not fit (MSG_CTRUNC)
    store_messages: int = 0
    barriers: int = 0
    notifications: int = 0  # everything else: READY=1, STATUS=, STOPPING=1, ...
    peak_held: int = 0
    received_by_name: dict[str, int] = field(default_factory=dict)


@dataclass
class FakeStore:
    path: str
    store_max: int = DEFAULT_STORE_MAX
    # Called with (CLOCK_MONOTONIC at receipt, sender's PID, fields) for every message
    # that is not FDSTORE=1, FDSTOREREMOVE=1 or a bare BARRIER=1.
    on_notify: Callable[[float, int, dict[str, str]], None] | None = None
    counts: Counts = field(default_factory=Counts)

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # as PID 1 does
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self.epoll = select.epoll()
        self.epoll.register(self.sock.fileno(), select.EPOLLIN)
        self.stored: dict[int, str] = {}  # fd -> name, in the order stored
        self._watched: set[int] = set()
        self._pidfds: dict[int, int] = {}  # pidfd -> pid of a launched process
        # pid -> (CLOCK_MONOTONIC when PID 1 saw it end, wait status)
        self.exited: dict[int, tuple[float, int]] = {}
        self.peak_rss_kib: dict[int, int] = {}  # pid -> its peak RSS, read when reaped
        self.cpu_s: dict[int, float] = {}  # pid -> its user + system CPU, read when reaped
        self.stop_fd = -1  # registered by the caller; readable means "stop"
        self.stop_requested = False

    # --- the store --------------------------------------------------------

    def held(self, name: str | None = None) -> int:
        if name is None:
            return len(self.stored)
        return sum(1 for stored_name in self.stored.values() if stored_name == name)

    def pump(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for messages or hang-ups and handle them all."""
        for fd, events in self.epoll.poll(timeout):
            if fd == self.sock.fileno():
                self._receive_all()
            elif fd in self._pidfds:
                self._reap(fd)
            elif fd == self.stop_fd:
                self.stop_requested = True
            elif events & (select.EPOLLHUP | select.EPOLLERR):
                self._close(fd)
                self.counts.dropped_on_hangup += 1

    def drain(self) -> None:
        """Handle everything already waiting (before counting, or before a launch)."""
        before = -1
        while before != self._progress():
            before = self._progress()
            self.pump(0)

    def run_until(self, done: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.pump(min(remaining, 0.5))
        return True

    def close(self) -> None:
        for fd in list(self.stored):
            self._close(fd)
        for pidfd in list(self._pidfds):
            self.epoll.unregister(pidfd)
            os.close(pidfd)
        self.epoll.close()
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _progress(self) -> tuple[int, ...]:
        c = self.counts
        return (c.received, c.dropped_on_hangup, c.store_messages, c.barriers,
                c.notifications, c.removed_by_name)  # fmt: skip

    def _receive_all(self) -> None:
        while True:
            try:
                data, ancillary, flags, _ = self.sock.recvmsg(
                    4096, _ANCILLARY_SPACE, socket.MSG_CMSG_CLOEXEC
                )
            except (BlockingIOError, InterruptedError):
                return
            fds = array.array("i")
            sender = 0
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    sender = int.from_bytes(payload[:4], sys.byteorder)
            if flags & socket.MSG_CTRUNC:
                self.counts.truncated += 1
            self._handle(data, list(fds), sender)

    def _handle(self, data: bytes, fds: list[int], sender: int = 0) -> None:
        fields = dict(
            line.split("=", 1) for line in data.decode(errors="replace").splitlines() if "=" in line
        )
        if fields.get("FDSTORE") == "1":
            self.counts.store_messages += 1
            name = fields.get("FDNAME", "stored")
            watch = fields.get("FDPOLL") != "0"
            for fd in fds:
                self._keep(fd, name, watch)
            fds = []
        if fields.get("FDSTOREREMOVE") == "1":
            name = fields.get("FDNAME", "")
            for fd in [fd for fd, stored in self.stored.items() if stored == name]:
                self._close(fd)
                self.counts.removed_by_name += 1
        if fields.get("BARRIER") == "1":
            self.counts.barriers += 1
        for fd in fds:  # a barrier's pipe end, or descriptors sent without FDSTORE=1
            os.close(fd)
        if fields.keys() - _STORE_KEYS or not fields:
            self.counts.notifications += 1
            if self.on_notify is not None:
                self.on_notify(time.monotonic(), sender, fields)

    def _keep(self, fd: int, name: str, watch: bool) -> None:
        if len(self.stored) >= self.store_max:
            os.close(fd)
            self.counts.closed_over_max += 1
            return
        self.stored[fd] = name
        self.counts.received += 1
        by_name = self.counts.received_by_name
        by_name[name] = by_name.get(name, 0) + 1
        self.counts.peak_held = max(self.counts.peak_held, len(self.stored))
        if watch:
            try:
                self.epoll.register(fd, 0)  # hang-up and error are always reported
            except PermissionError:
                return  # a regular file (the state memfd) cannot be polled: PID 1 keeps it so
            self._watched.add(fd)

    def _reap(self, pidfd: int) -> None:
        pid = self._pidfds.pop(pidfd)
        self.epoll.unregister(pidfd)
        os.close(pidfd)
        _, status, usage = os.wait4(pid, 0)
        self.exited[pid] = (time.monotonic(), status)
        self.peak_rss_kib[pid] = usage.ru_maxrss  # KiB on Linux
        self.cpu_s[pid] = usage.ru_utime + usage.ru_stime

    def _close(self, fd: int) -> None:
        if fd in self._watched:
            self._watched.discard(fd)
            self.epoll.unregister(fd)
        self.stored.pop(fd, None)
        os.close(fd)

    # --- starting the next process, as PID 1 does -------------------------

    def launch(self, argv: list[str], env: dict[str, str], core: int | None = None,
               stderr: Path | None = None) -> int:
        """Start ``argv`` with every stored descriptor at fd 3, 4, ... (in the order
        stored) and LISTEN_FDS/LISTEN_FDNAMES/LISTEN_PID set as systemd sets them,
        pinned to ``core``, its stderr appended to ``stderr``. Returns its PID; its end
        is seen by ``pump`` (``exited``). The descriptors stay in the store (systemd
        keeps them too, until the process removes them or they hang up).

        posix_spawn's file actions move the descriptors in the child (a cycle of moves
        through one spare descriptor number where they collide); ``/bin/sh`` sets
        LISTEN_PID to its own PID and execs, since the PID is not known before."""
        entries = list(self.stored.items())
        child_env = dict(env)
        if entries:
            child_env["LISTEN_FDS"] = str(len(entries))
            child_env["LISTEN_FDNAMES"] = ":".join(name for _, name in entries)
        actions = fd_moves([fd for fd, _ in entries], spare=_spare_fd())
        if stderr is not None:
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
            actions.append((os.POSIX_SPAWN_OPEN, 2, str(stderr), flags, 0o644))
        shim = ['/bin/sh', '-c', 'if [ -n "$LISTEN_FDS" ]; then export LISTEN_PID=$$; fi; '
                'exec "$@"', 'sh', *argv]  # fmt: skip
        # As subprocess does: SIGPIPE and SIGXFSZ, ignored by Python, back to default.
        pid = os.posix_spawn(shim[0], shim, child_env, file_actions=actions,
                             setsigdef=(signal.SIGPIPE, signal.SIGXFSZ))
        if core is not None:
            os.sched_setaffinity(pid, {core})
        pidfd = os.pidfd_open(pid)
        self._pidfds[pidfd] = pid
        self.epoll.register(pidfd, select.EPOLLIN)
        return pid


def fd_moves(sources: list[int], spare: int) -> list[tuple[int, ...]]:
    """posix_spawn file actions that leave ``sources[i]`` at fd 3 + i, inheritable.

    A move onto a number that still holds a source not yet moved would lose it, so a
    target is written only once what it holds has moved on; what is left are cycles,
    each broken by parking one source at ``spare`` (a number free in the parent, closed
    at the end). Every source was received close-on-exec, so whatever is not a target
    vanishes at exec; a dup2 onto itself clears close-on-exec (glibc >= 2.29). Linear
    in the number of descriptors."""
    dup2 = os.POSIX_SPAWN_DUP2
    want = {3 + index: fd for index, fd in enumerate(sources)}  # target -> where it is now
    holder = {fd: target for target, fd in want.items()}  # where it is now -> target
    actions: list[tuple[int, ...]] = []
    ready = [target for target in want if target not in holder or holder[target] == target]
    order = iter(list(want))
    used_spare = False
    while want:
        if not ready:  # only cycles left: park the content of one target
            target = next(t for t in order if t in want)
            actions.append((dup2, target, spare))
            owner = holder.pop(target)
            want[owner] = spare
            holder[spare] = owner
            ready.append(target)
            used_spare = True
            continue
        target = ready.pop()
        fd = want.pop(target)
        actions.append((dup2, fd, target))
        del holder[fd]
        if fd in want and fd not in holder:  # its old place is a target free now
            ready.append(fd)
    if used_spare:
        actions.append((os.POSIX_SPAWN_CLOSE, spare))
    return actions


def _spare_fd() -> int:
    """A number above every open descriptor (so above every target, too)."""
    return max(int(name) for name in os.listdir("/proc/self/fd")) + 1


# --- as a process of its own ------------------------------------------------


def serve(path: str, store_max: int) -> dict[str, Any]:
    """Run the store until SIGTERM; return its counts (everything pending handled).

    SIGTERM only wakes the loop (through ``signal.set_wakeup_fd``), so a message is
    never cut off halfway through being handled."""
    store = FakeStore(path, store_max)
    wake_read, wake_write = socket.socketpair()
    wake_read.setblocking(False)
    wake_write.setblocking(False)
    signal.set_wakeup_fd(wake_write.fileno())
    signal.signal(signal.SIGTERM, lambda _signum, _frame: None)
    store.epoll.register(wake_read.fileno(), select.EPOLLIN)
    store.stop_fd = wake_read.fileno()
    print("READY", flush=True)
    while not store.stop_requested:
        store.pump(60.0)
    store.drain()
    by_name: dict[str, int] = {}
    for name in store.stored.values():
        by_name[name] = by_name.get(name, 0) + 1
    cpu = os.times()
    result = {**vars(store.counts), "held": store.held(), "held_by_name": by_name,
              "cpu_s": round(cpu.user + cpu.system, 4)}  # fmt: skip
    store.close()
    return result


@dataclass
class StoreProcess:
    path: str
    store_max: int
    process: subprocess.Popen[str]
    stats: dict[str, Any] | None = None  # set when stopped

    @property
    def pid(self) -> int:
        return self.process.pid


@contextmanager
def store_process(
    path: Path, core: int | None = None, store_max: int = DEFAULT_STORE_MAX
) -> Iterator[StoreProcess]:
    """``python -m bench.fakestore`` bound at ``path`` (pinned to ``core``), until the
    block ends; then stopped, with its counts in ``.stats``."""
    from bench import REPO_ROOT

    preexec = None if core is None else (lambda: os.sched_setaffinity(0, {core}))
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.fakestore", "--socket", str(path),
         "--store-max", str(store_max)],
        cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
        preexec_fn=preexec,
    )  # fmt: skip
    running = StoreProcess(str(path), store_max, process)
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], STARTUP_TIMEOUT_S)
        line = process.stdout.readline() if ready else ""
        if line.strip() != "READY":
            raise RuntimeError(f"the fake file descriptor store did not start: {line!r}")
        yield running
    finally:
        if process.poll() is None:
            process.terminate()
        try:
            out, _ = process.communicate(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            out, _ = process.communicate()
        lines = [line for line in (out or "").splitlines() if line.startswith("{")]
        running.stats = json.loads(lines[-1]) if lines else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fakestore", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", required=True, help="path to bind (NOTIFY_SOCKET)")
    parser.add_argument("--store-max", type=int, default=DEFAULT_STORE_MAX)
    args = parser.parse_args(argv)
    from bench.peers import raise_nofile_limit

    raise_nofile_limit()
    print(json.dumps(serve(args.socket, args.store_max)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
