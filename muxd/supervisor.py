"""Several worker processes on one host: ``[server] workers = N``.

One Python process serves one core. With workers, a supervisor forks N
copies of the ordinary daemon; each binds its own sockets on the same
addresses with SO_REUSEPORT (or shares the inherited ones under socket
activation) and the kernel spreads connections among them.

The supervisor is the only process systemd hears from (NotifyAccess=main).
Each worker speaks the notify protocol, unchanged, to a datagram socket of
the supervisor's: its NOTIFY_SOCKET points there, and the kernel tells us
which worker sent what (SO_PASSCRED), as it tells systemd. So the supervisor
knows when every worker is ready, what each serves, and whether each still
pings its watchdog, and sends systemd one READY=1, one STATUS= and its own
WATCHDOG=1.

Signals are forwarded: SIGTERM/SIGINT stop the workers (each drains as the
single daemon does) and the supervisor exits once they have; SIGHUP is
checked here first (a broken file is refused once, here) and then reloaded
by each worker; SIGUSR1 makes each log its counters. A worker that dies is
replaced after a back-off that grows while replacements keep dying.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import signal
import socket
import struct
import time
from dataclasses import dataclass, replace

from muxd.access import AccessPolicy
from muxd.config import Config, ConfigError, changed_fields, load_config
from muxd.listeners import ListenerError, bind_listeners
from muxd.logs import set_level, setup_logging
from muxd.notify import Notifier, watchdog_interval
from muxd.pollers import READ, available_backends, create_poller
from muxd.signals import HANDLED, SignalQueue
from muxd.timers import Timers
from muxd.udp import bind_udp

logger = logging.getLogger("muxd")

EX_SOFTWARE = 70
PR_SET_PDEATHSIG = 1  # linux/prctl.h
RESTART_BACKOFF_FIRST = 0.1
RESTART_BACKOFF_MAX = 5.0
HEALTHY_AFTER = 10.0  # a worker that lived this long resets its slot's back-off
RELOAD_WAIT = 10.0
_SERVING = re.compile(r"serving (\d+) connection")


@dataclass
class Worker:
    slot: int
    pid: int
    started: float
    ready: bool = False
    status: str = ""
    last_ping: float = 0.0


@dataclass
class Slot:
    failures: int = 0
    worker: Worker | None = None


class Supervisor:
    def __init__(self, config: Config, config_path: str | None, inherited: tuple | None,
                 notifier: Notifier, test_hooks: frozenset[str],
                 metrics_sockets: list[socket.socket] | None = None) -> None:
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
        self.exit_status = 0
        self._now = time.monotonic()
        self._reported_status = ""
        self._watchdog = watchdog_interval()
        self._supervisor_pid = os.getpid()
        self._notify_name = f"\0muxd-supervisor-{os.getpid()}-{os.urandom(4).hex()}"
        self._inbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._inbox.bind(self._notify_name)
        self._inbox.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._inbox.setblocking(False)
        self._signals = SignalQueue((*HANDLED, signal.SIGCHLD))
        self._poller = create_poller("poll")
        self.metrics = None
        if metrics_sockets:  # [metrics] listen: one endpoint for the service
            from muxd.service_metrics import ServiceMetrics  # h11 only when it serves

            self.metrics = ServiceMetrics(metrics_sockets, self._poller, self.timers,
                                          lambda: self._now,
                                          lambda: AccessPolicy.from_config(self.config))

    # --- lifecycle -------------------------------------------------------

    def run(self) -> int:
        self._poller.register(self._inbox.fileno(), READ)
        self._poller.register(self._signals.fd, READ)
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
                    if fd == self._inbox.fileno():
                        self._read_notifications()
                    elif self.metrics is not None and self.metrics.owns(fd):
                        self.metrics.on_event(fd)
                    else:
                        for signum in self._signals.take():
                            self._on_signal(signum)
                self.timers.run_due(self._now)
        finally:
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
        channel = self.metrics.channel_for(index) if self.metrics is not None else None
        pid = os.fork()
        if pid == 0:  # the worker
            status = EX_SOFTWARE
            try:
                status = self._worker_main(index, channel)
            except BaseException:
                logger.exception("worker %d failed", index)
            finally:
                os._exit(status)
        slot.worker = self.workers[pid] = Worker(index, pid, self._now, last_ping=self._now)
        if self.metrics is not None:
            self.metrics.worker_started(index, pid)
        logger.info("supervisor: worker %d started (pid %d)", index, pid)

    def _worker_main(self, index: int, metrics_channel: socket.socket | None) -> int:
        from muxd.loop import EchoServer

        _die_with_parent(self._supervisor_pid)
        # Drop everything of the supervisor's before becoming an ordinary daemon.
        self._signals.close()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        self._inbox.close()
        self._poller.close()
        if self.metrics is not None:
            self.metrics.in_worker(index)
        self.notifier.close()
        os.environ["NOTIFY_SOCKET"] = "@" + self._notify_name[1:]
        os.environ.pop("WATCHDOG_PID", None)
        if self._watchdog is None:
            os.environ.pop("WATCHDOG_USEC", None)
        setup_logging(self.config.log_level, tag=f"worker {index}")
        if self.inherited is not None:
            listeners, endpoints = self.inherited
        else:
            try:
                listeners = bind_listeners(self.config.listen, self.config.backlog,
                                           reuse_port=True)
                endpoints = bind_udp(self.config.udp, reuse_port=True)
            except ListenerError as err:
                logger.error("%s", err)
                return err.exit_status
        server = EchoServer(self.config, self.config_path, listeners,
                            create_poller(self.config.backend), Notifier(),
                            udp_endpoints=endpoints, test_hooks=self.test_hooks,
                            metrics_channel=metrics_channel)
        return server.run()

    # --- what workers say ------------------------------------------------

    def _read_notifications(self) -> None:
        credentials_size = socket.CMSG_SPACE(struct.calcsize("3i"))
        while True:
            try:
                data, ancillary, _, _ = self._inbox.recvmsg(4096, credentials_size)
            except BlockingIOError:
                return
            pid = None
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", payload[:12])[0]
            worker = self.workers.get(pid) if pid is not None else None
            if worker is None:
                continue  # not (or no longer) one of ours
            for line in data.decode(errors="replace").splitlines():
                key, _, value = line.partition("=")
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

    # --- signals ---------------------------------------------------------

    def _on_signal(self, signum: int) -> None:
        if signum == signal.SIGCHLD:
            self._reap()
        elif signum in (signal.SIGTERM, signal.SIGINT):
            self._stop(signal.Signals(signum).name)
        elif signum == signal.SIGHUP:
            self._reload()
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
            self._forward(signal.SIGTERM)  # a second signal: the workers close at once
            return
        self.stopping = True
        logger.info("supervisor: %s: stopping %d workers", signame, len(self.workers))
        timeout = self.config.shutdown_timeout
        self.notifier.send("STOPPING=1", f"STATUS=stopping ({signame})",
                           f"EXTEND_TIMEOUT_USEC={int((timeout + 5) * 1e6)}")
        self._forward(signal.SIGTERM)
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
        if new.workers != self.config.workers:
            logger.warning("reload: workers changed; that takes effect only after a restart")
            new = replace(new, workers=self.config.workers)
        logger.info("supervisor: reloading %s in every worker (%s)", new.source,
                    ", ".join(changed_fields(self.config, new)) or "nothing changed")
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
        # A worker silent for a whole watchdog period is hung: replace just
        # that one rather than let systemd restart every worker.
        deadline = self._now - 2 * self._watchdog
        for pid, worker in list(self.workers.items()):
            if worker.ready and worker.last_ping < deadline:
                logger.error("supervisor: worker %d (pid %d) stopped answering its watchdog; "
                             "killing it", worker.slot, pid)
                os.kill(pid, signal.SIGKILL)
        self.notifier.send("WATCHDOG=1")
        self.timers.call_at(self._now + self._watchdog, self._ping_watchdog)

    def _every_second(self) -> None:
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
        serving = 0
        for worker in self.workers.values():
            match = _SERVING.match(worker.status)
            serving += int(match.group(1)) if match else 0
        ready = sum(1 for worker in self.workers.values() if worker.ready)
        backend = self.config.backend
        if backend == "auto":
            backend = available_backends()[0]
        noun = "connection" if serving == 1 else "connections"
        return (f"serving {serving} {noun} on {self._addresses()} ({backend}, "
                f"{ready}/{len(self.slots)} workers)")

    def _addresses(self) -> str:
        if self.inherited is not None:
            listeners, endpoints = self.inherited
            return ", ".join([*(item.name for item in listeners),
                              *(item.name for item in endpoints)])
        return ", ".join([*map(str, self.config.listen),
                          *(f"udp {address}" for address in self.config.udp)])


def _die_with_parent(parent: int) -> None:
    """Have the kernel send SIGTERM to this worker when the supervisor dies.

    Under systemd the whole cgroup is killed anyway, but a supervisor killed
    with SIGKILL elsewhere (detached mode, a test) would leave orphaned
    workers holding the port. PR_SET_PDEATHSIG is Linux's; elsewhere this
    does nothing."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)


def _describe_exit(wait_status: int) -> str:
    if os.WIFSIGNALED(wait_status):
        return f"was killed by {signal.Signals(os.WTERMSIG(wait_status)).name}"
    return f"exited with status {os.WEXITSTATUS(wait_status)}"
