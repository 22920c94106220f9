"""Soak: the fault mix of test_faults, round after round with fresh clients, for
``MUXD_SOAK_SECONDS`` (default 540, so a run stays under 10 minutes) on one backend
(``MUXD_SOAK_BACKEND``, default auto). Not in the default run: ``pytest -m soak -s``
(``-s`` shows the figures).

Afterwards: no descriptor leaked (the count is back to its idle value), RSS is
within 10% of its value after the warm-up rounds, nothing was logged at error that
was not provoked, and every echo checked along the way was exact.
"""

from __future__ import annotations

import os
import time

import pytest
from daemon_harness import (
    EchoProbe,
    connect,
    echo_once,
    free_port,
    raise_own_nofile,
    read_counters,
    server_config,
    unprovoked_errors,
    wait_fds,
    wait_until,
)
from test_faults import Chaos, _run_threads

ROUND_SECONDS = 10.0


@pytest.mark.soak
def test_soak_mixed_load_with_client_restarts(start_muxd) -> None:
    total = float(os.environ.get("MUXD_SOAK_SECONDS", "540"))
    backend = os.environ.get("MUXD_SOAK_BACKEND", "auto")
    warmup = max(ROUND_SECONDS, min(60.0, total * 0.15))
    raise_own_nofile(4096)
    port = free_port()
    daemon = start_muxd(server_config(port, backend, nofile=512, idle_timeout=0.5),
                        nofile=(512, 512))
    idle_fds = daemon.open_fds()
    rss_start = daemon.rss_bytes()
    # One client for the whole soak, and one new one per round (clients restart).
    marathon = EchoProbe(port, seed=100, max_seconds=total + 120).start()
    wait_until(lambda: marathon.verified > 0, what="the marathon probe's first echo")
    started = time.monotonic()
    rounds = sprint_echoes = 0
    chaos_done: dict[str, int] = {}
    rss_warm = fds_warm = None

    while time.monotonic() - started < total:
        seconds = min(ROUND_SECONDS, max(1.0, total - (time.monotonic() - started)))
        sprint = EchoProbe(port, seed=rounds, max_size=65536).start()
        chaos = Chaos(port, seconds=seconds, seed=rounds, burst=600)
        _run_threads(chaos.targets(), timeout=seconds + 60)
        sprint.stop()
        assert not sprint.failures, f"round {rounds}: {sprint.failures}"
        assert not marathon.failures, f"round {rounds}: {marathon.failures}"
        sprint_echoes += sprint.verified
        for kind, count in chaos.done.items():
            chaos_done[kind] = chaos_done.get(kind, 0) + count
        rounds += 1
        # Between rounds only the marathon client is connected.
        wait_fds(daemon, idle_fds + 1)
        if rss_warm is None and time.monotonic() - started >= warmup:
            rss_warm, fds_warm = daemon.rss_bytes(), daemon.open_fds()

    marathon.stop()
    assert not marathon.failures, marathon.failures
    assert rss_warm is not None, "the soak ended before its warm-up did"
    with connect(port) as sock:
        payload = os.urandom(1 << 20)
        assert echo_once(sock, payload) == payload
    wait_fds(daemon, idle_fds)
    fds_end = daemon.open_fds()
    rss_end = daemon.rss_bytes()
    counts = read_counters(daemon)
    errors = unprovoked_errors(daemon.log, ("out of file descriptors",))
    print(
        f"\nsoak: {total:g}s on {backend}, {rounds} rounds of {ROUND_SECONDS:g}s "
        f"(warm-up {warmup:g}s)\n"
        f"  fds: idle {idle_fds}, after warm-up {fds_warm} (incl. the marathon client), "
        f"end {fds_end}\n"
        f"  RSS: start {rss_start // 1024} KiB, after warm-up {rss_warm // 1024} KiB, "
        f"end {rss_end // 1024} KiB ({(rss_end - rss_warm) / rss_warm:+.1%})\n"
        f"  echoes verified: marathon {marathon.verified} "
        f"({marathon.bytes_verified / (1 << 20):.1f} MiB, worst {marathon.worst_latency:.3f}s),"
        f" per-round probes {sprint_echoes}; half-close clients checked "
        f"{chaos_done.get('half_closer', 0)} (exact echo, or refused at the fd limit)\n"
        f"  chaos clients: {chaos_done}\n"
        f"  daemon counters: {counts}\n"
        f"  error lines: {daemon.log.count(' ERROR: ')} provoked (out of file descriptors), "
        f"{len(errors)} unprovoked"
    )
    assert daemon.process.poll() is None
    assert fds_end == idle_fds
    assert counts["accepted"] == sum(counts[reason] for reason in
                                     ("eof", "reset", "idle", "limit", "shutdown")), counts
    assert rss_end <= rss_warm * 1.10, (
        f"RSS {rss_end // 1024} KiB at the end, {rss_warm // 1024} KiB after warm-up"
    )
    assert not errors, "unprovoked errors logged:\n" + "\n".join(errors[:20])
