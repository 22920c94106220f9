"""Boot a real systemd in systemd-nspawn and drive it from the host.

Everything the systemd suite needs lives here so that the tests themselves stay declarative:
a cached Debian root filesystem, a wheelhouse for offline installs, one booted container,
commands run inside it through nsenter, and sockets opened inside its network namespace.
shared/notes/real-systemd.md (beside the repo) tells why each step is done the way it is.
"""

from __future__ import annotations

import configparser
import contextlib
import ctypes
import fcntl
import hashlib
import io
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

# Debian releases the suite boots: oldstable (systemd 252, Python 3.11) and stable
# (systemd 257, Python 3.13). Both come from the mirror of the host's own bookworm sources.
RELEASES = ("bookworm", "trixie")
HOST_SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
ROOTFS_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "python3",
    "python3-pip",
    "python3-venv",
    "iproute2",
    "procps",
    # What the Debian package depends on, so that it installs offline; man for `man muxd`.
    "python3-sdnotify",
    "python3-daemon",
    "python3-h11",
    "man-db",
    # The non-systemd suite, run in the (unbooted) tree on the release's own Python.
    # (setuptools: muxd is installed editable into a venv there; trixie's pip lacks it).
    "python3-pytest",
    "python3-hypothesis",
    "python3-setuptools",
    "haproxy",
    "gcc",
    "libc6-dev",
    "valgrind",
)
# Units that only add noise or nondeterminism to a test boot.
MASKED_UNITS = (
    "console-getty.service",
    "getty@.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "fstrim.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "systemd-timesyncd.service",
)
# Bump when the recipe changes in a way the package list does not show, so old caches are
# not reused.
ROOTFS_RECIPE_VERSION = "2"
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
MACHINE_PREFIX = "muxd-test-"


def wait_until(
    predicate: Callable[[], T], timeout: float, interval: float = 0.05, what: str = ""
) -> T:
    """Poll `predicate` until it returns something truthy; return that, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    last: T = predicate()
    while not last:
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)
        last = predicate()
    return last


def apt_mirror() -> str:
    """The Debian mirror this machine's own apt sources use (deb822 or one-line format)."""
    if override := os.environ.get("MUXD_TEST_MIRROR"):
        return override
    candidates = sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    for path in candidates:
        for stanza in path.read_text().split("\n\n"):
            fields = dict(
                line.split(":", 1) for line in stanza.splitlines()
                if ":" in line and not line.startswith("#")
            )
            uris = fields.get("URIs", "").split()
            suites = fields.get("Suites", "").split()
            if HOST_SUITE in suites:
                for uri in uris:
                    if "security" not in uri:
                        return uri.rstrip("/")
    one_line = [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*.list")]
    for path in one_line:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            match = re.match(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", line)
            if match and match.group(2) == HOST_SUITE and "security" not in match.group(1):
                return match.group(1).rstrip("/")
    return DEFAULT_MIRROR


def ensure_rootfs(cache_root: Path, mirror: str, release: str) -> Path:
    """Return a Debian root filesystem of `release`, debootstrapping it once per machine.

    The tree is built in a scratch directory and renamed into place only when complete, so an
    interrupted build is never mistaken for a finished one. A lock keeps concurrent runs from
    building twice.
    """
    recipe = "\n".join([release, ROOTFS_RECIPE_VERSION, *ROOTFS_PACKAGES, *MASKED_UNITS])
    key = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    final = cache_root / f"rootfs-{release}-{key}"
    if final.is_dir():
        return final
    cache_root.mkdir(parents=True, exist_ok=True)
    with open(cache_root / f".lock-{release}", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.is_dir():
            return final
        # Whoever holds the lock is the only builder, so leftovers are from interrupted runs.
        # (Not ".build-*": an older version of this file, which other checkouts on the machine
        # may still run, takes another lock and removes every ".build-*" it finds.)
        for stale in cache_root.glob(f".debootstrap-{release}-*"):
            _remove_build_tree(stale)
        build = Path(tempfile.mkdtemp(prefix=f".debootstrap-{release}-", dir=cache_root))
        tree = build / "root"
        debootstrap = subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(ROOTFS_PACKAGES)}",
                release,
                str(tree),
                mirror,
            ],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if debootstrap.returncode != 0:
            _unmount_below(tree)
            log = tree / "debootstrap/debootstrap.log"
            details = log.read_text(errors="replace") if log.exists() else debootstrap.stderr
            raise RuntimeError(
                f"debootstrap {release} from {mirror} failed ({debootstrap.returncode}):\n"
                + "\n".join(details.splitlines()[-30:])
            )
        for unit in MASKED_UNITS:
            link = tree / "etc/systemd/system" / unit
            link.unlink(missing_ok=True)
            link.symlink_to("/dev/null")
        # debootstrap leaves the host's name and the downloaded packages behind.
        (tree / "etc/hostname").write_text("muxd-test\n")
        for deb in (tree / "var/cache/apt/archives").glob("*.deb"):
            deb.unlink()
        os.rename(tree, final)
        shutil.rmtree(build, ignore_errors=True)
    return final


def _unmount_below(tree: Path) -> None:
    """Undo the mounts (proc, sys) a failed or interrupted debootstrap leaves in its target."""
    prefix = str(tree.resolve()) + "/"
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    for mountpoint in sorted((m for m in mounts if m.startswith(prefix)), reverse=True):
        subprocess.run(["umount", "--lazy", mountpoint], check=False, capture_output=True)


def _remove_build_tree(build: Path) -> None:
    _unmount_below(build)
    shutil.rmtree(build, ignore_errors=True)


def export_tree(repo: Path, dest: Path) -> Path:
    """Copy the project like `git archive` would: no .git, no venvs, no build output."""
    ignore = shutil.ignore_patterns(
        ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__",
        ".pytest_cache", ".ruff_cache", ".hypothesis",
    )
    shutil.copytree(repo, dest, ignore=ignore, symlinks=True)
    return dest


def project_version(tree: Path) -> str:
    """The version in a muxd tree's muxd/__init__.py (the one place it is set)."""
    match = re.search(r'^__version__ = "([^"]+)"$', (tree / "muxd/__init__.py").read_text(), re.M)
    assert match, f"no __version__ in {tree}/muxd/__init__.py"
    return match.group(1)


def export_newer_tree(repo: Path, dest: Path, version: str) -> Path:
    """An exported copy of the project that calls itself `version` (a newer release, for the
    upgrade tests): muxd/__init__.py says so, and so does a new entry at the top of
    packaging/debian/changelog (build-deb.sh requires the two to agree)."""
    old = project_version(repo)
    export_tree(repo, dest)
    init = dest / "muxd/__init__.py"
    init.write_text(init.read_text().replace(f'__version__ = "{old}"',
                                             f'__version__ = "{version}"'))
    assert project_version(dest) == version
    changelog = dest / "packaging/debian/changelog"
    changelog.write_text(
        f"muxd ({version}) unstable; urgency=medium\n\n  * A newer build for the upgrade tests."
        "\n\n -- muxd tests <tests@muxd.invalid>  Tue, 01 Dec 2026 21:00:00 +0000\n\n"
        + changelog.read_text()
    )
    return dest


def build_wheelhouse(source: Path, wheelhouse: Path) -> Path:
    """Wheels of muxd, its dependencies and its build backend, for a pip with no index."""
    wheelhouse.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    # Building in a copy keeps build/ and *.egg-info out of the caller's tree.
    with tempfile.TemporaryDirectory(prefix="muxd-wheel-src-") as scratch:
        src_copy = export_tree(source, Path(scratch) / "src")
        subprocess.run(
            [*pip, "wheel", "--wheel-dir", str(wheelhouse), str(src_copy)],
            check=True, timeout=600,
        )
    # pip inside the container builds muxd from source with build isolation, so the build
    # backend must be in the wheelhouse too.
    subprocess.run(
        [*pip, "download", "--only-binary=:all:", "--dest", str(wheelhouse),
         "setuptools>=61", "wheel"],
        check=True, timeout=600,
    )
    return wheelhouse


def _cgroup_roots() -> list[Path]:
    """Hierarchies in which the container gets a cgroup of its own (hybrid or unified)."""
    base = Path("/sys/fs/cgroup")
    hybrid = [base / "systemd", base / "unified"]
    if any((root / "cgroup.procs").exists() for root in hybrid):
        return [root for root in hybrid if (root / "cgroup.procs").exists()]
    return [base]


def _enter_netns(pid: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns(net) into pid {pid}: {os.strerror(err)}")
    finally:
        os.close(fd)


class Container:
    """One booted systemd-nspawn container: run commands in it, reach its files and sockets."""

    def __init__(self, rootfs: Path, name: str, binds_ro: dict[Path, str], log_path: Path,
                 release: str):
        self.rootfs = rootfs
        self.release = release
        self.name = name
        self.binds_ro = binds_ro
        self.log_path = log_path
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.init_pid = 0
        self._cgroups = [root / f"nspawn-{name}" for root in _cgroup_roots()]
        self._dialer: ThreadPoolExecutor | None = None

    # --- lifecycle -----------------------------------------------------------------------

    def boot(self, timeout: float = 90) -> None:
        # Empty cgroups of earlier runs that were killed before they could clean up
        # (machine names end in the test runner's PID; a live runner keeps its own).
        for root in _cgroup_roots():
            for stale in root.glob(f"nspawn-{MACHINE_PREFIX}*"):
                owner = stale.name.rsplit("-", 1)[-1]
                if not (owner.isdigit() and Path(f"/proc/{owner}").exists()):
                    _remove_cgroup_tree(stale, attempts=1)
        for cgroup in self._cgroups:
            cgroup.mkdir(exist_ok=True)
        command = [
            "systemd-nspawn",
            "--boot",
            f"--directory={self.rootfs}",
            f"--machine={self.name}",
            "--register=no",
            "--keep-unit",
            "--console=read-only",
            "--private-network",
            "--volatile=overlay",
            *(f"--bind-ro={host}:{inside}" for host, inside in self.binds_ro.items()),
        ]
        cgroup_procs = [str(cgroup / "cgroup.procs") for cgroup in self._cgroups]

        def prepare_child() -> None:
            # Without a cgroup of its own, nspawn would take over the test runner's cgroup
            # (and collide with any other container started from it).
            for procs in cgroup_procs:
                with open(procs, "w") as f:
                    f.write(str(os.getpid()))
            # If the test runner is killed outright (no fixture teardown), nspawn gets
            # SIGTERM and shuts the container down instead of leaving it running.
            ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

        log = open(self.log_path, "wb")
        self.nspawn = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=prepare_child,
        )
        log.close()
        try:
            self.init_pid = wait_until(self._find_init, timeout=30, what="container init")
            # systemctl talks to PID 1 over this socket; before it exists it finds "no bus".
            wait_until(
                lambda: self.path("/run/systemd/private").exists(),
                timeout=30, what="systemd's private socket in the container",
            )
            state = self.run(
                ["systemctl", "is-system-running", "--wait"], check=False, timeout=timeout
            ).stdout.strip()
            if state not in ("running", "degraded"):
                raise RuntimeError(f"container did not boot: state {state!r}\n{self.log_tail()}")
        except BaseException:
            self.poweroff()
            raise

    def _find_init(self) -> int:
        assert self.nspawn is not None
        if self.nspawn.poll() is not None:
            raise RuntimeError(f"systemd-nspawn exited early:\n{self.log_tail()}")
        for task in Path(f"/proc/{self.nspawn.pid}/task").glob("*/children"):
            for child in task.read_text().split():
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                        return int(child)
        return 0

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            text = self.log_path.read_text(errors="replace")
            return "\n".join(text.splitlines()[-lines:])
        return ""

    def poweroff(self, timeout: float = 30) -> None:
        """Shut down cleanly if possible, then remove what nspawn leaves on the host."""
        if self._dialer is not None:
            self._dialer.shutdown(wait=False)
            self._dialer = None
        if self.nspawn is not None and self.nspawn.poll() is None:
            if self.init_pid:
                try:
                    asked = self.run(
                        ["systemctl", "poweroff", "--no-block"], check=False, timeout=10
                    ).returncode == 0
                except subprocess.TimeoutExpired:
                    asked = False
                if not asked:
                    # No manager to talk to (yet): systemd powers off on SIGRTMIN+4 too.
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.init_pid, signal.SIGRTMIN + 4)
            try:
                self.nspawn.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                # Only the nspawn process this object started; it tears the container down.
                self.nspawn.send_signal(signal.SIGTERM)
                try:
                    self.nspawn.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    self.nspawn.kill()
                    self.nspawn.wait(timeout=15)
        for cgroup in self._cgroups:
            _remove_cgroup_tree(cgroup)
        _remove_nspawn_leftovers(self.name)
        self.init_pid = 0

    # --- inside the container ------------------------------------------------------------

    def run(
        self,
        command: list[str],
        *,
        check: bool = True,
        timeout: float = 60,
        input: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the container (all its namespaces, its root, a clean env)."""
        environment = {"PATH": CONTAINER_PATH, "LANG": "C.UTF-8", "SYSTEMD_PAGER": "",
                       "SYSTEMD_COLORS": "0", **(env or {})}
        full = [
            "nsenter", f"--target={self.init_pid}",
            "--mount", "--uts", "--ipc", "--net", "--pid", "--cgroup", "--root", "--wd",
            "env", "-i", *(f"{key}={value}" for key, value in environment.items()),
            *command,
        ]
        result = subprocess.run(
            full, capture_output=True, text=True, timeout=timeout, input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"inside the container, {command} exited {result.returncode}\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
            )
        return result

    def path(self, inside: str) -> Path:
        """The host path of a file inside the running container (through its root)."""
        return Path(f"/proc/{self.init_pid}/root") / inside.lstrip("/")

    def write_file(self, inside: str, content: str) -> None:
        target = self.path(inside)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)

    # --- systemd shortcuts ----------------------------------------------------------------

    def systemctl(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        return self.run(["systemctl", *args], check=check, timeout=timeout).stdout

    def show(self, unit: str, prop: str) -> str:
        return self.systemctl("show", "--value", "-p", prop, unit).strip()

    def main_pid(self, unit: str = "muxd.service") -> int:
        return int(self.show(unit, "MainPID") or 0)

    def journal_mark(self) -> int:
        """The time of the newest journal entry, so a test reads only what came after it.

        (Not a cursor: journalctl 252 returns nothing for --after-cursor combined with -p.)
        """
        out = self.run(["journalctl", "-n", "1", "-o", "json", "-q"]).stdout.strip()
        return int(json.loads(out.splitlines()[-1])["__REALTIME_TIMESTAMP"]) if out else 0

    def journal(self, *args: str, after: int = 0) -> list[dict[str, str]]:
        """Journal entries as JSON objects (MESSAGE, PRIORITY, ...), oldest first."""
        command = ["journalctl", "--no-pager", "-q", "-o", "json", *args]
        if after:
            command.append(f"--since=@{after // 1_000_000}")
        entries = [json.loads(line) for line in self.run(command).stdout.splitlines() if line]
        return [e for e in entries if int(e["__REALTIME_TIMESTAMP"]) > after]

    def wait_for_journal(
        self,
        *args: str,
        match: Callable[[dict[str, str]], bool] = lambda entry: True,
        after: int = 0,
        timeout: float = 10,
    ) -> list[dict[str, str]]:
        """Entries matching `match`, once there is at least one.

        A service's stderr reaches the journal through a stream that journald reads on its
        own schedule, so a line may show up some time after the command that caused it.
        """
        return wait_until(
            lambda: [e for e in self.journal(*args, after=after) if match(e)],
            timeout=timeout, interval=0.1, what=f"journal entries for {args}",
        )

    # --- network ---------------------------------------------------------------------------

    def connect(self, port: int, host: str = "127.0.0.1", timeout: float = 5,
                source: str | None = None) -> socket.socket:
        """A TCP connection made from inside the container's network namespace (from
        ``source``, an address of the container's, when given).

        Only socket creation needs the namespace; a single worker thread joins it once and
        the socket is then used from the calling thread as usual.
        """
        future = self._in_netns().submit(socket.create_connection, (host, port), timeout,
                                         None if source is None else (source, 0))
        return future.result(timeout=timeout + 5)

    def udp_socket(self, family: socket.AddressFamily = socket.AF_INET) -> socket.socket:
        """An unbound UDP socket in the container's network namespace."""
        future = self._in_netns().submit(socket.socket, family, socket.SOCK_DGRAM)
        return future.result(timeout=5)

    def _in_netns(self) -> ThreadPoolExecutor:
        if self._dialer is None:
            self._dialer = ThreadPoolExecutor(
                max_workers=1, initializer=_enter_netns, initargs=(self.init_pid,)
            )
        return self._dialer


def run_in_tree(
    rootfs: Path, name: str, command: list[str], binds: dict[Path, str], timeout: float,
    chdir: str = "/", network: bool = False,
) -> int:
    """Run one command in the (unbooted) root filesystem of a release, in a container of its
    own: its own network namespace (only lo; the host's with ``network``, e.g. to fetch
    packages from the mirror), a throwaway overlay over the cached tree, and a stub init as
    PID 1 so the command can reap what it starts. Output goes to ours.
    """
    cgroups = [root / f"nspawn-{name}" for root in _cgroup_roots()]
    for cgroup in cgroups:
        cgroup.mkdir(exist_ok=True)
    cgroup_procs = [str(cgroup / "cgroup.procs") for cgroup in cgroups]

    def prepare_child() -> None:
        for procs in cgroup_procs:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    nspawn = [
        "systemd-nspawn", "--quiet", f"--directory={rootfs}", f"--machine={name}",
        "--register=no", "--keep-unit", *([] if network else ["--private-network"]),
        "--volatile=overlay", "--console=pipe", "--as-pid2", f"--chdir={chdir}",
        "--setenv=LANG=C.UTF-8",
        *(f"--bind={host}:{inside}" for host, inside in binds.items()),
        *command,
    ]
    process = subprocess.Popen(nspawn, stdin=subprocess.DEVNULL, preexec_fn=prepare_child)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        raise
    finally:
        for cgroup in cgroups:
            _remove_cgroup_tree(cgroup)
        _remove_nspawn_leftovers(name)


def _remove_nspawn_leftovers(name: str) -> None:
    """What nspawn leaves under /run/systemd/nspawn for a machine that has exited."""
    for leftover in Path("/run/systemd/nspawn").glob(f"*/{name}"):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def _remove_cgroup_tree(root: Path, attempts: int = 50) -> None:
    """Remove a cgroup directory tree; cgroups still holding processes are left alone."""
    if not root.is_dir():
        return
    for _ in range(attempts):
        # Deepest first: a cgroup can only be removed once it has no children.
        for directory in sorted((p for p in root.rglob("*") if p.is_dir()), reverse=True):
            with contextlib.suppress(OSError):
                directory.rmdir()
        try:
            root.rmdir()
            return
        except OSError:
            # The last processes may still be exiting.
            time.sleep(0.1)


def echo_roundtrip(sock: socket.socket, payload: bytes, timeout: float = 5) -> bytes:
    """Send `payload` and read back exactly as many bytes (or fewer, on EOF)."""
    sock.settimeout(timeout)
    sock.sendall(payload)
    received = bytearray()
    while len(received) < len(payload):
        chunk = sock.recv(len(payload) - len(received))
        if not chunk:
            break
        received += chunk
    return bytes(received)


def pile_up(sock: socket.socket, rng: random.Random, budget: int, sent: bytearray,
            stall: float = 0.5, timeout: float = 30) -> int:
    """Send random bytes without reading any echo, until the peer takes no more for `stall`
    seconds or `budget` bytes are sent; append what was sent to `sent` and return how much.
    Against muxd, a budget above what the kernel buffers of both ends hold (see
    pile_budget) leaves muxd holding buffer_size of echo with reading paused. Leaves the
    socket non-blocking."""
    sock.setblocking(False)
    start = len(sent)
    stalled_since = 0.0
    deadline = time.monotonic() + timeout
    while len(sent) - start < budget:
        now = time.monotonic()
        if now > deadline:
            raise AssertionError(f"piled only {len(sent) - start} bytes in {timeout}s")
        block = rng.randbytes(min(65536, budget - (len(sent) - start)))
        try:
            sent += block[:sock.send(block)]
            stalled_since = 0.0
        except BlockingIOError:
            stalled_since = stalled_since or now
            if now - stalled_since > stall:
                break
            select.select([], [sock], [], 0.05)
    return len(sent) - start


def pile_budget(container: Container) -> int:
    """Enough bytes to fill muxd's send queue to a client that does not read (at most
    tcp_wmem's maximum), the client's receive queue and buffer_size of muxd's, with room
    to spare: what pile_up needs to pause muxd without a stall (~6 MiB here)."""
    # Read inside: net.* sysctls are the reading process's network namespace's.
    wmem = container.run(["cat", "/proc/sys/net/ipv4/tcp_wmem"]).stdout
    wmem_max = int(wmem.split()[2])
    return wmem_max + (2 << 20)


def receive_exactly(sock: socket.socket, size: int, timeout: float = 10) -> bytes:
    """Read `size` bytes (fewer only if the peer ends the connection first)."""
    sock.setblocking(True)
    sock.settimeout(timeout)
    received = bytearray()
    while len(received) < size:
        chunk = sock.recv(min(size - len(received), 1 << 20))
        if not chunk:
            break
        received += chunk
    return bytes(received)


def udp_echo(container: Container, payload: bytes, host: str = "127.0.0.1", port: int = 7,
             timeout: float = 5) -> bytes:
    """One datagram to the echo port and the datagram that comes back."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with container.udp_socket(family) as sock:
        sock.settimeout(timeout)
        sock.sendto(payload, (host, port))
        return sock.recv(65536)


@contextlib.contextmanager
def connected(container: Container, port: int = 7, host: str = "127.0.0.1") -> Iterator[
    socket.socket
]:
    sock = container.connect(port, host)
    try:
        yield sock
    finally:
        sock.close()


# --- muxd-specific helpers ----------------------------------------------------------------

MUXD_CONFIG = "/etc/muxd/muxd.ini"
UNIT_DIR = "/etc/systemd/system"
SOURCE_INSIDE = "/src/muxd"
WHEELHOUSE_INSIDE = "/wheelhouse"


def run_packaging_script(container: Container, script: str, *args: str,
                         source: str = SOURCE_INSIDE) -> str:
    """Run packaging/SCRIPT of the tree at `source` inside, offline, from a directory that
    is not the source tree."""
    result = container.run(
        ["bash", "-c", 'cd /tmp && exec "$@"', "-", f"{source}/packaging/{script}", *args],
        env={"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": WHEELHOUSE_INSIDE},
        timeout=300,
    )
    return result.stdout + result.stderr


def edit_ini(container: Container, changes: dict[tuple[str, str], str], path: str = MUXD_CONFIG
             ) -> None:
    """Set [section] key = value in an INI file inside the container (comments are lost)."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(container.path(path).read_text())
    for (section, key), value in changes.items():
        if not parser.has_section(section):
            parser.add_section(section)
        parser.set(section, key, value)
    buffer = io.StringIO()
    parser.write(buffer)
    container.write_file(path, buffer.getvalue())


def add_drop_in(container: Container, unit: str, name: str, text: str) -> None:
    """Add /etc/systemd/system/UNIT.d/NAME.conf and make systemd see it."""
    container.write_file(f"{UNIT_DIR}/{unit}.d/{name}.conf", text)
    container.systemctl("daemon-reload")


def reset_muxd(container: Container, pristine_config: str) -> None:
    """Put muxd back as install.sh left it: both units stopped, no drop-ins, default config."""
    container.systemctl("stop", "muxd.socket", "muxd.service", check=False, timeout=60)
    for unit in ("muxd.service", "muxd.socket"):
        shutil.rmtree(container.path(f"{UNIT_DIR}/{unit}.d"), ignore_errors=True)
    container.write_file(MUXD_CONFIG, pristine_config)
    container.systemctl("daemon-reload")
    # Also clears the start rate limit, which many quick starts across tests would hit.
    container.systemctl("reset-failed", "muxd.service", "muxd.socket", check=False)


def pending_echo(message: str) -> int:
    """The bytes of pending echo a 'took over ...' line of muxd reports (KiB are rounded)."""
    match = re.search(r"(\d+) (KiB|bytes) of pending echo", message)
    assert match, message
    return int(match.group(1)) * (1024 if match.group(2) == "KiB" else 1)


def process_uid(container: Container, pid: int) -> int:
    status = container.path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
