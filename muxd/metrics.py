"""Metrics: what muxd exposes to Prometheus, and the text it is written in.

This module owns the exposition and nothing of the loop. ``Figures`` is a
plain snapshot of what one event loop has counted (built by the loop's
reporting room at scrape time, or sent by a worker to the supervisor as
JSON); ``ProcessFigures`` is read from ``/proc`` for any PID; ``render`` turns
them into the Prometheus text exposition format 0.0.4. ``render`` is a pure
function: it touches no shared state and no socket.

Names follow Prometheus' conventions: a ``muxd_`` prefix, base units
(bytes, seconds), ``_total`` on counters, the process metrics under the
standard names every dashboard expects, and only low-cardinality labels
(a configured listener, a fixed reason, a worker number): never a client's
address.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Why a connection was closed (connection.Close, lower-cased) and why one
# was refused at once: the fixed label values, so every series exists from
# the start (a counter that appears only on its first increment hides the
# first increase from rate()).
CLOSE_REASONS = ("eof", "reset", "idle", "limit", "shutdown", "proxy", "access")
REFUSAL_REASONS = ("max_connections", "max_connections_per_ip", "access",
                   "out_of_descriptors", "cannot_watch", "proxy_from", "proxy_header")
UDP_DROP_REASONS = ("source_port", "bad_source", "self", "access", "rate", "total_rate",
                    "send_failed")
RELOAD_RESULTS = ("success", "failure")
METRICS_ANSWERS = ("200", "400", "404", "405")
METRICS_REFUSALS = ("limit", "access", "timeout", "evicted")
# Why a connection is not in systemd's file descriptor store.
UNSTORED_REASONS = ("store_full", "store_error")


@dataclass
class ListenerFigures:
    """One TCP listener's connections since the loop started."""

    accepted: int = 0
    open: int = 0
    closed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CLOSE_REASONS, 0))
    refused: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REFUSAL_REASONS, 0))
    received_bytes: int = 0
    sent_bytes: int = 0


@dataclass
class Figures:
    """What one event loop has done; JSON-able (``to_json``/``from_json``)."""

    listeners: dict[str, ListenerFigures] = field(default_factory=dict)
    udp_echoed: int = 0
    udp_dropped: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(UDP_DROP_REASONS, 0))
    # Hand-over of connections across restarts (handover.HandOver.figures):
    # None when hand-over is off (no file descriptor store); rendered as
    # muxd_handover_* below.
    handover: dict[str, int] | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Figures:
        listeners = {name: ListenerFigures(**value)
                     for name, value in data.get("listeners", {}).items()}
        return cls(listeners=listeners, udp_echoed=int(data.get("udp_echoed", 0)),
                   udp_dropped=dict(data.get("udp_dropped", {})),
                   handover=data.get("handover"))


@dataclass
class ServiceFigures:
    """What the whole service reports once, whatever the number of workers."""

    version: str
    reloads: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RELOAD_RESULTS, 0))
    last_reload_success: float = 0.0  # Unix time; the start counts as the first load
    metrics_answers: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(METRICS_ANSWERS, 0))
    metrics_refused: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(METRICS_REFUSALS, 0))


@dataclass
class ProcessFigures:
    open_fds: int
    max_fds: int
    resident_memory_bytes: int
    virtual_memory_bytes: int
    cpu_seconds: float
    start_time_seconds: float


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_boot_time: float | None = None


def read_process(pid: int | str = "self") -> ProcessFigures | None:
    """A process's figures from /proc (None if it is gone or /proc is hidden)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat = file.read().rsplit(b")", 1)[1].split()
        open_fds = len(os.listdir(f"/proc/{pid}/fd"))
        if pid == "self" or pid == os.getpid():
            open_fds -= 1  # the descriptor listdir itself held open
        max_fds = 0
        with open(f"/proc/{pid}/limits", encoding="ascii") as file:
            for line in file:
                if line.startswith("Max open files"):
                    soft = line.split()[3]
                    max_fds = -1 if soft == "unlimited" else int(soft)
    except (OSError, IndexError, ValueError):
        return None
    # stat(5) fields, counted from 1 after the command: 14 utime, 15 stime,
    # 22 starttime (ticks after boot), 23 vsize (bytes), 24 rss (pages).
    return ProcessFigures(
        open_fds=open_fds,
        max_fds=max_fds,
        resident_memory_bytes=int(stat[21]) * _PAGE_SIZE,
        virtual_memory_bytes=int(stat[20]),
        cpu_seconds=(int(stat[11]) + int(stat[12])) / _CLOCK_TICKS,
        start_time_seconds=_boot() + int(stat[19]) / _CLOCK_TICKS,
    )


def _boot() -> float:
    global _boot_time
    if _boot_time is None:
        _boot_time = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
        try:
            with open("/proc/stat", encoding="ascii") as file:
                for line in file:
                    if line.startswith("btime "):
                        _boot_time = float(line.split()[1])
        except OSError:
            pass
    return _boot_time


# --- the exposition format ---------------------------------------------------

Labels = tuple[tuple[str, str], ...]


class _Family:
    def __init__(self, name: str, kind: str, help_text: str) -> None:
        self.name = name
        self.kind = kind
        self.help = help_text
        self.samples: list[tuple[Labels, float]] = []

    def add(self, labels: Labels, value: float) -> None:
        self.samples.append((labels, value))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _write(families: Iterable[_Family]) -> str:
    lines: list[str] = []
    for family in families:
        if not family.samples:
            continue
        lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        for labels, value in family.samples:
            if labels:
                text = ",".join(f'{key}="{_escape_label(val)}"' for key, val in labels)
                lines.append(f"{family.name}{{{text}}} {_number(value)}")
            else:
                lines.append(f"{family.name} {_number(value)}")
    return "\n".join(lines) + "\n"


def render(service: ServiceFigures,
           loops: Sequence[tuple[str | None, Figures]],
           processes: Sequence[tuple[str | None, ProcessFigures | None]]) -> str:
    """The exposition text. ``loops`` and ``processes`` pair each event loop
    and process with its ``worker`` label (None: a single daemon, no label)."""

    def family(name: str, kind: str, help_text: str) -> _Family:
        made = _Family(name, kind, help_text)
        order.append(made)
        return made

    order: list[_Family] = []
    accepted = family("muxd_connections_accepted_total", "counter",
                      "TCP connections accepted, including those refused at once.")
    opened = family("muxd_connections_open", "gauge", "TCP connections open now.")
    closed = family("muxd_connections_closed_total", "counter",
                    "TCP connections closed, by reason (limit and access: refused at once).")
    refused = family("muxd_connections_refused_total", "counter",
                     "TCP connections refused at once, by the limit or rule that refused them.")
    received = family("muxd_received_bytes_total", "counter", "Bytes received on TCP.")
    sent = family("muxd_sent_bytes_total", "counter", "Bytes echoed back on TCP.")
    echoed = family("muxd_udp_datagrams_echoed_total", "counter", "UDP datagrams echoed.")
    dropped = family("muxd_udp_datagrams_dropped_total", "counter",
                     "UDP datagrams dropped unanswered, by reason.")
    handover_conns = family("muxd_handover_connections_total", "counter",
                            "TCP connections taken over from the previous process at start.")
    handover_bytes = family("muxd_handover_bytes_total", "counter",
                            "Unsent echo bytes taken over with those connections.")
    handover_lost = family("muxd_handover_lost_connections_total", "counter",
                           "TCP connections the previous process could not hand over (not in "
                           "the file descriptor store), or that could not be served here.")
    unstored = family("muxd_handover_unstored_connections_total", "counter",
                      "TCP connections that could not be put into the file descriptor store "
                      "(a restart closes them), by reason.")
    unstored_open = family("muxd_handover_unstored_connections_open", "gauge",
                           "TCP connections open now that are not in the file descriptor "
                           "store: a restart now would close them.")
    for worker, figures in loops:
        base: Labels = (("worker", worker),) if worker is not None else ()
        for name, listener in figures.listeners.items():
            at = (("listener", name), *base)
            accepted.add(at, listener.accepted)
            opened.add(at, listener.open)
            for reason, count in listener.closed.items():
                closed.add((*at, ("reason", reason)), count)
            for reason, count in listener.refused.items():
                refused.add((*at, ("reason", reason)), count)
            received.add(at, listener.received_bytes)
            sent.add(at, listener.sent_bytes)
        echoed.add(base, figures.udp_echoed)
        for reason, count in figures.udp_dropped.items():
            dropped.add((*base, ("reason", reason)), count)
        handover = figures.handover
        if handover is not None:
            handover_conns.add(base, handover.get("connections", 0))
            handover_bytes.add(base, handover.get("bytes", 0))
            handover_lost.add(base, handover.get("lost", 0))
            for reason in UNSTORED_REASONS:
                unstored.add((*base, ("reason", reason)), handover.get(f"unstored_{reason}", 0))
            unstored_open.add(base, handover.get("unstored_open", 0))

    reloads = family("muxd_config_reloads_total", "counter",
                     "Configuration reloads (SIGHUP), by result.")
    for result, count in service.reloads.items():
        reloads.add((("result", result),), count)
    family("muxd_config_last_reload_success_timestamp_seconds", "gauge",
           "Unix time the configuration was last loaded successfully (at start or reload)."
           ).add((), service.last_reload_success)
    answers = family("muxd_metrics_requests_total", "counter",
                     "Requests to this metrics endpoint, by HTTP status answered.")
    for code, count in service.metrics_answers.items():
        answers.add((("code", code),), count)
    scrapers = family("muxd_metrics_connections_refused_total", "counter",
                      "Connections to this metrics endpoint closed unanswered, by reason.")
    for reason, count in service.metrics_refused.items():
        scrapers.add((("reason", reason),), count)
    family("muxd_build_info", "gauge", "Always 1; the version of muxd running."
           ).add((("version", service.version),), 1)

    process_families = (
        ("process_open_fds", "gauge", "Number of open file descriptors.", "open_fds"),
        ("process_max_fds", "gauge", "Maximum number of open file descriptors.", "max_fds"),
        ("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.",
         "resident_memory_bytes"),
        ("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.",
         "virtual_memory_bytes"),
        ("process_cpu_seconds_total", "counter", "Total user and system CPU time spent in "
         "seconds.", "cpu_seconds"),
        ("process_start_time_seconds", "gauge", "Start time of the process since unix epoch "
         "in seconds.", "start_time_seconds"),
    )
    for name, kind, help_text, attribute in process_families:
        made = family(name, kind, help_text)
        for worker, process in processes:
            if process is not None:
                made.add((("worker", worker),) if worker is not None else (),
                         getattr(process, attribute))
    return _write(order)
