"""PNG plots of a results dict: the idle-connection claim and throughput vs message size."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.aggregate import spread

IDLE_SERVERS = ("muxd", "muxd-poll", "muxd-select", "select-textbook")


Matcher = Callable[[str, dict[str, Any]], bool]


def _is_idle_scenario(name: str, _result: dict[str, Any]) -> bool:
    return name.startswith("idle-")


def _is_size_scenario(name: str, result: dict[str, Any]) -> bool:
    load = result["load"]
    return name.startswith("c100-") and load["depth"] == 1 and load["idle"] == 0


def _series(
    results: dict[str, Any], matches: Matcher, x_of: str, server: str, metric: str
) -> tuple[list[float], list[float], list[list[float]]]:
    """(x, median, [below, above]) for one server across the matching scenarios."""
    points = []
    for name, result in results["scenarios"].items():
        if not matches(name, result) or server not in result["samples"]:
            continue
        found = spread(result["samples"][server], metric)
        if found is not None:
            points.append((result["load"][x_of], found))
    points.sort(key=lambda point: point[0])
    xs = [x for x, _ in points]
    medians = [s.median for _, s in points]
    errors = [[s.median - s.low for _, s in points], [s.high - s.median for _, s in points]]
    return xs, medians, errors


def _plot_lines(ax: Any, results: dict[str, Any], matches: Matcher, x_of: str, metric: str,
                servers: list[str]) -> bool:  # fmt: skip
    drew = False
    for server in servers:
        xs, medians, errors = _series(results, matches, x_of, server, metric)
        if xs:
            ax.errorbar(xs, medians, yerr=errors, marker="o", capsize=3, label=server)
            drew = True
    return drew


def _all_servers(results: dict[str, Any]) -> list[str]:
    seen: dict[str, None] = {}
    for result in results["scenarios"].values():
        seen.update(dict.fromkeys(result["servers"]))
    return list(seen)


def write_plots(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """Writes whichever plots the results have data for; returns their paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    # Throughput next to server CPU per message: on a shared or busy machine throughput
    # swings with the load client's luck, CPU per message much less.
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    idle_servers = list(IDLE_SERVERS)
    if _plot_lines(left, results, _is_idle_scenario, "idle", "msgs_per_s", idle_servers):
        _plot_lines(right, results, _is_idle_scenario, "idle", "server_cpu_us_per_msg",
                    idle_servers)  # fmt: skip
        for ax, label in ((left, "echoed msg/s"), (right, "server CPU us per message")):
            ax.set_xlabel("idle connections held open (+100 active, 1 KiB)")
            ax.set_ylabel(label)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
        left.legend(fontsize=8)
        fig.suptitle("Idle connections: epoll vs poll vs select (median, min-max bars)")
        fig.tight_layout()
        written.append(out_dir / "idle_scaling.png")
        fig.savefig(written[-1], dpi=80)
    plt.close(fig)

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    servers = _all_servers(results)
    if _plot_lines(left, results, _is_size_scenario, "size", "mib_per_s", servers):
        _plot_lines(right, results, _is_size_scenario, "size", "server_cpu_us_per_msg", servers)
        for ax, label in ((left, "MiB/s echoed"), (right, "server CPU us per message")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("message size (bytes), 100 conns, 1 in flight")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3, which="both")
        left.legend(fontsize=8)
        fig.suptitle("Message size (median, min-max bars)")
        fig.tight_layout()
        written.append(out_dir / "message_size.png")
        fig.savefig(written[-1], dpi=80)
    plt.close(fig)
    return written
