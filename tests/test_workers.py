"""[server] workers = N: a supervisor, SO_REUSEPORT workers, one voice to systemd."""

from __future__ import annotations

import os
import re
import signal
import threading
from pathlib import Path

from daemon_harness import connect, echo_once, free_port, server_config, wait_until

from muxd.config import EX_CONFIG


def workers_config(port: int, workers: int = 2, **limits: object) -> str:
    return (server_config(port, **limits).replace("[limits]", f"workers = {workers}\n[limits]")
            + "[logging]\nconnections = yes\n")


def children(pid: int) -> set[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(child) for child in path.read_text().split()} if path.exists() else set()


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
    os.kill(victim, signal.SIGKILL)
    daemon.wait_log(f"(pid {victim}) was killed by SIGKILL")
    replacement = wait_until(lambda: (children(daemon.pid) - {survivor, victim}) or None,
                             what="a replacement worker")
    daemon.wait_log("worker 0: listening on" if victim < survivor else "worker 1: listening on")
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
    assert status not in (0, EX_CONFIG)
    assert "address already in use" in second.log
    assert "before it was ready" in second.log
