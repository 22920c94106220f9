"""Compiles the C load client and the C reference server into bench/build/."""

import os
import shutil
import subprocess
from pathlib import Path

from bench import BENCH_DIR, BUILD_DIR

LOADGEN_SOURCE = BENCH_DIR / "loadgen.c"
EPOLL_ECHO_SOURCE = BENCH_DIR / "peers" / "epoll_echo.c"


class BuildError(RuntimeError):
    pass


def compiled(source: Path) -> Path:
    """Path of an up-to-date ``cc -O2`` build of a single-file C program."""
    binary = BUILD_DIR / source.stem
    if binary.exists() and binary.stat().st_mtime >= source.stat().st_mtime:
        return binary
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise BuildError("no C compiler (cc) on PATH")
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    # Build to a private temp name so a failed, interrupted or concurrent build (two test
    # sessions at once) never leaves a half-written binary under the real name.
    partial = binary.with_name(f"{binary.name}.{os.getpid()}.partial")
    result = subprocess.run(
        [compiler, "-O2", "-Wall", "-o", str(partial), str(source)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode != 0:
        raise BuildError(f"building {source.name} failed:\n{result.stderr}")
    partial.replace(binary)
    return binary
