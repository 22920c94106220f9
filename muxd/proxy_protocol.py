"""Reading the PROXY protocol header (HAProxy's specification, versions 1 and 2)
that a load balancer puts at the start of a connection to say who the client is.

Pure: no sockets, no clock, no shared state. ``HeaderReader`` is fed the
connection's first bytes in whatever pieces they arrive and answers, after
each piece, one of three things:

* ``None``: not complete yet, feed more;
* ``Header``: complete. ``client`` is the original client's ``(address,
  port)``, or None when the header carries none (a v2 ``LOCAL`` command, which
  is how balancers send health checks; v1 ``UNKNOWN``; v2 families UNSPEC and
  UNIX, and DGRAM transports, which a TCP echo cannot use: the specification
  lets a receiver fall back to "no address" for those). ``payload_start`` is
  where, in the piece that completed it, the bytes after the header begin:
  those are the client's and are echoed;
* ``Malformed``: not a valid header, with a reason for the log; the
  connection must be closed.

Bounds, from the specification: a v1 line is at most 107 bytes including its
CRLF; a v2 header is 16 bytes plus the length it announces (at most 65535).
The reader keeps at most 107 bytes whatever it is fed: v2 bytes past the
address block (TLVs, which muxd has no use for) are counted and passed over,
never stored. A piece is rejected as soon as it cannot start a valid header,
so a client that is not a balancer is refused at its first wrong byte.

IPv4-mapped IPv6 client addresses (``::ffff:a.b.c.d``) come back as IPv4, as
``access.client_address`` does for socket peers, so access lists and
per-client limits see one address per client whichever way it came.
"""

from __future__ import annotations

import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Client = tuple[IPAddress, int]

V1_PREFIX = b"PROXY "
V1_MAX_LENGTH = 107  # "PROXY UNKNOWN <two IPv6> <two ports>\r\n", the longest line
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED_LENGTH = 16  # signature, version and command, family, length
V2_MAX_LENGTH = V2_FIXED_LENGTH + 0xFFFF

_LOCAL, _PROXY = 0, 1
# (family, transport) with an address muxd uses: TCP over IPv4 and IPv6, and
# the size of their address blocks (two addresses, two ports).
_V2_ADDRESS_BLOCKS = {(1, 1): 12, (2, 1): 36}
# IPv6 in a v1 line: hex groups and colons, and a dotted IPv4 tail, which the
# specification does not mention but HAProxy writes for IPv4-mapped addresses
# when the two ends' families differ (inet_ntop's "::ffff:a.b.c.d").
_IPV6_CHARACTERS = frozenset(b"0123456789abcdefABCDEF:.")


class Header:
    """A complete header. Plain slots, not a dataclass: a dataclass compiles
    code when the module is imported, and muxd imports its loop after binding."""

    __slots__ = ("client", "length", "payload_start", "version")

    def __init__(self, client: Client | None, length: int, payload_start: int,
                 version: int) -> None:
        self.client = client
        self.length = length  # bytes of the stream the header took
        self.payload_start = payload_start  # where, in the completing piece, the rest begins
        self.version = version  # 1 or 2, for the log

    def _fields(self) -> tuple[object, ...]:
        return self.client, self.length, self.payload_start, self.version

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Header) and self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return "Header(client={!r}, length={!r}, payload_start={!r}, version={!r})".format(
            *self._fields())


class Malformed:
    """Not a valid header; ``reason`` says why, for the log."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"Malformed({self.reason!r})"


class HeaderReader:
    """One connection's header, fed incrementally (see the module docstring)."""

    __slots__ = ("_kept", "_taken", "_skip", "_client", "_result")

    def __init__(self) -> None:
        self._kept = bytearray()  # the header bytes parsed so far (at most 107)
        self._taken = 0  # bytes of the stream that belonged to the header before this piece
        self._skip = -1  # v2: header bytes still to pass over unread; -1 until known
        self._client: Client | None = None
        self._result: Header | Malformed | None = None

    def progress(self) -> tuple[bytes, int]:
        """How far an unfinished header has come: the bytes kept (at most 107)
        and how many bytes of the stream it has taken (more than those once v2
        TLVs are being passed over). ``resume`` makes a reader from them: what
        a hand-over carries of a connection still waiting for its header."""
        if self._result is not None:
            raise RuntimeError("the header has been read already")
        return bytes(self._kept), self._taken

    @classmethod
    def resume(cls, kept: bytes, taken: int) -> HeaderReader:
        """A reader that goes on where ``progress`` said another one was; ValueError
        if that cannot be an unfinished header (a damaged hand-over state)."""
        reader = cls()
        if len(kept) > V1_MAX_LENGTH or taken < len(kept):
            raise ValueError(f"{len(kept)} header bytes kept, {taken} taken")
        if kept and reader.feed(kept) is not None:
            raise ValueError("the kept bytes are not an unfinished header")
        passed = taken - len(kept)  # v2 TLV bytes the old reader had passed over
        if passed:
            if not 0 < passed < reader._skip:
                raise ValueError(f"{passed} bytes passed over, {reader._skip} to pass")
            reader._skip -= passed
            reader._taken = taken
        return reader

    def feed(self, piece: bytes | bytearray | memoryview) -> Header | Malformed | None:
        if self._result is not None:
            raise RuntimeError("the header has been read already; the rest is payload")
        if not piece:
            return None
        if self._skip >= 0:
            return self._pass_over(piece, 0)
        kept = self._kept
        first = kept[0] if kept else piece[0]
        if first == V1_PREFIX[0]:
            result = self._feed_v1(piece)
        elif first == V2_SIGNATURE[0]:
            result = self._feed_v2(piece)
        else:
            result = Malformed("not a PROXY protocol header "
                               f"(starts with {bytes(piece[:8])!r})")
        if result is not None:
            self._result = result
        return result

    # --- version 1: one line of text ---------------------------------------

    def _feed_v1(self, piece: bytes | bytearray | memoryview) -> Header | Malformed | None:
        kept = self._kept
        window = bytes(piece[:V1_MAX_LENGTH - len(kept)])
        end = window.find(b"\n")
        used = len(window) if end < 0 else end + 1
        kept += window[:used]
        if not V1_PREFIX.startswith(kept[:len(V1_PREFIX)]):
            return Malformed(f"not a PROXY protocol header (starts with {bytes(kept[:8])!r})")
        # A CR may only be the line's last byte but one (or, for now, its last).
        if b"\r" in kept[:-2 if end >= 0 else -1]:
            return Malformed("v1: a CR not followed by LF")
        if end < 0:
            if len(kept) >= V1_MAX_LENGTH:
                return Malformed(f"v1: no CRLF within {V1_MAX_LENGTH} bytes")
            self._taken += used
            return None
        if len(kept) < 2 or kept[-2] != 0x0D:
            return Malformed("v1: a LF without CR ends the line")
        if len(kept) < len(V1_PREFIX) + 2:
            return Malformed("v1: the line ends before its protocol")
        client = _parse_v1_line(bytes(kept[len(V1_PREFIX):-2]))
        if isinstance(client, Malformed):
            return client
        return Header(client, self._taken + used, used, 1)

    # --- version 2: binary --------------------------------------------------

    def _feed_v2(self, piece: bytes | bytearray | memoryview) -> Header | Malformed | None:
        kept = self._kept
        used = 0
        if len(kept) < V2_FIXED_LENGTH:
            used = V2_FIXED_LENGTH - len(kept)
            kept += piece[:used]
            used = min(used, len(piece))
            if not V2_SIGNATURE.startswith(kept[:len(V2_SIGNATURE)]):
                return Malformed("v2: wrong signature")
            if len(kept) > 12 and kept[12] >> 4 != 2:
                return Malformed(f"v2: version {kept[12] >> 4} (only 2 is defined)")
            if len(kept) < V2_FIXED_LENGTH:
                self._taken += used
                return None
        command, family, transport = kept[12] & 0xF, kept[13] >> 4, kept[13] & 0xF
        if command not in (_LOCAL, _PROXY):
            return Malformed(f"v2: unknown command {command}")
        if family > 3 or transport > 2:
            return Malformed(f"v2: unknown address family {family} or transport {transport}")
        announced = int.from_bytes(kept[14:16], "big")
        block = _V2_ADDRESS_BLOCKS.get((family, transport), 0) if command == _PROXY else 0
        if announced < block:
            return Malformed(f"v2: truncated address block (length {announced}, "
                             f"the addresses need {block})")
        missing = V2_FIXED_LENGTH + block - len(kept)
        if missing:
            more = piece[used:used + missing]
            kept += more
            used += len(more)
            if len(more) < missing:
                self._taken += used
                return None
        if block:
            self._client = _v2_client(kept, family)
        self._skip = announced - block
        return self._pass_over(piece, used)

    def _pass_over(self, piece: bytes | bytearray | memoryview, used: int
                   ) -> Header | None:
        taken = min(self._skip, len(piece) - used)
        self._skip -= taken
        used += taken
        self._taken += used
        if self._skip:
            return None
        self._result = Header(self._client, self._taken, used, 2)
        return self._result


def _parse_v1_line(body: bytes) -> Client | None | Malformed:
    """``body``: the line between "PROXY " and CRLF."""
    if body == b"UNKNOWN" or body.startswith(b"UNKNOWN "):
        return None  # the sender could not say; the rest of the line is to be ignored
    fields = body.split(b" ")
    if len(fields) != 5:
        return Malformed(f"v1: expected 'TCP4|TCP6 SOURCE DESTINATION SPORT DPORT' "
                         f"or 'UNKNOWN', got {body[:60]!r}")
    protocol, source, destination, source_port, destination_port = fields
    if protocol not in (b"TCP4", b"TCP6"):
        return Malformed(f"v1: unknown protocol {protocol[:10]!r} (TCP4, TCP6 or UNKNOWN)")
    address = None
    for text in (source, destination):
        parsed = _v1_address(text, protocol == b"TCP6")
        if parsed is None:
            return Malformed(f"v1: {text[:45]!r} is not a valid {protocol.decode()} address")
        address = address or parsed
    ports = [_v1_port(text) for text in (source_port, destination_port)]
    if None in ports:
        return Malformed(f"v1: a port is not a whole number from 0 to 65535 "
                         f"({source_port[:8]!r} {destination_port[:8]!r})")
    assert address is not None and ports[0] is not None
    return _unmapped(address), ports[0]


def _v1_address(text: bytes, ipv6: bool) -> IPAddress | None:
    try:
        if ipv6:
            # No scope id ("%eth0"): it names an interface of the sender.
            if not text or not _IPV6_CHARACTERS.issuperset(text):
                return None
            return ipaddress.IPv6Address(text.decode("ascii"))
        # Python's parser takes exactly four decimal numbers 0-255 and refuses
        # leading zeros, as the specification asks.
        return ipaddress.IPv4Address(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None


def _v1_port(text: bytes) -> int | None:
    if not text or len(text) > 5 or not text.isdigit() or (text[0] == 0x30 and len(text) > 1):
        return None
    port = int(text)
    return port if port <= 65535 else None


def _v2_client(kept: bytearray, family: int) -> Client:
    if family == 1:
        address: IPAddress = ipaddress.IPv4Address(bytes(kept[16:20]))
        port_at = 24
    else:
        address = _unmapped(ipaddress.IPv6Address(bytes(kept[16:32])))
        port_at = 48
    return address, int.from_bytes(kept[port_at:port_at + 2], "big")


def _unmapped(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
