"""``python -m bench.callgrind``: user-space instructions per echoed message, under callgrind.

Timing a hot-path change on a shared 2-core VM is noisy: two runs of the same code can
differ by 5%, more than most changes are worth. Counting instructions is not: the server
runs under valgrind's callgrind with instrumentation switched on only while the load
client drives it, after a warm-up (``warm_up``: start-up, compilation and the specialising
interpreter's adaptation are not counted), and the instructions it executed in user space
(the interpreter, libc, the event loop; not the kernel) are divided by the messages echoed.
Repeated runs agree within ~1% (the messages per wait printed with each run explain most of
what remains), so take the median of three for a change of 1-3%. Needs ``valgrind``
(Debian: apt install valgrind).

What it does not show: the kernel's share (most of the cost per message, see
bench/RESULTS.md) and anything that depends on timing, such as how many events one
``epoll_wait`` returns. Under valgrind the server is ~50x slower, so its turns carry more
events than in a real run, which understates per-turn costs. Use it to rank changes to
the same loop, and the timed benchmark to report speed.
"""

import argparse
import dataclasses
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.loadgen import Load, run_loadgen
from bench.runner import pick_cores
from bench.servers import SERVERS, RunningServer, ServerSpec, running_server

STARTUP_UNDER_VALGRIND_S = 120.0
DUMP_TIMEOUT_S = 30.0
# Warm-up before counting: load in slices until the server has echoed this many messages.
WARMUP_MESSAGES = 3_000
WARMUP_SLICE_S = 0.5
WARMUP_LIMIT_S = 120.0


def under_callgrind(spec: ServerSpec, valgrind: str, out_dir: Path) -> ServerSpec:
    def argv(port: int, scratch: Path) -> list[str]:
        return [
            valgrind, "--tool=callgrind", "--instr-atstart=no", "--trace-children=yes",
            f"--callgrind-out-file={out_dir / (spec.name + '.%p')}", *spec.argv(port, scratch),
        ]  # fmt: skip

    return dataclasses.replace(spec, argv=argv)


def total_instructions(dump: Path) -> int:
    for line in dump.read_text(errors="replace").splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    return 0


# The calls that wait for readiness, by their names in libc (libuv's epoll_pwait included).
WAIT_FUNCTIONS = frozenset({"epoll_wait", "epoll_pwait", "epoll_pwait2", "poll", "ppoll",
                            "select", "pselect"})


def waits(dump: Path) -> int:
    """How often the server called into the kernel to wait for readiness (its turns).

    Under valgrind, how many events one wait returns depends on how fast the load client
    was meanwhile, and a turn has costs of its own, so the messages per wait explain most
    of the difference between two runs of the same code.
    """
    names: dict[str, str] = {}
    callee = ""
    count = 0
    for line in dump.read_text(errors="replace").splitlines():
        if line.startswith(("cfn=", "fn=")):
            # "fn=(12) name" the first time a function appears, "fn=(12)" after that
            ident, _, name = line.partition("=")[2].partition(" ")
            if name:
                names[ident] = name
            if line.startswith("cfn="):
                callee = names.get(ident, "")
        elif line.startswith("calls=") and callee in WAIT_FUNCTIONS:
            count += int(line[6:].split()[0])
    return count


def _control(callgrind_control: str, *args: str) -> None:
    subprocess.run([callgrind_control, *args], check=True, capture_output=True, timeout=60)


def warm_up(server: RunningServer, load: Load, server_core: int, client_core: int,
            messages: int = WARMUP_MESSAGES) -> int:
    """Serve ``load`` uninstrumented until the server has echoed ``messages``; returns how many.

    A server accepts connections before it is ready to count: muxd binds first and imports
    its loop after, and with PYTHONDONTWRITEBYTECODE=1 (or no __pycache__) that import
    compiles the source, under valgrind for seconds. Counting from the first connection
    put that compilation, a different share of it in every run, into the measured window
    (runs of the same code differed by 30-50%). Echoing messages first also means every
    lazy import and every first-use path (accept, close, the timers) has run and CPython's
    specialising interpreter has adapted the hot loop before an instruction is counted.
    """
    echoed = 0
    deadline = time.monotonic() + WARMUP_LIMIT_S
    while echoed < messages:
        if time.monotonic() >= deadline:
            raise SystemExit(f"error: {server.spec.name} echoed only {echoed} messages "
                             f"in {WARMUP_LIMIT_S:.0f} s of warm-up")
        result = run_loadgen(load, server.port, server.pid, server_core, client_core,
                             duration=WARMUP_SLICE_S, warmup=0.0)  # fmt: skip
        echoed += result["msgs"]
    return echoed


def measure(spec: ServerSpec, load: Load, seconds: float, out_dir: Path) -> tuple[int, int, int]:
    """(messages echoed, user-space instructions executed, waits for readiness) under load."""
    valgrind = shutil.which("valgrind")
    callgrind_control = shutil.which("callgrind_control")
    if valgrind is None or callgrind_control is None:
        raise SystemExit("error: valgrind not found (Debian: apt install valgrind)")
    server_core, client_core = pick_cores()
    wrapped = under_callgrind(spec, valgrind, out_dir)
    with running_server(wrapped, server_core, STARTUP_UNDER_VALGRIND_S) as server:
        pid = str(server.pid)
        warm_up(server, load, server_core, client_core)
        _control(callgrind_control, "--instr=on", pid)
        result = run_loadgen(load, server.port, server.pid, server_core, client_core,
                             duration=seconds, warmup=0.0)  # fmt: skip
        _control(callgrind_control, "--instr=off", pid)
        _control(callgrind_control, "--dump", pid)
        dump = out_dir / f"{spec.name}.{pid}.1"
        deadline = time.monotonic() + DUMP_TIMEOUT_S
        while not dump.exists() and time.monotonic() < deadline:
            time.sleep(0.1)  # callgrind writes the dump asynchronously
    return result["msgs"], total_instructions(dump), waits(dump)


def add_churn_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--churn", action="store_true",
                        help="connection churn (loadgen --churn): instructions per connection "
                             "(connect, one message echoed, close) instead of per message")


def load_of(args: argparse.Namespace) -> tuple[Load, str]:
    """The load to drive and what one unit of it is called."""
    return Load(args.conns, args.size, churn=args.churn), "connection" if args.churn else "message"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.callgrind", description=__doc__)
    parser.add_argument("--servers", default="muxd,python-floor,uvloop",
                        help="comma-separated (default: muxd,python-floor,uvloop)")
    parser.add_argument("--conns", type=int, default=10)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--out", type=Path, default=Path("bench/out/callgrind"))
    add_churn_option(parser)
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.servers.split(",") if name.strip()]
    unknown = [name for name in names if name not in SERVERS]
    if unknown:
        parser.error(f"unknown server(s): {', '.join(unknown)}")
    args.out.mkdir(parents=True, exist_ok=True)
    load, unit = load_of(args)
    rows = []
    for name in names:
        msgs, instructions, turns = measure(SERVERS[name], load, args.seconds, args.out.resolve())
        rows.append((name, msgs, instructions / msgs if msgs else float("nan")))
        print(f"  {name}: {msgs:,} {unit}s, {rows[-1][2]:,.0f} instructions/{unit}, "
              f"{msgs / turns if turns else float('nan'):.1f} {unit}s/wait", flush=True)
    base = rows[0][2]
    print(f"\n{args.conns} conns x {args.size} B, user-space instructions per {unit}:")
    print(f"{'server':<18} {'messages':>10} {'instr/msg':>10} {'vs ' + rows[0][0]:>10}")
    for name, msgs, per_msg in rows:
        print(f"{name:<18} {msgs:>10,} {per_msg:>10,.0f} {per_msg / base:>9.2f}x")
    print(f"\ncallgrind dumps: {args.out} (callgrind_annotate FILE shows where)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
