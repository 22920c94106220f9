"""packaging/install.sh and uninstall.sh on a real systemd host: upgrade, keep config, purge."""

from __future__ import annotations

from pathlib import Path

import pytest
from nspawn import (
    MUXD_CONFIG,
    UNIT_DIR,
    Container,
    connected,
    echo_roundtrip,
    edit_ini,
    run_packaging_script,
)

pytestmark = pytest.mark.systemd

SHIPPED_CONFIG = Path(__file__).resolve().parents[2] / "config" / "muxd.ini"


def test_reinstall_upgrades_and_keeps_edited_config(muxd: Container) -> None:
    edit_ini(muxd, {("limits", "idle_timeout"): "123"})
    edited = muxd.path(MUXD_CONFIG).read_text()
    output = run_packaging_script(muxd, "install.sh")
    assert "kept the existing" in output, output
    assert muxd.path(MUXD_CONFIG).read_text() == edited
    assert muxd.path(f"{MUXD_CONFIG}.dist").read_text() == SHIPPED_CONFIG.read_text()
    muxd.systemctl("start", "muxd")
    with connected(muxd) as sock:
        assert echo_roundtrip(sock, b"upgraded\n") == b"upgraded\n"


def test_uninstall_keeps_config_unless_purged(muxd: Container) -> None:
    muxd.systemctl("start", "muxd.socket")
    try:
        run_packaging_script(muxd, "uninstall.sh")
        assert muxd.show("muxd.socket", "ActiveState") == "inactive"
        assert muxd.show("muxd.service", "LoadState") == "not-found"
        assert not muxd.path("/opt/muxd").exists()
        assert not muxd.path(f"{UNIT_DIR}/muxd.service").exists()
        assert muxd.path(MUXD_CONFIG).exists()

        run_packaging_script(muxd, "uninstall.sh", "--purge")
        assert not muxd.path("/etc/muxd").exists()
    finally:
        # Later tests need muxd installed again, as the session fixture left it.
        run_packaging_script(muxd, "install.sh")
    assert muxd.path(MUXD_CONFIG).read_text() == SHIPPED_CONFIG.read_text()
