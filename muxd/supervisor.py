"""The supervisor of worker processes (``[server] workers = N``): one worker
per slot, spawned, reaped and replaced (after a back-off, or at once when it
stops sending its heartbeat), and the signals that stop or reload them all.

It may change its own slots and worker table, send signals to its workers,
and speak for them all to systemd (NotifyAccess=main: it is the only process
systemd hears from). What a worker does after the fork is muxd.worker's; how
workers' reports are read and combined is muxd.worker_reports'.

One Python process serves one core. With workers, the supervisor forks N
copies of the ordinary daemon; each binds its own sockets on the same
addresses with SO_REUSEPORT (or shares the inherited ones under socket
activation) and the kernel spreads connections among them. Each worker speaks
the notify protocol, unchanged, to the supervisor's inbox, so the supervisor
knows when every worker is ready, what each serves, and whether each still
sends its heartbeat, and sends systemd one READY=1, one STATUS= and its own
WATCHDOG=1.

Signals: SIGTERM/SIGINT stop the workers (the supervisor relays one
RELAYED_STOP to each, which drains as the single daemon does; they ignore the
SIGTERM a cgroup or process-group kill also sends them) and the supervisor
exits once they have; SIGHUP is checked here first (a broken file is refused
once, here; restart-only fields keep their running values) and then reloaded
by each worker; SIGUSR1 makes each log its counters. A worker that dies is
replaced after a back-off that grows while replacements keep dying.

Hand-over (systemd gave a file descriptor store): each worker's store is the
supervisor (muxd.store_relay owns that relay and its copies). The unit's stop
hook signals the supervisor (SIGURG, to $MAINPID); it relays that to every
worker, so the SIGTERM that follows within the arming window makes each worker
hand over, through the relay, and the supervisor exits once they have and
PID 1 confirmed all of it (BARRIER=1). A replaced worker is given what the one
before it stored (the relay's copies), as a new process is given the store.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from muxd.config import Config, ConfigError, describe_changes, load_config
from muxd.fdstore import FdStore
from muxd.handover import ARM_WINDOW, RESTART_SIGNAL
from muxd.logs import set_level
from muxd.notify import Notifier, watchdog_interval
from muxd.pollers import READ, create_poller
from muxd.reload import keep_restart_only
from muxd.signals import HANDLED, RELAYED_STOP, SignalQueue, block
from muxd.timers import Timers
from muxd.worker import run_worker
from muxd.worker_reports import Inbox, combined_status

if TYPE_CHECKING:
    from muxd.store_relay import StoreRelay

logger = logging.getLogger("muxd")

RESTART_BACKOFF_FIRST = 0.1
RESTART_BACKOFF_MAX = 5.0
HEALTHY_AFTER = 10.0  # a worker that lived this long resets its slot's back-off
RELOAD_WAIT = 10.0
# Every worker pings (WATCHDOG=1) every HEARTBEAT seconds, with or without
# systemd's watchdog; one silent for HEARTBEAT_MISSED seconds is stuck (stopped,
# hung) and is replaced, so the kernel stops handing it half the connections.
HEARTBEAT = 1.0
HEARTBEAT_MISSED = 5.0


@dataclass
class Worker:
    slot: int
    pid: int
    started: float
    ready: bool = False
    status: str = ""
    last_ping: float = 0.0
    killed: bool = False


@dataclass
class Slot:
    failures: int = 0
    worker: Worker | None = None


class Supervisor:
    def __init__(self, config: Config, config_path: str | None, inherited: tuple | None,
                 notifier: Notifier, test_hooks: frozenset[str],
                 metrics_sockets: list | None = None, store: FdStore | None = None,
                 stored: list[tuple[int, str]] | None = None, store_capacity: int = 0) -> None:
        self.config = config
        self.config_path = config_path
        self.inherited = inherited  # (listeners, udp endpoints) from socket activation
        self.notifier = notifier
        self.test_hooks = test_hooks
        self.slots = [Slot() for _ in range(config.workers)]
        self.workers: dict[int, Worker] = {}
        self.timers = Timers()
        self.stopping = False
        self.announced_ready = False
        self.reloading = False
        self._reload_after_ready = False
        self.exit_status = 0
        self._now = time.monotonic()
        self._reported_status = ""
        self._watchdog = watchdog_interval()
        self._supervisor_pid = os.getpid()
        self._inbox = Inbox()
        self._signals = SignalQueue((*HANDLED, signal.SIGCHLD))
        self._poller = create_poller("poll")
        # Hand-over: the relay between the workers' stores and systemd's.
        self.relay: StoreRelay | None = None
        self._armed_at: float | None = None
        self.handing_over = False
        self._store_capacity = store_capacity // max(1, config.workers)
        if store is not None:
            from muxd.store_relay import StoreRelay

            self.relay = StoreRelay(store, config.workers, self.timers, lambda: self._now)
            self.relay.assign(stored or [])
        self.metrics = None
        if metrics_sockets:  # [metrics] listen: one endpoint for the service
            from muxd.service_metrics import ServiceMetrics  # h11 only when it serves

            self.metrics = ServiceMetrics(metrics_sockets, self._poller, self.timers,
                                          lambda: self._now,
                                          lambda: self.config)

    # --- lifecycle -------------------------------------------------------

    def run(self) -> int:
        self._poller.register(self._inbox.fd, READ)
        self._poller.register(self._signals.fd, READ)
        if self.relay is not None:
            self._poller.register(self.relay.fd, READ)
        if self.metrics is not None:
            self.metrics.start()
        logger.info("supervisor: starting %d workers", len(self.slots))
        for index in range(len(self.slots)):
            self._spawn(index)
        if self._watchdog is not None:
            self._ping_watchdog()
        self._every_second()
        try:
            while not (self.stopping and not self.workers):
                events = self._poller.poll(self.timers.timeout(self._now))
                self._now = time.monotonic()
                for fd, _ in events:
                    if fd == self._inbox.fd:
                        self._read_notifications()
                    elif self.relay is not None and fd == self.relay.fd:
                        self.relay.on_ready()
                    elif self.metrics is not None and self.metrics.owns(fd):
                        self.metrics.on_event(fd)
                    else:
                        # The stop hook's restart signal first: with the SIGTERM
                        # right behind it, both may be taken at once, in number order.
                        for signum in sorted(self._signals.take(),
                                             key=RESTART_SIGNAL.__ne__):
                            self._on_signal(signum)
                self.timers.run_due(self._now)
            if self.handing_over and self.relay is not None:
                confirmed = self.relay.finish()
                logger.info("supervisor: every worker handed over%s",
                            "" if confirmed else "; systemd did not confirm (BARRIER) in time")
        finally:
            if self.relay is not None:
                self.relay.close()  # our copies only: the store keeps what it holds
            if self.metrics is not None:
                self.metrics.close()
            self._signals.close()
            self._inbox.close()
            self._poller.close()
        logger.info("supervisor: all workers stopped")
        return self.exit_status

    def _spawn(self, index: int) -> None:
        slot = self.slots[index]
        for stream in (logging.getLogger("muxd").handlers or []):
            stream.flush()
        # Signals stay blocked in the child until its own queue handles them:
        # until then it would run the supervisor's handlers, or die of SIGHUP.
        previous_mask = block({*HANDLED, RELAYED_STOP, signal.SIGCHLD})
        channel = self.metrics.channel_for(index) if self.metrics is not None else None
        relay = self.relay
        store_channel = relay.channel_for(index) if relay is not None else None
        handed = relay.handed_to(index) if relay is not None else []
        try:
            pid = os.fork()
        except OSError as err:  # out of processes or memory: try again later
            signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
            delay = min(RESTART_BACKOFF_MAX, RESTART_BACKOFF_FIRST * 2 ** slot.failures)
            slot.failures += 1
            logger.error("supervisor: cannot fork worker %d: %s; trying again in %gs",
                         index, err.strerror or err, delay)
            self.timers.call_at(self._now + delay, lambda: self._respawn(index))
            return
        if pid == 0:  # the worker; never returns
            run_worker(index, self.config, self.config_path, self.inherited,
                       supervisor_pid=self._supervisor_pid, notify_address=self._inbox.address,
                       heartbeat=HEARTBEAT,
                       drop_supervisor_state=lambda: self._drop_in_worker(index),
                       test_hooks=self.test_hooks, metrics_channel=channel,
                       store_channel=store_channel, store_handed=handed,
                       store_capacity=self._store_capacity)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
        if relay is not None:
            relay.worker_started(index)
        slot.worker = self.workers[pid] = Worker(index, pid, self._now, last_ping=self._now)
        if self.metrics is not None:
            self.metrics.worker_started(index, pid)
        logger.info("supervisor: worker %d started (pid %d)", index, pid)

    def _drop_in_worker(self, index: int) -> None:
        """In a just-forked worker: close what is the supervisor's."""
        self._signals.close()
        self._inbox.close()
        self._poller.close()
        if self.metrics is not None:
            self.metrics.in_worker(index)
        if self.relay is not None:
            self.relay.in_worker(index)
        self.notifier.close()

    # --- what workers say ------------------------------------------------

    def _read_notifications(self) -> None:
        for pid, key, value in self._inbox.read():
            worker = self.workers.get(pid)
            if worker is not None:  # else not (or no longer) one of ours
                self._on_worker_message(worker, key, value)

    def _on_worker_message(self, worker: Worker, key: str, value: str) -> None:
        if key == "READY" and value == "1":
            worker.ready = True
            worker.last_ping = self._now
            self._maybe_ready()
        elif key == "RELOADING":
            worker.ready = False
        elif key == "STATUS":
            worker.status = value
        elif key == "WATCHDOG" and value == "1":
            worker.last_ping = self._now

    def _maybe_ready(self) -> None:
        if self.stopping or not all(
            slot.worker is not None and slot.worker.ready for slot in self.slots
        ):
            return
        if not self.announced_ready:
            self.announced_ready = True
            logger.info("supervisor: all %d workers ready", len(self.slots))
        elif not self.reloading:
            return
        self.reloading = False
        self._report(force_ready=True)
        if self._reload_after_ready:
            self._reload_after_ready = False
            self._reload()

    # --- signals ---------------------------------------------------------

    def _on_signal(self, signum: int) -> None:
        if signum == signal.SIGCHLD:
            self._reap()
        elif signum == RESTART_SIGNAL:
            if self.relay is not None and not self.stopping:
                self._armed_at = self._now
                logger.info("supervisor: the stop hook says this stop is a restart: "
                            "every worker hands its connections over")
                self._forward(RESTART_SIGNAL)
        elif signum in (signal.SIGTERM, signal.SIGINT):
            self._stop(signal.Signals(signum).name)
        elif signum == signal.SIGHUP:
            if self.stopping:
                # STOPPING=1 is final: RELOADING=1/READY=1 now would tell systemd
                # the service is up again while it drains to exit.
                logger.info("supervisor: SIGHUP while stopping: not reloading")
            elif self.announced_ready:
                self._reload()
            else:  # reload once every worker is up, as a single process would
                self._reload_after_ready = True
        elif signum in (signal.SIGUSR1, signal.SIGUSR2):
            self._forward(signum)

    def _forward(self, signum: int) -> None:
        for pid in self.workers:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def _stop(self, signame: str) -> None:
        if self.stopping:
            self._forward(RELAYED_STOP)  # a second signal: the workers close at once
            return
        self.stopping = True
        armed = self._armed_at
        if signame == "SIGTERM" and armed is not None and self._now - armed <= ARM_WINDOW:
            # Each worker was armed too: the relayed stop makes it hand over.
            self.handing_over = True
            logger.info("supervisor: %s: %d workers hand their connections over", signame,
                        len(self.workers))
            self.notifier.send("STOPPING=1", "STATUS=restarting: handing connections over")
            self._forward(RELAYED_STOP)
            self.timers.call_at(self._now + self.config.shutdown_timeout + 3,
                                self._kill_stragglers)
            return
        logger.info("supervisor: %s: stopping %d workers", signame, len(self.workers))
        timeout = self.config.shutdown_timeout
        self.notifier.send("STOPPING=1", f"STATUS=stopping ({signame})",
                           f"EXTEND_TIMEOUT_USEC={int((timeout + 5) * 1e6)}")
        self._forward(RELAYED_STOP)
        self.timers.call_at(self._now + timeout + 3, self._kill_stragglers)

    def _kill_stragglers(self) -> None:
        for pid, worker in self.workers.items():
            logger.error("supervisor: worker %d (pid %d) did not stop; killing it",
                         worker.slot, pid)
            os.kill(pid, signal.SIGKILL)

    def _reload(self) -> None:
        self.notifier.reloading()
        try:
            new = load_config(self.config_path)
        except ConfigError as err:
            logger.error("reload failed, keeping the running configuration: %s", err)
            if self.metrics is not None:
                self.metrics.reload_failed()
            self._report(force_ready=True)
            return
        old = self.config
        # As the single process does (and each worker will): a restart-only field
        # keeps its running value everywhere, so a worker replaced later binds what
        # the others serve.
        new, applied, needs_restart = keep_restart_only(old, new)
        logger.info("supervisor: reloading %s in every worker (%s)", new.source,
                    describe_changes(applied, needs_restart))
        self.config = new
        if self.metrics is not None:
            self.metrics.reload_succeeded()
        set_level(new.log_level)
        self.reloading = True
        for worker in self.workers.values():
            worker.ready = False
        self._forward(signal.SIGHUP)
        self.timers.call_at(self._now + RELOAD_WAIT, self._reload_overdue)

    def _reload_overdue(self) -> None:
        if self.reloading:
            logger.warning("supervisor: not every worker confirmed the reload in %gs",
                           RELOAD_WAIT)
            self.reloading = False
            self._report(force_ready=True)

    def _reap(self) -> None:
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            slot = self.slots[worker.slot]
            slot.worker = None
            if self.relay is not None:
                self.relay.worker_gone(worker.slot)  # what it sent before it exited
            if self.metrics is not None:
                self.metrics.worker_gone(worker.slot)
            how = _describe_exit(wait_status)
            if self.stopping:
                logger.info("supervisor: worker %d (pid %d) %s", worker.slot, pid, how)
                continue
            if not self.announced_ready and os.waitstatus_to_exitcode(wait_status) > 0:
                # A worker that cannot start (its port is taken, say) will not
                # do better the next time: fail the whole start, as a single
                # daemon would, with the worker's own exit status.
                logger.error("supervisor: worker %d %s before it was ready; stopping",
                             worker.slot, how)
                self.exit_status = os.waitstatus_to_exitcode(wait_status)
                self._stop("start-up failure")
                continue
            if self._now - worker.started >= HEALTHY_AFTER:
                slot.failures = 0
            delay = min(RESTART_BACKOFF_MAX, RESTART_BACKOFF_FIRST * 2 ** slot.failures)
            slot.failures += 1
            logger.warning("supervisor: worker %d (pid %d) %s; replacing it in %gs",
                           worker.slot, pid, how, delay)
            index = worker.slot
            self.timers.call_at(self._now + delay, lambda index=index: self._respawn(index))

    def _respawn(self, index: int) -> None:
        if not self.stopping and self.slots[index].worker is None:
            self._spawn(index)

    # --- timers ----------------------------------------------------------

    def _ping_watchdog(self) -> None:
        assert self._watchdog is not None
        self.notifier.send("WATCHDOG=1")
        self.timers.call_at(self._now + self._watchdog, self._ping_watchdog)

    def _check_heartbeats(self) -> None:
        # A worker silent this long is hung or stopped (SIGSTOP): replace just
        # that one, with or without systemd's watchdog, rather than let it keep
        # its share of the listening port or have systemd restart every worker.
        # From its spawn on (last_ping starts there): one stuck before READY=1
        # would otherwise hold the whole start, and `--detach` waiting for it.
        deadline = self._now - HEARTBEAT_MISSED
        for pid, worker in list(self.workers.items()):
            if worker.last_ping < deadline and not worker.killed:
                logger.error("supervisor: worker %d (pid %d) sent no heartbeat for %gs; "
                             "killing it", worker.slot, pid, HEARTBEAT_MISSED)
                worker.killed = True
                os.kill(pid, signal.SIGKILL)

    def _every_second(self) -> None:
        if not self.stopping:
            self._check_heartbeats()
        if self.announced_ready and not self.stopping:
            self._report()
        self.timers.call_at(self._now + 1.0, self._every_second)

    def _report(self, force_ready: bool = False) -> None:
        status = self._status()
        if force_ready:
            self.notifier.ready(status)
        elif status != self._reported_status:
            self.notifier.send(f"STATUS={status}")
        self._reported_status = status

    def _status(self) -> str:
        workers = self.workers.values()
        return combined_status((worker.status for worker in workers),
                               sum(1 for worker in workers if worker.ready), len(self.slots),
                               self.config, self.inherited)


def _describe_exit(wait_status: int) -> str:
    if os.WIFSIGNALED(wait_status):
        return f"was killed by {signal.Signals(os.WTERMSIG(wait_status)).name}"
    return f"exited with status {os.WEXITSTATUS(wait_status)}"
