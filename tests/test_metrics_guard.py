"""``[metrics] allow``: who may scrape, validated like ``[access]``, applied
at reload; the daemon refusing and admitting by source address over real
sockets (loopback's 127.0.0.0/8 gives each client its own).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from daemon_harness import DEFAULT_TIMEOUT, free_port
from metrics_harness import read_metrics, total

from muxd.config import ConfigError, parse_config_text


def metrics_config(port: int, metrics_port: int, *, workers: int = 1, allow: str | None = None,
                   access: str = "") -> str:
    text = (f"[server]\nlisten = 127.0.0.1:{port}\nworkers = {workers}\n"
            f"[access]\n{access}"
            f"[metrics]\nlisten = 127.0.0.1:{metrics_port}\n")
    return text if allow is None else text + f"allow = {allow}\n"


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
