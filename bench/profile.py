"""``python -m bench.profile``: where does a Python server's time go under load?

Starts the server pinned like a benchmark run, drives it with the load client and samples
it with py-spy (``pip install py-spy``) for the measured window, then prints the
lines and functions with the most self time and the most inclusive time. The collapsed
stacks land in bench/out/ (feed them to flamegraph.pl or speedscope for a picture).
Sampling slows the server somewhat (py-spy reads its memory ~``--rate`` times a second),
so compare shares, not absolute throughput.
"""

import argparse
import collections
import re
import shutil
import subprocess
import sys
from pathlib import Path

from bench import OUT_DIR
from bench.loadgen import Load, run_loadgen
from bench.runner import pick_cores
from bench.servers import SERVERS, running_server, stop_process


def parse_collapsed(text: str) -> tuple[collections.Counter[str], collections.Counter[str], int]:
    """(self samples, inclusive samples, total) per frame from py-spy's raw format."""
    self_time: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        self_time[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    return self_time, inclusive, total


def by_function(counter: collections.Counter[str]) -> collections.Counter[str]:
    """Merges a function's lines: 'f (file.py:12)' and 'f (file.py:15)' become 'f (file.py)'."""
    merged: collections.Counter[str] = collections.Counter()
    for frame, count in counter.items():
        merged[re.sub(r":\d+\)$", ")", frame)] += count
    return merged


def _top(counter: collections.Counter[str], total: int, limit: int) -> str:
    return "\n".join(
        f"  {100 * n / total:5.1f}%  {frame}" for frame, n in counter.most_common(limit)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--server", default="muxd", choices=sorted(SERVERS))
    parser.add_argument("--conns", type=int, default=100)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--native", action="store_true", help="include C frames (slower)")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        print("error: py-spy not found (pip install py-spy)", file=sys.stderr)
        return 2
    server_core, client_core = pick_cores()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    raw = OUT_DIR / f"profile-{args.server}.txt"
    with running_server(SERVERS[args.server], server_core) as server:
        record = [py_spy, "record", "--pid", str(server.pid), "--rate", str(args.rate),
                  "--duration", str(int(args.seconds + 1)), "--nonblocking"]  # fmt: skip
        if args.native:
            record.append("--native")
        sampler = subprocess.Popen([*record, "--format", "raw", "--output", str(raw)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
        try:
            result = run_loadgen(
                Load(args.conns, args.size), server.port, server.pid, server_core, client_core,
                duration=args.seconds, warmup=0.5,
            )  # fmt: skip
            sampler.wait(timeout=args.seconds + 60)
        finally:
            stop_process(sampler)
    self_time, inclusive, total = parse_collapsed(Path(raw).read_text())
    print(f"{args.server}: {result['msgs_per_s']:,.0f} msg/s while sampled, "
          f"{result['server_cpu_us_per_msg']:.2f} us server CPU/msg, {total} samples")  # fmt: skip
    print(f"\nself time by line:\n{_top(self_time, total, args.top)}")
    print(f"\nself time by function:\n{_top(by_function(self_time), total, args.top)}")
    print(f"\ninclusive time by function:\n{_top(by_function(inclusive), total, args.top)}")
    print(f"\ncollapsed stacks: {raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
