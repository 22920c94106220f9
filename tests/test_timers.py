"""muxd.timers: the loop's one-shot timers (pure logic: no sockets, no clock of their own)."""

from __future__ import annotations

from muxd.timers import Timers


def test_a_timer_that_reschedules_itself_at_now_waits_for_the_next_run() -> None:
    # A zero (or negative) interval must not keep run_due from returning: the loop's
    # events and signals come between two runs.
    timers = Timers()
    runs: list[float] = []

    def again() -> None:
        runs.append(now)
        timers.call_at(now, again)  # interval 0
        timers.call_at(now - 1.0, lambda: runs.append(-1.0))  # interval < 0

    now = 10.0
    timers.call_at(now, again)
    timers.run_due(now)
    assert runs == [10.0]
    assert timers.next_due <= now, "the rescheduled timers are still due"
    timers.run_due(now)
    assert runs == [10.0, -1.0, 10.0]


def test_due_timers_run_in_order_and_a_cancelled_one_never_runs() -> None:
    timers = Timers()
    ran: list[str] = []
    timers.call_at(2.0, lambda: ran.append("b"))
    late = timers.call_at(3.0, lambda: ran.append("never"))
    timers.call_at(1.0, lambda: (ran.append("a"), late.cancel()))
    timers.call_at(5.0, lambda: ran.append("later"))
    timers.run_due(4.0)
    assert ran == ["a", "b"]
    assert timers.next_due == 5.0
