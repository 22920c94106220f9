"""Turns raw samples into medians with min-max spread, ratios against muxd, and tables."""

import statistics
from dataclasses import dataclass
from typing import Any

BASELINE_SERVER = "muxd"


@dataclass(frozen=True)
class Spread:
    median: float
    low: float
    high: float
    count: int


def spread(samples: list[dict[str, Any]], metric: str) -> Spread | None:
    values = [s[metric] for s in samples if not s["error"] and s.get(metric, -1) >= 0]
    if not values:
        return None
    return Spread(statistics.median(values), min(values), max(values), len(values))


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _fmt_spread(value: Spread | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    if value.count == 1:
        return _fmt(value.median, digits)
    return f"{_fmt(value.median, digits)} [{_fmt(value.low, digits)}-{_fmt(value.high, digits)}]"


def _median(samples: list[dict[str, Any]], metric: str) -> float | None:
    found = spread(samples, metric)
    return None if found is None else found.median


def ratio_to_baseline(
    result: dict[str, Any], server: str, metric: str | None = None
) -> float | None:
    """Server's median divided by muxd's, of the headline metric unless told otherwise
    (>1: more msg/s, more bytes per conn, or more CPU per message)."""
    metric = metric or result["headline"]
    mine = _median(result["samples"].get(server, []), metric)
    base = _median(result["samples"].get(BASELINE_SERVER, []), metric)
    if mine is None or not base:
        return None
    return mine / base


# "srv us/msg": the server process's utime+stime per echoed message: the cost measure that
# does not depend on whether the load client kept up. "user us/msg": the utime part alone,
# the server's own work (for a Python server: the interpreter's), the rest being the
# kernel's socket and epoll work done on its behalf. "core busy%" is a whole CPU's busy
# time from /proc/stat (softirq and any other tenant included): the server core near 100%
# means the server was the bottleneck. The client's headroom is 100 - "client CPU%".
# "others%": busy time of both cores not charged to the server or the client (softirq,
# other tenants), in % of one core; a few % is normal, tens of % means a noisy machine.
THROUGHPUT_COLUMNS = [
    "server", "msg/s median [min-max]", "MiB/s", "vs muxd", "srv us/msg [min-max]",
    "us/msg vs muxd", "user us/msg", "srv core busy%", "client CPU%", "client core busy%",
    "others%", "p50 us", "p99 us", "ok/runs",
]  # fmt: skip
# Churn: one connection (connect, one echoed message, close) is the unit. "store us/conn"
# is the stand-in PID 1 file descriptor store's CPU (bench/fakestore.py, on the server's
# core) for muxd with hand-over on: a cost of hand-over that is not muxd's own; "stored %"
# the share of its connections that reached the store. p50/p99 are connect() to the last
# echoed byte.
CHURN_COLUMNS = [
    "server", "conn/s median [min-max]", "vs muxd", "srv us/conn [min-max]",
    "us/conn vs muxd", "user us/conn", "store us/conn", "stored %", "srv core busy%", "client CPU%",
    "client core busy%", "others%", "p50 us", "p99 us", "ok/runs",
]  # fmt: skip
MEMORY_COLUMNS = [
    "server", "RSS before MiB", "RSS after MiB", "bytes/conn median [min-max]", "vs muxd",
    "ok/runs",
]  # fmt: skip


def with_other_load(sample: dict[str, Any]) -> dict[str, Any]:
    """Adds ``other_busy_pct``: core time neither benchmark process was charged for."""
    keys = ("server_core_busy_pct", "client_core_busy_pct", "server_cpu_pct", "client_cpu_pct")
    if any(sample.get(key, -1) < 0 for key in keys):
        return sample
    other = (sample["server_core_busy_pct"] + sample["client_core_busy_pct"]
             - sample["server_cpu_pct"] - sample["client_cpu_pct"]
             - max(0.0, sample.get("helper_cpu_pct", -1)))  # fmt: skip
    return {**sample, "other_busy_pct": max(0.0, other)}


def _ratio_text(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def _ok_runs(samples: list[dict[str, Any]]) -> str:
    return f"{sum(1 for s in samples if not s['error'])}/{len(samples)}"


def table_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    rows = []
    memory = result["kind"] == "memory"
    churn = result["kind"] == "churn"
    for server in result["servers"]:
        samples = [with_other_load(s) for s in result["samples"].get(server, [])]
        ratio_text = _ratio_text(ratio_to_baseline(result, server))
        if memory:
            before, after = _median(samples, "rss_before_kib"), _median(samples, "rss_after_kib")
            rows.append([
                server,
                _fmt(before and before / 1024, 1),
                _fmt(after and after / 1024, 1),
                _fmt_spread(spread(samples, "bytes_per_conn")),
                ratio_text,
                _ok_runs(samples),
            ])  # fmt: skip
        else:
            rows.append(_rate_row(result, server, samples, ratio_text, churn))
    columns = CHURN_COLUMNS if churn else MEMORY_COLUMNS if memory else THROUGHPUT_COLUMNS
    return columns, rows


def _rate_row(result: dict[str, Any], server: str, samples: list[dict[str, Any]],
              ratio_text: str, churn: bool) -> list[str]:
    """A row of THROUGHPUT_COLUMNS, or of CHURN_COLUMNS (a connection is the unit: no
    MiB/s, and the store's CPU and share stored for hand-over)."""
    row = [server, _fmt_spread(spread(samples, "msgs_per_s"))]
    if not churn:
        row.append(_fmt(_median(samples, "mib_per_s"), 1))
    row += [
        ratio_text,
        _fmt_spread(spread(samples, "server_cpu_us_per_msg"), 2),
        _ratio_text(ratio_to_baseline(result, server, "server_cpu_us_per_msg")),
        _fmt(_median(samples, "server_user_us_per_msg"), 2),
    ]
    if churn:
        row += [_fmt(_median(samples, "helper_cpu_us_per_msg"), 2),
                _fmt(_median(samples, "stored_pct"))]
    return row + [
        _fmt(_median(samples, "server_core_busy_pct")),
        _fmt(_median(samples, "client_cpu_pct")),
        _fmt(_median(samples, "client_core_busy_pct")),
        _fmt(_median(samples, "other_busy_pct")),
        _fmt(_median(samples, "p50_us")),
        _fmt(_median(samples, "p99_us")),
        _ok_runs(samples),
    ]


def first_errors(result: dict[str, Any]) -> dict[str, str]:
    """One error message per server that had failures, so a table's '-' is explained."""
    found = {}
    for server, samples in result["samples"].items():
        errors = [s["error"] for s in samples if s["error"]]
        if errors:
            found[server] = errors[0]
    return found


def render_text(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True))
             for line in [header, *rows]]  # fmt: skip
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def report(results: dict[str, Any], markdown: bool = False) -> str:
    render = render_markdown if markdown else render_text
    sections = []
    for name, result in results["scenarios"].items():
        header, rows = table_rows(result)
        title = f"{name}: {result['title']}"
        heading = f"### {title}" if markdown else f"== {title} (headline: {result['headline']})"
        section = [heading, "", render(header, rows)]
        for server, error in first_errors(result).items():
            section.append(f"{'- ' if markdown else '  ! '}{server}: {error[:300]}")
        sections.append("\n".join(section))
    return "\n\n".join(sections) + "\n"
