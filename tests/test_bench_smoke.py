"""Smoke test of the benchmark runner: it builds, runs a tiny scenario and reports.

Benchmarks are not timed tests: nothing here asserts a speed, only that the runner
works end to end and that the load client really verified echoed bytes.
"""

import array
import json
import os
import select
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def _run_bench_module(*args: str, timeout: float) -> str:
    """Runs ``python -m <args>`` from the checkout; returns its stdout, failing on an error."""
    completed = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    out = tmp_path_factory.mktemp("bench-out")
    stdout = _run_bench_module(
        "bench", "--quick", "--scenario", "c10-1k",
        "--servers", "asyncio-protocol,python-floor,muxd", "--duration", "0.5", "--reps", "1",
        "--no-plots", "--out", str(out),
        timeout=120,
    )  # fmt: skip
    return stdout, json.loads((out / "results.json").read_text())


def _only_sample(results: dict[str, Any], server: str) -> dict[str, Any]:
    (sample,) = results["scenarios"]["c10-1k"]["samples"][server]
    return sample


def test_prints_a_table_with_a_ratio_column(quick_run: tuple[str, dict[str, Any]]) -> None:
    stdout, _ = quick_run
    assert "vs muxd" in stdout
    assert "asyncio-protocol" in stdout


@pytest.mark.parametrize("peer", ["asyncio-protocol", "python-floor"])
def test_peer_echo_was_verified(quick_run: tuple[str, dict[str, Any]], peer: str) -> None:
    _, results = quick_run
    sample = _only_sample(results, peer)
    assert sample["error"] is None
    assert sample["verified_bytes"] > 0
    assert sample["msgs"] > 0


def test_muxd_echo_was_verified_and_ratio_computed(
    quick_run: tuple[str, dict[str, Any]],
) -> None:
    stdout, results = quick_run
    sample = _only_sample(results, "muxd")
    assert sample["error"] is None
    assert sample["verified_bytes"] > 0
    assert "1.00x" in stdout  # muxd against itself: the ratio column is populated


def test_user_time_is_a_part_of_server_cpu(quick_run: tuple[str, dict[str, Any]]) -> None:
    stdout, results = quick_run
    sample = _only_sample(results, "muxd")
    assert 0 <= sample["server_user_us_per_msg"] <= sample["server_cpu_us_per_msg"]
    assert "user us/msg" in stdout


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind not installed")
def test_callgrind_counts_instructions_per_message(tmp_path: Path) -> None:
    stdout = _run_bench_module(
        "bench.callgrind", "--servers", "python-floor", "--seconds", "0.5", "--out", str(tmp_path),
        timeout=300,
    )
    row = next(line for line in stdout.splitlines() if line.startswith("python-floor"))
    _name, messages, per_message, _ratio = row.split()
    assert int(messages.replace(",", "")) > 0
    # The floor's loop is a few hundred bytecodes' worth of C per message, never zero.
    assert 500 < float(per_message.replace(",", "")) < 100_000


# --- connection churn, the stand-in PID 1 store, and the restart cost -------------


@pytest.fixture(scope="module")
def churn_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    out = tmp_path_factory.mktemp("bench-churn")
    stdout = _run_bench_module(
        "bench", "--scenario", "churn-c10", "--servers", "muxd,muxd-handover,c-epoll",
        "--reps", "1", "--duration", "0.5", "--warmup", "0.2", "--no-plots", "--out", str(out),
        timeout=120,
    )  # fmt: skip
    return stdout, json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("server", ["muxd", "muxd-handover", "c-epoll"])
def test_churn_verifies_every_byte_of_every_connection(
    churn_run: tuple[str, dict[str, Any]], server: str
) -> None:
    _, results = churn_run
    (sample,) = results["scenarios"]["churn-c10"]["samples"][server]
    assert sample["error"] is None
    assert sample["churn"] == 1 and sample["msgs"] > 0
    # Every connection started was completed, and each one's echo was checked in full.
    assert sample["churn_started"] == sample["churn_completed"] > sample["msgs"] > 0
    assert sample["verified_bytes"] == sample["churn_completed"] * sample["size"]


def test_churn_with_handover_stores_connections_and_takes_them_out(
    churn_run: tuple[str, dict[str, Any]],
) -> None:
    stdout, results = churn_run
    (sample,) = results["scenarios"]["churn-c10"]["samples"]["muxd-handover"]
    store = sample["store"]
    assert store["received"] > 0  # hand-over was on
    # The store got the listener and a few parking sockets, never one entry per
    # connection (muxd/parking.py), and at the stop everything left it.
    assert store["received_by_name"].get("conn", 0) == 0
    assert store["received"] < sample["churn_completed"] / 10
    assert store["held"] == 0
    assert sample["helper_cpu_us_per_msg"] >= 0  # the store's CPU, apart from muxd's
    assert "conn/s" in stdout and "store us/conn" in stdout


def _store_message(path: str, text: str, fds: list[int]) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        sender.sendmsg([text.encode()], rights, 0, path)


def test_fake_store_keeps_until_hangup_removes_by_name_and_answers_barriers(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "notify")
    store = subprocess.Popen(
        [sys.executable, "-m", "bench.fakestore", "--socket", path, "--store-max", "3"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert store.stdout is not None and store.stdout.readline().strip() == "READY"
        kept, kept_peer = socket.socketpair()
        hung_up, hung_up_peer = socket.socketpair()
        state = os.memfd_create("state")
        _store_message(path, "FDSTORE=1\nFDNAME=conn", [kept.fileno(), hung_up.fileno()])
        _store_message(path, "FDSTORE=1\nFDNAME=state-1", [state])
        _store_message(path, "FDSTORE=1\nFDNAME=conn", [kept.fileno()])  # over store-max
        hung_up.shutdown(socket.SHUT_RDWR)  # as muxd does before it closes a connection
        _store_message(path, "FDSTOREREMOVE=1\nFDNAME=state-1", [])
        reader, writer = os.pipe()
        _store_message(path, "BARRIER=1", [writer])
        os.close(writer)
        barrier = select.poll()
        barrier.register(reader, select.POLLHUP)
        assert barrier.poll(10_000), "the store never closed the barrier's pipe"
        os.close(reader)
        kept.close()
        kept_peer.setblocking(False)
        with pytest.raises(BlockingIOError):  # the store's copy keeps it open
            kept_peer.recv(1)
        store.terminate()
        out, _ = store.communicate(timeout=10)
        counts = json.loads(out.splitlines()[-1])
        assert kept_peer.recv(1) == b""  # the store closed its copy when it stopped
    finally:
        if store.poll() is None:
            store.kill()
            store.wait()
    assert counts["received"] == 3 and counts["closed_over_max"] == 1
    assert counts["dropped_on_hangup"] == 1 and counts["removed_by_name"] == 1
    assert counts["barriers"] == 1
    assert counts["held_by_name"] == {"conn": 1}
    for sock in (hung_up, hung_up_peer, kept_peer):
        sock.close()
    os.close(state)


def test_restart_command_hands_every_connection_over(tmp_path: Path) -> None:
    out = tmp_path / "restart.json"
    stdout = _run_bench_module(
        "bench.restart", "--conns", "200", "--reps", "2", "--out", str(out), timeout=120
    )
    assert "SIGTERM to READY=1" in stdout
    result = json.loads(out.read_text())
    assert result["echoed_after"] == 200
    assert [r["taken_over"] for r in result["restarts"]] == [200, 200]
    assert all(0 < r["handover_s"] < r["total_s"] for r in result["restarts"])


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a network namespace of its own)")
def test_handover_memory_measures_both_processes_and_verifies_the_echo(tmp_path: Path) -> None:
    out = tmp_path / "handover_memory.json"
    stdout = _run_bench_module(
        "bench.handover_memory", "--conns", "20", "--reps", "1", "--out", str(out), timeout=120
    )
    assert "every byte echoed back afterwards" in stdout
    result = json.loads(out.read_text())
    (sample,) = result["samples"]
    # Each connection's whole buffer (64 KiB) of echo was pending and came across.
    assert sample["pending_kib"] == 20 * result["buffer_size"] // 1024
    # (The kernel batches RSS counter updates per thread: readings agree within ~256 KiB.)
    assert sample["old_peak_kib"] >= sample["old_before_kib"] - 1024
    assert sample["old_before_kib"] > result["idle_kib"]
    assert sample["new_peak_kib"] > result["idle_kib"]


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind not installed")
def test_callgrind_counts_instructions_per_connection(tmp_path: Path) -> None:
    stdout = _run_bench_module(
        "bench.callgrind", "--churn", "--servers", "c-epoll", "--seconds", "0.5",
        "--out", str(tmp_path), timeout=300,
    )  # fmt: skip
    assert "instructions per connection" in stdout
    row = next(line for line in stdout.splitlines() if line.startswith("c-epoll"))
    _name, connections, per_connection, _ratio = row.split()
    assert int(connections.replace(",", "")) > 0
    assert 20 < float(per_connection.replace(",", "")) < 100_000
