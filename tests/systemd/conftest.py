"""Session fixtures for the systemd suite: one booted container with muxd installed in it.

Costs, so the suite stays within a few minutes: the Debian root filesystem is debootstrapped
once per machine and cached; each session builds a wheelhouse on the host (the container has
no network), boots the cached tree with --volatile=overlay (pristine every time, ~1 s) and runs
packaging/install.sh inside it once. Each test then starts from a reset muxd.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from nspawn import (
    MACHINE_PREFIX,
    MUXD_CONFIG,
    SOURCE_INSIDE,
    WHEELHOUSE_INSIDE,
    Container,
    apt_mirror,
    build_wheelhouse,
    ensure_rootfs,
    export_tree,
    reset_muxd,
    run_packaging_script,
)

REPO = Path(__file__).resolve().parents[2]
# Another tree to install instead of this checkout (e.g. a release candidate).
SOURCE = Path(os.environ.get("MUXD_TEST_SOURCE", REPO))
CACHE = Path(os.environ.get("MUXD_TEST_CACHE", "/var/cache/muxd-test"))
REQUIRED_TOOLS = ("systemd-nspawn", "debootstrap", "nsenter")


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


@pytest.fixture(scope="session")
def container(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    reason = missing_prerequisite()
    if reason:
        # CI sets this so that a machine without the tools fails loudly instead of passing.
        if os.environ.get("MUXD_REQUIRE_SYSTEMD_TESTS") == "1":
            pytest.fail(f"systemd suite required but cannot run: {reason}")
        pytest.skip(reason)
    rootfs = ensure_rootfs(CACHE, apt_mirror())
    work = tmp_path_factory.mktemp("systemd")
    # An exported copy (no .git) is what gets installed: install.sh must not need git.
    source = export_tree(SOURCE, work / "src")
    wheelhouse = build_wheelhouse(source, work / "wheelhouse")
    machine = Container(
        rootfs,
        name=f"{MACHINE_PREFIX}{os.getpid()}",
        binds_ro={source: SOURCE_INSIDE, wheelhouse: WHEELHOUSE_INSIDE},
        log_path=work / "nspawn.log",
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
