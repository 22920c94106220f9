"""Benchmark suite for muxd: ``python -m bench`` (see bench/RESULTS.md)."""

from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
BUILD_DIR = BENCH_DIR / "build"
OUT_DIR = BENCH_DIR / "out"
