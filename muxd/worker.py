"""A worker's side of the fork: turning a freshly forked child of the
supervisor into an ordinary daemon, and running it.

It may change only the child's own process: its descriptors (it closes the
supervisor's), its signal dispositions (it stops only when the supervisor
says so, see muxd.signals), its environment (NOTIFY_SOCKET points at the
supervisor's inbox, WATCHDOG_USEC sets its heartbeat) and its log tag. It
never returns into the supervisor's code: ``run_worker`` ends in os._exit.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
from collections.abc import Callable

from muxd.config import Config
from muxd.listeners import ListenerError, bind_listeners
from muxd.logs import setup_logging
from muxd.notify import Notifier
from muxd.pollers import create_poller
from muxd.signals import RELAYED_STOP, take_stops_from_supervisor
from muxd.udp import bind_udp

logger = logging.getLogger("muxd")

EX_SOFTWARE = 70
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def run_worker(index: int, config: Config, config_path: str | None, inherited: tuple | None,
               *, supervisor_pid: int, notify_address: str, heartbeat: float,
               drop_supervisor_state: Callable[[], None], test_hooks: frozenset[str],
               metrics_channel: socket.socket | None = None) -> None:
    """In the child just forked: serve as worker ``index`` until stopped, then exit.
    ``metrics_channel``: its end of the line the supervisor gathers metrics on."""
    status = EX_SOFTWARE
    try:
        status = _serve(index, config, config_path, inherited, supervisor_pid, notify_address,
                        heartbeat, drop_supervisor_state, test_hooks, metrics_channel)
    except BaseException:
        logger.exception("worker %d failed", index)
    finally:
        os._exit(status)


def _serve(index: int, config: Config, config_path: str | None, inherited: tuple | None,
           supervisor_pid: int, notify_address: str, heartbeat: float,
           drop_supervisor_state: Callable[[], None], test_hooks: frozenset[str],
           metrics_channel: socket.socket | None) -> int:
    from muxd.loop import EchoServer

    _die_with_parent(supervisor_pid)
    # Drop everything of the supervisor's before becoming an ordinary daemon.
    drop_supervisor_state()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    take_stops_from_supervisor()
    os.environ["NOTIFY_SOCKET"] = notify_address
    os.environ.pop("WATCHDOG_PID", None)
    os.environ["WATCHDOG_USEC"] = str(int(2 * heartbeat * 1e6))  # it pings every `heartbeat`
    setup_logging(config.log_level, tag=f"worker {index}")
    if inherited is not None:
        listeners, endpoints = inherited
    else:
        try:
            listeners = bind_listeners(config.listen, config.backlog, reuse_port=True)
            endpoints = bind_udp(config.udp, reuse_port=True)
        except ListenerError as err:
            logger.error("%s", err)
            return err.exit_status
    server = EchoServer(config, config_path, listeners, create_poller(config.backend),
                        Notifier(), udp_endpoints=endpoints, test_hooks=test_hooks,
                        metrics_channel=metrics_channel)
    return server.run()


def _die_with_parent(parent: int) -> None:
    """Have the kernel stop this worker when the supervisor dies.

    Under systemd the whole cgroup is killed anyway, but a supervisor killed
    with SIGKILL elsewhere (detached mode, a test) would leave orphaned
    workers holding the port. The signal is RELAYED_STOP, the one a worker
    stops on (it ignores SIGTERM). PR_SET_PDEATHSIG is Linux's; elsewhere
    this does nothing."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, RELAYED_STOP, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the request was in place
        os.kill(os.getpid(), RELAYED_STOP)
