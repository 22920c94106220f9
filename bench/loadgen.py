"""Runs the C load client (bench/loadgen.c) for one measurement and parses its JSON line."""

import functools
import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.build import LOADGEN_SOURCE, compiled
from bench.servers import pin_to_core, stop_process

# On top of the loadgen's own alarm(): the runner never waits forever on a child.
SLACK_S = 90.0


@dataclass(frozen=True)
class Load:
    conns: int
    size: int
    depth: int = 1
    idle: int = 0
    # Connection churn: each of ``conns`` connectors loops connect, one message of
    # ``size``, its verified echo, close (loadgen.c --churn); "msgs" are connections.
    churn: bool = False


class LoadgenFailed(RuntimeError):
    pass


def run_loadgen(
    load: Load,
    port: int,
    server_pid: int,
    server_core: int,
    client_core: int,
    duration: float,
    warmup: float,
    on_idle_connected: Callable[[], None] | None = None,
    helper_pid: int | None = None,
) -> dict[str, Any]:
    """One closed-loop measurement against 127.0.0.1:``port``.

    If ``on_idle_connected`` is given, the client stops after opening its idle
    connections, the callback runs (e.g. to wait for the server to accept them or to
    sample its memory), and only then does the active load start.
    ``helper_pid``'s CPU (a file descriptor store's) is reported apart, over the same
    window, as ``helper_cpu_*``.
    """
    argv = [
        str(compiled(LOADGEN_SOURCE)),
        f"--port={port}",
        f"--conns={load.conns}",
        f"--size={load.size}",
        f"--depth={load.depth}",
        f"--idle={load.idle}",
        f"--duration={duration}",
        f"--warmup={warmup}",
        f"--server-pid={server_pid}",
        f"--server-core={server_core}",
        f"--client-core={client_core}",
    ]
    if on_idle_connected is not None:
        argv.append("--wait-go")
    if load.churn:
        argv.append("--churn")
    if helper_pid is not None:
        argv.append(f"--helper-pid={helper_pid}")
    process = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=functools.partial(pin_to_core, client_core),
    )
    try:
        if on_idle_connected is not None:
            assert process.stdin is not None and process.stdout is not None
            ready = process.stdout.readline()
            if not ready.startswith("READY"):
                raise LoadgenFailed(f"expected READY, got {ready!r}")
            on_idle_connected()
            process.stdin.write("GO\n")
            process.stdin.flush()
        stdout, stderr = process.communicate(timeout=duration + warmup + SLACK_S)
    finally:
        stop_process(process)
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise LoadgenFailed(f"no result (exit {process.returncode}): {stderr.strip()}")
    return json.loads(lines[-1])
