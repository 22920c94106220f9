"""Configuration: reading the file, the INI schema, its defaults, and strict
validation. It changes nothing: it returns a frozen Config or raises
ConfigError.

Every error names the file, section, key, the offending value (cut to a
readable length) and what was expected, because the operator reading it is
usually looking at ``journalctl`` and not at our source. The daemon's reload
calls ``load_config`` too, so reading is bounded in time and memory whatever
the path has become (a FIFO, a device, a huge file).
"""

from __future__ import annotations

import ast
import configparser
import ipaddress
import os
import re
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

EX_CONFIG = 78  # sysexits.h: "configuration error"; RestartPreventExitStatus keys on it
DEFAULT_CONFIG_PATH = "/etc/muxd/muxd.ini"
BUILTIN_SOURCE = "<built-in defaults>"
# The documented file is about 6 KB; anything near this cap is not a muxd config
# (a log, a device, a file being written), and reading it must not cost the memory.
MAX_CONFIG_BYTES = 1 << 20
QUOTE_LIMIT = 60  # characters of an offending value quoted in an error line
MAX_ADDRESSES = 64  # in one listen or udp list
# Fields a running daemon cannot change (its sockets and processes are made at
# start): a reload that changes one keeps the running value and says so.
# proxy_protocol is what every listener speaks (README, "Behind a load balancer").
RESTART_ONLY_FIELDS = ("listen", "backend", "backlog", "workers", "udp", "metrics_listen",
                       "proxy_protocol", "handover")



def _unrepr(line: str) -> str:
    """ParsingError.errors holds repr(line) before Python 3.12 and the line itself after:
    undo the repr, so that the error quotes the line once."""
    if sys.version_info < (3, 12):
        try:
            value = ast.literal_eval(line)
        except (ValueError, SyntaxError):
            return line
        return value if isinstance(value, str) else line
    return line

def quoted(text: str, limit: int = QUOTE_LIMIT) -> str:
    """``repr(text)``, cut to ``limit`` characters: an error line must stay one
    readable line even when the value is a pasted megabyte."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


class ConfigError(Exception):
    """A configuration problem, phrased for the operator."""

    def __init__(
        self,
        source: str,
        message: str,
        section: str | None = None,
        key: str | None = None,
        value: str | None = None,
    ) -> None:
        self.source = source
        self.section = section
        self.key = key
        self.value = value
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.source
        if self.section is not None:
            where += f": [{_cut(self.section)}]"
            if self.key is not None:
                where += f" {_cut(self.key)}"
                if self.value is not None:
                    where += f" = {quoted(self.value)}"
        return f"{where}: {self.message}"


def _cut(name: str) -> str:
    return name if len(name) <= QUOTE_LIMIT else f"{name[:QUOTE_LIMIT]}..."


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, order=True)
class Address:
    """A listening address. ``host`` is an IP literal without brackets."""

    host: str
    port: int

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    @property
    def is_wildcard(self) -> bool:
        return self.host in ("0.0.0.0", "::")

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.is_ipv6 else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Config:
    """The daemon's settings. Field defaults are the built-in defaults."""

    listen: tuple[Address, ...] = (Address("127.0.0.1", 7007),)
    backend: str = "auto"
    backlog: int = 1024
    workers: int = 1
    nofile: int = 65536
    max_connections: int = 10000
    idle_timeout: float = 300.0
    buffer_size: int = 65536
    shutdown_timeout: float = 10.0
    log_level: str = "info"
    log_connections: bool = False
    udp: tuple[Address, ...] = ()
    handover: bool = True
    max_connections_per_ip: int = 0
    ipv6_prefix: int = 64
    udp_rate: float = 100.0
    udp_total_rate: float = 10000.0
    allow: tuple[IPNetwork, ...] = ()
    deny: tuple[IPNetwork, ...] = ()
    metrics_listen: tuple[Address, ...] = ()
    metrics_allow: tuple[IPNetwork, ...] = ()
    proxy_protocol: bool = False
    proxy_from: tuple[IPNetwork, ...] = ()
    source: str = BUILTIN_SOURCE


# --- value parsers: each returns the parsed value or raises ValueError(expected) ---


def parse_addresses(text: str) -> tuple[Address, ...]:
    expected = (
        "a comma-separated list of HOST:PORT, where HOST is an IPv4 literal, "
        "an IPv6 literal in brackets, or localhost (for example 127.0.0.1:7007, [::]:7)"
    )
    items = [item.strip() for item in text.split(",")]
    if not any(items):
        raise ValueError(expected)
    if len(items) > MAX_ADDRESSES:
        # Each is a socket in every worker, and the overlap check is quadratic.
        raise ValueError(f"{expected}; at most {MAX_ADDRESSES} addresses ({len(items)} given)")
    addresses: list[Address] = []
    for item in items:
        host, sep, port_text = item.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{expected}; {quoted(item)} has no HOST:PORT form")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError(f"{expected}; {quoted(host)} is not an IPv6 literal") from None
        elif host == "localhost":
            host = "127.0.0.1"
        else:
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                hint = " (put IPv6 literals in brackets)" if ":" in host else ""
                raise ValueError(
                    f"{expected}; {quoted(host)} is not an IPv4 literal{hint}") from None
        port = _parse_int(port_text, 1, 65535, f"{expected}; the port must be 1 to 65535")
        address = Address(str(_unmapped(ipaddress.ip_address(host))), port)
        _check_overlap(address, addresses)
        addresses.append(address)
    return tuple(addresses)


def parse_optional_addresses(text: str) -> tuple[Address, ...]:
    return parse_addresses(text) if text.strip() else ()


_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def _unmapped(address: ipaddress.IPv4Address | ipaddress.IPv6Address
              ) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An IPv4-mapped IPv6 address (``::ffff:a.b.c.d``) as the IPv4 address it is.

    The kernel treats the mapped form as IPv4 (a bind to it is a bind to the
    IPv4 address) and muxd matches clients after unmapping them, so a rule or
    a listener written in the mapped form must mean the IPv4 one."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_networks(text: str) -> tuple[IPNetwork, ...]:
    networks = []
    for item in filter(None, (item.strip() for item in text.split(","))):
        try:
            network = ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(
                "a comma-separated list of IPv4 or IPv6 addresses or CIDR blocks "
                f"(for example 10.0.0.0/8, 2001:db8::/32); {quoted(item)} is neither"
            ) from None
        if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED):
            # Clients are matched as IPv4 (access.client_address), so
            # ::ffff:10.0.0.0/104 is written for them as 10.0.0.0/8.
            mapped = network.network_address.ipv4_mapped
            assert mapped is not None
            network = ipaddress.IPv4Network((mapped, network.prefixlen - 96))
        networks.append(network)
    return tuple(networks)


def _check_overlap(new: Address, existing: list[Address]) -> None:
    # A wildcard listener already owns every address of its family on that port
    # (and [::] is dual-stack, so every IPv4 one too): a second bind would fail at
    # start with EADDRINUSE, so say so now, where the operator is looking.
    for old in existing:
        if old.port != new.port:
            continue
        if old == new:
            raise ValueError(f"each address once; {new} is listed twice")
        for wide, narrow in ((old, new), (new, old)):
            if wide.host == "::" or (wide.host == "0.0.0.0" and not narrow.is_ipv6):
                raise ValueError(
                    f"addresses that do not overlap; {wide} already covers {narrow}"
                    + (" ([::] is dual-stack)" if wide.host == "::" else "")
                )


# Numbers are ASCII decimal digits: int() and float() would also take "1_000",
# "+7", Arabic-Indic or full-width digits, "inf" and "nan", none of which an
# operator means. Seconds and rates may have a fraction and an exponent (as
# Python writes floats), but one that underflows ("1e-400" is 0.0, which means
# "off") is refused rather than taken as 0.
_WHOLE = re.compile(r"[0-9]+", re.ASCII)
_DECIMAL = re.compile(r"(?P<mantissa>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]{1,4})?",
                      re.ASCII)


def _parse_int(text: str, low: int, high: int, expected: str) -> int:
    text = text.strip()
    if not _WHOLE.fullmatch(text):
        raise ValueError(expected)
    value = int(text.lstrip("0") or "0") if len(text) <= 20 else high + 1
    if not low <= value <= high:
        raise ValueError(expected)
    return value


def _parse_decimal(text: str, low: float, high: float, expected: str) -> float:
    text = text.strip()
    match = _DECIMAL.fullmatch(text)
    if not match:
        raise ValueError(f"{expected}, written with the digits 0-9 and an optional '.'")
    value = float(text)
    if value == 0 and match["mantissa"].strip("0.") != "":
        raise ValueError(f"{expected}; {quoted(text)} is too small to tell from 0")
    if not low <= value <= high:
        raise ValueError(expected)
    return value


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        return _parse_int(text, low, high, f"a whole number from {low} to {high}")

    return parse


def _rate(text: str) -> float:
    return _parse_decimal(text, 0, 1_000_000, "a number of datagrams per second "
                          "from 0 to 1000000 (0 = no limit)")


def _seconds(high: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        return _parse_decimal(text, 0, high, f"a number of seconds from 0 to {_plain(high)} "
                              "(0 = never)")

    return parse


def _plain(number: float) -> str:
    """A bound as the operator writes it: 31536000, not 3.1536e+07."""
    return str(int(number)) if number == int(number) else str(number)


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError("one of " + ", ".join(choices))
        return value

    return parse


_BOOLEANS = {"yes": True, "true": True, "on": True, "1": True,
             "no": False, "false": False, "off": False, "0": False}


def _boolean(text: str) -> bool:
    try:
        return _BOOLEANS[text.strip().lower()]
    except KeyError:
        raise ValueError("yes or no") from None


def _workers(text: str) -> int:
    if text.strip().lower() == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else os.cpu_count() or 1
    return _parse_int(text, 1, 1024, "auto (one per CPU) or a whole number from 1 to 1024")


def _backend(text: str) -> str:
    from muxd.pollers import available_backends

    value = _choice("auto", "epoll", "poll", "select")(text)
    available = available_backends()
    if value != "auto" and value not in available:
        raise ValueError(
            f"a backend this platform has: auto, {', '.join(available)} "
            f"({value} is not available here)"
        )
    return value


# (section, key) -> (Config field, parser). The single source of truth for
# which keys exist; config/muxd.ini documents the same table.
SCHEMA: dict[tuple[str, str], tuple[str, Callable[[str], Any]]] = {
    ("server", "listen"): ("listen", parse_addresses),
    ("server", "backend"): ("backend", _backend),
    ("server", "backlog"): ("backlog", _int_in(1, 65535)),
    ("server", "udp"): ("udp", parse_optional_addresses),
    ("server", "workers"): ("workers", _workers),
    ("server", "proxy_protocol"): ("proxy_protocol", _boolean),
    ("server", "proxy_from"): ("proxy_from", parse_networks),
    ("server", "handover"): ("handover", _boolean),
    ("limits", "nofile"): ("nofile", _int_in(64, 1 << 20)),
    ("limits", "max_connections"): ("max_connections", _int_in(1, 1 << 20)),
    ("limits", "idle_timeout"): ("idle_timeout", _seconds(86400 * 365)),
    ("limits", "buffer_size"): ("buffer_size", _int_in(1024, 1 << 30)),
    ("limits", "shutdown_timeout"): ("shutdown_timeout", _seconds(3600)),
    ("limits", "max_connections_per_ip"): ("max_connections_per_ip", _int_in(0, 1 << 20)),
    ("limits", "ipv6_prefix"): ("ipv6_prefix", _int_in(1, 128)),
    ("limits", "udp_rate"): ("udp_rate", _rate),
    ("limits", "udp_total_rate"): ("udp_total_rate", _rate),
    ("access", "allow"): ("allow", parse_networks),
    ("access", "deny"): ("deny", parse_networks),
    ("logging", "level"): ("log_level", _choice("debug", "info", "warning", "error")),
    ("logging", "connections"): ("log_connections", _boolean),
    ("metrics", "listen"): ("metrics_listen", parse_optional_addresses),
    ("metrics", "allow"): ("metrics_allow", parse_networks),
}
SECTIONS = tuple(dict.fromkeys(section for section, _ in SCHEMA))


def parse_config_text(text: str, source: str) -> Config:
    """Parse INI text into a Config; raise ConfigError for anything wrong."""
    parser = configparser.ConfigParser(
        interpolation=None,
        inline_comment_prefixes=(";", "#"),
        default_section="\0no-default-section",  # a [DEFAULT] section is a typo here
        strict=True,
    )
    try:
        parser.read_string(text, source=source)
    except configparser.DuplicateSectionError as err:
        raise ConfigError(
            source, f"section [{err.section}] appears twice (line {err.lineno})"
        ) from None
    except configparser.DuplicateOptionError as err:
        raise ConfigError(
            source, f"key appears twice (line {err.lineno})", err.section, err.option
        ) from None
    except configparser.MissingSectionHeaderError as err:
        raise ConfigError(
            source,
            f"line {err.lineno}: expected a [section] header before {quoted(err.line.strip())}"
        ) from None
    except configparser.ParsingError as err:
        lines = ", ".join(f"line {lineno}: {quoted(_unrepr(line).strip())}"
                          for lineno, line in err.errors[:3])
        if len(err.errors) > 3:
            lines += f" and {len(err.errors) - 3} more"
        raise ConfigError(source, f"expected KEY = VALUE lines; cannot parse {lines}") from None
    except configparser.Error as err:
        raise ConfigError(source, f"cannot parse: {err.message}") from None

    values: dict[str, Any] = {"source": source}
    for section in parser.sections():
        if section not in SECTIONS:
            raise ConfigError(
                source, f"unknown section; expected one of {', '.join(SECTIONS)}", section
            )
        for key, raw in parser.items(section):
            entry = SCHEMA.get((section, key))
            if entry is None:
                known = ", ".join(k for s, k in SCHEMA if s == section)
                raise ConfigError(
                    source, f"unknown key; [{section}] takes {known}", section, key
                )
            name, parse = entry
            try:
                values[name] = parse(raw)
            except ValueError as err:
                raise ConfigError(source, f"expected {err}", section, key, raw) from None
    if values.get("proxy_protocol") and not values.get("proxy_from"):
        # Without it anyone could claim any client address (proxy_protocol.py).
        raise ConfigError(
            source, "expected the addresses or CIDR blocks of the load balancers allowed to "
            "send PROXY protocol headers; it is required when [server] proxy_protocol = yes",
            "server", "proxy_from", parser.get("server", "proxy_from", fallback=None))
    return Config(**values)


def load_config(path: str | None) -> Config:
    """Load ``path``; with None, the default file if it exists, else built-in defaults.

    The daemon's reload calls this too, so whatever ``path`` has become it
    must return or raise ConfigError promptly and within bounded memory."""
    if path is None:
        if not os.path.exists(DEFAULT_CONFIG_PATH):
            return Config()
        path = DEFAULT_CONFIG_PATH
    return parse_config_text(_read_config_file(path), path)


def _read_config_file(path: str) -> str:
    """The text of ``path``, which must be a regular file of at most MAX_CONFIG_BYTES.

    O_NONBLOCK so that opening a FIFO does not wait for a writer; the type is
    checked on the open descriptor (no race with a rename), and the read is
    capped because st_size means nothing for /proc files and growing files."""
    def refuse(reason: str) -> ConfigError:
        return ConfigError(path, f"cannot read the configuration file: {reason}")

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as err:
        raise refuse(err.strerror or str(err)) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise refuse(f"it is {_file_kind(mode)}, not a regular file")
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_CONFIG_BYTES:
            chunk = os.read(fd, MAX_CONFIG_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > MAX_CONFIG_BYTES:
            raise refuse(f"it is larger than {MAX_CONFIG_BYTES} bytes, the most a muxd "
                         "configuration may be")
        return b"".join(chunks).decode("utf-8-sig")  # a BOM is an editor's, not a key's
    except OSError as err:
        raise refuse(err.strerror or str(err)) from None
    except UnicodeDecodeError as err:
        raise refuse(f"it is not UTF-8 text ({err.reason} at byte {err.start})") from None
    finally:
        os.close(fd)


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "a special file"


def changed_fields(old: Config, new: Config) -> list[str]:
    return [f.name for f in fields(Config) if getattr(old, f.name) != getattr(new, f.name)]


def key_name(field_name: str) -> str:
    """A Config field as the operator writes it in the file: ``[section] key``."""
    for (section, key), (name, _) in SCHEMA.items():
        if name == field_name:
            return f"[{section}] {key}"
    return field_name


def describe_changes(applied: list[str], needs_restart: list[str] | None = None) -> str:
    """What a reload did, in the file's words: the keys it applied and those
    that changed but wait for a restart (never "nothing changed" for those)."""
    parts = []
    if applied:
        parts.append(", ".join(map(key_name, applied)) + " changed")
    if needs_restart:
        parts.append(("nothing applied now; " if not applied else "")
                     + ", ".join(map(key_name, needs_restart))
                     + " changed and take" + ("s" if len(needs_restart) == 1 else "")
                     + " effect only after a restart")
    return "; ".join(parts) or "nothing changed"
