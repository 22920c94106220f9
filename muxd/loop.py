"""The event loop: the one place that ties listeners, poller, connections,
signals, timers and systemd together.

Order of work in one turn, and why:

1. Wait for readiness (timeout: the next timer, or 0 when a connection was
   promised another turn).
2. Dispatch every connection event. Closing happens here; *accepting does
   not*. Because no new descriptor is created while a batch is dispatched, a
   descriptor number closed by one event cannot be reused by a new connection
   before a later, stale event in the same batch names it (epoll(7), "event
   cache"): that later event simply finds no connection.
3. Give the promised extra turns (connections that stopped reading at the
   per-event cap; see connection.py).
4. Accept on the listeners that were ready, to EAGAIN.
5. Take queued signals; run due timers.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import math
import os
import resource
import signal
import socket
import struct
import termios
import time
from collections.abc import Sequence
from dataclasses import replace

from muxd import __version__
from muxd.access import AccessPolicy, client_address, client_group
from muxd.config import Config, ConfigError, changed_fields, load_config
from muxd.connection import AGAIN, READ_CHUNK, RECV_BUFFER, RECV_VIEW, Close, Connection
from muxd.fdstore import FdStore
from muxd.handover import RESTART_SIGNAL, HandOver, Inheritance, describe_takeover
from muxd.listeners import Listener
from muxd.logs import RateLimitedLog, set_level
from muxd.notify import Notifier, watchdog_interval
from muxd.pollers import READ, WRITE, FdOutOfRange, Poller
from muxd.resources import raise_nofile
from muxd.signals import SignalQueue
from muxd.timers import Timer, Timers
from muxd.udp import UdpEndpoint, UdpGuard

logger = logging.getLogger("muxd")

# accept(2) errors that mean "that one client went away before we took it".
_CLIENT_GONE = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN,
                errno.ENOPROTOOPT, errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH,
                errno.EOPNOTSUPP, errno.ENETUNREACH}
_OUT_OF_DESCRIPTORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
ACCEPT_RETRY_DELAY = 0.1
LINGER_CHECK = 0.05  # while stopping: how often to look whether a peer has acknowledged all
RESTART_ONLY_FIELDS = ("listen", "backend", "backlog", "workers", "udp", "handover")


class Counters:
    """What the daemon has done since it started (SIGUSR1 dumps them)."""

    def __init__(self) -> None:
        self.accepted = 0
        self.closed = dict.fromkeys(Close, 0)
        self.bytes_in = 0  # of closed connections; live ones are added when reported
        self.bytes_out = 0

    @property
    def refused(self) -> int:
        return self.closed[Close.LIMIT] + self.closed[Close.ACCESS]

    def describe(self, live: list[Connection]) -> str:
        bytes_in = self.bytes_in + sum(conn.bytes_in for conn in live)
        bytes_out = self.bytes_out + sum(conn.bytes_out for conn in live)
        closed = ", ".join(f"{reason.name.lower()} {count}"
                           for reason, count in self.closed.items())
        return (f"connections: {len(live)} open, {self.accepted} accepted, "
                f"{self.refused} refused; closed by reason: {closed}; "
                f"bytes in {bytes_in}, out {bytes_out}")


class EchoServer:
    def __init__(
        self,
        config: Config,
        config_path: str | None,
        listeners: list[Listener],
        poller: Poller,
        notifier: Notifier,
        udp_endpoints: Sequence[UdpEndpoint] = (),
        test_hooks: frozenset[str] = frozenset(),
        store: FdStore | None = None,
        store_capacity: int = 0,
        stored_listeners: Sequence[Listener] = (),
        inheritance: Inheritance | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.poller = poller
        self.notifier = notifier
        self.test_hooks = test_hooks
        self.listeners = {listener.fd: listener for listener in listeners}
        self.udp = {endpoint.fd: endpoint for endpoint in udp_endpoints}
        self.access = AccessPolicy.from_config(config)
        self.udp_guard = UdpGuard(config, self.access)
        self.conns: dict[int, Connection] = {}
        self._per_client: dict[object, int] = {}  # connections held per client group
        self.counters = Counters()
        self.timers = Timers()
        self.signals = SignalQueue()
        self.stopping = False
        self._retry: list[Connection] = []
        self._lingering: set[Connection] = set()  # stopping: waiting for echo to be acknowledged
        self._udp_retry: list[UdpEndpoint] = []
        self._ready_listeners: list[Listener] = []
        self._signalled = False
        self._now = time.monotonic()
        self._spare_fd = _open_spare_fd()
        self._housekeeping: Timer | None = None
        self._reported_status = ""
        self._refusals: dict[str, RateLimitedLog] = {}
        self._fd_exhaustion = RateLimitedLog(logging.ERROR)
        # Hand-over (handover.py): None unless systemd gave us a store.
        self.handover: HandOver | None = None
        self._stored_listeners = {listener.fd for listener in stored_listeners}
        self._inheritance = inheritance
        self._handed_over = False
        if store is not None:
            self.handover = HandOver(
                store, store_capacity, len(self._stored_listeners),
                lambda delay, work: self.timers.call_at(self._now + delay, work))

    # --- lifecycle -------------------------------------------------------

    def run(self) -> int:
        poller = self.poller
        for fd in [*self.listeners, *self.udp]:
            poller.register(fd, READ)
        poller.register(self.signals.fd, READ)
        self._take_over()
        self._schedule_housekeeping()
        interval = watchdog_interval()
        if interval is not None:
            self._ping_watchdog(interval)
        logger.info("listening on %s (%s backend)", self._addresses(), poller.name)
        if self.access.active:
            logger.info("access: allow %s; deny %s",
                        ", ".join(map(str, self.access.allow)) or "everyone",
                        ", ".join(map(str, self.access.deny)) or "no one")
        status = self._status()
        self.notifier.ready(status)
        self._reported_status = status
        try:
            self._run_until_stopped()
        finally:
            self._close_everything()
        if self._handed_over:
            logger.info("stopped for the restart: %s", self.counters.describe([]))
        else:
            logger.info("stopped: %s", self.counters.describe([]))
        return 0

    def _take_over(self) -> None:
        inheritance, self._inheritance = self._inheritance, None
        if self.handover is None or inheritance is None:
            return
        adopted = self.handover.adopt(inheritance, self.config.buffer_size,
                                      self.config.log_connections, self._now)
        for conn in adopted:
            want = conn._wanted()
            if want < 0:  # finished in the old process's last turn: only the close is left
                self.conns[conn.fd] = conn
                self._close(conn, want)
                continue
            self.poller.register(conn.fd, want)
            conn.interest = want
            self.conns[conn.fd] = conn
        if self.config.max_connections_per_ip:
            self._regroup_clients()
        if inheritance.state is not None or adopted or inheritance.own_listeners:
            logger.info("%s", describe_takeover(adopted, len(inheritance.own_listeners),
                                                inheritance.state))

    # --- the hot path ----------------------------------------------------

    def _run_until_stopped(self) -> None:
        """Turn the loop until stopped and every connection is gone.

        One function on purpose: it is the hot path. Everything a turn needs
        is bound to a local once, the serving dispatch is written out here
        rather than called, and the timer timeout is computed inline, because
        with few connections a turn carries only a handful of events and a
        Python call or attribute lookup per turn shows in the CPU cost per
        message (bench/RESULTS.md, "The hot-path commits").
        """
        poller = self.poller
        poller_poll = poller.poll
        timers = self.timers
        monotonic = time.monotonic
        conns_get = self.conns.get
        readable_only = poller.readable_only
        readable = poller.readable_mask
        writable = poller.writable_mask
        hangup = poller.hangup_mask
        infinity = math.inf
        now = self._now
        while not (self.stopping and not self.conns):
            retry = self._retry
            udp_retry = self._udp_retry
            timeout: float | None
            if retry or udp_retry:
                self._retry = []
                self._udp_retry = []
                timeout = 0.0
            else:
                timeout = timers.next_due - now
                if timeout < 0.0:
                    timeout = 0.0
                elif timeout == infinity:
                    timeout = None
            events = poller_poll(timeout)
            self._now = now = monotonic()
            if self.stopping:
                self._dispatch_stopping(events, now)
            else:
                for fd, event in events:
                    conn = conns_get(fd)
                    if conn is None:
                        self._other_event(fd)
                        continue
                    if event != readable_only or conn.interest != READ:
                        # Anything but the fast path below: the state machine.
                        # (Kept short on purpose: CPython 3.11 specialises the
                        # two comparisons above only if their jump over this
                        # branch fits in one byte, i.e. no EXTENDED_ARG; an
                        # unspecialised compare costs ~1% per message.)
                        want = conn.interest
                        if event & writable and conn.pending:
                            want = conn.on_writable()
                            if want < 0:
                                self._close(conn, want)
                                continue
                        if event & readable and want & READ:
                            want = conn.on_readable(event & hangup)
                        if want != conn.interest:
                            self._apply(conn, want)
                        continue
                    # The fast path, which nearly every message takes: a plain
                    # "readable" on a connection that owes nothing. One read
                    # and, if it was short (the queue is drained, so
                    # edge-triggering loses nothing), one send of the same
                    # bytes; when that takes them all, nothing about the
                    # connection changed but its byte count. EOF, a full buffer
                    # or an echo that fell short go back to the state machine
                    # (Connection.finish_read). This is on_readable's first
                    # iteration, inlined: a Python call per message costs 2-5%
                    # of the CPU.
                    sock = conn.sock
                    try:
                        received = sock.recv_into(RECV_BUFFER)
                    except BlockingIOError:
                        continue
                    except OSError:
                        self._close(conn, Close.RESET)
                        continue
                    if received:
                        try:
                            sent = sock.send(RECV_VIEW[:received])
                        except BlockingIOError:
                            sent = 0
                        except OSError:
                            self._close(conn, Close.RESET)
                            continue
                        if sent == received and received < READ_CHUNK:
                            conn.bytes_in += received
                            continue
                        want = conn.finish_read(received, sent)
                    else:
                        want = conn.finish_read(0, 0)
                    if want != conn.interest:
                        self._apply(conn, want)
            if retry:
                self._give_extra_turns(retry)
            for endpoint in udp_retry:
                self._udp_event(endpoint)
            if self._ready_listeners:
                ready, self._ready_listeners = self._ready_listeners, []
                for listener in ready:
                    self._accept(listener)
                if self.handover is not None:
                    self.handover.flush()  # one store message per accepting turn
            if self._signalled:
                self._signalled = False
                # The stop hook's restart signal first: with SIGTERM right
                # behind it, both can be taken in one go, in number order.
                for signum in sorted(self.signals.take(), key=RESTART_SIGNAL.__ne__):
                    self._on_signal(signum)
            if now >= timers.next_due:
                timers.run_due(now)

    def _apply(self, conn: Connection, want: int) -> None:
        if want < 0:
            self._close(conn, want)
            return
        if want & AGAIN:
            self._retry.append(conn)
            want &= ~AGAIN
        if want != conn.interest:
            self.poller.modify(conn.fd, want)
            conn.interest = want

    def _give_extra_turns(self, retry: list[Connection]) -> None:
        conns = self.conns
        for conn in retry:
            # Identity, not just the number: the descriptor may belong to a
            # newer connection by now.
            if conns.get(conn.fd) is conn and conn.interest & READ:
                # The event that carried a hang-up may be the one already
                # used up: read on to EAGAIN or EOF rather than trusting a
                # short read, or a FIN could go unnoticed for good.
                want = conn.on_readable(True)
                if want != conn.interest:
                    self._apply(conn, want)

    def _other_event(self, fd: int) -> None:
        listener = self.listeners.get(fd)
        if listener is not None:
            self._ready_listeners.append(listener)
        elif fd in self.udp:
            self._udp_event(self.udp[fd])
        elif fd == self.signals.fd:
            self._signalled = True
        # else: a stale event for a connection closed earlier in this batch

    def _udp_event(self, endpoint: UdpEndpoint) -> None:
        # Datagrams are answered in place: no descriptor is created, so this
        # is safe in the middle of a batch. Past the per-event cap the
        # endpoint gets another turn, or under edge-triggering it would wait
        # for the next datagram to make an edge.
        if endpoint.fd in self.udp and endpoint.on_readable(self.udp_guard, self._now):
            self._udp_retry.append(endpoint)

    # --- accepting -------------------------------------------------------

    def _accept(self, listener: Listener) -> None:
        accept = listener.sock.accept
        conns = self.conns
        config = self.config
        fd_limit = self.poller.fd_limit
        set_nodelay = listener.sock.family in (socket.AF_INET, socket.AF_INET6)
        while True:
            try:
                sock, peer = accept()
            except BlockingIOError:
                return
            except OSError as err:
                if err.errno in _CLIENT_GONE:
                    continue
                if err.errno in _OUT_OF_DESCRIPTORS:
                    self._out_of_descriptors(listener, err)
                else:
                    self._fd_exhaustion.log(f"accept on {listener.name} failed: {err}")
                    self._pause_accepting(listener)
                return
            self.counters.accepted += 1
            fd = sock.fileno()
            if len(conns) >= config.max_connections:
                self._refuse(sock, f"max_connections ({config.max_connections}) reached")
                continue
            group = None
            if self.access.active or config.max_connections_per_ip:
                group = self._admit(sock, peer)
                if group is False:
                    continue
            if fd >= fd_limit:
                self._refuse(sock, f"the {self.poller.name} backend cannot watch fd {fd} "
                                   f"(limit {fd_limit}; use epoll or poll to hold more)")
                continue
            try:
                sock.setblocking(False)
                if set_nodelay:
                    # Without it, delayed ACK meets Nagle and a 64 KiB echo
                    # takes ~44 ms here instead of ~20 µs.
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                # The peer's address is kept only when it will be logged: it is
                # a tuple and a string per connection held.
                conn = Connection(sock, peer if config.log_connections else None,
                                  config.buffer_size, self._now)
                self.poller.register(fd, READ)
            except (OSError, FdOutOfRange) as err:
                self._refuse(sock, f"cannot watch a new connection: {err}")
                continue
            conns[fd] = conn
            if self.handover is not None:
                self.handover.track(conn)
            if group is not None:
                conn.group = group
                self._per_client[group] = self._per_client.get(group, 0) + 1
            if config.log_connections:
                logger.info("connect %s on %s", _peer_name(peer), listener.name)

    def _admit(self, sock: socket.socket, peer: object) -> object:
        """Apply [access] and max_connections_per_ip to a new connection: its
        per-client group (None if not limited), or False if it was refused."""
        if not (isinstance(peer, tuple) and peer and peer[0]):
            return None  # not an IP client (a socket-activated unix socket)
        address = client_address(peer[0])
        if self.access.active and not self.access.permits(address):
            self._refuse(sock, f"{address} is not allowed by [access]", Close.ACCESS)
            return False
        limit = self.config.max_connections_per_ip
        if not limit:
            return None
        group = client_group(address, self.config.ipv6_prefix)
        if self._per_client.get(group, 0) >= limit:
            what = str(address) if address.version == 4 else \
                f"{address}/{self.config.ipv6_prefix} (grouped)"
            self._refuse(sock, f"max_connections_per_ip ({limit}) reached for {what}")
            return False
        return group

    def _refuse(self, sock: socket.socket, why: str, reason: Close = Close.LIMIT) -> None:
        # Closed at once, without reading a byte from it.
        self.counters.closed[reason] += 1
        sock.close()
        kind = why.partition(" (")[0] if reason == Close.LIMIT else "access"
        log = self._refusals.get(kind)
        if log is None:
            log = self._refusals[kind] = RateLimitedLog(logging.WARNING)
        log.log(f"refused a connection: {why}")

    def _out_of_descriptors(self, listener: Listener, err: OSError) -> None:
        # Stopping here would strand every client queued behind this one:
        # under edge-triggering no new edge comes until yet another client
        # connects, and under level-triggering the listener stays readable and
        # the loop would spin. Like libuv (uv__emfile_trick), give up a spare
        # descriptor kept for this moment, accept each waiting client and
        # close it at once, so it sees its connection end instead of hanging,
        # and stop at EAGAIN (Linux reports EMFILE before looking at the
        # queue). Where that cannot work (no spare, or the whole system is
        # out: ENFILE), do what nginx does: stop watching the listener and try
        # again shortly.
        closed = 0
        drained = False
        if self._spare_fd is not None:
            os.close(self._spare_fd)
            self._spare_fd = None
            try:
                while True:
                    try:
                        sock, _ = listener.sock.accept()
                    except BlockingIOError:
                        drained = True
                        break
                    except OSError as again:
                        if again.errno in _CLIENT_GONE:
                            continue
                        break
                    sock.close()
                    closed += 1
            finally:
                self._spare_fd = _open_spare_fd()
        self.counters.accepted += closed
        self.counters.closed[Close.LIMIT] += closed
        message = f"out of file descriptors ({errno.errorcode.get(err.errno, err.errno)}) " \
                  f"on {listener.name}: closed {closed} waiting connection(s) at once"
        if not drained:
            message += f"; retrying in {ACCEPT_RETRY_DELAY:g}s"
            self._pause_accepting(listener)
        self._fd_exhaustion.log(message + f" (RLIMIT_NOFILE is {_soft_nofile()})")

    def _pause_accepting(self, listener: Listener) -> None:
        self.poller.unregister(listener.fd)

        def resume() -> None:
            if listener.fd in self.listeners and not self.stopping:
                # Registering again makes epoll re-check readiness, so a
                # queue that filled meanwhile is reported without a new edge.
                self.poller.register(listener.fd, READ)

        self.timers.call_at(self._now + ACCEPT_RETRY_DELAY, resume)

    # --- closing ---------------------------------------------------------

    def _close(self, conn: Connection, reason: int) -> None:
        if self.stopping and reason == Close.EOF:
            reason = Close.SHUTDOWN
        fd = conn.fd
        del self.conns[fd]
        if conn.group is not None:
            remaining = self._per_client[conn.group] - 1
            if remaining:
                self._per_client[conn.group] = remaining
            else:
                del self._per_client[conn.group]
        try:
            self.poller.unregister(fd)
        except (OSError, KeyError):
            pass
        if self.handover is not None:
            self.handover.forget(conn)
        conn.sock.close()
        counters = self.counters
        counters.closed[Close(reason)] += 1
        counters.bytes_in += conn.bytes_in
        counters.bytes_out += conn.bytes_out
        if self.config.log_connections:
            logger.info("disconnect %s (%s): %d bytes in, %d echoed",
                        _peer_name(conn.peer), Close(reason).name.lower(),
                        conn.bytes_in, conn.bytes_out)

    def _close_everything(self) -> None:
        for conn in list(self.conns.values()):
            self._close(conn, Close.SHUTDOWN)
        for listener in list(self.listeners.values()):
            self._close_listener(listener)
        self._close_udp()
        self.signals.close()
        self.poller.close()
        if self._spare_fd is not None:
            os.close(self._spare_fd)
            self._spare_fd = None

    def _close_listener(self, listener: Listener) -> None:
        del self.listeners[listener.fd]
        try:
            self.poller.unregister(listener.fd)
        except (OSError, KeyError):
            pass  # not registered while accepting is paused
        if self.handover is not None and listener.fd in self._stored_listeners:
            self.handover.forget_listener(listener.sock)
        listener.sock.close()

    def _close_udp(self) -> None:
        for endpoint in self.udp.values():
            self.poller.unregister(endpoint.fd)
            endpoint.close()
        self.udp.clear()

    # --- signals ---------------------------------------------------------

    def _on_signal(self, signum: int) -> None:
        if signum == RESTART_SIGNAL:
            if self.handover is not None:
                self.handover.arm(self._now)
        elif signum == signal.SIGTERM and self.handover is not None \
                and self.handover.restarting(self._now) and not self.stopping:
            self._hand_over()
        elif signum in (signal.SIGTERM, signal.SIGINT):
            self._shutdown(signal.Signals(signum).name)
        elif signum == signal.SIGHUP:
            self._reload()
        elif signum == signal.SIGUSR1:
            logger.info("counters: %s; %s", self.counters.describe(list(self.conns.values())),
                        self.udp_guard.describe())
        elif signum == signal.SIGUSR2 and "hang-on-sigusr2" in self.test_hooks:
            logger.warning("test hook: SIGUSR2 hangs the event loop (MUXD_TEST_HOOKS)")
            while True:  # deliberately stuck, so the watchdog can be seen to work
                time.sleep(3600)

    def _shutdown(self, signame: str) -> None:
        if self.stopping:
            logger.warning("%s again: closing %d connection(s) without waiting",
                           signame, len(self.conns))
            for conn in list(self.conns.values()):
                self._close(conn, Close.SHUTDOWN)
            return
        self.stopping = True
        self.notifier.send("STOPPING=1", f"STATUS=stopping ({signame})")
        for listener in list(self.listeners.values()):
            self._close_listener(listener)
        self._close_udp()
        self._retry.clear()
        for conn in list(self.conns.values()):
            conn.read_closed = True
            self._settle_stopping(conn)
        timeout = self.config.shutdown_timeout
        logger.info("%s: stopping; %d connection(s) still flushing echo (up to %gs)",
                    signame, len(self.conns), timeout)
        if self.conns:
            # Ask systemd for the drain time on top of its own stop timeout.
            self.notifier.send(f"EXTEND_TIMEOUT_USEC={int((timeout + 5) * 1e6)}")
            self.timers.call_at(self._now + timeout, self._shutdown_deadline)

    def _hand_over(self) -> None:
        """SIGTERM of a restart: leave every connection in the store for the next
        process, with the state it needs, and exit without closing any."""
        assert self.handover is not None
        self.stopping = True
        self.notifier.send("STOPPING=1", "STATUS=restarting: handing connections over")
        for listener in list(self.listeners.values()):
            if listener.fd not in self._stored_listeners:
                self._close_listener(listener)  # a socket unit's: systemd holds it
        self._close_udp()
        self._retry.clear()
        unstored = self.handover.hand_over(self.conns.values(), len(self._stored_listeners),
                                           __version__)
        for conn in unstored:
            # Not in the store: closed at once, echo sent as far as the socket takes it.
            if conn.pending:
                conn.on_writable()
            conn.discard_input()
            self._close(conn, Close.SHUTDOWN)
        self._handed_over = True
        for conn in self.conns.values():
            # Our copy only: the store keeps the connection open.
            self.handover.forget(conn)
            self.poller.unregister(conn.fd)
            conn.sock.close()
        self.conns.clear()
        self._per_client.clear()
        for listener in list(self.listeners.values()):
            self._close_listener(listener)

    def _dispatch_stopping(self, events: list[tuple[int, int]], now: float) -> None:
        """Dispatch while stopping: no more echo; flush what is pending while
        dropping the peer's input, then close."""
        conns_get = self.conns.get
        readable = self.poller.readable_mask
        writable = self.poller.writable_mask
        for fd, event in events:
            conn = conns_get(fd)
            if conn is None:
                self._other_event(fd)
                continue
            if event & writable and conn.pending and conn.on_writable() == Close.RESET:
                self._close(conn, Close.RESET)
                continue
            if event & readable and conn.interest & READ:
                result = conn.discard_input()
                if result == Close.RESET:
                    self._close(conn, Close.RESET)
                    continue
            self._settle_stopping(conn)  # at EOF the peer may still read its echo

    def _settle_stopping(self, conn: Connection) -> None:
        if not conn.pending:
            # Nothing left in our buffer, but the kernel may still hold echo
            # the peer has not acknowledged (a slow reader's small window).
            # Closing a socket with unread input answers with RST, which
            # throws that echo away, so: drain the input, and close now only
            # if the peer has finished sending (no input can follow) or
            # everything sent has been acknowledged. Otherwise linger: keep
            # dropping input and check again shortly, until the deadline.
            if not conn.peer_finished:
                conn.discard_input()
            if conn.peer_finished or _unacknowledged(conn.sock) == 0:
                self._lingering.discard(conn)
                self._close(conn, Close.SHUTDOWN)
                return
            if conn not in self._lingering:
                self._lingering.add(conn)
                if len(self._lingering) == 1:
                    self.timers.call_at(self._now + LINGER_CHECK, self._check_lingering)
            want = READ
        else:
            # Watch reads only until the peer's EOF: under level-triggering a
            # socket at EOF stays readable and would spin the loop.
            want = WRITE if conn.peer_finished else READ | WRITE
        if want != conn.interest:
            self.poller.modify(conn.fd, want)
            conn.interest = want

    def _check_lingering(self) -> None:
        for conn in list(self._lingering):
            if self.conns.get(conn.fd) is conn:
                self._settle_stopping(conn)
            else:
                self._lingering.discard(conn)
        if self._lingering:
            self.timers.call_at(self._now + LINGER_CHECK, self._check_lingering)

    def _shutdown_deadline(self) -> None:
        if self.conns:
            logger.warning("shutdown_timeout reached: closing %d connection(s) with echo "
                           "still unsent", len(self.conns))
        for conn in list(self.conns.values()):
            self._close(conn, Close.SHUTDOWN)

    def _reload(self) -> None:
        self.notifier.reloading()
        old = self.config
        try:
            new = load_config(self.config_path)
        except ConfigError as err:
            logger.error("reload failed, keeping the running configuration: %s", err)
            self.notifier.ready(self._status())
            return
        changed = changed_fields(old, new)
        needs_restart = [name for name in RESTART_ONLY_FIELDS if name in changed]
        if needs_restart:
            logger.warning("reload: %s changed in %s; that takes effect only after a restart",
                           ", ".join(needs_restart), new.source)
            new = replace(new, **{name: getattr(old, name) for name in RESTART_ONLY_FIELDS})
        self.config = new
        set_level(new.log_level)
        self.access = AccessPolicy.from_config(new)
        self.udp_guard.configure(new, self.access)
        if (new.max_connections_per_ip, new.ipv6_prefix) != (
                old.max_connections_per_ip, old.ipv6_prefix):
            self._regroup_clients()
        if new.nofile > old.nofile:
            raise_nofile(new.nofile)
        if new.idle_timeout != old.idle_timeout:
            self._schedule_housekeeping()
        applied = [name for name in changed_fields(old, new) if name != "source"]
        logger.info("reloaded %s: %s", new.source,
                    ", ".join(applied) + " changed" if applied else "nothing changed")
        self.notifier.ready(self._status())

    def _regroup_clients(self) -> None:
        """Count open connections under the per-client limit as it now stands
        (a limit switched on by a reload counts the clients already here)."""
        self._per_client.clear()
        limited = bool(self.config.max_connections_per_ip)
        for conn in self.conns.values():
            conn.group = None
            if not limited:
                continue
            try:
                host = conn.sock.getpeername()[0]
            except (OSError, IndexError):
                continue
            if host:
                conn.group = client_group(client_address(host), self.config.ipv6_prefix)
                self._per_client[conn.group] = self._per_client.get(conn.group, 0) + 1

    # --- timers ----------------------------------------------------------

    def _schedule_housekeeping(self) -> None:
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        idle = self.config.idle_timeout
        interval = min(1.0, max(0.05, idle / 4)) if idle else 1.0
        self._housekeeping = self.timers.call_at(
            self._now + interval, lambda: self._housekeep(interval)
        )

    def _housekeep(self, interval: float) -> None:
        idle = self.config.idle_timeout
        if idle:
            # A connection whose progress has not changed since an earlier
            # sweep has been idle at least since that sweep: closing waits
            # for the full idle_timeout after it, so it is never early and
            # at most one sweep interval late.
            now = self._now
            cutoff = now - idle
            expired = []
            for conn in self.conns.values():
                progress = conn.progress
                if progress != conn.progress_mark:
                    conn.progress_mark = progress
                    conn.idle_since = now
                elif conn.idle_since <= cutoff:
                    expired.append(conn)
            for conn in expired:
                self._close(conn, Close.IDLE)
        if self.notifier.enabled and not self.stopping:
            status = self._status()
            if status != self._reported_status:  # at most once per interval, only on change
                self.notifier.send(f"STATUS={status}")
                self._reported_status = status
        for log in self._refusals.values():
            log.flush()
        self._fd_exhaustion.flush()
        self.udp_guard.flush_log()
        self._housekeeping = self.timers.call_at(
            self._now + interval, lambda: self._housekeep(interval)
        )

    def _ping_watchdog(self, interval: float) -> None:
        self.notifier.send("WATCHDOG=1")
        self.timers.call_at(self._now + interval, lambda: self._ping_watchdog(interval))

    # --- descriptions ----------------------------------------------------

    def _addresses(self) -> str:
        return ", ".join([*(listener.name for listener in self.listeners.values()),
                          *(endpoint.name for endpoint in self.udp.values())])

    def _status(self) -> str:
        count = len(self.conns)
        noun = "connection" if count == 1 else "connections"
        status = f"serving {count} {noun} on {self._addresses()} ({self.poller.name})"
        counters = self.counters
        if counters.accepted:
            status += f"; {counters.accepted} accepted, {counters.refused} refused"
        if self.handover is not None and self.handover.taken_over:
            status += f"; {self.handover.taken_over} taken over at start"
        guard = self.udp_guard
        if guard.echoed or guard.dropped:
            status += f"; UDP {guard.echoed} echoed, {sum(guard.dropped.values())} dropped"
        return status


def _open_spare_fd() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _unacknowledged(sock: socket.socket) -> int:
    """Bytes sent on ``sock`` that the peer has not acknowledged yet (SIOCOUTQ)."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    except OSError:
        return 0


def _soft_nofile() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _peer_name(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer) if peer else "unknown peer"
