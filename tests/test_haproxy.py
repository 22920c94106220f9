"""HAProxy, from Debian's package, in front of two muxd: the shipped example
``packaging/haproxy.cfg`` itself, with only its host-specific lines rewritten.

It proves: echo works through HAProxy in TCP mode; the health check really
echoes (muxd logs its bytes coming back); leastconn spreads held-open
connections evenly over both muxd; when one muxd stops, the health check marks
it DOWN within the ~0.5-1.5 s the example promises, and from then on every new
connection is echoed by the other one; started again, it is UP after two good
checks and takes its share of connections again.

With the example's servers switched to ``send-proxy`` / ``send-proxy-v2`` and
``check-send-proxy`` in front of a muxd with ``proxy_protocol = yes``, it also
proves that clients from distinct loopback addresses are limited and judged
each by its own address, not the balancer's, that the health check (which
then sends a PROXY header too) keeps the server UP, and that echo stays
byte-exact.
"""

from __future__ import annotations

import csv
import os
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
    read_counters,
    server_config,
    unprovoked_errors,
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
def start_haproxy(tmp_path: Path) -> Iterator[Callable[..., tuple[HAProxy, int]]]:
    """Start haproxy on the example config in front of the given muxd ports (with
    ``server_options`` added to its servers' defaults); it is killed (by PID) when
    the test ends, pass or fail."""
    started: list[HAProxy] = []

    def start(muxd_ports: list[int], server_options: str = "") -> tuple[HAProxy, int]:
        workdir = tmp_path / "haproxy"
        workdir.mkdir()
        frontend_port = free_port()
        stats_path = workdir / "stats.sock"
        config = haproxy_test_config(frontend_port, muxd_ports, stats_path)
        if server_options:
            config = with_server_options(config, server_options)
        proxy = HAProxy(workdir, config, stats_path)
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


# --- PROXY protocol: muxd behind HAProxy sees each client -------------------------

DEFAULT_SERVER = "    default-server check "


def with_server_options(config: str, options: str) -> str:
    """The example's ``default-server`` line with ``options`` appended."""
    lines = [line for line in config.splitlines() if line.startswith(DEFAULT_SERVER)]
    assert len(lines) == 1, f"{EXAMPLE} no longer has one {DEFAULT_SERVER.strip()!r} line"
    return config.replace(lines[0], f"{lines[0]} {options}")


def from_source(port: int, source: str, payload: bytes) -> tuple[str, socket.socket]:
    """Connect to ``port`` from loopback address ``source`` and echo ``payload``:
    ("echo", the socket, kept open) if it came back whole, ("closed", closed socket)
    if the connection was ended instead."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(DEFAULT_TIMEOUT)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    try:
        if echo_once(sock, payload) == payload:
            return "echo", sock
    except ConnectionResetError:
        pass
    sock.close()
    return "closed", sock


@pytest.mark.parametrize("send_proxy", ["send-proxy", "send-proxy-v2"])
def test_behind_haproxy_with_proxy_protocol_each_client_is_seen(
        start_muxd: Callable[..., Muxd],
        start_haproxy: Callable[..., tuple[HAProxy, int]], send_proxy: str) -> None:
    port = free_port()
    daemon = start_muxd(server_config(port, max_connections_per_ip=2).replace(
        "[limits]", "proxy_protocol = yes\nproxy_from = 127.0.0.1\n[limits]")
        + "[access]\ndeny = 127.0.0.9\n[logging]\nconnections = yes\n")
    # Both of the example's server lines on the one muxd, so every connection
    # counts against one daemon's per-client limits whichever server leastconn picks.
    proxy, front = start_haproxy([port, port], f"{send_proxy} check-send-proxy")
    wait_until(lambda: all(s["status"] == "UP" and s["check_status"] == "L7OK"
                           for s in proxy.servers().values()),
               what="both servers UP with a passing echo check sent with a PROXY header")

    held = []
    try:
        # Echo through the balancer is byte-exact (and the header is not in it).
        outcome, sock = from_source(front, "127.0.0.2", os.urandom(200_000))
        assert outcome == "echo"
        held.append(sock)
        # Per client: each of three clients may hold 2, though all 6 come from
        # the one balancer address; a third from the same client is refused.
        for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
            while len([s for s in held if s.getsockname()[0] == source]) < 2:
                outcome, sock = from_source(front, source, b"held\n")
                assert outcome == "echo", f"{source} refused below its limit:\n{daemon.log}"
                held.append(sock)
            assert from_source(front, source, b"one too many\n")[0] == "closed"
        daemon.wait_log("max_connections_per_ip (2) reached for 127.0.0.2")
        assert "max_connections_per_ip (2) reached for 127.0.0.1" not in daemon.log
        # [access] judges the client through the balancer.
        assert from_source(front, "127.0.0.9", b"denied\n")[0] == "closed"
        daemon.wait_log("refused a connection: 127.0.0.9 is not allowed by [access]")
        for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
            assert f"connect {source}:" in daemon.log
        counters = read_counters(daemon)
        assert counters["open"] == 6 and counters["access"] == 1, counters
        assert all(echo_once(sock, b"still") == b"still" for sock in held)
    finally:
        for sock in held:
            sock.close()
    # The health checks went on passing throughout: still UP, never marked DOWN.
    servers = proxy.servers()
    assert all(s["status"] == "UP" for s in servers.values()), servers
    assert "is DOWN" not in proxy.log, proxy.log
    assert unprovoked_errors(daemon.log) == [], daemon.log
