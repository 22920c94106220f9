"""The daemon's lines that README.md quotes are the daemon's real lines, so they cannot drift.

Each quoted configuration error is turned back into the file that causes it (the section,
key and value it names) and checked with `muxd --check-config`; each quoted reload line is
produced by a running muxd reloading a change of the keys it names; the hand-over lines are
produced by restarts through the fake PID 1 (tests/fake_systemd.py), and compared with the
README's numbers, PIDs and version as wildcards. A quote this file cannot reproduce fails
the test: extend the test with it rather than let it go unchecked. The lines systemd adds
around a failed reload are checked on systemd 252 and 257 in
tests/systemd/test_systemd_reload.py.
"""

from __future__ import annotations

import ast
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from daemon_harness import (
    connect,
    connect_slow_reader,
    echo_once,
    free_port,
    push_until_stalled,
    wait_until,
)
from fake_systemd import Unit

from muxd.config import DEFAULT_CONFIG_PATH, EX_CONFIG

README = Path(__file__).resolve().parent.parent / "README.md"
ERROR_PREFIX = "muxd: configuration error: "
QUOTED_ERROR = re.compile(r"(?P<path>/\S+): \[(?P<section>\w+)\] (?P<key>\w+)"
                          r"(?: = (?P<value>'(?:[^'\\]|\\.)*'))?: (?P<message>.*)")
# A value for each key the README's reload lines name: (before, after) the reload.
RELOAD_CHANGES = {
    ("limits", "idle_timeout"): ("300", "1"),
    ("logging", "connections"): ("no", "yes"),
    ("metrics", "listen"): ("", "127.0.0.1:{port}"),
    ("server", "backlog"): ("1024", "512"),
}


def readme_lines() -> list[str]:
    return README.read_text().splitlines()


def quoted_errors() -> list[str]:
    """Every configuration error line README.md shows, from the message on (also after a
    journal prefix such as `muxd[166]: `)."""
    found = []
    for line in readme_lines():
        if ERROR_PREFIX in line:
            found.append(ERROR_PREFIX + line.split(ERROR_PREFIX, 1)[1].rstrip("`").rstrip())
    return found


def test_readme_quotes_configuration_errors() -> None:
    # The broken-reload example and the strict-validation example at least.
    assert len(quoted_errors()) >= 2, quoted_errors()


@pytest.mark.parametrize("quote", quoted_errors())
def test_a_quoted_configuration_error_is_what_check_config_prints(tmp_path: Path,
                                                                   quote: str) -> None:
    match = QUOTED_ERROR.fullmatch(quote[len(ERROR_PREFIX):])
    assert match, f"cannot tell which file gives this README line: {quote}"
    value = "1" if match["value"] is None else ast.literal_eval(match["value"])
    config = tmp_path / "muxd.ini"
    config.write_text(f"[{match['section']}]\n{match['key']} = {value}\n")
    # The stop hook's line (README, "Configure and reload") comes from --check-restart.
    check = "--check-restart" if "this restart" in quote else "--check-config"
    result = subprocess.run([sys.executable, "-m", "muxd", check, "--config",
                             str(config)], capture_output=True, text=True, timeout=30)
    assert result.returncode == EX_CONFIG, result
    printed = result.stderr.strip().replace(str(config), match["path"])
    assert printed == quote, f"README says:\n  {quote}\nmuxd says:\n  {printed}"


def quoted_reload_lines() -> list[str]:
    return [line.strip() for line in readme_lines()
            if re.match(r"\s+(reloaded|reload:) /\S+", line) or
            re.match(r"\s+reload: \[", line)]


def test_readme_quotes_reload_lines() -> None:
    lines = quoted_reload_lines()
    assert any("nothing applied now" in line for line in lines), lines
    assert any(line.startswith("reloaded") and "nothing applied" not in line
               for line in lines), lines


def _keys(line: str) -> tuple[tuple[str, str], ...]:
    return tuple(re.findall(r"\[(\w+)\] (\w+)", line))


def _config(port: int, metrics_port: int, keys: tuple[tuple[str, str], ...],
            which: int) -> str:
    sections: dict[str, list[str]] = {"server": [f"listen = 127.0.0.1:{port}"]}
    for section, key in keys:
        assert (section, key) in RELOAD_CHANGES, \
            f"add a change of [{section}] {key} to RELOAD_CHANGES to check its README line"
        value = RELOAD_CHANGES[section, key][which].format(port=metrics_port)
        sections.setdefault(section, []).append(f"{key} = {value}")
    return "".join(f"[{name}]\n" + "".join(f"{line}\n" for line in lines)
                   for name, lines in sections.items())


@pytest.mark.parametrize("keys", sorted({_keys(line) for line in quoted_reload_lines()}))
def test_quoted_reload_lines_are_what_a_reload_logs(start_muxd, keys) -> None:
    port, metrics_port = free_port(), free_port()
    daemon = start_muxd(_config(port, metrics_port, keys, 0))
    daemon.write_config(_config(port, metrics_port, keys, 1))
    daemon.signal(signal.SIGHUP)
    daemon.wait_log("reloaded ")
    logged = [line.split(": ", 1)[1].replace(str(daemon.config_path), DEFAULT_CONFIG_PATH)
              for line in daemon.log.splitlines() if " muxd[" in line and ": " in line]
    for quote in quoted_reload_lines():
        if _keys(quote) == keys:
            assert quote in logged, f"README says:\n  {quote}\nmuxd said:\n  " + \
                "\n  ".join(logged)


def _shape(quote: str) -> re.Pattern[str]:
    """The README line with its numbers (counts, PID, KiB) and its muxd version as
    wildcards."""
    parts = re.split(r"(muxd [0-9][0-9A-Za-z.+]*|(?<![\w.])[0-9]+(?![\w.]))", quote)
    return re.compile("".join(
        re.escape(part) if index % 2 == 0 else
        r"muxd [0-9][0-9A-Za-z.+]*" if part.startswith("muxd") else r"[0-9]+"
        for index, part in enumerate(parts)))


def quoted_takeover_lines() -> list[str]:
    lines = [line.strip() for line in readme_lines() if line.startswith("    took over ")]
    lines += re.findall(r"`(no connection to take over [^`]*)`", README.read_text())
    return lines


def test_quoted_takeover_lines_are_what_a_restart_logs(pid1, start_muxd, tmp_path) -> None:
    quotes = quoted_takeover_lines()
    assert any(q.startswith("took over") for q in quotes) and \
        any(q.startswith("no connection") for q in quotes), quotes
    port = free_port()
    unit = Unit(pid1, start_muxd, f"[server]\nlisten = 127.0.0.1:{port}\n", tmp_path)
    idle = unit.restart()
    talker = connect(port)
    assert echo_once(talker, b"x") == b"x"
    slow = connect_slow_reader(port)
    push_until_stalled(slow, b"\0" * 65536)  # pending echo in muxd
    wait_until(lambda: pid1.parked() == 2, what="both connections parked")
    busy = unit.restart()
    busy.wait_log("took over 2 connections")
    logged = [line.split(": ", 1)[1] for line in idle.log.splitlines() + busy.log.splitlines()
              if " muxd[" in line and ": " in line]
    for quote in quotes:
        assert any(_shape(quote).fullmatch(line) for line in logged), \
            f"README says:\n  {quote}\nmuxd said:\n  " + "\n  ".join(logged)
    talker.close()
    slow.close()


DEBIAN_PROMETHEUS_YML = Path("/etc/prometheus/prometheus.yml")  # the prometheus package's


@pytest.mark.skipif(not DEBIAN_PROMETHEUS_YML.is_file() or not Path("/usr/bin/promtool").exists(),
                    reason="Debian's prometheus package is not installed")
def test_the_prometheus_job_pastes_into_debians_prometheus_yml(tmp_path: Path) -> None:
    """README's snippet, pasted at the end of Debian's prometheus.yml as it says, is a
    valid configuration (a whole `scrape_configs:` block there would be a duplicate key)."""
    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(), re.S)
    snippet = next(block for block in blocks if "job_name: muxd" in block)
    pasted = tmp_path / "prometheus.yml"
    pasted.write_text(DEBIAN_PROMETHEUS_YML.read_text().rstrip("\n") + "\n" + snippet)
    result = subprocess.run(["/usr/bin/promtool", "check", "config", str(pasted)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_help_says_what_muxd_serves() -> None:
    result = subprocess.run([sys.executable, "-m", "muxd", "--help"], capture_output=True,
                            text=True, timeout=30, check=True)
    assert "TCP and UDP echo daemon (RFC 862)" in " ".join(result.stdout.split())
