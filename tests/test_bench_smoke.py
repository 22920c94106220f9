"""Smoke test of the benchmark runner: it builds, runs a tiny scenario and reports.

Benchmarks are not timed tests: nothing here asserts a speed, only that the runner
works end to end and that the load client really verified echoed bytes.
"""

import json
import shutil
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
