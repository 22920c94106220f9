"""Listening sockets: bound from the configuration, or inherited from systemd.

Socket activation follows sd_listen_fds(3) without a library: the sockets
start at fd 3, ``LISTEN_PID`` must be ours (the variables are inherited by
children that must not take them), and the variables are unset once read.
A malformed variable, or an inherited descriptor muxd cannot serve (anything
but a listening TCP or unix stream socket or a UDP socket), is refused with
EX_CONFIG before anything is served: a netlink or raw socket in the accept
loop would spin it, and a restart cannot fix the socket unit. Descriptors
of muxd's own file descriptor store (hand-over, handover.py) come through the
same variables; those are handed back unchecked for their owner to sort.

A unit meant only for socket activation says so with
``MUXD_SOCKET_ACTIVATION=required`` (the README's socket-mode drop-in): muxd
then refuses to start without a socket from systemd instead of binding
``[server] listen`` itself, which would leave it serving port 7 half in the
other mode after ``muxd.socket`` failed (or exiting 77 without the capability).
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from muxd.config import EX_CONFIG, Address, quoted

SD_LISTEN_FDS_START = 3
EX_UNAVAILABLE = 69  # sysexits.h: a restart may help (port busy, address missing)
EX_NOPERM = 77  # sysexits.h: permission denied (privileged port)


class ListenerError(Exception):
    """A listener could not be created; ``exit_status`` says whether a restart may
    help (EX_UNAVAILABLE, EX_NOPERM) or not (EX_CONFIG: what systemd passed)."""

    def __init__(self, message: str, exit_status: int = EX_UNAVAILABLE) -> None:
        super().__init__(message)
        self.exit_status = exit_status


@dataclass
class Listener:
    sock: socket.socket
    name: str  # what logs and STATUS= call it
    # (family, type, proto) as plain ints, what admission makes each accepted
    # socket with: sock.family and sock.type are enum conversions, Python code.
    socket_args: tuple[int, int, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        sock = self.sock
        self.socket_args = (int(sock.family), int(sock.type), sock.proto)

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


def check_unserved(listen: tuple[Address, ...], udp: tuple[Address, ...]) -> None:
    """Raise ListenerError (as a single daemon's bind would) if any address is
    already served, by another muxd or any other program.

    Workers bind with SO_REUSEPORT, and Linux lets any socket of the same user
    that sets it join a port, so a second workers instance would start and take
    half of the first one's connections. A probe without SO_REUSEPORT (and, for
    UDP, without SO_REUSEADDR, which UDP sockets can share too) fails with
    EADDRINUSE if anything is there. Two instances started in the same instant
    can still both pass; the point is the operator's second start."""
    for address in listen:
        bind_socket(address, socket.SOCK_STREAM, False, str(address)).close()
    for address in udp:
        family = socket.AF_INET6 if address.is_ipv6 else socket.AF_INET
        what = f"udp {address}"
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            try:
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                probe.bind((address.host, address.port))
            except OSError as err:
                raise explain_bind_error(what, address.port, err) from None


def _bind_one(address: Address, backlog: int, reuse_port: bool) -> socket.socket:
    sock = bind_socket(address, socket.SOCK_STREAM, reuse_port, str(address))
    try:
        sock.listen(backlog)
    except OSError as err:
        sock.close()
        raise explain_bind_error(str(address), address.port, err) from None
    return sock


def bind_socket(address: Address, kind: int, reuse_port: bool, what: str) -> socket.socket:
    """A non-blocking socket of ``kind`` bound to ``address``, or ListenerError
    saying which address (``what``) failed and why."""
    family = socket.AF_INET6 if address.is_ipv6 else socket.AF_INET
    try:
        sock = socket.socket(family, kind)
    except OSError as err:
        raise ListenerError(f"cannot listen on {what}: {err.strerror}") from None
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
        sock.setblocking(False)
    except OSError as err:
        sock.close()
        raise explain_bind_error(what, address.port, err) from None
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


def inherited_sockets(
    stored: Callable[[str], bool] = lambda name: False, extra: int = 0,
) -> tuple[list[tuple[socket.socket, str]], list[tuple[int, str]]] | None:
    """Sockets passed by systemd socket activation with their names (from
    LISTEN_FDNAMES, else "fd N"), or None when not activated; and apart, as
    (fd, name) and unchecked, the descriptors whose name ``stored`` claims
    (the file descriptor store's, up to ``extra`` more than MAX_INHERITED)."""
    pid = os.environ.get("LISTEN_PID")
    count = os.environ.get("LISTEN_FDS")
    names = os.environ.get("LISTEN_FDNAMES", "")
    for variable in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(variable, None)
    if pid is None:
        return None  # not activated (LISTEN_FDS alone is a variable left over)
    if not _is_number(pid):
        raise ListenerError(f"socket activation: LISTEN_PID={quoted(pid)} is not a process ID",
                            EX_CONFIG)
    if int(pid) != os.getpid():
        return None  # meant for the process that exec'd us, not for us
    if count is None or not _is_number(count):
        raise ListenerError("socket activation: LISTEN_FDS="
                            f"{quoted(count) if count is not None else '(unset)'} "
                            "is not a number of descriptors", EX_CONFIG)
    fd_count = int(count)
    if fd_count > MAX_INHERITED + extra:
        raise ListenerError(f"socket activation: LISTEN_FDS={fd_count} is more descriptors "
                            f"than muxd takes ({MAX_INHERITED + extra})", EX_CONFIG)
    fd_names = names.split(":") if names else []
    inherited = []
    kept = []
    try:
        for index in range(fd_count):
            fd = SD_LISTEN_FDS_START + index
            label = fd_names[index] if index < len(fd_names) else f"fd {fd}"
            if stored(label):
                kept.append((fd, label))
                continue
            try:
                sock = socket.socket(fileno=fd)
            except OSError as err:
                raise ListenerError(
                    f"socket activation: LISTEN_FDS={fd_count} but fd {fd} is not an open "
                    f"socket ({err.strerror})", EX_CONFIG
                ) from None
            inherited.append((sock, label))
            _check_servable(sock, fd, label)
            os.set_inheritable(fd, False)
            sock.setblocking(False)
    except BaseException:
        for sock, _ in inherited:
            sock.detach()  # the descriptors are systemd's; leave them as they came
        raise
    return inherited, kept


MAX_INHERITED = 1024
SOCKET_ACTIVATION_VARIABLE = "MUXD_SOCKET_ACTIVATION"


def socket_activation_required() -> bool:
    """Whether the unit says muxd must be socket-activated (and must bind nothing);
    any value but ``required`` or nothing is refused with EX_CONFIG."""
    value = os.environ.get(SOCKET_ACTIVATION_VARIABLE, "")
    if value not in ("", "required"):
        raise ListenerError(f"{SOCKET_ACTIVATION_VARIABLE}={quoted(value)} in the environment: "
                            "expected 'required' or nothing", EX_CONFIG)
    return value == "required"


def no_socket_passed() -> ListenerError:
    """Socket activation is required but systemd passed no socket (``muxd.socket``
    is stopped or failed, e.g. after `systemctl restart muxd.socket` went wrong)."""
    return ListenerError(
        f"socket activation: {SOCKET_ACTIVATION_VARIABLE}=required, but systemd passed no "
        "listening socket, so muxd.socket is not running: not binding [server] listen "
        "instead; start it with `systemctl start muxd.socket` (see README, \"B. socket "
        "activation\")", EX_CONFIG)


def _is_number(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 10


_FAMILIES = {socket.AF_INET: "TCP", socket.AF_INET6: "TCP", socket.AF_UNIX: "unix stream"}


def _check_servable(sock: socket.socket, fd: int, label: str) -> None:
    """Refuse an inherited socket that is not something muxd serves."""
    what = f"socket activation: fd {fd} ({label})"
    try:
        family = sock.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN)
        kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        protocol = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL)
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError as err:
        raise ListenerError(f"{what}: cannot inspect it ({err.strerror})", EX_CONFIG) from None
    if kind == socket.SOCK_STREAM and family in _FAMILIES:
        if not listening:
            raise ListenerError(
                f"{what} is a {_FAMILIES[family]} socket that is not listening (a connection: "
                "muxd.socket must keep Accept=no)", EX_CONFIG)
        return
    if kind == socket.SOCK_DGRAM and family in (socket.AF_INET, socket.AF_INET6) \
            and protocol in (0, socket.IPPROTO_UDP):
        return
    raise ListenerError(
        f"{what} is {_describe_kind(family, kind, protocol)}; muxd serves only listening TCP "
        "or unix stream sockets (ListenStream=) and UDP sockets (ListenDatagram= on an IP "
        "address)", EX_CONFIG)


def _describe_kind(family: int, kind: int, protocol: int) -> str:
    try:
        family_name = socket.AddressFamily(family).name
    except ValueError:
        family_name = f"family {family}"
    try:
        kind_name = socket.SocketKind(kind).name
    except ValueError:
        kind_name = f"type {kind}"
    return f"a {family_name} {kind_name} socket (protocol {protocol})"


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
