from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from daemon_harness import Muxd  # noqa: E402

from muxd.pollers import available_backends  # noqa: E402


def _backends_under_test() -> list[str]:
    """Every backend this platform has, or those named in MUXD_TEST_BACKENDS (a comma list):
    the run on another release's Python uses one, the host's run covers them all."""
    chosen = [name for name in os.environ.get("MUXD_TEST_BACKENDS", "").split(",") if name]
    available = available_backends()
    unknown = sorted(set(chosen) - set(available))
    if unknown:
        raise pytest.UsageError(f"MUXD_TEST_BACKENDS names {unknown}; this host has {available}")
    return chosen or available


@pytest.hookimpl(trylast=True)  # after pytest's own reordering by session fixtures
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The real-systemd tests last: their root filesystems may still be debootstrapping
    in the background (.ci/run on a fresh machine), and the rest of the suite needs none."""
    items.sort(key=lambda item: item.get_closest_marker("systemd") is not None)


@pytest.fixture(params=_backends_under_test())
def backend(request: pytest.FixtureRequest) -> str:
    """Run the test once per backend this platform has, like CPython's test_selectors."""
    return request.param


@pytest.fixture
def pid1(tmp_path: Path) -> Iterator[object]:
    """The test as PID 1 of a unit with a file descriptor store (fake_systemd.py)."""
    from fake_systemd import STORE_SIZE, FdStoreSystemd

    fake = FdStoreSystemd(tmp_path / "notify-pid1", store_max=STORE_SIZE)
    yield fake
    fake.close()


@pytest.fixture
def start_muxd(tmp_path: Path) -> Iterator[Callable[..., Muxd]]:
    """Start muxd processes that are killed (by PID) when the test ends, pass or fail."""
    started: list[Muxd] = []

    def start(config_text: str | None = None, *, ready: bool = True, **kwargs: object) -> Muxd:
        workdir = tmp_path / f"muxd{len(started)}"
        workdir.mkdir()
        daemon = Muxd(workdir, config_text, **kwargs)
        started.append(daemon)
        if ready:
            daemon.wait_ready()
        return daemon

    yield start
    for daemon in started:
        daemon.close()
