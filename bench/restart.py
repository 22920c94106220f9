"""``python -m bench.restart``: what a restart with hand-over costs, SIGTERM to READY=1.

This process plays PID 1 (bench/fakestore.py): it starts muxd with NOTIFY_SOCKET and
FDSTORE set, so muxd stores every connection it accepts; the load client
(bench/loadgen.c) opens ``--conns`` connections and holds them. Then, ``--reps`` times,
it restarts muxd as ``systemctl restart`` does with the unit's stop hook: SIGURG, SIGTERM,
wait for the exit (muxd hands over: STOPPING=1, state memfd, BARRIER=1), start the next
muxd with every stored descriptor as LISTEN_FDS/LISTEN_FDNAMES/LISTEN_PID, and wait for
its READY=1. Each restart's seconds from SIGTERM to READY=1 are split into the old
process's hand-over (SIGTERM to its exit) and the new one's start (exec to READY=1).
At the end every held connection echoes one message, verified byte for byte, so a
restart that lost connections fails the run rather than looking fast.

What it does not include: systemd's own work (running the stop hook, which costs an
exec and a ``systemctl list-jobs``, and PID 1's per-descriptor bookkeeping; the README
gives a restart's time in a booted container).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import OUT_DIR, REPO_ROOT
from bench.build import LOADGEN_SOURCE, compiled
from bench.fakestore import FakeStore
from bench.procstat import open_fd_count
from bench.runner import pick_cores
from bench.servers import free_port, pin_to_core, stop_process

CONFIG = """\
[server]
listen = 127.0.0.1:{port}
handover = yes
[limits]
nofile = {nofile}
max_connections = {max_connections}
idle_timeout = 0
[logging]
level = info
"""
READY_TIMEOUT_S = 60.0
HOLD_TIMEOUT_S = 180.0
TAKEOVER = re.compile(r"took over (\d+) connections")
STATE_NAME = re.compile(r"state-\d+")


class RestartFailed(RuntimeError):
    pass


@dataclass
class Restart:
    total_s: float  # SIGTERM to the new process's READY=1
    handover_s: float  # SIGTERM to the old process's exit
    start_s: float  # the new process's exec to its READY=1
    taken_over: int  # from its log line
    # CPU time (user + system), which a busy machine does not stretch the way it does the
    # seconds above: the old process's from SIGTERM to its exit, the new one's to READY=1.
    handover_cpu_s: float = 0.0
    start_cpu_s: float = 0.0


class Pid1:
    """The fake store plus what PID 1 knows about its service's processes."""

    def __init__(self, scratch: Path, store_max: int) -> None:
        self.store = FakeStore(str(scratch / "notify"), store_max, on_notify=self._notified)
        self.ready: dict[int, float] = {}  # pid -> when its READY=1 arrived

    def _notified(self, when: float, pid: int, fields: dict[str, str]) -> None:
        if fields.get("READY") == "1":
            self.ready.setdefault(pid, when)

    def wait(self, done: Any, what: str, timeout: float) -> None:
        if not self.store.run_until(done, timeout):
            raise RestartFailed(f"timed out after {timeout:.0f} s waiting for {what}")


def _env(store: FakeStore) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(NOTIFY_SOCKET=store.path, FDSTORE=str(store.store_max))
    return env


def _start(pid1: Pid1, argv: list[str], env: dict[str, str], core: int, log: Path) -> int:
    pid = pid1.store.launch(argv, env, core=core, stderr=log)
    pid1.wait(lambda: pid in pid1.ready or pid in pid1.store.exited,
              f"READY=1 from muxd {pid}", READY_TIMEOUT_S)
    if pid not in pid1.ready:
        raise RestartFailed(f"muxd {pid} exited before READY=1: {log.read_text()[-2000:]}")
    return pid


def _taken_over(log: Path) -> int:
    found = TAKEOVER.findall(log.read_text(errors="replace"))
    return int(found[-1]) if found else 0


def restart_once(pid1: Pid1, old: int, argv: list[str], env: dict[str, str], core: int,
                 log: Path) -> tuple[int, Restart]:  # fmt: skip
    store = pid1.store
    store.drain()
    # The stop hook's signal, then systemd's SIGTERM (muxd takes SIGURG first).
    os.kill(old, signal.SIGURG)
    cpu_before = _cpu_s(old)
    sent = time.monotonic()
    os.kill(old, signal.SIGTERM)
    pid1.wait(lambda: old in store.exited, f"muxd {old} to exit", READY_TIMEOUT_S)
    exited, status = store.exited[old]
    if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
        raise RestartFailed(f"muxd {old} ended with wait status {status}")
    launched = time.monotonic()
    new = _start(pid1, argv, env, core, log)
    ready = pid1.ready[new]
    return new, Restart(ready - sent, exited - sent, ready - launched, _taken_over(log),
                        store.cpu_s[old] - cpu_before, _cpu_s(new))


def _cpu_s(pid: int) -> float:
    """utime + stime of a running process, from /proc (one clock tick's resolution)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_held(pid1: Pid1, pid: int, baseline: int, conns: int,
              timeout: float = HOLD_TIMEOUT_S) -> None:
    """Until muxd `pid` has accepted `conns` connections (its own descriptor table: a
    client's connect() completes before the accept) and has put each where the next
    process will find it: one store entry per connection (muxd up to d9e4aa9), or none
    (parking: a few parking sockets hold them all, filled in the accepting turn).
    `baseline`: its open descriptors before the first connection."""
    pid1.wait(lambda: open_fd_count(pid) >= baseline + conns,
              f"muxd to accept {conns} connections", timeout)
    pid1.store.drain()
    pid1.wait(lambda: pid1.store.held("conn") in range(1) or pid1.store.held("conn") >= conns,
              f"{conns} connections in the store", timeout)


def _raise_nofile(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < wanted:
        raise SystemExit(f"error: RLIMIT_NOFILE hard limit {hard} < {wanted} needed "
                         f"(the store holds every connection)")
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _loadgen(port: int, conns: int, size: int, server_pid: int,
             client_core: int) -> subprocess.Popen[str]:  # fmt: skip
    argv = [str(compiled(LOADGEN_SOURCE)), f"--port={port}", "--conns=0", f"--idle={conns}",
            f"--size={size}", "--wait-go", "--idle-echo", "--duration=0", "--warmup=0",
            "--connect-timeout=60", f"--server-pid={server_pid}"]  # fmt: skip
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: pin_to_core(client_core))  # fmt: skip


def _line_from(pid1: Pid1, process: subprocess.Popen[str], timeout: float) -> str:
    assert process.stdout is not None
    line: list[str] = []

    def arrived() -> bool:
        if select.select([process.stdout], [], [], 0)[0]:
            line.append(process.stdout.readline())
        return bool(line) or process.poll() is not None

    pid1.wait(arrived, "the load client's connections", timeout)
    return line[0] if line else ""


def run(conns: int, reps: int, size: int) -> dict[str, Any]:
    _raise_nofile(conns + 256)
    server_core, client_core = pick_cores()
    pin_to_core(client_core)  # PID 1's side runs beside the idle client, not on muxd's core
    restarts: list[Restart] = []
    with tempfile.TemporaryDirectory(prefix="bench-restart-") as scratch_dir:
        scratch = Path(scratch_dir)
        port = free_port()
        config = scratch / "muxd.ini"
        config.write_text(CONFIG.format(port=port, nofile=conns + 1024,
                                        max_connections=conns + 64))  # fmt: skip
        pid1 = Pid1(scratch, store_max=conns + 64)
        store = pid1.store
        env = _env(store)
        argv = [sys.executable, "-m", "muxd", "--config", str(config)]
        log = scratch / "muxd.log"
        client = None
        current = 0
        try:
            current = _start(pid1, argv, env, server_core, log)
            baseline = open_fd_count(current)
            client = _loadgen(port, conns, size, current, client_core)
            line = _line_from(pid1, client, HOLD_TIMEOUT_S)
            if not line.startswith("READY"):
                raise RestartFailed(f"load client: expected READY, got {line!r}")
            wait_held(pid1, current, baseline, conns)
            print(f"holding {conns:,} connections (the store has {store.held('conn'):,}); "
                  f"{reps} restarts", file=sys.stderr, flush=True)  # fmt: skip
            for rep in range(reps):
                current, result = restart_once(pid1, current, argv, env, server_core, log)
                restarts.append(result)
                print(f"  restart {rep + 1}: {result.total_s:.3f} s (hand-over "
                      f"{result.handover_s:.3f} s, start {result.start_s:.3f} s; CPU "
                      f"{result.handover_cpu_s:.2f} + {result.start_cpu_s:.2f} s), took over "
                      f"{result.taken_over:,}", file=sys.stderr, flush=True)  # fmt: skip
                if result.taken_over != conns:
                    raise RestartFailed(f"took over {result.taken_over} of {conns} connections")
                store.drain()  # what the new process sent up to its READY=1
                # (state-<pid>: the state memfd; parking sockets are state-park-*)
                if any(STATE_NAME.fullmatch(name) for name in store.stored.values()):
                    raise RestartFailed("the hand-over state was not removed from the store: "
                                        f"{sorted(set(store.stored.values()))}")
            assert client.stdin is not None
            client.stdin.write("GO\n")
            client.stdin.flush()
            client.stdin.close()
            pid1.wait(lambda: client.poll() is not None, "the echo on every connection", 120)
            out = client.stdout.read() if client.stdout else ""
            results = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
            if not results or results[-1]["errors"] or results[-1]["idle_echoed"] != conns:
                detail = results[-1] if results else client.stderr.read() if client.stderr else ""
                raise RestartFailed(f"not every held connection echoed after the restarts: "
                                    f"{detail}")  # fmt: skip
            echoed = results[-1]["idle_echoed"]
        finally:
            if current and current not in store.exited:
                os.kill(current, signal.SIGTERM)  # not armed: today's graceful stop
                store.run_until(lambda: current in store.exited, 10)
                if current not in store.exited:
                    os.kill(current, signal.SIGKILL)
                    store.run_until(lambda: current in store.exited, 10)
            if client is not None:
                stop_process(client)  # type: ignore[arg-type]
            store.close()
    return {
        "conns": conns,
        "size": size,
        "echoed_after": echoed,
        "restarts": [asdict(r) for r in restarts],
        "summary": {key: _spread([getattr(r, key) for r in restarts])
                    for key in ("total_s", "handover_s", "start_s", "handover_cpu_s",
                                "start_cpu_s")},
    }  # fmt: skip


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.restart", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conns", type=int, default=10_000, help="connections held")
    parser.add_argument("--reps", type=int, default=5, help="restarts (default 5)")
    parser.add_argument("--size", type=int, default=1024, help="the final echo's size")
    parser.add_argument("--out", type=Path, default=OUT_DIR / "restart.json")
    args = parser.parse_args(argv)
    if args.conns < 1 or args.reps < 1:
        parser.error("--conns and --reps must be >= 1")
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    compiled(LOADGEN_SOURCE)
    try:
        result = run(args.conns, args.reps, args.size)
    except RestartFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    summary = result["summary"]
    print(f"\n{args.conns:,} connections held, {args.reps} restarts "
          f"(SIGURG+SIGTERM to READY=1 of the next muxd), seconds, median [min-max]:")
    for key, label in (("total_s", "SIGTERM to READY=1"), ("handover_s", "  old: SIGTERM to exit"),
                       ("start_s", "  new: exec to READY=1"),
                       ("handover_cpu_s", "CPU: old, SIGTERM to exit"),
                       ("start_cpu_s", "CPU: new, exec to READY=1")):  # fmt: skip
        s = summary[key]
        print(f"  {label:<26} {s['median']:.3f} [{s['min']:.3f}-{s['max']:.3f}]")
    print(f"every connection echoed afterwards: {result['echoed_after']:,}/{args.conns:,}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"raw: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
