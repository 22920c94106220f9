"""``python -m bench``: build, run the scenarios with servers alternating, print medians.

Writes bench/out/results.json (raw samples), bench/out/summary.md and PNG plots.
"""

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from bench import OUT_DIR
from bench.aggregate import report
from bench.build import EPOLL_ECHO_SOURCE, LOADGEN_SOURCE, BuildError, compiled
from bench.machine import machine_info
from bench.plots import write_plots
from bench.runner import Settings, pick_cores, run_scenario
from bench.scenarios import SCENARIOS, Scenario
from bench.servers import SERVERS, muxd_available

FULL = {"reps": 5, "duration": 2.0, "warmup": 0.5}
QUICK = {"reps": 1, "duration": 0.5, "warmup": 0.2}


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--scenario",
        action="append",
        type=_csv,
        default=[],
        help="scenario name(s), comma-separated or repeated (default: all)",
    )
    parser.add_argument(
        "--servers",
        type=_csv,
        default=None,
        help="run these servers, in this order, instead of each scenario's list",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny run: 1 rep of 0.5 s (explicit --reps/--duration still win)",
    )
    parser.add_argument("--reps", type=int, help="repetitions per server (default 5)")
    parser.add_argument("--duration", type=float, help="measured seconds per run (default 2)")
    parser.add_argument("--warmup", type=float, help="unmeasured seconds before each window")
    parser.add_argument(
        "--out",
        type=Path,
        default=OUT_DIR,
        help="where results.json, summary.md and plots go (default bench/out)",
    )
    parser.add_argument(
        "--from-json",
        type=Path,
        metavar="RESULTS_JSON",
        help="do not measure: re-render tables and plots of an earlier run",
    )
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--list", action="store_true", help="list scenarios and servers")
    args = parser.parse_args(argv)  # fmt: skip
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.reps < 1 or not 0 < args.duration <= 120:
        parser.error("--reps must be >= 1 and --duration in (0, 120]")
    args.scenario = [name for group in args.scenario for name in group] or list(SCENARIOS)
    unknown = [n for n in args.scenario if n not in SCENARIOS]
    unknown += [n for n in (args.servers or []) if n not in SERVERS]
    if unknown:
        parser.error(f"unknown scenario/server: {', '.join(unknown)} (see --list)")
    return args


def can_hold(server: str, scenario: Scenario) -> bool:
    """Whether the server can take the scenario's connections at all (select: < 1024 fds)."""
    limit = SERVERS[server].max_connections
    return limit is None or scenario.load.conns + scenario.load.idle <= limit


def _list() -> None:
    print("scenarios:")
    for scenario in SCENARIOS.values():
        print(f"  {scenario.name:<12} {scenario.title}  [{', '.join(scenario.servers)}]")
    print("servers:")
    for server in SERVERS.values():
        print(f"  {server.name:<17} {server.description}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    server_core, client_core = pick_cores()
    if server_core == client_core:
        print("warning: one CPU only; server and load client share it", file=sys.stderr)
    settings = Settings(args.reps, args.duration, args.warmup, server_core, client_core)
    if not muxd_available():
        print("note: muxd is not in this checkout yet; its rows will say ServerUnavailable",
              file=sys.stderr)  # fmt: skip
    results: dict[str, Any] = {
        "machine": machine_info(),
        "settings": vars(settings),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "scenarios": {},
    }
    for name in args.scenario:
        scenario = SCENARIOS[name]
        servers = [s for s in (args.servers or scenario.servers) if can_hold(s, scenario)]
        if not servers:
            continue
        print(f"{name}: {scenario.title}", file=sys.stderr, flush=True)
        results["scenarios"][name] = run_scenario(scenario, servers, settings)
    return results


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    # SystemExit unwinds through the runner's finally blocks, which stop every child.
    sys.exit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    args = parse_args(argv)
    if args.list:
        _list()
        return 0
    if args.from_json:
        results = json.loads(args.from_json.read_text())
    else:
        try:
            compiled(LOADGEN_SOURCE)
            compiled(EPOLL_ECHO_SOURCE)
        except BuildError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        results = run(args)
    machine, settings = results["machine"], results["settings"]
    print(f"\nmachine: {machine['cpu_model']}, {machine['cpus_online']} CPUs, "
          f"Linux {machine['kernel']}, Python {machine['python']}; server on core "
          f"{settings['server_core']}, load client on core {settings['client_core']}; "
          f"{settings['reps']} reps x {settings['duration']}s\n")  # fmt: skip
    print(report(results))
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.from_json:
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "summary.md").write_text(report(results, markdown=True))
    plots = [] if args.no_plots else write_plots(results, args.out)
    plot_list = ", ".join(map(str, plots)) or "none"
    raw = args.from_json or args.out / "results.json"
    print(f"raw samples: {raw}; plots: {plot_list}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        # Children were already stopped by the context managers' finally blocks.
        sys.exit(130)
