"""Configuration: the shipped file, the built-in defaults, and every way to get it wrong."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from muxd import __version__
from muxd.config import (
    EX_CONFIG,
    SCHEMA,
    Address,
    Config,
    ConfigError,
    load_config,
    parse_config_text,
)

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "config" / "muxd.ini"


def run_muxd(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "muxd", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_shipped_file_documents_every_key_with_the_builtin_defaults() -> None:
    shipped = load_config(str(SHIPPED))
    assert shipped.listen == (Address("::", 7),)
    assert replace(shipped, listen=Config().listen, source=Config().source) == Config()
    text = SHIPPED.read_text()
    for section, key in SCHEMA:
        assert re.search(rf"^{key} =", text, re.MULTILINE), f"[{section}] {key} is undocumented"


def test_builtin_listen_is_loopback_7007() -> None:
    assert Config().listen == (Address("127.0.0.1", 7007),)


def test_listen_forms() -> None:
    config = parse_config_text(
        "[server]\nlisten = 127.0.0.1:7, [::1]:8, localhost:9 ; comment\n", "t.ini"
    )
    assert [str(a) for a in config.listen] == ["127.0.0.1:7", "[::1]:8", "127.0.0.1:9"]


BAD_CONFIGS = [
    # (text, words the one-line error must contain)
    ("[limits]\nmax_conections = 5\n", ["[limits] max_conections", "unknown key"]),
    ("[server]\nlisten = nowhere\n", ["[server] listen", "'nowhere'", "HOST:PORT"]),
    ("[metrics]\nlisten = 127.0.0.1\n", ["[metrics] listen", "'127.0.0.1'", "HOST:PORT"]),
    ("[server]\nlisten = 127.0.0.1:0\n", ["[server] listen", "1 to 65535"]),
    ("[server]\nlisten = 127.0.0.1:70000\n", ["[server] listen", "1 to 65535"]),
    ("[server]\nlisten = ::1:7\n", ["[server] listen", "brackets"]),
    ("[server]\nlisten = 127.0.0.1:7, 127.0.0.1:7\n", ["listed twice"]),
    ("[server]\nlisten = [::]:7, 127.0.0.1:7\n", ["[::]:7 already covers 127.0.0.1:7"]),
    ("[server]\nlisten =\n", ["[server] listen", "HOST:PORT"]),
    ("[server]\nbackend = kqueue\n", ["[server] backend", "'kqueue'", "auto"]),
    ("[limits]\nnofile = many\n", ["[limits] nofile", "'many'", "whole number"]),
    ("[limits]\nidle_timeout = -1\n", ["[limits] idle_timeout", "seconds"]),
    ("[limits]\nbuffer_size = 10\n", ["[limits] buffer_size", "1024"]),
    ("[logging]\nlevel = loud\n", ["[logging] level", "debug, info, warning, error"]),
    ("[logging]\nconnections = maybe\n", ["[logging] connections", "yes or no"]),
    ("[sever]\nlisten = 127.0.0.1:7\n", ["[sever]", "unknown section"]),
    ("listen = 127.0.0.1:7\n", ["[section] header"]),
    ("[server]\nbacklog = 1\nbacklog = 2\n", ["[server] backlog", "twice"]),
    ("[server]\nthis is not ini\n", ["KEY = VALUE", "line 2: 'this is not ini'"]),
]


@pytest.mark.parametrize(("text", "words"), BAD_CONFIGS)
def test_bad_config_is_named_precisely(text: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config_text(text, "/etc/muxd/muxd.ini")
    message = str(caught.value)
    assert message.startswith("/etc/muxd/muxd.ini")
    for word in words:
        assert word in message, message


@pytest.mark.parametrize(("text", "words"), BAD_CONFIGS[:10:3])
def test_bad_config_exits_78_with_one_line_and_no_traceback(
    tmp_path: Path, text: str, words: list[str]
) -> None:
    path = tmp_path / "bad.ini"
    path.write_text(text)
    for extra in ((), ("--check-config",)):
        result = run_muxd("--config", str(path), *extra)
        assert result.returncode == EX_CONFIG
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert str(path) in lines[0] and words[0] in lines[0]
        assert "Traceback" not in result.stderr


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    result = run_muxd("--config", str(tmp_path / "absent.ini"))
    assert result.returncode == EX_CONFIG
    assert "absent.ini" in result.stderr and "No such file" in result.stderr


def test_check_config_accepts_the_shipped_file() -> None:
    result = run_muxd("--config", str(SHIPPED), "--check-config")
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_check_restart_is_silent_on_a_good_file_and_says_what_a_bad_one_means(
        tmp_path: Path) -> None:
    """The unit's stop hook: 0 and nothing logged means hand over; 78 and one line saying
    the restart stops gracefully, and why, means not (issue 19)."""
    good = run_muxd("--config", str(SHIPPED), "--check-restart")
    assert (good.returncode, good.stdout, good.stderr) == (0, "", "")
    path = tmp_path / "bad.ini"
    path.write_text("[limits]\nidle_timeout = forever\n")
    bad = run_muxd("--config", str(path), "--check-restart")
    assert bad.returncode == EX_CONFIG
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1, bad.stderr
    assert lines[0].startswith(f"muxd: configuration error: {path}: [limits] idle_timeout = ")
    assert "this restart stops muxd gracefully instead of handing its connections over" \
        in lines[0]
    assert bad.stdout == ""


def test_version() -> None:
    result = run_muxd("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"muxd {__version__}"


def test_console_script_is_the_same_program() -> None:
    script = shutil.which("muxd", path=str(Path(sys.executable).parent))
    assert script, "the muxd console script is not installed beside this Python"
    result = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=20)
    assert result.stdout.strip() == f"muxd {__version__}"


def test_config_error_carries_the_error_priority_for_the_journal(tmp_path: Path) -> None:
    path = tmp_path / "bad.ini"
    path.write_text("[limits]\nnofile = many\n")
    read_end, write_end = os.pipe()
    status = os.fstat(write_end)
    result = subprocess.run(
        [sys.executable, "-m", "muxd", "--config", str(path)], stderr=write_end,
        env={**os.environ, "JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"}, timeout=20,
    )
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        lines = pipe.read().splitlines()
    assert result.returncode == EX_CONFIG
    assert len(lines) == 1 and lines[0].startswith("<3>muxd: configuration error:"), lines
