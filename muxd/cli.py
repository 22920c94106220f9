"""The ``muxd`` command: read the configuration, bind, (maybe detach,) serve."""

from __future__ import annotations

import argparse
import os
import sys

from muxd import __version__
from muxd.config import DEFAULT_CONFIG_PATH, EX_CONFIG, ConfigError, load_config
from muxd.listeners import ListenerError, bind_listeners, inherited_listeners
from muxd.logs import logger, set_level, setup_logging
from muxd.notify import Notifier
from muxd.pollers import create_poller
from muxd.resources import raise_nofile

EX_USAGE = 64
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
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        config = load_config(args.config)
    except ConfigError as err:
        print(f"muxd: configuration error: {err}", file=sys.stderr)
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

    listeners = inherited_listeners()
    if listeners is not None:
        if not listeners:
            logger.error("socket activation passed no sockets (LISTEN_FDS=0)")
            return EX_CONFIG
        logger.info("socket activation: %d inherited socket(s); [server] listen is not used",
                    len(listeners))
    else:
        try:
            listeners = bind_listeners(config.listen, config.backlog)
        except ListenerError as err:
            logger.error("%s", err)
            return err.exit_status

    context = None
    if args.detach:
        from muxd.detach import DetachError, detach

        try:
            context = detach(args.pidfile, [listener.fd for listener in listeners])
        except DetachError as err:
            logger.error("%s", err)
            return EX_CANTCREAT

    # Everything below holds descriptors, so it is created after a detach.
    from muxd.loop import EchoServer

    notifier = Notifier()
    hooks = frozenset(filter(None, os.environ.get("MUXD_TEST_HOOKS", "").split(",")))
    server = EchoServer(config, args.config, listeners, create_poller(config.backend),
                        notifier, test_hooks=hooks)
    try:
        return server.run()
    finally:
        notifier.close()
        if context is not None:
            context.close()
