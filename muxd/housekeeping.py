"""Housekeeping: the periodic sweep that closes idle connections and flushes what waits.

Owns one repeating timer (Redis's ``serverCron``): every interval (a quarter of
``idle_timeout``, between 50 ms and 1 s; 1 s without one) it closes
connections idle for ``idle_timeout``, has the reporter send STATUS= if it
changed, and flushes the rate-limited logs of the rooms that keep one.

Of the shared state it may: close idle connections (through ``Shared``), and
update each connection's ``progress_mark``/``idle_since``, which nothing else
writes after the connection is created. Nothing per message: idleness is
judged from byte counts the connection keeps anyway.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from muxd.connection import Close
from muxd.report import Reporter
from muxd.state import Shared
from muxd.timers import Timer


class Housekeeping:
    def __init__(self, shared: Shared, reporter: Reporter,
                 flushes: Sequence[Callable[[], None]]) -> None:
        self.shared = shared
        self._reporter = reporter
        self._flushes = tuple(flushes)
        self._timer: Timer | None = None

    def schedule(self) -> None:
        """Start the sweep, or restart it at the interval the config now asks for."""
        if self._timer is not None:
            self._timer.cancel()
        idle = self.shared.config.idle_timeout
        interval = min(1.0, max(0.05, idle / 4)) if idle else 1.0
        self._next(interval)

    def _next(self, interval: float) -> None:
        self._timer = self.shared.timers.call_at(
            self.shared.now + interval, lambda: self._sweep(interval)
        )

    def _sweep(self, interval: float) -> None:
        shared = self.shared
        idle = shared.config.idle_timeout
        if idle:
            # A connection whose progress has not changed since an earlier
            # sweep has been idle at least since that sweep: closing waits
            # for the full idle_timeout after it, so it is never early and
            # at most one sweep interval late.
            now = shared.now
            cutoff = now - idle
            expired = []
            for conn in shared.conns.values():
                progress = conn.progress
                if progress != conn.progress_mark:
                    conn.progress_mark = progress
                    conn.idle_since = now
                elif conn.idle_since <= cutoff:
                    expired.append(conn)
            for conn in expired:
                shared.close(conn, Close.IDLE)
        self._reporter.status_if_changed()
        for flush in self._flushes:
            flush()
        self._next(interval)
