"""The PROXY protocol header parser (muxd/proxy_protocol.py) on its own, no daemon.

1. Properties (hypothesis): arbitrary bytes, fed in arbitrary pieces, never make
   the reader raise or keep more than 107 bytes; any valid header (v1 TCP4, TCP6
   or UNKNOWN; v2 PROXY or LOCAL over any family, with random TLVs) followed by
   any payload, cut into any pieces, gives exactly the header's client address
   and length, and exactly the payload after it; and so does a reader resumed
   from another's progress (what a hand-over carries of a waiting connection).
2. Examples: each malformed header the specification rules out is refused with
   a reason that names what was wrong, whether it arrives whole or byte by byte.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from muxd.proxy_protocol import (
    V1_MAX_LENGTH,
    V2_SIGNATURE,
    Header,
    HeaderReader,
    Malformed,
)

IPV4 = st.integers(0, (1 << 32) - 1).map(ipaddress.IPv4Address)
IPV6 = st.integers(0, (1 << 128) - 1).map(ipaddress.IPv6Address)
PORTS = st.integers(0, 65535)


def unmapped(address):
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@st.composite
def v1_headers(draw: st.DrawFn) -> tuple[bytes, object]:
    """A valid v1 line and the client it names (None for UNKNOWN)."""
    kind = draw(st.sampled_from(["TCP4", "TCP6", "UNKNOWN"]))
    if kind == "UNKNOWN":
        # Anything may follow UNKNOWN before the CRLF (the receiver ignores it).
        tail = draw(st.binary(max_size=V1_MAX_LENGTH - 15).filter(
            lambda b: b"\r" not in b and b"\n" not in b))
        return b"PROXY UNKNOWN" + (b" " + tail[:-1] if tail else b"") + b"\r\n", None
    addresses = IPV4 if kind == "TCP4" else IPV6
    source, destination = draw(addresses), draw(addresses)
    source_port, destination_port = draw(PORTS), draw(PORTS)

    def text(address) -> str:
        # Both compressed and exploded IPv6 forms are valid hex-colon notation.
        return address.exploded if draw(st.booleans()) and kind == "TCP6" else str(address)

    line = f"PROXY {kind} {text(source)} {text(destination)} {source_port} {destination_port}\r\n"
    return line.encode(), (unmapped(source), source_port)


tlvs = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=300)), max_size=8).map(
    lambda items: b"".join(bytes([kind]) + struct.pack(">H", len(value)) + value
                           for kind, value in items))


@st.composite
def v2_headers(draw: st.DrawFn) -> tuple[bytes, object]:
    """A valid v2 header and the client it names (None where it carries none)."""
    command = draw(st.sampled_from([0x0, 0x1]))  # LOCAL, PROXY
    family = draw(st.integers(0, 3))
    transport = draw(st.integers(0, 2))
    client = None
    if (family, transport) == (1, 1):
        source, destination = draw(IPV4), draw(IPV4)
        ports = draw(PORTS), draw(PORTS)
        block = source.packed + destination.packed + struct.pack(">HH", *ports)
        client = (source, ports[0])
    elif (family, transport) == (2, 1):
        source, destination = draw(IPV6), draw(IPV6)
        ports = draw(PORTS), draw(PORTS)
        block = source.packed + destination.packed + struct.pack(">HH", *ports)
        client = (unmapped(source), ports[0])
    else:
        # UNSPEC, UNIX or DGRAM: whatever address bytes, which are skipped.
        block = draw(st.binary(max_size=216))
    if command == 0x0:
        client = None  # LOCAL: the connection is the balancer's own
        if draw(st.booleans()):
            block = b""  # what senders usually do for LOCAL
    rest = block + draw(tlvs)
    header = V2_SIGNATURE + bytes([0x20 | command, family << 4 | transport]) \
        + struct.pack(">H", len(rest)) + rest
    return header, client


def cut(data: bytes, points: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets (any order, duplicates allowed)."""
    edges = [0, *sorted({p % (len(data) + 1) for p in points}), len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:], strict=False) if b > a]


def read_header(pieces: list[bytes], reader: HeaderReader | None = None
                ) -> tuple[Header | Malformed | None, bytes, HeaderReader]:
    """Feed pieces until the reader answers; return its answer and the bytes after
    the header (the rest of that piece and every later one)."""
    reader = reader or HeaderReader()
    for index, piece in enumerate(pieces):
        result = reader.feed(memoryview(piece))
        assert len(reader._kept) <= V1_MAX_LENGTH, "the reader kept more than 107 bytes"
        if isinstance(result, Header):
            return result, piece[result.payload_start:] + b"".join(pieces[index + 1:]), reader
        if result is not None:
            return result, b"", reader
    return None, b"", reader


@settings(max_examples=1500, deadline=None)
@given(header=st.one_of(v1_headers(), v2_headers()), payload=st.binary(max_size=400),
       points=st.lists(st.integers(0, 1 << 17), max_size=40))
def test_any_valid_header_gives_its_client_and_exactly_the_payload(header, payload, points
                                                                   ) -> None:
    header_bytes, client = header
    result, after, _ = read_header(cut(header_bytes + payload, points))
    assert isinstance(result, Header), result
    assert result.client == client
    assert result.length == len(header_bytes)
    assert result.version == (1 if header_bytes.startswith(b"PROXY") else 2)
    assert after == payload


@settings(max_examples=300, deadline=None)
@given(header=st.one_of(v1_headers(), v2_headers()), payload=st.binary(min_size=1,
                                                                       max_size=50))
def test_a_header_fed_byte_by_byte_completes_on_its_last_byte(header, payload) -> None:
    header_bytes, client = header
    reader = HeaderReader()
    data = header_bytes + payload
    for offset in range(len(data)):
        result = reader.feed(data[offset:offset + 1])
        if result is not None:
            break
    assert isinstance(result, Header) and result.client == client
    assert offset == len(header_bytes) - 1 and result.payload_start == 1


@settings(max_examples=500, deadline=None)
@given(header=st.one_of(v1_headers(), v2_headers()), payload=st.binary(max_size=50),
       points=st.lists(st.integers(0, 1 << 17), max_size=10), stop=st.integers(0, 1 << 17))
def test_a_reader_resumed_from_its_progress_reads_on_as_the_first_would(
        header, payload, points, stop) -> None:
    """A hand-over carries a waiting connection's header as far as it has come
    (``progress``); the next process's reader (``resume``) must give the same
    header and the same payload as one reader fed everything."""
    header_bytes, client = header
    stop %= len(header_bytes)  # cut anywhere before the header's last byte
    first = HeaderReader()
    for piece in cut(header_bytes[:stop], points):
        assert first.feed(piece) is None
    kept, taken = first.progress()
    assert taken == stop and len(kept) <= V1_MAX_LENGTH
    result, after, _ = read_header([header_bytes[stop:] + payload],
                                   HeaderReader.resume(kept, taken))
    assert isinstance(result, Header), result
    assert (result.client, result.length, after) == (client, len(header_bytes), payload)


@pytest.mark.parametrize(("kept", "taken"), [
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", 32),  # complete: not a waiting header
    (b"GET / HTTP/1.1", 14),  # not a header at all
    (b"PROXY ", 7),  # a v1 line passes nothing over
    (b"PROXY ", 3),  # took fewer bytes than it kept
    (V2_SIGNATURE + b"\x21\x11\x00\x10" + b"\0" * 12, 28 + 4),  # passed over all 4 left
    (b"P" * 108, 108),  # longer than any header keeps
])
def test_a_damaged_progress_is_refused(kept: bytes, taken: int) -> None:
    with pytest.raises(ValueError):
        HeaderReader.resume(kept, taken)


arbitrary_starts = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=300).map(lambda b: b"PROXY " + b),
    st.binary(max_size=300).map(lambda b: b"PROXY TCP4 " + b),
    st.binary(max_size=300).map(lambda b: V2_SIGNATURE + b),
    st.binary(max_size=300).map(lambda b: V2_SIGNATURE + b"\x21" + b),
)


@settings(max_examples=3000, deadline=None)
@given(data=arbitrary_starts, points=st.lists(st.integers(0, 1 << 10), max_size=30))
def test_arbitrary_bytes_never_crash_the_reader(data, points) -> None:
    result, after, reader = read_header(cut(data, points))
    assert result is None or isinstance(result, Header | Malformed)
    if isinstance(result, Malformed):
        assert result.reason
    if isinstance(result, Header):
        assert result.length + len(after) == len(data)
    if result is not None:
        with pytest.raises(RuntimeError):
            reader.feed(b"more")


def v2(command_byte: int, family_byte: int, body: bytes, length: int | None = None) -> bytes:
    return V2_SIGNATURE + bytes([command_byte, family_byte]) \
        + struct.pack(">H", len(body) if length is None else length) + body


MALFORMED = {
    "not a header at all": (b"hello, echo\r\n", "not a PROXY protocol header"),
    "v1 without the space": (b"PROXYTCP4 1.2.3.4 5.6.7.8 1 2\r\n", "not a PROXY"),
    "v1 no CRLF within 107 bytes": (b"PROXY UNKNOWN " + b"x" * 93 + b"\r\n",
                                    "no CRLF within 107"),
    "v1 LF without CR": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "LF without CR"),
    "v1 CR without LF": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX\r\n", "CR not followed by LF"),
    "v1 bad family": (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "unknown protocol"),
    "v1 UDP4": (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "unknown protocol"),
    "v1 bad IPv4": (b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", "not a valid TCP4 address"),
    "v1 leading zero": (b"PROXY TCP4 1.2.3.04 5.6.7.8 1 2\r\n", "not a valid TCP4 address"),
    "v1 IPv6 as TCP4": (b"PROXY TCP4 ::1 ::1 1 2\r\n", "not a valid TCP4 address"),
    "v1 IPv4 as TCP6": (b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n", "not a valid TCP6 address"),
    "v1 IPv6 scope": (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "not a valid TCP6 address"),
    "v1 bad IPv6": (b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n", "not a valid TCP6 address"),
    "v1 port out of range": (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 7\r\n", "port"),
    "v1 negative port": (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 7\r\n", "port"),
    "v1 port leading zero": (b"PROXY TCP4 1.2.3.4 5.6.7.8 07 7\r\n", "port"),
    "v1 two spaces": (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 7\r\n", "expected"),
    "v1 missing port": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "expected"),
    "v1 nothing after PROXY": (b"PROXY \r\n", "expected"),
    "v2 wrong signature": (b"\r\n\r\n\x00\r\nQUIT\r" + b"\x21\x11\x00\x0c" + bytes(12),
                           "wrong signature"),
    "v2 version 1": (v2(0x11, 0x11, bytes(12)), "version 1"),
    "v2 version 3": (v2(0x31, 0x11, bytes(12)), "version 3"),
    "v2 unknown command": (v2(0x22, 0x11, bytes(12)), "unknown command"),
    "v2 unknown family": (v2(0x21, 0x41, bytes(12)), "unknown address family"),
    "v2 unknown transport": (v2(0x21, 0x13, bytes(12)), "transport"),
    "v2 truncated IPv4 block": (v2(0x21, 0x11, bytes(11)), "truncated address block"),
    "v2 truncated IPv6 block": (v2(0x21, 0x21, bytes(12)), "truncated address block"),
}


@pytest.mark.parametrize("whole", [True, False], ids=["whole", "byte-by-byte"])
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_headers_are_refused_with_a_reason(case: str, whole: bool) -> None:
    data, reason = MALFORMED[case]
    pieces = [data] if whole else [data[i:i + 1] for i in range(len(data))]
    result, _, _ = read_header(pieces)
    assert isinstance(result, Malformed), f"{case}: {result}"
    assert reason in result.reason, f"{case}: {result.reason}"


def test_a_v2_length_beyond_what_arrived_waits_and_never_keeps_the_tlvs() -> None:
    # The announced 65535 bytes never come: the reader keeps waiting (the daemon's
    # time bound ends it) and holds only the 16 + 12 bytes it parses.
    reader = HeaderReader()
    header = v2(0x21, 0x11, bytes(12), length=0xFFFF)
    assert reader.feed(header + bytes(60000)) is None
    assert len(reader._kept) == 28
    result = reader.feed(bytes(0xFFFF - 12 - 60000) + b"echo me")
    assert isinstance(result, Header) and result.length == 16 + 0xFFFF
    assert result.payload_start == 0xFFFF - 12 - 60000


def test_a_v1_line_of_exactly_107_bytes_is_accepted() -> None:
    longest = (b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
               b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n")
    assert len(longest) == V1_MAX_LENGTH
    result = HeaderReader().feed(longest + b"x")
    assert result == Header(None, V1_MAX_LENGTH, V1_MAX_LENGTH, 1)
    assert isinstance(HeaderReader().feed(longest[:-2] + b"x\r\n"), Malformed)


def test_ipv4_mapped_clients_come_back_as_ipv4() -> None:
    mapped = ipaddress.IPv6Address("::ffff:192.0.2.9")
    line = HeaderReader().feed(b"PROXY TCP6 ::ffff:192.0.2.9 ::1 40000 7\r\n")
    binary = HeaderReader().feed(v2(0x21, 0x21, mapped.packed + bytes(16) + b"\x9c\x40\0\7"))
    for result in (line, binary):
        assert isinstance(result, Header)
        assert result.client == (ipaddress.IPv4Address("192.0.2.9"), 40000)
