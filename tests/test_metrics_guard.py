"""The metrics endpoint against one abusive client, and ``[metrics] allow``.

One address holds the endpoint's places with unfinished requests (re-opening
each as muxd ends it) or churns fresh ones, from a process of its own
(slot_squatter.py), while a scraper from another address polls like
Prometheus, and a real Prometheus too: every scrape must be answered, with
one process and with workers; and which connection gives its place up when
several addresses fill them. ``[metrics] allow``: validated like
``[access]``, applied at reload, refusing and admitting by address.
Loopback's 127.0.0.0/8 gives each client its own source address.
"""

from __future__ import annotations

import json
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from daemon_harness import DEFAULT_TIMEOUT, EchoProbe, free_port, sees_connection_end, wait_until
from metrics_harness import PROMETHEUS, Prometheus, read_metrics, scrape, total

from muxd.config import ConfigError, parse_config_text

SQUATTER = Path(__file__).parent / "slot_squatter.py"
SCRAPES = 20
SCRAPE_INTERVAL = 0.5  # twice Prometheus' usual "every second": the same attack, half the time
ATTACKER = "127.0.0.2"
# The scraper connects from 127.0.0.1 (metrics_harness.scrape).
# For a new Python process to start, or to see its input close: seconds on a
# quiet machine, far more beside a competing load.
SLOW_MACHINE_TIMEOUT = 60.0


def metrics_config(port: int, metrics_port: int, *, workers: int = 1, allow: str | None = None,
                   access: str = "") -> str:
    text = (f"[server]\nlisten = 127.0.0.1:{port}\nworkers = {workers}\n"
            f"[access]\n{access}"
            f"[metrics]\nlisten = 127.0.0.1:{metrics_port}\n")
    return text if allow is None else text + f"allow = {allow}\n"


def accept_queue(port: int) -> int | None:
    """Connections waiting in the kernel's queue of the listener on ``port``
    (for a listening socket, /proc/net/tcp's rx_queue is that queue's length)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":
            return int(fields[4].split(":")[1], 16)
    return None


class Squatter:
    """slot_squatter.py from ``ATTACKER``: started, awaited in place, ended by
    closing its standard input (it then prints what it did)."""

    def __init__(self, metrics_port: int, mode: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(SQUATTER), str(metrics_port), ATTACKER, mode],
            # Not niced: on a busy machine a niced attacker gets next to no
            # CPU, and the test would then not be under attack at all.
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], SLOW_MACHINE_TIMEOUT)
        line = self.process.stdout.readline() if ready else "(nothing)"
        assert line == "ready\n", line
        # Its connections are muxd's (kept, or already ended): none waits
        # in the kernel's queue to be accepted after the first scrape.
        wait_until(lambda: accept_queue(metrics_port) == 0, what="muxd to accept the attack")

    def stop(self) -> dict:
        out, _ = self.process.communicate(timeout=SLOW_MACHINE_TIMEOUT)  # closes its stdin
        return json.loads(out.strip().splitlines()[-1])

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(DEFAULT_TIMEOUT)


def scrape_every(metrics_port: int, interval: float, count: int) -> list[str]:
    """Scrape ``count`` times, one every ``interval`` seconds from the first,
    as Prometheus does; each outcome is the status, or the error met."""
    outcomes = []
    began = time.monotonic()
    for index in range(count):
        pause = began + index * interval - time.monotonic()
        if pause > 0:
            time.sleep(pause)  # the scraper's own schedule, not a synchronisation
        try:
            status, _, body = scrape(metrics_port)
            answered = status == 200 and "muxd_build_info" in body
            outcomes.append("200" if answered else f"{status} {body[:40]!r}")
        except OSError as err:
            outcomes.append(type(err).__name__)
    return outcomes


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("mode", ["hold", "churn"])
def test_every_scrape_is_answered_while_one_address_holds_or_churns_the_places(
        start_muxd, mode: str, workers: int) -> None:
    port, metrics_port = free_port(), free_port()
    start_muxd(metrics_config(port, metrics_port, workers=workers))
    # Echo keeps flowing, byte-exact, beside the attack. Its latency claim
    # (100 ms) is test_fairness' and test_metrics' hostile-scraper test's to
    # hold; here a busy machine's scheduling must not fail the scrape count.
    probe = EchoProbe(port, max_stall=DEFAULT_TIMEOUT, max_size=4096, seed=17).start()
    wait_until(lambda: probe.verified or probe.failures, what="the probe's first echo")
    squatter = Squatter(metrics_port, mode)
    try:
        outcomes = scrape_every(metrics_port, SCRAPE_INTERVAL, SCRAPES)
    finally:
        attack = squatter.stop()
        squatter.kill()
    probe.stop()
    answered = outcomes.count("200")
    assert answered == SCRAPES, f"{answered} of {SCRAPES} scrapes answered: {outcomes}; {attack}"
    # The attack was one: it kept opening unfinished requests all along.
    assert attack["connected"] >= 8 and attack["answered"] == 0, attack
    samples = read_metrics(metrics_port)
    assert total(samples, "muxd_metrics_connections_refused_total", reason="evicted") > 0
    assert not probe.failures, probe.failures
    assert probe.verified > 0


UNFINISHED = b"GET /metrics HTTP/1.1\r\nHost: x\r\n"  # never the blank line


def _held_from(source: str, metrics_port: int) -> socket.socket:
    sock = socket.socket()
    sock.settimeout(DEFAULT_TIMEOUT)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", metrics_port))
    sock.sendall(UNFINISHED)
    return sock


def _ended(sock: socket.socket) -> bool:
    """Whether muxd has ended ``sock`` already (without waiting)."""
    sock.setblocking(False)
    try:
        return sock.recv(100) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    finally:
        sock.settimeout(DEFAULT_TIMEOUT)


def test_room_is_taken_from_whoever_holds_the_most_its_oldest_first(start_muxd) -> None:
    port, metrics_port = free_port(), free_port()
    start_muxd(metrics_config(port, metrics_port))

    def refused(reason: str) -> float:
        return total(read_metrics(metrics_port), "muxd_metrics_connections_refused_total",
                     reason=reason)

    # Each attempt must end within the connections' 3 s: one that a busy
    # machine stretched past it (a timeout freed a place) is void and redone.
    for _ in range(3):
        timeouts = refused("timeout")
        evicted = refused("evicted")
        # Two addresses fill the 8 places, 4 each (the most one may hold).
        held = {source: [_held_from(source, metrics_port) for _ in range(4)]
                for source in ("127.0.0.2", "127.0.0.3")}
        wait_until(lambda: accept_queue(metrics_port) == 0, what="muxd to accept them")
        try:
            # A scraper from a third address is answered: the place is the
            # oldest of the (tied) biggest holders', nobody else's.
            status, _, _ = scrape(metrics_port)
            first_out = [[_ended(sock) for sock in socks] for socks in held.values()]
            # An address at its 4 that connects again loses its own oldest.
            held["fifth"] = [_held_from("127.0.0.3", metrics_port)]
            oldest_ended = sees_connection_end(held["127.0.0.3"][0])
            second_out = [_ended(sock) for sock in [*held["127.0.0.3"][1:], *held["fifth"]]]
            counts = refused("evicted") - evicted, refused("timeout") - timeouts
        finally:
            for socks in held.values():
                for sock in socks:
                    sock.close()
        if counts[1]:
            continue
        assert status == 200
        assert first_out == [[True, False, False, False], [False, False, False, False]]
        assert oldest_ended and second_out == [False, False, False, False]
        assert counts == (2, 0)
        return
    raise AssertionError("every attempt outlasted the connections' timeout")


@pytest.mark.skipif(not Path(PROMETHEUS).exists(), reason="prometheus absent")
def test_a_real_prometheus_gets_every_scrape_through_twenty_seconds_of_attack(
        start_muxd, tmp_path: Path) -> None:
    """The issue's attack as reported: the places held and re-opened for 20 s
    while Prometheus scrapes every second; ``up`` must be 1 in every scrape."""
    window = 20
    port, metrics_port = free_port(), free_port()
    start_muxd(metrics_config(port, metrics_port))
    prometheus = Prometheus(tmp_path, [f"127.0.0.1:{metrics_port}"], interval="1s")
    squatter = None
    try:
        prometheus.wait_ready()
        prometheus.wait_scrape_after(0)
        squatter = Squatter(metrics_port, "hold")
        began = time.time()

        def latest_scrape() -> float:
            stamps = [float(item["value"][1])
                      for item in prometheus.query('timestamp(up{job="muxd"})')]
            return stamps[0] if stamps else 0.0

        wait_until(lambda: latest_scrape() > began + window, window + 30, interval=0.2,
                   what=f"Prometheus' scrapes over {window} s")
        attack = squatter.stop()
        at = began + window
        scrapes = prometheus.value(f'count_over_time(up{{job="muxd"}}[{window}s])', at)
        answered = prometheus.value(f'sum_over_time(up{{job="muxd"}}[{window}s])', at)
        assert scrapes >= window / 2, scrapes  # Prometheus kept its schedule, roughly
        assert answered == scrapes, f"{answered:g} of {scrapes:g} scrapes answered; {attack}"
        assert attack["connected"] >= 8 and attack["answered"] == 0, attack
    finally:
        if squatter is not None:
            squatter.kill()
        prometheus.close()


# --- [metrics] allow --------------------------------------------------------


def _request_from(source: str, metrics_port: int) -> bytes:
    """One request from ``source``: the answer's first bytes, b"" when closed
    unanswered (or reset)."""
    with socket.socket() as sock:
        sock.settimeout(DEFAULT_TIMEOUT)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", metrics_port))
        try:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            return sock.recv(12)
        except (ConnectionResetError, BrokenPipeError):
            return b""


OK = b"HTTP/1.1 200"


def test_metrics_allow_admits_only_its_members_and_follows_reloads(start_muxd) -> None:
    port, metrics_port = free_port(), free_port()
    # [access] denies 127.0.0.3 for echo; [metrics] allow, once set, alone
    # decides who may scrape.
    config = metrics_config(port, metrics_port, allow="127.0.0.1, 127.0.0.3/32",
                            access="deny = 127.0.0.3\n")
    daemon = start_muxd(config)
    assert [_request_from(f"127.0.0.{n}", metrics_port) for n in (1, 2, 3, 4)] == \
        [OK, b"", OK, b""]
    samples = read_metrics(metrics_port)
    assert total(samples, "muxd_metrics_connections_refused_total", reason="access") == 2
    # Applied to new connections at reload, as [access] is.
    daemon.write_config(config.replace("allow = 127.0.0.1, 127.0.0.3/32",
                                       "allow = 127.0.0.0/30"))
    daemon.signal(signal.SIGHUP)
    daemon.notify.wait_for("READY", "1")
    assert [_request_from(f"127.0.0.{n}", metrics_port) for n in (1, 2, 3, 4)] == \
        [OK, OK, OK, b""]


def test_metrics_allow_empty_is_everyone_access_permits(start_muxd) -> None:
    port, metrics_port = free_port(), free_port()
    start_muxd(metrics_config(port, metrics_port, access="deny = 127.0.0.3\n"))
    assert [_request_from(f"127.0.0.{n}", metrics_port) for n in (1, 2, 3)] == [OK, OK, b""]


@pytest.mark.parametrize("workers", [1, 2])
def test_metrics_allow_refuses_without_reading(start_muxd, workers: int) -> None:
    port, metrics_port = free_port(), free_port()
    start_muxd(metrics_config(port, metrics_port, workers=workers, allow="127.0.0.1"))
    assert _request_from("127.0.0.1", metrics_port) == OK
    assert _request_from("127.0.0.2", metrics_port) == b""
    samples = read_metrics(metrics_port)
    assert total(samples, "muxd_metrics_connections_refused_total", reason="access") == 1
    assert total(samples, "muxd_metrics_requests_total", code="200") == 1


@pytest.mark.parametrize(("value", "words"), [
    ("nowhere", ["'nowhere'", "IPv4 or IPv6 addresses or CIDR blocks"]),
    ("10.0.0.0/8, 10.0.0.300", ["'10.0.0.300'", "CIDR"]),
    ("127.0.0.1:9707", ["'127.0.0.1:9707'", "CIDR"]),
])
def test_a_bad_metrics_allow_is_named_precisely(value: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config_text(f"[metrics]\nallow = {value}\n", "/etc/muxd/muxd.ini")
    message = str(caught.value)
    assert message.startswith("/etc/muxd/muxd.ini: [metrics] allow = ")
    for word in words:
        assert word in message, message


def test_a_bad_metrics_allow_exits_78_naming_the_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.ini"
    path.write_text("[metrics]\nlisten = 127.0.0.1:9707\nallow = prometheus.example\n")
    for extra in ((), ("--check-config",)):
        result = subprocess.run([sys.executable, "-m", "muxd", "--config", str(path), *extra],
                                capture_output=True, text=True, timeout=20,
                                stdin=subprocess.DEVNULL)
        assert result.returncode == 78
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert f"{path}: [metrics] allow = 'prometheus.example': expected " in lines[0]
        assert "CIDR" in lines[0] and "Traceback" not in result.stderr


def test_metrics_allow_ipv4_mapped_rules_mean_ipv4() -> None:
    config = parse_config_text("[metrics]\nallow = ::ffff:127.0.0.1, 2001:db8::/32\n", "t.ini")
    assert [str(network) for network in config.metrics_allow] == ["127.0.0.1/32",
                                                                  "2001:db8::/32"]
