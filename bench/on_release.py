"""Run the benchmark on a Debian release's own Python, with that release's uvloop as the peer.

    python3 bench/on_release.py trixie [MODULE [ARGS...]]     (as root)

MODULE is ``bench`` (the default), ``bench.callgrind``, ``bench.workers`` or ``bench.restart``;
ARGS are its own.
For example, Debian 13's Python 3.13 against Debian 13's python3-uvloop:

    python3 bench/on_release.py trixie bench.callgrind --servers muxd,python-floor,uvloop
    python3 bench/on_release.py trixie bench --scenario c10-1k,c100-1k --reps 5 --duration 2

It runs in the release's root filesystem that the systemd suite caches (tests/systemd/nspawn.py,
built on first use), which already carries python3, gcc and valgrind, in a throwaway container
of that tree (a volatile overlay, only its own loopback, like suite_on_release.py): the
release's ``python3-uvloop`` is installed on the overlay from .debs fetched once from the
mirror into bench/build/debs-RELEASE/ (the one step that needs the network), then
``/usr/bin/python3 -m MODULE ARGS`` runs on a copy of this checkout. The tree is never
changed. What the run writes to bench/out/ ends up in bench/out/RELEASE/ here.
BENCH_MUXD_CANDIDATE (and BENCH_MUXD_CANDIDATE_BACKEND) work as for the bench itself: the
candidate checkout is copied in too.

Why the release's own uvloop: it is what an operator of that release gets from apt, built
against that release's libuv and Python, so it is the fair peer for muxd there. The versions
used are printed at the start (dpkg-query).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "systemd"))

from nspawn import MACHINE_PREFIX, RELEASES, apt_mirror, ensure_rootfs, export_tree, run_in_tree  # noqa: E402, I001

CACHE = Path(os.environ.get("MUXD_TEST_CACHE", "/var/cache/muxd-test"))
PEER_PACKAGES = ("python3-uvloop",)
MODULES = ("bench", "bench.callgrind", "bench.workers", "bench.restart")
INSIDE = "/src/muxd"
CANDIDATE_INSIDE = "/src/candidate"
DEBS_INSIDE = "/debs"
TIMEOUT_S = 3600

# With the host's network, on a throwaway overlay: fetch the peer's packages and whatever they
# need that the tree lacks (libuv), nothing else.
FETCH = """\
set -e
apt-get update -q -o Dpkg::Use-Pty=0 >/dev/null
mkdir -p /debs/partial
apt-get install -y -q --download-only --no-install-recommends \\
    -o Dir::Cache::archives=/debs -o APT::Sandbox::User=root -o Dpkg::Use-Pty=0 "$@" >/dev/null
rm -rf /debs/partial /debs/lock
ls /debs
"""

# Without a network: install the fetched packages on the overlay, say what runs, run it.
RUN = """\
set -e
dpkg -i /debs/*.deb >/dev/null
echo "on $(. /etc/os-release; echo "$PRETTY_NAME"): $(python3 --version)," \\
    "$(dpkg-query -W -f '${Package} ${Version}  ' python3-uvloop libuv1t64 valgrind gcc)"
export BENCH_MUXD_CANDIDATE="$1" BENCH_MUXD_CANDIDATE_BACKEND="$2"
[ -n "$1" ] || unset BENCH_MUXD_CANDIDATE
[ -n "$2" ] || unset BENCH_MUXD_CANDIDATE_BACKEND
shift 2
exec python3 -m "$@"
"""


def fetch_debs(rootfs: Path, release: str) -> Path:
    """The release's peer packages as .debs, downloaded once into bench/build/debs-RELEASE/."""
    debs = REPO / "bench" / "build" / f"debs-{release}"
    if debs.is_dir() and any(debs.glob("python3-uvloop_*.deb")):
        return debs
    partial = Path(tempfile.mkdtemp(prefix=f".debs-{release}-", dir=debs.parent))
    try:
        status = run_in_tree(
            rootfs, f"{MACHINE_PREFIX}bench-fetch-{release}-{os.getpid()}",
            ["bash", "-c", FETCH, "-", *PEER_PACKAGES], binds={partial: DEBS_INSIDE},
            timeout=600, network=True,
        )  # fmt: skip
        if status != 0:
            raise SystemExit(f"error: fetching {', '.join(PEER_PACKAGES)} for {release} "
                             f"from its mirror failed ({status})")
        partial.rename(debs)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return debs


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in RELEASES:
        print(f"usage: {sys.argv[0]} {{{','.join(RELEASES)}}} [{'|'.join(MODULES)} [ARGS...]]",
              file=sys.stderr)
        return 64
    release, rest = argv[0], argv[1:]
    module, args = (rest[0], rest[1:]) if rest and rest[0] in MODULES else ("bench", rest)
    rootfs = ensure_rootfs(CACHE, apt_mirror(), release)
    (REPO / "bench" / "build").mkdir(exist_ok=True)
    debs = fetch_debs(rootfs, release)
    out = REPO / "bench" / "out" / release
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"muxd-bench-{release}-") as scratch:
        # Copies, so the run writes no build output or bytecode into the checkouts.
        source = export_tree(REPO, Path(scratch) / "src")
        shutil.rmtree(source / "bench" / "out", ignore_errors=True)
        (source / "bench" / "out").mkdir()
        binds = {source: INSIDE, debs: DEBS_INSIDE, out: f"{INSIDE}/bench/out"}
        candidate = ""
        if candidate_root := os.environ.get("BENCH_MUXD_CANDIDATE"):
            binds[export_tree(Path(candidate_root), Path(scratch) / "candidate")] = \
                CANDIDATE_INSIDE
            candidate = CANDIDATE_INSIDE
        status = run_in_tree(
            rootfs, f"{MACHINE_PREFIX}bench-{release}-{os.getpid()}",
            ["bash", "-c", RUN, "-", candidate,
             os.environ.get("BENCH_MUXD_CANDIDATE_BACKEND", ""), module, *args],
            binds=binds, timeout=TIMEOUT_S, chdir=INSIDE,
        )  # fmt: skip
    print(f"(/src/muxd/bench/out inside is {out.relative_to(REPO)} here)")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
