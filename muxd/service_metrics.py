"""The whole service's metrics with ``workers > 1``: one endpoint, in the
supervisor, that gathers every worker's figures at scrape time.

Owns the supervisor's metrics endpoint (``metrics_http.MetricsEndpoint``) and
its end of each worker's figures channel: an ``AF_UNIX`` ``SOCK_SEQPACKET``
pair made before the fork (one message each way, never split). At a scrape
it sends every live worker a request number, and renders once each has
answered with its figures (or after ``GATHER_TIMEOUT``, without the silent
ones): the workers' figures under a ``worker`` label (each worker's counters
start at 0 when it is replaced, which ``rate()`` reads as a counter reset),
each worker's process figures read from ``/proc/PID``, the supervisor's own
under ``worker="supervisor"``, and the service's reloads, which are judged
here. Of the supervisor it touches only its own descriptors in the
supervisor's poller and its own timers; the supervisor tells it when a
worker starts and ends, and hands it the events of its descriptors.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Sequence

from muxd import __version__
from muxd.config import Config
from muxd.metrics import Figures, ServiceFigures, read_process, render
from muxd.metrics_http import MetricsEndpoint, Reply
from muxd.pollers import READ, Poller
from muxd.timers import Timer, Timers

GATHER_TIMEOUT = 1.0
MAX_FIGURES_BYTES = 256 << 10  # one worker's figures as JSON: ~1 KiB per listener


class ServiceMetrics:
    def __init__(self, sockets: Sequence[socket.socket], poller: Poller, timers: Timers,
                 clock: Callable[[], float], config: Callable[[], Config]) -> None:
        self.poller = poller
        self._timers = timers
        self._clock = clock
        self.endpoint = MetricsEndpoint(list(sockets), poller, timers, clock, self._collect,
                                        config)
        self._channels: dict[int, socket.socket] = {}  # slot -> our end, once started
        self._pids: dict[int, int] = {}
        self._by_fd: dict[int, int] = {}  # our end's fd -> slot
        self._unborn: dict[int, tuple[socket.socket, socket.socket]] = {}
        self._waiting: list[Reply] = []
        self._request = 0
        self._awaited: set[int] = set()
        self._answers: dict[int, Figures] = {}
        self._deadline: Timer | None = None
        self.reloads = {"success": 0, "failure": 0}
        self.last_reload_success = time.time()

    def start(self) -> None:
        self.endpoint.start()

    # --- what the supervisor calls ------------------------------------------

    def channel_for(self, slot: int) -> socket.socket:
        """Before forking the worker of ``slot``: its end of a new channel."""
        for end in self._unborn.pop(slot, ()):  # a fork that failed left these
            end.close()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._unborn[slot] = (ours, theirs)
        return theirs

    def worker_started(self, slot: int, pid: int) -> None:
        """In the supervisor, after the fork."""
        ours, theirs = self._unborn.pop(slot)
        theirs.close()
        ours.setblocking(False)
        self._drop(slot)
        self._channels[slot] = ours
        self._pids[slot] = pid
        self._by_fd[ours.fileno()] = slot
        self.poller.register(ours.fileno(), READ)

    def in_worker(self, slot: int) -> None:
        """In the forked worker: let go of every descriptor of the supervisor's
        (the endpoint, the other channels) but the worker's own end."""
        ours, _ = self._unborn.pop(slot)
        ours.close()
        for pair in self._unborn.values():
            for end in pair:
                end.close()
        for channel in self._channels.values():
            channel.close()
        self.endpoint.close()  # the poller is the child's copy: nothing else is touched

    def worker_gone(self, slot: int) -> None:
        self._drop(slot)
        self._pids.pop(slot, None)

    def reload_succeeded(self) -> None:
        self.reloads["success"] += 1
        self.last_reload_success = time.time()

    def reload_failed(self) -> None:
        self.reloads["failure"] += 1

    def owns(self, fd: int) -> bool:
        return fd in self._by_fd or fd in self.endpoint.fds

    def on_event(self, fd: int) -> None:
        slot = self._by_fd.get(fd)
        if slot is None:
            self.endpoint.on_event(fd)
        else:
            self._read_answer(slot)

    def close(self) -> None:
        self.endpoint.close()
        for slot in list(self._channels):
            self._drop(slot)
        for pair in self._unborn.values():
            for end in pair:
                end.close()
        self._unborn.clear()

    # --- gathering ------------------------------------------------------------

    def _collect(self, reply: Reply) -> None:
        self._waiting.append(reply)
        if self._deadline is not None:
            return  # a round is under way; this scrape gets its result too
        self._request += 1
        self._answers = {}
        self._awaited = set()
        for slot, channel in self._channels.items():
            try:
                channel.send(b"%d" % self._request)
                self._awaited.add(slot)
            except OSError:
                pass  # its figures are missing from this scrape
        if not self._awaited:
            self._finish()
            return
        self._deadline = self._timers.call_at(self._clock() + GATHER_TIMEOUT, self._finish)

    def _read_answer(self, slot: int) -> None:
        channel = self._channels[slot]
        while True:
            try:
                data = channel.recv(MAX_FIGURES_BYTES)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:  # the worker closed its end: it is stopping or gone
                self._drop(slot)
                return
            try:
                answer = json.loads(data)
                request = int(answer["request"])
                figures = Figures.from_json(answer["figures"])
            except (ValueError, KeyError, TypeError):
                continue
            if request == self._request and slot in self._awaited:
                self._answers[slot] = figures
                self._awaited.discard(slot)
                if not self._awaited:
                    self._finish()

    def _finish(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._awaited = set()
        service = ServiceFigures(version=__version__, reloads=dict(self.reloads),
                                 last_reload_success=self.last_reload_success,
                                 metrics_answers=dict(self.endpoint.answers),
                                 metrics_refused=dict(self.endpoint.refused))
        loops = [(str(slot), self._answers[slot]) for slot in sorted(self._answers)]
        processes = [(str(slot), read_process(pid)) for slot, pid in sorted(self._pids.items())]
        processes.append(("supervisor", read_process(os.getpid())))
        body = render(service, loops, processes).encode()
        waiting, self._waiting = self._waiting, []
        for reply in waiting:
            reply(body)

    def _drop(self, slot: int) -> None:
        channel = self._channels.pop(slot, None)
        if channel is None:
            return
        self._by_fd.pop(channel.fileno(), None)
        try:
            self.poller.unregister(channel.fileno())
        except (OSError, KeyError):
            pass
        channel.close()
        if slot in self._awaited:
            self._awaited.discard(slot)
            if not self._awaited:
                self._finish()
