"""Start the real muxd as a subprocess and talk to it the way systemd and clients do.

``NotifySocket`` is what systemd does for a Type=notify service: an AF_UNIX
datagram socket whose path goes into NOTIFY_SOCKET. Tests wait on its
messages (READY=1, STATUS=, STOPPING=1 ...) instead of sleeping.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import resource
import select
import selectors
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

DEFAULT_TIMEOUT = 10.0


def free_port(family: int = socket.AF_INET) -> int:
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def wait_until(predicate: Callable[[], object], timeout: float = DEFAULT_TIMEOUT,
               interval: float = 0.02, what: str = "condition") -> object:
    """Poll ``predicate`` until it returns something truthy, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def raise_own_nofile(wanted: int) -> None:
    """Tests that open thousands of client sockets must first be allowed to."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= wanted, "cannot raise RLIMIT_NOFILE"


class NotifySocket:
    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[dict[str, str]] = []

    def _receive(self, timeout: float) -> dict[str, str] | None:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return None
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        self.messages.append(fields)
        return fields

    def wait_for(self, key: str, value: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, contains: str | None = None) -> dict[str, str]:
        """The next message (after those already seen) that sets ``key`` as asked."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"no notification {key}={value or contains or '*'} within {timeout}s; "
                    f"got {self.messages}"
                )
            message = self._receive(remaining)
            if message is None or key not in message:
                continue
            if value is not None and message[key] != value:
                continue
            if contains is not None and contains not in message[key]:
                continue
            return message

    def sent_after_stopping(self, settle: float = 0.3) -> list[dict[str, str]]:
        """The messages from STOPPING=1 on, once whatever follows within ``settle`` s is in."""
        with contextlib.suppress(AssertionError):
            self.wait_for("READY", timeout=settle)
        start = next(i for i, message in enumerate(self.messages) if "STOPPING" in message)
        return self.messages[start:]

    def close(self) -> None:
        self.sock.close()


class Muxd:
    """One muxd process with its own config file, notify socket and log."""

    def __init__(self, workdir: Path, config_text: str | None = None, *,
                 args: tuple[str, ...] = (), env: dict[str, str] | None = None,
                 nofile: tuple[int, int] | None = None, notify: bool = True,
                 preexec: Callable[[], None] | None = None,
                 command: list[str] | None = None, pass_fds: tuple[int, ...] = (),
                 notify_socket: NotifySocket | None = None) -> None:
        self.workdir = workdir
        self.config_path = workdir / "muxd.ini"
        if config_text is not None:
            self.write_config(config_text)
            args = ("--config", str(self.config_path), *args)
        self.log_path = workdir / f"muxd-{time.monotonic_ns()}.log"
        self.notify = notify_socket or (
            NotifySocket(workdir / f"notify-{time.monotonic_ns()}") if notify else None)
        self._owns_notify = notify_socket is None
        full_env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("NOTIFY_SOCKET", "LISTEN_", "WATCHDOG_", "JOURNAL_"))}
        if self.notify is not None:
            full_env["NOTIFY_SOCKET"] = self.notify.path
        full_env.update(env or {})

        def before_exec() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, nofile)
            if preexec is not None:
                preexec()

        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen(
            command or [sys.executable, "-m", "muxd", *args],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            env=full_env, cwd=workdir, preexec_fn=before_exec, pass_fds=pass_fds,
        )
        self.pid = self.process.pid

    def write_config(self, text: str) -> None:
        self.config_path.write_text(textwrap.dedent(text))

    def wait_ready(self, timeout: float = DEFAULT_TIMEOUT) -> dict[str, str]:
        assert self.notify is not None
        try:
            return self.notify.wait_for("READY", "1", timeout=timeout)
        except AssertionError:
            raise AssertionError(
                f"muxd not ready; exit {self.process.poll()}; log:\n{self.log}"
            ) from None

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        wait_until(lambda: text in self.log, timeout, what=f"log line containing {text!r}")

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        return self.process.wait(timeout)

    def stop(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def close(self) -> None:
        if self.process.poll() is None:
            # Its workers (workers > 1) get a parent-death signal and drain on their own;
            # wait for them by pidfd, so that no test leaves an orphan running.
            workers = [pidfd for pidfd in map(_pidfd, children(self.pid)) if pidfd is not None]
            self.process.kill()
            self.process.wait(DEFAULT_TIMEOUT)
            for pidfd in workers:
                _reap_orphan(pidfd, DEFAULT_TIMEOUT)
        self._log.close()
        if self.notify is not None and self._owns_notify:
            self.notify.close()


def children(pid: int) -> set[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return {int(child) for child in path.read_text().split()}
    except OSError:
        return set()


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


def _reap_orphan(pidfd: int, timeout: float) -> None:
    """Wait for a process (not our child) to exit; SIGKILL it if it does not in time."""
    try:
        if not select.select([pidfd], [], [], timeout)[0]:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            raise AssertionError(f"a worker outlived its supervisor by {timeout}s (killed)")
    finally:
        os.close(pidfd)


def socket_activation(config: Path, *sockets: socket.socket, names: tuple[str, ...] = ()
                      ) -> dict[str, object]:
    """Keyword arguments for ``Muxd``/``start_muxd`` that start muxd with ``sockets`` as
    fds 3, 4, ... and LISTEN_PID its own PID, as systemd's socket activation does (a shell
    knows its PID, then execs muxd)."""
    def become_listen_fds() -> None:
        # Up high first: a source may itself be fd 3 or 4.
        high = [fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD, 64) for sock in sockets]
        for index, fd in enumerate(high):
            os.dup2(fd, 3 + index)  # dup2 leaves the new descriptor inheritable
            os.close(fd)

    variables = f"LISTEN_PID=$$ LISTEN_FDS={len(sockets)}"
    if names:
        variables += f" LISTEN_FDNAMES={':'.join(names)}"
    shell = f'{variables} exec "{sys.executable}" -m muxd --config {config}'
    return {"preexec": become_listen_fds, "command": ["/bin/sh", "-c", shell],
            "pass_fds": tuple(range(3, 3 + len(sockets)))}


def server_config(port: int, backend: str = "auto", **limits: object) -> str:
    """A config listening on 127.0.0.1:port with the given [limits] keys."""
    lines = ["[server]", f"listen = 127.0.0.1:{port}", f"backend = {backend}", "[limits]"]
    lines += [f"{key} = {value}" for key, value in limits.items()]
    return "\n".join(lines) + "\n"


def connect(port: int, host: str = "127.0.0.1", timeout: float = DEFAULT_TIMEOUT
            ) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def connect_slow_reader(port: int, receive_buffer: int = 4096) -> socket.socket:
    """A client with a tiny receive window (set before connecting, so it counts)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect(("127.0.0.1", port))
    return sock


def push_until_stalled(sock: socket.socket, payload: bytes, stall: float = 0.5,
                       timeout: float = DEFAULT_TIMEOUT) -> int:
    """Send ``payload`` (cyclically) without reading until the peer stops taking bytes
    for ``stall`` seconds, i.e. the daemon has paused reading from us; returns bytes sent.

    Fails if the daemon keeps reading for ``timeout`` seconds."""
    sock.setblocking(False)
    sent = 0
    stalled_since = None
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                offset = sent % len(payload)
                sent += sock.send(payload[offset:offset + 65536])
                stalled_since = None
            except BlockingIOError:
                now = time.monotonic()
                stalled_since = stalled_since or now
                if now - stalled_since >= stall:
                    return sent
                time.sleep(0.01)
    finally:
        sock.setblocking(True)
    raise AssertionError(f"the daemon kept reading {sent} bytes from a client that never reads")


def echo_once(sock: socket.socket, payload: bytes) -> bytes:
    """Send ``payload`` and return its echo (short if the peer ends first), reading while
    writing: sending all of it before reading would need kernel buffers that hold the whole
    payload minus what the server may owe, which a host under TCP memory pressure (many
    sockets, much queued) does not grant, and the echo would deadlock by design. Fails
    when nothing moves either way for the socket's timeout (none: waits as long as it takes)."""
    timeout = sock.gettimeout()
    view = memoryview(payload)
    sent = 0
    received = bytearray()
    with selectors.DefaultSelector() as selector:
        selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
        while len(received) < len(payload):
            ready = selector.select(timeout)
            if not ready:
                raise TimeoutError(f"echo stalled {timeout}s: {sent} of {len(payload)} "
                                   f"bytes sent, {len(received)} received")
            events = ready[0][1]
            if events & selectors.EVENT_WRITE:
                with contextlib.suppress(BlockingIOError):
                    sent += sock.send(view[sent:sent + 65536], socket.MSG_DONTWAIT)
                if sent == len(payload):
                    selector.modify(sock, selectors.EVENT_READ)
            if events & selectors.EVENT_READ:
                try:
                    chunk = sock.recv(min(len(payload) - len(received), 1 << 20),
                                     socket.MSG_DONTWAIT)
                except BlockingIOError:
                    continue
                if not chunk:
                    break
                received += chunk
    return bytes(received)


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            break
        chunks += chunk
    return bytes(chunks)


def raw_exchange(port: int, request: bytes, timeout: float = DEFAULT_TIMEOUT) -> bytes:
    """Send ``request`` and read until the server closes (``b"<reset>"`` if it resets)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        try:
            return recv_until_eof(sock)
        except ConnectionResetError:
            return b"<reset>"


def recv_until_eof(sock: socket.socket, limit: int = 1 << 30) -> bytes:
    data = bytearray()
    while len(data) < limit:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        data += chunk
    return bytes(data)


def sees_connection_end(sock: socket.socket, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """True when the server ended the connection (EOF or reset) within ``timeout``."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return True


# --- helpers for the fault, property and soak tests ------------------------
# (appended; imported here so the section above stays untouched)

import re  # noqa: E402
import struct  # noqa: E402


def reset_close(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the kernel sends RST instead of FIN, dropping anything
    queued either way (what a crashing client or a middlebox timeout looks like)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def wait_fds(daemon: Muxd, expected: int, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Wait until the daemon holds exactly ``expected`` descriptors (its idle count)."""
    seen: list[int] = []

    def settled() -> bool:
        seen.append(daemon.open_fds())
        return seen[-1] == expected

    try:
        wait_until(settled, timeout, what=f"the daemon's fd count to return to {expected}")
    except AssertionError:
        raise AssertionError(
            f"descriptor leak: daemon holds {seen[-1]} fds, idle value {expected}; "
            f"fds: {sorted(os.listdir(f'/proc/{daemon.pid}/fd'), key=int)}"
        ) from None


_ERROR_MARKERS = (" ERROR: ", " CRITICAL: ", "Traceback", "<3>", "<2>")


def unprovoked_errors(log: str, provoked: tuple[str, ...] = ()) -> list[str]:
    """Lines of ``log`` that report an error (or a traceback) and contain none of the
    ``provoked`` substrings, i.e. the errors the test did not cause on purpose."""
    return [line for line in log.splitlines()
            if any(marker in line for marker in _ERROR_MARKERS)
            and not any(text in line for text in provoked)]


_COUNTERS = re.compile(r"counters: connections: (\d+) open, (\d+) accepted, \d+ refused; "
                       r"closed by reason: (.*?); bytes in (\d+), out (\d+)"
                       r"(?:, dropped while stopping (\d+))?")


def counters_lines(daemon: Muxd) -> list[dict[str, int]]:
    """Every SIGUSR1 counters line logged so far, parsed: open, accepted, the
    closed-by-reason counts (eof, reset, idle, limit, shutdown, access), bytes_in,
    bytes_out, dropped (input thrown away while stopping)."""
    parsed = []
    for opened, accepted, closed, bytes_in, bytes_out, dropped in _COUNTERS.findall(daemon.log):
        counts = {"open": int(opened), "accepted": int(accepted), "bytes_in": int(bytes_in),
                  "bytes_out": int(bytes_out), "dropped": int(dropped or 0)}
        for reason, count in re.findall(r"(\w+) (\d+)", closed):
            counts[reason] = int(count)
        parsed.append(counts)
    return parsed


def read_counters(daemon: Muxd, timeout: float = DEFAULT_TIMEOUT) -> dict[str, int]:
    """SIGUSR1 the daemon and parse the counters line it logs (see counters_lines)."""
    before = len(counters_lines(daemon))
    daemon.signal(signal.SIGUSR1)
    found = wait_until(lambda: (lambda lines: lines if len(lines) > before else None)(
        counters_lines(daemon)), timeout, what="the SIGUSR1 counters line")
    return found[-1]  # type: ignore[index]


class EchoProbe:
    """A well-behaved client in a thread: echo a random message, check every byte,
    repeat until stopped (or ``max_seconds``). Any wrong byte, error, or an echo
    taking longer than ``max_stall`` seconds is recorded in ``failures`` and ends
    the probe."""

    def __init__(self, port: int, *, max_stall: float = 2.0, max_size: int = 16384,
                 seed: int = 0, max_seconds: float = 600.0) -> None:
        import random
        import threading

        self.port = port
        self.max_stall = max_stall
        self.max_size = max_size
        self.max_seconds = max_seconds
        self.rng = random.Random(seed)
        self.verified = 0
        self.bytes_verified = 0
        self.worst_latency = 0.0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._running = threading.Event()
        self._running.set()
        self._idle = threading.Event()
        self._thread = threading.Thread(target=self._run, name="echo-probe", daemon=True)

    def start(self) -> EchoProbe:
        self._thread.start()
        return self

    def stop(self) -> EchoProbe:
        self._stop.set()
        self._thread.join(self.max_stall + 5)
        if self._thread.is_alive():
            self.failures.append("the probe thread did not finish")
        return self

    def pause(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Stop echoing (between two echoes) until ``resume``, e.g. while measuring
        the daemon's CPU time when nothing should be happening."""
        self._running.clear()
        if self._thread.is_alive() and not self._idle.wait(timeout):
            raise AssertionError("the probe did not pause")

    def resume(self) -> None:
        self._idle.clear()
        self._running.set()

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        try:
            sock = connect(self.port, timeout=self.max_stall)
        except OSError as err:
            self.failures.append(f"connect: {err!r}")
            return
        with sock:
            while not self._stop.is_set() and time.monotonic() < deadline:
                if not self._running.is_set():
                    self._idle.set()
                    self._running.wait(1.0)
                    continue
                payload = self.rng.randbytes(self.rng.randint(1, self.max_size))
                started = time.monotonic()
                try:
                    sock.sendall(payload)
                    echoed = recv_exactly(sock, len(payload))
                except OSError as err:
                    self.failures.append(f"echo #{self.verified + 1}: {err!r} after "
                                         f"{time.monotonic() - started:.3f}s")
                    return
                latency = time.monotonic() - started
                self.worst_latency = max(self.worst_latency, latency)
                if echoed != payload:
                    what = ("connection ended" if payload.startswith(echoed)
                            else "wrong bytes")
                    self.failures.append(f"echo #{self.verified + 1}: {what} "
                                         f"({len(echoed)} of {len(payload)} received)")
                    return
                if latency > self.max_stall:
                    self.failures.append(f"echo #{self.verified + 1}: stalled {latency:.3f}s")
                    return
                self.verified += 1
                self.bytes_verified += len(payload)
