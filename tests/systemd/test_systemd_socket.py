"""muxd.socket: systemd holds port 7, starts muxd on demand, and nothing is lost on restart."""

from __future__ import annotations

import re
import shlex
import threading
import time
from pathlib import Path

import pytest
from nspawn import Container, add_drop_in, connected, echo_roundtrip, wait_until

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
    assert_on_the_socket_without_capabilities(muxd)

    # Started on its own, that service starts its socket first and runs on it: it never
    # binds port 7 itself (which it could not: exit 77).
    muxd.systemctl("stop", "muxd.socket")
    assert muxd.show("muxd.service", "ActiveState") == "inactive"  # stopped with its socket
    muxd.systemctl("start", "muxd.service")
    assert muxd.show("muxd.socket", "ActiveState") == "active"
    assert_on_the_socket_without_capabilities(muxd)
    with connected(muxd) as sock:
        assert echo_roundtrip(sock, b"still no caps\n") == b"still no caps\n"


def assert_on_the_socket_without_capabilities(container: Container) -> None:
    pid = container.main_pid()
    status = container.path(f"/proc/{pid}/status").read_text()
    for field in ("CapEff", "CapPrm", "CapAmb", "CapBnd"):
        assert re.search(rf"^{field}:\s+0+$", status, re.M), status
    environ = container.path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    names = [v for v in environ if v.startswith(b"LISTEN_FDNAMES=")]
    assert names and b"muxd.socket" in names[0], environ


def readme_commands(marker: str) -> list[list[str]]:
    """The commands of the first indented block after ``marker`` in the README, as run."""
    text = SERVICE_MD.read_text()
    assert marker in text, f"the README lost {marker!r}"
    block = re.search(r"\n\n((?:    sudo .*\n)+)", text[text.index(marker):])
    assert block, f"no commands after {marker!r}"
    return [shlex.split(line.strip())[1:] for line in block.group(1).splitlines()]


def restarted(container: Container, old_pid: int) -> bool:
    return (container.main_pid() not in (0, old_pid)
            and container.show("muxd.service", "ActiveState") == "active")


def test_restarting_the_socket_restarts_muxd_on_the_new_socket(muxd: Container) -> None:
    """`systemctl restart muxd.socket` (issue 19): with the README's drop-in, muxd is
    restarted with its socket (hand-over: clients kept) instead of the socket failing
    ("already active, refusing") and the next restart of muxd binding [::]:7 itself;
    and when the socket is dead anyway, the README's recovery brings both back."""
    add_drop_in(muxd, "muxd.service", "override", socket_only_drop_in())
    muxd.systemctl("start", "muxd.socket")
    held = [muxd.connect(7) for _ in range(3)]
    for sock in held:
        assert echo_roundtrip(sock, b"before\n") == b"before\n"
    for round_ in range(2):
        old_pid = muxd.main_pid()
        mark = muxd.journal_mark()
        result = muxd.run(["systemctl", "restart", "muxd.socket"], check=False, timeout=60)
        assert result.returncode == 0, (round_, result.stderr)
        assert muxd.show("muxd.socket", "ActiveState") == "active"
        wait_until(lambda p=old_pid: restarted(muxd, p), timeout=30,
                   what="muxd restarted with its socket")
        assert_on_the_socket_without_capabilities(muxd)
        for sock in held:
            payload = f"after socket restart {round_}\n".encode()
            assert echo_roundtrip(sock, payload) == payload
        with connected(muxd) as fresh:
            assert echo_roundtrip(fresh, b"new\n") == b"new\n"
        this_run = f"_SYSTEMD_INVOCATION_ID={muxd.show('muxd', 'InvocationID')}"
        took = muxd.wait_for_journal(this_run, after=mark,
                                     match=lambda e: "took over" in e["MESSAGE"])
        assert "took over 3 connections" in took[-1]["MESSAGE"], took[-1]["MESSAGE"]

    # A restart of muxd alone stays on the socket.
    old_pid = muxd.main_pid()
    muxd.systemctl("restart", "muxd")
    wait_until(lambda: restarted(muxd, old_pid), timeout=30, what="muxd restarted")
    assert_on_the_socket_without_capabilities(muxd)
    for sock in held:
        assert echo_roundtrip(sock, b"after restart\n") == b"after restart\n"

    # Restarted often enough, the socket hits its start limit and fails; so does muxd
    # (its Requires=), which ends the held connections. The README's recovery then
    # starts both again, muxd on the socket.
    for _ in range(8):
        if muxd.run(["systemctl", "restart", "muxd.socket"], check=False).returncode:
            break
    assert muxd.show("muxd.socket", "ActiveState") == "failed"
    assert muxd.show("muxd.service", "ActiveState") in ("inactive", "failed")
    for command in readme_commands("recover with"):
        muxd.run(command)
    assert muxd.show("muxd.socket", "ActiveState") == "active"
    assert muxd.show("muxd.service", "ActiveState") == "active"
    assert_on_the_socket_without_capabilities(muxd)
    with connected(muxd) as fresh:
        assert echo_roundtrip(fresh, b"recovered\n") == b"recovered\n"
    for sock in held:
        sock.close()


def test_back_from_socket_mode_to_muxd_binding_the_port(muxd: Container) -> None:
    """Issue 19: the README's steps from mode B back to mode A, as written."""
    add_drop_in(muxd, "muxd.service", "override", socket_only_drop_in())
    try:
        muxd.systemctl("enable", "--now", "muxd.socket")
        held = muxd.connect(7)
        assert echo_roundtrip(held, b"in mode B\n") == b"in mode B\n"
        assert_on_the_socket_without_capabilities(muxd)

        for command in readme_commands("**Back from B to A.**"):
            muxd.run(command)
        held.settimeout(10)
        assert held.recv(100) == b""  # the graceful stop: the end, not a reset
        held.close()

        assert muxd.show("muxd.socket", "ActiveState") == "inactive"
        assert muxd.show("muxd.socket", "UnitFileState") == "disabled"
        assert muxd.show("muxd.service", "ActiveState") == "active"
        assert muxd.show("muxd.service", "UnitFileState") == "enabled"
        assert "muxd.socket" not in muxd.show("muxd.service", "Requires")
        pid = muxd.main_pid()
        environ = muxd.path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert not [v for v in environ if v.startswith((b"LISTEN_", b"MUXD_SOCKET"))], environ
        status = muxd.path(f"/proc/{pid}/status").read_text()
        assert re.search(r"^CapEff:\s+0*400$", status, re.M), status  # CAP_NET_BIND_SERVICE
        for host in ("127.0.0.1", "::1"):
            with connected(muxd, host=host) as sock:
                assert echo_roundtrip(sock, b"in mode A\n") == b"in mode A\n"
    finally:
        muxd.systemctl("disable", "muxd.socket", "muxd.service", check=False)
