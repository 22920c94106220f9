"""Detached mode for hosts without systemd: the fork into the background, the
pidfile, and the report of the start back to the command the operator ran.
It may change the process (fork, session, working directory, descriptors) and
nothing of the daemon's state.

The command waits until the daemon is ready (or has failed) before it exits,
and exits with the daemon's status: a pipe from the daemon carries either
"ready" or the failure's exit status, and its end of file without either means
the daemon died. So a pidfile that cannot be written or workers that cannot
start fail the command, as they fail ``systemctl start`` under systemd.
Readiness is the moment the daemon sends READY=1 (ReportingNotifier), the
same moment systemd would be told.

The forks are our own (a first child that calls setsid and forks the daemon,
so the daemon is no session leader), and ``python-daemon`` does the rest with
``detach_process=False``: the working directory, the umask, closing every
descriptor it is not told to keep (the listeners, stderr, the report pipe) and
the pidfile lock. Under systemd a Type=notify service must not fork (systemd
would watch the wrong PID), so the CLI refuses ``--detach`` when
NOTIFY_SOCKET is set.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import sys

import daemon
import daemon.pidfile

from muxd.notify import Notifier

EX_SOFTWARE = 70
EX_CANTCREAT = 73
EX_INTERRUPTED = 130  # what a shell reports for a command ended by SIGINT
_READY = b"ready\n"

logger = logging.getLogger("muxd")


class DetachError(Exception):
    pass


class StartReport:
    """The daemon's end of the pipe to the waiting command; used once."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def ready(self) -> None:
        if self._send(_READY):
            self.close()

    def failed(self, status: int) -> None:
        """Report the exit status (no-op once ready was reported). The pipe is
        left to close when the process exits, so the command returns only once
        the daemon is gone and its port is free for the next attempt."""
        self._send(b"%d\n" % (status or EX_SOFTWARE))
        self._fd = None

    def _send(self, message: bytes) -> bool:
        if self._fd is None:
            return False
        try:
            os.write(self._fd, message)
        except OSError:
            pass  # the command is gone (killed): nobody to tell
        return True

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class ReportingNotifier(Notifier):
    """A Notifier that also tells the waiting command when READY=1 is sent."""

    def __init__(self, report: StartReport) -> None:
        super().__init__()
        self.report = report

    def send(self, *assignments: str) -> None:
        if "READY=1" in assignments:
            self.report.ready()
        super().send(*assignments)

    def close(self) -> None:
        # Also in a forked worker, so that only the supervisor holds the pipe.
        self.report.close()
        super().close()


def _reclaim_stale_pidfile(path: str) -> None:
    """Remove a pidfile left by a process that no longer runs; refuse a live one."""
    try:
        # O_NONBLOCK and a regular file only: a FIFO would block the open, a
        # device (/dev/zero) would never end; a PID is a few bytes.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        return
    except OSError as err:
        raise DetachError(f"cannot read pidfile {path}: {err.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DetachError(f"pidfile {path} is not a regular file")
        text = os.read(fd, 64).decode(errors="replace").strip()
    except OSError as err:
        raise DetachError(f"cannot read pidfile {path}: {err.strerror}") from None
    finally:
        os.close(fd)
    pid = int(text) if text.isascii() and text.isdigit() and len(text) <= 10 else None
    if pid is not None and pid > 0:
        try:
            os.kill(pid, 0)
        except OSError as err:
            if err.errno != errno.ESRCH:  # EPERM: it exists, owned by someone else
                raise DetachError(f"pidfile {path} names process {pid}, which is running") \
                    from None
        else:
            raise DetachError(f"pidfile {path} names process {pid}, which is running "
                              "(is muxd already started?)")
    try:
        os.unlink(path)  # stale: its process is gone (or it holds no PID at all)
    except OSError as err:
        raise DetachError(f"cannot remove stale pidfile {path}: {err.strerror}") from None


def detach(pidfile: str | None, keep_fds: list[int]) -> tuple[daemon.DaemonContext,
                                                             StartReport]:
    """Fork into the background. Returns, in the daemon only, the open context
    and the report to make once ready or failed; the command the operator ran
    waits for that report and exits with it (it never returns from here)."""
    lock = None
    if pidfile is not None:
        pidfile = os.path.abspath(pidfile)
        _reclaim_stale_pidfile(pidfile)
        lock = daemon.pidfile.TimeoutPIDLockFile(pidfile, acquire_timeout=0)
    for handler in logger.handlers:
        handler.flush()
    read_end, write_end = os.pipe()
    first = os.fork()
    if first:
        os.close(write_end)
        status = _await_start(read_end, first)
        sys.stderr.flush()
        os._exit(status)
    os.close(read_end)
    os.setsid()
    if os.fork():
        os._exit(0)  # the daemon is not a session leader: it can never get a terminal
    report = StartReport(write_end)
    context = daemon.DaemonContext(
        pidfile=lock,
        files_preserve=[*keep_fds, sys.stderr.fileno(), write_end],
        stderr=sys.stderr,
        detach_process=False,
        signal_map={},  # muxd installs its own handlers after the detach
        umask=0o022,
    )
    try:
        context.open()
    except Exception as err:  # noqa: BLE001 - lockfile raises its own types
        reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
        logger.error("cannot detach: %s%s", reason,
                     f" (pidfile {pidfile})" if pidfile is not None else "")
        report.failed(EX_CANTCREAT)
        os._exit(EX_CANTCREAT)
    return context, report


def _await_start(read_end: int, first_child: int) -> int:
    """In the command: the daemon's exit status, 0 once it is ready."""
    message = bytearray()
    try:
        os.waitpid(first_child, 0)
        while chunk := os.read(read_end, 64):
            message += chunk
    except KeyboardInterrupt:
        print("muxd: --detach: interrupted while waiting for the daemon, which may still be "
              "starting", file=sys.stderr)
        return EX_INTERRUPTED
    os.close(read_end)
    if message == _READY:
        return 0
    text = message.decode(errors="replace").strip()
    status = int(text) if text.isdigit() else EX_SOFTWARE
    how = f"exited with status {status}" if text.isdigit() else "died"
    print(f"muxd: --detach: the daemon {how} before it was ready (see the error above)",
          file=sys.stderr)
    return status
