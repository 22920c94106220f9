"""Property-based tests (hypothesis).

1. Echo: whatever bytes a client sends, cut into whatever chunks, with its reads
   interleaved with its writes in whatever way, and with other clients doing the
   same at the same time, each client gets exactly its own bytes back, on every
   backend. One daemon per backend serves all the examples of a test function: it
   is started inside the test and the examples run through an inner ``@given``
   function (a function-scoped fixture cannot be shared by examples otherwise).
2. Config: ``parse_config_text`` on arbitrary INI-ish text returns a Config or
   raises ConfigError, nothing else; and on generated *valid* text it returns
   exactly the values written.
"""

from __future__ import annotations

import ipaddress
import math
import random
import select
import socket
import time

from daemon_harness import free_port, server_config
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from muxd.config import SCHEMA, Config, ConfigError, parse_config_text

# --- 1. echo -----------------------------------------------------------------

EXCHANGE_TIMEOUT = 30.0  # per example; an echo that needs longer is a failure

# A payload: small ones hypothesis builds and shrinks byte by byte, or a large
# one of pseudo-random bytes (a size and a seed, still shrinkable).
payloads = st.one_of(
    st.binary(min_size=0, max_size=2048),
    st.tuples(st.one_of(st.integers(60_000, 70_000), st.integers(200_000, 1 << 20),
                        st.integers(4 << 20, 8 << 20)),
              st.integers(0, 1 << 32)).map(
        lambda size_seed: random.Random(size_seed[1]).randbytes(size_seed[0])
    ),
)
# A step of one client's script: send the next N bytes, or read up to N bytes of
# echo (whatever has arrived: possibly nothing), or shut down writing early.
chunk_sizes = st.one_of(st.integers(1, 16), st.integers(1, 70_000), st.just(1 << 20))
steps = st.one_of(
    st.tuples(st.just("send"), chunk_sizes),
    st.tuples(st.just("recv"), chunk_sizes),
)
# The client's receive buffer: loopback's default is megabytes, which would let the
# daemon write every echo whole; a small one makes its writes fall short, so echo
# waits in the daemon's pending buffer and is sent on writability.
receive_buffers = st.sampled_from([0, 2048, 8192, 65536])
client_scripts = st.tuples(payloads, st.lists(steps, max_size=40), st.booleans(),
                           receive_buffers)


class _Client:
    def __init__(self, port: int, payload: bytes, half_close: bool, receive_buffer: int
                 ) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.settimeout(EXCHANGE_TIMEOUT)
        self.sock.connect(("127.0.0.1", port))
        self.sock.setblocking(False)
        self.payload = payload
        self.sent = 0
        self.received = bytearray()
        self.half_close = half_close
        self.eof = False

    def read_some(self, limit: int) -> None:
        try:
            chunk = self.sock.recv(limit)
        except BlockingIOError:
            return
        if not chunk:
            self.eof = True
        start = len(self.received)
        self.received += chunk
        # Fail at the first wrong byte rather than wait for bytes that never come.
        assert chunk == self.payload[start:start + len(chunk)], (
            f"wrong echo at offset {start}: {len(self.received)} bytes received, "
            f"{len(self.payload)} sent in all"
        )

    def send_some(self, size: int, deadline: float) -> None:
        """Send the next ``size`` bytes; whenever the socket is full, read echo
        instead (a client that only writes would rightly be paused by the daemon)."""
        end = min(len(self.payload), self.sent + size)
        while self.sent < end:
            assert time.monotonic() < deadline, "exchange timed out while sending"
            readable, writable, _ = select.select([self.sock], [self.sock], [], 0.1)
            if readable:
                self.read_some(1 << 20)
            if writable:
                try:
                    self.sent += self.sock.send(self.payload[self.sent:end])
                except BlockingIOError:
                    pass

    def finish(self, deadline: float) -> None:
        self.send_some(len(self.payload), deadline)
        if self.half_close:
            self.sock.shutdown(socket.SHUT_WR)
        while len(self.received) < len(self.payload) or (self.half_close and not self.eof):
            assert not self.eof or self.half_close, "the daemon closed the connection"
            if self.eof:
                break
            assert time.monotonic() < deadline, (
                f"exchange timed out: {len(self.received)} of {len(self.payload)} echoed"
            )
            select.select([self.sock], [], [], 0.1)
            self.read_some(1 << 20)


def _run_scripts(port: int, scripts: list[tuple[bytes, list[tuple[str, int]], bool, int]],
                 order: list[int]) -> None:
    """Run several clients' scripts at once: ``order`` picks whose step runs next."""
    deadline = time.monotonic() + EXCHANGE_TIMEOUT
    clients = [_Client(port, payload, half_close, receive_buffer)
               for payload, _, half_close, receive_buffer in scripts]
    try:
        cursors = [0] * len(clients)
        for pick in order:
            index = pick % len(clients)
            script = scripts[index][1]
            if cursors[index] >= len(script):
                continue
            action, size = script[cursors[index]]
            cursors[index] += 1
            if action == "send":
                clients[index].send_some(size, deadline)
            else:
                clients[index].read_some(size)
        for client in clients:
            client.finish(deadline)
        for index, client in enumerate(clients):
            assert len(client.received) == len(client.payload), f"client {index}: length"
            assert bytes(client.received) == client.payload, f"client {index}: bytes differ"
    finally:
        for client in clients:
            client.sock.close()


def test_echo_is_exact_for_any_chunking_and_read_interleaving(start_muxd, backend) -> None:
    port = free_port()
    # A small buffer_size so that examples pause and resume reading, too.
    daemon = start_muxd(server_config(port, backend, buffer_size=4096, idle_timeout=0))

    @settings(max_examples=60, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.function_scoped_fixture])
    @given(scripts=st.lists(client_scripts, min_size=1, max_size=3),
           order=st.lists(st.integers(0, 2), max_size=120))
    def exchange(scripts, order) -> None:
        _run_scripts(port, scripts, order)
        assert daemon.process.poll() is None, "the daemon died"

    exchange()
    assert daemon.process.poll() is None


# --- 2. config parser ---------------------------------------------------------

REAL_SECTIONS = sorted({section for section, _ in SCHEMA})
REAL_KEYS = sorted({key for _, key in SCHEMA})
junk_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
line_text = junk_text.map(lambda text: text.replace("\n", " ").replace("\r", " "))

section_names = st.one_of(st.sampled_from(REAL_SECTIONS + ["DEFAULT", "Server", " server"]),
                          line_text)
headers = st.one_of(
    section_names.map(lambda name: f"[{name}]"),
    st.sampled_from(["[", "]", "[]", "[server", "server]", "[[server]]", "  [limits]"]),
)
number_values = st.one_of(
    st.integers(-(1 << 70), 1 << 70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "inf", "-inf", "1e400", "0x10", "1_000", "٣", " 7 ", "", "+5",
                     "0" * 5000, "9" * 5000, "1" * 5000 + ".5"]),
)
address_values = st.one_of(
    st.sampled_from(["127.0.0.1:7", "[::1]:7", "localhost:7007", "[::]:7, 0.0.0.0:7",
                     "[fe80::1%eth0]:7", "::1:7", "[::1]", ":7", "[:7", "127.0.0.1:",
                     "127.0.0.1:7,127.0.0.1:7", ",", "[::]:0", "1.2.3.4:65536"]),
    st.lists(st.tuples(st.sampled_from(["127.0.0.1", "[::1]", "0.0.0.0", "[::]", "localhost",
                                        "[zz]", "300.1.1.1", ""]),
                       st.integers(-1, 70000)), min_size=1, max_size=4)
    .map(lambda items: ", ".join(f"{host}:{port}" for host, port in items)),
)
values = st.one_of(number_values, address_values, line_text,
                   st.sampled_from(["auto", "epoll", "poll", "select", "kqueue", "yes", "no",
                                    "ON", "debug", "WARNING", "%(x)s", "${server:listen}"]))
key_names = st.one_of(st.sampled_from(REAL_KEYS + ["LISTEN", "max_conections", "level "]),
                      line_text)
assignments = st.tuples(key_names, st.sampled_from(["=", ":", " = ", " : ", "==", ""]),
                        values, st.sampled_from(["", " ; comment", " # c", "\t"])).map(
    lambda parts: f"{parts[0]}{parts[1]}{parts[2]}{parts[3]}"
)
junk_lines = st.one_of(
    line_text,
    st.sampled_from(["", " ", "; comment", "# comment", "  continued value", "\tindented",
                     "=", ":", "key", "[", "\x00", "\ufeff[server]", "%", "\\"]),
)
ini_lines = st.lists(st.one_of(headers, assignments, junk_lines), max_size=25)


@settings(max_examples=3000, deadline=None, database=None)
@given(lines=ini_lines, ending=st.sampled_from(["\n", "\r\n", "\r"]))
def test_config_parser_raises_only_config_error(lines: list[str], ending: str) -> None:
    text = ending.join(lines)
    try:
        config = parse_config_text(text, "fuzz.ini")
    except ConfigError as err:
        assert str(err).startswith("fuzz.ini"), "an error must name the file"
        return
    assert isinstance(config, Config)


# Valid values, with the value each must parse to.
valid_values = {
    ("server", "listen"): st.sampled_from([
        ("127.0.0.1:7007", (("127.0.0.1", 7007),)),
        ("[::1]:7, 127.0.0.1:8", (("::1", 7), ("127.0.0.1", 8))),
        ("localhost:65535", (("127.0.0.1", 65535),)),
    ]),
    ("server", "backend"): st.sampled_from([("auto", "auto"), ("POLL", "poll"),
                                            ("select", "select")]),
    ("server", "backlog"): st.integers(1, 65535).map(lambda n: (f" {n} ", n)),
    ("limits", "nofile"): st.integers(64, 1 << 20).map(lambda n: (str(n), n)),
    ("limits", "max_connections"): st.integers(1, 1 << 20).map(lambda n: (str(n), n)),
    ("limits", "idle_timeout"): st.floats(0, 86400 * 365).map(lambda x: (repr(x), x)),
    ("limits", "buffer_size"): st.integers(1024, 1 << 30).map(lambda n: (str(n), n)),
    ("limits", "shutdown_timeout"): st.floats(0, 3600).map(lambda x: (repr(x), x)),
    ("logging", "level"): st.sampled_from([("Debug", "debug"), ("error", "error")]),
    ("logging", "connections"): st.sampled_from([("yes", True), ("off", False), ("1", True)]),
    ("server", "udp"): st.sampled_from([
        ("", ()), ("[::]:7", (("::", 7),)),
        ("127.0.0.1:7, [::1]:7", (("127.0.0.1", 7), ("::1", 7))),
    ]),
    ("server", "workers"): st.integers(1, 1024).map(lambda n: (str(n), n)),
    # proxy_protocol = yes needs proxy_from, which may not be drawn: see
    # tests/test_proxy_protocol_daemon.py for yes.
    ("server", "proxy_protocol"): st.sampled_from([("no", False), ("off", False)]),
    ("server", "proxy_from"): st.sampled_from([
        ("", ()), ("192.0.2.0/24, ::1", (ipaddress.ip_network("192.0.2.0/24"),
                                         ipaddress.ip_network("::1/128"))),
    ]),
    ("server", "handover"): st.sampled_from([("yes", True), ("Off", False)]),
    ("limits", "max_connections_per_ip"): st.integers(0, 1 << 20).map(lambda n: (str(n), n)),
    ("limits", "ipv6_prefix"): st.integers(1, 128).map(lambda n: (str(n), n)),
    ("limits", "udp_rate"): st.floats(0, 1_000_000).map(lambda x: (repr(x), x)),
    ("limits", "udp_total_rate"): st.floats(0, 1_000_000).map(lambda x: (repr(x), x)),
    ("access", "allow"): st.sampled_from([
        ("", ()), ("10.0.0.0/8", (ipaddress.ip_network("10.0.0.0/8"),)),
        ("::1, 192.0.2.7", (ipaddress.ip_network("::1/128"), ipaddress.ip_network("192.0.2.7/32"))),
    ]),
    ("access", "deny"): st.sampled_from([
        ("", ()), ("2001:db8::/32", (ipaddress.ip_network("2001:db8::/32"),)),
    ]),
    ("metrics", "allow"): st.sampled_from([
        ("", ()), ("127.0.0.0/8, ::1", (ipaddress.ip_network("127.0.0.0/8"),
                                        ipaddress.ip_network("::1/128"))),
    ]),
    ("metrics", "listen"): st.sampled_from([
        ("", ()), ("127.0.0.1:9707", (("127.0.0.1", 9707),)),
        ("[::1]:9707, localhost:9708", (("::1", 9707), ("127.0.0.1", 9708))),
    ]),
}


@st.composite
def valid_configs(draw: st.DrawFn) -> tuple[str, dict[str, object]]:
    chosen = draw(st.lists(st.sampled_from(sorted(SCHEMA)), unique=True))
    expected: dict[str, object] = {}
    by_section: dict[str, list[str]] = {}
    for section, key in chosen:
        text, value = draw(valid_values[(section, key)])
        field = SCHEMA[(section, key)][0]
        expected[field] = value
        by_section.setdefault(section, []).append(
            f"{key}{draw(st.sampled_from(['=', ' = ', ':']))}{text}"
            f"{draw(st.sampled_from(['', '  ; why', ' # note']))}"
        )
    lines = []
    for section, entries in by_section.items():
        lines += [draw(st.sampled_from(["", "; a comment"])), f"[{section}]", *entries]
    return "\n".join(lines) + "\n", expected


@settings(max_examples=500, deadline=None, database=None)
@given(valid_configs())
def test_config_parser_returns_exactly_what_a_valid_file_says(generated) -> None:
    text, expected = generated
    config = parse_config_text(text, "valid.ini")
    for field, value in expected.items():
        actual = getattr(config, field)
        if field in ("listen", "udp", "metrics_listen"):
            actual = tuple((address.host, address.port) for address in actual)
        if isinstance(value, float):
            assume(not math.isnan(value))
            assert actual == value or math.isclose(actual, value), (field, actual, value)
        else:
            assert actual == value, (field, actual, value)
    for field in Config.__dataclass_fields__:
        if field not in expected and field != "source":
            assert getattr(config, field) == getattr(Config(), field), f"{field} not default"
