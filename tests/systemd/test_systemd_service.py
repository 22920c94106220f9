"""muxd.service under a real systemd: readiness, status, journal, stop, bad config."""

from __future__ import annotations

import select
import socket
import time

import pytest
from nspawn import (
    MUXD_CONFIG,
    Container,
    add_drop_in,
    connected,
    echo_roundtrip,
    edit_ini,
    process_uid,
)

pytestmark = pytest.mark.systemd

# systemd allocates DynamicUser= ids from this range (systemd.exec(5)).
DYNAMIC_UID_RANGE = range(61184, 65520)
ECHO_INSIDE = """
import socket, sys
host = sys.argv[1]
with socket.create_connection((host, 7), timeout=5) as s:
    s.sendall(b"ping from inside\\n")
    data = b""
    while len(data) < 17:
        chunk = s.recv(64)
        if not chunk:
            break
        data += chunk
    sys.stdout.write(data.decode())
"""


def test_start_returns_after_ready_and_echoes_as_dynamic_user(muxd: Container) -> None:
    muxd.systemctl("start", "muxd")
    # No waiting here on purpose: Type=notify means start returned only after READY=1.
    assert muxd.show("muxd", "ActiveState") == "active"
    with connected(muxd) as sock:
        assert echo_roundtrip(sock, b"hello muxd\n") == b"hello muxd\n"

    assert process_uid(muxd, muxd.main_pid()) in DYNAMIC_UID_RANGE
    status = muxd.systemctl("status", "--no-pager", "muxd", check=False)
    assert "Status: \"serving" in status and "connections" in status, status

    # Dual-stack default listener, reached by the container's own python over both families.
    for host in ("127.0.0.1", "::1"):
        out = muxd.run(["python3", "-c", ECHO_INSIDE, host]).stdout
        assert out == "ping from inside\n", host


def test_journal_has_startup_lines_at_info_and_warnings_apart(muxd: Container) -> None:
    muxd.systemctl("start", "muxd")
    this_run = f"_SYSTEMD_INVOCATION_ID={muxd.show('muxd', 'InvocationID')}"
    muxd.wait_for_journal(this_run, match=lambda e: "listening on" in e["MESSAGE"])
    muxd.wait_for_journal(this_run, match=lambda e: "RLIMIT_NOFILE" in e["MESSAGE"])
    entries = muxd.journal(this_run)
    messages = {entry["MESSAGE"]: int(entry["PRIORITY"]) for entry in entries}
    # The <N> prefix was understood by journald (so stripped), and start-up is info, not more.
    assert all(not m.startswith("<") for m in messages), messages
    assert all(prio == 6 for m, prio in messages.items() if "listening on" in m), messages
    assert 6 in {prio for m, prio in messages.items() if "RLIMIT_NOFILE" in m}, messages
    warnings = muxd.journal("-u", "muxd", "-p", "warning", this_run)
    assert all(int(entry["PRIORITY"]) <= 4 for entry in warnings), warnings
    assert not [e for e in warnings if "listening on" in e["MESSAGE"]], warnings


def test_nofile_above_hard_limit_is_a_warning(muxd: Container) -> None:
    # LimitNOFILE=65536 caps the hard limit at 65536 (or less, if the host allows less).
    edit_ini(muxd, {("limits", "nofile"): "1048576"})
    mark = muxd.journal_mark()
    muxd.systemctl("start", "muxd")
    assert muxd.show("muxd", "ActiveState") == "active"
    warnings = muxd.wait_for_journal("-u", "muxd", "-p", "warning", after=mark)
    assert all(int(entry["PRIORITY"]) <= 4 for entry in warnings), warnings
    # The unit sets LimitNOFILE=: the warning says so instead of advising it.
    messages = [entry["MESSAGE"] for entry in warnings]
    assert any("[limits] nofile asks for 1048576 open files" in m and
               "the unit's LimitNOFILE= set it" in m for m in messages), messages
    assert not any("sets no LimitNOFILE" in m for m in messages), messages
    with connected(muxd) as sock:
        assert echo_roundtrip(sock, b"still serving\n") == b"still serving\n"


def test_sigusr1_logs_counters_to_the_journal(muxd: Container) -> None:
    muxd.systemctl("start", "muxd")
    this_run = f"_SYSTEMD_INVOCATION_ID={muxd.show('muxd', 'InvocationID')}"
    with connected(muxd) as sock:
        assert echo_roundtrip(sock, b"count me\n") == b"count me\n"
    # What the README tells operators to run.
    muxd.systemctl("kill", "--kill-who=main", "--signal=SIGUSR1", "muxd")
    muxd.wait_for_journal(
        this_run, match=lambda e: "counters" in e["MESSAGE"] and "1 accepted" in e["MESSAGE"]
    )


def test_stop_closes_connections_and_succeeds(muxd: Container) -> None:
    muxd.systemctl("start", "muxd")
    with connected(muxd) as sock:
        assert echo_roundtrip(sock, b"before stop\n") == b"before stop\n"
        muxd.systemctl("stop", "muxd")
        sock.settimeout(15)
        assert sock.recv(1) == b"", "client did not see EOF after systemctl stop"
    assert muxd.show("muxd", "Result") == "success"
    assert muxd.show("muxd", "ExecMainStatus") == "0"
    assert muxd.show("muxd", "ActiveState") == "inactive"


def fill_until_stalled(sock: socket.socket, limit: float = 10) -> int:
    """Send without reading until every buffer between us and muxd is full; return bytes sent."""
    sock.setblocking(False)
    chunk = b"x" * 65536
    sent = 0
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            sent += sock.send(chunk)
        except BlockingIOError:
            # muxd stops reading once its echo buffer is full; half a second without room
            # to write means that has happened.
            if not select.select([], [sock], [], 0.5)[1]:
                return sent
    raise AssertionError(f"still sending after {limit}s ({sent} bytes): muxd never pushed back")


def test_long_drain_extends_the_stop_timeout(muxd: Container) -> None:
    # Drain (4 s) longer than systemd's stop timeout (2 s): only EXTEND_TIMEOUT_USEC saves it.
    add_drop_in(muxd, "muxd.service", "short-stop", "[Service]\nTimeoutStopSec=2s\n")
    edit_ini(muxd, {("limits", "shutdown_timeout"): "4"})
    muxd.systemctl("start", "muxd")
    mark = muxd.journal_mark()
    with connected(muxd) as stuck:
        fill_until_stalled(stuck)
        stopping = time.monotonic()
        muxd.systemctl("stop", "muxd", timeout=30)
        took = time.monotonic() - stopping
    assert muxd.show("muxd", "Result") == "success"
    assert took >= 3, f"stop took {took:.1f}s: the drain did not wait for the stuck client"
    muxd.wait_for_journal(
        "-u", "muxd", "-p", "warning", after=mark,
        match=lambda e: "shutdown_timeout" in e["MESSAGE"],
    )


def start_with_bad_config(muxd: Container) -> int:
    """Start muxd with an invalid idle_timeout; return the journal mark from before."""
    edit_ini(muxd, {("limits", "idle_timeout"): "not-a-number"})
    mark = muxd.journal_mark()
    started = muxd.run(["systemctl", "start", "muxd"], check=False)
    assert started.returncode != 0
    return mark


def names_the_bad_key(entry: dict[str, str]) -> bool:
    return MUXD_CONFIG in entry["MESSAGE"] and "idle_timeout" in entry["MESSAGE"]


def test_bad_config_fails_once_without_restart_loop(muxd: Container) -> None:
    mark = start_with_bad_config(muxd)
    assert muxd.show("muxd", "ActiveState") == "failed"
    assert muxd.show("muxd", "ExecMainStatus") == "78"
    # A restart would come RestartSec (100 ms) after the failure; watch well past that.
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        assert muxd.show("muxd", "NRestarts") == "0"
        assert muxd.show("muxd", "ActiveState") == "failed"
        time.sleep(0.2)
    assert "status=78/CONFIG" in muxd.systemctl("status", "--no-pager", "muxd", check=False)
    muxd.wait_for_journal("-u", "muxd", after=mark, match=names_the_bad_key)


def test_bad_config_at_start_is_logged_as_an_error(muxd: Container) -> None:
    mark = start_with_bad_config(muxd)
    # Once the unit failed, its stderr stream is closed, so the line is already in the journal.
    muxd.wait_for_journal("-u", "muxd", after=mark, match=names_the_bad_key)
    errors = muxd.journal("-u", "muxd", "-p", "err", after=mark)
    assert [e for e in errors if names_the_bad_key(e)], errors
