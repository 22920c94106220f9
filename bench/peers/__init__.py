"""Reference echo servers muxd is compared against (each: ``python -m bench.peers.NAME PORT``)."""

import resource
import sys


def port_from_argv() -> int:
    """The only argument every peer takes: the 127.0.0.1 port to listen on."""
    if len(sys.argv) != 2:
        sys.exit(f"usage: python -m {sys.modules['__main__'].__spec__.name} PORT")
    return int(sys.argv[1])


def raise_nofile_limit() -> None:
    """Idle-scaling runs hold 10,000+ sockets; the default soft limit may be 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
