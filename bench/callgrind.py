"""``python -m bench.callgrind``: user-space instructions per echoed message, under callgrind.

Timing a hot-path change on a shared 2-core VM is noisy: two runs of the same code can
differ by 5%, more than most changes are worth. Counting instructions is not: the server
runs under valgrind's callgrind with instrumentation switched on only while the load
client drives it, and the instructions it executed in user space (the interpreter, libc,
the event loop; not the kernel) are divided by the messages echoed. Repeated runs agree
within ~1%, so a 3% change is visible in one run. Needs ``valgrind`` (Debian: apt install
valgrind).

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
from bench.servers import SERVERS, ServerSpec, running_server

STARTUP_UNDER_VALGRIND_S = 120.0
DUMP_TIMEOUT_S = 30.0


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


def _control(callgrind_control: str, *args: str) -> None:
    subprocess.run([callgrind_control, *args], check=True, capture_output=True, timeout=60)


def measure(spec: ServerSpec, load: Load, seconds: float, out_dir: Path) -> tuple[int, int]:
    """(messages echoed, user-space instructions executed) while under load."""
    valgrind = shutil.which("valgrind")
    callgrind_control = shutil.which("callgrind_control")
    if valgrind is None or callgrind_control is None:
        raise SystemExit("error: valgrind not found (Debian: apt install valgrind)")
    server_core, client_core = pick_cores()
    wrapped = under_callgrind(spec, valgrind, out_dir)
    with running_server(wrapped, server_core, STARTUP_UNDER_VALGRIND_S) as server:
        pid = str(server.pid)
        _control(callgrind_control, "--instr=on", pid)
        result = run_loadgen(load, server.port, server.pid, server_core, client_core,
                             duration=seconds, warmup=0.0)  # fmt: skip
        _control(callgrind_control, "--instr=off", pid)
        _control(callgrind_control, "--dump", pid)
        dump = out_dir / f"{spec.name}.{pid}.1"
        deadline = time.monotonic() + DUMP_TIMEOUT_S
        while not dump.exists() and time.monotonic() < deadline:
            time.sleep(0.1)  # callgrind writes the dump asynchronously
    return result["msgs"], total_instructions(dump)


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
        msgs, instructions = measure(SERVERS[name], load, args.seconds, args.out.resolve())
        rows.append((name, msgs, instructions / msgs if msgs else float("nan")))
        print(f"  {name}: {msgs:,} {unit}s, {rows[-1][2]:,.0f} instructions/{unit}", flush=True)
    base = rows[0][2]
    print(f"\n{args.conns} conns x {args.size} B, user-space instructions per {unit}:")
    print(f"{'server':<18} {'messages':>10} {'instr/msg':>10} {'vs ' + rows[0][0]:>10}")
    for name, msgs, per_msg in rows:
        print(f"{name:<18} {msgs:>10,} {per_msg:>10,.0f} {per_msg / base:>9.2f}x")
    print(f"\ncallgrind dumps: {args.out} (callgrind_annotate FILE shows where)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
