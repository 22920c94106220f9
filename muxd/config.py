"""Configuration: the INI schema, its defaults, and strict validation.

Every error names the file, section, key, the offending value and what was
expected, because the operator reading it is usually looking at
``journalctl`` and not at our source.
"""

from __future__ import annotations

import configparser
import ipaddress
import os
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

EX_CONFIG = 78  # sysexits.h: "configuration error"; RestartPreventExitStatus keys on it
DEFAULT_CONFIG_PATH = "/etc/muxd/muxd.ini"
BUILTIN_SOURCE = "<built-in defaults>"


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
            where += f": [{self.section}]"
            if self.key is not None:
                where += f" {self.key}"
                if self.value is not None:
                    where += f" = {self.value!r}"
        return f"{where}: {self.message}"


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
    addresses: list[Address] = []
    for item in items:
        host, sep, port_text = item.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{expected}; {item!r} has no HOST:PORT form")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError(f"{expected}; {host!r} is not an IPv6 literal") from None
        elif host == "localhost":
            host = "127.0.0.1"
        else:
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                hint = " (put IPv6 literals in brackets)" if ":" in host else ""
                raise ValueError(f"{expected}; {host!r} is not an IPv4 literal{hint}") from None
        port = _parse_int(port_text, 1, 65535, f"{expected}; the port must be 1 to 65535")
        address = Address(str(ipaddress.ip_address(host)), port)
        _check_overlap(address, addresses)
        addresses.append(address)
    return tuple(addresses)


def parse_optional_addresses(text: str) -> tuple[Address, ...]:
    return parse_addresses(text) if text.strip() else ()


def parse_networks(text: str) -> tuple[IPNetwork, ...]:
    networks = []
    for item in filter(None, (item.strip() for item in text.split(","))):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(
                "a comma-separated list of IPv4 or IPv6 addresses or CIDR blocks "
                f"(for example 10.0.0.0/8, 2001:db8::/32); {item!r} is neither"
            ) from None
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


def _parse_int(text: str, low: int, high: int, expected: str) -> int:
    try:
        value = int(text.strip(), 10)
    except ValueError:
        raise ValueError(expected) from None
    if not low <= value <= high:
        raise ValueError(expected)
    return value


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        return _parse_int(text, low, high, f"a whole number from {low} to {high}")

    return parse


def _rate(text: str) -> float:
    expected = "a number of datagrams per second from 0 to 1000000 (0 = no limit)"
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError(expected) from None
    if not 0 <= value <= 1_000_000:
        raise ValueError(expected)
    return value


def _seconds(high: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        expected = f"a number of seconds from 0 to {high:g} (0 = never)"
        try:
            value = float(text.strip())
        except ValueError:
            raise ValueError(expected) from None
        if not 0 <= value <= high:  # also rejects nan
            raise ValueError(expected)
        return value

    return parse


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
            source, f"line {err.lineno}: expected a [section] header before {err.line.strip()!r}"
        ) from None
    except configparser.ParsingError as err:
        lines = ", ".join(f"line {lineno}: {line.strip()!r}" for lineno, line in err.errors)
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
    return Config(**values)


def load_config(path: str | None) -> Config:
    """Load ``path``; with None, the default file if it exists, else built-in defaults."""
    if path is None:
        if not os.path.exists(DEFAULT_CONFIG_PATH):
            return Config()
        path = DEFAULT_CONFIG_PATH
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise ConfigError(path, f"cannot read the configuration file: {reason}") from None
    return parse_config_text(text, path)


def changed_fields(old: Config, new: Config) -> list[str]:
    return [f.name for f in fields(Config) if getattr(old, f.name) != getattr(new, f.name)]


