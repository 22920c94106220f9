"""The event loop: the one place that ties listeners, poller, connections,
signals, timers and systemd together.

Order of work in one turn, and why:

1. Wait for readiness (timeout: the next timer, or 0 when a connection, a
   UDP endpoint or a listener was promised another turn).
2. Dispatch every connection event. Closing happens here; *accepting does
   not*. Because no new descriptor is created while a batch is dispatched, a
   descriptor number closed by one event cannot be reused by a new connection
   before a later, stale event in the same batch names it (epoll(7), "event
   cache"): that later event simply finds no connection.
3. Give the extra turns promised in the turn before (connections that
   stopped reading at the per-event cap, see connection.py; UDP endpoints
   that stopped at theirs). What is promised during a turn is given in the
   next one, after a poll without waiting, never in the same one: so each
   turn's work is bounded (by the caps, times the sources), and a source that
   floods cannot keep the loop from its other events, signals and timers.
4. Accept on the listeners that were ready, up to a budget per listener
   (admission.py); one stopped by its budget is promised the next turn, as
   edge-triggering would give no new edge for the clients still queued.
5. Take queued signals; run due timers.

The loop owns the hot function, the dispatch of events and extra turns, and
that order; every other concern has a room of its own, which the loop calls
and which never calls the loop back except through what it was handed:

* ``admission.py``: accept, admit or refuse, out of descriptors;
* ``proxy_wait.py``: with ``proxy_protocol``, connections waiting for their
  PROXY header, which reach it through the dispatch of other descriptors;
* ``stopping.py``: the graceful stop (drain, linger, deadline);
* ``reload.py``: apply a new configuration (SIGHUP);
* ``housekeeping.py``: the idle sweep and log flushing;
* ``report.py``: counters, STATUS=, READY=1, WATCHDOG=1, descriptions;
* ``handover.py``: keeping connections across restarts and crashes (parked
  per accepting turn in a socket systemd's file descriptor store holds,
  parking.py; handed over at a restart's SIGTERM, taken over at start);
* ``figures.py``: the metrics endpoint (or a worker's line to its
  supervisor), and the figures it gathers from the shared state at scrape
  time; the loop hands it the events of its descriptors;
* ``state.py``: what they all share (connection table, poller, timers,
  counters) and ``Shared.close``, the one way a connection ends.
"""

from __future__ import annotations

import logging
import math
import signal
import socket
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from muxd import __version__
from muxd.admission import Admission
from muxd.config import Config
from muxd.connection import AGAIN, READ_CHUNK, RECV_BUFFER, RECV_VIEW, Close, Connection, read_size
from muxd.fdstore import FdStore
from muxd.handover import RESTART_SIGNAL, HandOver, Inheritance
from muxd.housekeeping import Housekeeping
from muxd.listeners import Listener
from muxd.notify import Notifier, watchdog_interval
from muxd.pollers import READ, Poller
from muxd.reload import Reload
from muxd.report import Reporter
from muxd.signals import SignalQueue
from muxd.state import Shared
from muxd.stopping import Stopping
from muxd.udp import UdpEndpoint

if TYPE_CHECKING:
    from muxd.proxy_wait import HeaderWait

logger = logging.getLogger("muxd")

ECHO_VIEWS = 64  # lengths whose echo view the fast path keeps (a view is ~200 bytes)


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
        metrics_sockets: Sequence[socket.socket] = (),
        metrics_channel: socket.socket | None = None,
    ) -> None:
        self.shared = shared = Shared(config, config_path, listeners, udp_endpoints, poller,
                                      notifier, time.monotonic())
        self.poller = poller
        self.test_hooks = test_hooks
        self.conns = shared.conns
        self.timers = shared.timers
        self.signals = SignalQueue()
        # Extra turns promised for the next turn, by fd: a source promised
        # twice in one turn still gets one turn.
        self._retry: dict[int, Connection] = {}
        self._udp_retry: dict[int, UdpEndpoint] = {}
        self._ready_listeners: list[Listener] = []
        self._signalled = False
        self.admission = Admission(shared)
        flushes = [self.admission.flush_logs, shared.udp_guard.flush_log]
        # proxy_protocol takes a restart, so the room exists for the life of
        # the loop or not at all; imported only then, because muxd imports
        # its loop after binding, while clients may already be waiting.
        self.header_wait: HeaderWait | None = None
        self._header_waiting: dict[int, object] = {}
        if config.proxy_protocol:
            from muxd.proxy_wait import HeaderWait

            self.header_wait = HeaderWait(shared, self.admission.admit_client, self._apply)
            self.admission.header_wait = self.header_wait.take
            self._header_waiting = self.header_wait.waiting
            flushes.append(self.header_wait.flush_logs)
        self.reporter = Reporter(shared)
        self.stopper = Stopping(shared, self._other_event, self._promise_turn)
        self.housekeeping = Housekeeping(shared, self.reporter, flushes)
        self.reload = Reload(shared, self.housekeeping.schedule)
        self.metrics = None
        if metrics_sockets or metrics_channel is not None:
            # Imported only here: a daemon that serves no metrics never loads
            # h11 and the exposition code, nor spends its start-up on them.
            from muxd.figures import MetricsRoom

            self.metrics = MetricsRoom(shared, self.reload, metrics_sockets, metrics_channel)
        # Hand-over: only when systemd gave us a file descriptor store.
        self.handover: HandOver | None = None
        self._inheritance = inheritance
        if store is not None:
            self.handover = shared.kept = HandOver(shared, store, store_capacity,
                                                   stored_listeners)

    # --- lifecycle -------------------------------------------------------

    def run(self) -> int:
        shared = self.shared
        poller = self.poller
        for fd in [*shared.listeners, *shared.udp]:
            poller.register(fd, READ)
        poller.register(self.signals.fd, READ)
        if self.handover is not None:
            self.handover.open()  # a parking socket in the store before the first accept
            if self._inheritance is not None:
                self.handover.take_over(self._inheritance, self.header_wait)
                self._inheritance = None
        if self.metrics is not None:
            self.metrics.start()
        self.housekeeping.schedule()
        interval = watchdog_interval()
        if interval is not None:
            self.reporter.start_watchdog(interval)
        self.reporter.announce_ready()
        try:
            self._run_until_stopped()
        finally:
            self._close_everything()
        self.reporter.stopped()
        return 0

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
        readable = poller.readable_mask
        writable = poller.writable_mask
        hangup = poller.hangup_mask
        infinity = math.inf
        shared = self.shared
        chunk, into = self._read_size()
        close = shared.close
        now = shared.now
        # The views of RECV_BUFFER the fast path has echoed, by length: slicing RECV_VIEW
        # makes a new memoryview (an allocation and a free, ~4% of the interpreter's work
        # per message on 3.11 and 3.13), and most traffic repeats a few lengths. Emptied
        # when full, so it holds at most ECHO_VIEWS lengths and follows the traffic.
        echo_views: dict[int, memoryview] = {}
        echo_view = echo_views.get
        while not (shared.stopping and not shared.conns):
            retry = self._retry
            udp_retry = self._udp_retry
            timeout: float | None
            if retry or udp_retry or self._ready_listeners:
                # Promises made during this turn go to fresh containers and
                # wait for the next turn.
                self._retry = {}
                self._udp_retry = {}
                timeout = 0.0
            else:
                retry = udp_retry = None
                timeout = timers.next_due - now
                if timeout < 0.0:
                    timeout = 0.0
                elif timeout == infinity:
                    timeout = None
            events = poller_poll(timeout)
            shared.now = now = monotonic()
            if shared.stopping:
                self.stopper.dispatch(events)
                if retry:  # while stopping, every promise is the stopper's
                    self.stopper.give_turns(retry)
                    retry = None
            else:
                for fd, event in events:
                    conn = conns_get(fd)
                    if conn is None:
                        self._other_event(fd)
                        continue
                    # One comparison for "a plain readable event on a connection
                    # that owes nothing" (event == readable_only and interest ==
                    # READ): every backend's readable_only is READ, and none
                    # reports an event equal to another interest (pollers.py).
                    if event != conn.interest:
                        # Anything but the fast path below: the state machine.
                        # (Kept short on purpose: CPython 3.11 specialises the
                        # comparison above only if its jump over this branch
                        # fits in one byte, i.e. no EXTENDED_ARG; the fast path
                        # first costs 1.3% per message there. 3.13 specialises
                        # it either way: bench/RESULTS.md, "Python 3.13".)
                        want = conn.interest
                        if event & writable and conn.pending:
                            want = conn.on_writable()
                            if want < 0:
                                close(conn, want)
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
                        received = sock.recv_into(into)
                    except BlockingIOError:
                        continue
                    except OSError:
                        close(conn, Close.RESET)
                        continue
                    if received:
                        echo = echo_view(received)
                        if echo is None:
                            if len(echo_views) == ECHO_VIEWS:
                                echo_views.clear()
                            echo = echo_views[received] = RECV_VIEW[:received]
                        try:
                            sent = sock.send(echo)
                        except BlockingIOError:
                            sent = 0
                        except OSError:
                            close(conn, Close.RESET)
                            continue
                        if sent == received and received < chunk:
                            conn.bytes_in += received
                            continue
                        want = conn.finish_read(received, sent, chunk)
                    else:
                        want = conn.finish_read(0, 0, chunk)
                    if want != conn.interest:
                        self._apply(conn, want)
            if retry:
                self._give_extra_turns(retry)
            if udp_retry:
                for endpoint in udp_retry.values():
                    self._udp_event(endpoint)
            if self._ready_listeners:
                ready, self._ready_listeners = self._ready_listeners, []
                listeners = shared.listeners
                for listener in ready:
                    if listener.fd in listeners and self.admission.accept(listener):
                        self._ready_listeners.append(listener)  # clients still queued
                if self.handover is not None:
                    self.handover.flush()  # one store message for this turn's admissions
            if self._signalled:
                self._signalled = False
                # The stop hook's restart signal first: with the SIGTERM right
                # behind it, both may be taken at once, in number order.
                for signum in sorted(self.signals.take(), key=RESTART_SIGNAL.__ne__):
                    self._on_signal(signum)
                chunk, into = self._read_size()  # a reload may have changed buffer_size
            if now >= timers.next_due:
                timers.run_due(now)

    def _read_size(self) -> tuple[int, bytearray | memoryview]:
        """What the fast path reads at most, and into what: no more than buffer_size, so
        an echo that falls short never leaves more than that owed (connection.py)."""
        chunk = read_size(self.shared.config.buffer_size)
        return chunk, RECV_BUFFER if chunk == READ_CHUNK else RECV_VIEW[:chunk]

    def _apply(self, conn: Connection, want: int) -> None:
        if want < 0:
            self.shared.close(conn, want)
            return
        if want & AGAIN:
            self._retry[conn.fd] = conn
            want &= ~AGAIN
        if want != conn.interest:
            self.poller.modify(conn.fd, want)
            conn.interest = want

    def _promise_turn(self, conn: Connection) -> None:
        self._retry[conn.fd] = conn  # the container for the next turn (see the top)

    def _give_extra_turns(self, retry: dict[int, Connection]) -> None:
        conns = self.conns
        for conn in retry.values():
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
        shared = self.shared
        listener = shared.listeners.get(fd)
        if listener is not None:
            if listener not in self._ready_listeners:  # already promised this turn
                self._ready_listeners.append(listener)
        elif fd in shared.udp:
            self._udp_event(shared.udp[fd])
        elif fd == self.signals.fd:
            self._signalled = True
        elif fd in self._header_waiting:
            self.header_wait.on_readable(fd)  # a PROXY header (proxy_wait.py)
        elif self.metrics is not None and self.metrics.owns(fd):
            self.metrics.on_event(fd)
        # else: a stale event for a connection closed earlier in this batch

    def _udp_event(self, endpoint: UdpEndpoint) -> None:
        # Datagrams are answered in place: no descriptor is created, so this
        # is safe in the middle of a batch. Past the per-event cap the
        # endpoint gets another turn, or under edge-triggering it would wait
        # for the next datagram to make an edge.
        shared = self.shared
        if endpoint.fd in shared.udp and endpoint.on_readable(shared.udp_guard, shared.now):
            self._udp_retry[endpoint.fd] = endpoint

    # --- signals ---------------------------------------------------------

    def _on_signal(self, signum: int) -> None:
        handover = self.handover
        if signum == RESTART_SIGNAL:
            if handover is not None:
                handover.arm()
        elif signum == signal.SIGTERM and handover is not None and handover.restarting() \
                and not self.shared.stopping:
            if self.metrics is not None:
                self.metrics.close()
            handover.hand_over(__version__, self.header_wait)
            self._retry.clear()
            self._udp_retry.clear()
            self._ready_listeners.clear()
        elif signum in (signal.SIGTERM, signal.SIGINT):
            if self.metrics is not None:
                self.metrics.close()
            if not self.shared.stopping:
                # Nothing more to read for echo, and nothing left to accept from;
                # from now on the promises are the stopper's (made in begin, too).
                self._retry.clear()
                self._udp_retry.clear()
                self._ready_listeners.clear()
            self.stopper.begin(signal.Signals(signum).name)
            if self.header_wait is not None:
                self.header_wait.close_all()
        elif signum == signal.SIGHUP:
            self.reload()
        elif signum == signal.SIGUSR1:
            self.reporter.dump_counters()
        elif signum == signal.SIGUSR2 and "hang-on-sigusr2" in self.test_hooks:
            logger.warning("test hook: SIGUSR2 hangs the event loop (MUXD_TEST_HOOKS)")
            while True:  # deliberately stuck, so the watchdog can be seen to work
                time.sleep(3600)

    # --- the end ---------------------------------------------------------

    def _close_everything(self) -> None:
        shared = self.shared
        if self.metrics is not None:
            self.metrics.close()
        shared.close_all()
        if self.header_wait is not None:
            self.header_wait.close_all()
        for listener in list(shared.listeners.values()):
            shared.close_listener(listener)
        shared.close_udp()
        if self.handover is not None:
            self.handover.finish()  # a stop: the parking sockets leave the store
        self.signals.close()
        self.poller.close()
        self.admission.close()
