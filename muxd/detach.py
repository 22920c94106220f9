"""Detached mode for hosts without systemd, through ``python-daemon``.

DaemonContext closes every descriptor it is not told to keep, so the
listeners and the log's stderr go in ``files_preserve``; the poller, signal
socketpair and notifier are created only after the detach. Under systemd a
Type=notify service must not fork (systemd would watch the wrong PID), so the
CLI refuses ``--detach`` when NOTIFY_SOCKET is set.
"""

from __future__ import annotations

import errno
import os
import sys

import daemon
import daemon.pidfile


class DetachError(Exception):
    pass


def _reclaim_stale_pidfile(path: str) -> None:
    """Remove a pidfile left by a process that no longer runs; refuse a live one."""
    try:
        with open(path) as file:
            text = file.read().strip()
    except FileNotFoundError:
        return
    except OSError as err:
        raise DetachError(f"cannot read pidfile {path}: {err.strerror}") from None
    try:
        pid = int(text)
    except ValueError:
        pid = None
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
    os.unlink(path)  # stale: its process is gone (or it holds no PID at all)


def detach(pidfile: str | None, keep_fds: list[int]) -> daemon.DaemonContext:
    """Fork into the background; returns the open context (the caller is the child)."""
    lock = None
    if pidfile is not None:
        pidfile = os.path.abspath(pidfile)
        _reclaim_stale_pidfile(pidfile)
        lock = daemon.pidfile.TimeoutPIDLockFile(pidfile, acquire_timeout=0)
    context = daemon.DaemonContext(
        pidfile=lock,
        files_preserve=[*keep_fds, sys.stderr.fileno()],
        stderr=sys.stderr,
        detach_process=True,
        signal_map={},  # muxd installs its own handlers after the detach
        umask=0o022,
    )
    try:
        context.open()
    except Exception as err:  # lockfile raises its own types on a lost race
        raise DetachError(f"cannot detach: {err}") from None
    return context
