"""Thousands of idle connections to muxd in a booted container, a paced churn of short ones,
and the CPU time the container's init (PID 1 inside, a plain process on the host) spends.

Owns only what it opens: sockets made in the container's network namespace (one helper
thread per object joins it; a socket keeps the namespace it was made in), driven from the
calling thread with one selector, never a thread per connection. Reads the init's
/proc/<pid>/stat on the host, which the container cannot influence: the clients run here,
on the host, so none of their work is charged to that process.
"""

from __future__ import annotations

import os
import selectors
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from nspawn import _enter_netns

CLK_TCK = os.sysconf("SC_CLK_TCK")
LOOPBACK = "127.0.0.1"


class Pid1Cpu:
    """utime + stime of one process, from the host's /proc (resolution: one clock tick)."""

    def __init__(self, host_pid: int) -> None:
        self.stat = Path(f"/proc/{host_pid}/stat")

    def seconds(self) -> float:
        # Fields after the command name (which may hold spaces): state is [0], utime [11],
        # stime [12] (proc(5) fields 3, 14 and 15).
        fields = self.stat.read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def wait_idle(self, window: float = 0.5, slack: float = 0.02, cap: float = 180.0
                  ) -> tuple[float, bool]:
        """Sample the CPU time every `window` seconds until one window added at most `slack`
        (two ticks); return it then and True, or, after `cap` seconds, it and False. (The
        windows are a measurement, not a synchronisation: there is no event for "PID 1 has
        nothing left to do".)"""
        deadline = time.monotonic() + cap
        last = self.seconds()
        while True:
            time.sleep(window)
            now = self.seconds()
            if now - last <= slack:
                return now, True
            if time.monotonic() >= deadline:
                return now, False
            last = now


def _new_sockets(count: int) -> list[socket.socket]:
    return [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]


def _payload(index: int, round_: int) -> bytes:
    return f"{round_:03d}:{index:07d}\n".encode()


@dataclass
class _Pending:
    sock: socket.socket
    index: int
    payload: bytes
    connecting: bool
    got: bytearray = field(default_factory=bytearray)


class Herd:
    """`size` connections to `port` inside the container, each proven accepted by one echo
    when opened, then held idle; echo on all of them, reset all of them, reopen the dead."""

    def __init__(self, init_pid: int, port: int) -> None:
        self.port = port
        self._netns = ThreadPoolExecutor(max_workers=1, initializer=_enter_netns,
                                         initargs=(init_pid,))
        self.socks: list[socket.socket] = []
        self._round = 0

    def close(self) -> None:
        for sock in self.socks:
            sock.close()
        self.socks = []
        self._netns.shutdown()

    def open(self, count: int, window: int = 256, timeout: float = 120.0) -> list[str]:
        """Open `count` more connections, at most `window` not yet echoed at a time (the
        listen queue is 1,024); keep those that echoed, return why the others did not."""
        fresh = self._netns.submit(_new_sockets, count).result(timeout=60)
        failures = self._exchange(fresh, connect=True, window=window, timeout=timeout)
        for sock, failure in zip(fresh, failures, strict=True):
            if failure is None:
                self.socks.append(sock)
            else:
                sock.close()
        return [f for f in failures if f is not None]

    def echo_all(self, timeout: float = 60.0) -> list[str]:
        """One small echo on every held connection; the failures (index: why), none if all
        came back byte for byte."""
        failures = self._exchange(self.socks, connect=False, window=2048, timeout=timeout)
        return [f for f in failures if f is not None]

    def heal(self, size: int) -> int:
        """Echo on all; replace those that failed (and any missing) so that `size` are held
        and proven alive. Returns how many were replaced."""
        failures = self._exchange(self.socks, connect=False, window=2048, timeout=60.0)
        alive = [s for s, f in zip(self.socks, failures, strict=True) if f is None]
        for sock, failure in zip(self.socks, failures, strict=True):
            if failure is not None:
                sock.close()
        self.socks = alive
        missing = size - len(alive)
        if missing > 0:
            left = self.open(missing)
            assert not left, f"could not reopen {len(left)} connections: {left[:5]}"
        return missing

    def reset_all(self) -> int:
        """Close every held connection with a reset (SO_LINGER 0), as a balancer's restart
        or a network blip ends them; returns how many."""
        linger = struct.pack("ii", 1, 0)
        count = len(self.socks)
        for sock in self.socks:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            sock.close()
        self.socks = []
        return count

    def _exchange(self, socks: list[socket.socket], connect: bool, window: int,
                  timeout: float) -> list[str | None]:
        self._round += 1
        failures: list[str | None] = [None] * len(socks)
        selector = selectors.DefaultSelector()
        deadline = time.monotonic() + timeout
        active = 0
        next_index = 0
        try:
            while next_index < len(socks) or active:
                while active < window and next_index < len(socks):
                    index = next_index
                    next_index += 1
                    sock = socks[index]
                    sock.setblocking(False)
                    item = _Pending(sock, index, _payload(index, self._round), connect)
                    if connect:
                        err = sock.connect_ex((LOOPBACK, self.port))
                        if err not in (0, 115):  # EINPROGRESS
                            failures[index] = f"{index}: connect: {os.strerror(err)}"
                            continue
                        selector.register(sock, selectors.EVENT_WRITE, item)
                    elif not self._send(item, failures, selector):
                        continue
                    active += 1
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    for key in list(selector.get_map().values()):
                        item = key.data
                        failures[item.index] = (f"{item.index}: no echo within {timeout:.0f} s"
                                                f" (got {bytes(item.got)!r})")
                        selector.unregister(item.sock)
                    break
                for key, _ in selector.select(min(remaining, 1.0)):
                    item = key.data
                    if item.connecting:
                        err = item.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        selector.unregister(item.sock)
                        if err:
                            failures[item.index] = f"{item.index}: connect: {os.strerror(err)}"
                            active -= 1
                            continue
                        item.connecting = False
                        if not self._send(item, failures, selector):
                            active -= 1
                        continue
                    try:
                        chunk = item.sock.recv(64)
                    except BlockingIOError:
                        continue
                    except OSError as err:
                        chunk = b""
                        failures[item.index] = f"{item.index}: {err!r}"
                    item.got += chunk
                    if chunk and len(item.got) < len(item.payload):
                        continue
                    selector.unregister(item.sock)
                    active -= 1
                    if failures[item.index] is None and bytes(item.got) != item.payload:
                        failures[item.index] = (f"{item.index}: got {bytes(item.got)!r}, "
                                                f"expected {item.payload!r}")
        finally:
            selector.close()
        return failures

    @staticmethod
    def _send(item: _Pending, failures: list[str | None],
              selector: selectors.BaseSelector) -> bool:
        try:
            sent = item.sock.send(item.payload)  # a few bytes into an empty buffer: whole
        except OSError as err:
            failures[item.index] = f"{item.index}: send: {err!r}"
            return False
        if sent != len(item.payload):
            failures[item.index] = f"{item.index}: sent {sent} of {len(item.payload)} bytes"
            return False
        selector.register(item.sock, selectors.EVENT_READ, item)
        return True


class Churn(threading.Thread):
    """Open a connection every 1/rate seconds for `seconds`, echo a few bytes on it and
    close it; at most `in_flight` open at a time (the schedule slips rather than the load
    piling up if muxd falls behind). Counts what echoed and what did not."""

    def __init__(self, init_pid: int, port: int, rate: float, seconds: float,
                 in_flight: int = 200, grace: float = 20.0) -> None:
        super().__init__(daemon=True, name="churn")
        self.init_pid = init_pid
        self.port = port
        self.rate = rate
        self.total = int(rate * seconds)
        self.in_flight = in_flight
        self.grace = grace
        self.echoed = 0
        self.failures: list[str] = []
        self.elapsed = 0.0

    def run(self) -> None:
        try:
            _enter_netns(self.init_pid)  # this thread only: its sockets are the container's
            self._run()
        except Exception as err:  # noqa: BLE001 - reported by the test
            self.failures.append(f"churn: {err!r}")

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        started = time.monotonic()
        deadline = started + self.total / self.rate + self.grace
        opened = 0
        while opened < self.total or selector.get_map():
            now = time.monotonic()
            if now >= deadline:
                self.failures.append(f"{len(selector.get_map())} still open at the deadline")
                for key in list(selector.get_map().values()):
                    key.fileobj.close()  # type: ignore[union-attr]
                break
            while (opened < self.total and now >= started + opened / self.rate
                   and len(selector.get_map()) < self.in_flight):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                err = sock.connect_ex((LOOPBACK, self.port))
                opened += 1
                if err not in (0, 115):
                    self.failures.append(f"connect: {os.strerror(err)}")
                    sock.close()
                    continue
                selector.register(sock, selectors.EVENT_WRITE, [_payload(opened, 0), b""])
            due = started + opened / self.rate - time.monotonic()
            for key, _ in selector.select(max(0.0, min(due, 0.05)) if opened < self.total
                                          else 0.05):
                sock = key.fileobj
                payload, got = key.data
                assert isinstance(sock, socket.socket)
                try:
                    if key.events == selectors.EVENT_WRITE:
                        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        if err:
                            raise OSError(err, os.strerror(err))
                        sock.send(payload)
                        selector.modify(sock, selectors.EVENT_READ, key.data)
                        continue
                    chunk = sock.recv(64)
                    key.data[1] = got = got + chunk
                    if chunk and len(got) < len(payload):
                        continue
                    if got == payload:
                        self.echoed += 1
                    else:
                        self.failures.append(f"got {got!r}, expected {payload!r}")
                except OSError as err:
                    self.failures.append(repr(err))
                selector.unregister(sock)
                sock.close()
        selector.close()
        self.elapsed = time.monotonic() - started
