"""HAProxy, from Debian's package, in front of two muxd: the shipped example
``packaging/haproxy.cfg`` itself, with only its host-specific lines rewritten.

It proves: echo works through HAProxy in TCP mode; the health check really
echoes (muxd logs its bytes coming back); leastconn spreads held-open
connections evenly over both muxd; when one muxd stops, the health check marks
it DOWN within the ~0.5-1.5 s the example promises, and from then on every new
connection is echoed by the other one; started again, it is UP after two good
checks and takes its share of connections again.
"""

from __future__ import annotations

import csv
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from daemon_harness import (
    DEFAULT_TIMEOUT,
    Muxd,
    connect,
    echo_once,
    free_port,
    server_config,
    wait_until,
)

HAPROXY = Path("/usr/sbin/haproxy")
EXAMPLE = Path(__file__).resolve().parent.parent / "packaging" / "haproxy.cfg"

pytestmark = pytest.mark.skipif(
    not HAPROXY.exists(),
    reason="/usr/sbin/haproxy is absent (apt-get install haproxy; .ci/run installs it)",
)

# What the example's health check sends; muxd logs it coming back.
HEALTH_CHECK_LINE = b"muxd-health-check\n"


def haproxy_test_config(frontend_port: int, muxd_ports: list[int], stats_path: Path) -> str:
    """packaging/haproxy.cfg with its host-specific lines pointed at this test."""
    text = EXAMPLE.read_text()
    rewrites = [
        # HAProxy's log (including "Server muxd/muxd2 is DOWN") into its output
        # file, with timestamps.
        ("    log /dev/log local0 info\n", "    log stderr format iso local0 info\n"),
        # No chroot or privilege drop for a test process (it may not be root).
        ("    chroot /var/lib/haproxy\n", ""),
        ("    user haproxy\n", ""),
        ("    group haproxy\n", ""),
        ("    stats socket /run/haproxy/admin.sock mode 660 level admin\n",
         f"    stats socket {stats_path} mode 600 level admin\n"),
        # A test process may not be allowed to raise RLIMIT_NOFILE to ~100000.
        ("    maxconn 50000\n", "    maxconn 1000\n"),
        ("    bind [::]:7 v4v6\n", f"    bind 127.0.0.1:{frontend_port}\n"),
        ("    server muxd1 192.0.2.11:7\n", f"    server muxd1 127.0.0.1:{muxd_ports[0]}\n"),
        ("    server muxd2 192.0.2.12:7\n", f"    server muxd2 127.0.0.1:{muxd_ports[1]}\n"),
    ]
    for old, new in rewrites:
        assert text.count(old) == 1, (
            f"{EXAMPLE} no longer has exactly one line {old.strip()!r}; "
            "update the rewrites in tests/test_haproxy.py with it"
        )
        text = text.replace(old, new)
    return text


class HAProxy:
    """One haproxy in the foreground (-db), its output in a file, its runtime API on a socket."""

    def __init__(self, workdir: Path, config_text: str, stats_path: Path) -> None:
        self.config_path = workdir / "haproxy.cfg"
        self.config_path.write_text(config_text)
        self.stats_path = stats_path
        self.log_path = workdir / "haproxy.out"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen(
            [str(HAPROXY), "-db", "-f", str(self.config_path)],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            cwd=workdir,
        )
        self.pid = self.process.pid

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(DEFAULT_TIMEOUT)
            sock.connect(str(self.stats_path))
            sock.sendall(line.encode() + b"\n")
            reply = bytearray()
            while chunk := sock.recv(65536):
                reply += chunk
        return reply.decode()

    def servers(self) -> dict[str, dict[str, str]]:
        """`show stat` rows of backend muxd's servers, by server name."""
        lines = self.command("show stat").lstrip("# ").splitlines()
        return {row["svname"]: row for row in csv.DictReader(lines)
                if row["pxname"] == "muxd" and row["svname"] not in ("FRONTEND", "BACKEND")}

    def wait_ready(self) -> None:
        def answers() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"haproxy exited {self.process.returncode}:\n{self.log}")
            try:
                return bool(self.servers())
            except OSError:
                return False
        wait_until(answers, what="haproxy's stats socket")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(DEFAULT_TIMEOUT)
        self._log.close()


@pytest.fixture
def start_haproxy(tmp_path: Path) -> Iterator[Callable[[list[int]], tuple[HAProxy, int]]]:
    """Start haproxy on the example config in front of the given muxd ports; it is
    killed (by PID) when the test ends, pass or fail."""
    started: list[HAProxy] = []

    def start(muxd_ports: list[int]) -> tuple[HAProxy, int]:
        workdir = tmp_path / "haproxy"
        workdir.mkdir()
        frontend_port = free_port()
        stats_path = workdir / "stats.sock"
        proxy = HAProxy(workdir, haproxy_test_config(frontend_port, muxd_ports, stats_path),
                        stats_path)
        started.append(proxy)
        proxy.wait_ready()
        return proxy, frontend_port

    yield start
    for proxy in started:
        proxy.close()


def distinct_free_ports(count: int) -> list[int]:
    ports: list[int] = []
    for _ in range(100):
        port = free_port()
        if port not in ports:
            ports.append(port)
        if len(ports) == count:
            return ports
    raise AssertionError("could not find distinct free ports")


def echoes(port: int, payload: bytes) -> bool:
    """One new connection through the proxy: True if ``payload`` came back whole."""
    try:
        with connect(port, timeout=5.0) as sock:
            return echo_once(sock, payload) == payload
    except OSError:
        return False


def echoed_connections(daemon: Muxd, payload: bytes) -> int:
    """Connections muxd logged as closed after echoing exactly ``payload``'s length."""
    size = len(payload)
    return len(re.findall(rf"disconnect \S+ \(\w+\): {size} bytes in, {size} echoed",
                          daemon.log))


def test_haproxy_example_spreads_echo_and_routes_around_a_stopped_muxd(
        start_muxd: Callable[..., Muxd],
        start_haproxy: Callable[[list[int]], tuple[HAProxy, int]]) -> None:
    ports = distinct_free_ports(2)
    muxd1, muxd2 = (start_muxd(server_config(port) + "[logging]\nconnections = yes\n")
                    for port in ports)
    proxy, front = start_haproxy(ports)
    # Payloads of distinct lengths, so muxd's disconnect lines tell them apart
    # from each other and from the health checks.
    held_payload = b"held open through haproxy\n"
    window_payload = b"while muxd2 is stopping, before DOWN\n"
    after_payload = b"after muxd2 is marked DOWN by the check\n"
    assert len({len(HEALTH_CHECK_LINE), len(held_payload), len(window_payload),
                len(after_payload)}) == 4

    # Both servers pass the example's echo health check (L7OK: the expected
    # string came back), and muxd saw each check's line and echoed it.
    wait_until(lambda: all(s["status"] == "UP" and s["check_status"] == "L7OK"
                           for s in proxy.servers().values()),
               what="both muxd UP with a passing echo check")
    for daemon in (muxd1, muxd2):
        wait_until(lambda d=daemon: echoed_connections(d, HEALTH_CHECK_LINE),
                   what="muxd logging a health check's echoed line")

    # leastconn over connections held open: 10 clients end up 5 and 5.
    held = []
    try:
        for _ in range(10):
            sock = connect(front)
            held.append(sock)
            assert echo_once(sock, held_payload) == held_payload
        assert sorted(int(s["scur"]) for s in proxy.servers().values()) == [5, 5]
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: echoed_connections(muxd1, held_payload)
               + echoed_connections(muxd2, held_payload) == 10,
               what="muxd logging the 10 held connections closed")
    assert [echoed_connections(muxd1, held_payload),
            echoed_connections(muxd2, held_payload)] == [5, 5]

    # Stop muxd2 and keep connecting until the health check marks it DOWN. A
    # thread watches the stats socket, so the DOWN time is not skewed by a
    # connection that HAProxy is holding for a retry.
    marked_down = threading.Event()
    down_after: list[float] = []

    def watch() -> None:
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and proxy.process.poll() is None:
            if proxy.servers()["muxd2"]["status"] == "DOWN":
                down_after.append(time.monotonic() - stopped_at)
                marked_down.set()
                return
            time.sleep(0.01)  # the poll interval, not synchronisation

    stopped_at = time.monotonic()
    muxd2.signal(signal.SIGTERM)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    attempts = failures = 0
    slowest = 0.0
    while not marked_down.is_set() and watcher.is_alive():
        began = time.monotonic()
        attempts += 1
        failures += not echoes(front, window_payload)
        slowest = max(slowest, time.monotonic() - began)
    watcher.join(DEFAULT_TIMEOUT)
    assert marked_down.is_set(), f"muxd2 never marked DOWN:\n{proxy.log}"
    assert muxd2.wait() == 0
    print(f"muxd2 marked DOWN {down_after[0]:.2f}s after SIGTERM; "
          f"{failures} of {attempts} connections failed meanwhile "
          f"(slowest {slowest:.2f}s); "
          f"{proxy.servers()['muxd2']['wredis']} redispatched from muxd2")
    # inter 1s, fastinter 500ms, fall 2: a refusing server is down within ~1.5 s.
    assert down_after[0] < 3.0, proxy.log
    # retries 2 + option redispatch 1: a refused connection is retried on
    # muxd1, so clients do not see the window at all.
    assert failures == 0, f"{failures} of {attempts} failed before DOWN:\n{proxy.log}"
    wait_until(lambda: "muxd/muxd2 is DOWN" in proxy.log, what="haproxy logging the DOWN")
    # ... and the window was real: connections did go to the stopped muxd2 and
    # were redispatched to muxd1.
    assert int(proxy.servers()["muxd2"]["wredis"]) > 0, proxy.command("show stat")

    # After the DOWN mark: every one of 50 new connections is echoed, by muxd1.
    results = [echoes(front, after_payload) for _ in range(50)]
    assert results.count(False) == 0, f"{results.count(False)} of 50 failed:\n{proxy.log}"
    wait_until(lambda: echoed_connections(muxd1, after_payload) == 50,
               what="muxd1 logging the 50 connections made after the DOWN mark")
    assert echoed_connections(muxd2, after_payload) == 0
    servers = proxy.servers()
    assert (servers["muxd1"]["status"], servers["muxd2"]["status"]) == ("UP", "DOWN")

    # A muxd started again on muxd2's address is UP after two good checks
    # (downinter 2s, then fastinter 500ms, rise 2) and takes connections again.
    restarted_at = time.monotonic()
    muxd2 = start_muxd(server_config(ports[1]) + "[logging]\nconnections = yes\n")
    wait_until(lambda: proxy.servers()["muxd2"]["status"] == "UP", timeout=6.0,
               what="the restarted muxd2 marked UP")
    print(f"restarted muxd2 marked UP {time.monotonic() - restarted_at:.2f}s after it started")
    held = []
    try:
        for _ in range(4):
            sock = connect(front)
            held.append(sock)
            assert echo_once(sock, held_payload) == held_payload
        assert [int(s["scur"]) for s in proxy.servers().values()] == [2, 2]
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: echoed_connections(muxd2, held_payload) == 2,
               what="the restarted muxd2 logging its 2 connections closed")
