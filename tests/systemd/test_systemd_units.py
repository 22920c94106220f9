"""The unit files themselves: they verify, and the sandbox scores what the README says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from nspawn import Container

pytestmark = pytest.mark.systemd

SERVICE_MD = Path(__file__).resolve().parents[2] / "README.md"  # "Run it as a service"
LEVELS_OK_OR_BETTER = ("PERFECT", "SAFE", "OK")


def test_units_verify(muxd: Container) -> None:
    # --man=no: install.sh installs no manual pages for Documentation= to point at (the Debian
    # package does, and its test verifies the units with them).
    result = muxd.run(
        ["systemd-analyze", "verify", "--man=no", "/etc/systemd/system/muxd.service",
         "/etc/systemd/system/muxd.socket"],
        check=False,
    )
    assert result.returncode == 0, result.stderr
    complaints = [line for line in result.stderr.splitlines() if "muxd" in line]
    assert not complaints, complaints


def test_security_exposure_matches_service_md(muxd: Container) -> None:
    out = muxd.run(["systemd-analyze", "security", "--no-pager", "muxd.service"]).stdout
    measured = re.search(r"Overall exposure level for muxd\.service: ([\d.]+) (\w+)", out)
    assert measured, out
    score, level = measured.group(1), measured.group(2)
    assert level in LEVELS_OK_OR_BETTER, out
    stated = re.search(r"exposure level ([\d.]+) (\w+)", SERVICE_MD.read_text())
    assert stated, "packaging/the README does not state the exposure level"
    assert (score, level) == (stated.group(1), stated.group(2)), out
    # ... and names this release's systemd as one it was measured on.
    major = muxd.run(["systemctl", "--version"]).stdout.split()[1]
    stated_text = " ".join(SERVICE_MD.read_text().split())
    sentence = stated_text[stated_text.index("exposure level"):][:300]
    assert f"systemd {major} (" in sentence, f"README's score does not name systemd {major}"
