"""``python -m bench.handover_memory``: peak memory of both processes of a hand-over while
every connection has muxd's whole buffer of echo pending (issue 18: at most the pending echo
plus a small constant, in the old and in the new process).

This process plays PID 1 as bench.restart does (bench/fakestore.py). Its client, one
selector loop here, opens ``--conns`` connections and sends on each, without reading, until
nothing moves for a second: muxd then holds ``buffer_size`` (64 KiB) of unsent echo per
connection with reading paused. Then ``--reps`` restarts (SIGURG + SIGTERM, the next muxd
started with the store, READY=1), each reading: the old process's RSS just before SIGTERM
and its peak RSS over its life (``ru_maxrss`` from wait4, so the hand-over is included),
and the new process's peak (VmHWM) once its RSS has settled after READY=1; the pending
echo it reports taking over comes from its log line. The baseline is an idle muxd's RSS at
READY=1. Afterwards the client reads everything back and checks every byte, so a
hand-over that lost echo fails the run instead of looking lean.

Needs root: it runs in a network namespace of its own (unshare(CLONE_NEWNET)), whose TCP
buffer limits (net.ipv4.tcp_wmem/tcp_rmem, per namespace) are lowered to 64 KiB so that the
kernel does not also queue megabytes per connection (loopback's send buffer grows to 4 MiB
by default: 2,000 such connections would pin ~10 GB). The host's settings are untouched.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import selectors
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import OUT_DIR
from bench.procstat import open_fd_count, rss_kib, status_kib
from bench.restart import Pid1, RestartFailed, _env, _raise_nofile, _start, restart_once, wait_held
from bench.runner import pick_cores
from bench.servers import free_port, pin_to_core

CLONE_NEWNET = 0x40000000
TCP_LIMITS = {"tcp_wmem": "4096 16384 65536", "tcp_rmem": "4096 65536 65536"}
CLIENT_BUFFER = 16384  # the client's SO_SNDBUF and SO_RCVBUF
BUFFER_SIZE = 65536  # muxd's [limits] buffer_size (its default)
PER_CONN_BUDGET = 4 << 20  # a client that can push more than this is not being paused
STALL_S = 1.0
PILE_TIMEOUT_S = 180.0
CONFIG = """\
[server]
listen = 127.0.0.1:{port}
handover = yes
[limits]
nofile = {nofile}
max_connections = {max_connections}
buffer_size = {buffer_size}
idle_timeout = 0
[logging]
level = info
"""
PENDING = re.compile(r"(\d+) (KiB|MiB|bytes) of pending echo")


def _unit(index: int) -> bytes:
    return struct.pack(">I", index) + b"echo"  # 8 bytes; a stream is this, repeated


class Pilers:
    """The client: connections that fill muxd's echo buffer and then only read at the end."""

    def __init__(self, port: int, conns: int) -> None:
        self.blocks = [memoryview(_unit(i) * (BUFFER_SIZE // 8)) for i in range(conns)]
        self.socks: list[socket.socket] = []
        self.sent = [0] * conns
        for _ in range(conns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CLIENT_BUFFER)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_BUFFER)
            sock.setblocking(False)
            err = sock.connect_ex(("127.0.0.1", port))
            if err not in (0, 115):  # EINPROGRESS
                raise RestartFailed(f"connect: {os.strerror(err)}")
            self.socks.append(sock)

    def pile(self, pump: Any) -> int:
        """Send until no connection takes a byte for STALL_S; `pump` keeps PID 1's side
        going meanwhile. Returns the bytes sent in all."""
        selector = selectors.DefaultSelector()
        for index, sock in enumerate(self.socks):
            selector.register(sock, selectors.EVENT_WRITE, index)
        last_progress = started = time.monotonic()
        try:
            while time.monotonic() - last_progress < STALL_S:
                if time.monotonic() - started > PILE_TIMEOUT_S:
                    raise RestartFailed(f"still piling after {PILE_TIMEOUT_S:.0f} s")
                for key, _ in selector.select(0.05):
                    index = key.data
                    try:
                        sent = self.socks[index].send(self.blocks[index][self.sent[index] % 8:])
                    except BlockingIOError:
                        continue
                    self.sent[index] += sent
                    last_progress = time.monotonic()
                    if self.sent[index] > PER_CONN_BUDGET:
                        raise RestartFailed(f"connection {index} took {self.sent[index]} bytes "
                                            "without muxd pausing it")
                pump()
        finally:
            selector.close()
        return sum(self.sent)

    def read_back(self, pump: Any, timeout: float = 120.0) -> None:
        """Every byte sent comes back in order, or the run fails."""
        got = [0] * len(self.socks)
        selector = selectors.DefaultSelector()
        for index, sock in enumerate(self.socks):
            selector.register(sock, selectors.EVENT_READ, index)
        deadline = time.monotonic() + timeout
        left = len(self.socks)
        try:
            while left:
                if time.monotonic() > deadline:
                    raise RestartFailed(f"{left} connections still owed echo after {timeout} s")
                for key, _ in selector.select(0.05):
                    index = key.data
                    chunk = self.socks[index].recv(32768)
                    offset = got[index] % 8
                    if not chunk or chunk != self.blocks[index][offset:offset + len(chunk)]:
                        raise RestartFailed(f"connection {index}: wrong echo or end at byte "
                                            f"{got[index]} of {self.sent[index]}")
                    got[index] += len(chunk)
                    if got[index] == self.sent[index]:
                        selector.unregister(self.socks[index])
                        left -= 1
                pump()
        finally:
            selector.close()

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


@dataclass
class Sample:
    old_before_kib: int  # the old process's RSS just before SIGTERM
    old_peak_kib: int  # its peak RSS over its whole life (ru_maxrss)
    new_peak_kib: int  # the new process's VmHWM once settled after READY=1
    pending_kib: int  # the pending echo it reports taking over
    total_s: float  # SIGTERM to READY=1


def _pending_kib(log: Path) -> int:
    found = PENDING.findall(log.read_text(errors="replace"))
    if not found:
        return 0
    value, unit = found[-1]
    return int(value) * {"bytes": 1, "KiB": 1024, "MiB": 1 << 20}[unit] // 1024


def _private_netns() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise SystemExit(f"error: unshare(CLONE_NEWNET): {os.strerror(err)} (needs root)")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    for name, value in TCP_LIMITS.items():
        Path(f"/proc/sys/net/ipv4/{name}").write_text(value)


def run(conns: int, reps: int) -> dict[str, Any]:
    _raise_nofile(2 * conns + 256)
    server_core, client_core = pick_cores()
    pin_to_core(client_core)
    samples: list[Sample] = []
    with tempfile.TemporaryDirectory(prefix="bench-handover-memory-") as scratch_dir:
        scratch = Path(scratch_dir)
        port = free_port()
        config = scratch / "muxd.ini"
        config.write_text(CONFIG.format(port=port, nofile=2 * conns + 1024,
                                        max_connections=conns + 64, buffer_size=BUFFER_SIZE))
        pid1 = Pid1(scratch, store_max=conns + 64)
        store = pid1.store
        env = _env(store)
        argv = [sys.executable, "-m", "muxd", "--config", str(config)]
        log = scratch / "muxd.log"
        client: Pilers | None = None
        current = 0
        try:
            current = _start(pid1, argv, env, server_core, log)
            idle_kib = rss_kib(current)
            baseline = open_fd_count(current)
            client = Pilers(port, conns)
            wait_held(pid1, current, baseline, conns)
            piled = client.pile(lambda: store.pump(0))
            store.drain()
            print(f"{conns:,} connections, {piled / conns / 1024:.0f} KiB sent on each "
                  f"without reading; idle muxd {idle_kib / 1024:.1f} MiB", file=sys.stderr,
                  flush=True)
            for rep in range(reps):
                before = rss_kib(current)
                old = current
                current, restart = restart_once(pid1, old, argv, env, server_core, log)
                if restart.taken_over != conns:
                    raise RestartFailed(f"took over {restart.taken_over} of {conns}")
                last = -1
                while (hwm := status_kib(current, "VmHWM")) != last:  # settled: two readings agree
                    last = hwm
                    store.run_until(lambda: False, 0.2)
                sample = Sample(before, store.peak_rss_kib[old], hwm, _pending_kib(log),
                                restart.total_s)
                samples.append(sample)
                print(f"  restart {rep + 1}: old {before / 1024:.0f} MiB before, peak "
                      f"{sample.old_peak_kib / 1024:.0f} MiB; new peak {hwm / 1024:.0f} MiB; "
                      f"pending echo {sample.pending_kib / 1024:.0f} MiB; "
                      f"{restart.total_s:.2f} s", file=sys.stderr, flush=True)
            client.read_back(lambda: store.pump(0))
        finally:
            if current and current not in store.exited:
                os.kill(current, signal.SIGTERM)
                store.run_until(lambda: current in store.exited, 10)
                if current not in store.exited:
                    os.kill(current, signal.SIGKILL)
                    store.run_until(lambda: current in store.exited, 10)
            if client is not None:
                client.close()
            store.close()
    return {
        "conns": conns,
        "buffer_size": BUFFER_SIZE,
        "idle_kib": idle_kib,
        "samples": [asdict(s) for s in samples],
        "median": {key: statistics.median(getattr(s, key) for s in samples)
                   for key in ("old_before_kib", "old_peak_kib", "new_peak_kib", "pending_kib",
                               "total_s")},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.handover_memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conns", type=int, default=2_000, help="connections (default 2,000)")
    parser.add_argument("--reps", type=int, default=3, help="restarts (default 3)")
    parser.add_argument("--out", type=Path, default=OUT_DIR / "handover_memory.json")
    args = parser.parse_args(argv)
    if args.conns < 1 or args.reps < 1:
        parser.error("--conns and --reps must be >= 1")
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    _private_netns()
    try:
        result = run(args.conns, args.reps)
    except RestartFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    m = result["median"]
    idle = result["idle_kib"]
    pending = m["pending_kib"]
    print(f"\n{args.conns:,} connections, {pending / 1024:.1f} MiB of pending echo, "
          f"{args.reps} restarts; medians, MiB (above an idle muxd's {idle / 1024:.1f} MiB, "
          f"and as a multiple of the pending echo):")
    for key, label in (("old_before_kib", "old process before SIGTERM"),
                       ("old_peak_kib", "old process, peak"),
                       ("new_peak_kib", "new process, peak")):
        above = m[key] - idle
        ratio = above / pending if pending else float("nan")
        print(f"  {label:<28} {m[key] / 1024:7.1f}  (+{above / 1024:.1f}, {ratio:.2f}x)")
    print(f"  SIGTERM to READY=1: {m['total_s']:.2f} s; every byte echoed back afterwards")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"raw: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
