"""The metrics endpoint: ``GET /metrics`` over HTTP/1.1, served by the loop
that owns it (the event loop, or the supervisor's), with no thread.

This module owns the metrics listening sockets and its scrapers'
connections, and touches nothing else: it registers, modifies and
unregisters *its own* descriptors in the poller it is given, schedules its
own timers on the timers it is given, reads the configuration through the
getter it is given (who may scrape, how clients are told apart), and asks
``collect`` for the exposition text. The loop
that hosts it only hands it the events of its descriptors (``fds``, through
``on_event``) and calls ``close`` when it stops.

A listener's readiness is not acted on in the middle of a batch of events:
accepting is deferred to a timer due at once, which the loop runs after the
batch, so no descriptor is created while a batch is dispatched (loop.py says
why that matters). While it has scrapers, a timer every ``TICK`` seconds
closes those past their deadline.

HTTP is parsed by h11 (bring-your-own-I/O: it only turns bytes into events
and back, so it fits a non-blocking loop, and it is packaged by Debian),
not by hand: request smuggling and framing bugs are what hand-written
parsers get wrong. Each connection carries exactly one request: any path
but ``/metrics`` answers 404, any method but GET 405, anything h11 cannot
parse 400, and every answer says ``Connection: close``. Afterwards the
write side is shut and the peer's input dropped until its EOF, because
closing with unread input sends RST and could destroy the answer in
flight (a pipelined second request is such input).

Who may scrape is ``[metrics] allow`` when it is set, else ``[access]``
(``AccessPolicy.for_metrics``), read again when a reload replaces the
configuration; anyone else is closed at once, before anything is read and
before anyone is evicted for it.

No one client can keep the endpoint from its scrapers. A global limit alone
(what this endpoint had) hands it to whoever fills it: a client that holds
the places with unfinished requests and re-opens each as it times out had
every scrape refused. Raising the limit or shortening the timeout only asks
the holder to re-open faster; refusing newcomers is what lets the holder win.
So places are shared out by client (an IPv4 address, or an IPv6 network of
``[limits] ipv6_prefix`` bits, as ``max_connections_per_ip`` counts), and
room is made by taking a place back from whoever holds the most, rather
than by turning the newcomer away:

* one client holds at most ``MAX_PER_CLIENT`` (half of ``MAX_SCRAPERS``), so
  another always finds room beside it; a client at that limit that connects
  again has its *own* oldest connection closed for the new one (a scraper
  behind the same address as a leaky or hostile client still gets through,
  and the holder's churn costs only the holder);
* when all ``MAX_SCRAPERS`` places are taken (several clients), the place is
  taken from the client that would hold the most with the newcomer counted
  (its own on a tie);
* of that client's connections, the oldest still waiting for its request
  goes first (a scraper's request arrives with its first packet, so one that
  has waited longest is the likeliest slowloris), then the oldest whose
  answer is all sent (draining), then the oldest being sent one (a
  never-reader); one whose figures are being gathered is never taken (that
  lasts at most the gathering's own timeout), and if nothing can be taken
  the newcomer is closed after all.

The newcomer is the one connection never taken back for room: it is the
likeliest to be a scraper that has just come, as each scrape opens a
connection of its own. Finding room looks at most ``MAX_SCRAPERS`` connections, and the per-client
counts hold only clients with a connection here.

A slow or hostile scraper costs little and only for a while:

* at most ``MAX_SCRAPERS`` connections at once, at most ``MAX_PER_CLIENT``
  of one client; room for more is made as above, at most
  ``ACCEPTS_PER_TURN`` accepts a turn (a flood waits in the kernel's queue);
* each has ``REQUEST_TIMEOUT`` seconds from accept to its close, whatever
  it does (slowloris, a never-reader);
* a request line and headers are capped at ``MAX_REQUEST_BYTES``
  (h11's ``max_incomplete_event_size``) and read in ``READ_SIZE`` pieces;
  input after the request is read into one shared scratch buffer and
  dropped, at most ``MAX_DISCARD_READS`` reads per event;
* the answer is one bytes object, sent as the socket takes it.

So the endpoint holds at most ``MAX_SCRAPERS`` x (``MAX_REQUEST_BYTES`` +
``READ_SIZE`` + one answer) bytes, and no event costs more than a few
bounded reads or one send.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable

import h11

from muxd.access import AccessPolicy, client_address, client_group
from muxd.config import Config
from muxd.metrics import CONTENT_TYPE
from muxd.pollers import READ, WRITE, FdOutOfRange, Poller
from muxd.timers import Timer, Timers

logger = logging.getLogger("muxd")

MAX_SCRAPERS = 8
MAX_PER_CLIENT = MAX_SCRAPERS // 2
REQUEST_TIMEOUT = 3.0
MAX_REQUEST_BYTES = 8192
READ_SIZE = 4096
MAX_DISCARD_READS = 16
TICK = 0.25
ACCEPTS_PER_TURN = 64  # a flood of connections is taken a bounded bite per turn
_SCRATCH = bytearray(65536)  # dropped input lands here; the loop is single-threaded

_READING, _WAITING, _WRITING, _DRAINING = range(4)
# Which of a client's connections gives its place up first (lower first);
# one waiting for its figures never does.
_EVICTION_ORDER = {_READING: 0, _DRAINING: 1, _WRITING: 2}
_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed"}

Reply = Callable[[bytes], None]


class _Scraper:
    __slots__ = ("sock", "fd", "group", "http", "deadline", "state", "out", "interest")

    def __init__(self, sock: socket.socket, group: object, deadline: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.group = group  # the client it counts under (access.client_group)
        self.http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
        self.deadline = deadline
        self.state = _READING
        self.out = memoryview(b"")
        self.interest = 0  # 0: not registered


class MetricsEndpoint:
    def __init__(self, sockets: list[socket.socket], poller: Poller, timers: Timers,
                 clock: Callable[[], float], collect: Callable[[Reply], None],
                 config: Callable[[], Config]) -> None:
        """``clock`` is the host loop's monotonic reading for the current turn;
        ``config`` the configuration in force (a reload replaces it)."""
        self.poller = poller
        self._timers = timers
        self._clock = clock
        self._accept_timer: Timer | None = None
        self._tick_timer: Timer | None = None
        self._collect = collect
        self._config = config
        self._gate_of: Config | None = None  # what _policy and _ipv6_prefix were read from
        self._policy = AccessPolicy()
        self._ipv6_prefix = 64
        self._listeners = {sock.fileno(): sock for sock in sockets}
        # In accept order (a dict keeps insertion order): the oldest first.
        self._scrapers: dict[int, _Scraper] = {}
        self._per_client: dict[object, int] = {}
        self._ready: list[socket.socket] = []
        self._paused: list[socket.socket] = []
        # Every descriptor that is the endpoint's, for the host's dispatch.
        self.fds: set[int] = set(self._listeners)
        self.answers = {"200": 0, "400": 0, "404": 0, "405": 0}
        self.refused = {"limit": 0, "access": 0, "timeout": 0, "evicted": 0}

    @property
    def addresses(self) -> list[str]:
        return [_name(sock) for sock in self._listeners.values()]

    def start(self) -> None:
        for fd in self._listeners:
            self.poller.register(fd, READ)

    # --- what the host loop calls -----------------------------------------

    def on_event(self, fd: int) -> None:
        """Readiness of one of ``fds``. The event's bits are not needed: each
        state does the one thing it can (read, send, drop input), and a
        spurious or stale event only meets EAGAIN."""
        listener = self._listeners.get(fd)
        if listener is not None:
            if listener not in self._ready:
                self._ready.append(listener)
            if self._accept_timer is None:
                self._accept_timer = self._timers.call_at(self._clock(), self._accept_ready)
            return
        scraper = self._scrapers.get(fd)
        if scraper is None:
            return  # stale: closed earlier in this batch
        if scraper.state == _READING:
            self._read_request(scraper)
        elif scraper.state == _WRITING:
            self._send(scraper)
        elif scraper.state == _DRAINING:
            self._drain(scraper)

    def _accept_ready(self) -> None:
        self._accept_timer = None
        ready, self._ready = self._ready, []
        for listener in ready:
            if listener.fileno() in self._listeners:
                self._accept(listener)
        if (self._scrapers or self._paused) and self._tick_timer is None:
            self._tick_timer = self._timers.call_at(self._clock() + TICK, self._tick)

    def _tick(self) -> None:
        """Close scrapers past their deadline; resume paused listeners."""
        self._tick_timer = None
        now = self._clock()
        for scraper in [s for s in self._scrapers.values() if s.deadline <= now]:
            if scraper.state != _DRAINING:
                self.refused["timeout"] += 1
            self._close(scraper)
        paused, self._paused = self._paused, []
        for listener in paused:
            if listener.fileno() in self._listeners:
                # Registering again makes epoll re-check readiness: a queue
                # that filled meanwhile is seen without a new edge.
                self.poller.register(listener.fileno(), READ)
        if self._scrapers or self._paused:
            self._tick_timer = self._timers.call_at(now + TICK, self._tick)

    def close(self) -> None:
        for timer in (self._accept_timer, self._tick_timer):
            if timer is not None:
                timer.cancel()
        for scraper in list(self._scrapers.values()):
            self._close(scraper)
        for fd, listener in list(self._listeners.items()):
            if listener not in self._paused:
                try:
                    self.poller.unregister(fd)
                except (OSError, KeyError):
                    pass
            listener.close()
        self._listeners.clear()
        self._ready.clear()
        self._paused.clear()
        self.fds.clear()

    # --- accepting ----------------------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        deadline = self._clock() + REQUEST_TIMEOUT
        config = self._config()
        if config is not self._gate_of:  # started, or reloaded: read once, not per accept
            self._gate_of = config
            self._policy = AccessPolicy.for_metrics(config)
            self._ipv6_prefix = config.ipv6_prefix
        policy = self._policy
        for _ in range(ACCEPTS_PER_TURN):
            try:
                sock, peer = listener.accept()
            except BlockingIOError:
                return
            except OSError as err:
                if err.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue
                # Out of descriptors, most likely: stop watching this listener
                # until the next tick rather than spin on it (level-triggered)
                # or strand its queue (edge-triggered).
                logger.warning("metrics: accept on %s failed: %s; retrying shortly",
                               _name(listener), err)
                self.poller.unregister(listener.fileno())
                self._paused.append(listener)
                return
            address = client_address(peer[0]) \
                if isinstance(peer, tuple) and peer and peer[0] else None
            if address is not None and policy.active and not policy.permits(address):
                self.refused["access"] += 1
                sock.close()
                continue
            group = None if address is None else client_group(address, self._ipv6_prefix)
            if not self._make_room(group):
                self.refused["limit"] += 1
                sock.close()
                continue
            sock.setblocking(False)
            scraper = _Scraper(sock, group, deadline)
            try:
                self._want(scraper, READ)
            except (OSError, FdOutOfRange):
                self.refused["limit"] += 1
                sock.close()
                continue
            self._scrapers[scraper.fd] = scraper
            self._per_client[group] = self._per_client.get(group, 0) + 1
            self.fds.add(scraper.fd)
        # The budget is spent and clients may still be queued: no new edge
        # will say so, so come back next turn (a timer due just after this
        # turn's clock, so that it is not run again within this turn).
        if listener not in self._ready:
            self._ready.append(listener)
        if self._accept_timer is None:
            self._accept_timer = self._timers.call_at(self._clock() + 1e-6, self._accept_ready)

    def _make_room(self, group: object) -> bool:
        """Whether a newcomer of ``group`` may have a place, once the
        connection that must give one up (module docstring) has been closed;
        False when none may."""
        per_client = self._per_client
        held = per_client.get(group, 0)
        if held < MAX_PER_CLIENT and len(self._scrapers) < MAX_SCRAPERS:
            return True
        victim = None
        best: tuple[int, bool, int] | None = None
        for scraper in self._scrapers.values():  # the oldest first: the first of a rank wins
            order = _EVICTION_ORDER.get(scraper.state)
            if order is None or (held >= MAX_PER_CLIENT and scraper.group != group):
                continue
            count = per_client[scraper.group] + (scraper.group == group)
            rank = (-count, scraper.group != group, order)
            if best is None or rank < best:
                victim, best = scraper, rank
        if victim is None:
            return False
        self.refused["evicted"] += 1
        self._close(victim)
        return True

    # --- one request ----------------------------------------------------------

    def _read_request(self, scraper: _Scraper) -> None:
        http = scraper.http
        while True:
            try:
                data = scraper.sock.recv(READ_SIZE)
            except BlockingIOError:
                return
            except OSError:
                self._close(scraper)
                return
            if not data:
                self._close(scraper)  # gone before asking anything
                return
            http.receive_data(data)
            try:
                event = http.next_event()
            except h11.RemoteProtocolError:
                self._answer(scraper, 400)
                return
            if event is h11.NEED_DATA:
                continue
            if isinstance(event, h11.Request):
                self._route(scraper, event)
                return
            self._answer(scraper, 400)  # anything else cannot start a request
            return

    def _route(self, scraper: _Scraper, request: h11.Request) -> None:
        if request.target.split(b"?", 1)[0] != b"/metrics":
            self._answer(scraper, 404)
        elif request.method != b"GET":
            self._answer(scraper, 405)
        else:
            scraper.state = _WAITING
            # Not watched while the figures are gathered: under
            # level-triggering, unread input would wake the loop every turn.
            self._want(scraper, 0)
            self._collect(lambda body: self._answer(scraper, 200, body))

    def _answer(self, scraper: _Scraper, status: int, body: bytes = b"") -> None:
        if self._scrapers.get(scraper.fd) is not scraper:
            return  # closed (timed out) while its figures were gathered
        self.answers[str(status)] += 1
        headers = [("Content-Length", str(len(body))), ("Connection", "close")]
        if status == 200:
            headers.insert(0, ("Content-Type", CONTENT_TYPE))
        else:
            body = b""
            if status == 405:
                headers.append(("Allow", "GET"))
        http = scraper.http
        try:
            out = http.send(h11.Response(status_code=status, headers=headers,
                                         reason=_REASONS[status]))
            out += http.send(h11.Data(data=body)) + http.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            self._close(scraper)
            return
        scraper.out = memoryview(out)
        scraper.state = _WRITING
        self._send(scraper)

    def _send(self, scraper: _Scraper) -> None:
        try:
            sent = scraper.sock.send(scraper.out)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._close(scraper)
            return
        scraper.out = scraper.out[sent:]
        if scraper.out:
            self._want(scraper, WRITE)
            return
        try:
            scraper.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(scraper)
            return
        scraper.state = _DRAINING
        self._want(scraper, READ)  # a changed interest: epoll re-checks readiness
        self._drain(scraper)

    def _drain(self, scraper: _Scraper) -> None:
        recv_into = scraper.sock.recv_into
        for _ in range(MAX_DISCARD_READS):
            try:
                if not recv_into(_SCRATCH):
                    self._close(scraper)  # the peer has everything and is done
                    return
            except BlockingIOError:
                return
            except OSError:
                self._close(scraper)
                return
        # Still more: a flood. The deadline ends it.

    # --- bookkeeping ----------------------------------------------------------

    def _want(self, scraper: _Scraper, interest: int) -> None:
        if interest == scraper.interest:
            return
        if interest == 0:
            self.poller.unregister(scraper.fd)
        elif scraper.interest == 0:
            self.poller.register(scraper.fd, interest)
        else:
            self.poller.modify(scraper.fd, interest)
        scraper.interest = interest

    def _close(self, scraper: _Scraper) -> None:
        if self._scrapers.get(scraper.fd) is scraper:
            del self._scrapers[scraper.fd]
            self.fds.discard(scraper.fd)
            left = self._per_client[scraper.group] - 1
            if left:
                self._per_client[scraper.group] = left
            else:
                del self._per_client[scraper.group]
        if scraper.interest:
            try:
                self.poller.unregister(scraper.fd)
            except (OSError, KeyError):
                pass
            scraper.interest = 0
        scraper.sock.close()


def _name(sock: socket.socket) -> str:
    try:
        host, port = sock.getsockname()[:2]
    except OSError:
        return "metrics"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
