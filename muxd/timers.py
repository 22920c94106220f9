"""Monotonic one-shot timers on a heap, for a single-threaded loop."""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable


class Timer:
    __slots__ = ("when", "callback")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback: Callable[[], None] | None = callback

    def cancel(self) -> None:
        self.callback = None


class Timers:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timer]] = []
        self._sequence = itertools.count()  # ties keep scheduling order
        # When the earliest timer (perhaps a cancelled one) is due: the loop
        # compares against this once per turn instead of calling in here.
        self.next_due = math.inf

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(when, callback)
        heapq.heappush(self._heap, (when, next(self._sequence), timer))
        if when < self.next_due:
            self.next_due = when
        return timer

    def timeout(self, now: float) -> float | None:
        """Seconds until the earliest timer (0 if due), or None if there is none."""
        if self.next_due == math.inf:
            return None
        return max(0.0, self.next_due - now)

    def run_due(self, now: float) -> None:
        """Run the timers due at ``now``: those already scheduled when this call began.

        A timer that a callback schedules at or before ``now`` (a zero or
        negative interval) waits for the next call, one loop turn later, so
        this always returns and the loop's events and signals keep their turn."""
        heap = self._heap
        due = []
        while heap and heap[0][0] <= now:
            due.append(heapq.heappop(heap)[2])
        for timer in due:
            callback, timer.callback = timer.callback, None
            if callback is not None:
                callback()
        while heap and heap[0][2].callback is None:  # drop cancelled ones from the front
            heapq.heappop(heap)
        self.next_due = heap[0][0] if heap else math.inf
