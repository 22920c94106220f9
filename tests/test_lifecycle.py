"""Start, readiness, signals, reload, shutdown: the daemon as systemd sees it."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
from daemon_harness import (
    connect,
    connect_slow_reader,
    echo_once,
    free_port,
    push_until_stalled,
    read_counters,
    recv_exactly,
    sees_connection_end,
    server_config,
    socket_activation,
    wait_until,
)

from muxd.config import EX_CONFIG


def test_ready_only_once_listening_and_status_says_what_it_serves(start_muxd, backend) -> None:
    port = free_port()
    daemon = start_muxd(server_config(port, backend), ready=False)
    ready = daemon.wait_ready()
    with connect(port) as sock:  # no retry: READY=1 promises a listening socket
        assert echo_once(sock, b"hello\n") == b"hello\n"
    assert ready["STATUS"] == f"serving 0 connections on 127.0.0.1:{port} ({backend})"


def test_status_follows_the_connection_count(start_muxd) -> None:
    port = free_port()
    daemon = start_muxd(server_config(port))
    clients = [connect(port) for _ in range(2)]
    for sock in clients:
        assert echo_once(sock, b"x") == b"x"
    daemon.notify.wait_for("STATUS", contains="serving 2 connections", timeout=5)
    for sock in clients:
        sock.close()
    daemon.notify.wait_for("STATUS", contains="serving 0 connections", timeout=5)


def test_sigterm_sends_stopping_closes_every_client_and_exits_0(start_muxd, backend) -> None:
    port = free_port()
    daemon = start_muxd(server_config(port, backend))
    clients = [connect(port) for _ in range(5)]
    for sock in clients:
        assert echo_once(sock, b"x") == b"x"
    daemon.signal(signal.SIGTERM)
    daemon.notify.wait_for("STOPPING", "1")
    assert daemon.wait() == 0
    for sock in clients:
        assert sees_connection_end(sock, timeout=2)
        sock.close()
    with pytest.raises(ConnectionRefusedError):
        connect(port)


def test_shutdown_flushes_pending_echo_to_a_slow_reader(start_muxd) -> None:
    port = free_port()
    daemon = start_muxd(server_config(port, shutdown_timeout=20))
    slow = connect_slow_reader(port)
    payload = os.urandom(64 << 20)  # more than the kernel's buffers and ours can hold
    sent = push_until_stalled(slow, payload)
    assert sent < len(payload)
    daemon.signal(signal.SIGTERM)
    message = daemon.notify.wait_for("EXTEND_TIMEOUT_USEC")
    assert int(message["EXTEND_TIMEOUT_USEC"]) >= 20_000_000
    received = bytearray()
    while True:  # now read: everything the daemon had taken must still arrive
        chunk = slow.recv(1 << 20)
        if not chunk:
            break
        received += chunk
    assert len(received) > 0
    assert bytes(received) == payload[:len(received)]
    assert daemon.wait() == 0
    slow.close()


def test_sighup_while_draining_sends_nothing_after_stopping(start_muxd) -> None:
    # STOPPING=1 is final: a RELOADING=1 / READY=1 after it would tell systemd the
    # service is up again while it drains to exit (issue 9, item 11).
    port = free_port()
    daemon = start_muxd(server_config(port, shutdown_timeout=20))
    slow = connect_slow_reader(port)
    push_until_stalled(slow, os.urandom(1 << 20))
    daemon.signal(signal.SIGTERM)
    daemon.notify.wait_for("EXTEND_TIMEOUT_USEC")  # draining: echo still owed
    daemon.signal(signal.SIGHUP)
    read_counters(daemon)  # SIGUSR1 is handled after the SIGHUP sent before it
    while slow.recv(1 << 20):  # now read, so the drain can finish
        pass
    assert daemon.wait() == 0
    slow.close()
    after_stop = daemon.notify.sent_after_stopping()
    assert not [m for m in after_stop if "RELOADING" in m or "READY" in m], after_stop
    assert "SIGHUP while stopping: not reloading" in daemon.log


def test_shutdown_timeout_closes_a_reader_that_never_reads(start_muxd) -> None:
    port = free_port()
    daemon = start_muxd(server_config(port, shutdown_timeout=0.5))
    hog = connect_slow_reader(port)
    push_until_stalled(hog, b"\0" * 65536)
    started = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    assert time.monotonic() - started < 5
    daemon.wait_log("[limits] shutdown_timeout (0.5s) reached")
    hog.close()


def test_reload_applies_idle_timeout_to_open_connections(start_muxd) -> None:
    port = free_port()
    daemon = start_muxd(server_config(port, idle_timeout=300))
    idle = connect(port)
    assert echo_once(idle, b"x") == b"x"
    daemon.write_config(server_config(port, idle_timeout=0.5) + "[logging]\nconnections = yes\n")
    daemon.signal(signal.SIGHUP)
    reloading = daemon.notify.wait_for("RELOADING", "1")
    assert int(reloading["MONOTONIC_USEC"]) > 0
    daemon.notify.wait_for("READY", "1")
    assert sees_connection_end(idle, timeout=5), "reloaded idle_timeout was not applied"
    # In the file's words, not the code's (idle_timeout, log_connections).
    daemon.wait_log(f"reloaded {daemon.config_path}: [limits] idle_timeout, [logging] connections "
                    "changed")
    idle.close()


def test_bad_reload_keeps_running_with_the_old_config(start_muxd) -> None:
    port = free_port()
    daemon = start_muxd(server_config(port))
    kept = connect(port)
    daemon.write_config("[limits]\nmax_conections = 5\n")
    daemon.signal(signal.SIGHUP)
    daemon.notify.wait_for("RELOADING", "1")
    daemon.notify.wait_for("READY", "1")
    daemon.wait_log("reload failed, keeping the running configuration")
    assert "max_conections" in daemon.log
    assert daemon.process.poll() is None
    assert echo_once(kept, b"alive") == b"alive"
    with connect(port) as fresh:
        assert echo_once(fresh, b"new") == b"new"
    kept.close()


def test_reload_of_listen_says_restart_needed(start_muxd) -> None:
    port = free_port()
    daemon = start_muxd(server_config(port))
    daemon.write_config(server_config(free_port()))
    daemon.signal(signal.SIGHUP)
    daemon.notify.wait_for("READY", "1")
    daemon.wait_log(f"reload: [server] listen changed in {daemon.config_path}; that takes effect "
                    "only after a restart")
    # The summary line says so too, instead of "nothing changed".
    daemon.wait_log(f"reloaded {daemon.config_path}: nothing applied now; [server] listen "
                    "changed and takes effect only after a restart")
    assert "nothing changed" not in daemon.log
    with connect(port) as sock:
        assert echo_once(sock, b"same port") == b"same port"


def test_immediate_restart_on_the_same_port(start_muxd) -> None:
    port = free_port()
    first = start_muxd(server_config(port))
    for _ in range(20):  # server-side closes leave TIME_WAIT behind
        with connect(port) as sock:
            assert echo_once(sock, b"x") == b"x"
    held = connect(port)
    assert first.stop() == 0
    held.close()
    second = start_muxd(server_config(port))
    with connect(port) as sock:
        assert echo_once(sock, b"again") == b"again"
    assert second.process.poll() is None


def test_port_in_use_is_not_a_config_error(start_muxd) -> None:
    port = free_port()
    start_muxd(server_config(port))
    second = start_muxd(server_config(port), ready=False)
    status = second.wait()
    assert status not in (0, EX_CONFIG)
    assert f"127.0.0.1:{port}" in second.log and "address already in use" in second.log
    assert "Traceback" not in second.log


@pytest.mark.skipif(not shutil.which("setpriv"), reason="needs util-linux setpriv")
def test_privileged_port_without_permission_explains_the_fix(start_muxd, tmp_path) -> None:
    config = tmp_path / "port7.ini"
    config.write_text(server_config(7))
    # Take CAP_NET_BIND_SERVICE away (even from root) the way an unprivileged unit would.
    command = ["setpriv", "--bounding-set=-net_bind_service", "--inh-caps=-net_bind_service",
               sys.executable, "-m", "muxd", "--config", str(config)]
    daemon = start_muxd(None, ready=False, command=command)
    status = daemon.wait()
    assert status not in (0, EX_CONFIG)
    assert "127.0.0.1:7" in daemon.log and "permission denied" in daemon.log
    assert "CAP_NET_BIND_SERVICE" in daemon.log
    assert "Traceback" not in daemon.log


def test_raises_soft_nofile_from_systemds_1024(start_muxd) -> None:
    port = free_port()
    daemon = start_muxd(server_config(port, nofile=4096), nofile=(1024, 8192))
    limits = Path(f"/proc/{daemon.pid}/limits").read_text()
    line = next(line for line in limits.splitlines() if line.startswith("Max open files"))
    assert line.split()[3:5] == ["4096", "8192"], line
    daemon.wait_log("RLIMIT_NOFILE: 4096")


def test_nofile_above_hard_limit_is_capped_with_a_warning(start_muxd) -> None:
    port = free_port()
    daemon = start_muxd(server_config(port, nofile=65536), nofile=(1024, 2048),
                        env={"INVOCATION_ID": ""})
    limits = Path(f"/proc/{daemon.pid}/limits").read_text()
    line = next(line for line in limits.splitlines() if line.startswith("Max open files"))
    assert line.split()[3:5] == ["2048", "2048"], line
    daemon.wait_log("RLIMIT_NOFILE: [limits] nofile asks for 65536 open files but the hard limit "
                    "is 2048, which muxd cannot raise: it is the hard limit of whatever started "
                    "muxd (ulimit -Hn")
    daemon.wait_log("; serving with at most 2048")


@pytest.mark.parametrize("started_with", [(2048, 2048), (1024, 2048)])
def test_nofile_warning_under_systemd_says_where_the_hard_limit_comes_from(
        start_muxd, started_with) -> None:
    # systemd's LimitNOFILE=N sets soft and hard to N, lowered to systemd's own hard limit
    # when that is lower (a container, PAM): advising LimitNOFILE= then is no help. Its
    # default (no LimitNOFILE=) leaves the soft limit at 1024, below the hard one.
    port = free_port()
    daemon = start_muxd(server_config(port, nofile=65536), nofile=started_with,
                        env={"INVOCATION_ID": "0123456789abcdef0123456789abcdef"})
    daemon.wait_log("; serving with at most 2048")
    unit_sets_it = "the unit's LimitNOFILE= set it, to its own value or, if that is higher, to " \
        "systemd's own hard limit (in a container, or set by PAM)"
    unit_lacks_it = "the unit sets no LimitNOFILE="
    if started_with[0] == started_with[1]:
        assert unit_sets_it in daemon.log and unit_lacks_it not in daemon.log, daemon.log
    else:
        assert unit_lacks_it in daemon.log and unit_sets_it not in daemon.log, daemon.log


def test_never_lowers_a_higher_soft_limit(start_muxd) -> None:
    port = free_port()
    daemon = start_muxd(server_config(port, nofile=100), nofile=(3000, 4000))
    daemon.wait_log("RLIMIT_NOFILE: 3000")


def test_watchdog_pings_at_half_the_interval_until_the_loop_hangs(start_muxd) -> None:
    port = free_port()
    daemon = start_muxd(server_config(port), env={
        "WATCHDOG_USEC": "400000", "MUXD_TEST_HOOKS": "hang-on-sigusr2"})
    started = time.monotonic()
    for _ in range(4):
        daemon.notify.wait_for("WATCHDOG", "1", timeout=2)
    elapsed = time.monotonic() - started
    assert 0.45 < elapsed < 2.5, f"4 pings took {elapsed:.2f}s at a 0.2s interval"
    daemon.signal(signal.SIGUSR2)
    daemon.wait_log("test hook")
    daemon.notify.messages.clear()
    with pytest.raises(AssertionError):
        daemon.notify.wait_for("WATCHDOG", "1", timeout=1.2)


def test_no_watchdog_pings_without_watchdog_usec_and_hook_is_off(start_muxd) -> None:
    port = free_port()
    daemon = start_muxd(server_config(port, idle_timeout=0))
    with pytest.raises(AssertionError):
        daemon.notify.wait_for("WATCHDOG", "1", timeout=0.6)
    daemon.signal(signal.SIGUSR2)  # the hang hook is off: still serving
    with connect(port) as sock:
        assert echo_once(sock, b"up") == b"up"


@pytest.mark.parametrize("usec", ["0", "-400000"])
def test_a_zero_or_negative_watchdog_usec_means_no_watchdog(start_muxd, usec) -> None:
    # sd_watchdog_enabled(3): not a positive number, no watchdog. A ping every 0 s
    # would be a timer due at once, for ever: the loop would never serve again.
    port = free_port()
    daemon = start_muxd(server_config(port), env={"WATCHDOG_USEC": usec})
    with connect(port, timeout=2) as sock:
        assert echo_once(sock, b"up") == b"up"
    assert not [m for m in daemon.notify.messages if "WATCHDOG" in m]
    started = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(timeout=5) == 0
    assert time.monotonic() - started < 2, "SIGTERM took too long to be handled"


def test_socket_activation_uses_the_inherited_listener(start_muxd, tmp_path) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))  # queued before muxd exists
    client.sendall(b"early bird")
    config_port = free_port()

    config = tmp_path / "activated.ini"
    config.write_text(server_config(config_port))
    daemon = start_muxd(None, **socket_activation(config, listener, names=("echo",)))
    ready = daemon.notify.messages[-1]
    assert f"127.0.0.1:{port}" in ready["STATUS"]
    assert str(config_port) not in ready["STATUS"]
    assert recv_exactly(client, 10) == b"early bird"
    listener.close()  # muxd holds its own copy
    with connect(port) as sock:
        assert echo_once(sock, b"activated") == b"activated"
    with pytest.raises(ConnectionRefusedError):
        connect(config_port)
    assert daemon.stop() == 0
    assert "socket activation" in daemon.log and "(echo)" in daemon.log
    client.close()


def test_journal_stream_gets_priority_prefixes(start_muxd, tmp_path) -> None:
    port = free_port()
    read_end, write_end = os.pipe()
    status = os.fstat(write_end)
    env = {"JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"}

    def stderr_to_pipe() -> None:
        os.dup2(write_end, 2)

    daemon = start_muxd(server_config(port, nofile=65536), env=env, preexec=stderr_to_pipe,
                        nofile=(1024, 2048))
    os.close(write_end)
    daemon.stop()
    with os.fdopen(read_end, errors="replace") as pipe:
        lines = pipe.read().splitlines()
    assert lines, "nothing logged"
    assert all(re.match(r"<[0-7]>", line) for line in lines), lines
    assert any(line.startswith("<6>") and "listening on" in line for line in lines)
    assert any(line.startswith("<4>") and "RLIMIT_NOFILE" in line for line in lines)
    assert not any(re.search(r"\d\d:\d\d:\d\d", line) for line in lines), "journald stamps time"


def test_log_connections_names_peer_and_bytes(start_muxd) -> None:
    port = free_port()
    daemon = start_muxd(server_config(port) + "[logging]\nconnections = yes\n")
    with connect(port) as sock:
        local_port = sock.getsockname()[1]
        assert echo_once(sock, b"12345") == b"12345"
    wait_until(lambda: "disconnect" in daemon.log, what="disconnect line")
    assert f"connect 127.0.0.1:{local_port}" in daemon.log
    assert f"disconnect 127.0.0.1:{local_port} (eof): 5 bytes in, 5 echoed" in daemon.log


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_and_sigusr1_during_start_up_are_handled_not_fatal(start_muxd, tmp_path,
                                                                  workers) -> None:
    # An operator's script may reload or ask for counters the moment it has
    # started muxd. `python -v` reports each import as it happens, so the
    # signals can be sent while muxd is still importing its own modules, the
    # window in which their default action used to kill it.
    port = free_port()
    config = tmp_path / "early.ini"
    config.write_text(server_config(port).replace("[limits]", f"workers = {workers}\n[limits]"))
    daemon = start_muxd(None, ready=False, command=[sys.executable, "-v", "-m", "muxd",
                                                     "--config", str(config)])
    cli_import = re.compile(r"muxd/(__pycache__/)?cli[.]")
    wait_until(lambda: cli_import.search(daemon.log), what="muxd importing its CLI")
    daemon.signal(signal.SIGHUP)
    daemon.signal(signal.SIGUSR1)
    daemon.wait_ready()
    daemon.wait_log("counters:")
    daemon.notify.wait_for("RELOADING", "1")
    daemon.notify.wait_for("READY", "1")
    assert daemon.process.poll() is None
    with connect(port) as sock:
        assert echo_once(sock, b"alive") == b"alive"


def test_sighup_while_exiting_after_a_stop_does_not_kill_it(start_muxd) -> None:
    # From the end of the loop to the exit, the handlers are gone: a SIGHUP
    # (an operator's reload racing a stop) used to kill the process by
    # signal instead of letting it exit 0.
    port = free_port()
    daemon = start_muxd(server_config(port))
    daemon.signal(signal.SIGTERM)
    daemon.notify.wait_for("STOPPING", "1")
    sent = 0
    while daemon.process.poll() is None and sent < 200_000:
        try:
            os.kill(daemon.pid, signal.SIGHUP)
        except ProcessLookupError:
            break
        sent += 1
    assert daemon.wait() == 0
