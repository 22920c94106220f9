"""The version lives in muxd/__init__.py alone: the Debian changelog and the built metadata agree.

(packaging/build-deb.sh refuses to build when they do not; the systemd suite checks the built
file's name and `muxd --version` of the installed package.)
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from muxd import __version__

REPO = Path(__file__).resolve().parent.parent
CHANGELOG = REPO / "packaging" / "debian" / "changelog"


def test_debian_changelog_names_the_package_version() -> None:
    first = CHANGELOG.read_text().splitlines()[0]
    match = re.match(r"^muxd \(([^)]+)\) \S+; urgency=\w+$", first)
    assert match, f"not a changelog heading: {first!r}"
    # A native package: no Debian revision, the version is muxd's own.
    assert match.group(1) == __version__, (
        f"packaging/debian/changelog's newest entry is {match.group(1)}, "
        f"muxd/__init__.py says {__version__}"
    )


def test_pyproject_takes_the_version_from_the_package() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in project["project"]
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "muxd.__version__"}


def test_readme_installs_the_file_build_deb_writes() -> None:
    readme = (REPO / "README.md").read_text()
    assert f"sudo apt install ./dist/muxd_{__version__}_all.deb" in readme
