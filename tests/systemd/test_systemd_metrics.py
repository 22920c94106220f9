"""The metrics endpoint under the shipped, hardened unit in a booted systemd 252:
DynamicUser, ProtectProc=invisible, ProcSubset=pid (no /proc/stat), the system
call filter. The scrape comes from inside the container's network namespace."""

from __future__ import annotations

import re
import time

import pytest
from nspawn import Container, connected, echo_roundtrip, edit_ini, wait_until

pytestmark = pytest.mark.systemd

METRICS_PORT = 9707


def scrape(container: Container) -> str:
    with container.connect(METRICS_PORT) as sock:
        sock.settimeout(5)
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: muxd\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200 OK\r\n"), head
    assert "Content-Type: text/plain; version=0.0.4; charset=utf-8" in head, head
    return body


def sample(body: str, name: str, **labels: str) -> float | None:
    for line in body.splitlines():
        match = re.match(rf"^{name}(?:\{{(.*)\}})? (\S+)$", line)
        if match and all(f'{key}="{value}"' in (match.group(1) or "")
                         for key, value in labels.items()):
            return float(match.group(2))
    return None


def test_scraping_inside_the_container_with_the_hardened_unit(muxd: Container) -> None:
    edit_ini(muxd, {("metrics", "listen"): f"127.0.0.1:{METRICS_PORT}"})
    started = time.time()
    muxd.systemctl("start", "muxd")
    for _ in range(3):
        with connected(muxd) as sock:
            assert echo_roundtrip(sock, b"counted\n") == b"counted\n"
    body = wait_until(lambda: (lambda text: text if sample(
        text, "muxd_connections_closed_total", reason="eof") == 3 else None)(scrape(muxd)),
        timeout=10, what="three closed connections in the metrics")
    assert sample(body, "muxd_connections_accepted_total", listener="[::]:7") == 3
    assert sample(body, "muxd_received_bytes_total", listener="[::]:7") == 3 * len(b"counted\n")
    # The process metrics work within ProtectProc=invisible and ProcSubset=pid.
    assert sample(body, "process_open_fds") > 3
    assert sample(body, "process_max_fds") >= 1024  # raised towards LimitNOFILE=
    assert sample(body, "process_resident_memory_bytes") > 1 << 20
    assert started - 5 <= sample(body, "process_start_time_seconds") <= time.time() + 1
    assert muxd.show("muxd", "ActiveState") == "active"


def answer_from(container: Container, source: str) -> bytes:
    """One scrape from ``source``: the status line's start, b"" if closed unanswered."""
    with container.connect(METRICS_PORT, source=source) as sock:
        sock.settimeout(5)
        try:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: muxd\r\n\r\n")
            return sock.recv(12)
        except (ConnectionResetError, BrokenPipeError):
            return b""


def test_metrics_allow_and_its_reload_under_systemd(muxd: Container) -> None:
    """[metrics] allow under the shipped unit, and `systemctl reload` applying a new one."""
    edit_ini(muxd, {("metrics", "listen"): f"127.0.0.1:{METRICS_PORT}",
                    ("metrics", "allow"): "127.0.0.2"})
    muxd.systemctl("start", "muxd")
    assert [answer_from(muxd, source) for source in ("127.0.0.1", "127.0.0.2")] == \
        [b"", b"HTTP/1.1 200"]
    edit_ini(muxd, {("metrics", "allow"): "127.0.0.1/32"})
    muxd.systemctl("reload", "muxd", timeout=20)
    assert [answer_from(muxd, source) for source in ("127.0.0.1", "127.0.0.2")] == \
        [b"HTTP/1.1 200", b""]
    body = scrape(muxd)
    assert sample(body, "muxd_metrics_connections_refused_total", reason="access") == 2
    assert muxd.show("muxd", "ActiveState") == "active"
