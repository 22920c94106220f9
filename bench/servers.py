"""The echo servers under test and the one function that starts (and always stops) them."""

import functools
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench import REPO_ROOT
from bench.build import EPOLL_ECHO_SOURCE, compiled
from bench.fakestore import DEFAULT_STORE_MAX, StoreProcess, store_process

STARTUP_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 3.0


class ServerUnavailable(RuntimeError):
    """The server cannot be run here (e.g. muxd not merged yet, uvloop not installed)."""


class ServerFailed(RuntimeError):
    """The server exited or never accepted connections."""


@dataclass(frozen=True)
class ServerSpec:
    name: str
    description: str
    # (port, scratch dir) -> argv; raises ServerUnavailable when it cannot run here.
    argv: Callable[[int, Path], list[str]]
    # select() cannot watch descriptors >= FD_SETSIZE, so such servers cap out near 1000.
    max_connections: int | None = None
    # Where the child runs; ``python -m`` imports from there first.
    cwd: Callable[[], Path] = lambda: REPO_ROOT
    # Run as under systemd with a file descriptor store (bench/fakestore.py plays
    # PID 1's part, as a process of its own on the server's core): NOTIFY_SOCKET and
    # FDSTORE are set, so muxd's hand-over is on and stores every connection.
    fdstore: bool = False


def _python_module(module: str, port: int, _scratch: Path) -> list[str]:
    return [sys.executable, "-m", module, str(port)]


def _uvloop_peer(port: int, scratch: Path) -> list[str]:
    if importlib.util.find_spec("uvloop") is None:
        raise ServerUnavailable("uvloop is not installed (pip install '.[bench]')")
    return _python_module("bench.peers.uvloop_protocol", port, scratch)


def _c_epoll_peer(port: int, _scratch: Path) -> list[str]:
    return [str(compiled(EPOLL_ECHO_SOURCE)), str(port)]


def muxd_available() -> bool:
    return (REPO_ROOT / "muxd" / "__main__.py").exists()


MUXD_CONFIG = """\
[server]
listen = 127.0.0.1:{port}
backend = {backend}
[limits]
nofile = 20000
max_connections = 20000
idle_timeout = 0
[logging]
level = warning
"""


# A/B testing a hot-path change: point this at another checkout (or a patched copy) of
# muxd and compare "muxd" (or "muxd-poll"/"muxd-select", with the matching
# BENCH_MUXD_CANDIDATE_BACKEND) with "muxd-candidate" in the same alternating run.
CANDIDATE_ENV = "BENCH_MUXD_CANDIDATE"


def _candidate_root() -> Path:
    root = os.environ.get(CANDIDATE_ENV)
    if not root or not (Path(root) / "muxd" / "__main__.py").exists():
        raise ServerUnavailable(f"set {CANDIDATE_ENV} to a directory containing muxd/")
    return Path(root).resolve()


def _muxd_candidate(port: int, scratch: Path) -> list[str]:
    _candidate_root()
    backend = os.environ.get(f"{CANDIDATE_ENV}_BACKEND", "epoll")
    return _muxd_argv(backend, port, scratch)


def _muxd(backend: str, port: int, scratch: Path) -> list[str]:
    if not muxd_available():
        raise ServerUnavailable("muxd is not in this checkout yet (no muxd/__main__.py)")
    return _muxd_argv(backend, port, scratch)


def _muxd_argv(backend: str, port: int, scratch: Path) -> list[str]:
    config = scratch / "muxd.ini"
    config.write_text(MUXD_CONFIG.format(port=port, backend=backend))
    return [sys.executable, "-m", "muxd", "--config", str(config)]


SERVERS: dict[str, ServerSpec] = {
    spec.name: spec
    for spec in [
        ServerSpec("muxd", "muxd, backend=epoll", functools.partial(_muxd, "epoll")),
        ServerSpec(
            "muxd-handover",
            "muxd, backend=epoll, hand-over on (a stand-in for PID 1's fd store)",
            functools.partial(_muxd, "epoll"),
            fdstore=True,
        ),
        ServerSpec("muxd-poll", "muxd, backend=poll", functools.partial(_muxd, "poll")),
        ServerSpec(
            "muxd-select",
            "muxd, backend=select",
            functools.partial(_muxd, "select"),
            max_connections=1000,
        ),
        ServerSpec(
            "muxd-candidate",
            f"muxd from ${CANDIDATE_ENV} (backend: ${CANDIDATE_ENV}_BACKEND, default epoll)",
            _muxd_candidate,
            cwd=_candidate_root,
        ),
        ServerSpec("c-epoll", "minimal C epoll echo (ceiling)", _c_epoll_peer),
        ServerSpec("uvloop", "uvloop Protocol", _uvloop_peer),
        ServerSpec(
            "asyncio-protocol",
            "asyncio Protocol",
            functools.partial(_python_module, "bench.peers.asyncio_protocol"),
        ),
        ServerSpec(
            "asyncio-streams",
            "asyncio Streams",
            functools.partial(_python_module, "bench.peers.asyncio_streams"),
        ),
        ServerSpec(
            "python-floor",
            "the least a Python epoll loop can do per message (a measuring stick)",
            functools.partial(_python_module, "bench.peers.python_floor"),
        ),
        ServerSpec(
            "select-textbook",
            "seed's textbook select loop",
            functools.partial(_python_module, "bench.peers.select_textbook"),
            max_connections=1000,
        ),
    ]
}


@dataclass
class RunningServer:
    spec: ServerSpec
    process: subprocess.Popen[bytes]
    port: int
    store: StoreProcess | None = None  # its counts are in .stats once the server stopped

    @property
    def pid(self) -> int:
        return self.process.pid


def free_port() -> int:
    """A fresh port per server start, so TIME_WAIT from the previous run never collides."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def pin_to_core(core: int) -> None:
    os.sched_setaffinity(0, {core})


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # Only an fdstore spec runs as under systemd (the runner itself may be a service).
    for variable in ("NOTIFY_SOCKET", "FDSTORE", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        env.pop(variable, None)
    # Peers and muxd must come from this checkout, not from an installed copy.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def _stderr_tail(log: Path, limit: int = 2000) -> str:
    try:
        return log.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


def wait_until_accepting(
    process: subprocess.Popen[bytes], port: int, log: Path, timeout: float = STARTUP_TIMEOUT_S
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerFailed(f"exited with {process.returncode}: {_stderr_tail(log)}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.02)  # poll interval while the server binds, not a settle delay
    raise ServerFailed(f"not accepting on port {port} after {timeout}s")


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=STOP_TIMEOUT_S)


@contextmanager
def running_server(
    spec: ServerSpec, core: int, startup_timeout: float = STARTUP_TIMEOUT_S
) -> Iterator[RunningServer]:
    """Starts ``spec`` pinned to ``core``, yields once it accepts, and always stops it
    (and then its file descriptor store, if it has one)."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{spec.name}-") as scratch_dir, \
            ExitStack() as stack:  # fmt: skip
        scratch = Path(scratch_dir)
        port = free_port()
        argv = spec.argv(port, scratch)
        cwd = spec.cwd()
        log = scratch / "stderr.log"
        env = _child_env()
        store = None
        if spec.fdstore:
            store = stack.enter_context(store_process(scratch / "notify", core))
            env.update(NOTIFY_SOCKET=store.path, FDSTORE=str(DEFAULT_STORE_MAX))
        with open(log, "wb") as stderr:
            process = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                preexec_fn=functools.partial(pin_to_core, core),
            )
        try:
            wait_until_accepting(process, port, log, startup_timeout)
            yield RunningServer(spec, process, port, store)
            if process.poll() is not None:
                raise ServerFailed(f"died during the run: {_stderr_tail(log)}")
        finally:
            stop_process(process)
