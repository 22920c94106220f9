"""packaging/build-deb.sh builds a given version (--version) without touching the tree, and
says how when muxd/__init__.py and the Debian changelog disagree.

The package it builds is installed and upgraded on a booted bookworm and trixie by
tests/systemd/test_systemd_deb.py (whose newer package is a --version build); here the
script runs on the host, with Debian's tools, and the .deb is read with dpkg-deb.
Skipped where those tools are absent (e.g. on another release's Python, see
tests/systemd/suite_on_release.py).
"""

from __future__ import annotations

import gzip
import io
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from muxd import __version__

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "packaging" / "build-deb.sh"
TOOLS = ("dpkg-buildpackage", "dpkg-parsechangelog", "dh", "scdoc", "lintian", "dpkg-deb")

pytestmark = pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in TOOLS),
    reason="Debian's packaging tools are not installed (see packaging/build-deb.sh)")


def copy_tree(dest: Path) -> Path:
    """The project as build-deb.sh sees it, in a place a test may change."""
    return Path(shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(
        ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__",
        ".pytest_cache", ".ruff_cache", ".hypothesis")))


def build(tree: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(tree / "packaging" / "build-deb.sh"), *args],
                          capture_output=True, text=True, timeout=600)


def member(deb: Path, name: str) -> bytes:
    data = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True,
                          check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        extracted = archive.extractfile(name)
        assert extracted is not None, name
        return extracted.read()


def snapshot(tree: Path) -> dict[str, bytes]:
    return {str(path.relative_to(tree)): path.read_bytes()
            for path in sorted(tree.rglob("*")) if path.is_file()}


def test_version_builds_that_version_and_leaves_the_tree_alone(tmp_path: Path) -> None:
    tree = copy_tree(tmp_path / "src")
    before = snapshot(tree)
    newer = f"{__version__}+local1"
    result = build(tree, "--version", newer, str(tmp_path / "out"))  # lintian included
    assert result.returncode == 0, result.stdout + result.stderr
    deb = tmp_path / "out" / f"muxd_{newer}_all.deb"
    assert deb.is_file(), result.stdout
    fields = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True,
                            text=True, check=True).stdout
    assert fields.strip() == newer
    # What `muxd --version` prints, and the changelog apt and dpkg show, agree with it.
    init = member(deb, "./usr/lib/python3/dist-packages/muxd/__init__.py").decode()
    assert f'__version__ = "{newer}"' in init
    changelog = gzip.decompress(member(deb, "./usr/share/doc/muxd/changelog.gz")).decode()
    entries = re.findall(r"^muxd \(([^)]+)\) unstable; urgency=medium$", changelog, re.M)
    assert entries[:2] == [newer, __version__], changelog[:400]
    assert snapshot(tree) == before, "build-deb.sh --version changed the tree"
    # dpkg orders it after the version it upgrades.
    subprocess.run(["dpkg", "--compare-versions", newer, "gt", __version__], check=True)


def test_a_bumped_version_without_changelog_entry_says_how_to_build_it(tmp_path: Path) -> None:
    tree = copy_tree(tmp_path / "src")
    init = tree / "muxd" / "__init__.py"
    init.write_text(init.read_text().replace(f'"{__version__}"', '"9.9.9"'))
    result = build(tree, str(tmp_path / "out"))
    assert result.returncode != 0
    assert (f"muxd/__init__.py says 9.9.9 but packaging/debian/changelog says {__version__}: "
            "add a changelog entry for 9.9.9 (dch -v 9.9.9 -c packaging/debian/changelog, "
            "from devscripts), or build with --version 9.9.9") in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("version", "why"), [
    ("0.0.1", f"is older than packaging/debian/changelog's newest entry, {__version__}"),
    (f"{__version__}-1", "expected digits, letters, '.' and '+'"),
    ("1:2.0", "expected digits, letters, '.' and '+'"),
])
def test_a_version_apt_would_not_upgrade_to_is_refused(tmp_path: Path, version: str,
                                                         why: str) -> None:
    result = build(REPO, "--version", version, str(tmp_path / "out"))
    assert result.returncode != 0
    assert why in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()
