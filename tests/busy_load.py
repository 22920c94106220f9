"""A bounded competing load, to run the suite beside it as on a busy host (issue 20).

    python3 tests/busy_load.py --connections 9000 --seconds 900      # idle loopback connections
    python3 tests/busy_load.py --burn 2 --seconds 900                 # both cores busy
    python3 tests/busy_load.py --connections 9000 --burn 2 --seconds 600

It owns nothing but its own sockets and processes: ``--connections N`` holds N idle
loopback TCP connections (2N sockets, both ends in this process, no byte ever sent),
as any busy server host has; ``--burn K`` runs K processes that spin on the CPU at the
default priority. Everything stops by itself after ``--seconds`` (the burners check the
clock themselves and also die with this process), or at SIGTERM/SIGINT. It prints
``ready`` on stdout once the load is in place, so a runner can wait for that line.
Nothing here changes a sysctl or touches another process.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import resource
import signal
import socket
import sys
import time

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def burn(count: int, until: float) -> list[int]:
    """Fork ``count`` processes that spin until ``until`` (monotonic) and then exit."""
    pids = []
    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            _die_with_parent()
            spins = 0
            while True:
                spins += 1
                if spins % 100_000 == 0 and time.monotonic() >= until:
                    os._exit(0)
        pids.append(pid)
    return pids


def hold_connections(count: int) -> list[socket.socket]:
    """``count`` established, idle loopback connections (both ends kept open)."""
    wanted = 2 * count + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            sys.exit(f"busy_load: {count} connections need {wanted} descriptors; "
                     f"the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    address = listener.getsockname()
    held: list[socket.socket] = [listener]
    # In batches below the backlog: connect a batch, then accept it.
    for start in range(0, count, 512):
        batch = min(512, count - start)
        for _ in range(batch):
            held.append(socket.create_connection(address))
        for _ in range(batch):
            held.append(listener.accept()[0])
    return held


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=0,
                        help="idle loopback TCP connections to hold (default 0)")
    parser.add_argument("--burn", type=int, default=0,
                        help="processes spinning on the CPU (default 0)")
    parser.add_argument("--seconds", type=float, required=True,
                        help="stop after this many seconds (at most 3600)")
    args = parser.parse_args(argv)
    if not 0 < args.seconds <= 3600:
        parser.error("--seconds must be in (0, 3600]")
    if not 0 <= args.burn <= 64 or not 0 <= args.connections <= 100_000:
        parser.error("--burn at most 64, --connections at most 100000")
    until = time.monotonic() + args.seconds
    stop = {"now": False}

    def on_signal(signum: int, frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    burners = burn(args.burn, until)
    try:
        held = hold_connections(args.connections)
        print(f"ready: {args.connections} idle connections ({len(held) - 1} sockets), "
              f"{args.burn} burners, for {args.seconds:.0f} s", flush=True)
        while not stop["now"] and time.monotonic() < until:
            time.sleep(min(0.2, max(0.0, until - time.monotonic())))
    finally:
        for pid in burners:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
    print("busy_load: done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
