"""Listening sockets: bound from the configuration, or inherited from systemd.

Socket activation follows sd_listen_fds(3) without a library: the sockets
start at fd 3, ``LISTEN_PID`` must be ours (the variables are inherited by
children that must not take them), and the variables are unset once read.
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass

from muxd.config import Address

SD_LISTEN_FDS_START = 3
EX_UNAVAILABLE = 69  # sysexits.h: a restart may help (port busy, address missing)
EX_NOPERM = 77  # sysexits.h: permission denied (privileged port)


class ListenerError(Exception):
    """A listener could not be created; ``exit_status`` is never EX_CONFIG."""

    def __init__(self, message: str, exit_status: int = EX_UNAVAILABLE) -> None:
        super().__init__(message)
        self.exit_status = exit_status


@dataclass
class Listener:
    sock: socket.socket
    name: str  # what logs and STATUS= call it

    @property
    def fd(self) -> int:
        return self.sock.fileno()


def bind_listeners(addresses: tuple[Address, ...], backlog: int,
                   reuse_port: bool = False) -> list[Listener]:
    """Bind and listen on every address, or close them all and raise ListenerError.

    ``reuse_port`` (SO_REUSEPORT) lets each worker process bind its own
    listener on the same address; the kernel spreads connections among them."""
    listeners: list[Listener] = []
    try:
        for address in addresses:
            listeners.append(Listener(_bind_one(address, backlog, reuse_port), str(address)))
    except BaseException:
        for listener in listeners:
            listener.sock.close()
        raise
    return listeners


def _bind_one(address: Address, backlog: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if address.is_ipv6 else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as err:
        raise ListenerError(f"cannot listen on {address}: {err.strerror}") from None
    try:
        # A restart must be able to bind at once while the old process's
        # connections sit in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            # [::] means both families; the kernel default (bindv6only) may differ.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((address.host, address.port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as err:
        sock.close()
        raise explain_bind_error(str(address), address.port, err) from None
    return sock


def explain_bind_error(what: str, port: int, err: OSError) -> ListenerError:
    """Say which address failed, why, and what would fix it."""
    if err.errno == errno.EADDRINUSE:
        return ListenerError(
            f"cannot listen on {what}: address already in use "
            "(another muxd, an echo service, or muxd.socket may hold it)"
        )
    if err.errno in (errno.EACCES, errno.EPERM):
        hint = ""
        if port < 1024:
            hint = (
                f"; port {port} is privileged: run as root, grant "
                "CAP_NET_BIND_SERVICE (AmbientCapabilities= in the unit, or setcap), "
                "use socket activation, or listen on a port >= 1024"
            )
        return ListenerError(f"cannot listen on {what}: permission denied{hint}", EX_NOPERM)
    if err.errno == errno.EADDRNOTAVAIL:
        return ListenerError(f"cannot listen on {what}: no such local address on this host")
    return ListenerError(f"cannot listen on {what}: {err.strerror or err}")


def inherited_sockets() -> list[tuple[socket.socket, str]] | None:
    """Sockets passed by systemd socket activation with their names (from
    LISTEN_FDNAMES, else "fd N"), or None when not activated."""
    pid = os.environ.get("LISTEN_PID")
    count = os.environ.get("LISTEN_FDS")
    names = os.environ.get("LISTEN_FDNAMES", "")
    for variable in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(variable, None)
    if count is None or pid is None:
        return None
    try:
        if int(pid) != os.getpid():
            return None
        fd_count = int(count)
    except ValueError:
        return None
    fd_names = names.split(":") if names else []
    inherited = []
    for index in range(fd_count):
        fd = SD_LISTEN_FDS_START + index
        try:
            sock = socket.socket(fileno=fd)
        except OSError as err:
            raise ListenerError(
                f"socket activation: LISTEN_FDS={fd_count} but fd {fd} is not an open socket "
                f"({err.strerror})"
            ) from None
        os.set_inheritable(fd, False)
        sock.setblocking(False)
        label = fd_names[index] if index < len(fd_names) else f"fd {fd}"
        inherited.append((sock, label))
    return inherited


def describe(sock: socket.socket) -> str:
    """A listening socket's address the way the config writes it."""
    try:
        name = sock.getsockname()
    except OSError:
        return f"fd {sock.fileno()}"
    if sock.family == socket.AF_INET6:
        return f"[{name[0]}]:{name[1]}"
    if sock.family == socket.AF_INET:
        return f"{name[0]}:{name[1]}"
    return str(name) or "unix socket"
