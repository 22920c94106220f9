"""Reads a process's CPU time, memory and open sockets from /proc (Linux only)."""

import os
import time
from collections.abc import Callable


def rss_kib(pid: int) -> int:
    """Resident set size (VmRSS) in KiB."""
    return status_kib(pid, "VmRSS")


def status_kib(pid: int, field: str) -> int:
    """A memory figure of /proc/PID/status in KiB (VmRSS, VmHWM: the peak RSS, ...)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} for pid {pid}")


def open_fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Polls ``condition`` until it holds or ``timeout`` seconds pass; returns whether it held."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def wait_for_open_fds(pid: int, at_least: int, timeout: float) -> int:
    """Waits until the server has accepted connections up to ``at_least`` open fds.

    A client's connect() completes once the kernel finishes the handshake, before the
    server has accept()ed, so the runner watches the server's own fd table instead.
    Returns the final count (which may be short if the server refuses or is slow).
    """
    wait_until(lambda: open_fd_count(pid) >= at_least, timeout)
    return open_fd_count(pid)


def settled(read: Callable[[], int], timeout: float = 3.0, interval: float = 0.1) -> int:
    """A reading once two samples ``interval`` apart agree (e.g. RSS after accepts landed)."""
    previous = read()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(interval)
        current = read()
        if current == previous:
            return current
        previous = current
    return previous
