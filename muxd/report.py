"""Telling the world how the daemon is doing: descriptions, STATUS=, READY=1, WATCHDOG=1.

Owns the words: the counters line (SIGUSR1 and the final "stopped:" line),
the one-line status systemd shows, the listening addresses, and when each is
sent. It changes nothing of the shared state but its own timer for the
watchdog ping (scheduled by monotonic time, uvicorn #360) and the last status
it reported; it reads the connection table, the counters, the listeners and
the UDP guard, and writes only to the log and the notifier.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from muxd.connection import Connection
from muxd.state import Counters, Shared

logger = logging.getLogger("muxd")


def describe_counters(counters: Counters, live: list[Connection]) -> str:
    bytes_in = counters.bytes_in + sum(conn.bytes_in for conn in live)
    bytes_out = counters.bytes_out + sum(conn.bytes_out for conn in live)
    closed = ", ".join(f"{reason.name.lower()} {count}"
                       for reason, count in counters.closed.items())
    text = (f"connections: {len(live)} open, {counters.accepted} accepted, "
            f"{counters.refused} refused; closed by reason: {closed}; "
            f"bytes in {bytes_in}, out {bytes_out}")
    if counters.dropped:
        text += f", dropped while stopping {counters.dropped}"
    return text


RULES_LOGGED = 8  # a deny list can hold thousands: the start-up line names the first few


def _rules(networks: Sequence[object], empty: str) -> str:
    if not networks:
        return empty
    named = ", ".join(map(str, networks[:RULES_LOGGED]))
    more = len(networks) - RULES_LOGGED
    return f"{named} and {more} more" if more > 0 else named


def addresses(shared: Shared) -> str:
    return ", ".join([*(listener.name for listener in shared.listeners.values()),
                      *(endpoint.name for endpoint in shared.udp.values())])


def status(shared: Shared) -> str:
    count = len(shared.conns)
    noun = "connection" if count == 1 else "connections"
    text = f"serving {count} {noun} on {addresses(shared)} ({shared.poller.name})"
    counters = shared.counters
    if counters.accepted:
        text += f"; {counters.accepted} accepted, {counters.refused} refused"
    if counters.taken_over:
        text += f"; {counters.taken_over} taken over at start"
    guard = shared.udp_guard
    if guard.echoed or guard.dropped:
        text += f"; UDP {guard.echoed} echoed, {sum(guard.dropped.values())} dropped"
    return text


class Reporter:
    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self._reported_status = ""

    def announce_ready(self) -> None:
        """Log what is served and send READY=1: the listeners exist by now."""
        shared = self.shared
        logger.info("listening on %s (%s backend)", addresses(shared), shared.poller.name)
        access = shared.access
        if access.active:
            logger.info("access: allow %s; deny %s", _rules(access.allow, "everyone"),
                        _rules(access.deny, "no one"))
        text = status(shared)
        shared.notifier.ready(text)
        self._reported_status = text

    def status_if_changed(self) -> None:
        """STATUS= when it changed since last sent (called once per housekeeping turn)."""
        shared = self.shared
        if shared.notifier.enabled and not shared.stopping:
            text = status(shared)
            if text != self._reported_status:
                shared.notifier.send(f"STATUS={text}")
                self._reported_status = text

    def start_watchdog(self, interval: float) -> None:
        shared = self.shared
        shared.notifier.send("WATCHDOG=1")
        shared.timers.call_at(shared.now + interval, lambda: self.start_watchdog(interval))

    def dump_counters(self) -> None:
        """The SIGUSR1 line."""
        shared = self.shared
        logger.info("counters: %s; %s",
                    describe_counters(shared.counters, list(shared.conns.values())),
                    shared.udp_guard.describe())

    def stopped(self) -> None:
        logger.info("stopped: %s", describe_counters(self.shared.counters, []))
