"""[server] workers = N: a supervisor, SO_REUSEPORT workers, one voice to systemd."""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
from pathlib import Path

import pytest
from daemon_harness import (
    children,
    connect,
    connect_slow_reader,
    echo_once,
    free_port,
    push_until_stalled,
    server_config,
    wait_until,
)

from muxd.listeners import EX_UNAVAILABLE
from muxd.store_relay import split_name


def workers_config(port: int, workers: int = 2, **limits: object) -> str:
    return (server_config(port, **limits).replace("[limits]", f"workers = {workers}\n[limits]")
            + "[logging]\nconnections = yes\n")


def worker_of(daemon, sock) -> int:
    """The PID of the worker serving ``sock``, from its connection log line."""
    local_port = sock.getsockname()[1]
    pattern = re.compile(rf"muxd\[(\d+)\] INFO: worker \d+: connect 127\.0\.0\.1:{local_port} ")
    match = wait_until(lambda: pattern.search(daemon.log), what=f"connect line for {local_port}")
    return int(match.group(1))


def test_one_ready_for_all_workers_and_connections_spread(start_muxd) -> None:
    port = free_port()
    daemon = start_muxd(workers_config(port, 2))
    ready = daemon.notify.messages[-1]
    assert ready["STATUS"] == f"serving 0 connections on 127.0.0.1:{port} (epoll, 2/2 workers)"
    assert len(children(daemon.pid)) == 2
    clients = [connect(port) for _ in range(24)]
    for sock in clients:
        assert echo_once(sock, b"spread") == b"spread"
    serving = {worker_of(daemon, sock) for sock in clients}
    assert serving == children(daemon.pid), "SO_REUSEPORT should use both workers"
    daemon.notify.wait_for("STATUS", contains="serving 24 connections", timeout=5)
    assert [m for m in daemon.notify.messages if "READY" in m] == [ready], "READY sent twice"
    for sock in clients:
        sock.close()


def test_a_killed_worker_is_replaced_and_the_others_never_notice(start_muxd) -> None:
    port = free_port()
    daemon = start_muxd(workers_config(port, 2))
    clients = [connect(port) for _ in range(16)]
    for sock in clients:
        assert echo_once(sock, b"hello") == b"hello"
    by_worker: dict[int, list] = {}
    for sock in clients:
        by_worker.setdefault(worker_of(daemon, sock), []).append(sock)
    assert len(by_worker) == 2
    victim, survivor = sorted(by_worker)
    errors: list[BaseException] = []
    stop = threading.Event()

    def keep_echoing() -> None:  # load on the survivor through the kill, bounded
        try:
            for round_number in range(2000):
                if stop.is_set():
                    return
                for sock in by_worker[survivor]:
                    message = b"round %d" % round_number
                    assert echo_once(sock, message) == message
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    load = threading.Thread(target=keep_echoing)
    load.start()
    # The replacement logs the same line the victim did at start: wait for one more.
    listening = "worker 0: listening on" if victim < survivor else "worker 1: listening on"
    started_before = daemon.log.count(listening)
    os.kill(victim, signal.SIGKILL)
    daemon.wait_log(f"(pid {victim}) was killed by SIGKILL")
    replacement = wait_until(lambda: (children(daemon.pid) - {survivor, victim}) or None,
                             what="a replacement worker")
    wait_until(lambda: daemon.log.count(listening) > started_before,
               what=f"the replacement's {listening!r}")
    stop.set()
    load.join(30)
    assert not errors, f"a client of the surviving worker saw {errors[0]!r}"
    assert len(replacement) == 1 and survivor in children(daemon.pid)
    for _ in range(10):  # new connections land on either worker and are served
        with connect(port) as sock:
            assert echo_once(sock, b"new") == b"new"
    for sock in clients:
        sock.close()


def test_sigterm_stops_every_worker_and_exits_0(start_muxd) -> None:
    port = free_port()
    daemon = start_muxd(workers_config(port, 3))
    workers = children(daemon.pid)
    held = connect(port)
    assert echo_once(held, b"x") == b"x"
    daemon.signal(signal.SIGTERM)
    daemon.notify.wait_for("STOPPING", "1")
    assert daemon.wait() == 0
    assert held.recv(1) == b""
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()


def test_reload_reaches_every_worker_before_ready(start_muxd) -> None:
    port = free_port()
    daemon = start_muxd(workers_config(port, 2, idle_timeout=300))
    idle = connect(port)
    assert echo_once(idle, b"x") == b"x"
    daemon.write_config(workers_config(port, 2, idle_timeout=0.5))
    daemon.signal(signal.SIGHUP)
    daemon.notify.wait_for("RELOADING", "1")
    daemon.notify.wait_for("READY", "1")
    assert daemon.log.count("reloaded") == 2
    assert idle.recv(1) == b"", "the worker did not apply the reloaded idle_timeout"
    daemon.write_config("[server]\nworkers = lots\n")
    daemon.signal(signal.SIGHUP)
    daemon.notify.wait_for("READY", "1")
    daemon.wait_log("reload failed")
    assert len(children(daemon.pid)) == 2


def test_a_worker_that_cannot_bind_fails_the_start(start_muxd) -> None:
    port = free_port()
    start_muxd(server_config(port))  # holds the port without SO_REUSEPORT
    second = start_muxd(workers_config(port, 2), ready=False)
    status = second.wait()
    assert status == EX_UNAVAILABLE  # found before any worker is forked (check_unserved)
    assert "address already in use" in second.log


def test_workers_do_not_outlive_a_killed_supervisor(start_muxd) -> None:
    port = free_port()
    daemon = start_muxd(workers_config(port, 2))
    workers = children(daemon.pid)
    assert len(workers) == 2
    daemon.process.kill()
    daemon.process.wait(10)
    wait_until(lambda: not any(_alive(pid) for pid in workers),
               what="the orphaned workers to exit")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _owed_clients(daemon, port: int, per_worker: int) -> list[tuple]:
    """``per_worker`` clients of each worker that send without reading until the
    daemon stops taking their bytes: each is owed everything it sent."""
    payload = bytes(range(256)) * 256
    kept: dict[int, list] = {}
    for _ in range(64):  # the kernel picks the worker; bounded tries
        sock = connect_slow_reader(port)
        sock.sendall(b"")
        mine = kept.setdefault(worker_of(daemon, sock), [])
        if len(mine) < per_worker:
            mine.append(sock)
        else:
            sock.close()
        if len(kept) == 2 and all(len(socks) == per_worker for socks in kept.values()):
            break
    assert len(kept) == 2, "the kernel never chose the second worker"
    return [(sock, push_until_stalled(sock, payload))
            for socks in kept.values() for sock in socks]


def _collect(owed: list[tuple]) -> list[int]:
    """Read every client's echo concurrently until EOF; the byte counts received."""
    received = [0] * len(owed)

    def read(index: int, sock) -> None:
        sock.settimeout(30)
        expected = bytes(range(256)) * 256
        total = 0
        try:
            while chunk := sock.recv(1 << 20):
                offset = total % len(expected)
                assert chunk[:64] == (expected * 2)[offset:offset + min(64, len(chunk))]
                total += len(chunk)
        except OSError:
            pass
        received[index] = total

    threads = [threading.Thread(target=read, args=(index, sock))
               for index, (sock, _) in enumerate(owed)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return received


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_process_group_stop_drains_every_worker_like_one_process(start_muxd, signum) -> None:
    # systemd's default KillMode=control-group, a `kill -TERM -PGID` and Ctrl-C all
    # signal the supervisor AND every worker; the supervisor relays a stop of its
    # own. A worker must drain once, not take the relay as a second "close now".
    port = free_port()
    daemon = start_muxd(workers_config(port, 2, shutdown_timeout=30), preexec=os.setsid)
    owed = _owed_clients(daemon, port, 2)
    os.killpg(daemon.pid, signum)
    received = _collect(owed)
    assert daemon.wait(30) == 0
    # What the daemon read it owes back (what it had not read yet is dropped at
    # a stop, as by a single process): the client must receive all of it.
    read_by_daemon = []
    for sock, _ in owed:
        line = re.search(rf"disconnect 127\.0\.0\.1:{sock.getsockname()[1]} \(\w+\): "
                         r"(\d+) bytes in", daemon.log)
        assert line, daemon.log[-2000:]
        read_by_daemon.append(int(line.group(1)))
    assert sum(read_by_daemon) > 1 << 20, "clients should be owed megabytes"
    assert received == read_by_daemon, "echo owed at the stop was lost"
    assert "again: closing" not in daemon.log
    for sock, _ in owed:
        sock.close()


def test_reload_of_listen_is_refused_in_supervisor_and_workers_alike(start_muxd) -> None:
    port, other = free_port(), free_port()
    daemon = start_muxd(workers_config(port, 2, idle_timeout=300))
    daemon.write_config(workers_config(other, 2, idle_timeout=200))
    daemon.signal(signal.SIGHUP)
    daemon.notify.wait_for("RELOADING", "1")
    ready = daemon.notify.wait_for("READY", "1")
    assert f"127.0.0.1:{port}" in ready["STATUS"] and str(other) not in ready["STATUS"]
    daemon.wait_log("supervisor: reloading")
    assert "[server] listen changed" in daemon.log.split("supervisor: reloading")[0].split(
        "reload: ")[-1], daemon.log
    victim = sorted(children(daemon.pid))[0]
    os.kill(victim, signal.SIGKILL)
    daemon.wait_log(f"(pid {victim}) was killed by SIGKILL")
    wait_until(lambda: len(children(daemon.pid) - {victim}) == 2, what="a replacement")
    wait_until(lambda: daemon.log.count("listening on") == 3, what="the replacement listening")
    assert daemon.log.count(f"listening on 127.0.0.1:{port}") == 3, daemon.log
    with pytest.raises(ConnectionRefusedError):
        connect(other)
    for _ in range(10):
        with connect(port) as sock:
            assert echo_once(sock, b"same port") == b"same port"


def test_a_second_workers_instance_on_a_served_port_exits_69(start_muxd) -> None:
    port, udp_port = free_port(), free_port(socket.AF_INET)
    first = start_muxd(workers_config(port, 2).replace(
        "[limits]", f"udp = 127.0.0.1:{udp_port}\n[limits]"))
    for config in (workers_config(port, 2),
                   workers_config(free_port(), 2).replace(
                       "[limits]", f"udp = 127.0.0.1:{udp_port}\n[limits]")):
        second = start_muxd(config, ready=False)
        assert second.wait() == EX_UNAVAILABLE, second.log
        assert "address already in use (another muxd" in second.log
        assert "supervisor:" not in second.log, "it must not fork workers at all"
    with connect(port) as sock:
        assert echo_once(sock, b"still mine") == b"still mine"
    assert first.process.poll() is None


def test_a_stopped_worker_is_replaced_without_a_watchdog(start_muxd) -> None:
    port = free_port()
    daemon = start_muxd(workers_config(port, 2))  # no WATCHDOG_USEC from the harness
    victim = sorted(children(daemon.pid))[0]
    os.kill(victim, signal.SIGSTOP)
    served_in_a_row = 0

    def new_clients_served() -> bool:
        # The kernel keeps handing the stopped worker its share of new
        # connections until it is replaced; then every one is served.
        nonlocal served_in_a_row
        try:
            with connect(port, timeout=1) as sock:
                sock.settimeout(1)
                served = echo_once(sock, b"served") == b"served"
        except OSError:
            served = False
        served_in_a_row = served_in_a_row + 1 if served else 0
        return served_in_a_row >= 20

    try:
        wait_until(new_clients_served, timeout=20, interval=0,
                   what="20 new clients in a row served after a worker was stopped")
    finally:
        _kill_if_left(victim)
    assert f"(pid {victim}) sent no heartbeat" in daemon.log
    assert f"(pid {victim}) was killed by SIGKILL" in daemon.log


def _kill_if_left(pid: int) -> None:
    """A stopped worker the daemon failed to replace outlives it (a stopped
    process ignores its parent-death SIGTERM): the test ends it by PID."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return
    if state == "T":  # still the stopped worker, not a reused PID
        os.kill(pid, signal.SIGKILL)


def test_sighup_while_workers_drain_sends_nothing_after_stopping(start_muxd) -> None:
    port = free_port()
    daemon = start_muxd(workers_config(port, 2, shutdown_timeout=20))
    slow = connect_slow_reader(port)
    push_until_stalled(slow, os.urandom(1 << 20))
    daemon.signal(signal.SIGTERM)
    daemon.notify.wait_for("STOPPING", "1")
    daemon.signal(signal.SIGHUP)
    daemon.wait_log("SIGHUP while stopping")
    while slow.recv(1 << 20):  # now read, so the drain can finish
        pass
    assert daemon.wait() == 0
    slow.close()
    after_stop = daemon.notify.sent_after_stopping()
    assert not [m for m in after_stop if "RELOADING" in m or "READY" in m], after_stop


def test_a_worker_stopped_before_it_is_ready_does_not_hold_the_start(start_muxd) -> None:
    port = free_port()
    daemon = start_muxd(workers_config(port, 2), ready=False)
    first = wait_until(lambda: sorted(children(daemon.pid))[:1], interval=0.001,
                       what="the first worker")[0]
    os.kill(first, signal.SIGSTOP)  # within a millisecond of its fork: before READY=1
    try:
        daemon.wait_ready(timeout=20)
    finally:
        _kill_if_left(first)
    assert f"(pid {first}) sent no heartbeat" in daemon.log
    for _ in range(10):
        with connect(port, timeout=5) as sock:
            assert echo_once(sock, b"started") == b"started"


def _pids_cgroup(name: str) -> Path | None:
    """A new cgroup with the pids controller (v2 or v1), or None where none can be made."""
    for root in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/pids")):
        controllers = root / "cgroup.controllers"
        if root.name != "pids" and not (controllers.exists()
                                        and "pids" in controllers.read_text().split()):
            continue
        try:
            group = root / name
            group.mkdir()
        except OSError:
            continue
        if (group / "pids.max").exists():
            return group
        group.rmdir()
    return None


def test_a_worker_that_cannot_be_forked_is_tried_again(start_muxd) -> None:
    group = _pids_cgroup(f"muxd-test-{os.getpid()}-{free_port()}")
    if group is None:
        pytest.skip("no pids cgroup can be made here")
    try:
        (group / "pids.max").write_text("2\n")  # the supervisor and one worker

        def join_group() -> None:
            (group / "cgroup.procs").write_text(f"{os.getpid()}\n")

        port = free_port()
        daemon = start_muxd(workers_config(port, 2), ready=False, preexec=join_group)
        daemon.wait_log("cannot fork worker 1")
        assert daemon.process.poll() is None, "a failed fork must not end the supervisor"
        (group / "pids.max").write_text("max\n")
        daemon.wait_ready(timeout=15)
        with connect(port) as sock:
            assert echo_once(sock, b"both") == b"both"
        daemon.stop()
    finally:
        for pid in (group / "cgroup.procs").read_text().split():
            _kill_if_left(int(pid))
        wait_until(lambda: not (group / "cgroup.procs").read_text().strip(),
                   what="the test's cgroup to empty")
        group.rmdir()


# --- hand-over with workers: the supervisor relays each worker's store -------------
# The test plays PID 1 and its store (fake_systemd.py); a restart is the stop hook's
# SIGURG to the supervisor ($MAINPID), then SIGTERM.


def _spread_clients(daemon, port: int, per_worker: int) -> dict[int, list[socket.socket]]:
    """At least ``per_worker`` echoing clients on each of the two workers, by worker PID."""
    by_worker: dict[int, list[socket.socket]] = {}
    for index in range(64):  # the kernel picks the worker; bounded tries
        sock = connect(port)
        assert echo_once(sock, b"hello %d" % index) == b"hello %d" % index
        by_worker.setdefault(worker_of(daemon, sock), []).append(sock)
        if len(by_worker) == 2 and min(map(len, by_worker.values())) >= per_worker:
            return by_worker
    raise AssertionError("the kernel never gave each worker enough clients")


def _took_over(daemon, expected: int) -> int:
    """Connections the workers of ``daemon`` say they took over, once they add up."""
    pattern = re.compile(r"worker \d+: took over (\d+) connections")

    def total() -> int:
        return sum(int(count) for count in pattern.findall(daemon.log))

    wait_until(lambda: total() >= expected, what=f"{expected} connections taken over")
    return total()


def _kept_by_pid1(pid1, connections: int) -> bool:
    """Whether PID 1's store holds what keeps ``connections`` across a crash: one entry
    per connection (``conn``), or each worker's parking socket (``state-park-...``,
    which a connection is parked into only once the store holds it)."""
    names = [split_name(name) for name in pid1.names()]
    parking = {slot for slot, name in names if name.startswith("state-park-")}
    return sum(name == "conn" for _, name in names) == connections or parking == {0, 1}


def _all_echo(clients: list[socket.socket], message: bytes) -> None:
    for sock in clients:
        assert echo_once(sock, message) == message


def test_restart_with_workers_keeps_every_connection_and_its_pending_echo(
        pid1, start_muxd, tmp_path) -> None:
    from daemon_harness import recv_exactly
    from fake_systemd import Unit

    port = free_port()
    unit = Unit(pid1, start_muxd, workers_config(port, 2, buffer_size=65536), tmp_path)
    first = unit.daemon
    by_worker = _spread_clients(first, port, 3)
    talkers = [sock for socks in by_worker.values() for sock in socks]
    slow = connect_slow_reader(port)
    stream = os.urandom(16 << 20)
    sent = push_until_stalled(slow, stream)  # its worker holds pending echo, paused
    assert sent < len(stream)  # checked against stream[:sent]: a wrapped send would not match

    second = unit.restart()
    assert "every worker handed over" in first.log
    assert _took_over(second, len(talkers) + 1) == len(talkers) + 1
    assert "KiB of pending echo" in second.log
    _all_echo(talkers, b"after")
    slow.settimeout(10)
    assert recv_exactly(slow, sent) == stream[:sent]
    with connect(port) as fresh:  # the kept listeners serve new clients
        assert echo_once(fresh, b"new") == b"new"

    third = unit.restart()  # and again, from the workers that took over
    assert _took_over(third, len(talkers) + 1) == len(talkers) + 1
    _all_echo([*talkers, slow], b"again")
    assert not any(name.endswith("state-" + str(third.pid)) for name in pid1.names())
    for sock in (*talkers, slow):
        sock.close()


def test_a_killed_worker_s_replacement_takes_over_its_connections(
        pid1, start_muxd, tmp_path) -> None:
    from fake_systemd import Unit

    port = free_port()
    unit = Unit(pid1, start_muxd, workers_config(port, 2), tmp_path)
    daemon = unit.daemon
    by_worker = _spread_clients(daemon, port, 3)
    victim, survivor = sorted(by_worker)
    os.kill(victim, signal.SIGKILL)
    daemon.wait_log(f"(pid {victim}) was killed by SIGKILL; replacing it")
    daemon.wait_log(f"took over {len(by_worker[victim])} connections and 1 listeners "
                    "without hand-over state")
    _all_echo(by_worker[victim], b"to the replacement")
    _all_echo(by_worker[survivor], b"never noticed")
    (replacement,) = children(daemon.pid) - {survivor}
    assert re.search(rf"muxd\[{replacement}\] INFO: worker \d+: took over "
                     f"{len(by_worker[victim])} connections", daemon.log)
    for socks in by_worker.values():
        for sock in socks:
            sock.close()


def test_a_killed_supervisor_leaves_every_connection_to_the_next_one(
        pid1, start_muxd, tmp_path) -> None:
    from fake_systemd import Unit

    port = free_port()
    unit = Unit(pid1, start_muxd, workers_config(port, 2), tmp_path)
    first = unit.daemon
    by_worker = _spread_clients(first, port, 3)
    clients = [sock for socks in by_worker.values() for sock in socks]
    # A kill leaves no time to pass anything on: wait until the store has them all.
    wait_until(lambda: _kept_by_pid1(pid1, len(clients)), what="every connection kept")
    workers = children(first.pid)
    second = unit.crash()  # kill -9 of the supervisor, then systemd's Restart=
    wait_until(lambda: not any(_alive(pid) for pid in workers),
               what="the old workers to die with their supervisor")
    assert _took_over(second, len(clients)) == len(clients)
    _all_echo(clients, b"after the crash")
    for sock in clients:
        sock.close()


def test_sigterm_without_the_stop_hook_stops_workers_gracefully_with_hand_over_on(
        pid1, start_muxd, tmp_path) -> None:
    from fake_systemd import Unit

    port = free_port()
    unit = Unit(pid1, start_muxd, workers_config(port, 2), tmp_path)
    by_worker = _spread_clients(unit.daemon, port, 2)
    clients = [sock for socks in by_worker.values() for sock in socks]
    wait_until(lambda: _kept_by_pid1(pid1, len(clients)), what="every connection kept")
    unit.daemon.signal(signal.SIGTERM)
    assert unit.daemon.wait() == 0
    assert "handing over" not in unit.daemon.log
    for sock in clients:
        sock.settimeout(5)
        assert sock.recv(10) == b""
    wait_until(lambda: pid1.names() == [], what="an empty store after a stop")
    for sock in clients:
        sock.close()


def test_connections_follow_a_change_of_workers_across_restarts(
        pid1, start_muxd, tmp_path) -> None:
    """3 workers -> 2 (worker 2's go to worker 0) -> 1 (a single muxd takes every
    worker's) -> 2 (the single muxd's go to worker 0; its listener, bound without
    SO_REUSEPORT, is shared with worker 1's): every connection echoes after each."""
    from fake_systemd import Unit

    port = free_port()
    unit = Unit(pid1, start_muxd, workers_config(port, 3), tmp_path)
    clients = [connect(port) for _ in range(12)]
    _all_echo(clients, b"hello")
    serving = {worker_of(unit.daemon, sock) for sock in clients}
    for workers in (2, 1, 2):
        unit.config_path.write_text(workers_config(port, workers))
        new = unit.restart()
        if workers == 1:
            new.wait_log(f"took over {len(clients)} connections")
        else:
            assert _took_over(new, len(clients)) == len(clients)
        _all_echo(clients, b"with %d workers" % workers)
        with connect(port) as fresh:
            assert echo_once(fresh, b"new") == b"new"
    assert len(serving) >= 2
    # Both workers serve new clients: worker 1 joined the single muxd's listener.
    fresh = [connect(port) for _ in range(24)]
    _all_echo(fresh, b"spread")
    assert len({worker_of(unit.daemon, sock) for sock in fresh}) == 2
    for sock in (*clients, *fresh):
        sock.close()
