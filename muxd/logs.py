"""Logging to stderr, in the journal's dialect when stderr is the journal.

journald reads a ``<N>`` prefix on each line as its syslog priority
(sd-daemon(3)), which is what makes ``journalctl -p warning`` work, and it
stamps the time itself. ``JOURNAL_STREAM`` names the device and inode of the
stream systemd connected; we only trust it when stderr still is that stream.
"""

from __future__ import annotations

import logging
import os
import sys
import time

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}

logger = logging.getLogger("muxd")


class JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITY.get(record.levelno, 6)
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).splitlines())


def stderr_is_journal() -> bool:
    stream = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = stream.partition(":")
    try:
        status = os.fstat(sys.stderr.fileno())
        return (status.st_dev, status.st_ino) == (int(device), int(inode))
    except (ValueError, OSError, AttributeError):
        return False


def setup_logging(level: str = "info", tag: str = "") -> None:
    """Log to stderr; ``tag`` (e.g. "worker 2") prefixes every message."""
    handler = logging.StreamHandler(sys.stderr)
    prefix = f"{tag}: " if tag else ""
    if stderr_is_journal():
        handler.setFormatter(JournalFormatter(f"{prefix}%(message)s"))
    else:
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s muxd[%(process)d] %(levelname)s: {prefix}%(message)s"
        ))
    logger.handlers[:] = [handler]
    logger.propagate = False
    set_level(level)


def set_level(level: str) -> None:
    logger.setLevel(level.upper())


class RateLimitedLog:
    """Logs the first of a kind of event, then at most one summary per interval.

    Used for what a hostile or broken client can make happen thousands of
    times a second (refusals, descriptor exhaustion): one line per event would
    flood the journal and cost the loop more than the event itself.
    """

    def __init__(self, level: int, interval: float = 10.0) -> None:
        self.level = level
        self.interval = interval
        self._next_allowed = 0.0
        self._suppressed = 0
        self._last_message = ""

    def log(self, message: str) -> None:
        now = time.monotonic()
        if now < self._next_allowed:
            self._suppressed += 1
            self._last_message = message
            return
        self._emit(message, now)

    def flush(self) -> None:
        """Report what was suppressed once the interval is over (called by a timer)."""
        now = time.monotonic()
        if self._suppressed and now >= self._next_allowed:
            self._emit(self._last_message, now)

    def _emit(self, message: str, now: float) -> None:
        if self._suppressed:
            message += f" (and {self._suppressed} more like it in the last {self.interval:g}s)"
        logger.log(self.level, message)
        self._suppressed = 0
        self._next_allowed = now + self.interval
