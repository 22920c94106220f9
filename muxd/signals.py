"""Signals: the process's signal dispositions and mask, and the queue through
which signals reach the event loop. Nothing else in muxd calls signal.signal.

Signals only queue work; the event loop does it. A Python handler runs
between bytecodes of the main thread, and PEP 475 retries
epoll_wait/poll/select after EINTR when the handler returns, so a handler
that merely sets a flag would never wake a blocking wait. Instead the C-level
handler writes the signal number into a non-blocking socketpair
(``signal.set_wakeup_fd``) whose read end sits in the poller; the loop then
drains it and takes the queued signals.

Until a queue exists a signal's default action would kill the process (SIGHUP,
SIGUSR1 and SIGUSR2 terminate it): ``hold_until_handled`` blocks them at the
very start, and a queue unblocks them once its handlers are in place, so one
sent early is handled then rather than fatal.

A worker (``[server] workers``) is told to stop by its supervisor with
RELAYED_STOP, a signal nothing else sends, and ignores SIGTERM and SIGINT
from outside: those reach every process at once (systemd's control-group
kill, a process-group kill, Ctrl-C), and a second stop means "close at
once", so a worker must not count the one the supervisor relays as another.
"""

from __future__ import annotations

import signal
import socket
from types import FrameType

# SIGURG: the unit's stop hook says "this stop is a restart" (handover.py).
HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2,
           signal.SIGURG)
# Held from the start of main until a queue handles them (SIGTERM and SIGINT
# keep their default: before muxd serves, stopping at once is right).
HELD_AT_START = frozenset({signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2})
# glibc keeps the first real-time signals for itself; SIGRTMIN is past them.
RELAYED_STOP = signal.SIGRTMIN + 1
_OUTSIDE_STOPS = (signal.SIGTERM, signal.SIGINT)

_stops_relayed = False  # this process is a worker: see take_stops_from_supervisor


def hold_until_handled() -> None:
    """Block HELD_AT_START until a SignalQueue handles them (first thing in main)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, HELD_AT_START)


def block(signals: frozenset[int] | set[int]) -> set[int]:
    """Block ``signals``; returns the previous mask for ``signal.pthread_sigmask``."""
    return signal.pthread_sigmask(signal.SIG_BLOCK, signals)


def take_stops_from_supervisor() -> None:
    """In a worker, before its queue exists: stop only when the supervisor says so
    (RELAYED_STOP, taken as SIGTERM); SIGTERM and SIGINT from outside are ignored."""
    global _stops_relayed
    _stops_relayed = True
    for signum in _OUTSIDE_STOPS:
        signal.signal(signum, signal.SIG_IGN)


class SignalQueue:
    def __init__(self, signals: tuple[int, ...] = HANDLED) -> None:
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        self._pending: list[int] = []
        self._previous_wakeup_fd = signal.set_wakeup_fd(
            self._writer.fileno(), warn_on_full_buffer=False
        )
        if _stops_relayed:
            signals = (*(sig for sig in signals if sig not in _OUTSIDE_STOPS), RELAYED_STOP)
        self._previous_handlers = {sig: signal.signal(sig, self._record) for sig in signals}
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)

    @property
    def fd(self) -> int:
        return self._reader.fileno()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self._pending.append(signal.SIGTERM if signum == RELAYED_STOP else signum)

    def take(self) -> list[int]:
        """Drain the wakeup socket and return the signals received since last time."""
        try:
            while self._reader.recv(4096):
                pass
        except BlockingIOError:
            pass
        taken, self._pending = self._pending, []
        return taken

    def close(self) -> None:
        # Held again, not restored to a default that kills: a SIGHUP in the
        # moment between the loop's end and the exit must not turn a clean
        # stop (status 0) into death by signal.
        signal.pthread_sigmask(signal.SIG_BLOCK, HELD_AT_START & set(self._previous_handlers))
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(self._previous_wakeup_fd)
        self._reader.close()
        self._writer.close()
