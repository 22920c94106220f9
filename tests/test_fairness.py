"""Fairness: while one source floods, everyone else is still served within a bounded time.

One test, run on every backend against each kind of flood (issue 9, items 1 and 12):
UDP datagrams as fast as one process can send them, a storm of clients that connect
and reset at once, and one TCP client that sends (and reads) as fast as it can. While
the flood is on:

* an established client's echo round trip stays under 100 ms, every time;
* a new client is accepted and served (its first echo under 100 ms);
* a signal is handled within 100 ms (SIGUSR1 -> its counters line in the log);
* the watchdog timer keeps its schedule: WATCHDOG=1 pings on the notify socket (bound
  by the test, as systemd does) keep coming every half WATCHDOG_USEC, never more than
  100 ms late.

The flooder is a separate process (no GIL shared with the measuring side) that sends as
fast as it can until the test closes its stdin, once the measurements are done: the flood
outlasts them however slowly a busy machine starts or schedules the flooders (a flood that
ended first, by a crash or by its count, fails the test). It stops by itself after a
bounded count and time all the same.

What is held to 100 ms is the loop's share of each delay: the time the daemon and the
measuring thread spent runnable but waiting for a CPU (their runqueue wait in
/proc/.../schedstat) is taken off what the clock shows. On a shared 2-core machine a
busy neighbour can delay any process by that much, and that is the scheduler's doing,
not the loop's; a loop stuck serving the flood is running, not waiting, and shows in
full. Failure messages quote both.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from daemon_harness import (
    connect,
    connect_slow_reader,
    counters_lines,
    echo_once,
    free_port,
    read_counters,
    recv_until_eof,
    server_config,
    socket_activation,
    wait_until,
)

BOUND = 0.100  # seconds: the promise under test
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Linux's value; not always exported
WATCHDOG_USEC = 200_000  # pings every 100 ms
FLOOD_SECONDS = 60.0  # the flooder's own time bound, should the test never stop it
MEASURE_SECONDS = 2.0  # measurements happen inside the flood, after it is going

# Every flooder ends at EOF on its stdin (the test's "stop"), checked between bursts.
STOP = """
import select, sys
def stopped():
    return bool(select.select([sys.stdin], [], [], 0)[0])
"""
FLOODERS = {
    "udp": STOP + textwrap.dedent("""
        import socket, sys, time
        port, seconds, count = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        target, payload = ("127.0.0.1", port), b"x" * 32
        deadline = time.monotonic() + seconds
        sent = 0
        while sent < count and time.monotonic() < deadline and not stopped():
            for _ in range(256):
                try:
                    sock.sendto(payload, target)
                except (BlockingIOError, ConnectionRefusedError):
                    pass
            sent += 256
            if sent == 256 * 64:
                print("flooding", flush=True)
    """),
    "connect-reset": STOP + textwrap.dedent("""
        import socket, struct, sys, time
        port, seconds, count = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
        linger = struct.pack("ii", 1, 0)
        deadline = time.monotonic() + seconds
        done = 0
        while done < count and time.monotonic() < deadline and not (done % 16 == 0 and stopped()):
            sock = socket.socket()
            sock.settimeout(0.5)
            try:
                sock.connect(("127.0.0.1", port))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            except OSError:
                pass
            sock.close()
            done += 1
            if done == 500:
                print("flooding", flush=True)
    """),
    "tcp": STOP + textwrap.dedent("""
        import socket, sys, threading, time
        port, seconds, count = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
        sock = socket.create_connection(("127.0.0.1", port))
        deadline = time.monotonic() + seconds
        def drain():
            while sock.recv(1 << 20):
                pass
        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        chunk = b"y" * (1 << 20)
        sent = 0
        sock.settimeout(1.0)
        try:
            while sent < count and time.monotonic() < deadline and not stopped():
                sock.sendall(chunk)
                sent += len(chunk)
                if sent == 32 * len(chunk):
                    print("flooding", flush=True)
        except OSError:
            pass
        sock.shutdown(socket.SHUT_WR)
        reader.join(5)
    """),
}
COUNTS = {"udp": 50_000_000, "connect-reset": 200_000, "tcp": 64 << 30}
PROCESSES = {"udp": 4, "connect-reset": 1, "tcp": 1}  # one source, as many senders as it takes


class RunqueueWait:
    """Nanoseconds a thread has spent runnable but waiting for a CPU (schedstat field 2)."""

    def __init__(self, pid: int, tid: int | None = None) -> None:
        self.path = f"/proc/{pid}/schedstat" if tid is None else f"/proc/{pid}/task/{tid}/schedstat"

    def __call__(self) -> float:
        try:
            with open(self.path) as stats:
                return int(stats.read().split()[1]) / 1e9
        except (OSError, IndexError, ValueError):
            return 0.0


class Delays:
    """Delays measured by the clock, and the same less the runqueue wait of the
    daemon and of the measuring thread over each one."""

    def __init__(self, daemon_wait: RunqueueWait, own_wait: RunqueueWait) -> None:
        self._waits = (daemon_wait, own_wait)
        self.raw: list[float] = []
        self.loop: list[float] = []

    def mark(self) -> tuple[float, float]:
        return time.monotonic(), sum(wait() for wait in self._waits)

    def since(self, mark: tuple[float, float]) -> None:
        now, waited = self.mark()
        self.raw.append(now - mark[0])
        self.loop.append(now - mark[0] - (waited - mark[1]))

    def check(self, what: str, bound: float) -> None:
        assert self.loop, f"no {what} measured"
        assert max(self.loop) < bound, (
            f"{what}: worst {max(self.loop) * 1000:.1f} ms after runqueue waits "
            f"({max(self.raw) * 1000:.1f} ms by the clock) of {len(self.loop)}, "
            f"bound {bound * 1000:.0f} ms")


class WatchdogRecorder:
    """Records the WATCHDOG=1 pings on the daemon's notify socket, as Delays between them."""

    def __init__(self, sock: socket.socket, daemon_pid: int) -> None:
        self.sock = sock
        self.daemon_pid = daemon_pid
        self.pings: list[tuple[float, float]] = []  # (clock, runqueue waits so far)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        delays = Delays(RunqueueWait(self.daemon_pid),
                        RunqueueWait(os.getpid(), threading.get_native_id()))
        self.sock.settimeout(0.05)
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            if b"WATCHDOG=1" in data.split(b"\n"):
                self.pings.append(delays.mark())

    def gaps(self, began: float, ended: float) -> Delays:
        """The gaps between pings over [began, ended], with the last ping before it and
        the first after it, so a silence spanning the whole flood shows as one gap."""
        first = max([i for i, (t, _) in enumerate(self.pings) if t < began], default=0)
        last = min([i for i, (t, _) in enumerate(self.pings) if t > ended],
                   default=len(self.pings) - 1)
        pings = self.pings[first:last + 1]
        gaps = Delays(RunqueueWait(0), RunqueueWait(0))
        for (t0, w0), (t1, w1) in zip(pings, pings[1:], strict=False):
            gaps.raw.append(t1 - t0)
            gaps.loop.append(t1 - t0 - (w1 - w0))
        return gaps

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


@pytest.mark.parametrize("flood", sorted(FLOODERS))
def test_one_flooding_source_leaves_clients_signals_and_timers_served(
        start_muxd, backend, flood) -> None:
    port, udp_port = free_port(), free_port(socket.AF_INET)
    # UDP with no rate limit: each datagram is echoed, the most work a datagram can be.
    config = server_config(port, backend=backend).replace(
        "[limits]", f"udp = 127.0.0.1:{udp_port}\n[limits]\nudp_rate = 0\nudp_total_rate = 0")
    daemon = start_muxd(config, env={"WATCHDOG_USEC": str(WATCHDOG_USEC)})
    assert daemon.notify is not None
    watchdog = WatchdogRecorder(daemon.notify.sock, daemon.pid)
    established = connect(port, timeout=5)
    assert echo_once(established, b"before") == b"before"
    target = udp_port if flood == "udp" else port
    flooders = [subprocess.Popen(
        [sys.executable, "-c", FLOODERS[flood], str(target), str(FLOOD_SECONDS),
         str(COUNTS[flood])], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(PROCESSES[flood])]
    waits = (RunqueueWait(daemon.pid), RunqueueWait(os.getpid(), threading.get_native_id()))
    round_trips, new_clients, signals = Delays(*waits), Delays(*waits), Delays(*waits)
    try:
        for flooder in flooders:
            assert flooder.stdout is not None
            assert flooder.stdout.readline().strip() == "flooding", "a flooder did not start"
        flood_began = time.monotonic()
        established.settimeout(1.0)
        round_number = 0
        while time.monotonic() - flood_began < MEASURE_SECONDS:
            round_number += 1
            message = b"probe %d" % round_number
            mark = round_trips.mark()
            assert echo_once(established, message) == message
            round_trips.since(mark)

            if round_number % 4 == 0:
                mark = new_clients.mark()
                with connect(port, timeout=1.0) as newcomer:
                    assert echo_once(newcomer, b"hello") == b"hello"
                new_clients.since(mark)

            if round_number % 4 == 2:
                before = daemon.log.count("counters: ")
                mark = signals.mark()
                daemon.signal(signal.SIGUSR1)
                while daemon.log.count("counters: ") == before:
                    if time.monotonic() - mark[0] > 1.0:
                        break
                    time.sleep(0.002)
                signals.since(mark)
            time.sleep(0.02)
        flood_ended = time.monotonic()
        flood_still_on = all(flooder.poll() is None for flooder in flooders)
    finally:
        for flooder in flooders:
            assert flooder.stdin is not None
            flooder.stdin.close()  # stop
        for flooder in flooders:
            flooder.wait(FLOOD_SECONDS + 10)
        watchdog.stop()
        established.close()
    assert flood_still_on, "the flood ended before the measurements did: not a flood"
    round_trips.check("echo round trip", BOUND)
    new_clients.check("a new client's connect and first echo", BOUND)
    signals.check("SIGUSR1 to its log line", BOUND)
    gaps = watchdog.gaps(flood_began, flood_ended)
    interval = WATCHDOG_USEC / 2e6
    assert len(gaps.loop) >= MEASURE_SECONDS / interval / 2, f"only {len(gaps.loop)} pings"
    gaps.check("watchdog ping gap", interval + BOUND)
    assert daemon.process.poll() is None, daemon.log


@pytest.mark.skipif(os.geteuid() != 0, reason="SO_RCVBUFFORCE (a deep UDP queue) needs root")
def test_a_deep_udp_queue_is_served_a_bounded_share_per_turn(start_muxd, tmp_path) -> None:
    """50,000 datagrams wait in one UDP socket's queue when the loop wakes (issue 9, item 1).

    The socket is handed over by socket activation with a 64 MiB receive buffer, filled
    while the daemon is stopped, and then the daemon continues: a flood that needs no
    flooder to outrun the daemon, so it does not depend on how the CPUs are shared.
    Each turn may take its share of datagrams (a cap per event, and one extra turn),
    but between turns a TCP client's echo and a signal are served: neither may wait
    for the queue to be emptied."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    endpoint = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    endpoint.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
    endpoint.bind(("127.0.0.1", 0))
    port, udp_port = listener.getsockname()[1], endpoint.getsockname()[1]

    config = tmp_path / "activated.ini"
    config.write_text(server_config(free_port()).replace(
        "[limits]", "[limits]\nudp_rate = 0\nudp_total_rate = 0"))
    daemon = start_muxd(None, **socket_activation(config, listener, endpoint))
    listener.close()
    endpoint.close()
    client = connect(port, timeout=5)
    assert echo_once(client, b"before") == b"before"
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.connect(("127.0.0.1", udp_port))
    daemon.signal(signal.SIGSTOP)
    try:
        for _ in range(50_000):
            sender.send(b"z" * 32)
    finally:
        daemon.signal(signal.SIGCONT)
    waits = (RunqueueWait(daemon.pid), RunqueueWait(os.getpid(), threading.get_native_id()))
    round_trips, signals = Delays(*waits), Delays(*waits)
    client.settimeout(5)
    for round_number in range(10):
        message = b"probe %d" % round_number
        mark = round_trips.mark()
        assert echo_once(client, message) == message
        round_trips.since(mark)
        before = daemon.log.count("counters: ")
        mark = signals.mark()
        daemon.signal(signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while daemon.log.count("counters: ") == before and time.monotonic() < deadline:
            time.sleep(0.002)
        signals.since(mark)
    sender.close()
    client.close()
    round_trips.check("echo round trip", BOUND)
    signals.check("SIGUSR1 to its log line", BOUND)



def receive_queue(local_port: int, remote_port: int) -> int:
    """Bytes waiting unread in the loopback TCP socket local_port -> remote_port (the
    kernel's rx_queue in /proc/net/tcp), or -1 if there is no such socket."""
    wanted = (f"0100007F:{local_port:04X}", f"0100007F:{remote_port:04X}")
    with open("/proc/net/tcp") as table:
        for line in table:
            fields = line.split()
            if (fields[1], fields[2]) == wanted:
                return int(fields[4].split(":")[1], 16)
    return -1


@pytest.mark.skipif(os.geteuid() != 0, reason="SO_RCVBUFFORCE (a deep TCP queue) needs root")
def test_a_flood_while_stopping_gets_a_bounded_share_per_turn(start_muxd, backend,
                                                              tmp_path) -> None:
    """A client owed echo (so the drain waits for it) floods a stopping daemon: about
    100 MiB wait in its connection's receive queue when the loop wakes. The listener is
    handed over by socket activation with a receive buffer that big (accepted connections
    inherit it), and the queue is filled while the daemon is stopped (SIGSTOP), so the
    flood needs no flooder to outrun the daemon. While stopping, the input is dropped a
    share per turn, as it is read while serving, so a SIGUSR1 sent with the queue full is
    handled before the queue is dropped (main dropped it all first: the turn is bounded
    only by 256 MiB of reads), and within 100 ms; the client still gets its echo, then
    its FIN."""
    deep = 384 << 20
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, deep)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]

    config = tmp_path / "activated.ini"
    config.write_text(server_config(free_port(), backend=backend, shutdown_timeout=60))
    daemon = start_muxd(None, **socket_activation(config, listener))
    listener.close()
    flood = connect_slow_reader(port)
    flood_port = flood.getsockname()[1]
    payload = os.urandom(1 << 20)
    for _ in range(16):  # more than the daemon's send buffer: the rest of the echo is owed
        flood.sendall(payload)
    wait_until(lambda: (lambda c: c["bytes_in"] - c["bytes_out"] >= 65536)(
        read_counters(daemon)), what="echo owed to the flooder")
    assert daemon.notify is not None
    daemon.signal(signal.SIGTERM)
    daemon.notify.wait_for("STOPPING", "1")
    waits = (RunqueueWait(daemon.pid), RunqueueWait(os.getpid(), threading.get_native_id()))
    signals = Delays(*waits)
    flood.setblocking(False)
    chunk = memoryview(payload)
    total_sent = 16 * len(payload)
    # Sent but still in the flooder's own send queue: neither dropped nor queued at muxd.
    unsent_bound = flood.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    queues: list[tuple[int, int]] = []  # (queued when the loop woke, left at the signal)
    for _ in range(3):
        daemon.signal(signal.SIGSTOP)
        try:
            sent = 0
            while sent < deep:
                try:
                    sent += flood.send(chunk)
                except BlockingIOError:
                    break
            total_sent += sent
            queued = receive_queue(port, flood_port)
            before = len(counters_lines(daemon))
            daemon.signal(signal.SIGUSR1)
        finally:
            daemon.signal(signal.SIGCONT)
        mark = signals.mark()
        line = wait_until(lambda n=before: (lambda lines: lines[n] if len(lines) > n else None)(
            counters_lines(daemon)), timeout=5, interval=0.001, what="the SIGUSR1 line")
        # The daemon's own account at the moment it took the signal, so that the test
        # being descheduled cannot change the finding: every byte sent was read while
        # serving, dropped, or is still queued (or unsent, at most the send buffer).
        left = total_sent - line["bytes_in"] - line["dropped"]
        queues.append((queued, left))
        signals.since(mark)
    flood.setblocking(True)
    flood.settimeout(10)
    echoed = recv_until_eof(flood)  # what was owed, then FIN (the input is drained)
    assert queues[0][0] >= 32 << 20, f"not a deep queue: {queues}"
    assert all(left - unsent_bound >= queued // 2 for queued, left in queues), (
        f"the signal waited for the flood's queue to be dropped: {queues}")
    signals.check("SIGUSR1 to its log line, a deep queue to drop", BOUND)
    assert len(echoed) >= 65536, f"only {len(echoed)} bytes echoed in the drain"
    assert echoed == (payload * 16)[:len(echoed)], "wrong echo"
    assert daemon.wait() == 0
