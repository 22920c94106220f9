"""systemctl reload: SIGHUP re-reads the config without dropping anyone."""

from __future__ import annotations

import time

import pytest
from nspawn import MUXD_CONFIG, Container, connected, echo_roundtrip, edit_ini, wait_until

pytestmark = pytest.mark.systemd


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


def test_broken_config_on_reload_is_logged_and_old_one_kept(muxd: Container) -> None:
    muxd.systemctl("start", "muxd")
    pid = muxd.main_pid()
    mark = muxd.journal_mark()
    muxd.write_file(MUXD_CONFIG, "[limits]\nidle_timeout = forever\n[bogus\n")
    reload_and_wait(muxd)
    muxd.wait_for_journal("-u", "muxd", "-p", "warning", after=mark)
    assert muxd.show("muxd", "ActiveState") == "active"
    assert muxd.main_pid() == pid
    with connected(muxd) as sock:
        assert echo_roundtrip(sock, b"old config still serves\n") == b"old config still serves\n"
