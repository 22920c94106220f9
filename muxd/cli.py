"""The ``muxd`` command: read the configuration, bind, (maybe detach,) serve."""

from __future__ import annotations

import argparse
import os
import socket
import sys

from muxd import __version__
from muxd.config import DEFAULT_CONFIG_PATH, EX_CONFIG, Config, ConfigError, load_config
from muxd.listeners import (
    Listener,
    ListenerError,
    bind_listeners,
    check_unserved,
    describe,
    inherited_sockets,
)
from muxd.logs import logger, set_level, setup_logging, stderr_is_journal
from muxd.notify import Notifier
from muxd.pollers import create_poller
from muxd.resources import raise_nofile
from muxd.signals import hold_until_handled
from muxd.udp import UdpEndpoint, bind_udp, inherited_endpoint

EX_USAGE = 64
EX_SOFTWARE = 70
EX_CANTCREAT = 73


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="muxd",
        description="TCP echo daemon (RFC 862) on an epoll/poll/select event loop.",
    )
    parser.add_argument(
        "-c", "--config", metavar="PATH",
        help=f"configuration file (default: {DEFAULT_CONFIG_PATH} if it exists, "
             "else built-in defaults serving 127.0.0.1:7007)",
    )
    parser.add_argument("--check-config", action="store_true",
                        help="validate the configuration and exit (0 if valid, 78 if not)")
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
        print(f"{priority}muxd: configuration error: {err}", file=sys.stderr)
        return EX_CONFIG
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
    sockets = None
    try:
        # Workers bind their own SO_REUSEPORT sockets after the fork; only
        # inherited ones are taken here, before the environment is cleared.
        sockets = _inherited_sockets() if workers else _open_sockets(config)
        if workers and sockets is None:
            check_unserved(config.listen, config.udp)
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
                                metrics_sockets=metrics_sockets).run()
            return status
        from muxd.loop import EchoServer

        listeners, udp_endpoints = sockets
        server = EchoServer(config, args.config, listeners, create_poller(config.backend),
                            notifier, udp_endpoints=udp_endpoints, test_hooks=hooks,
                            metrics_sockets=metrics_sockets)
        status = server.run()
        return status
    finally:
        if report is not None:
            report.failed(status)  # nothing once it reported ready
        notifier.close()
        if context is not None:
            context.close()


def _inherited_sockets() -> tuple[list[Listener], list[UdpEndpoint]] | None:
    """TCP listeners and UDP endpoints passed by systemd socket activation
    (the config's addresses are then not bound), or None when not activated."""
    inherited = inherited_sockets()
    if inherited is None:
        return None
    if not inherited:
        raise ListenerError("socket activation passed no sockets (LISTEN_FDS=0)", EX_CONFIG)
    listeners, endpoints = [], []
    for sock, label in inherited:
        if sock.type == socket.SOCK_DGRAM:
            endpoints.append(inherited_endpoint(sock, label))
        else:
            listeners.append(Listener(sock, f"{describe(sock)} ({label})"))
    logger.info("socket activation: %d inherited socket(s); [server] listen and udp are not "
                "used", len(inherited))
    return listeners, endpoints


def _open_sockets(config: Config) -> tuple[list[Listener], list[UdpEndpoint]]:
    """Inherited sockets, else those bound from the configuration."""
    inherited = _inherited_sockets()
    if inherited is not None:
        return inherited
    listeners = bind_listeners(config.listen, config.backlog)
    try:
        return listeners, bind_udp(config.udp)
    except ListenerError:
        for listener in listeners:
            listener.sock.close()
        raise


def _metrics_sockets(config: Config) -> list[socket.socket]:
    """The metrics endpoint's listeners ([metrics] listen), bound by muxd itself
    even under socket activation; one set for the whole service."""
    try:
        return [listener.sock for listener in bind_listeners(config.metrics_listen, 64)]
    except ListenerError as err:
        raise ListenerError(f"[metrics] {err}", err.exit_status) from None
