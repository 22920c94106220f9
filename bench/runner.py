"""Runs scenarios: servers alternate within each repetition (A B C A B C ...) so slow drift
of the machine (thermal, page cache, other tenants) spreads over all servers evenly."""

import functools
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from bench.build import BuildError
from bench.loadgen import LoadgenFailed, run_loadgen
from bench.procstat import open_fd_count, rss_kib, settled, wait_for_open_fds
from bench.scenarios import Kind, Scenario
from bench.servers import (
    SERVERS,
    RunningServer,
    ServerFailed,
    ServerUnavailable,
    running_server,
)

ACCEPT_TIMEOUT_S = 60.0

Sample = dict[str, Any]


@dataclass(frozen=True)
class Settings:
    reps: int
    duration: float
    warmup: float
    server_core: int
    client_core: int


def pick_cores() -> tuple[int, int]:
    """Server on the first allowed core, load client on the second (same core if only one)."""
    cores = sorted(os.sched_getaffinity(0))
    return cores[0], cores[1] if len(cores) > 1 else cores[0]


class IdleNotAccepted(RuntimeError):
    pass


def _accept_idle(server: RunningServer, baseline_fds: int, idle: int) -> int:
    open_fds = wait_for_open_fds(server.pid, baseline_fds + idle, ACCEPT_TIMEOUT_S)
    accepted = open_fds - baseline_fds
    if accepted < idle:
        raise IdleNotAccepted(f"server holds only {accepted} of {idle} idle connections")
    return accepted


def _measure_throughput(server: RunningServer, scenario: Scenario, settings: Settings) -> Sample:
    baseline_fds = settled(functools.partial(open_fd_count, server.pid), interval=0.05)
    wait_for_idle = None
    if scenario.load.idle:
        wait_for_idle = functools.partial(_accept_idle, server, baseline_fds, scenario.load.idle)
    return run_loadgen(
        scenario.load,
        server.port,
        server.pid,
        settings.server_core,
        settings.client_core,
        settings.duration,
        settings.warmup,
        on_idle_connected=wait_for_idle,
        helper_pid=server.store.pid if server.store else None,
    )


def _measure_memory(server: RunningServer, scenario: Scenario, settings: Settings) -> Sample:
    baseline_fds = settled(functools.partial(open_fd_count, server.pid), interval=0.05)
    rss_before = settled(functools.partial(rss_kib, server.pid))
    memory: Sample = {"rss_before_kib": rss_before}

    def sample_memory_while_held() -> None:
        accepted = _accept_idle(server, baseline_fds, scenario.load.idle)
        rss_after = settled(functools.partial(rss_kib, server.pid))
        memory.update(
            accepted=accepted,
            rss_after_kib=rss_after,
            bytes_per_conn=(rss_after - rss_before) * 1024 / accepted,
        )

    result = run_loadgen(
        scenario.load,
        server.port,
        server.pid,
        settings.server_core,
        settings.client_core,
        duration=0,
        warmup=0,
        on_idle_connected=sample_memory_while_held,
    )
    return {**result, **memory}


def measure_once(server_name: str, scenario: Scenario, settings: Settings) -> Sample:
    """One server start, one measurement, one stop. Failures become an ``error`` field."""
    started = time.monotonic()
    sample: Sample = {"server": server_name, "error": None}
    try:
        with running_server(SERVERS[server_name], settings.server_core) as server:
            if scenario.kind is Kind.MEMORY:
                sample.update(_measure_memory(server, scenario, settings))
            else:
                sample.update(_measure_throughput(server, scenario, settings))
        store_error = _note_store(sample, server)
        if sample.get("errors"):
            sample["error"] = f"{sample['errors']} client errors, first: {sample['first_error']}"
        elif scenario.kind is not Kind.MEMORY and not sample.get("verified_bytes"):
            sample["error"] = "no echoed bytes verified"
        elif store_error:
            sample["error"] = store_error
    except (ServerUnavailable, ServerFailed, LoadgenFailed, IdleNotAccepted, BuildError) as exc:
        sample["error"] = f"{type(exc).__name__}: {exc}"
    sample["wall_s"] = round(time.monotonic() - started, 3)
    return sample


def _note_store(sample: Sample, server: RunningServer) -> str | None:
    """A server under the fake PID 1 store: its counts into the sample, and what says
    hand-over did not work: nothing stored (it was off), or connections the client
    closed still held (muxd did not take them out, so PID 1 would keep them open)."""
    if server.store is None:
        return None
    stats = server.store.stats
    if stats is None:
        return "the file descriptor store reported nothing"
    sample["store"] = stats
    held = stats["held_by_name"].get("conn", 0)
    stored = stats["received_by_name"].get("conn", 0)
    if sample.get("churn_completed") and stored:
        # A muxd that stores each connection (before parking, muxd/parking.py):
        # connections that ended before their batch reached the store (PID 1's queue was
        # full, muxd retries 10 ms later) are never stored: a crash would lose them. A
        # parking muxd gives the store a few parking sockets instead ("-" here).
        sample["stored_pct"] = min(100.0, 100.0 * stored / sample["churn_completed"])
    if not stats["received"]:
        return "hand-over was off: the file descriptor store received nothing"
    if held:
        return f"{held} closed connection(s) left in the file descriptor store"
    return None


def run_scenario(scenario: Scenario, servers: list[str], settings: Settings) -> dict[str, Any]:
    samples: dict[str, list[Sample]] = {name: [] for name in servers}
    unavailable: set[str] = set()
    for rep in range(settings.reps):
        for name in servers:
            if name in unavailable:
                continue
            sample = measure_once(name, scenario, settings)
            sample["rep"] = rep
            samples[name].append(sample)
            _report_progress(scenario, sample)
            if (sample["error"] or "").startswith(ServerUnavailable.__name__):
                unavailable.add(name)  # no point retrying something that is not installed
    return {
        "title": scenario.title,
        "kind": scenario.kind.value,
        "headline": scenario.headline,
        "load": asdict(scenario.load),
        "servers": servers,
        "samples": samples,
    }


def _report_progress(scenario: Scenario, sample: Sample) -> None:
    if sample["error"]:
        detail = f"FAILED {sample['error'][:160]}"
    elif scenario.kind is Kind.MEMORY:
        detail = f"{sample['bytes_per_conn']:.0f} B/conn"
    elif scenario.kind is Kind.CHURN:
        store = ""
        if sample.get("helper_cpu_us_per_msg", -1) >= 0:
            store = f" + store {sample['helper_cpu_us_per_msg']:.2f}"
        detail = (
            f"{sample['msgs_per_s']:>10,.0f} conn/s {sample['server_cpu_us_per_msg']:6.2f}"
            f"{store} us/conn  core {sample['server_core_busy_pct']:.0f}% / client core "
            f"{sample['client_core_busy_pct']:.0f}%"
        )
    else:
        detail = (
            f"{sample['msgs_per_s']:>10,.0f} msg/s  {sample['server_cpu_us_per_msg']:6.2f} us/msg"
            f"  core {sample['server_core_busy_pct']:.0f}% / client core "
            f"{sample['client_core_busy_pct']:.0f}%"
        )
    print(
        f"  [{scenario.name} rep {sample['rep'] + 1}] {sample['server']:<17} {detail}",
        file=sys.stderr,
        flush=True,
    )
