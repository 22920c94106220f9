"""The Debian package as an operator uses it, on a booted bookworm and trixie with no network.

apt installs the .deb offline (the root filesystem carries its Debian dependencies), the
service starts by itself, `man` and `journalctl` work; installing a newer build keeps an
edited conffile and restarts the service, and the new version takes over every connection
(echo muxd held included), in muxd.service's mode and under muxd.socket; remove stops it and
keeps the config; purge removes everything; and it installs again. The tests run in file
order on one container per release, each first putting the package in the state it starts
from.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import DebianPackages
from nspawn import (
    MUXD_CONFIG,
    Container,
    add_drop_in,
    connected,
    echo_roundtrip,
    edit_ini,
    pending_echo,
    pile_budget,
    pile_up,
    receive_exactly,
    wait_until,
)
from test_systemd_socket import socket_only_drop_in

pytestmark = pytest.mark.systemd

APT = ["apt-get", "-y", "-q", "-o", "Dpkg::Use-Pty=0"]


def installed_version(machine: Container) -> str:
    result = machine.run(["dpkg-query", "-W", "-f=${Status} ${Version}", "muxd"], check=False)
    status = result.stdout.split()
    return status[-1] if result.returncode == 0 and status[:3] == [
        "install", "ok", "installed"] else ""


def apt_install(machine: Container, deb: str) -> str:
    # stdin is /dev/null: a conffile question from dpkg would fail the install, not hang it.
    result = machine.run([*APT, "install", deb], env={"DEBIAN_FRONTEND": "noninteractive"},
                         timeout=180)
    return result.stdout + result.stderr


def fresh_install(machine: Container, packages: DebianPackages) -> None:
    if machine.run(["dpkg-query", "-W", "muxd"], check=False).returncode == 0:
        machine.run([*APT, "purge", "muxd"], timeout=120)
    apt_install(machine, packages.inside(packages.version))


def assert_serving(machine: Container, payload: bytes) -> None:
    assert machine.show("muxd.service", "ActiveState") == "active"
    with connected(machine) as sock:
        assert echo_roundtrip(sock, payload) == payload


@dataclass
class Held:
    """Clients connected before an upgrade: some that echoed a line, and one that stopped
    reading so that muxd holds its echo (buffer_size, reading paused)."""

    echoed: list[socket.socket]
    piler: socket.socket
    piled: bytearray


@contextmanager
def held_connections(machine: Container, listeners: int, count: int = 3) -> Iterator[Held]:
    echoed = [machine.connect(7) for _ in range(count)]
    piler = machine.connect(7)
    try:
        for number, sock in enumerate(echoed):
            line = f"held {number}\n".encode()
            assert echo_roundtrip(sock, line) == line
        piler.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        piler.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        piled = bytearray()
        pile_up(piler, random.Random(12), pile_budget(machine), piled)
        # Parked (in the turn that accepted them, before any echo) in the one parking
        # socket the store holds, beside the listener unless the socket unit holds it:
        # never one store entry per connection.
        wait_until(lambda: machine.show("muxd.service", "NFileDescriptorStore")
                   == str(1 + listeners), timeout=10,
                   what="the parking socket (and the listener) in the file descriptor store")
        yield Held(echoed, piler, piled)
    finally:
        for sock in (*echoed, piler):
            sock.close()


def assert_taken_over(machine: Container, held: Held, old_pid: int, old_version: str,
                      version: str, listeners: int) -> None:
    """The new version served the held connections, byte-exact, as the journal says."""
    for number, sock in enumerate(held.echoed):
        line = f"held {number} after the upgrade\n".encode()
        assert echo_roundtrip(sock, line) == line, f"held connection {number} was dropped"
    assert receive_exactly(held.piler, len(held.piled)) == held.piled, "the piled echo"
    assert echo_roundtrip(held.piler, b"and on\n") == b"and on\n"
    this_run = f"_SYSTEMD_INVOCATION_ID={machine.show('muxd', 'InvocationID')}"
    took_over = machine.wait_for_journal(this_run, match=lambda e: "took over" in e["MESSAGE"])
    message = took_over[-1]["MESSAGE"]
    expected = (f"took over {len(held.echoed) + 1} connections and {listeners} listeners "
                f"from PID {old_pid} (muxd {old_version},")
    assert message.startswith(expected), message
    assert pending_echo(message) >= 65536 - 512, message  # the piler's, muxd's buffer_size
    messages = [e["MESSAGE"] for e in machine.journal(this_run)]
    assert f"muxd {version} starting with {MUXD_CONFIG}" in messages, messages


@pytest.fixture
def deb(bare_container: Container) -> Container:
    return bare_container


def test_install_enables_starts_and_documents_muxd(
        deb: Container, debian_packages: DebianPackages) -> None:
    fresh_install(deb, debian_packages)
    assert installed_version(deb) == debian_packages.version
    assert deb.systemctl("is-enabled", "muxd.service").strip() == "enabled"
    # The socket is shipped but not enabled: muxd.service owns port 7 by default.
    assert deb.systemctl("is-enabled", "muxd.socket", check=False).strip() == "disabled"
    assert deb.show("muxd.socket", "ActiveState") == "inactive"
    assert_serving(deb, b"hello from the package\n")
    assert deb.run(["muxd", "--version"]).stdout.strip() == f"muxd {debian_packages.version}"
    assert deb.run(["sh", "-c", "command -v muxd"]).stdout.strip() == "/usr/sbin/muxd"

    # README: what apt pulls in, and where the units are (the build host's debhelper decides:
    # /lib/systemd/system on Debian 12, /usr/lib/systemd/system on 13).
    depends = deb.run(["dpkg-query", "-W", "-f=${Depends}", "muxd"]).stdout
    assert {d.strip() for d in depends.split(",")} == {
        "python3-daemon", "python3-h11", "python3-sdnotify", "python3:any"}, depends
    for pulled in ("python3-daemon", "python3-h11", "python3-sdnotify", "python3-lockfile"):
        assert deb.run(["dpkg-query", "-W", "-f=${Status}", pulled]).stdout == \
            "install ok installed", pulled
    built_on = Path("/etc/debian_version").read_text().split(".")[0]
    units = "/lib/systemd/system" if built_on == "12" else "/usr/lib/systemd/system"
    assert f"{units}/muxd.service" in deb.run(["dpkg", "-L", "muxd"]).stdout.splitlines()

    conffiles = deb.run(["dpkg-query", "-W", "-f=${Conffiles}", "muxd"]).stdout
    assert MUXD_CONFIG in conffiles
    for page, heading in (("muxd", "muxd - TCP/UDP echo daemon"),
                          ("muxd.ini", "muxd.ini - configuration file")):
        text = deb.run(["man", "-P", "cat", page], env={"MANWIDTH": "100"}).stdout
        assert heading in text, text[:400]
    # Documentation= points at pages that exist: verify checks them now that man is here.
    verify = deb.run(["systemd-analyze", "verify", "/lib/systemd/system/muxd.service",
                      "/lib/systemd/system/muxd.socket"], check=False)
    assert verify.returncode == 0, verify.stderr

    this_run = f"_SYSTEMD_INVOCATION_ID={deb.show('muxd', 'InvocationID')}"
    deb.wait_for_journal(this_run, match=lambda e: "listening on" in e["MESSAGE"])
    journal = deb.run(["journalctl", "-u", "muxd", "--no-pager"]).stdout
    assert f"muxd {debian_packages.version} starting" in journal, journal


def test_upgrade_keeps_the_edited_conffile_and_restarts_the_service(
        deb: Container, debian_packages: DebianPackages) -> None:
    if installed_version(deb) != debian_packages.version:
        fresh_install(deb, debian_packages)
    edit_ini(deb, {("limits", "idle_timeout"): "123"})
    edited = deb.path(MUXD_CONFIG).read_text()
    old_pid = deb.main_pid()
    assert old_pid

    # Restarted, not stopped and started: neither the old package's prerm nor the new one's
    # preinst stops a unit on upgrade (only prerm, on removal), so the old process serves
    # until postinst restarts it (and a restart keeps systemd's fd store).
    newer = debian_packages.inside(debian_packages.newer_version)
    prerm = deb.path("/var/lib/dpkg/info/muxd.prerm").read_text().splitlines()
    preinst = deb.run(["dpkg-deb", "--info", newer, "preinst"], check=False).stdout.splitlines()
    stops = [(n, script) for script in (prerm, preinst)
             for n, line in enumerate(script) if "deb-systemd-invoke stop" in line]
    assert stops, prerm
    assert all('"$1" = remove' in script[n - 1] for n, script in stops), stops

    with held_connections(deb, listeners=1) as held:
        output = apt_install(deb, newer)
        assert installed_version(deb) == debian_packages.newer_version, output
        assert deb.path(MUXD_CONFIG).read_text() == edited
        assert not deb.path(f"{MUXD_CONFIG}.dpkg-new").exists()
        new_pid = deb.main_pid()
        assert new_pid and new_pid != old_pid, "the upgrade did not restart muxd.service"
        # No connection dropped by the upgrade: the new version took them all over.
        assert_taken_over(deb, held, old_pid, debian_packages.version,
                          debian_packages.newer_version, listeners=1)
    assert_serving(deb, b"upgraded\n")
    journal = deb.run(["journalctl", "-u", "muxd", "--no-pager"]).stdout
    assert f"muxd {debian_packages.newer_version} starting" in journal


def test_upgrade_in_socket_mode_keeps_the_socket_and_restarts_the_service(
        deb: Container, debian_packages: DebianPackages) -> None:
    """README's switch to socket activation (mode B's drop-in included) survives an
    upgrade: the socket stays enabled and listening (never restarted with its service, the
    trap of systemd #23581), and the running service behind it gets the new code."""
    fresh_install(deb, debian_packages)
    deb.systemctl("disable", "--now", "muxd.service")
    add_drop_in(deb, "muxd.service", "override", socket_only_drop_in())
    deb.systemctl("enable", "--now", "muxd.socket")
    assert_serving_via_socket = b"activated\n"
    with connected(deb) as sock:
        assert echo_roundtrip(sock, assert_serving_via_socket) == assert_serving_via_socket
    old_pid = deb.main_pid()
    assert old_pid
    socket_since = deb.show("muxd.socket", "ActiveEnterTimestampMonotonic")

    with held_connections(deb, listeners=0) as held:  # the socket unit holds the listener
        apt_install(deb, debian_packages.inside(debian_packages.newer_version))
        assert deb.systemctl("is-enabled", "muxd.socket").strip() == "enabled"
        assert deb.systemctl("is-enabled", "muxd.service", check=False).strip() == "disabled"
        assert deb.show("muxd.socket", "ActiveState") == "active"
        assert deb.show("muxd.socket", "ActiveEnterTimestampMonotonic") == socket_since
        new_pid = deb.main_pid()
        assert new_pid and new_pid != old_pid
        assert_taken_over(deb, held, old_pid, debian_packages.version,
                          debian_packages.newer_version, listeners=0)
    assert_serving(deb, b"still activated\n")

    # Removal stops the socket too, so no connection can start a service that is gone.
    deb.run([*APT, "remove", "muxd"], timeout=120)
    assert deb.show("muxd.socket", "ActiveState") == "inactive"
    assert deb.show("muxd.service", "ActiveState") == "inactive"
    deb.run([*APT, "purge", "muxd"], timeout=120)
    # The drop-in is the administrator's file: dpkg leaves it; later tests run without it.
    deb.run(["rm", "-r", "/etc/systemd/system/muxd.service.d"])
    deb.systemctl("daemon-reload")


def test_remove_stops_and_keeps_config_purge_removes_it_reinstall_works(
        deb: Container, debian_packages: DebianPackages) -> None:
    if not installed_version(deb):
        fresh_install(deb, debian_packages)
    edit_ini(deb, {("limits", "idle_timeout"): "77"})
    edited = deb.path(MUXD_CONFIG).read_text()
    pid = deb.main_pid()
    assert pid

    deb.run([*APT, "remove", "muxd"], timeout=120)
    assert deb.show("muxd.service", "ActiveState") == "inactive"
    assert deb.show("muxd.service", "LoadState") == "not-found"
    assert not deb.path(f"/proc/{pid}").exists() or deb.path(f"/proc/{pid}/comm") \
        .read_text().strip() != "muxd"
    assert not deb.path("/usr/sbin/muxd").exists()
    assert deb.path(MUXD_CONFIG).read_text() == edited
    status = deb.run(["dpkg-query", "-W", "-f=${Status}", "muxd"]).stdout
    assert status == "deinstall ok config-files"

    deb.run([*APT, "purge", "muxd"], timeout=120)
    assert not deb.path("/etc/muxd").exists()
    assert deb.run(["dpkg-query", "-W", "muxd"], check=False).returncode != 0
    leftovers = deb.run(["sh", "-c", "ls -d /etc/systemd/system/*/muxd.* 2>/dev/null || true"]
                        ).stdout
    assert not leftovers.strip(), leftovers

    apt_install(deb, debian_packages.inside(debian_packages.version))
    wait_until(lambda: deb.show("muxd.service", "ActiveState") == "active", timeout=10,
               what="muxd.service active after reinstall")
    assert_serving(deb, b"back again\n")
    assert "idle_timeout = 300" in deb.path(MUXD_CONFIG).read_text()
