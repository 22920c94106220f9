"""systemd's notify protocol (sd_notify(3)), through the ``sdnotify`` package.

sdnotify connects at construction and, unless ``debug=True``, swallows every
error; its socket is blocking. We want errors seen once in the log and a
notification that can never stall the event loop, so the socket is made
non-blocking and a full queue drops the message rather than waiting.
"""

from __future__ import annotations

import logging
import os
import time

import sdnotify

logger = logging.getLogger("muxd")


class Notifier:
    def __init__(self) -> None:
        self._notifier: sdnotify.SystemdNotifier | None = None
        self._warned = False
        address = os.environ.get("NOTIFY_SOCKET")
        if not address:
            return
        try:
            notifier = sdnotify.SystemdNotifier(debug=True)
            notifier.socket.setblocking(False)
        except OSError as err:
            logger.warning("cannot reach NOTIFY_SOCKET %s: %s; not notifying systemd",
                           address, err)
            return
        self._notifier = notifier

    @property
    def enabled(self) -> bool:
        return self._notifier is not None

    def send(self, *assignments: str) -> None:
        """Send ``KEY=VALUE`` assignments in one datagram; never blocks."""
        if self._notifier is None:
            return
        try:
            self._notifier.notify("\n".join(assignments))
        except OSError as err:
            if not self._warned:
                self._warned = True
                logger.warning("a systemd notification was lost: %s", err)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        # MONOTONIC_USEC lets Type=notify-reload (systemd >= 253) tell this
        # reload from an earlier one; without it `systemctl reload` hangs there.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def close(self) -> None:
        if self._notifier is not None:
            self._notifier.socket.close()
            self._notifier = None


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None for no watchdog.

    As sd_watchdog_enabled(3) does, a WATCHDOG_USEC that is not a positive
    number means no watchdog: a zero interval would be a ping due at once,
    for ever."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    try:
        if not usec or (pid and int(pid) != os.getpid()):
            return None
        usec_value = int(usec)
    except ValueError:
        return None
    if usec_value <= 0:
        return None
    return usec_value / 2e6
