"""The ``muxd`` command: read the configuration, bind, (maybe detach,) serve."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys

from muxd import __version__
from muxd.config import DEFAULT_CONFIG_PATH, EX_CONFIG, Address, Config, ConfigError, load_config
from muxd.fdstore import FdStore, Received, classify, drop, release, store_capacity
from muxd.handover import LISTENER_NAME, Inheritance, is_store_name, sort_inherited
from muxd.listeners import (
    Listener,
    ListenerError,
    bind_listeners,
    check_unserved,
    describe,
    inherited_sockets,
    no_socket_passed,
    socket_activation_required,
)
from muxd.logs import logger, set_level, setup_logging, stderr_is_journal
from muxd.notify import Notifier
from muxd.parking import unpark
from muxd.pollers import create_poller
from muxd.resources import raise_nofile
from muxd.signals import hold_until_handled
from muxd.store_relay import AliasedStore, share_stored_listeners, split_name
from muxd.udp import UdpEndpoint, bind_udp, inherited_endpoint

EX_USAGE = 64
EX_SOFTWARE = 70
EX_CANTCREAT = 73
# Entries an older release's store may pass at an upgrade: one per connection, up to the
# FileDescriptorStoreMax= it shipped with (10240) and more if an operator raised it.
LEGACY_STORE_ENTRIES = 65536


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="muxd",
        description="TCP and UDP echo daemon (RFC 862) on an epoll/poll/select event loop.",
    )
    parser.add_argument(
        "-c", "--config", metavar="PATH",
        help=f"configuration file (default: {DEFAULT_CONFIG_PATH} if it exists, "
             "else built-in defaults serving 127.0.0.1:7007)",
    )
    parser.add_argument("--check-config", action="store_true",
                        help="validate the configuration and exit (0 if valid, 78 if not)")
    parser.add_argument("--check-restart", action="store_true",
                        help="the unit's stop hook, before a restart: validate the "
                             "configuration the next process will read and exit, silent and "
                             "0 if it is valid (hand-over), else 78 with a line saying this "
                             "restart stops gracefully")
    parser.add_argument("--detach", action="store_true",
                        help="fork into the background (for hosts without systemd)")
    parser.add_argument("--pidfile", metavar="PATH",
                        help="with --detach: write the daemon's PID here")
    parser.add_argument("--version", action="version", version=f"muxd {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    hold_until_handled()  # again for the console script, which imports us first
    args = build_parser().parse_args(argv)
    if args.detach and args.config:
        # The daemon's working directory is /, and every reload reads this path.
        args.config = os.path.abspath(args.config)
    setup_logging()
    try:
        config = load_config(args.config)
    except ConfigError as err:
        # Not through the logger: one plain line for a person at a terminal,
        # but with the journal's priority prefix when stderr is the journal, so
        # `journalctl -p err` shows why muxd failed.
        priority = "<3>" if stderr_is_journal() else ""
        # Before a restart the old process is still serving: handing its clients to
        # a process that will not start would reset them all, so this one line (the
        # only one) says that the restart is a graceful stop instead, and why.
        consequence = ("; this restart stops muxd gracefully instead of handing its "
                       "connections over (every client gets its echo, then the end), and "
                       "muxd will not start again until the file is fixed"
                       if args.check_restart else "")
        print(f"{priority}muxd: configuration error: {err}{consequence}", file=sys.stderr)
        return EX_CONFIG
    if args.check_restart:
        return 0  # the hook then sends SIGURG; muxd itself logs the hand-over
    if args.check_config:
        print(f"muxd: configuration OK: {config.source}")
        return 0
    if args.pidfile and not args.detach:
        print("muxd: --pidfile goes with --detach", file=sys.stderr)
        return EX_USAGE
    if args.detach and os.environ.get("NOTIFY_SOCKET"):
        print("muxd: refusing --detach under systemd (NOTIFY_SOCKET is set): a Type=notify "
              "service must not fork; drop --detach from ExecStart", file=sys.stderr)
        return EX_USAGE
    set_level(config.log_level)
    logger.info("muxd %s starting with %s", __version__, config.source)
    raise_nofile(config.nofile)

    workers = config.workers > 1
    handover = _handover_setup(config, workers)
    sockets = None
    try:
        # Workers bind their own SO_REUSEPORT sockets after the fork; only
        # inherited ones are taken here, before the environment is cleared.
        sockets = _inherited_sockets(handover) if workers else _open_sockets(config, handover)
        if workers and sockets is None:
            # Listeners the previous workers stored are ours (held by the store).
            held = share_stored_listeners(handover.stored)
            check_unserved(tuple(address for address in config.listen
                                 if (address.host, address.port) not in held), config.udp)
        metrics_sockets = _metrics_sockets(config)
    except ListenerError as err:
        if sockets:
            for item in (*sockets[0], *sockets[1]):
                item.sock.close()
        logger.error("%s", err)
        return err.exit_status

    context = report = None
    if args.detach:
        from muxd.detach import DetachError, detach

        held = [*metrics_sockets] if sockets is None else [
            *(listener.sock for listener in sockets[0]),
            *(endpoint.sock for endpoint in sockets[1]),
            *metrics_sockets,
        ]
        try:
            context, report = detach(args.pidfile, [sock.fileno() for sock in held])
        except DetachError as err:
            logger.error("%s", err)
            return EX_CANTCREAT

    # Everything below holds descriptors, so it is created after a detach.
    if report is not None:
        from muxd.detach import ReportingNotifier

        notifier: Notifier = ReportingNotifier(report)
    else:
        notifier = Notifier()
    hooks = frozenset(filter(None, os.environ.get("MUXD_TEST_HOOKS", "").split(",")))
    status = EX_SOFTWARE  # unless run() returns: an exception is on its way up
    try:
        if workers:
            from muxd.supervisor import Supervisor

            status = Supervisor(config, args.config, sockets, notifier, hooks,
                                metrics_sockets=metrics_sockets,
                                store=handover.store if handover.enabled else None,
                                stored=handover.stored, store_capacity=handover.capacity).run()
            return status
        from muxd.loop import EchoServer

        listeners, udp_endpoints = sockets
        server = EchoServer(config, args.config, listeners, create_poller(config.backend),
                            notifier, udp_endpoints=udp_endpoints, test_hooks=hooks,
                            store=handover.store if handover.enabled else None,
                            store_capacity=handover.capacity,
                            stored_listeners=handover.stored_listeners,
                            inheritance=handover.inheritance,
                            metrics_sockets=metrics_sockets)
        status = server.run()
        return status
    finally:
        if report is not None:
            report.failed(status)  # nothing once it reported ready
        notifier.close()
        if handover.store is not None:
            handover.store.close()
        if context is not None:
            context.close()


class HandoverSetup:
    """Whether hand-over is on, the store, and what the previous process left."""

    def __init__(self, enabled: bool, notify_socket: str, capacity: int,
                 workers: bool = False) -> None:
        self.enabled = enabled
        self.workers = workers
        # With workers: what the store passed back, unsorted, for the supervisor's relay.
        self.stored: list[tuple[int, str]] = []
        self.notify_socket = notify_socket
        self.capacity = capacity
        self.store: FdStore | None = None
        self.inheritance: Inheritance | None = None
        self.stored_listeners: list[Listener] = []

    def open_store(self) -> FdStore | None:
        if self.store is None and self.notify_socket:
            try:
                self.store = FdStore(self.notify_socket)
            except OSError as err:
                logger.warning("cannot reach NOTIFY_SOCKET for the file descriptor store: %s",
                               err)
                self.enabled = False
        return self.store


def _handover_setup(config: Config, workers: bool) -> HandoverSetup:
    """Hand-over is on when the config says so and systemd gave a store ($FDSTORE);
    with workers the supervisor's relay is every worker's store (store_relay.py)."""
    notify_socket = os.environ.get("NOTIFY_SOCKET", "")
    capacity = store_capacity() if notify_socket else 0
    setup = HandoverSetup(config.handover and capacity > 0, notify_socket, capacity, workers)
    if setup.enabled:
        setup.open_store()
    return setup


def _take_stored(handover: HandoverSetup, stored: list[tuple[int, str]]) -> None:
    """Sort what the store passed back; without hand-over, close it all. Names of a
    worker's (``state-w<k>.``, after ``workers`` went down to 1) are taken as our own."""
    items = []
    aliases: dict[str, set[str]] = {}
    for fd, name in stored:
        _, own = split_name(name)
        if own != name:
            aliases.setdefault(own, set()).add(name)
        items.append(classify(fd, own))
    store = handover.open_store()
    if aliases and store is not None:
        store = handover.store = AliasedStore(store, aliases)  # type: ignore[assignment]
    inheritance = handover.inheritance = sort_inherited(items, store)
    if not handover.enabled:
        parked = unpark(inheritance.segments, set())
        connections = inheritance.connections + inheritance.waiting + parked.live
        if connections:
            logger.warning("closed %d connection(s) handed over by the previous process: "
                           "[server] handover is off here", len(connections))
        for item in connections:
            _release(item)
        for item in inheritance.segments:
            if handover.store is not None:
                handover.store.remove(item.name)
            os.close(item.fd)
        inheritance.segments.clear()
        if inheritance.state is not None:
            inheritance.state.close()
        for item in inheritance.own_listeners:
            drop(item, "[server] handover is off")
        inheritance.connections.clear()
        inheritance.waiting.clear()
        inheritance.own_listeners.clear()


def _release(item: Received) -> None:
    sock = socket.socket(fileno=item.fd)
    release(sock)
    sock.close()


def _inherited_sockets(handover: HandoverSetup
                       ) -> tuple[list[Listener], list[UdpEndpoint]] | None:
    """TCP listeners and UDP endpoints passed by systemd socket activation
    (the config's addresses are then not bound), or None when not activated.
    What muxd's own store passed back is sorted into ``handover.inheritance``."""
    required = socket_activation_required()
    # The store may still hold one entry per connection, from the release before
    # parking (an upgrade): not only as many as the store's size now.
    found = inherited_sockets(lambda name: is_store_name(split_name(name)[1]),
                              max(handover.capacity, LEGACY_STORE_ENTRIES))
    if found is None:
        if required:
            raise no_socket_passed()
        return None
    inherited, stored = found
    if not inherited and not stored:
        raise ListenerError("socket activation passed no sockets (LISTEN_FDS=0)", EX_CONFIG)
    if not inherited and required:
        raise no_socket_passed()  # only muxd's own store came back
    if stored and handover.workers and handover.enabled:
        handover.stored = stored  # sorted by slot in the supervisor (store_relay.py)
    elif stored:
        _take_stored(handover, stored)
    if not inherited:
        return None
    if handover.inheritance is not None:
        for item in handover.inheritance.own_listeners:
            drop(item, "a socket unit passes the listeners now")
        handover.inheritance.own_listeners.clear()
    listeners, endpoints = [], []
    for sock, label in inherited:
        if sock.type == socket.SOCK_DGRAM:
            endpoints.append(inherited_endpoint(sock, label))
        else:
            listeners.append(Listener(sock, f"{describe(sock)} ({label})"))
    logger.info("socket activation: %d inherited socket(s); [server] listen and [server] udp "
                "are not used", len(inherited))
    return listeners, endpoints


def _open_sockets(config: Config, handover: HandoverSetup
                  ) -> tuple[list[Listener], list[UdpEndpoint]]:
    """Inherited sockets, else those bound from the configuration (keeping the
    listeners of the previous process whose address is still in ``listen``)."""
    inherited = _inherited_sockets(handover)
    if inherited is not None:
        return inherited
    ordered = open_own_listeners(config, handover)
    try:
        return ordered, bind_udp(config.udp)
    except ListenerError:
        for listener in ordered:
            listener.sock.close()
        raise


def open_own_listeners(config: Config, handover: HandoverSetup, reuse_port: bool = False
                       ) -> list[Listener]:
    """The listeners of ``listen``: those the previous process stored whose address is
    still in it, the others bound (``reuse_port``: a worker's); with hand-over, the new
    ones are stored. A worker calls this too, with its relay as the store."""
    kept: dict[Address, Listener] = {}
    inheritance = handover.inheritance
    if inheritance is not None:
        wanted = set(config.listen)
        for item in inheritance.own_listeners:
            sock = socket.socket(fileno=item.fd)
            address = _address_of(sock)
            if address in wanted and address not in kept:
                sock.setblocking(False)
                sock.listen(config.backlog)  # a changed backlog applies to a kept listener
                kept[address] = Listener(sock, str(address))
            else:
                sock.detach()
                drop(item, f"its address {address} is no longer in [server] listen"
                     if address not in wanted else f"another listener on {address} is kept")
        inheritance.own_listeners = [item for item in inheritance.own_listeners
                                     if any(k.fd == item.fd for k in kept.values())]
    fresh = tuple(address for address in config.listen if address not in kept)
    listeners = bind_listeners(fresh, config.backlog, reuse_port) if fresh else []
    if handover.enabled and handover.store is not None:
        store = handover.store
        again = list(listeners)
        if inheritance is not None and LISTENER_NAME in inheritance.restore_names:
            # A foreign descriptor stored as a listener goes only with the whole name.
            store.remove(LISTENER_NAME)
            again += kept.values()
        for listener in again:
            store.store_now(listener.fd, LISTENER_NAME)
        handover.stored_listeners = [*kept.values(), *listeners]
    by_address = {**kept, **{_address_of(listener.sock): listener for listener in listeners}}
    return [by_address[address] for address in config.listen if address in by_address]


def _metrics_sockets(config: Config) -> list[socket.socket]:
    """The metrics endpoint's listeners ([metrics] listen), bound by muxd itself
    even under socket activation; one set for the whole service."""
    try:
        return [listener.sock for listener in bind_listeners(config.metrics_listen, 64)]
    except ListenerError as err:
        raise ListenerError(f"[metrics] {err}", err.exit_status) from None


def _address_of(sock: socket.socket) -> Address | None:
    try:
        name = sock.getsockname()
    except OSError:
        return None
    if not isinstance(name, tuple):
        return None
    return Address(str(ipaddress.ip_address(name[0])), name[1])
