"""What the configuration path may be, and what the parser takes as a value:
regular files only, capped in size; ASCII numbers; IPv4-mapped addresses;
error lines that stay one short line whatever the value."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from daemon_harness import connect, echo_once, free_port, server_config

from muxd.config import EX_CONFIG, MAX_CONFIG_BYTES, ConfigError, parse_config_text


def run_muxd(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "muxd", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _fifo(tmp_path: Path) -> str:
    path = tmp_path / "fifo.ini"
    os.mkfifo(path)
    return str(path)


def _huge(tmp_path: Path) -> str:
    path = tmp_path / "huge.ini"
    path.write_text("[server]\n" + "# padding\n" * (MAX_CONFIG_BYTES // 10 + 1))
    return str(path)


SPECIAL = {
    "/dev/zero": (lambda tmp: "/dev/zero", "a character device, not a regular file"),
    "/dev/urandom": (lambda tmp: "/dev/urandom", "a character device, not a regular file"),
    "fifo": (_fifo, "a FIFO, not a regular file"),
    "directory": (lambda tmp: str(tmp), "a directory, not a regular file"),
    "huge": (_huge, f"larger than {MAX_CONFIG_BYTES} bytes"),
}


@pytest.mark.parametrize("kind", sorted(SPECIAL))
def test_a_special_or_huge_file_is_refused_with_78_and_says_why(tmp_path, kind) -> None:
    make, reason = SPECIAL[kind]
    path = make(tmp_path)
    for extra in (("--check-config",), ()):
        result = run_muxd("--config", path, *extra, timeout=15)
        assert result.returncode == EX_CONFIG, result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert path in result.stderr and reason in result.stderr, result.stderr


@pytest.mark.parametrize("kind", ["/dev/zero", "fifo", "huge"])
def test_reload_of_a_path_that_became_special_keeps_the_daemon(start_muxd, tmp_path,
                                                                kind) -> None:
    port = free_port()
    daemon = start_muxd(server_config(port))
    kept = connect(port)
    make, reason = SPECIAL[kind]
    target = make(tmp_path)
    daemon.config_path.unlink()
    daemon.config_path.symlink_to(target)
    daemon.signal(signal.SIGHUP)
    daemon.notify.wait_for("RELOADING", "1")
    daemon.notify.wait_for("READY", "1")
    daemon.wait_log("reload failed, keeping the running configuration")
    assert reason in daemon.log
    assert daemon.process.poll() is None
    assert echo_once(kept, b"still here") == b"still here"
    kept.close()


BAD_NUMBERS = [
    ("[limits]\nmax_connections = 1_000\n", "whole number"),
    ("[limits]\nmax_connections = \u0661\u0660\u0660\n", "whole number"),  # Arabic-Indic 100
    ("[limits]\nmax_connections = \uff11\uff10\n", "whole number"),  # full-width 10
    ("[server]\nlisten = 127.0.0.1:+7007\n", "1 to 65535"),
    ("[server]\nbacklog = +5\n", "whole number"),
    ("[limits]\nidle_timeout = 1e-400\n", "too small to tell from 0"),
    ("[limits]\nudp_rate = 0.5E-330\n", "too small to tell from 0"),
    ("[limits]\nidle_timeout = 1e99999\n", "seconds"),
    ("[limits]\nidle_timeout = 1e\n", "seconds"),
    ("[limits]\nidle_timeout = 0." + "0" * 400 + "1\n", "too small to tell from 0"),
    ("[limits]\nshutdown_timeout = inf\n", "seconds"),
    ("[limits]\nshutdown_timeout = nan\n", "seconds"),
    ("[limits]\nudp_rate = 1_0\n", "datagrams per second"),
    ("[limits]\nudp_rate = \u0665\n", "datagrams per second"),
]


@pytest.mark.parametrize(("text", "expected"), BAD_NUMBERS)
def test_numbers_are_ascii_decimal_digits_only(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config_text(text, "t.ini")
    assert expected in str(caught.value)


def test_plain_numbers_still_parse() -> None:
    config = parse_config_text("[server]\nbacklog = 0128\n[limits]\nidle_timeout = 2.5\n"
                               "shutdown_timeout = .5\nudp_rate = 10.\n"
                               "udp_total_rate = 1e+3\n", "t.ini")
    assert (config.backlog, config.idle_timeout, config.shutdown_timeout, config.udp_rate,
            config.udp_total_rate) == (128, 2.5, 0.5, 10.0, 1000.0)


@pytest.mark.parametrize("text", [
    "[server]\nlisten = " + "x" * 100_000 + "\n",
    "[access]\ndeny = " + "y" * 100_000 + "\n",
    "[limits]\nnofile = " + "9" * 100_000 + "\n",
    "[server]\n" + "z" * 100_000 + "\n",
    "[server]\n" + "k" * 100_000 + " = 1\n",
    "[server]\n" + "not ini\n" * 10_000,
])
def test_a_huge_value_gives_a_short_error_line(tmp_path: Path, text: str) -> None:
    path = tmp_path / "long.ini"
    path.write_text(text)
    result = run_muxd("--config", str(path), "--check-config")
    assert result.returncode == EX_CONFIG
    assert len(result.stderr) < 600, f"{len(result.stderr)} bytes: {result.stderr[:300]}"
    assert "characters)" in result.stderr or "more" in result.stderr \
        or "..." in result.stderr, result.stderr


def test_ipv4_mapped_listen_is_the_ipv4_address_and_a_duplicate_is_caught() -> None:
    config = parse_config_text("[server]\nlisten = [::ffff:127.0.0.1]:7007\n"
                               "udp = [::ffff:127.0.0.1]:7007\n", "t.ini")
    assert [str(a) for a in config.listen] == ["127.0.0.1:7007"]
    assert [str(a) for a in config.udp] == ["127.0.0.1:7007"]
    for text in ("127.0.0.1:7007, [::ffff:127.0.0.1]:7007",
                 "[::ffff:0.0.0.0]:7007, 127.0.0.1:7007"):
        with pytest.raises(ConfigError) as caught:
            parse_config_text(f"[server]\nlisten = {text}\n", "t.ini")
        assert "listed twice" in str(caught.value) or "already covers" in str(caught.value)


def test_an_address_list_is_bounded_so_checking_it_is_quick(tmp_path: Path) -> None:
    many = ", ".join(f"127.0.{n // 250}.{n % 250 + 1}:7" for n in range(60_000))
    path = tmp_path / "many.ini"
    path.write_text(f"[server]\nlisten = {many}\n")
    result = run_muxd("--config", str(path), "--check-config", timeout=10)
    assert result.returncode == EX_CONFIG
    assert "at most 64 addresses (60000 given)" in result.stderr
