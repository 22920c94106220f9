"""Session fixtures for the systemd suite: a booted container per Debian release, muxd in it.

Every systemd test runs once per release in nspawn.RELEASES (bookworm: systemd 252, trixie:
systemd 257); MUXD_TEST_RELEASES=trixie (comma-separated) narrows a development run.
Costs, so the suite stays within a few minutes: each release's root filesystem is
debootstrapped once per machine and cached; each session builds a wheelhouse on the host (the
container has no network), boots each cached tree with --volatile=overlay (pristine every
time, ~1 s) and runs packaging/install.sh inside it once. pytest runs all tests of one release
before booting the next, so only one such container runs at a time. Each test then starts
from a reset muxd.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from nspawn import (
    MACHINE_PREFIX,
    MUXD_CONFIG,
    RELEASES,
    SOURCE_INSIDE,
    WHEELHOUSE_INSIDE,
    Container,
    apt_mirror,
    build_wheelhouse,
    ensure_rootfs,
    export_newer_tree,
    export_tree,
    project_version,
    reset_muxd,
    run_packaging_script,
)

REPO = Path(__file__).resolve().parents[2]
# Another tree to install instead of this checkout (e.g. a release candidate).
SOURCE = Path(os.environ.get("MUXD_TEST_SOURCE", REPO))
CACHE = Path(os.environ.get("MUXD_TEST_CACHE", "/var/cache/muxd-test"))
REQUIRED_TOOLS = ("systemd-nspawn", "debootstrap", "nsenter")
# packaging/build-deb.sh's tools (.ci/run installs them).
DEB_BUILD_TOOLS = ("dpkg-buildpackage", "dh", "scdoc", "lintian")
DEBS_INSIDE = "/debs"
# The newer release the upgrade tests install: this tree under a higher version.
NEWER_SOURCE_INSIDE = "/src/muxd-newer"
SELECTED_RELEASES = tuple(
    release for release in os.environ.get("MUXD_TEST_RELEASES", ",".join(RELEASES)).split(",")
    if release
)


def missing_prerequisite() -> str:
    if os.geteuid() != 0:
        return "needs root (boots systemd-nspawn containers)"
    absent = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if absent:
        return (
            f"{', '.join(absent)} not installed "
            "(apt-get install --no-install-recommends systemd-container debootstrap)"
        )
    return ""


def require_prerequisites(extra_tools: tuple[str, ...] = ()) -> None:
    reason = missing_prerequisite()
    absent = [tool for tool in extra_tools if shutil.which(tool) is None]
    if not reason and absent:
        reason = f"{', '.join(absent)} not installed (see packaging/build-deb.sh)"
    if reason:
        # CI sets this so that a machine without the tools fails loudly instead of passing.
        if os.environ.get("MUXD_REQUIRE_SYSTEMD_TESTS") == "1":
            pytest.fail(f"systemd suite required but cannot run: {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="session", params=SELECTED_RELEASES)
def release(request: pytest.FixtureRequest) -> str:
    """The Debian release a systemd test runs on (each test runs once per release)."""
    return request.param


@pytest.fixture(scope="session")
def rootfs(release: str) -> Path:
    """The cached, debootstrapped root filesystem of this release."""
    require_prerequisites()
    return ensure_rootfs(CACHE, apt_mirror(), release)


@pytest.fixture(scope="session")
def source_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # An exported copy (no .git) is what gets installed: install.sh must not need git.
    return export_tree(SOURCE, tmp_path_factory.mktemp("source") / "src")


@dataclass(frozen=True)
class NewerTree:
    """This tree as a newer release: the same code under a higher version."""

    path: Path  # on the host; bound read-only at NEWER_SOURCE_INSIDE in `container`
    version: str
    old_version: str  # source_tree's


@pytest.fixture(scope="session")
def newer_tree(source_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> NewerTree:
    version = project_version(source_tree)
    newer = f"{version}+test1"
    path = export_newer_tree(source_tree, tmp_path_factory.mktemp("newer") / "src", newer)
    return NewerTree(path, newer, version)


@pytest.fixture(scope="session")
def wheelhouse(source_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheelhouse(source_tree, tmp_path_factory.mktemp("wheelhouse"))


@pytest.fixture(scope="session")
def container(
    release: str, rootfs: Path, source_tree: Path, newer_tree: NewerTree, wheelhouse: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Container]:
    """A booted container of this release with muxd installed by packaging/install.sh
    (from SOURCE_INSIDE; the newer tree to upgrade to is at NEWER_SOURCE_INSIDE)."""
    work = tmp_path_factory.mktemp(f"systemd-{release}")
    machine = Container(
        rootfs,
        name=f"{MACHINE_PREFIX}{release}-{os.getpid()}",
        binds_ro={source_tree: SOURCE_INSIDE, newer_tree.path: NEWER_SOURCE_INSIDE,
                  wheelhouse: WHEELHOUSE_INSIDE},
        log_path=work / "nspawn.log",
        release=release,
    )
    machine.boot()
    try:
        run_packaging_script(machine, "install.sh")
        yield machine
    finally:
        machine.poweroff()


@pytest.fixture(scope="session")
def pristine_config(container: Container) -> str:
    return container.path(MUXD_CONFIG).read_text()


@pytest.fixture
def muxd(container: Container, pristine_config: str) -> Container:
    """The container with muxd stopped, its units unmodified and the default config."""
    reset_muxd(container, pristine_config)
    return container


@dataclass(frozen=True)
class DebianPackages:
    """The package as built from this tree, and a newer build of it to upgrade to."""

    directory: Path  # on the host; bound read-only at DEBS_INSIDE
    version: str
    newer_version: str

    def inside(self, version: str) -> str:
        return f"{DEBS_INSIDE}/muxd_{version}_all.deb"


def build_deb(source: Path, outdir: Path, *args: str) -> str:
    result = subprocess.run(
        [str(source / "packaging" / "build-deb.sh"), *args, str(outdir)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, f"build-deb.sh failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="session")
def debian_packages(
    source_tree: Path, newer_tree: NewerTree, tmp_path_factory: pytest.TempPathFactory
) -> DebianPackages:
    """packaging/build-deb.sh run once per session on the host, lintian included, plus a
    build of the same tree as the newer version to upgrade to, the way an operator makes
    one (`build-deb.sh --version`: a changelog entry and __version__ in the build's copy)."""
    require_prerequisites(DEB_BUILD_TOOLS)
    outdir = tmp_path_factory.mktemp("debs")
    build_deb(source_tree, outdir)
    build_deb(source_tree, outdir, "--no-lintian", "--version", newer_tree.version)
    return DebianPackages(outdir, newer_tree.old_version, newer_tree.version)


@pytest.fixture(scope="module")
def bare_container(
    release: str, rootfs: Path, debian_packages: DebianPackages,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Container]:
    """A booted container of this release without muxd: the built .debs at /debs, no network."""
    work = tmp_path_factory.mktemp(f"deb-{release}")
    machine = Container(
        rootfs,
        name=f"{MACHINE_PREFIX}deb-{release}-{os.getpid()}",
        binds_ro={debian_packages.directory: DEBS_INSIDE},
        log_path=work / "nspawn.log",
        release=release,
    )
    machine.boot()
    try:
        yield machine
    finally:
        machine.poweroff()
