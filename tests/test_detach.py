"""--detach --pidfile: the daemon for hosts without systemd (python-daemon)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_harness import connect, echo_once, free_port, server_config, wait_until


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def detached(tmp_path: Path) -> Iterator[dict]:
    """Runs muxd --detach; kills what it started (by the PID in its pidfile) afterwards."""
    pids: list[int] = []

    def start(port: int, pidfile: Path) -> subprocess.CompletedProcess[str]:
        config = tmp_path / f"detach-{port}.ini"
        config.write_text(server_config(port))
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        log = tmp_path / f"detach-{port}.log"
        # The daemon keeps stderr as its log, so a pipe would never see EOF: use a file.
        with open(log, "w") as stderr:
            result = subprocess.run(
                [sys.executable, "-m", "muxd", "--detach", "--pidfile", str(pidfile),
                 "--config", str(config)],
                stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=20, env=env,
                stdin=subprocess.DEVNULL,
            )
        result.stderr = log.read_text()
        if result.returncode == 0:
            pids.append(int(wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(),
                                       what="the pidfile")))
        return result

    yield {"start": start, "pids": pids}
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_detach_writes_pidfile_serves_and_sigterm_removes_it(detached, tmp_path) -> None:
    port = free_port()
    pidfile = tmp_path / "muxd.pid"
    result = detached["start"](port, pidfile)
    assert result.returncode == 0, result.stderr
    pid = detached["pids"][0]
    assert pid != os.getpid() and _alive(pid)
    with connect(port) as sock:  # listening before the parent exited
        assert echo_once(sock, b"detached") == b"detached"
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not pidfile.exists(), what="the pidfile to be removed")
    wait_until(lambda: not _alive(pid) or "zombie" in _state(pid), what="the daemon to exit")


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return "zombie"


def test_stale_pidfile_is_reclaimed(detached, tmp_path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    pidfile = tmp_path / "muxd.pid"
    pidfile.write_text(f"{gone.pid}\n")
    port = free_port()
    result = detached["start"](port, pidfile)
    assert result.returncode == 0, result.stderr
    assert detached["pids"][0] != gone.pid
    with connect(port) as sock:
        assert echo_once(sock, b"x") == b"x"


def test_live_pidfile_makes_second_start_fail_clearly(detached, tmp_path) -> None:
    pidfile = tmp_path / "muxd.pid"
    assert detached["start"](free_port(), pidfile).returncode == 0
    second = detached["start"](free_port(), pidfile)
    assert second.returncode != 0
    assert "which is running" in second.stderr and str(pidfile) in second.stderr
    assert _alive(detached["pids"][0])


def test_detach_is_refused_under_systemd(tmp_path) -> None:
    config = tmp_path / "c.ini"
    config.write_text(server_config(free_port()))
    result = subprocess.run(
        [sys.executable, "-m", "muxd", "--detach", "--config", str(config)],
        capture_output=True, text=True, timeout=20,
        env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")},
    )
    assert result.returncode != 0
    assert "must not fork" in result.stderr


def _run_detached(tmp_path: Path, *args: str, cwd: Path | None = None
                  ) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    log = tmp_path / f"detach-{len(list(tmp_path.iterdir()))}.log"
    with open(log, "w") as stderr:
        result = subprocess.run([sys.executable, "-m", "muxd", "--detach", *args],
                                stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=30,
                                env=env, stdin=subprocess.DEVNULL, cwd=cwd)
    result.stderr = log.read_text()
    return result


@pytest.mark.parametrize("where", ["missing directory", "read-only filesystem"])
def test_a_pidfile_that_cannot_be_written_fails_the_command(tmp_path, where) -> None:
    pidfile = {"missing directory": str(tmp_path / "no-such-dir" / "muxd.pid"),
               "read-only filesystem": "/sys/muxd-test.pid"}[where]
    port = free_port()
    config = tmp_path / "c.ini"
    config.write_text(server_config(port))
    result = _run_detached(tmp_path, "--pidfile", pidfile, "--config", str(config))
    assert result.returncode == 73, result.stderr  # EX_CANTCREAT, as README says
    assert "cannot detach" in result.stderr and pidfile in result.stderr, result.stderr
    assert "before it was ready" in result.stderr
    with pytest.raises(ConnectionRefusedError):  # and nothing is left serving
        connect(port).close()


def test_workers_that_cannot_start_fail_the_command(tmp_path, start_muxd) -> None:
    port = free_port()
    start_muxd(server_config(port))  # holds the port
    config = tmp_path / "w.ini"
    config.write_text(server_config(port).replace("[limits]", "workers = 2\n[limits]"))
    result = _run_detached(tmp_path, "--config", str(config))
    assert result.returncode == 69, result.stderr
    assert "address already in use" in result.stderr


def test_a_relative_config_path_still_reloads_after_detaching(tmp_path) -> None:
    port = free_port()
    (tmp_path / "rel.ini").write_text(server_config(port))
    pidfile = tmp_path / "rel.pid"
    result = _run_detached(tmp_path, "--pidfile", "rel.pid", "--config", "rel.ini",
                           cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    pid = int(pidfile.read_text())
    try:
        with connect(port) as sock:  # ready before the command returned
            assert echo_once(sock, b"x") == b"x"
        log = next(tmp_path.glob("detach-*.log"))
        (tmp_path / "rel.ini").write_text(server_config(port, idle_timeout=5))
        os.kill(pid, signal.SIGHUP)
        wait_until(lambda: "reloaded" in log.read_text() or "reload failed" in log.read_text(),
                   what="the reload to be logged")
        assert "reload failed" not in log.read_text(), log.read_text()
        assert f"reloaded {tmp_path / 'rel.ini'}: [limits] idle_timeout changed" in log.read_text()
    finally:
        os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("kind", ["/dev/zero", "fifo", "directory"])
def test_a_pidfile_path_that_is_no_regular_file_is_refused_at_once(tmp_path, kind) -> None:
    pidfile = {"/dev/zero": "/dev/zero", "fifo": str(tmp_path / "pid.fifo"),
               "directory": str(tmp_path)}[kind]
    if kind == "fifo":
        os.mkfifo(pidfile)
    config = tmp_path / "c.ini"
    config.write_text(server_config(free_port()))
    result = _run_detached(tmp_path, "--pidfile", pidfile, "--config", str(config))
    assert result.returncode == 73, result.stderr
    assert f"pidfile {pidfile}" in result.stderr and "Traceback" not in result.stderr, \
        result.stderr
