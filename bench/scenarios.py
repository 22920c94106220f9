"""What is measured: each scenario is one load shape and the servers it is run against."""

from dataclasses import dataclass, field
from enum import Enum

from bench.loadgen import Load


class Kind(Enum):
    THROUGHPUT = "throughput"
    MEMORY = "memory"
    CHURN = "churn"  # a throughput run whose "messages" are whole connections


PEERS = ("c-epoll", "uvloop", "asyncio-protocol", "asyncio-streams", "select-textbook")
MUXD_AND_PEERS = ("muxd", *PEERS)
# Where connection count is the variable, also the floor for any Python loop
# (bench/peers/python_floor.py): what is left between it and muxd is muxd's own cost.
WITH_FLOOR = (*MUXD_AND_PEERS, "python-floor")
# The seed's claim: a readiness loop should not slow down because of sockets it is
# not serving. select()/poll() scan every watched fd per call; epoll does not.
BACKENDS_SELECT_OK = ("muxd", "muxd-poll", "muxd-select", "select-textbook")
BACKENDS_BEYOND_FD_SETSIZE = ("muxd", "muxd-poll")
# What hand-over costs per connection: muxd with it off and on, beside the fastest
# Python peer and the C ceiling.
CHURN_SERVERS = ("muxd", "muxd-handover", "uvloop", "c-epoll")


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    load: Load
    servers: tuple[str, ...]
    kind: Kind = Kind.THROUGHPUT
    # The number a reader compares first; the table shows the rest too.
    headline: str = "msgs_per_s"
    tags: frozenset[str] = field(default_factory=frozenset)


KIB = 1024
SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in [
        Scenario("c10-1k", "1 KiB x 10 conns", Load(10, KIB), WITH_FLOOR, tags={"conns"}),
        Scenario(
            "c100-1k",
            "1 KiB x 100 conns (also the latency scenario)",
            Load(100, KIB),
            WITH_FLOOR,
            tags={"conns", "size", "latency"},
        ),
        Scenario("c1000-1k", "1 KiB x 1000 conns", Load(1000, KIB), WITH_FLOOR, tags={"conns"}),
        Scenario(
            "c10-64k",
            "64 KiB x 10 conns",
            Load(10, 64 * KIB),
            MUXD_AND_PEERS,
            headline="mib_per_s",
        ),
        Scenario("c100-1b", "1 byte x 100 conns", Load(100, 1), MUXD_AND_PEERS, tags={"size"}),
        Scenario(
            "c100-16k",
            "16 KiB x 100 conns",
            Load(100, 16 * KIB),
            MUXD_AND_PEERS,
            tags={"size"},
            headline="mib_per_s",
        ),
        Scenario(
            "c100-1k-d16",
            "1 KiB x 100 conns, 16 in flight per conn",
            Load(100, KIB, depth=16),
            MUXD_AND_PEERS,
        ),
        Scenario(
            "idle-0",
            "100 active 1 KiB conns, 0 idle",
            Load(100, KIB, idle=0),
            BACKENDS_SELECT_OK,
            tags={"idle"},
        ),
        Scenario(
            "idle-900",
            "100 active 1 KiB conns + 900 idle",
            Load(100, KIB, idle=900),
            BACKENDS_SELECT_OK,
            tags={"idle"},
        ),
        Scenario(
            "idle-1000",
            "100 active 1 KiB conns + 1000 idle",
            Load(100, KIB, idle=1000),
            BACKENDS_BEYOND_FD_SETSIZE,
            tags={"idle"},
        ),
        Scenario(
            "idle-5000",
            "100 active 1 KiB conns + 5000 idle",
            Load(100, KIB, idle=5000),
            BACKENDS_BEYOND_FD_SETSIZE,
            tags={"idle"},
        ),
        Scenario(
            "memory-10k",
            "RSS growth per connection, 10,000 idle conns",
            Load(0, KIB, idle=10_000),
            ("muxd", "muxd-poll", "c-epoll", "uvloop", "asyncio-protocol", "asyncio-streams"),
            kind=Kind.MEMORY,
            headline="bytes_per_conn",
        ),
        Scenario(
            "churn-c10",
            "connect, 1 KiB echo, close; 10 connectors",
            Load(10, KIB, churn=True),
            CHURN_SERVERS,
            kind=Kind.CHURN,
            tags={"churn"},
        ),
        Scenario(
            "churn-c100",
            "connect, 1 KiB echo, close; 100 connectors",
            Load(100, KIB, churn=True),
            CHURN_SERVERS,
            kind=Kind.CHURN,
            tags={"churn"},
        ),
    ]
}
