"""A worker's side of the fork: turning a freshly forked child of the
supervisor into an ordinary daemon, and running it.

It may change only the child's own process: its descriptors (it closes the
supervisor's), its signal dispositions (it stops only when the supervisor
says so, see muxd.signals), its environment (NOTIFY_SOCKET points at the
supervisor's inbox, WATCHDOG_USEC sets its heartbeat) and its log tag. It
never returns into the supervisor's code: ``run_worker`` ends in os._exit.

With hand-over, its file descriptor store is the supervisor's relay
(muxd.store_relay.WorkerStore over the channel made before the fork), and what
it takes over is what the relay hands its slot, sorted as a single process
sorts what systemd passes it (handover.sort_inherited); its own listeners are
kept or bound as a single process's are (cli.open_own_listeners).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from muxd.config import Config
from muxd.fdstore import classify, drop
from muxd.listeners import ListenerError, bind_listeners
from muxd.logs import setup_logging
from muxd.notify import Notifier
from muxd.pollers import create_poller
from muxd.signals import RELAYED_STOP, take_stops_from_supervisor
from muxd.udp import bind_udp

if TYPE_CHECKING:
    from muxd.cli import HandoverSetup  # cli imports the supervisor, which imports us

logger = logging.getLogger("muxd")

EX_SOFTWARE = 70
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def run_worker(index: int, config: Config, config_path: str | None, inherited: tuple | None,
               *, supervisor_pid: int, notify_address: str, heartbeat: float,
               drop_supervisor_state: Callable[[], None], test_hooks: frozenset[str],
               metrics_channel: socket.socket | None = None,
               store_channel: socket.socket | None = None,
               store_handed: list[tuple[int, str]] | None = None, store_capacity: int = 0
               ) -> None:
    """In the child just forked: serve as worker ``index`` until stopped, then exit.
    ``metrics_channel``: its end of the line the supervisor gathers metrics on;
    ``store_channel``: its end of the store relay (hand-over on), ``store_handed``
    what it takes over, ``store_capacity`` its share of the store."""
    status = EX_SOFTWARE
    try:
        status = _serve(index, config, config_path, inherited, supervisor_pid, notify_address,
                        heartbeat, drop_supervisor_state, test_hooks, metrics_channel,
                        store_channel, store_handed or [], store_capacity)
    except BaseException:
        logger.exception("worker %d failed", index)
    finally:
        os._exit(status)


def _serve(index: int, config: Config, config_path: str | None, inherited: tuple | None,
           supervisor_pid: int, notify_address: str, heartbeat: float,
           drop_supervisor_state: Callable[[], None], test_hooks: frozenset[str],
           metrics_channel: socket.socket | None, store_channel: socket.socket | None,
           store_handed: list[tuple[int, str]], store_capacity: int) -> int:
    from muxd.loop import EchoServer

    # With hand-over, a worker outliving its supervisor must leave its connections in
    # the store, as a crash does: a graceful stop would close them all.
    _die_with_parent(supervisor_pid, signal.SIGKILL if store_channel is not None
                     else RELAYED_STOP)
    # Drop everything of the supervisor's before becoming an ordinary daemon.
    drop_supervisor_state()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    take_stops_from_supervisor()
    os.environ["NOTIFY_SOCKET"] = notify_address
    os.environ.pop("WATCHDOG_PID", None)
    os.environ["WATCHDOG_USEC"] = str(int(2 * heartbeat * 1e6))  # it pings every `heartbeat`
    setup_logging(config.log_level, tag=f"worker {index}")
    handover = None
    if store_channel is not None:
        handover = _take_handed(store_channel, store_handed, store_capacity)
    if inherited is not None:
        listeners, endpoints = inherited
        if handover is not None and handover.inheritance is not None:
            for item in handover.inheritance.own_listeners:
                drop(item, "a socket unit passes the listeners now")
            handover.inheritance.own_listeners.clear()
    else:
        try:
            if handover is not None:
                from muxd.cli import open_own_listeners

                listeners = open_own_listeners(config, handover, reuse_port=True)
            else:
                listeners = bind_listeners(config.listen, config.backlog, reuse_port=True)
            endpoints = bind_udp(config.udp, reuse_port=True)
        except ListenerError as err:
            logger.error("%s", err)
            return err.exit_status
    keeping = {} if handover is None else {
        "store": handover.store, "store_capacity": handover.capacity,
        "stored_listeners": handover.stored_listeners, "inheritance": handover.inheritance}
    server = EchoServer(config, config_path, listeners, create_poller(config.backend),
                        Notifier(), udp_endpoints=endpoints, test_hooks=test_hooks,
                        metrics_channel=metrics_channel, **keeping)
    return server.run()


def _take_handed(channel: socket.socket, handed: list[tuple[int, str]], capacity: int
                 ) -> HandoverSetup:
    """The worker's store (the relay) and what its slot left in it, sorted by name and
    by what each is, as a single process sorts what systemd passes it."""
    from muxd.cli import HandoverSetup
    from muxd.handover import sort_inherited
    from muxd.store_relay import WorkerStore

    setup = HandoverSetup(True, "", capacity)
    setup.store = WorkerStore(channel)
    if handed:
        setup.inheritance = sort_inherited([classify(fd, name) for fd, name in handed],
                                           setup.store)
    return setup


def _die_with_parent(parent: int, signum: int) -> None:
    """Have the kernel stop this worker when the supervisor dies.

    Under systemd the whole cgroup is killed anyway, but a supervisor killed
    with SIGKILL elsewhere (detached mode, a test) would leave orphaned
    workers holding the port. The signal is RELAYED_STOP, the one a worker
    stops on (it ignores SIGTERM); with hand-over SIGKILL, so that its
    connections stay in the store for the supervisor systemd starts next.
    PR_SET_PDEATHSIG is Linux's; elsewhere this does nothing."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the request was in place
        os.kill(os.getpid(), signum)
