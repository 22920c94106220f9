"""Run the non-systemd test suite on a Debian release's own Python and libraries.

    python3 tests/systemd/suite_on_release.py trixie [PYTEST ARGS...]

The release's cached root filesystem (the one the systemd suite boots, see nspawn.py) already
carries Debian's python3, python3-pytest, python3-hypothesis, python3-sdnotify and
python3-daemon. Inside a throwaway container of that tree (no network but its own loopback),
a venv that sees those system packages gets this checkout installed editable, without an
index and without build isolation, and pytest runs there on everything but tests/systemd.
So trixie's run tests muxd on Python 3.13 with trixie's sdnotify and python-daemon, and
bookworm's on the oldest versions muxd supports (python3-daemon 2.3.2, python3-sdnotify 0.3.1).
MUXD_TEST_BACKENDS (a comma list, e.g. epoll) limits the tests run per backend to those.
Exits with pytest's status. `--prepare` only builds (or finds) every release's cached root
filesystem, all at once: on a fresh machine, .ci/run starts it before anything else.
"""

from __future__ import annotations

import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nspawn import MACHINE_PREFIX, RELEASES, apt_mirror, ensure_rootfs, export_tree, run_in_tree

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("MUXD_TEST_CACHE", "/var/cache/muxd-test"))
INSIDE = "/src/muxd"
SCRIPT = """\
set -e
export MUXD_TEST_BACKENDS="$1"  # empty: every backend
shift
python3 --version
# A new network namespace starts with unprivileged ICMP sockets off ("1 0"); the host, where
# the suite also runs, allows them (test_activation opens one).
echo "0 2147483647" > /proc/sys/net/ipv4/ping_group_range
python3 -m venv --system-site-packages /tmp/venv
/tmp/venv/bin/pip install --quiet --no-index --no-deps --no-build-isolation \\
    --disable-pip-version-check -e .
# The release's own packages satisfy the lower bounds in pyproject.toml.
/tmp/venv/bin/pip check --disable-pip-version-check
exec /tmp/venv/bin/python -m pytest -p no:cacheprovider --ignore=tests/systemd "$@"
"""


def main(argv: list[str]) -> int:
    if argv == ["--prepare"]:
        mirror = apt_mirror()
        with ThreadPoolExecutor(len(RELEASES)) as pool:
            for tree in pool.map(lambda release: ensure_rootfs(CACHE, mirror, release), RELEASES):
                print(tree)
        return 0
    if not argv or argv[0] not in RELEASES:
        print(f"usage: {sys.argv[0]} {{{','.join(RELEASES)}}} [PYTEST ARGS...] | --prepare",
              file=sys.stderr)
        return 64
    release, pytest_args = argv[0], argv[1:]
    rootfs = ensure_rootfs(CACHE, apt_mirror(), release)
    with tempfile.TemporaryDirectory(prefix=f"muxd-suite-{release}-") as scratch:
        # A copy, so the run writes no build output or caches into the checkout.
        source = export_tree(REPO, Path(scratch) / "src")
        return run_in_tree(
            rootfs, f"{MACHINE_PREFIX}suite-{release}-{os.getpid()}",
            ["bash", "-c", SCRIPT, "-", os.environ.get("MUXD_TEST_BACKENDS", ""), *pytest_args],
            binds={source: INSIDE},
            timeout=1800, chdir=INSIDE,
        )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
