"""muxd.socket: systemd holds port 7, starts muxd on demand, and nothing is lost on restart."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest
from nspawn import Container, add_drop_in, connected, echo_roundtrip

pytestmark = pytest.mark.systemd

ATTEMPTS = 200
ATTEMPT_SPACING = 0.02  # 200 attempts over ~4 s, so the restart lands in the middle
RESTART_AFTER = 50
SERVICE_MD = Path(__file__).resolve().parents[2] / "README.md"  # "Run it as a service"


def test_first_connection_starts_service_on_inherited_socket(muxd: Container) -> None:
    muxd.systemctl("start", "muxd.socket")
    assert muxd.show("muxd.service", "ActiveState") == "inactive"
    with connected(muxd) as sock:
        assert echo_roundtrip(sock, b"wake up\n") == b"wake up\n"
    assert muxd.show("muxd.service", "ActiveState") == "active"
    pid = muxd.main_pid()
    environ = muxd.path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert b"LISTEN_FDS=1" in environ
    # The listener came from systemd (fd 3), dual-stack as the socket unit asks.
    with connected(muxd, host="::1") as sock:
        assert echo_roundtrip(sock, b"over v6\n") == b"over v6\n"


def test_restart_under_socket_activation_refuses_nothing(muxd: Container) -> None:
    muxd.systemctl("start", "muxd.socket")
    with connected(muxd) as sock:
        assert echo_roundtrip(sock, b"warm up\n") == b"warm up\n"
    old_pid = muxd.main_pid()

    failures: list[str] = []
    restart_done = threading.Event()

    def restart() -> None:
        try:
            muxd.systemctl("restart", "muxd.service", timeout=30)
        finally:
            restart_done.set()

    restarter = threading.Thread(target=restart, daemon=True)
    during_restart = 0
    started = time.monotonic()
    for attempt in range(ATTEMPTS):
        if attempt == RESTART_AFTER:
            restarter.start()
        if restarter.is_alive():
            during_restart += 1
        payload = f"attempt {attempt}\n".encode()
        try:
            with connected(muxd) as sock:
                got = echo_roundtrip(sock, payload)
            if got != payload:
                failures.append(f"{attempt}: sent {payload!r}, got {got!r}")
        except OSError as error:
            failures.append(f"{attempt}: {error!r}")
        pause = started + (attempt + 1) * ATTEMPT_SPACING - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    elapsed = time.monotonic() - started

    restarter.join(timeout=30)
    assert restart_done.is_set()
    assert not failures, failures
    assert elapsed <= 20
    # Otherwise the loop proved nothing about the restart window.
    assert during_restart >= 1
    assert muxd.main_pid() not in (0, old_pid)
    assert muxd.show("muxd.service", "ActiveState") == "active"


def socket_only_drop_in() -> str:
    """The drop-in the README tells operators to use with socket activation, verbatim."""
    block = re.search(
        r"```ini\n# /etc/systemd/system/muxd\.service\.d/override\.conf\n(.*?)```",
        SERVICE_MD.read_text(),
        re.S,
    )
    assert block, "the README lost the socket-activation drop-in"
    return block.group(1)


def test_socket_activation_works_without_any_capability(muxd: Container) -> None:
    add_drop_in(muxd, "muxd.service", "override", socket_only_drop_in())
    muxd.systemctl("start", "muxd.socket")
    with connected(muxd) as sock:
        assert echo_roundtrip(sock, b"no caps\n") == b"no caps\n"
    status = muxd.path(f"/proc/{muxd.main_pid()}/status").read_text()
    for field in ("CapEff", "CapPrm", "CapAmb", "CapBnd"):
        assert re.search(rf"^{field}:\s+0+$", status, re.M), status

    # On its own, that service cannot bind port 7: it must fail once, not loop.
    muxd.systemctl("stop", "muxd.socket", "muxd.service")
    assert muxd.run(["systemctl", "start", "muxd.service"], check=False).returncode != 0
    assert muxd.show("muxd.service", "ExecMainStatus") == "77"
    assert muxd.show("muxd.service", "NRestarts") == "0"
