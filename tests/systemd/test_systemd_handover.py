"""Hand-over in a booted systemd: clients streaming through restarts, an upgrade
(install.sh of this tree under a newer version, then restart), a kill -9 and a watchdog kill
never see an error or an end, and every byte comes back (the crashes: only the loss the
README allows, counted).

Issue 11's numbers: 200 clients, of which 20 stop reading so that echo piles up in muxd
before every event and 10 half-close midway (each at a different event), in both modes
(muxd's own port, and muxd.socket). Kept light for a shared 2-core machine: the 170
streaming clients are driven by one selector thread, each sending one message of up to
4 KiB and waiting for its echo (and a little longer) before the next; the pilers are
threads that mostly wait, and each client's bytes are verified and dropped whenever its
echo is level with what it sent, so memory stays bounded.
"""

from __future__ import annotations

import contextlib
import heapq
import random
import re
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from conftest import NEWER_SOURCE_INSIDE, NewerTree
from nspawn import (
    Container,
    add_drop_in,
    connected,
    echo_roundtrip,
    edit_ini,
    pending_echo,
    pile_budget,
    pile_up,
    run_packaging_script,
    wait_until,
)

pytestmark = pytest.mark.systemd

CLIENTS, PILERS, HALF_CLOSERS = 200, 20, 10  # the rest stream
STREAMERS = CLIENTS - PILERS - HALF_CLOSERS
MAX_MESSAGE = 4096  # a streamer's message: 1..MAX_MESSAGE random bytes
PAUSE = 0.1  # a streamer waits 0..2*PAUSE (mean PAUSE) after each echo before the next
BUFFER_SIZE = 65536
CRASH_LOSS_BOUND = BUFFER_SIZE  # README: at most buffer_size per connection and crash
STRICT_STALL = 30.0  # a restart loses nothing: wait as long as it takes
CRASH_STALL = 6.0  # after a crash, bytes muxd held may never come: give up on them
RUN_LIMIT = 600.0  # no client thread runs longer than this
SETTLE_AT = 1 << 20  # a streamer's buffered bytes are verified and dropped beyond this

# A loop that hangs on SIGUSR2 (for the watchdog kill) and a start limit that allows
# this test's quick succession of restarts (a hit limit would empty the store).
TEST_UNIT = """\
[Unit]
StartLimitBurst=50
[Service]
Environment=MUXD_TEST_HOOKS=hang-on-sigusr2
WatchdogSec=2s
"""


def _same_prefix(a: bytes, i: int, b: bytes, j: int) -> int:
    """How many bytes from a[i:] and b[j:] agree (slices compared in C, then bisected)."""
    length = min(len(a) - i, len(b) - j)
    agreed = 0
    step = 1 << 20
    while agreed < length:
        n = min(step, length - agreed)
        if a[i + agreed:i + agreed + n] == b[j + agreed:j + agreed + n]:
            agreed += n
            continue
        low, high = 0, n  # a prefix of `low` bytes agrees, one of `high` does not
        while high - low > 1:
            middle = (low + high) // 2
            if a[i + agreed:i + agreed + middle] == b[j + agreed:j + agreed + middle]:
                low = middle
            else:
                high = middle
        return agreed + low
    return agreed


def find_gaps(sent: bytes, received: bytes) -> list[tuple[int, int]]:
    """Where ``received`` skips bytes of ``sent``: (offset in sent, bytes skipped).
    Anything else that differs (a byte changed, duplicated, reordered) fails."""
    gaps = []
    i = j = 0
    while True:
        n = _same_prefix(sent, i, received, j)
        i, j = i + n, j + n
        if j == len(received):
            return gaps
        resumed = sent.find(received[j:j + 64], i)
        assert resumed > i, f"received bytes at {j} are not sent bytes at or after {i}"
        gaps.append((i, resumed - i))
        i = resumed


class Ledger:
    """What one client sent and got back. Whenever its echo is level with what it sent
    (all in, or the rest given up on after a crash), ``settle`` verifies the buffered
    bytes, records any gap at its offset in the whole stream, and drops them."""

    def __init__(self) -> None:
        self.sent = bytearray()
        self.received = bytearray()
        self.deficit = 0  # bytes of `sent` given up on (a crash's loss)
        self.settled_sent = 0  # bytes of the stream before `sent`
        self.settled_received = 0
        self.gaps: list[tuple[int, int]] = []  # (offset in the stream, bytes lost)

    def owed(self) -> int:
        return len(self.sent) - len(self.received) - self.deficit

    def total_received(self) -> int:
        return self.settled_received + len(self.received)

    def settle(self) -> None:
        assert self.owed() == 0, f"{-self.owed()} bytes more than sent (or echo after a stall)"
        gaps = find_gaps(self.sent, self.received)
        covered = len(self.received) + sum(size for _, size in gaps)
        if covered < len(self.sent):  # the end was lost: a gap nothing came after (yet)
            gaps.append((covered, len(self.sent) - covered))
        self.gaps += [(self.settled_sent + at, size) for at, size in gaps]
        self.settled_sent += len(self.sent)
        self.settled_received += len(self.received)
        self.sent.clear()
        self.received.clear()
        self.deficit = 0


class Client:
    def __init__(self, sock: socket.socket, name: str, role: str) -> None:
        self.sock = sock
        self.name = name
        self.role = role  # stream, pile or half-close
        self.ledger = Ledger()
        self.failures: list[str] = []
        self.strict_until = 0  # bytes received before the first crash: no gap up to there
        self.marks: list[tuple[str, int]] = []  # (event, bytes received as it began)
        self.eof = False
        self.half_closed = False


class Streamers(threading.Thread):
    """All streaming clients in one selector loop: each sends a message of random bytes,
    waits for its whole echo, pauses a moment, and sends the next, until ``stop``."""

    def __init__(self, clients: list[Client], crashes: Callable[[], bool]) -> None:
        super().__init__(daemon=True, name="streamers")
        self.clients = clients
        self.crashes = crashes  # True once a crash is part of the run: stalls may be losses
        self.rngs = [random.Random(index) for index in range(len(clients))]
        self.stop = threading.Event()
        self.done = threading.Event()
        self.failures: list[str] = []

    def run(self) -> None:
        try:
            self._run()
        except Exception as err:  # noqa: BLE001 - any failure is the test's finding
            self.failures.append(f"streamers: {err!r}")
        finally:
            self.done.set()

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        now = time.monotonic()
        deadline = now + RUN_LIMIT
        due: list[tuple[float, int]] = []  # (when, index): the next message of each idle one
        waiting: dict[int, float] = {}  # index -> when its echo last made progress
        for index, client in enumerate(self.clients):
            client.sock.setblocking(False)
            selector.register(client.sock, selectors.EVENT_READ, index)
            due.append((now + self.rngs[index].uniform(0, 2 * PAUSE), index))
        heapq.heapify(due)
        next_scan = now
        while not (self.stop.is_set() and not waiting):
            now = time.monotonic()
            assert now < deadline, f"still streaming after {RUN_LIMIT}s"
            while due and due[0][0] <= now:
                _, index = heapq.heappop(due)
                if not self.stop.is_set() and self._send(index, selector):
                    waiting[index] = now
            timeout = min(due[0][0] - now if due else 0.1, 0.1)
            for key, _ in selector.select(max(timeout, 0)):
                index = key.data
                client = self.clients[index]
                try:
                    chunk = client.sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError as err:
                    self._fail(index, selector, f"{err!r}")
                    waiting.pop(index, None)
                    continue
                if not chunk:
                    client.eof = True
                    self._fail(index, selector, "the connection ended after "
                               f"{client.ledger.total_received()} bytes")
                    waiting.pop(index, None)
                    continue
                ledger = client.ledger
                ledger.received += chunk
                if index not in waiting:
                    self._fail(index, selector, f"{len(chunk)} bytes of echo came when none "
                               "was owed (after it was given up on?)")
                    continue
                waiting[index] = time.monotonic()
                if ledger.owed() <= 0:
                    del waiting[index]
                    self._level(index, selector, due)
            if now >= next_scan:  # stalls, a few times a second rather than every turn
                next_scan = now + 0.25
                stall = CRASH_STALL if self.crashes() else STRICT_STALL
                for index, since in list(waiting.items()):
                    if now - since <= stall:
                        continue
                    del waiting[index]
                    if not self.crashes():
                        self._fail(index, selector, f"no echo for {stall}s")
                        continue
                    ledger = self.clients[index].ledger
                    ledger.deficit += ledger.owed()  # lost in the crash (README)
                    self._level(index, selector, due)
        selector.close()

    def _send(self, index: int, selector: selectors.BaseSelector) -> bool:
        client = self.clients[index]
        if client.failures:
            return False
        rng = self.rngs[index]
        message = rng.randbytes(rng.randint(1, MAX_MESSAGE))
        try:
            # One message at a time, far below the socket's buffer: it goes in whole.
            sent = client.sock.send(message)
        except OSError as err:
            self._fail(index, selector, f"send: {err!r}")
            return False
        client.ledger.sent += message[:sent]
        if sent < len(message):
            self._fail(index, selector, f"sent only {sent} of a {len(message)}-byte message")
            return False
        return True

    def _level(self, index: int, selector: selectors.BaseSelector,
               due: list[tuple[float, int]]) -> None:
        """Its echo is all in (or given up on): maybe verify, then schedule the next."""
        client = self.clients[index]
        try:
            if len(client.ledger.sent) >= SETTLE_AT:
                client.ledger.settle()
        except AssertionError as err:
            self._fail(index, selector, str(err))
            return
        heapq.heappush(due, (time.monotonic() + self.rngs[index].uniform(0, 2 * PAUSE), index))

    def _fail(self, index: int, selector: selectors.BaseSelector, why: str) -> None:
        client = self.clients[index]
        client.failures.append(f"{client.name}: {why}")
        with contextlib.suppress(KeyError, ValueError):
            selector.unregister(client.sock)


class Piler(threading.Thread):
    """A client that stops reading before every event so that echo piles up in muxd (it
    holds buffer_size with reading paused), and reads it all back after the event. A
    half-closer does the same but shuts its sending side down on round ``half_close_at``
    (echo still owed), then expects that echo and the end of the connection."""

    def __init__(self, client: Client, seed: int, rounds: int, budget: int,
                 crashes: Callable[[], bool], half_close_at: int | None = None) -> None:
        super().__init__(daemon=True, name=client.name)
        self.client = client
        self.rng = random.Random(seed)
        self.rounds = rounds
        self.budget = budget
        self.crashes = crashes
        self.half_close_at = half_close_at
        self.piled = threading.Event()
        self.read_back = threading.Event()
        self.done = threading.Event()

    def run(self) -> None:
        client = self.client
        try:
            # Small client buffers: less of the pile sits in the client's own kernel.
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            for number in range(self.rounds):
                pile_up(client.sock, self.rng, self.budget, client.ledger.sent)
                if number == self.half_close_at:
                    client.sock.shutdown(socket.SHUT_WR)
                    client.half_closed = True
                self.piled.set()
                assert self.read_back.wait(RUN_LIMIT), "never told to read back"
                self.read_back.clear()
                self._receive(half_closed=number == self.half_close_at)
                client.ledger.settle()
                if number == self.half_close_at:
                    if not client.eof:
                        client.sock.settimeout(CRASH_STALL + 4)
                        client.eof = client.sock.recv(1) == b""
                    return
        except Exception as err:  # noqa: BLE001 - any failure is the test's finding
            client.failures.append(f"{client.name}: {err!r}")
        finally:
            self.done.set()

    def _receive(self, half_closed: bool) -> None:
        """Read until the echo is level with what was sent; after a crash, a stall means
        the rest was lost, and so does the end of a half-closed connection (muxd sent
        what it still had, then finished)."""
        ledger = self.client.ledger
        sock = self.client.sock
        sock.setblocking(True)
        while ledger.owed() > 0:
            stall = CRASH_STALL if self.crashes() else STRICT_STALL
            sock.settimeout(stall)
            try:
                chunk = sock.recv(1 << 20)
            except TimeoutError:
                if not self.crashes():
                    raise AssertionError(f"no echo for {stall}s") from None
                ledger.deficit += ledger.owed()
                return
            if not chunk:
                self.client.eof = True
                if half_closed and self.crashes():
                    ledger.deficit += ledger.owed()
                    return
                raise AssertionError(
                    f"the connection ended after {ledger.total_received()} bytes")
            ledger.received += chunk


class Dialer(threading.Thread):
    """New connections while an event happens: each must be served."""

    def __init__(self, container: Container, port: int) -> None:
        super().__init__(daemon=True, name="dialer")
        self.container = container
        self.port = port
        self.stop = threading.Event()
        self.served = 0
        self.failures: list[str] = []

    def run(self) -> None:
        attempt = 0
        # Bounded, yet enough for an upgrade (install.sh, ~15 s on a busy machine) and the
        # restart after it: a dialer that ran out would wait in vain for "served afterwards".
        while not self.stop.is_set() and attempt < 4000:
            attempt += 1
            payload = f"dial {attempt}\n".encode()
            try:
                with connected(self.container, self.port) as sock:
                    got = echo_roundtrip(sock, payload, timeout=20)
                if got == payload:
                    self.served += 1
                else:
                    self.failures.append(f"{attempt}: got {got!r}")
            except OSError as err:
                self.failures.append(f"{attempt}: {err!r}")
            time.sleep(0.02)


def restarted(container: Container, old_pid: int) -> Callable[[], bool]:
    def check() -> bool:
        pid = container.main_pid()
        return pid not in (0, old_pid) and container.show("muxd", "ActiveState") == "active"

    return check


def run_scenario(container: Container, events: list[str], upgrade: NewerTree | None = None
                 ) -> None:
    port = 7
    crashed = threading.Event()
    clients = []
    for index in range(CLIENTS):
        role = ("stream" if index < STREAMERS else
                "pile" if index < STREAMERS + PILERS else "half-close")
        sock = container.connect(port)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        clients.append(Client(sock, f"{role}-{index}", role))
    for client in clients:
        # An echo proves muxd accepted it: one still in the listen queue at a restart
        # would be accepted anew by the next process, not taken over.
        assert echo_roundtrip(client.sock, b"hello\n") == b"hello\n", client.name
    streaming = [c for c in clients if c.role == "stream"]
    streamers = Streamers(streaming, crashed.is_set)
    budget = pile_budget(container)
    pilers = [Piler(client, index, len(events), budget, crashed.is_set,
                    # the half-closers spread over the events, so each kind carries some
                    half_close_at=(index - STREAMERS - PILERS) % len(events)
                    if client.role == "half-close" else None)
              for index, client in enumerate(clients) if client.role != "stream"]
    streamers.start()
    for piler in pilers:
        piler.start()
    pids = [container.main_pid()]
    started = time.monotonic()
    for number, event in enumerate(events):
        for piler in pilers:  # each piles up echo again, or has half-closed and finished
            wait_until(lambda p=piler: p.piled.is_set() or p.done.is_set(), timeout=60,
                       what=f"{piler.name} to pile up echo")
        active_pilers = [p for p in pilers if p.piled.is_set()]
        for piler in active_pilers:
            piler.piled.clear()
        # (A half-closed one may be finished before the event if muxd did not have to
        # hold its echo; the pending echo checked below says it did.)
        live = [c for c in clients if not (c.failures or c.eof or c.half_closed)]
        if event in ("kill", "watchdog") and not crashed.is_set():
            # From here on, stalls may be the crash's loss; what came before stays strict.
            for client in clients:
                client.strict_until = client.ledger.total_received()
            crashed.set()
        for client in clients:
            client.marks.append((event, client.ledger.total_received()))
        dialer = Dialer(container, port)
        dialer.start()
        if event == "upgrade":
            # install.sh of the newer tree (reinstalls the package, replaces the units,
            # daemon-reload), then the restart an upgrade needs.
            assert upgrade is not None
            run_packaging_script(container, "install.sh", source=NEWER_SOURCE_INSIDE)
            container.systemctl("restart", "muxd", timeout=60)
        elif event == "restart":
            container.systemctl("restart", "muxd", timeout=60)
        elif event == "kill":
            container.systemctl("kill", "--kill-who=main", "--signal=SIGKILL", "muxd")
        elif event == "watchdog":
            container.systemctl("kill", "--kill-who=main", "--signal=SIGUSR2", "muxd")
        wait_until(restarted(container, pids[-1]), timeout=30, interval=0.1,
                   what=f"event {number} ({event}): a new main PID")
        pids.append(container.main_pid())
        this_run = f"_SYSTEMD_INVOCATION_ID={container.show('muxd', 'InvocationID')}"
        took_over = container.wait_for_journal(
            this_run, match=lambda e: "took over" in e["MESSAGE"], timeout=15)
        message = took_over[-1]["MESSAGE"]
        adopted = int(re.search(r"took over (\d+) connections", message).group(1))  # type: ignore[union-attr]
        assert adopted >= len(live), (event, message, len(live))  # no client dropped
        if event in ("restart", "upgrade"):
            assert f"from PID {pids[-2]}" in message, message
            # Every piler's echo was held in muxd (paused at buffer_size) and came along.
            assert pending_echo(message) >= len(active_pilers) * BUFFER_SIZE - 512, (
                event, message, len(active_pilers))
        if event == "upgrade":
            assert upgrade is not None
            assert f"(muxd {upgrade.old_version}," in message, message
            starting = [e["MESSAGE"] for e in container.journal(this_run)
                        if " starting with " in e["MESSAGE"]]
            assert starting and starting[0].startswith(f"muxd {upgrade.version} starting"), (
                starting)
        # Attempts made after the event are served too, not only those queued during it.
        wait_until(lambda d=dialer, n=dialer.served: d.served >= n + 3 or d.failures,
                   timeout=30,
                   what=f"event {number} ({event}): new connections served afterwards")
        dialer.stop.set()
        dialer.join(60)
        if event in ("restart", "upgrade"):
            assert not dialer.failures, (event, dialer.failures)
        assert dialer.served > 0
        for piler in active_pilers:
            piler.read_back.set()
        failures = streamers.failures + [f for c in clients for f in c.failures]
        assert not failures, (number, event, failures)
        print(f"{event}: {time.monotonic() - started:.1f}s", flush=True)
    assert len(set(pids)) == len(pids), pids  # a new main PID every time

    # Stop streaming, let the pilers read their last round back, verify every byte.
    streamers.stop.set()
    assert streamers.done.wait(STRICT_STALL + 30), "the streamers did not finish"
    for piler in pilers:
        assert piler.done.wait(STRICT_STALL + 30), f"{piler.name} did not finish"
    failures = streamers.failures + [f for c in clients for f in c.failures]
    assert not failures, failures
    crashes = sum(e in ("kill", "watchdog") for e in events)
    lost = 0
    for client in clients:
        client.ledger.settle()
        for at, size in client.ledger.gaps:
            assert at >= client.strict_until, (client.name, "lost bytes in a restart", at,
                                               size, client.marks)
            assert size <= CRASH_LOSS_BOUND, (client.name, size)
        assert len(client.ledger.gaps) <= crashes, (client.name, client.ledger.gaps)
        lost += sum(size for _, size in client.ledger.gaps)
        if client.role == "half-close":
            assert client.eof, f"{client.name}: no EOF after its echo"
    print(f"verified {sum(c.ledger.settled_received for c in clients)} bytes of "
          f"{len(clients)} clients; crash loss {lost} bytes; "
          f"{time.monotonic() - started:.1f}s", flush=True)

    # A plain stop afterwards: every client sees its echo and then EOF, as today.
    finals = [c for c in clients if c.role != "half-close"]
    for client in finals:
        client.sock.setblocking(True)
        client.sock.sendall(b"last words\n")
    container.systemctl("stop", "muxd", timeout=60)
    for client in finals:
        client.sock.settimeout(10)
        tail = bytearray()
        while True:
            chunk = client.sock.recv(65536)
            if not chunk:
                break
            tail += chunk
        assert bytes(tail) == b"last words\n", (client.name, bytes(tail[-40:]))
    for client in clients:
        client.sock.close()


@pytest.fixture
def installed_again(muxd: Container) -> Iterator[Container]:
    """muxd as installed, put back after a test that upgrades it (so later tests run this
    tree's version, not the newer one)."""
    muxd.run(["cp", "-a", "/opt/muxd", "/opt/muxd.before-upgrade"])
    try:
        yield muxd
    finally:
        muxd.systemctl("stop", "muxd.socket", "muxd.service", check=False, timeout=60)
        muxd.run(["sh", "-c", "rm -rf /opt/muxd /etc/muxd/muxd.ini.dist && "
                  "mv /opt/muxd.before-upgrade /opt/muxd"])


def test_connections_survive_restarts_upgrade_kill_and_watchdog_in_own_port_mode(
        installed_again: Container, newer_tree: NewerTree) -> None:
    muxd = installed_again
    add_drop_in(muxd, "muxd.service", "test-handover", TEST_UNIT)
    muxd.systemctl("start", "muxd")
    run_scenario(muxd, ["restart", "restart", "upgrade", "restart", "kill", "watchdog"],
                 upgrade=newer_tree)
    assert muxd.show("muxd", "NFileDescriptorStore") == "0"


def test_connections_survive_restart_and_kill_under_socket_activation(
        muxd: Container) -> None:
    add_drop_in(muxd, "muxd.service", "test-handover", TEST_UNIT)
    muxd.systemctl("start", "muxd.socket")
    with connected(muxd) as sock:
        assert echo_roundtrip(sock, b"wake\n") == b"wake\n"
    run_scenario(muxd, ["restart", "restart", "kill"])


def test_stop_is_not_a_restart(muxd: Container) -> None:
    muxd.systemctl("start", "muxd")
    with connected(muxd) as sock:
        assert echo_roundtrip(sock, b"hi\n") == b"hi\n"
        wait_until(lambda: muxd.show("muxd", "NFileDescriptorStore") == "2", timeout=10,
                   what="the listener and the connection in the store")
        mark = muxd.journal_mark()
        muxd.systemctl("stop", "muxd")
        sock.settimeout(5)
        assert sock.recv(10) == b""
    entries = muxd.journal("-u", "muxd", after=mark)
    assert not any("handing over" in e["MESSAGE"] for e in entries)
    muxd.systemctl("start", "muxd")
    entries = muxd.journal("-u", "muxd", after=mark)
    assert not any("took over" in e["MESSAGE"] for e in entries)


FOREIGN = """\
import array, os, socket
if "LISTEN_FDS" not in os.environ:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    state = os.memfd_create("bogus")
    os.write(state, b"muxd-handover-1\\n" + b"\\xff" * 32)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    regular = os.open("/etc/hostname", os.O_RDONLY)
    for name, fd in (("conn", regular), ("conn", udp.fileno()), ("state-1", state)):
        notify.sendmsg([f"FDSTORE=1\\nFDNAME={name}".encode()],
                       [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))],
                       0, os.environ["NOTIFY_SOCKET"])
os.execv("/opt/muxd/bin/muxd", ["muxd", "--config", "/etc/muxd/muxd.ini"])
"""


def test_foreign_descriptors_and_a_corrupt_state_are_dropped(muxd: Container) -> None:
    muxd.write_file("/usr/local/lib/muxd-test/store_foreign.py", FOREIGN)
    add_drop_in(muxd, "muxd.service", "test-foreign", """\
[Service]
ExecStart=
ExecStart=/opt/muxd/bin/python3 /usr/local/lib/muxd-test/store_foreign.py
""")
    muxd.systemctl("start", "muxd")
    with connected(muxd) as kept:
        assert echo_roundtrip(kept, b"one\n") == b"one\n"
        wait_until(lambda: muxd.show("muxd", "NFileDescriptorStore") == "5", timeout=10,
                   what="3 foreign descriptors, the listener and the connection stored")
        mark = muxd.journal_mark()
        muxd.systemctl("restart", "muxd")
        muxd.wait_for_journal("-u", "muxd", after=mark,
                              match=lambda e: "took over" in e["MESSAGE"])
        messages = [e["MESSAGE"] for e in muxd.journal("-u", "muxd", after=mark)]
        assert any("dropped inherited" in m and "regular file" in m for m in messages)
        assert any("dropped inherited" in m and "datagram socket" in m for m in messages)
        assert any("ignored the hand-over state" in m for m in messages)
        assert any("took over 1 connections" in m for m in messages), messages
        assert echo_roundtrip(kept, b"two\n") == b"two\n"
        with connected(muxd) as fresh:
            assert echo_roundtrip(fresh, b"new\n") == b"new\n"
        # The listener and `kept`: the foreign ones and the state are gone, and so is
        # `fresh`, closed by its client.
        wait_until(lambda: muxd.show("muxd", "NFileDescriptorStore") == "2", timeout=10,
                   what="only muxd's own descriptors left in the store")


def test_a_store_of_four_keeps_every_connection(muxd: Container) -> None:
    """The store holds the listener, one parking socket and, at a hand-over, the state:
    FileDescriptorStoreMax=4 (which kept 2 of 5 connections when each connection was
    stored) keeps them all, and the store does not grow with them."""
    add_drop_in(muxd, "muxd.service", "test-full", """\
[Service]
FileDescriptorStoreMax=4
Environment=FDSTORE=4
""")
    muxd.systemctl("start", "muxd")
    mark = muxd.journal_mark()
    clients = [muxd.connect(7) for _ in range(40)]
    for sock in clients:
        assert echo_roundtrip(sock, b"x\n") == b"x\n"
    assert muxd.show("muxd", "NFileDescriptorStore") == "2"
    muxd.systemctl("restart", "muxd")
    muxd.wait_for_journal("-u", "muxd", after=mark, match=lambda e: "took over" in e["MESSAGE"])
    messages = [e["MESSAGE"] for e in muxd.journal("-u", "muxd", after=mark)]
    assert any("took over 40 connections" in m for m in messages), messages
    assert not any("not kept" in m for m in messages), messages
    wait_until(lambda: muxd.show("muxd", "NFileDescriptorStore") == "2", timeout=10,
               what="the listener and one parking socket in the store")
    for sock in clients:
        assert echo_roundtrip(sock, b"y\n") == b"y\n"
        sock.close()


def test_handover_off_is_todays_restart(muxd: Container) -> None:
    edit_ini(muxd, {("server", "handover"): "no"})
    muxd.systemctl("start", "muxd")
    with connected(muxd) as sock:
        assert echo_roundtrip(sock, b"hi\n") == b"hi\n"
        muxd.systemctl("restart", "muxd")
        sock.settimeout(5)
        assert sock.recv(10) == b""
    assert muxd.show("muxd", "NFileDescriptorStore") == "0"

