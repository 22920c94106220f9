"""[access] allow/deny lists and max_connections_per_ip, IPv4 and IPv6."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest
from daemon_harness import free_port, server_config, wait_until

# Run inside a network namespace: connect from each source address in turn,
# keep every connection open, and report whether each one echoes.
CLIENT_SCRIPT = r"""
import json, socket, sys
port, sources = int(sys.argv[1]), sys.argv[2:]
held, results = [], []
for source in sources:
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.bind((source, 0))
    sock.connect(("::1" if family == socket.AF_INET6 else "127.0.0.1", port))
    try:
        sock.sendall(b"?")
        results.append("echo" if sock.recv(1) == b"?" else "closed")
    except OSError:
        results.append("closed")
    held.append(sock)
print(json.dumps(results))
"""


def attempt(port: int, source: str) -> str:
    """Connect from ``source``: "echo" if served, "closed" if refused."""
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.bind((source, 0))
    sock.connect(("::1" if family == socket.AF_INET6 else "127.0.0.1", port))
    try:
        sock.sendall(b"?")
        answer = sock.recv(1)
    except ConnectionResetError:
        answer = b""
    finally:
        sock.close()
    return "echo" if answer == b"?" else "closed"


def access_config(port: int, listen: str | None = None, **sections: str) -> str:
    text = server_config(port).replace(f"127.0.0.1:{port}", listen or f"127.0.0.1:{port}")
    limits = {k: v for k, v in sections.items() if k not in ("allow", "deny")}
    access = {k: v for k, v in sections.items() if k in ("allow", "deny")}
    text += "".join(f"{key} = {value}\n" for key, value in limits.items())  # [limits] is last
    return text + "[access]\n" + "".join(f"{key} = {value}\n" for key, value in access.items())


def test_deny_refuses_without_reading_and_others_are_served(start_muxd) -> None:
    port = free_port()
    daemon = start_muxd(access_config(port, deny="127.0.0.1"))
    assert attempt(port, "127.0.0.1") == "closed"
    assert attempt(port, "127.0.0.2") == "echo"
    daemon.wait_log("refused a connection: 127.0.0.1 is not allowed by [access]")
    daemon.signal(signal.SIGUSR1)
    daemon.wait_log("access 1;")


def test_allow_list_admits_only_its_members_and_deny_wins(start_muxd) -> None:
    port = free_port()
    start_muxd(access_config(port, allow="127.0.0.0/29", deny="127.0.0.3"))
    assert [attempt(port, f"127.0.0.{n}") for n in (1, 2, 3, 9)] == \
        ["echo", "echo", "closed", "closed"]


def test_ipv4_clients_of_a_dual_stack_socket_match_ipv4_rules(start_muxd) -> None:
    port = free_port()
    start_muxd(access_config(port, listen=f"[::]:{port}", deny="127.0.0.0/8"))
    assert attempt(port, "127.0.0.1") == "closed"  # arrives as ::ffff:127.0.0.1
    assert attempt(port, "::1") == "echo"


def test_access_lists_reload_on_sighup(start_muxd) -> None:
    port = free_port()
    daemon = start_muxd(access_config(port))
    assert attempt(port, "127.0.0.5") == "echo"
    daemon.write_config(access_config(port, deny="127.0.0.5"))
    daemon.signal(signal.SIGHUP)
    daemon.notify.wait_for("READY", "1")
    assert attempt(port, "127.0.0.5") == "closed"
    assert attempt(port, "127.0.0.6") == "echo"


def test_max_connections_per_ip_counts_each_ipv4_client(start_muxd) -> None:
    port = free_port()
    daemon = start_muxd(access_config(port, max_connections_per_ip="2"))
    held = [_held_connection(port, "127.0.0.1") for _ in range(2)]
    assert attempt(port, "127.0.0.1") == "closed"
    assert attempt(port, "127.0.0.2") == "echo"
    daemon.wait_log("[limits] max_connections_per_ip (2) reached for 127.0.0.1")
    held.pop().close()  # a freed slot is counted back
    wait_until(lambda: attempt(port, "127.0.0.1") == "echo", what="the freed slot")
    for sock in held:
        sock.close()


def _held_connection(port: int, source: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"!")
    assert sock.recv(1) == b"!"
    return sock


@pytest.fixture
def netns() -> Iterator[str]:
    """A network namespace of our own with IPv6 addresses in two /64s on lo."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("needs root and iproute2 to create a network namespace")
    name = f"muxd-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        commands = [["link", "set", "lo", "up"]] + [
            ["addr", "add", f"{address}/64", "dev", "lo", "nodad"]
            for address in ("2001:db8:0:1::1", "2001:db8:0:1::2", "2001:db8:0:2::1")
        ]
        for command in commands:
            subprocess.run(["ip", "-n", name, *command], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True)


def test_ipv6_clients_are_grouped_by_prefix(start_muxd, tmp_path, netns) -> None:
    port = 7007
    config = tmp_path / "v6.ini"
    config.write_text(access_config(port, listen=f"[::]:{port}", max_connections_per_ip="2"))
    start_muxd(None, command=["ip", "netns", "exec", netns, sys.executable, "-m", "muxd",
                              "--config", str(config)])
    sources = ["2001:db8:0:1::1", "2001:db8:0:1::1", "2001:db8:0:1::2", "2001:db8:0:2::1",
               "::1", "127.0.0.1"]
    result = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c", CLIENT_SCRIPT, str(port), *sources],
        capture_output=True, text=True, timeout=30, check=True,
    )
    # The third comes from another address of the same /64: one client, refused.
    assert json.loads(result.stdout) == ["echo", "echo", "closed", "echo", "echo", "echo"]


def test_per_ip_limit_switched_on_by_reload_counts_clients_already_here(start_muxd) -> None:
    port = free_port()
    daemon = start_muxd(access_config(port))
    held = [_held_connection(port, "127.0.0.1") for _ in range(2)]
    daemon.write_config(access_config(port, max_connections_per_ip="2"))
    daemon.signal(signal.SIGHUP)
    daemon.notify.wait_for("READY", "1")
    assert attempt(port, "127.0.0.1") == "closed"
    assert attempt(port, "127.0.0.2") == "echo"
    for sock in held:
        sock.close()


def test_ipv4_mapped_rules_mean_the_ipv4_addresses(start_muxd) -> None:
    # muxd logs dual-stack peers as ::ffff:a.b.c.d; a rule pasted from such a
    # line must match that client (it used to be accepted and never match).
    port = free_port()
    start_muxd(access_config(port, deny="::ffff:127.0.0.1"))
    assert attempt(port, "127.0.0.1") == "closed"
    assert attempt(port, "127.0.0.2") == "echo"
    other = free_port()
    start_muxd(access_config(other, allow="::ffff:0:0/96", deny="::ffff:127.0.0.4/127"))
    assert [attempt(other, f"127.0.0.{n}") for n in (1, 4, 5, 6)] == \
        ["echo", "closed", "closed", "echo"]


def test_access_policy_matches_like_the_networks_it_holds() -> None:
    # The prefix-table lookup must agree with ipaddress's own membership test.
    import ipaddress
    import random

    from muxd.access import AccessPolicy

    rng = random.Random(9)
    networks = [ipaddress.ip_network(text, strict=False) for text in (
        "10.0.0.0/8", "192.0.2.7", "198.51.100.0/25", "0.0.0.0/0", "::1", "2001:db8::/32",
        "2001:db8:1::/48", "fe80::/10", "::/0")]
    for _ in range(300):
        allow = rng.sample(networks, rng.randint(0, 3))
        deny = rng.sample(networks, rng.randint(0, 3))
        policy = AccessPolicy(allow, deny)
        for address in (ipaddress.ip_address(a) for a in (
                "10.1.2.3", "11.0.0.1", "192.0.2.7", "192.0.2.8", "198.51.100.127",
                "198.51.100.128", "::1", "::2", "2001:db8:1::5", "2001:db9::1", "fe80::1")):
            expected = not any(address in n for n in deny) and (
                not allow or any(address in n for n in allow))
            assert policy.permits(address) == expected, (allow, deny, address)



def test_a_long_deny_list_is_logged_at_start_as_its_first_rules_and_a_count(start_muxd) -> None:
    """A deny list of thousands of rules (a blocklist pasted in) must not make a log line
    of hundreds of KB at start: the line names the first rules and how many more."""
    port = free_port()
    rules = ", ".join(f"198.51.{n >> 8}.{n & 255}" for n in range(5000))
    daemon = start_muxd(access_config(port, deny=rules))
    daemon.wait_log("access: allow everyone; deny 198.51.0.0/32, ")
    line = next(line for line in daemon.log.splitlines() if "access: allow" in line)
    assert line.endswith("and 4992 more"), line
    assert len(line) < 400, f"{len(line)} characters"
    assert attempt(port, "127.0.0.1") == "echo"
