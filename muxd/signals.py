"""Signals only queue work; the event loop does it.

A Python handler runs between bytecodes of the main thread, and PEP 475
retries epoll_wait/poll/select after EINTR when the handler returns, so a
handler that merely sets a flag would never wake a blocking wait. Instead the
C-level handler writes the signal number into a non-blocking socketpair
(``signal.set_wakeup_fd``) whose read end sits in the poller; the loop then
drains it and takes the queued signals.
"""

from __future__ import annotations

import signal
import socket
from types import FrameType

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2,
           signal.SIGURG)  # SIGURG: the stop hook says "restart" (handover.py)


class SignalQueue:
    def __init__(self, signals: tuple[int, ...] = HANDLED) -> None:
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        self._pending: list[int] = []
        self._previous_wakeup_fd = signal.set_wakeup_fd(
            self._writer.fileno(), warn_on_full_buffer=False
        )
        self._previous_handlers = {sig: signal.signal(sig, self._record) for sig in signals}

    @property
    def fd(self) -> int:
        return self._reader.fileno()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self._pending.append(signum)

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
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(self._previous_wakeup_fd)
        self._reader.close()
        self._writer.close()
