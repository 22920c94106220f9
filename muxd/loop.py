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
import logging
import os
import socket
import time
from dataclasses import replace

from muxd.config import Config, ConfigError, changed_fields, load_config
from muxd.connection import AGAIN, Close, Connection
from muxd.listeners import Listener
from muxd.logs import RateLimitedLog, set_level
from muxd.notify import Notifier, watchdog_interval
from muxd.pollers import READ, FdOutOfRange, Poller
from muxd.resources import raise_nofile
from muxd.signals import SignalQueue
from muxd.timers import Timer, Timers

logger = logging.getLogger("muxd")

# accept(2) errors that mean "that one client went away before we took it".
_CLIENT_GONE = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN,
                errno.ENOPROTOOPT, errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH,
                errno.EOPNOTSUPP, errno.ENETUNREACH}
_OUT_OF_DESCRIPTORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
ACCEPT_RETRY_DELAY = 0.1
RESTART_ONLY_FIELDS = ("listen", "backend", "backlog")


class Counters:
    """What the daemon has done since it started (SIGUSR1 dumps them)."""

    def __init__(self) -> None:
        self.accepted = 0
        self.closed = dict.fromkeys(Close, 0)
        self.bytes_in = 0  # of closed connections; live ones are added when reported
        self.bytes_out = 0

    def describe(self, live: list[Connection]) -> str:
        bytes_in = self.bytes_in + sum(conn.bytes_in for conn in live)
        bytes_out = self.bytes_out + sum(conn.bytes_out for conn in live)
        closed = ", ".join(f"{reason.name.lower()} {count}"
                           for reason, count in self.closed.items())
        return (f"connections: {len(live)} open, {self.accepted} accepted; closed: {closed}; "
                f"bytes in {bytes_in}, out {bytes_out}")


class EchoServer:
    def __init__(
        self,
        config: Config,
        config_path: str | None,
        listeners: list[Listener],
        poller: Poller,
        notifier: Notifier,
        test_hooks: frozenset[str] = frozenset(),
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.poller = poller
        self.notifier = notifier
        self.test_hooks = test_hooks
        self.listeners = {listener.fd: listener for listener in listeners}
        self.conns: dict[int, Connection] = {}
        self.counters = Counters()
        self.timers = Timers()
        self.signals = SignalQueue()
        self.stopping = False
        self._retry: list[Connection] = []
        self._ready_listeners: list[Listener] = []
        self._signalled = False
        self._now = time.monotonic()
        self._spare_fd = _open_spare_fd()
        self._housekeeping: Timer | None = None
        self._reported_status = ""
        self._refusals = RateLimitedLog(logging.WARNING)
        self._fd_exhaustion = RateLimitedLog(logging.ERROR)

    # --- lifecycle -------------------------------------------------------

    def run(self) -> int:
        poller = self.poller
        for fd in self.listeners:
            poller.register(fd, READ)
        poller.register(self.signals.fd, READ)
        self._schedule_housekeeping()
        interval = watchdog_interval()
        if interval is not None:
            self._ping_watchdog(interval)
        logger.info("listening on %s (%s backend)", self._addresses(), poller.name)
        status = self._status()
        self.notifier.ready(status)
        self._reported_status = status
        try:
            self._run_until_stopped()
        finally:
            self._close_everything()
        logger.info("stopped: %s", self.counters.describe([]))
        return 0

    def _run_until_stopped(self) -> None:
        poller_poll = self.poller.poll
        timers = self.timers
        monotonic = time.monotonic
        while not (self.stopping and not self.conns):
            retry, self._retry = self._retry, []
            timeout = 0.0 if retry else timers.timeout(self._now)
            events = poller_poll(timeout)
            self._now = now = monotonic()
            if events:
                self._dispatch(events, now)
            if retry:
                self._give_extra_turns(retry)
            if self._ready_listeners:
                ready, self._ready_listeners = self._ready_listeners, []
                for listener in ready:
                    self._accept(listener)
            if self._signalled:
                self._signalled = False
                for signum in self.signals.take():
                    self._on_signal(signum)
            timers.run_due(now)

    # --- the hot path ----------------------------------------------------

    def _dispatch(self, events: list[tuple[int, int]], now: float) -> None:
        conns_get = self.conns.get
        readable = self.poller.readable_mask
        writable = self.poller.writable_mask
        hangup = self.poller.hangup_mask
        for fd, event in events:
            conn = conns_get(fd)
            if conn is None:
                self._other_event(fd)
                continue
            conn.last_active = now
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
                conn.last_active = self._now
                want = conn.on_readable(0)
                if want != conn.interest:
                    self._apply(conn, want)

    def _other_event(self, fd: int) -> None:
        listener = self.listeners.get(fd)
        if listener is not None:
            self._ready_listeners.append(listener)
        elif fd == self.signals.fd:
            self._signalled = True
        # else: a stale event for a connection closed earlier in this batch

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
            if config.log_connections:
                logger.info("connect %s on %s", _peer_name(peer), listener.name)

    def _refuse(self, sock: socket.socket, why: str) -> None:
        self.counters.closed[Close.LIMIT] += 1
        sock.close()
        self._refusals.log(f"refused a connection: {why}")

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
        try:
            self.poller.unregister(fd)
        except (OSError, KeyError):
            pass
        sock = conn.sock
        if reason in (Close.IDLE, Close.SHUTDOWN):
            _discard_unread(sock)
        sock.close()
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
        listener.sock.close()

    # --- signals ---------------------------------------------------------

    def _on_signal(self, signum: int) -> None:
        import signal

        if signum in (signal.SIGTERM, signal.SIGINT):
            self._shutdown(signal.Signals(signum).name)
        elif signum == signal.SIGHUP:
            self._reload()
        elif signum == signal.SIGUSR1:
            logger.info("counters: %s", self.counters.describe(list(self.conns.values())))
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
        for conn in list(self.conns.values()):
            self._apply(conn, conn.stop_reading())
        timeout = self.config.shutdown_timeout
        logger.info("%s: stopping; %d connection(s) still flushing echo (up to %gs)",
                    signame, len(self.conns), timeout)
        if self.conns:
            # Ask systemd for the drain time on top of its own stop timeout.
            self.notifier.send(f"EXTEND_TIMEOUT_USEC={int((timeout + 5) * 1e6)}")
            self.timers.call_at(self._now + timeout, self._shutdown_deadline)

    def _shutdown_deadline(self) -> None:
        if self.conns:
            logger.warning("shutdown_timeout reached: closing %d connection(s) with echo "
                           "still unsent", len(self.conns))
        for conn in list(self.conns.values()):
            self._close(conn, Close.SHUTDOWN)

    def _reload(self) -> None:
        self.notifier.reloading()
        old = self.config
        source = self.config_path or "the configuration"
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
        if new.nofile > old.nofile:
            raise_nofile(new.nofile)
        if new.idle_timeout != old.idle_timeout:
            self._schedule_housekeeping()
        applied = [name for name in changed_fields(old, new) if name != "source"]
        logger.info("reloaded %s: %s", new.source if new.source else source,
                    ", ".join(applied) + " changed" if applied else "nothing changed")
        self.notifier.ready(self._status())

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
            cutoff = self._now - idle
            for conn in [c for c in self.conns.values() if c.last_active <= cutoff]:
                self._close(conn, Close.IDLE)
        if self.notifier.enabled and not self.stopping:
            status = self._status()
            if status != self._reported_status:  # at most once per interval, only on change
                self.notifier.send(f"STATUS={status}")
                self._reported_status = status
        self._refusals.flush()
        self._fd_exhaustion.flush()
        self._housekeeping = self.timers.call_at(
            self._now + interval, lambda: self._housekeep(interval)
        )

    def _ping_watchdog(self, interval: float) -> None:
        self.notifier.send("WATCHDOG=1")
        self.timers.call_at(self._now + interval, lambda: self._ping_watchdog(interval))

    # --- descriptions ----------------------------------------------------

    def _addresses(self) -> str:
        return ", ".join(listener.name for listener in self.listeners.values())

    def _status(self) -> str:
        count = len(self.conns)
        noun = "connection" if count == 1 else "connections"
        return f"serving {count} {noun} on {self._addresses()} ({self.poller.name})"


def _open_spare_fd() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _soft_nofile() -> int:
    import resource

    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _discard_unread(sock: socket.socket) -> None:
    # Closing a socket with unread input makes the kernel send RST, which can
    # destroy echo the client has not read yet; read what is already queued
    # (bounded) so the close is an orderly FIN.
    try:
        for _ in range(16):
            if not sock.recv(65536):
                break
    except OSError:
        pass


def _peer_name(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer) if peer else "unknown peer"
