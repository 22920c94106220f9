"""systemctl reload: SIGHUP re-reads the config without dropping anyone."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from nspawn import (
    MUXD_CONFIG,
    Container,
    add_drop_in,
    connected,
    echo_roundtrip,
    edit_ini,
    wait_until,
)

pytestmark = pytest.mark.systemd

BROKEN = "[limits]\nidle_timeout = forever\n"
README = Path(__file__).resolve().parents[2] / "README.md"


def readme_failed_reload() -> tuple[list[str], list[str]]:
    """README's failed reload ("Configure and reload"): what `systemctl reload` prints, and
    the lines it quotes from `systemctl status` (after its `...`)."""
    block = re.search(r"\n    \$ sudo systemctl reload muxd\n(.*?)\n    \$ systemctl status muxd\n"
                      r"    \.\.\.\n(.*?)\n\n", README.read_text(), re.S)
    assert block, "README's failed reload example is gone"
    return ([line.strip() for line in block[1].splitlines()],
            [line.strip() for line in block[2].splitlines()])


def assert_readme_quotes(reload_stderr: str, status: str) -> None:
    """Every line README quotes is there, word for word (its PIDs as wildcards)."""
    said, shown = readme_failed_reload()
    for line in said:
        assert line in reload_stderr.splitlines(), f"README: {line!r}\nreal:\n{reload_stderr}"
    for line in shown:
        pattern = re.escape(line).replace(r"muxd\[166\]", r"muxd\[[0-9]+\]")
        assert re.search(rf" {pattern}$", status, re.M), f"README: {line!r}\nreal:\n{status}"


def reload_and_wait(container: Container) -> None:
    container.systemctl("reload", "muxd", timeout=20)
    # RELOADING=1 ... READY=1 puts the unit in "reloading" until the daemon is done.
    wait_until(
        lambda: container.show("muxd", "ActiveState") == "active", timeout=10, what="reload done"
    )


def test_reload_keeps_open_connection_and_applies_idle_timeout(muxd: Container) -> None:
    muxd.systemctl("start", "muxd")
    pid = muxd.main_pid()
    with connected(muxd) as kept:
        edit_ini(muxd, {("limits", "idle_timeout"): "1"})
        assert echo_roundtrip(kept, b"before reload\n") == b"before reload\n"
        reload_and_wait(muxd)
        assert echo_roundtrip(kept, b"after reload\n") == b"after reload\n"
    assert muxd.main_pid() == pid

    with connected(muxd) as idle:
        assert echo_roundtrip(idle, b"then silence\n") == b"then silence\n"
        opened = time.monotonic()
        idle.settimeout(10)
        assert idle.recv(1) == b"", "the server did not close the idle connection"
        # Closed by the new 1 s timeout, not the old 300 s one (nor something else at once).
        assert 0.5 <= time.monotonic() - opened <= 6


def test_broken_config_on_sighup_is_logged_and_old_one_kept(muxd: Container) -> None:
    """A SIGHUP that bypasses the unit's check (kill -HUP) finds muxd refusing the file."""
    muxd.systemctl("start", "muxd")
    pid = muxd.main_pid()
    mark = muxd.journal_mark()
    muxd.write_file(MUXD_CONFIG, BROKEN)
    muxd.run(["kill", "-HUP", str(pid)])
    muxd.wait_for_journal("-u", "muxd", "-p", "warning", after=mark,
                          match=lambda e: "keeping the running configuration" in e["MESSAGE"])
    assert muxd.show("muxd", "ActiveState") == "active"
    assert muxd.main_pid() == pid
    with connected(muxd) as sock:
        assert echo_roundtrip(sock, b"old config still serves\n") == b"old config still serves\n"


def assert_failed_reload_says_why(container: Container, pid: int) -> tuple[str, str]:
    result = container.run(["systemctl", "reload", "muxd"], check=False, timeout=20)
    assert result.returncode != 0, "systemctl reload accepted a broken config"
    assert "Job for muxd.service failed" in result.stderr, result.stderr
    # Where systemctl points the operator: the check's own line, naming file, section and key.
    status = container.systemctl("status", "--no-pager", "-n", "20", "muxd", check=False)
    assert f"configuration error: {MUXD_CONFIG}: [limits] idle_timeout = 'forever'" in status, \
        status
    assert "Reload failed" in status, status
    assert container.show("muxd", "ActiveState") == "active"
    assert container.main_pid() == pid
    with connected(container) as sock:
        assert echo_roundtrip(sock, b"still serving\n") == b"still serving\n"
    return result.stderr, status


def test_reload_of_a_broken_config_fails_and_says_why(muxd: Container) -> None:
    muxd.systemctl("start", "muxd")
    pid = muxd.main_pid()
    # A good reload first, as an operator's day goes: its ExecReload= lines stay in
    # `systemctl status` (README says which they are).
    edit_ini(muxd, {("limits", "idle_timeout"): "60"})
    reload_and_wait(muxd)
    mark = muxd.journal_mark()
    muxd.write_file(MUXD_CONFIG, BROKEN)
    stderr, status = assert_failed_reload_says_why(muxd, pid)
    assert_readme_quotes(stderr, status)
    # The failed check, and the previous reload's signal (this one never got that far), as
    # README says: the SUCCESS line is the older process.
    check = re.search(r"Process: ([0-9]+) ExecReload=\S+ --config \S+ --check-config "
                      r"\(code=exited, status=78\)", status)
    previous = re.search(r"Process: ([0-9]+) ExecReload=/bin/kill -HUP \$MAINPID "
                         r"\(code=exited, status=0/SUCCESS\)", status)
    assert check and previous and int(previous[1]) < int(check[1]), status
    assert "ExecReload=/bin/kill -HUP $MAINPID (code=exited, status=0/SUCCESS)" in \
        README.read_text()
    # ExecReload's check came first: the daemon was never asked to load the file.
    main = [e for e in muxd.journal("-u", "muxd", after=mark) if e.get("_PID") == str(pid)]
    assert not main, [e["MESSAGE"] for e in main]


NOTIFY_RELOAD = """\
[Service]
Type=notify-reload
ExecReload=
ExecReload=/opt/muxd/bin/muxd --config /etc/muxd/muxd.ini --check-config
"""


def test_notify_reload_drop_in_reloads_and_reports_a_broken_config(muxd: Container) -> None:
    """systemd >= 253: systemd sends SIGHUP itself and waits for RELOADING=1 ... READY=1.
    It signals before it runs ExecReload, so the check no longer guards the daemon (muxd
    refuses the file on its own), but it still fails the reload job and says why."""
    major = int(muxd.run(["systemctl", "--version"]).stdout.split()[1])
    if major < 253:
        pytest.skip(f"Type=notify-reload needs systemd 253 or later, this is {major}")
    add_drop_in(muxd, "muxd.service", "notify-reload", NOTIFY_RELOAD)
    muxd.systemctl("start", "muxd")
    assert muxd.show("muxd", "Type") == "notify-reload"
    pid = muxd.main_pid()
    with connected(muxd) as kept:
        edit_ini(muxd, {("limits", "idle_timeout"): "1"})
        mark = muxd.journal_mark()
        muxd.systemctl("reload", "muxd", timeout=20)
        muxd.wait_for_journal("-u", "muxd", after=mark,
                              match=lambda e: "reloaded" in e["MESSAGE"])
        assert echo_roundtrip(kept, b"after reload\n") == b"after reload\n"
    assert muxd.main_pid() == pid

    muxd.write_file(MUXD_CONFIG, BROKEN)
    assert_failed_reload_says_why(muxd, pid)
