"""``python -m bench.workers``: muxd with 1 worker against muxd with 2 workers.

The main runner pins the server to one core and the load client to the other;
that is the right way to compare event loops, and the wrong way to measure
workers, which exist to use more than one core. Here nothing is pinned: the
server gets whatever the scheduler gives it and the load client competes for
the same two cores. Server CPU is summed over the supervisor and its workers.
Runs alternate (1, 2, 1, 2, ...), every run is bounded in time, and only
loopback is used.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import REPO_ROOT
from bench.build import LOADGEN_SOURCE, compiled
from bench.servers import MUXD_CONFIG, free_port, stop_process, wait_until_accepting


def tree_cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and its children (the workers)."""
    total = 0.0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        pending += [int(child) for child in children]
    return total


def listening_sockets(port: int) -> int:
    """TCP sockets in LISTEN state on ``port`` (one per SO_REUSEPORT worker)."""
    suffix = f":{port:04X}"
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        count += fields[1].endswith(suffix) and fields[3] == "0A"
    return count


def measure(workers: int, conns: int, size: int, duration: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as scratch:
        port = free_port()
        config = Path(scratch) / "muxd.ini"
        # The runner's muxd config, with the worker count added to [server].
        config.write_text(MUXD_CONFIG.format(port=port, backend="auto")
                          .replace("[limits]", f"workers = {workers}\n[limits]", 1))
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        log = Path(scratch) / "stderr.log"
        with open(log, "wb") as stderr:
            server = subprocess.Popen([sys.executable, "-m", "muxd", "--config", str(config)],
                                      cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            wait_until_accepting(server, port, log)
            deadline = time.monotonic() + 15
            while listening_sockets(port) < workers:  # every worker has bound its own
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {listening_sockets(port)} of {workers} listening")
                time.sleep(0.02)
            cpu_before = tree_cpu_seconds(server.pid)
            result = subprocess.run(
                [str(compiled(LOADGEN_SOURCE)), f"--port={port}", f"--conns={conns}",
                 f"--size={size}", f"--duration={duration}", "--warmup=0"],
                capture_output=True, text=True, timeout=duration + 60,
            )
            cpu = tree_cpu_seconds(server.pid) - cpu_before
        finally:
            stop_process(server)
    line = next(line for line in result.stdout.splitlines() if line.startswith("{"))
    sample = json.loads(line)
    return {"msgs_per_s": sample["msgs_per_s"], "server_cpu_pct": 100 * cpu / duration,
            "us_per_msg": 1e6 * cpu / max(sample["msgs"], 1),
            "client_cpu_pct": sample["client_cpu_pct"], "errors": sample["errors"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.workers", description=__doc__)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--conns", type=int, default=100)
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args(argv)
    samples: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    for _ in range(args.reps):
        for workers in samples:
            samples[workers].append(measure(workers, args.conns, args.size, args.duration))
    print(f"muxd workers, {args.conns} conns x {args.size} B, nothing pinned, "
          f"{os.cpu_count()} CPUs, medians of {args.reps}:")
    print("| workers | msg/s [min-max] | vs 1 worker | server CPU % | server us/msg | "
          "client CPU % | errors |")
    print("|---|---|---|---|---|---|---|")
    base = statistics.median(s["msgs_per_s"] for s in samples[1])
    for workers, runs in samples.items():
        rates = [run["msgs_per_s"] for run in runs]
        median = statistics.median(rates)
        print(f"| {workers} | {median:,.0f} [{min(rates):,.0f}-{max(rates):,.0f}] | "
              f"{median / base:.2f}x | "
              f"{statistics.median(r['server_cpu_pct'] for r in runs):.0f} | "
              f"{statistics.median(r['us_per_msg'] for r in runs):.2f} | "
              f"{statistics.median(r['client_cpu_pct'] for r in runs):.0f} | "
              f"{sum(r['errors'] for r in runs):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
