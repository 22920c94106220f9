"""WatchdogSec=: a hung event loop is killed by systemd and restarted."""

from __future__ import annotations

import pytest
from nspawn import Container, add_drop_in, connected, echo_roundtrip, wait_until

pytestmark = pytest.mark.systemd

HANG_ON_SIGUSR2 = """\
[Service]
Environment=MUXD_TEST_HOOKS=hang-on-sigusr2
WatchdogSec=2s
"""


def test_hung_daemon_is_killed_by_watchdog_and_restarted(muxd: Container) -> None:
    add_drop_in(muxd, "muxd.service", "test-watchdog", HANG_ON_SIGUSR2)
    muxd.systemctl("start", "muxd")
    hung_pid = muxd.main_pid()
    mark = muxd.journal_mark()
    # Pings at half of WATCHDOG_USEC keep it alive well past one period before the hang.
    muxd.systemctl("kill", "--kill-who=main", "--signal=SIGUSR2", "muxd")

    def restarted() -> bool:
        pid = muxd.main_pid()
        return pid not in (0, hung_pid) and muxd.show("muxd", "ActiveState") == "active"

    wait_until(restarted, timeout=20, interval=0.2, what="watchdog kill and restart")
    assert int(muxd.show("muxd", "NRestarts")) >= 1
    muxd.wait_for_journal(
        "-u", "muxd", after=mark,
        match=lambda e: "watchdog timeout" in e["MESSAGE"].lower(),
    )
    with connected(muxd) as sock:
        assert echo_roundtrip(sock, b"back again\n") == b"back again\n"


def test_watchdog_pings_keep_a_healthy_daemon_alive(muxd: Container) -> None:
    add_drop_in(muxd, "muxd.service", "test-watchdog", HANG_ON_SIGUSR2)
    muxd.systemctl("start", "muxd")
    pid = muxd.main_pid()
    # Three watchdog periods without a hang: the same process must still be there.
    with pytest.raises(TimeoutError):
        wait_until(lambda: muxd.main_pid() != pid, timeout=6, interval=0.5)
    assert muxd.show("muxd", "NRestarts") == "0"
