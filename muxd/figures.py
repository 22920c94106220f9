"""Metrics in the event loop: the figures gathered from the shared state at
scrape time, and the endpoint (or the worker's line to its supervisor) that
asks for them.

Owns the event loop's metrics endpoint (``metrics_http.MetricsEndpoint``) and
the worker's end of its figures channel to the supervisor, and the
translation of what the loop counts into ``metrics.Figures``. Counting
itself stays where it happens (admission, ``Shared.close``, the UDP guard,
reload), off the hot path: per connection and per listener, never per
message. Gathering reads the connection table (for the bytes of live
connections), the listeners' tallies, the hand-over room's figures, the UDP
guard and the reload results; it changes nothing of the shared state. Its
descriptors are registered in the shared poller by itself; the loop hands
their events to ``on_event``.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING

from muxd import __version__
from muxd.connection import Close
from muxd.metrics import (
    CLOSE_REASONS,
    UDP_DROP_REASONS,
    Figures,
    ListenerFigures,
    ServiceFigures,
    read_process,
    render,
)
from muxd.metrics_http import MetricsEndpoint, Reply
from muxd.pollers import READ
from muxd.state import Shared
from muxd.udp import DROP_LABELS

if TYPE_CHECKING:
    from muxd.reload import Reload  # read only: its results and last success

logger = logging.getLogger("muxd")

# The label values metrics.py declares are exactly what is counted here.
assert set(DROP_LABELS.values()) | {"send_failed"} == set(UDP_DROP_REASONS)
assert set(CLOSE_REASONS) == {reason.name.lower() for reason in Close}


def gather(shared: Shared) -> Figures:
    """A snapshot of what the loop has counted, live connections included."""
    figures = Figures()
    by_tally: dict[int, ListenerFigures] = {}
    for tally in shared.tallies.values():
        listener = ListenerFigures(accepted=tally.accepted, received_bytes=tally.bytes_in,
                                   sent_bytes=tally.bytes_out)
        for reason, count in tally.closed.items():
            listener.closed[reason.name.lower()] = count
        for reason, count in tally.refused.items():
            listener.refused[reason] = listener.refused.get(reason, 0) + count
        figures.listeners[tally.name] = by_tally[id(tally)] = listener
    for conn in shared.conns.values():
        listener = by_tally.get(id(conn.origin))
        if listener is not None:
            listener.open += 1
            listener.received_bytes += conn.bytes_in
            listener.sent_bytes += conn.bytes_out
    if shared.kept is not None:
        figures.handover = shared.kept.figures()
    udp_guard = shared.udp_guard
    figures.udp_echoed = udp_guard.echoed
    for reason, count in udp_guard.dropped.items():
        label = DROP_LABELS.get(reason, "send_failed")
        figures.udp_dropped[label] = figures.udp_dropped.get(label, 0) + count
    return figures


class MetricsRoom:
    """The loop's metrics: an endpoint of its own, a line to a supervisor, or neither."""

    def __init__(self, shared: Shared, reload: Reload,
                 sockets: Sequence[socket.socket] = (),
                 channel: socket.socket | None = None) -> None:
        self.shared = shared
        self.poller = shared.poller
        self._reload = reload
        self.endpoint = (MetricsEndpoint(list(sockets), shared.poller, shared.timers,
                                         lambda: shared.now, self._collect,
                                         lambda: shared.config) if sockets else None)
        self._channel = channel
        if channel is not None:
            channel.setblocking(False)

    def owns(self, fd: int) -> bool:
        """Whether ``fd`` is one of this room's (the loop asks only for
        descriptors that are no connection, listener, UDP or signal one)."""
        channel = self._channel
        return ((channel is not None and fd == channel.fileno())
                or (self.endpoint is not None and fd in self.endpoint.fds))

    def start(self) -> None:
        if self.endpoint is not None:
            self.endpoint.start()
            logger.info("metrics: serving GET /metrics on %s",
                        ", ".join(self.endpoint.addresses))
        if self._channel is not None:
            self.poller.register(self._channel.fileno(), READ)

    def on_event(self, fd: int) -> None:
        if self._channel is not None and fd == self._channel.fileno():
            self._answer_supervisor()
        elif self.endpoint is not None:
            self.endpoint.on_event(fd)

    def close(self) -> None:
        if self.endpoint is not None:
            self.endpoint.close()
            self.endpoint = None
        if self._channel is not None:
            try:
                self.poller.unregister(self._channel.fileno())
            except (OSError, KeyError):
                pass
            self._channel.close()
            self._channel = None

    def _collect(self, reply: Reply) -> None:
        endpoint = self.endpoint
        service = ServiceFigures(version=__version__, reloads=dict(self._reload.results),
                                 last_reload_success=self._reload.last_success)
        if endpoint is not None:
            service.metrics_answers = dict(endpoint.answers)
            service.metrics_refused = dict(endpoint.refused)
        reply(render(service, [(None, gather(self.shared))], [(None, read_process())]).encode())

    def _answer_supervisor(self) -> None:
        """Each request on the channel (its number) gets one answer: the same
        number and the figures, as JSON."""
        channel = self._channel
        assert channel is not None
        while True:
            try:
                request = channel.recv(32)
            except BlockingIOError:
                return
            except OSError:
                request = b""
            if not request:  # the supervisor is gone
                self.close()
                return
            try:
                number = int(request)
            except ValueError:
                continue
            answer = {"request": number, "figures": gather(self.shared).to_json()}
            try:
                channel.send(json.dumps(answer).encode())
            except BlockingIOError:
                pass  # the supervisor is not reading: it gathers without us
            except OSError:
                self.close()
                return
